"""A sweep through both study engines: wall time of `seqgen study --vary alpha=...` batched
(each phase's points of one shape as one stack) against Ray (a chain per task), and a rerun.

    python benchmarks/sweep_engines.py [--alphas 0.1,0.3,0.5,0.7,0.9] [--seeds 0,1,2]
                                       [--phases 1-5] [--json PATH]

The issue's sweep is alpha at 5 values x 3 seeds of `combined` at the demo preset (15 chains x 5
phases of 4 epochs). Each engine runs in a fresh folder with its own sqlite store on the embedded
data made once (1,000 samples, as the demo uses); then the same command again, which must train
nothing (its wall time is the cost of finding every phase registered).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from seqgen.bench import cpu_name

SEQGEN = [sys.executable, "-m", "seqgen.cli"]


def run(args: list[str], cwd: Path) -> tuple[float, str]:
    """Wall seconds and stderr of one seqgen command in `cwd` with its own store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlflow.db'}"
    started = time.perf_counter()
    done = subprocess.run(SEQGEN + args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stderr


def phase_runs(folder: Path) -> int:
    """Phase runs in the folder's store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids, "tags.kind = 'phase'", max_results=5000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--phases", default="1-5")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sweep-data-") as tmp:
        data = Path(tmp) / "data"
        run(["synth", "--out", str(data), "--n_samples", "1000"], Path(tmp))
        study = ["study", "--strategy", "combined", "--preset", "demo", "--seeds", args.seeds]
        study += ["--phases", args.phases, "--data_dir", str(data)]
        study += ["--vary", f"alpha={args.alphas}"]
        result = {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "chains": len(args.alphas.split(",")) * len(args.seeds.split(",")),
            "phases": args.phases,
        }
        for engine, extra in (("ray", []), ("batched", ["--batched"])):
            with tempfile.TemporaryDirectory(prefix=f"sweep-{engine}-") as folder:
                first, _ = run(study + extra, Path(folder))
                before = phase_runs(Path(folder))
                again, _ = run(study + extra, Path(folder))
                trained = phase_runs(Path(folder)) - before
            result[f"{engine}_phase_runs"] = before
            result |= {f"{engine}_s": round(first, 1), f"{engine}_rerun_s": round(again, 1)}
            result[f"{engine}_rerun_trained_phases"] = trained
            print(f"{engine:>8}: {first:.1f} s; rerun {again:.1f} s ({trained} phases trained)")
        result["batched_faster_by"] = round(result["ray_s"] / result["batched_s"], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
