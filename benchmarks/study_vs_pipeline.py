"""Wall time of one study, two ways, in one run: `seqgen study` (chains as Ray tasks on a local
instance, one thread each) against `seqgen pipeline` (the same chains one after another).

    python benchmarks/study_vs_pipeline.py [--preset demo] [--strategy all] [--seeds 0,1]
        [--data_dir DIR]   (made with `seqgen synth` in a temporary folder when not given)

Each way runs in a fresh folder with its own sqlite store, as a user would run it; the table
gives the seconds of each and their ratio, and names the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQGEN = str(Path(sys.executable).with_name("seqgen"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                extra = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
                return f"{line.split(':', 1)[1].strip()} ({', '.join(extra) or 'no bf16'})"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(cmd: list[str], folder: Path) -> tuple[float, str]:
    """Seconds the command took in a fresh folder with its own store, and what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    folder.mkdir(parents=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return seconds, proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--strategy", default="all")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="seqgen-bench-") as tmp:
        tmp = Path(tmp)
        data = Path(args.data_dir).resolve() if args.data_dir else tmp / "data"
        if not args.data_dir:
            subprocess.run([SEQGEN, "synth", "--out", str(data)], check=True, capture_output=True)
        common = [
            "--preset",
            args.preset,
            "--strategy",
            args.strategy,
            "--seeds",
            args.seeds,
            "--data_dir",
            str(data),
        ]
        study, study_log = timed([SEQGEN, "study", *common], tmp / "study")
        pipeline, _ = timed([SEQGEN, "pipeline", *common], tmp / "pipeline")
    chains = len(args.seeds.split(",")) * (
        3 if args.strategy == "all" else len(args.strategy.split(","))
    )
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {args.preset} preset, {chains} chains")
    print(f"{'way':<34} {'seconds':>8}")
    print(f"{'seqgen study (local Ray)':<34} {study:8.1f}")
    print(f"{'seqgen pipeline (one after another)':<34} {pipeline:8.1f}")
    print(f"study is {pipeline / study:.2f}x faster")
    table = study_log[study_log.rindex("\nchain ") + 1 :] if "\nchain " in study_log else ""
    print(f"\nseqgen study's final table:\n{table}", end="")


if __name__ == "__main__":
    main()
