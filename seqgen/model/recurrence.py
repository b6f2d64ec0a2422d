"""The LSTM cell's accelerations (seqgen/model/cells/lstm.py picks them where they apply): the
autoregressive stacked-LSTM recurrence as one autograd node with hand-written BPTT, for M
independent models ("members") of the same shape at once. The reference they are tested against
(tests/test_cells.py, values and gradients) is the plain autograd path of the LSTM cell.

Why by hand: with scheduled sampling every step's input depends on the previous step's output, so
the sequence cannot go through a fused multi-step LSTM kernel. Autograd over a Python loop records
~40 small ops per step and runs their backward one by one. Here the forward saves only the gate
activations, and the backward (a) keeps only the unavoidable per-step GEMMs (dh_{t-1} = dgates @ W)
and (b) forms every weight gradient once per sequence as one large GEMM over all T*B rows.

Why members: chains of a study that train the same model shape at the same phase can run as one
stacked model (every weight with a leading member dimension M), so each layer-step is one batched
GEMM for all of them instead of M small ones. Members never mix: member m's output and gradients
are those of the same recurrence run on member m's slices alone. The single model is M = 1.

Gate layout per layer: [i, f, o, g] (sigmoid on the first 3H columns at once, tanh on the last H).

`autoregressive_lstm` is what the LSTM cell calls. On CPU it runs the recurrence with its time
loop in C++ (seqgen/model/native/recurrence.cpp: per member and layer-step one GEMM and one fused
pass of gate math over the batch); on CUDA, where triton imports, in Triton kernels
(seqgen/model/fused.py: one kernel per layer-step for all members). Elsewhere (fp16 on CPU,
float64 on CUDA, neither available, SEQGEN_RECURRENCE=plain) the generator runs the plain path.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from seqgen.model import native

log = logging.getLogger(__name__)

# (state dtype, GEMM dtype) pairs the native recurrence implements
NATIVE_DTYPES = {
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float64, torch.float64),
}
# ... and those the Triton kernels run: what the trainer gives them on CUDA (float32, or fp16
# autocast). Not bf16: the trainer never chooses it on CUDA and Triton's interpreter cannot check
# it on a CPU; a bf16 caller gets the plain path until a GPU has tested it (issue #26).
TRITON_DTYPES = {
    (torch.float32, torch.float32),
    (torch.float32, torch.float16),
}


def uses_native(mm_dtype: torch.dtype | None, x0: torch.Tensor) -> bool:
    """True where autoregressive_lstm runs the C++ recurrence for these inputs."""
    pair = (x0.dtype, mm_dtype or x0.dtype)
    return x0.device.type == "cpu" and pair in NATIVE_DTYPES and native.ops() is not None


def uses_triton(mm_dtype: torch.dtype | None, x0: torch.Tensor) -> bool:
    """True where autoregressive_lstm runs the Triton kernels: CUDA, a dtype pair they implement,
    triton importable (said once in the log where it is not) and SEQGEN_TRITON not 0."""
    pair = (x0.dtype, mm_dtype or x0.dtype)
    return x0.device.type == "cuda" and pair in TRITON_DTYPES and _fused() is not None


def recurrence_name(mm_dtype: torch.dtype | None, x0: torch.Tensor) -> str:
    """Which path the LSTM runs for these inputs, in words."""
    backend = lstm_backend(mm_dtype, x0)
    if backend is None:
        return "plain (autograd)"
    return "native (C++)" if backend is NativeRecurrence else "triton"


@functools.cache
def _fused():
    """seqgen.model.fused, imported on first use (it needs triton, which a CPU install may lack);
    None, said once in the log, where it cannot be or SEQGEN_TRITON=0."""
    if os.environ.get("SEQGEN_TRITON", "1") == "0":
        log.warning("Triton recurrence off (SEQGEN_TRITON=0); running the plain autograd path")
        return None
    try:
        from seqgen.model import fused
    except ImportError as err:
        log.warning("Triton recurrence unavailable (%s); running the plain autograd path", err)
        return None
    return fused


def lstm_backend(mm_dtype: torch.dtype | None, x0: torch.Tensor):
    """The recurrence that runs these inputs (NativeRecurrence, the Triton one), or None where
    neither applies or SEQGEN_RECURRENCE=plain: then the generator runs its plain loop."""
    if os.environ.get("SEQGEN_RECURRENCE", "auto") == "plain":
        return None
    if uses_native(mm_dtype, x0):
        return NativeRecurrence
    if uses_triton(mm_dtype, x0):
        return _fused().TritonRecurrence
    return None


def autoregressive_lstm(
    mm_dtype, x0, w_x, b_x, y_teacher, use_truth, h0, c0, drop, w_y, w_out, b_out, *layer_w
) -> torch.Tensor:
    """yhat (M,T,B,K) of M stacked LSTMs whose layer-0 input at step t is yhat_{t-1} or the truth,
    in the C++ or Triton recurrence (lstm_backend must not be None for these inputs).

    Every argument has a leading member dimension M. x0 (M,T,B,F), w_x (M,F,4H), b_x (M,4H):
    layer 0's input from everything but the previous value, b_x + x0 @ w_x (step position, noise,
    parameters). y_teacher (M,T,B,K): the true previous value (the start value at t = 0);
    use_truth (M,T,B,1): 1.0 where the input is the true previous value, 0.0 for the model's;
    h0 and c0 (M,L,B,H); drop (M,L-1,T,B,H) or None: scaled dropout keep-masks on the inputs of
    layers 1..L-1; w_y (M,K,4H), w_out (M,H,K), b_out (M,K); layer_w: w_hh_0 (M,H,4H), then
    (w_ih_l (M,H,4H), w_hh_l (M,H,4H), b_l (M,4H)) for l >= 1. mm_dtype: dtype of the H-wide GEMM
    operands (bf16 / fp16 under mixed precision, else None); states, gate math and gradients
    stay in float32. Under torch.func.vmap the vmapped dimension joins the members.
    """
    args = (x0, w_x, b_x, y_teacher, use_truth, h0, c0, drop, w_y, w_out, b_out, *layer_w)
    backend = lstm_backend(mm_dtype, x0)
    if backend is None:
        raise ValueError(f"no LSTM recurrence runs {x0.dtype} x {mm_dtype} on {x0.device}")
    return run_recurrence(backend, mm_dtype, *args)


def run_recurrence(backend, mm_dtype, *args) -> torch.Tensor:
    """autoregressive_lstm in this backend (tests and benchmarks name one: native_lstm,
    fused.triton_lstm); without autograd (generation) it keeps two steps of state."""
    check_shapes(args)
    return Recurrence.apply(backend, mm_dtype, needs_grad(args), *args)[0]


NAMES = ("x0", "w_x", "b_x", "y_teacher", "use_truth", "h0", "c0", "drop", "w_y", "w_out", "b_out")


def check_shapes(args) -> None:
    """Raises ValueError naming the first argument of autoregressive_lstm (after mm_dtype) whose
    shape disagrees with the others: the C++ and Triton paths index memory by these shapes."""
    x0, h0, y_teacher = args[0], args[5], args[3]
    M, T, B, F = x0.shape
    L, H, K, G = h0.shape[1], h0.shape[3], y_teacher.shape[3], 4 * h0.shape[3]
    want = [(M, T, B, F), (M, F, G), (M, G), (M, T, B, K), (M, T, B, 1), (M, L, B, H)]
    want += [(M, L, B, H), (M, L - 1, T, B, H), (M, K, G), (M, H, K), (M, K), (M, H, G)]
    names = [*NAMES, "w_hh_0"]
    for layer in range(1, L):
        want += [(M, H, G), (M, H, G), (M, G)]
        names += [f"w_ih_{layer}", f"w_hh_{layer}", f"b_{layer}"]
    if len(args) != len(want):
        raise ValueError(f"autoregressive_lstm: {len(args)} tensors, {len(want)} for {L} layers")
    for name, arg, shape in zip(names, args, want, strict=True):
        if arg is not None and tuple(arg.shape) != shape:
            raise ValueError(
                f"autoregressive_lstm: {name} has shape {tuple(arg.shape)}, expected {shape} "
                f"(M={M}, T={T}, B={B}, F={F}, L={L}, H={H}, K={K})"
            )


def needs_grad(args) -> bool:
    """True where a backward will follow: autograd on and some input tensor requires grad."""
    return torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    )


class Recurrence(torch.autograd.Function):
    """A member-dimension recurrence (NativeRecurrence, TritonRecurrence) as one autograd node.
    Its forward returns the output and what its backward needs; under torch.func.vmap (a stack
    of generators) the vmapped dimension is folded into the members, so M chains still run as one
    batched recurrence."""

    @staticmethod
    def forward(backend, mm_dtype, save, *args):
        args = [a if a is None else a.contiguous() for a in args]
        return tuple(backend.forward(mm_dtype, args, save))

    @staticmethod
    def setup_context(ctx, inputs, output):
        backend, mm_dtype, _, *args = inputs
        ctx.backend, ctx.mm_dtype, ctx.n_args = backend, mm_dtype, len(args)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero gradients of the saved buffers (GBs at full)
        ctx.save_for_backward(*args, *output[1:])

    @staticmethod
    def backward(ctx, d_yhat, *_):
        if d_yhat is None:  # the output reached no loss (grads are not materialised)
            return (None,) * (3 + ctx.n_args)
        saved = ctx.saved_tensors
        args, out = saved[: ctx.n_args], saved[ctx.n_args :]
        args = [a if a is None else a.contiguous() for a in args]
        needs = ctx.needs_input_grad[3:]
        grads = ctx.backend.backward(ctx.mm_dtype, args, out, d_yhat.contiguous(), needs)
        return (None, None, None, *grads)

    @staticmethod
    def vmap(info, in_dims, backend, mm_dtype, save, *args):
        V = info.batch_size

        def members(a, dim):  # (M, ...) per vmapped entry -> (V * M, ...)
            if a is None:
                return None
            a = a.expand(V, *a.shape) if dim is None else a.movedim(dim, 0)
            return a.reshape(V * a.shape[1], *a.shape[2:])

        folded = [members(a, d) for a, d in zip(args, in_dims[3:], strict=True)]
        # inside vmap a tensor does not show that it requires grad: here, unwrapped, it does
        out = Recurrence.apply(backend, mm_dtype, needs_grad(folded), *folded)
        return tuple(o.view(V, -1, *o.shape[1:]) for o in out), (0,) * len(out)


class NativeRecurrence:
    """The recurrence with forward and backward in C++ (seqgen/model/native/recurrence.cpp)."""

    @staticmethod
    def forward(mm_dtype, args, save: bool) -> list[torch.Tensor]:
        """y_hat; with save also its activations, cell states, their tanh, top-layer h, fed-back
        inputs, and per layer the GEMM inputs [x, h_prev] and weights [w_ih; w_hh]."""
        x0, w_x, b_x, y_teacher, use_truth, h0, c0, drop, w_y, w_out, b_out, *layer_w = args
        return native.ops().forward(
            x0, w_x, b_x, y_teacher, use_truth, h0, c0, drop, w_y, w_out, b_out, list(layer_w),
            mm_dtype or x0.dtype, save,
        )[: None if save else 1]  # fmt: skip

    @staticmethod
    def backward(mm_dtype, args, saved, d_yhat, needs) -> tuple:
        x0, w_x, _, _, use_truth, h0, c0, drop, w_y, w_out, *_ = args
        L = h0.shape[1]
        act, C, TC, Htop, Y_in, *rest = saved
        A, W = rest[:L], rest[L:]
        grads = native.ops().backward(
            d_yhat, x0, use_truth, c0, drop, w_y, w_out, act, C, TC, Htop, Y_in, A, W
        )
        d_pre0, d_w_x, d_b_x, d_h0, d_c0, d_w_y, d_w_out, d_b_out, *d_layer = grads
        d_x0 = None
        if needs[0]:
            M, T, B, G = d_pre0.shape
            d_x0 = torch.bmm(d_pre0.view(M, T * B, G), w_x.transpose(1, 2)).view(x0.shape)
        return (d_x0, d_w_x, d_b_x, None, None, d_h0, d_c0, None, d_w_y, d_w_out, d_b_out,
                *d_layer)  # fmt: skip


def native_lstm(mm_dtype, *args) -> torch.Tensor:
    """autoregressive_lstm in C++."""
    return run_recurrence(NativeRecurrence, mm_dtype, *args)


def _unpack(layer_w) -> tuple[list, list, list]:
    """(w_hh_0, w_ih_1, w_hh_1, b_1, ...) -> per-layer w_ih, w_hh, bias (None for layer 0)."""
    w_ih, w_hh, bias = [None], [layer_w[0]], [None]
    for i in range(1, len(layer_w), 3):
        w_ih.append(layer_w[i])
        w_hh.append(layer_w[i + 1])
        bias.append(layer_w[i + 2])
    return w_ih, w_hh, bias


def gemm_plan(
    T: int,
    B: int,
    H: int,
    L: int,
    K: int,
    F: int,
    mm_dtype: torch.dtype,
    train: bool,
    device: str | torch.device = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every GEMM (out, a, b) the native recurrence runs in one call, in its order, on scratch
    buffers of the same shapes, dtypes and layouts: per step and layer [x, h_prev] (B, I+H)
    @ W (I+H, 4H); with train, then per step and layer dgates (B, 4H) @ W^T, and the weight
    gradients over all T*B rows. Timed alone, they give `seqgen bench` its GEMM-only limit."""
    G, acc, rows = 4 * H, torch.float32, T * B
    width = [H] + [2 * H] * (L - 1)  # layer 0 takes h only; layers >= 1 take [x, h]

    def r(*shape, dtype=mm_dtype):  # random, not zeros: no shortcut for special values
        return torch.randn(*shape, dtype=dtype, device=device)

    A, W = [r(T, B, w) for w in width], [r(w, G) for w in width]
    gates = r(B, G)
    plan = [(gates, A[layer][t], W[layer]) for t in range(T) for layer in range(L)]
    if not train:
        return plan
    dG, WT, dA = (
        [r(T, B, G) for _ in width],
        [w.t().contiguous() for w in W],
        [r(B, w) for w in width],
    )
    plan += [(dA[lr], dG[lr][t], WT[lr]) for t in reversed(range(T)) for lr in reversed(range(L))]
    dG0 = dG[0] if mm_dtype == acc else r(T, B, G, dtype=acc)  # layer 0's gate gradients
    plan += [
        (r(F + K, G, dtype=acc), r(rows, F + K, dtype=acc).t(), dG0.view(rows, G)),  # w_x, w_y
        (r(H, K, dtype=acc), r(rows, H, dtype=acc).t(), r(rows, K, dtype=acc)),  # w_out
    ]
    plan += [(r(w, G), A[i].view(rows, w).t(), dG[i].view(rows, G)) for i, w in enumerate(width)]
    return plan


def run_gemms(plan: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """out = a @ b for each GEMM of a plan; in one C++ call where the native part is built."""
    ops = native.ops() if plan[0][0].device.type == "cpu" else None
    if ops is not None:
        ops.run_gemms(*[list(column) for column in zip(*plan, strict=True)])
        return
    for out, a, b in plan:
        torch.mm(a, b, out=out)
