"""The training step on a CUDA GPU: checks, then one `full` epoch eager against CUDA graphs.

    python benchmarks/cuda_step.py [--json PATH]

Needs a CUDA GPU; imports only torch and seqgen's model, loss and step (no MLflow), so it runs
on a machine that has PyTorch alone (there, without installing seqgen, `ln -s ../experiments
seqgen/experiments` lets it find the phase table). docs/cuda_step_h200.txt is its output on an
NVIDIA H200. Checks, each an assertion:

1. the recurrence on CUDA (the Triton kernels where triton imports) equals the Python one on the
   CPU (float32, 1e-5), and the Python one passes a float64 gradcheck on CUDA;
2. a step through CUDA graphs (`seqgen.training.step.StepGraphs`, what the trainer uses on
   CUDA) equals an eager step on the same batch, with nothing random in it (dropout 0, noise 0,
   teacher forcing 1): the same loss and gradients, in float32 and under fp16 autocast with a
   GradScaler;
3. fp16 + GradScaler through the graph: a scale so large that the gradients overflow skips the
   step (weights unchanged) and backs off, until steps go through and the weights move.

Then times one `full` epoch as the trainer runs it (4,400 sequences in batches of 32, the last of
16; teacher forcing 0.7, dropout 0.3, noise 0.05, AdamW, clipping): eager float32, eager fp16 +
GradScaler, graphed float32, graphed fp16 + GradScaler. Each figure is the second of two epochs;
a graphed epoch includes capturing its two graphs (batch 32 and 16).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from seqgen.config import resolve  # noqa: E402
from seqgen.model.cells.lstm import plain_recurrence  # noqa: E402
from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator  # noqa: E402
from seqgen.model.recurrence import autoregressive_lstm, recurrence_name  # noqa: E402
from seqgen.training.losses import Objective  # noqa: E402
from seqgen.training.step import Precision, StepGraphs, choose_precision, optimizer_step  # noqa: E402

T, K, P, N_TRAIN, RATIO = 151, 5, 2, 4400, 0.7


def lstm_inputs(T=7, B=3, K=2, F=3, H=4, L=2, dtype=torch.float64, device="cpu", seed=0, M=2):
    """Arguments of the recurrence after mm_dtype for M stacked members, small, with gradients
    (as tests/test_native)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(M, *s, generator=g, dtype=dtype)  # noqa: E731
    layer_w = [r(H, 4 * H) * 0.5]
    for _ in range(1, L):
        layer_w += [r(H, 4 * H) * 0.5, r(H, 4 * H) * 0.5, r(4 * H) * 0.1]
    use_truth = (torch.rand(M, T, B, 1, generator=g) < 0.5).to(dtype)
    drop = (torch.rand(M, L - 1, T, B, H, generator=g) < 0.7).to(dtype) / 0.7
    args = [r(T, B, F), r(F, 4 * H) * 0.5, r(4 * H) * 0.1, r(T, B, K), use_truth]
    args += [r(L, B, H) * 0.5, r(L, B, H) * 0.5, drop, r(K, 4 * H) * 0.5, r(H, K) * 0.5, r(K) * 0.1]
    args = [a.to(device) for a in args + layer_w]
    for i, a in enumerate(args):
        if i not in (3, 4, 7):  # not y_teacher, use_truth, drop
            a.requires_grad_(True)
    return args


def check_recurrence(dev: torch.device) -> None:
    cpu_args = lstm_inputs(T=30, B=5, K=3, F=4, H=16, L=2, dtype=torch.float32)
    gpu_args = lstm_inputs(T=30, B=5, K=3, F=4, H=16, L=2, dtype=torch.float32, device=dev)
    out_cpu, out_gpu = plain_recurrence(None, *cpu_args), autoregressive_lstm(None, *gpu_args)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-5, rtol=1e-5)
    w = torch.randn(out_cpu.shape)
    grads_cpu = torch.autograd.grad((out_cpu * w).sum(), [a for a in cpu_args if a.requires_grad])
    grads_gpu = torch.autograd.grad(
        (out_gpu * w.to(dev)).sum(), [a for a in gpu_args if a.requires_grad]
    )
    for a, b in zip(grads_gpu, grads_cpu, strict=True):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda *a: plain_recurrence(None, *a), lstm_inputs(device=dev))
    way = recurrence_name(None, gpu_args[0])
    print(f"1. recurrence on CUDA ({way}) = CPU (float32, 1e-5); float64 gradcheck on CUDA passed")


def setup(dev, settings, mixed: bool, dropout: float | None = None, seed: int = 0):
    cfg = ModelConfig(
        K,
        P,
        settings.hidden_size,
        settings.num_layers,
        settings.dropout if dropout is None else dropout,
    )
    torch.manual_seed(seed)
    model = StreamlinedSequenceGenerator(cfg).to(dev).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.start_lr, weight_decay=settings.weight_decay
    )
    return model, optimizer, choose_precision(dev, mixed)


def check_graph_equals_eager(dev, settings) -> None:
    loss_fn = Objective([settings.weights], [settings.max_lag])
    g = torch.Generator(device="cpu").manual_seed(1)
    batch = [(torch.randn(32, P, generator=g).to(dev), torch.randn(32, T, K, generator=g).to(dev))]
    for mixed in (False, True):
        grads, losses = [], []
        for graphed in (True, False):  # graphed first: nothing warmed for it beforehand
            model, optimizer, precision = setup(dev, settings, mixed, dropout=0.0)
            graphs = StepGraphs(model, loss_fn, precision, 0.0) if graphed else None
            if graphs:
                graphs.new_epoch(1.0)
            r = optimizer_step(model, loss_fn, batch, optimizer, precision, 1.0, 0.0, 1e9, graphs)
            losses.append(r.loss)
            grads.append([p.grad.detach().clone() for p in model.parameters()])
        tol = 1e-6 if not mixed else 1e-3
        assert abs(losses[0] - losses[1]) <= tol * abs(losses[1]), (mixed, losses)
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    print("2. a graphed step equals an eager one (loss and gradients, float32 and fp16)")


def check_scaler_through_graph(dev, settings) -> None:
    loss_fn = Objective([settings.weights], [settings.max_lag])
    model, optimizer, precision = setup(dev, settings, mixed=True)
    precision = Precision(dev, torch.float16, torch.amp.GradScaler("cuda", init_scale=2.0**60), "")
    graphs = StepGraphs(model, loss_fn, precision, settings.noise_level)
    graphs.new_epoch(RATIO)
    batch = [(torch.randn(32, P, device=dev), torch.randn(32, T, K, device=dev))]
    before = [p.detach().clone() for p in model.parameters()]
    scales, skipped = [], 0
    for _ in range(80):
        scale = precision.scaler.get_scale()
        r = optimizer_step(model, loss_fn, batch, optimizer, precision, RATIO, 0.0, 1.0, graphs)
        scales.append(scale)
        if precision.scaler.get_scale() < scale:  # an overflow: the step was skipped
            skipped += 1
            if skipped == 1:
                assert all(
                    torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
                )
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert skipped >= 1 and moved and precision.scaler.get_scale() < 2.0**60 and r.finite
    print(
        f"3. fp16 GradScaler through the graph: {skipped} overflowing steps skipped "
        f"(scale 2^60 -> 2^{torch.tensor(precision.scaler.get_scale()).log2().item():.0f}), "
        "then the weights moved"
    )


def time_epoch(dev, settings, mixed: bool, graphed: bool) -> float:
    """Seconds of the second of two epochs of the trainer's loop over 4,400 sequences."""
    loss_fn = Objective([settings.weights], [settings.max_lag])
    model, optimizer, precision = setup(dev, settings, mixed)
    graphs = StepGraphs(model, loss_fn, precision, settings.noise_level) if graphed else None
    params, targets = torch.randn(N_TRAIN, P, device=dev), torch.randn(N_TRAIN, T, K, device=dev)
    seconds = []
    for _ in range(2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        if graphs:
            graphs.new_epoch(RATIO)
        order = torch.randperm(N_TRAIN, device=dev)
        for chunk in order.split(settings.batch_size):
            batch = [(params[chunk], targets[chunk])]
            optimizer_step(
                model,
                loss_fn,
                batch,
                optimizer,
                precision,
                RATIO,
                settings.noise_level,
                settings.clip_grad_norm,
                graphs,
            )
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here: this benchmark needs one")
    dev = torch.device("cuda")
    settings = resolve("mae", 1, "full")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    check_recurrence(dev)
    check_graph_equals_eager(dev, settings)
    check_scaler_through_graph(dev, settings)
    rows = {}
    # graphed first: an eager epoch before would compile the last batch's kernels (batch 16)
    # and hide a capture that compiles them, which the trainer's order would hit (issue #26)
    for mixed, graphed in ((False, True), (True, True), (False, False), (True, False)):
        name = f"{'graphed' if graphed else 'eager'} {'fp16+GradScaler' if mixed else 'float32'}"
        rows[name] = time_epoch(dev, settings, mixed, graphed)
        print(f"   {name:<26} {rows[name]:7.2f} s/epoch  {N_TRAIN / rows[name]:8.0f} seq/s")
    print(f"4. one `full` epoch ({N_TRAIN} sequences, hidden {settings.hidden_size}):")
    print(f"   {'way':<26} {'s/epoch':>7}  {'seq/s':>8}  {'vs eager fp16':>13}")
    base = rows["eager fp16+GradScaler"]
    for name, s in rows.items():
        print(f"   {name:<26} {s:7.2f}  {N_TRAIN / s:8.0f}  {base / s:12.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(dev), **rows}))


if __name__ == "__main__":
    main()
