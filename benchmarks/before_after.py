"""The same benchmarks through two checkouts of seqgen, alternating, in one run on one machine:
`seqgen bench` (training and generation throughput through the trainer's own step) at the `full`
preset with 1 and 3 members and at `demo` with 1, then `benchmarks/study_stacked.py
--epochs-only` (seconds per stacked epoch of 1 and 3 `full` members), then the plain autograd
path of the LSTM (SEQGEN_RECURRENCE=plain) in the second checkout, in the trainer's precision and
in float32. Each checkout needs its own .venv (make setup).

    python benchmarks/before_after.py --before ../seqgen-main --after . [--rounds 2]

Speed is a ratio measured here, in one run: machines of one kind do not share a CPU model."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path


def bench(checkout: Path, preset: str, members: int, env: dict | None = None) -> dict:
    out = subprocess.run(
        [str(checkout / ".venv/bin/seqgen"), "bench", "--preset", preset, "--batches", "5",
         "--threads", "2", "--members", str(members), "--json"],
        capture_output=True, text=True, cwd=checkout, env=dict(os.environ, **(env or {})),
        check=True,
    ).stdout  # fmt: skip
    return json.loads(out[out.index("{") :])


def epochs(checkout: Path, members: str) -> list[str]:
    out = subprocess.run(
        [str(checkout / ".venv/bin/python"), "benchmarks/study_stacked.py", "--epochs-only",
         "--members", members],
        capture_output=True, text=True, cwd=checkout, check=True,
    ).stdout  # fmt: skip
    return [line.strip() for line in out.splitlines() if "per stacked epoch" in line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, default=Path("."))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    first = True
    for _ in range(args.rounds):
        for preset, members in (("full", 1), ("full", 3), ("demo", 1)):
            for side, checkout in sides.items():
                r = bench(checkout, preset, members)
                if first:
                    print(f"CPU: {r['cpu']}; precision: {r['precision']}", flush=True)
                    first = False
                print(
                    f"bench {side:>6} {preset} M={members}: train {r['train_sequences_per_s']} "
                    f"seq/s, generate {r['generate_sequences_per_s']} seq/s ({r['recurrence']}, "
                    f"load {r['load_average_1min']})",
                    flush=True,
                )
    for side, checkout in sides.items():
        print(f"epochs {side:>6}: " + " | ".join(epochs(checkout, "1,3")), flush=True)
    for env in ({}, {"SEQGEN_CPU_PRECISION": "float32"}):
        for recurrence in ("auto", "plain"):
            r = bench(sides["after"], "full", 1, env | {"SEQGEN_RECURRENCE": recurrence})
            print(
                f"after full M=1, {r['gemm_dtype']}, {r['recurrence']}: train "
                f"{r['train_sequences_per_s']} seq/s, generate {r['generate_sequences_per_s']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
