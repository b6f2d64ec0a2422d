"""One check of a GPU node before a study runs there (issue #26), cheapest and most telling first.

    python benchmarks/gpu_check.py --out DIR [--budget 480]
    python benchmarks/gpu_check.py --cpu --out DIR     # the same stages at tiny shapes on a CPU

Each stage runs in a process of its own under its own time limit (and what is left of --budget),
prints `PASS|FAIL|SKIP stage seconds what` and appends a JSON line to DIR/gpu_check.jsonl:

  device   the device and the versions of Python, torch, triton and MLflow
  kernels  the Triton recurrence against the float64 Python one at 3 small shapes: output, every
           gradient, generation without autograd, fp16 GEMMs
  capture  stacked steps through CUDA graphs in the trainer's batch order (full batches, then the
           smaller last one), every shape captured after its eager warm-up: equal to eager steps
  epoch    one stacked epoch of 1 and of 9 members (full: 4,400 sequences each, batch 32): seconds
           (goal 0.8 s), GPU and host time per step, peak memory
  study    `seqgen study --batched`, every strategy x 3 seeds x 5 phases x 3 epochs, on a local
           sqlite store: each round's time outside its epochs (benchmarks/round_overhead.py)
  project  the full study's wall time (9 chains x 5 phases of the `full` preset) from the two
           stages before

--cpu: kernels under Triton's interpreter, graphs through EagerCapture (SEQGEN_CUDA_GRAPHS=emulate:
it refuses what a capture would), every shape tiny; tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (stage, seconds allowed on an H100); --cpu allows each 4x (the interpreter is slow)
LIMITS = {"device": 60, "kernels": 90, "capture": 90, "epoch": 120, "study": 150}
GOAL_EPOCH_S = 0.8  # one stacked epoch of 9 full members


class Skip(Exception):
    """A stage that cannot run here (no triton, no time left)."""


def shapes(cpu: bool) -> dict:
    """The sizes every stage uses: the `full` model on a GPU, tiny ones on a CPU."""
    if cpu:
        return {"hidden": 8, "T": 12, "n_train": 10, "batch": 4, "members": (1, 3)}
    return {"hidden": 256, "T": 151, "n_train": 4400, "batch": 32, "members": (1, 9)}


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stage_device(cpu: bool) -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "mlflow"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    dev = device()
    if not cpu and dev.type != "cuda":
        raise RuntimeError("no CUDA device (torch.cuda.is_available() is False); --cpu for a CPU")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu"
    return {"what": f"{name}, " + ", ".join(f"{k} {v}" for k, v in versions.items()), **versions}


def lstm_inputs(M, T, B, K, F, H, L, dtype, dev, seed=0):
    """autoregressive_lstm's arguments after mm_dtype (as tests/test_native.py makes them)."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=0.5):
        return (torch.randn(M, *s, generator=g, dtype=torch.float64) * scale).to(dev, dtype)

    use_truth = (torch.rand(M, T, B, 1, generator=g) < 0.5).to(dev, dtype)
    drop = (
        (torch.rand(M, L - 1, T, B, H, generator=g) < 0.7).to(dev, dtype) / 0.7 if L > 1 else None
    )
    args = [r(T, B, F), r(F, 4 * H), r(4 * H, scale=0.1), r(T, B, K), use_truth]
    args += [r(L, B, H), r(L, B, H), drop, r(K, 4 * H), r(H, K), r(K, scale=0.1), r(H, 4 * H)]
    for _ in range(1, L):
        args += [r(H, 4 * H), r(H, 4 * H), r(4 * H, scale=0.1)]
    return [
        a.requires_grad_(True) if a is not None and i not in (3, 4, 7) else a
        for i, a in enumerate(args)
    ]


def output_and_grads(fn, mm_dtype, args):
    import torch

    out = fn(mm_dtype, *args)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    params = [a for a in args if a is not None and a.requires_grad]
    return out.detach(), torch.autograd.grad((out * weights.view(out.shape)).sum(), params)


def stage_kernels(cpu: bool) -> dict:
    import torch

    try:
        from seqgen.model import fused
    except ImportError as e:
        raise Skip(f"triton does not import: {e}") from e
    from seqgen.model.cells.lstm import plain_recurrence

    dev = device()
    checked = []
    for M, T, B, H, L in ((1, 5, 3, 8, 1), (3, 7, 4, 8, 2), (2, 9, 5, 16, 2)):
        if not cpu:
            T, B, H = T * 4, B * 8, H * 8
        cpu64 = lstm_inputs(M, T, B, 3, 4, H, L, torch.float64, "cpu")
        ref, ref_grads = output_and_grads(plain_recurrence, None, cpu64)
        ours32 = lstm_inputs(M, T, B, 3, 4, H, L, torch.float32, dev)
        for mm_dtype, tol in ((None, 1e-4), (torch.float16, 2e-2)):
            out, grads = output_and_grads(fused.triton_lstm, mm_dtype, ours32)
            torch.testing.assert_close(out.cpu().double(), ref, atol=tol, rtol=tol)
            for got, want in zip(grads, ref_grads, strict=True):
                cos = torch.nn.functional.cosine_similarity(
                    got.cpu().double().flatten(), want.flatten(), dim=0
                )
                assert cos > 1 - tol, (M, T, B, H, L, mm_dtype, float(cos))
        with torch.no_grad():
            generated = fused.triton_lstm(None, *ours32)
        torch.testing.assert_close(generated.cpu().double(), ref, atol=1e-4, rtol=1e-4)
        checked.append(f"M{M} T{T} B{B} H{H} L{L}")
    return {
        "what": "float32, fp16, gradients and generation equal float64 at " + "; ".join(checked)
    }


def stack_setup(M: int, cpu: bool, seed: int = 0):
    """A stacked model of M `combined` members at this mode's size, its optimiser, precision."""
    import torch

    from seqgen.config import resolve
    from seqgen.model.generator import ModelConfig
    from seqgen.model.stacked import StackedGenerators
    from seqgen.training.losses import Objective
    from seqgen.training.stacked_step import StackedAdamW, stacked_precision
    from seqgen.training.step import choose_precision

    s, size, dev = resolve("combined", 1, "full"), shapes(cpu), device()
    torch.manual_seed(seed)
    cfg = ModelConfig(5, 2, size["hidden"], s.num_layers, s.dropout)
    model = StackedGenerators(cfg, M).to(dev).train()
    loss_fn = Objective([s.weights] * M, [s.max_lag] * M)
    optimizer = StackedAdamW(list(model.parameters()), [s.start_lr] * M, [s.weight_decay] * M)
    precision = stacked_precision(choose_precision(dev, dev.type == "cuda"), M)
    return s, model, loss_fn, optimizer, precision


def epoch_batches(M: int, cpu: bool, seed: int = 1):
    """An epoch's batches in the trainer's order: full ones, then the smaller rest."""
    import torch

    size, dev = shapes(cpu), device()
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(M, size["n_train"], 2, generator=g).to(dev)
    y = torch.randn(M, size["n_train"], size["T"], 5, generator=g).to(dev)
    order = torch.arange(size["n_train"], device=dev)
    return [[(p[:, b], y[:, b])] for b in order.split(size["batch"])]


def run_steps(M, cpu, graphed, epochs=2):
    """Stacked steps over `epochs` epochs in the trainer's order; their results and the model."""
    from seqgen.training.stacked_step import StackedStepGraphs, stacked_step
    from seqgen.training.step import graph_capture, sampling_generator

    s, model, loss_fn, optimizer, precision = stack_setup(M, cpu)
    capture = graph_capture(device(), 1) if graphed else None
    graphs = StackedStepGraphs(model, loss_fn, optimizer, precision, capture) if capture else None
    per_member = ([0.7] * M, [s.noise_level] * M, [s.clip_grad_norm] * M)
    results = []
    for epoch in range(epochs):
        gens = [sampling_generator(m, epoch, device()) for m in range(M)]
        for micro in epoch_batches(M, cpu, seed=epoch):
            results.append(
                stacked_step(
                    model, loss_fn, micro, optimizer, precision, gens, *per_member, graphs=graphs
                )
            )
    return results, model, graphs


def stage_capture(cpu: bool) -> dict:
    import torch

    M = 3
    graphed, graphed_model, graphs = run_steps(M, cpu, graphed=True)  # first: nothing warmed yet
    if graphs is None:
        raise Skip("no graphs here (SEQGEN_CUDA_GRAPHS=0, or a CPU without --cpu)")
    eager, eager_model, _ = run_steps(M, cpu, graphed=False)
    tol = 1e-5 if cpu else 1e-3
    for a, b in zip(graphed, eager, strict=True):
        torch.testing.assert_close(a.loss, b.loss, atol=tol, rtol=tol)
        assert torch.equal(a.stepped, b.stepped)
    for a, b in zip(graphed_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    sizes = sorted({key[1] for key in graphs.graphs.graphs}, reverse=True)
    return {
        "what": f"{len(graphed)} steps over 2 epochs, graphs of batch {sizes} captured after "
        "their warm-ups, equal to eager",
        "batch_sizes": sizes,
    }


def stage_epoch(cpu: bool) -> dict:
    import torch

    from seqgen.training.stacked_step import StackedStepGraphs, stacked_step
    from seqgen.training.step import graph_capture, sampling_generator

    dev, rows = device(), []
    for M in shapes(cpu)["members"]:
        s, model, loss_fn, optimizer, precision = stack_setup(M, cpu)
        capture = graph_capture(dev, 1)
        graphs = (
            StackedStepGraphs(model, loss_fn, optimizer, precision, capture) if capture else None
        )
        per_member = ([0.7] * M, [s.noise_level] * M, [s.clip_grad_norm] * M)
        batches = epoch_batches(M, cpu)
        for epoch in range(2):  # the second: graphs captured, kernels compiled in the first
            gens = [sampling_generator(m, epoch, dev) for m in range(M)]
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
            host, started = 0.0, time.perf_counter()
            for micro in batches:
                t = time.perf_counter()
                stacked_step(
                    model, loss_fn, micro, optimizer, precision, gens, *per_member, graphs=graphs
                )
                host += time.perf_counter() - t
            row = {"members": M, "graphed": graphs is not None}
            if dev.type == "cuda":
                end.record()
                torch.cuda.synchronize()
                row["gpu_ms_per_step"] = round(start.elapsed_time(end) / len(batches), 3)
                row["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            row["seconds_per_epoch"] = round(time.perf_counter() - started, 3)
            row["host_ms_per_step"] = round(1000 * host / len(batches), 3)
        rows.append(row)
    last = rows[-1]
    what = ", ".join(f"{r['members']} members {r['seconds_per_epoch']} s" for r in rows)
    return {
        "what": f"per stacked epoch: {what} (goal {GOAL_EPOCH_S} s at 9 full members)",
        "rows": rows,
        "goal_met": None if cpu else last["seconds_per_epoch"] <= GOAL_EPOCH_S,
    }


def stage_study(cpu: bool) -> dict:
    from round_overhead import study_overhead

    if cpu:
        result = study_overhead("smoke", [0], [1, 2], 40, {"epochs": 1})
    else:
        result = study_overhead("full", [0, 1, 2], [1, 2, 3, 4, 5], 1000, {"epochs": 3})
    per_round = result["outside_epochs_per_round_s"]
    return {
        "what": f"{result['chains']} chains x {result['rounds']} rounds in "
        f"{result['study_wall_s']} s, {per_round} s per round outside its epochs",
        **result,
    }


STAGES = {
    "device": stage_device,
    "kernels": stage_kernels,
    "capture": stage_capture,
    "epoch": stage_epoch,
    "study": stage_study,
}


def child(stage: str, cpu: bool) -> None:
    """Run one stage here; its last stdout line is its JSON result."""
    try:
        result = {"status": "PASS", **STAGES[stage](cpu)}
    except Skip as e:
        result = {"status": "SKIP", "what": str(e)}
    print("\n" + json.dumps(result, default=str), flush=True)


def project(results: dict) -> dict:
    """The full study's wall time from one stacked epoch of 9 members and the rounds' overhead."""
    epoch, study = results.get("epoch", {}), results.get("study", {})
    if epoch.get("status") != "PASS" or study.get("status") != "PASS":
        return {"status": "SKIP", "what": "needs the epoch and study stages"}
    from seqgen.config import resolve, strategies

    epochs = max(sum(resolve(s, p, "full").epochs for p in range(1, 6)) for s in strategies())
    seconds = epoch["rows"][-1]["seconds_per_epoch"]
    total = epochs * seconds + 5 * study["outside_epochs_per_round_s"]
    return {
        "status": "PASS",
        "projected_s": round(total),
        "what": f"{epochs} stacked "
        f"epochs x {seconds} s + 5 rounds x {study['outside_epochs_per_round_s']} s = "
        f"{total / 60:.1f} min (at this mode's size)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check"))
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on a CPU")
    ap.add_argument("--budget", type=float, default=480, help="seconds for all stages")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # a stage's own process
    args = ap.parse_args()
    if args.stage:
        return child(args.stage, args.cpu)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.cpu:
        env |= {
            "TRITON_INTERPRET": "1",
            "SEQGEN_CUDA_GRAPHS": "emulate",
            "CUDA_VISIBLE_DEVICES": "",
        }
    deadline, results, failed = time.monotonic() + args.budget, {}, False
    for stage, limit in LIMITS.items():
        limit = min(limit * (4 if args.cpu else 1), deadline - time.monotonic())
        started = time.monotonic()
        if limit < 5:
            result = {"status": "SKIP", "what": "no time left in --budget"}
        else:
            result = run_child(stage, args.cpu, env, limit)
        result = {"stage": stage, "seconds": round(time.monotonic() - started, 1), **result}
        results[stage] = result
        failed |= report(result, args.out)
    failed |= report({"stage": "project", "seconds": 0.0, **project(results)}, args.out)
    sys.exit(1 if failed else 0)


def run_child(stage: str, cpu: bool, env: dict, limit: float) -> dict:
    command = [sys.executable, __file__, "--stage", stage] + (["--cpu"] if cpu else [])
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"status": "FAIL", "what": f"over its limit of {limit:.0f} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        return {"status": "FAIL", "what": lines[-1], "stderr": done.stderr[-4000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(result: dict, out: Path) -> bool:
    """Print a stage's line and append its JSON line; True if it failed."""
    print(
        f"{result['status']:<4} {result['stage']:<8} {result['seconds']:7.1f} s  {result['what']}",
        flush=True,
    )
    with open(out / "gpu_check.jsonl", "a") as f:
        f.write(json.dumps(result, default=str) + "\n")
    return result["status"] == "FAIL"


if __name__ == "__main__":
    main()
