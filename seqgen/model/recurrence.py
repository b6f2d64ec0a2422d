"""The autoregressive stacked-LSTM recurrence as one autograd Function with hand-written BPTT,
for M independent models ("members") of the same shape at once.

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

`autoregressive_lstm` is what the models call. On CPU it runs the same recurrence with its time
loop in C++ (seqgen/model/native/recurrence.cpp: per member and layer-step one GEMM and one fused
pass of gate math over the batch); on CUDA, where triton imports, in Triton kernels
(seqgen/model/fused.py: one kernel per layer-step for all members); elsewhere (fp16 on CPU,
float64 on CUDA, neither available) the Python loop of AutoregressiveLSTM below.
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
# it on a CPU; a bf16 caller gets the Python loop until a GPU has tested it (issue #26).
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
    """Which implementation autoregressive_lstm runs for these inputs, in words."""
    if uses_native(mm_dtype, x0):
        return "native (C++)"
    return "triton" if uses_triton(mm_dtype, x0) else "python"


@functools.cache
def _fused():
    """seqgen.model.fused, imported on first use (it needs triton, which a CPU install may lack);
    None, said once in the log, where it cannot be or SEQGEN_TRITON=0."""
    if os.environ.get("SEQGEN_TRITON", "1") == "0":
        log.warning("Triton recurrence off (SEQGEN_TRITON=0); running the Python recurrence")
        return None
    try:
        from seqgen.model import fused
    except ImportError as err:
        log.warning("Triton recurrence unavailable (%s); running the Python recurrence", err)
        return None
    return fused


def autoregressive_lstm(
    mm_dtype, x0, w_x, b_x, y_teacher, use_truth, h0, c0, drop, w_y, w_out, b_out, *layer_w
) -> torch.Tensor:
    """yhat (M,T,B,K) of M stacked LSTMs: native_lstm, triton_lstm or python_lstm.

    Every argument has a leading member dimension M. x0 (M,T,B,F), w_x (M,F,4H), b_x (M,4H):
    layer 0's input from everything but the previous value, b_x + x0 @ w_x (step position, noise,
    parameters). y_teacher (M,T,B,K), use_truth (M,T,B,1), h0 and c0 (M,L,B,H), drop
    (M,L-1,T,B,H) or None, w_y (M,K,4H), w_out (M,H,K), b_out (M,K), layer_w: w_hh_0 (M,H,4H),
    then (w_ih_l (M,H,4H), w_hh_l (M,H,4H), b_l (M,4H)) for l >= 1; as AutoregressiveLSTM.forward.
    """
    args = (x0, w_x, b_x, y_teacher, use_truth, h0, c0, drop, w_y, w_out, b_out, *layer_w)
    if uses_native(mm_dtype, x0):
        return native_lstm(mm_dtype, *args)
    if uses_triton(mm_dtype, x0):
        return _fused().triton_lstm(mm_dtype, *args)
    return python_lstm(mm_dtype, *args)


def python_lstm(mm_dtype, x0, w_x, b_x, *args) -> torch.Tensor:
    """autoregressive_lstm by AutoregressiveLSTM: layer 0's input as one GEMM, then the loop."""
    M, T, B, F = x0.shape
    pre0 = torch.baddbmm(b_x.unsqueeze(1), x0.reshape(M, T * B, F), w_x).view(M, T, B, -1)
    return AutoregressiveLSTM.apply(mm_dtype, pre0, *args)


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


def native_lstm(mm_dtype, *args) -> torch.Tensor:
    """autoregressive_lstm in C++; without autograd (generation) it keeps two steps of state."""
    check_shapes(args)
    if needs_grad(args):
        return NativeAutoregressiveLSTM.apply(mm_dtype, *args)
    return _native_forward(mm_dtype, *args, save=False)[0]


def _native_forward(mm_dtype, x0, w_x, b_x, y_teacher, use_truth, h0, c0, drop, w_y, w_out,
                    b_out, *layer_w, save: bool) -> list[torch.Tensor]:  # fmt: skip
    return native.ops().forward(
        x0, w_x, b_x, y_teacher, use_truth, h0, c0, drop, w_y, w_out, b_out, list(layer_w),
        mm_dtype or x0.dtype, save,
    )  # fmt: skip


class NativeAutoregressiveLSTM(torch.autograd.Function):
    """The recurrence with forward and backward in C++; arguments as autoregressive_lstm."""

    @staticmethod
    def forward(ctx, mm_dtype, x0, w_x, b_x, y_teacher, use_truth, h0, c0, drop, w_y, w_out,
                b_out, *layer_w):  # fmt: skip
        out = _native_forward(
            mm_dtype, x0, w_x, b_x, y_teacher, use_truth, h0, c0, drop, w_y, w_out, b_out,
            *layer_w, save=True,
        )  # fmt: skip
        # out: y_hat; activations, cell states, their tanh, top-layer h, fed-back inputs; per
        # layer the GEMM inputs [x, h_prev] and weights [w_ih; w_hh] in the GEMM dtype
        ctx.layers = h0.shape[1]
        ctx.save_for_backward(x0, w_x, use_truth, c0, drop, w_y, w_out, *out[1:])
        return out[0]

    @staticmethod
    def backward(ctx, d_yhat):
        x0, w_x, use_truth, c0, drop, w_y, w_out, act, C, TC, Htop, Y_in, *rest = ctx.saved_tensors
        A, W = rest[: ctx.layers], rest[ctx.layers :]
        grads = native.ops().backward(
            d_yhat, x0, use_truth, c0, drop, w_y, w_out, act, C, TC, Htop, Y_in, A, W
        )
        d_pre0, d_w_x, d_b_x, d_h0, d_c0, d_w_y, d_w_out, d_b_out, *d_layer = grads
        d_x0 = None
        if ctx.needs_input_grad[1]:
            M, T, B, G = d_pre0.shape
            d_x0 = torch.bmm(d_pre0.view(M, T * B, G), w_x.transpose(1, 2)).view(x0.shape)
        return (None, d_x0, d_w_x, d_b_x, None, None, d_h0, d_c0, None, d_w_y, d_w_out, d_b_out,
                *d_layer)  # fmt: skip


def _cell(
    gates: torch.Tensor,
    c_prev: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    c: torch.Tensor,
    tc: torch.Tensor,
    h: torch.Tensor,
) -> None:
    """LSTM cell update written into the saved buffers s (M,B,3H), g, c, tc, h (M,B,H)."""
    hidden = c_prev.shape[-1]
    torch.sigmoid(gates[..., : 3 * hidden], out=s)
    torch.tanh(gates[..., 3 * hidden :], out=g)
    torch.mul(s[..., hidden : 2 * hidden], c_prev, out=c)  # f * c_prev
    c.addcmul_(s[..., :hidden], g)  # + i * g
    torch.tanh(c, out=tc)
    torch.mul(s[..., 2 * hidden :], tc, out=h)  # o * tanh(c)


def _unpack(layer_w) -> tuple[list, list, list]:
    """(w_hh_0, w_ih_1, w_hh_1, b_1, ...) -> per-layer w_ih, w_hh, bias (None for layer 0)."""
    w_ih, w_hh, bias = [None], [layer_w[0]], [None]
    for i in range(1, len(layer_w), 3):
        w_ih.append(layer_w[i])
        w_hh.append(layer_w[i + 1])
        bias.append(layer_w[i + 2])
    return w_ih, w_hh, bias


class AutoregressiveLSTM(torch.autograd.Function):
    """yhat (M,T,B,K) of M stacked LSTMs whose layer-0 input at step t is yhat_{t-1} or the truth.

    Every tensor has a leading member dimension M; each GEMM is one batched GEMM over members.
    """

    @staticmethod
    def forward(
        ctx, mm_dtype, pre0, y_teacher, use_truth, h0, c0, drop, w_y, w_out, b_out, *layer_w
    ):
        """
        mm_dtype: dtype of the H-wide GEMM operands (torch.bfloat16 / float16 under mixed
            precision, else None); states, gate math and gradients accumulate in float32.
        pre0 (M,T,B,4H): layer-0 gate input from everything but the previous value (bias, step
            position, parameters, input noise), computed outside so autograd handles it.
        y_teacher (M,T,B,K): the true previous value for each step (the start value at t = 0).
        use_truth (M,T,B,1): 1.0 where the input is the true previous value, 0.0 for the model's.
        h0, c0 (M,L,B,H): initial states. drop (M,L-1,T,B,H) or None: scaled dropout keep-masks on
        the inputs of layers 1..L-1. w_y (M,K,4H), w_out (M,H,K), b_out (M,K).
        layer_w: w_hh_0 (M,H,4H), then (w_ih_l (M,H,4H), w_hh_l (M,H,4H), b_l (M,4H)) for l >= 1.
        """
        M, T, B, _ = pre0.shape
        _, L, _, H = h0.shape
        K = y_teacher.shape[3]
        low = mm_dtype or pre0.dtype
        w_ih, w_hh, bias = _unpack(layer_w)
        w_ih_mm = [None] + [w.to(low) for w in w_ih[1:]]
        w_hh_mm = [w.to(low) for w in w_hh]
        new = pre0.new_empty
        # saved per member, layer and step: [:, layer, t] is one (M, B, .) batch of matrices
        S = new(M, L, T, B, 3 * H)
        G, C, TC, Hs = (new(M, L, T, B, H) for _ in range(4))
        # GEMM copies of the hidden states (h_{-1} = h0 first) and of the inputs of layers >= 1
        H_mm = Hs if low == pre0.dtype else new(M, L, T, B, H, dtype=low)
        h0_mm = h0.to(low)
        X = new(M, L, T, B, H, dtype=low) if L > 1 else None
        Y_in, Y_hat = new(M, T, B, K), new(M, T, B, K)
        gates = new(M, B, 4 * H)
        for t in range(T):
            if t == 0:
                Y_in[:, 0] = y_teacher[:, 0]
            else:  # yhat + m * (truth - yhat): the truth where m = 1, the model's own where m = 0
                torch.lerp(Y_hat[:, t - 1], y_teacher[:, t], use_truth[:, t], out=Y_in[:, t])
            for layer in range(L):
                h_prev = h0_mm[:, layer] if t == 0 else H_mm[:, layer, t - 1]
                c_prev = c0[:, layer] if t == 0 else C[:, layer, t - 1]
                if layer == 0:
                    torch.baddbmm(pre0[:, t], Y_in[:, t], w_y, out=gates)  # K is tiny: float32
                else:
                    x = X[:, layer, t]
                    if drop is not None:
                        torch.mul(Hs[:, layer - 1, t], drop[:, layer - 1, t], out=x)
                    else:
                        x.copy_(Hs[:, layer - 1, t])
                    torch.add(bias[layer].unsqueeze(1), torch.bmm(x, w_ih_mm[layer]), out=gates)
                gates.add_(torch.bmm(h_prev, w_hh_mm[layer]))
                _cell(
                    gates,
                    c_prev,
                    S[:, layer, t],
                    G[:, layer, t],
                    C[:, layer, t],
                    TC[:, layer, t],
                    Hs[:, layer, t],
                )
                if H_mm is not Hs:
                    H_mm[:, layer, t].copy_(Hs[:, layer, t])
            torch.baddbmm(b_out.unsqueeze(1), Hs[:, L - 1, t], w_out, out=Y_hat[:, t])
        ctx.mm_dtype = low
        ctx.save_for_backward(
            use_truth, h0_mm, c0, drop, w_y, w_out, S, G, C, TC, Hs, H_mm, X, Y_in, *layer_w
        )
        return Y_hat

    @staticmethod
    def backward(ctx, d_yhat):
        (use_truth, h0_mm, c0, drop, w_y, w_out, S, G, C, TC, Hs, H_mm, X, Y_in, *layer_w) = (
            ctx.saved_tensors
        )
        M, L, T, B, H = G.shape
        low = ctx.mm_dtype
        w_ih, w_hh, _ = _unpack(layer_w)
        # contiguous transposes: GEMMs on transposed low-precision views take a slow path
        w_hh_t = [w.transpose(1, 2).to(low).contiguous() for w in w_hh]
        w_ih_t = [None] + [w.transpose(1, 2).to(low).contiguous() for w in w_ih[1:]]
        dG = d_yhat.new_empty(M, L, T, B, 4 * H)
        dG_mm = dG if low == dG.dtype else d_yhat.new_empty(M, L, T, B, 4 * H, dtype=low)
        d_out = d_yhat.new_empty(d_yhat.shape)  # total gradient at each yhat_t
        dh_rec = [d_yhat.new_zeros(M, B, H) for _ in range(L)]
        dc_rec = [d_yhat.new_zeros(M, B, H) for _ in range(L)]
        dy_feedback = d_yhat.new_zeros(M, B, d_yhat.shape[3])
        w_out_t, w_y_t = w_out.transpose(1, 2), w_y.transpose(1, 2)
        for t in range(T - 1, -1, -1):
            torch.add(d_yhat[:, t], dy_feedback, out=d_out[:, t])
            dh = torch.baddbmm(dh_rec[L - 1], d_out[:, t], w_out_t)
            for layer in range(L - 1, -1, -1):
                if layer < L - 1:  # gradient from the layer above, through its input dropout
                    dx = torch.bmm(dG_mm[:, layer + 1, t], w_ih_t[layer + 1])
                    dh = (
                        dh_rec[layer].addcmul_(dx, drop[:, layer, t])
                        if drop is not None
                        else dh_rec[layer].add_(dx)
                    )
                dc_rec[layer], dh_rec[layer] = _cell_backward(
                    dh, dc_rec[layer], S, G, C, TC, c0, dG, dG_mm, w_hh_t, layer, t
                )
            if t > 0:  # the input at t was yhat_{t-1} where use_truth is 0
                dy_feedback = torch.bmm(dG[:, 0, t], w_y_t).mul_(1 - use_truth[:, t])
        return _weight_gradients(d_out, dG, dG_mm, h0_mm, H_mm, Hs, X, Y_in, dh_rec, dc_rec)


def _cell_backward(dh, dc, S, G, C, TC, c0, dG, dG_mm, w_hh_t, layer, t):
    """One layer-step back: the gate gradients into dG[:, layer, t] (and dG_mm), from the
    incoming dL/dh and dL/dc (M,B,H); returns dL/dc and dL/dh (M,B,H) of the step before."""
    H = dh.shape[-1]
    s, g, tc = S[:, layer, t], G[:, layer, t], TC[:, layer, t]
    i, f, o = s[..., :H], s[..., H : 2 * H], s[..., 2 * H :]
    c_prev = c0[:, layer] if t == 0 else C[:, layer, t - 1]
    dc = dc.addcmul_(dh, o * (1 - tc * tc))
    dgl = dG[:, layer, t]
    torch.mul(dc, g, out=dgl[..., :H])  # d i
    torch.mul(dc, c_prev, out=dgl[..., H : 2 * H])  # d f
    torch.mul(dh, tc, out=dgl[..., 2 * H : 3 * H])  # d o
    torch.mul(dc, i, out=dgl[..., 3 * H :])  # d g
    dgl[..., : 3 * H].mul_(s - s * s)  # through the sigmoids
    dgl[..., 3 * H :].mul_(1 - g * g)  # through the tanh
    if dG_mm is not dG:
        dG_mm[:, layer, t].copy_(dgl)
    dh_prev = torch.bmm(dG_mm[:, layer, t], w_hh_t[layer]).to(dh.dtype)
    return dc.mul_(f), dh_prev


def _weight_gradients(d_out, dG, dG_mm, h0_mm, H_mm, Hs, X, Y_in, dh_rec, dc_rec):
    """AutoregressiveLSTM.backward's return: every weight gradient as one batched GEMM over all
    T*B rows of each member instead of T small ones."""
    M, L, T, B, G4 = dG.shape
    H, rows, acc = G4 // 4, T * B, d_out.dtype
    dG_flat, dG_mm_flat = dG.view(M, L, rows, G4), dG_mm.view(M, L, rows, G4)
    h_prev = [
        torch.cat([h0_mm[:, layer, None], H_mm[:, layer, :-1]], dim=1).view(M, rows, H)
        for layer in range(L)
    ]
    d_w_y = torch.bmm(Y_in.view(M, rows, -1).transpose(1, 2), dG_flat[:, 0])
    d_w_out = torch.bmm(Hs[:, L - 1].reshape(M, rows, H).transpose(1, 2), d_out.view(M, rows, -1))
    d_b_out = d_out.sum(dim=(1, 2))
    d_layer = [torch.bmm(h_prev[0].transpose(1, 2), dG_mm_flat[:, 0]).to(acc)]
    for layer in range(1, L):
        x = X[:, layer].reshape(M, rows, H).transpose(1, 2)
        d_layer += [
            torch.bmm(x, dG_mm_flat[:, layer]).to(acc),
            torch.bmm(h_prev[layer].transpose(1, 2), dG_mm_flat[:, layer]).to(acc),
            dG_flat[:, layer].sum(dim=1),
        ]
    d_h0, d_c0 = torch.stack(dh_rec, dim=1), torch.stack(dc_rec, dim=1)
    return (None, dG[:, 0], None, None, d_h0, d_c0, None, d_w_y, d_w_out, d_b_out, *d_layer)


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
