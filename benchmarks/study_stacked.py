"""`seqgen study --batched` against `seqgen study` (chains as Ray tasks), and stacked epochs.

    python benchmarks/study_stacked.py [--sizes demo,full] [--seeds 0,1,2] [--json PATH]
    python benchmarks/study_stacked.py --epochs-only [--members 1,3,9,15]     # a GPU machine
    python benchmarks/study_stacked.py --full-study                           # a GPU machine

Study part (any machine): the same study, every strategy x the seeds, through both commands,
each in a fresh folder with its own sqlite store, on the embedded data made once; wall time of
each command, and their ratio. Sizes: `demo` is the demo preset (hidden 64, 1,000 samples, 5
phases of 4 epochs); `full` is the full model (hidden 256, 2 layers) on the first 1,000 samples,
phases 1-2 of 2 epochs each: the full study itself takes hours on 2 CPU cores.

Epochs part (on a GPU, or with --epochs-only): seconds of one stacked training epoch (4,400
sequences per member, batch 32) plus its validation and test passes (550 + 550 per member), at
the full size, for each member count, against one chain's; synthetic data, no tracking store.
The full study: `seqgen study --batched --preset full --strategy all --seeds 0,1,2` on the 5,500
embedded samples, wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SEQGEN = [sys.executable, "-m", "seqgen.cli"]
SIZES = {
    "demo": ["--preset", "demo"],
    "full": ["--preset", "full", "--max_samples", "1000", "--phases", "1-2", "--epochs", "2"],
}


def run(args: list[str], cwd: Path) -> float:
    """Wall seconds of one seqgen command in its own folder and store; it must succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlflow.db'}"
    started = time.perf_counter()
    done = subprocess.run(SEQGEN + args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds


def study_part(sizes: list[str], seeds: str, data: Path) -> list[dict]:
    rows = []
    for size in sizes:
        common = ["study", "--strategy", "all", "--seeds", seeds, "--data_dir", str(data)]
        common += SIZES[size]
        times = {}
        for way, extra in (("ray", []), ("batched", ["--batched"])):
            with tempfile.TemporaryDirectory(prefix=f"study-{way}-") as folder:
                times[way] = run(common + extra, Path(folder))
            print(f"{size:>5} {way:>8}: {times[way]:.1f} s", flush=True)
        rows.append(
            {
                "size": size,
                "chains": 3 * len(seeds.split(",")),
                "study_ray_s": round(times["ray"], 1),
                "study_batched_s": round(times["batched"], 1),
                "batched_faster_by": round(times["ray"] / times["batched"], 2),
            }
        )
    return rows


def stacked_epoch_seconds(M: int, s, cfg, device: torch.device, precision) -> float:
    """Wall seconds of one stacked epoch of M members (the second of two: graphs captured and
    kernels compiled in the first)."""
    from seqgen.model.stacked import StackedGenerators
    from seqgen.training.losses import Objective
    from seqgen.training.stacked_step import (
        StackedAdamW,
        StackedStepGraphs,
        evaluate_stacked,
        stacked_precision,
        stacked_step,
    )
    from seqgen.training.step import cuda_graphs_wanted, sampling_generator

    n_train, n_eval, B, T = 4400, 550, s.batch_size, 151
    torch.manual_seed(0)
    model = StackedGenerators(cfg, M).to(device).train()
    loss_fn = Objective([s.weights] * M, [s.max_lag] * M)
    opt = StackedAdamW(list(model.parameters()), [s.start_lr] * M, [s.weight_decay] * M)
    prec = stacked_precision(precision, M)
    graphed = cuda_graphs_wanted(device, 1)
    graphs = StackedStepGraphs(model, loss_fn, opt, prec) if graphed else None
    p, y = torch.randn(M, n_train, 2, device=device), torch.randn(M, n_train, T, 5, device=device)
    gens = [sampling_generator(m, 1, device) for m in range(M)]
    per_member = ([0.7] * M, [s.noise_level] * M, [s.clip_grad_norm] * M)
    seconds = 0.0
    for _ in range(2):
        started = time.perf_counter()
        for i in range(0, n_train, B):
            batch = [(p[:, i : i + B], y[:, i : i + B])]
            stacked_step(model, loss_fn, batch, opt, prec, gens, *per_member, graphs=graphs)
        for ratio in (0.0, 1.0, 0.0):  # validation free-running and teacher-forced, test
            evaluate_stacked(model, loss_fn, p[:, :n_eval], y[:, :n_eval], ratio, prec)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return seconds


def epochs_part(member_counts: list[int]) -> list[dict]:
    """One stacked epoch at the full size per member count, on synthetic data."""
    from seqgen.config import resolve
    from seqgen.model.generator import ModelConfig
    from seqgen.training.step import choose_precision

    s = resolve("combined", 1, "full")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = choose_precision(device, True)
    cfg = ModelConfig(5, 2, s.hidden_size, s.num_layers, s.dropout)
    rows = []
    for M in member_counts:
        seconds = stacked_epoch_seconds(M, s, cfg, device, precision)
        rows.append({"members": M, "seconds_per_epoch": round(seconds, 2)})
        print(f"{M:>3} members: {seconds:.2f} s per stacked epoch", flush=True)
    one = rows[0]["seconds_per_epoch"] if rows and rows[0]["members"] == 1 else None
    for r in rows:
        if one:
            r["vs_one_chain_each"] = round(one * r["members"] / r["seconds_per_epoch"], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="demo,full")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs-only", action="store_true", help="only the stacked epochs")
    ap.add_argument("--members", default="1,3,9,15")
    ap.add_argument("--full-study", action="store_true", help="the whole full study, batched")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from seqgen.bench import cpu_name

    result: dict = {"cpu": cpu_name(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
    work = Path(tempfile.mkdtemp(prefix="study-stacked-"))
    try:
        data = work / "data"
        if not args.epochs_only:
            subprocess.run(SEQGEN + ["synth", "--out", str(data)], check=True, capture_output=True)
            result["study"] = study_part(args.sizes.split(","), args.seeds, data)
        if args.epochs_only or torch.cuda.is_available():  # on 2 CPU cores: 42 s per member
            result["epochs"] = epochs_part([int(m) for m in args.members.split(",")])
        if args.full_study:
            if not data.exists():
                subprocess.run(SEQGEN + ["synth", "--out", str(data)], check=True)
            cmd = ["study", "--batched", "--preset", "full", "--strategy", "all"]
            cmd += ["--seeds", "0,1,2", "--data_dir", str(data)]
            result["full_study_seconds"] = round(run(cmd, work), 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
