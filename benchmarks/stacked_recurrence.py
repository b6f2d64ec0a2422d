"""Stacked members against separate models: one recurrence call for M models of the `full` shape
against M calls of one model each, training forward + backward (issue #14).

    python benchmarks/stacked_recurrence.py [--members 1,3,9] [--threads 1,2] [--repeats 5]
                                            [--json PATH]

First checks, each an assertion (float32, 1e-5): the native recurrence with 3 stacked members
equals the plain path, output and every gradient; on CUDA the Triton kernels do too. Then times
one forward + backward of the recurrence alone at the `full` shape (H=256, L=2, B=32, T=151,
K=5, F=8, dropout 0.3, teacher forcing 0.7): on CPU the native recurrence for M stacked members
in one call against the same M members as M separate calls, at each thread count; on CUDA (when
present) the Triton kernels against the Python path for M = 1, 3, 9, 15 (--gpu-members), eager
and captured in a CUDA graph, in float32 and with float16 GEMMs. Figures are sequences/s (M x B
per call), medians of --repeats turns run in rotation so a slow spell of a shared machine falls
on all alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from seqgen.bench import _median_seconds, cpu_name  # noqa: E402
from seqgen.model.cells.lstm import plain_recurrence  # noqa: E402
from seqgen.model.recurrence import native_lstm, uses_native  # noqa: E402

FULL = {"T": 151, "B": 32, "H": 256, "L": 2, "K": 5, "F": 8}
DROPOUT, RATIO = 0.3, 0.7


def stacked_inputs(M, T, B, H, L, K, F, dtype=torch.float32, device="cpu", seed=0):
    """Arguments of autoregressive_lstm after mm_dtype for M members, weights at the model's
    init scale, teacher forcing and dropout masks as in training; weights and states with
    gradients."""
    g = torch.Generator().manual_seed(seed)
    bound = H**-0.5

    def w(*shape):  # nn.LSTM's uniform(+-1/sqrt(H))
        return (torch.rand(M, *shape, generator=g, dtype=dtype) * 2 - 1) * bound

    layer_w = [w(H, 4 * H)]
    for _ in range(1, L):
        layer_w += [w(H, 4 * H), w(H, 4 * H), w(4 * H)]
    use_truth = (torch.rand(M, T, B, 1, generator=g) < RATIO).to(dtype)
    keep = 1 - DROPOUT
    drop = (torch.rand(M, L - 1, T, B, H, generator=g) < keep).to(dtype) / keep
    rand = lambda *s: torch.randn(M, *s, generator=g, dtype=dtype)  # noqa: E731
    args = [rand(T, B, F), w(F, 4 * H), w(4 * H), rand(T, B, K), use_truth]
    args += [torch.tanh(rand(L, B, H)), torch.tanh(rand(L, B, H)), drop, w(K, 4 * H)]
    args += [w(H, K), w(K), *layer_w]
    args = [a.to(device) for a in args]
    for i, a in enumerate(args):
        if i not in (3, 4, 7):  # not y_teacher, use_truth, drop
            a.requires_grad_(True)
    return args


def member_args(args, m):
    """Member m's slices as a stack of one, as separate leaves with their own gradients."""
    out = []
    for i, a in enumerate(args):
        part = a.detach()[m : m + 1].clone()
        out.append(part.requires_grad_(True) if i not in (3, 4, 7) else part)
    return out


def train_call(fn, mm_dtype, args):
    """One forward + backward of the recurrence as a function of no arguments."""
    params = [a for a in args if a.requires_grad]
    w = torch.randn(args[3].shape, device=args[0].device, dtype=args[0].dtype)

    def call():
        return torch.autograd.grad((fn(mm_dtype, *args) * w).sum(), params)

    return call


def check(fn, args, name: str, mm_dtype=None) -> None:
    """fn equals the plain path on args: output and every gradient, 1e-5."""
    w = torch.randn(args[3].shape, device=args[0].device, dtype=args[0].dtype)
    params = [a for a in args if a.requires_grad]
    results = []
    for f in (fn, plain_recurrence):
        out = f(mm_dtype, *args)
        results.append([out.detach(), *torch.autograd.grad((out * w).sum(), params)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    print(f"check: {name} = plain path with 3 stacked members (float32, output and gradients)")


def cpu_rows(members: list[int], threads: list[int], repeats: int) -> list[dict]:
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for M in members:
            args = stacked_inputs(M, **FULL)
            fns = {"stacked": train_call(native_lstm, None, args)}
            if M > 1:
                calls = [train_call(native_lstm, None, member_args(args, m)) for m in range(M)]
                fns["separate"] = lambda calls=calls: [c() for c in calls]
            seconds = _median_seconds(fns, repeats, torch.device("cpu"))
            seconds.setdefault("separate", seconds["stacked"])  # M = 1: the same call
            row = {"device": "cpu", "threads": n_threads, "members": M}
            for way, s in seconds.items():
                row[f"{way}_sequences_per_s"] = round(M * FULL["B"] / s, 1)
            row["speedup"] = round(seconds["separate"] / seconds["stacked"], 2)
            rows.append(row)
            print(
                f"| {n_threads} | {M} | {row['stacked_sequences_per_s']} "
                f"| {row['separate_sequences_per_s']} | {row['speedup']:.2f}x |",
                flush=True,
            )
    return rows


def graphed(call):
    """call captured in a CUDA graph (after warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def gpu_rows(members: list[int], repeats: int) -> list[dict]:
    from seqgen.model.fused import triton_lstm

    dev, rows = torch.device("cuda"), []
    for mm_dtype in (None, torch.float16):
        for M in members:
            args = stacked_inputs(M, **FULL, device=dev)
            fns = {}
            for name, fn in (("triton", triton_lstm), ("python", plain_recurrence)):
                fns[f"{name}_eager"] = train_call(fn, mm_dtype, args)
                fns[f"{name}_graph"] = graphed(train_call(fn, mm_dtype, args))
            seconds = _median_seconds(fns, repeats, dev)
            row = {"device": torch.cuda.get_device_name(dev), "members": M}
            row["gemm_dtype"] = "float16" if mm_dtype else "float32"
            for way, s in seconds.items():
                row[f"{way}_sequences_per_s"] = round(M * FULL["B"] / s, 1)
            rows.append(row)
            print(
                f"| {row['gemm_dtype']} | {M} | {row['triton_eager_sequences_per_s']} "
                f"| {row['triton_graph_sequences_per_s']} | {row['python_eager_sequences_per_s']} "
                f"| {row['python_graph_sequences_per_s']} "
                f"| {seconds['python_graph'] / seconds['triton_graph']:.2f}x |",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="1,3,9", help="CPU: members per stacked call")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--gpu-members", default="1,3,9,15")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args()
    small = {"T": 12, "B": 5, "H": 16, "L": 2, "K": 3, "F": 4}
    if not uses_native(None, torch.zeros(1)):
        sys.exit("error: the native recurrence is not available (see the line above)")
    check(native_lstm, stacked_inputs(3, **small), "native C++")
    cuda = torch.cuda.is_available()
    if cuda:
        from seqgen.model.fused import triton_lstm

        check(triton_lstm, stacked_inputs(3, **small, device="cuda"), "Triton (CUDA)")

    print(f"\nCPU: {cpu_name()}, torch {torch.__version__}; `full` shape {FULL}, training call")
    print("| threads | members | stacked seq/s | separate calls seq/s | stacked / separate |")
    print("|---|---|---|---|---|")
    members = [int(n) for n in args.members.split(",")]
    rows = cpu_rows(members, [int(n) for n in args.threads.split(",")], args.repeats)
    if cuda:
        print(f"\n{torch.cuda.get_device_name()}: Triton against the Python path, seq/s")
        print("| GEMMs | members | Triton eager | Triton graph | Python eager | Python graph "
              "| graph: Triton / Python |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        rows += gpu_rows([int(n) for n in args.gpu_members.split(",")], args.repeats)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
