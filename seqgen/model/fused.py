"""The stacked recurrence on CUDA in Triton kernels: one kernel per layer-step for all members.

Why: on a GPU this recurrence is bound by its ~600 sequential layer-steps per batch, not by
arithmetic (FACTS.md: ~54 us each through the Python loop, graphed). Here each layer-step is one
kernel launch for all M members and B rows: the GEMM [x_t, h_{t-1}] @ [w_ih; w_hh] with the
bias, the gate nonlinearities and the cell update in registers, writing the state and what the
backward needs. Layer 0's narrow inputs (F features, K fed-back values) are small dots inside
its kernel, and so is the head: step t's layer-0 kernel computes yhat_{t-1} = h_top @ w_out +
b_out and the sampling choice lerp(yhat_{t-1}, truth, use_truth) itself, so the fed-back value
never leaves the kernel that uses it (only the last step's head is a separate op). Backward per
layer-step: one kernel that gathers dL/dh by the recurrent GEMMs dgates_{t+1} @ w_hh^T (and the
layer above's dgates_t @ w_ih^T, or the head's) and does the gate-gradient math; the weight
gradients are one batched GEMM each over all T*B rows, after the loop.

A program owns (member, BLOCK_B rows, BLOCK_H hidden units) and computes all four gates of its
units, so the cell update needs nothing from other programs; it reads whole rows of the previous
layer-step's output, which the previous launch wrote. Nothing syncs with the host and every
buffer is allocated before the loop: the whole forward and backward can be captured in a CUDA
graph (seqgen/training/step.py). With TRITON_INTERPRET=1 (set before this module is imported)
the same kernels run on CPU tensors, which is how tests/test_fused.py checks them without a GPU.

Shapes and arguments as seqgen.model.recurrence.autoregressive_lstm; gates in the order
[i, f, o, g]; states, gate math and gradients in float32, GEMM operands in mm_dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from seqgen.model.recurrence import _unpack, run_recurrence

# ---- kernels -------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))  # in (0, 1]: no overflow, no cancellation for large |x|
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -y, y)


@triton.jit
def _dot4(a, w, k_idx, k_ok, cols, col_ok, acc_i, acc_f, acc_o, acc_g, H: tl.constexpr):
    """acc_gate += a @ w[k_idx, gate * H + cols] for the gates i, f, o, g; w is (., 4H)."""
    tile = w + k_idx[:, None] * (4 * H) + cols[None, :]
    ok = k_ok[:, None] & col_ok[None, :]
    acc_i = tl.dot(a, tl.load(tile, mask=ok, other=0.0), acc_i, input_precision="ieee")
    acc_f = tl.dot(a, tl.load(tile + H, mask=ok, other=0.0), acc_f, input_precision="ieee")
    acc_o = tl.dot(a, tl.load(tile + 2 * H, mask=ok, other=0.0), acc_o, input_precision="ieee")
    acc_g = tl.dot(a, tl.load(tile + 3 * H, mask=ok, other=0.0), acc_g, input_precision="ieee")
    return acc_i, acc_f, acc_o, acc_g


@triton.jit
def _gates_gemm(
    a_ptr, mask_ptr, w, rows, row_ok, cols, col_ok, acc_i, acc_f, acc_o, acc_g,
    H: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """acc_gate += (a * mask)[rows] @ w[:, gate cols]: a, mask (B, H) float32, w (H, 4H) in the
    GEMM dtype; a is rounded to that dtype, as the Python path rounds its GEMM copies."""
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        offs = rows[:, None] * H + ks[None, :]
        ok = row_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptr + offs, mask=ok, other=0.0)
        if HAS_MASK:
            a = a * tl.load(mask_ptr + offs, mask=ok, other=0.0)
        a = a.to(w.dtype.element_ty)
        acc_i, acc_f, acc_o, acc_g = _dot4(a, w, ks, k_ok, cols, col_ok, acc_i, acc_f, acc_o,
                                           acc_g, H)  # fmt: skip
    return acc_i, acc_f, acc_o, acc_g


@triton.jit
def _head(
    h_ptr, w_out, b_out, rows, row_ok, ks, k_ok,
    H: tl.constexpr, K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    KP: tl.constexpr,
):  # fmt: skip
    """h[rows] @ w_out + b_out (BLOCK_B, KP), zero beyond K: h (B, H), w_out (H, K)."""
    y = tl.zeros([BLOCK_B, KP], dtype=tl.float32)
    for j0 in range(0, H, BLOCK_K):
        js = j0 + tl.arange(0, BLOCK_K)
        j_ok = js < H
        h = tl.load(h_ptr + rows[:, None] * H + js[None, :], mask=row_ok[:, None] & j_ok[None, :],
                    other=0.0)  # fmt: skip
        w = tl.load(w_out + js[:, None] * K + ks[None, :], mask=j_ok[:, None] & k_ok[None, :],
                    other=0.0)  # fmt: skip
        y = tl.dot(h, w, y, input_precision="ieee")
    return y + tl.load(b_out + ks, mask=k_ok, other=0.0)[None, :]


@triton.jit(do_not_specialize=["t", "prev", "now"])
def _forward_step(
    t, prev, now, T, S,
    Hs, Cs, act, TC, w_ih, w_hh, bias, drop,
    x0, w_x, y_teacher, use_truth, w_y, w_out, b_out, Y_in, y_hat,
    LAYER: tl.constexpr, L: tl.constexpr, B: tl.constexpr, H: tl.constexpr, F: tl.constexpr,
    K: tl.constexpr, HAS_DROP: tl.constexpr, SAVE: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, FP: tl.constexpr, KP: tl.constexpr,
):  # fmt: skip
    """Layer LAYER at step t for one (member, rows, hidden units) block; h, c of step t-1 in slot
    prev and of step t into slot now of Hs, Cs (M, L, S, B, H). With SAVE: activations into act
    (M, L, T, B, 4H), tanh(c) into TC (M, L, T, B, H). Layer 0 first forms its fed-back input
    (the head on the top layer's h_{t-1}, then the sampling choice), storing Y_in[t] and
    y_hat[t-1] from the programs of the first hidden block."""
    m = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok, col_ok = rows < B, cols < H
    tile = rows[:, None] * H + cols[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    acc_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    state = (m * L + LAYER) * S * (B * H)  # this member's and layer's slots in Hs, Cs
    if LAYER > 0:  # input: the layer below's h_t times its dropout keep-mask
        below = Hs + ((m * L + LAYER - 1) * S + now) * (B * H)
        mask = drop + (((m * (L - 1) + LAYER - 1) * T + t) * B) * H
        acc_i, acc_f, acc_o, acc_g = _gates_gemm(
            below, mask, w_ih + m * (H * 4 * H), rows, row_ok, cols, col_ok,
            acc_i, acc_f, acc_o, acc_g, H, HAS_DROP, BLOCK_K,
        )  # fmt: skip
    else:  # input: F features and the K fed-back values, as small dots
        ks = tl.arange(0, KP)
        k_ok = ks < K
        y_offs = rows[:, None] * K + ks[None, :]
        y_ok = row_ok[:, None] & k_ok[None, :]
        top = Hs + ((m * L + L - 1) * S + prev) * (B * H)
        y_prev = _head(top, w_out + m * (H * K), b_out + m * K, rows, row_ok, ks, k_ok, H, K,
                       BLOCK_B, BLOCK_K, KP)  # fmt: skip
        truth = tl.load(y_teacher + (m * T + t) * (B * K) + y_offs, mask=y_ok, other=0.0)
        u = tl.load(use_truth + (m * T + t) * B + rows, mask=row_ok, other=0.0)[:, None]
        # torch.lerp's formula, as the Python path: exactly the truth at 1, the model's own at 0
        mixed = tl.where(u < 0.5, y_prev + u * (truth - y_prev), truth - (truth - y_prev) * (1 - u))
        y_in = tl.where(t == 0, truth, mixed)  # the start value at t = 0
        # (conditions as blocks: the interpreter rejects a block mask & a scalar)
        first = (rows * 0 + tl.program_id(2) == 0)[:, None]  # the first hidden block stores
        tl.store(Y_in + (m * T + t) * (B * K) + y_offs, y_in, mask=y_ok & first)
        last = (m * T + tl.maximum(t - 1, 0)) * (B * K)
        tl.store(y_hat + last + y_offs, y_prev, mask=y_ok & first & (rows * 0 + t > 0)[:, None])
        acc_i, acc_f, acc_o, acc_g = _dot4(y_in, w_y + m * (K * 4 * H), ks, k_ok, cols, col_ok,
                                           acc_i, acc_f, acc_o, acc_g, H)  # fmt: skip
        fs = tl.arange(0, FP)
        f_ok = fs < F
        x = tl.load(x0 + (m * T + t) * (B * F) + rows[:, None] * F + fs[None, :],
                    mask=row_ok[:, None] & f_ok[None, :], other=0.0)  # fmt: skip
        acc_i, acc_f, acc_o, acc_g = _dot4(x, w_x + m * (F * 4 * H), fs, f_ok, cols, col_ok,
                                           acc_i, acc_f, acc_o, acc_g, H)  # fmt: skip
    acc_i, acc_f, acc_o, acc_g = _gates_gemm(
        Hs + state + prev * (B * H), Hs, w_hh + m * (H * 4 * H), rows, row_ok, cols, col_ok,
        acc_i, acc_f, acc_o, acc_g, H, False, BLOCK_K,
    )  # fmt: skip
    b = bias + m * (4 * H) + cols
    i = _sigmoid(acc_i + tl.load(b, mask=col_ok, other=0.0)[None, :])
    f = _sigmoid(acc_f + tl.load(b + H, mask=col_ok, other=0.0)[None, :])
    o = _sigmoid(acc_o + tl.load(b + 2 * H, mask=col_ok, other=0.0)[None, :])
    g = _tanh(acc_g + tl.load(b + 3 * H, mask=col_ok, other=0.0)[None, :])
    c = f * tl.load(Cs + state + prev * (B * H) + tile, mask=tile_ok, other=0.0) + i * g
    tc = _tanh(c)
    tl.store(Cs + state + now * (B * H) + tile, c, mask=tile_ok)
    tl.store(Hs + state + now * (B * H) + tile, o * tc, mask=tile_ok)
    if SAVE:
        step = (m * L + LAYER) * T + t
        a = act + step * (B * 4 * H) + rows[:, None] * (4 * H) + cols[None, :]
        tl.store(a, i, mask=tile_ok)
        tl.store(a + H, f, mask=tile_ok)
        tl.store(a + 2 * H, o, mask=tile_ok)
        tl.store(a + 3 * H, g, mask=tile_ok)
        tl.store(TC + step * (B * H) + tile, tc, mask=tile_ok)


@triton.jit
def _back_gemm(dg, w_t, rows, row_ok, cols, col_ok, acc, H: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += dg[rows] @ w_t[:, cols]: gate gradients dg (B, 4H) float32, rounded to the GEMM
    dtype of w_t (4H, H), the transposed weight."""
    for k0 in range(0, 4 * H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < 4 * H
        d = tl.load(dg + rows[:, None] * (4 * H) + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        w = tl.load(w_t + ks[:, None] * H + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)  # fmt: skip
        acc = tl.dot(d.to(w.dtype), w, acc, input_precision="ieee")
    return acc


@triton.jit(do_not_specialize=["t"])
def _backward_step(
    t, T, S,
    dG, dc_buf, act, TC, Cs, drop, w_hh_t, w_ih_up_t, w_y, w_out, d_yhat, use_truth, d_out,
    LAYER: tl.constexpr, L: tl.constexpr, B: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
    HAS_DROP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr, KP: tl.constexpr,
):  # fmt: skip
    """Layer LAYER at step t, backward, for one (member, rows, hidden units) block: dL/dh from
    step t+1's gate gradients dG (M, L, T+1, B, 4H; slot T is zero) @ w_hh^T, plus the head's
    (top layer: the output gradient, with step t+1's feedback where it used the model's own
    output, stored into d_out) or the layer above's dG @ w_ih^T through its dropout; then the gate
    gradients into dG[:, LAYER, t], dL/dc carried back through the forget gate in dc_buf."""
    m = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok, col_ok = rows < B, cols < H
    tile = rows[:, None] * H + cols[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    G = 4 * H
    dh = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    dh = _back_gemm(dG + ((m * L + LAYER) * (T + 1) + t + 1) * (B * G), w_hh_t + m * (G * H),
                    rows, row_ok, cols, col_ok, dh, H, BLOCK_K)  # fmt: skip
    if LAYER == L - 1:
        ks = tl.arange(0, KP)
        k_ok = ks < K
        y_offs = rows[:, None] * K + ks[None, :]
        y_ok = row_ok[:, None] & k_ok[None, :]
        # feedback: step t+1's layer-0 gate gradients @ w_y^T (float32, as the Python path)
        feedback = tl.zeros([BLOCK_B, KP], dtype=tl.float32)
        dg0 = dG + (m * L * (T + 1) + t + 1) * (B * G)
        for g0 in range(0, G, BLOCK_K):
            gs = g0 + tl.arange(0, BLOCK_K)
            g_ok = gs < G
            d = tl.load(dg0 + rows[:, None] * G + gs[None, :],
                        mask=row_ok[:, None] & g_ok[None, :], other=0.0)  # fmt: skip
            w = tl.load(w_y + m * (K * G) + ks[None, :] * G + gs[:, None],
                        mask=g_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            feedback = tl.dot(d, w, feedback, input_precision="ieee")
        u_next = tl.load(use_truth + (m * T + t + 1) * B + rows,
                         mask=row_ok & (rows * 0 + t + 1 < T), other=1.0)  # fmt: skip
        d_y = tl.load(d_yhat + (m * T + t) * (B * K) + y_offs, mask=y_ok, other=0.0)
        d_y += feedback * (1.0 - u_next)[:, None]
        first = (rows * 0 + tl.program_id(2) == 0)[:, None]
        tl.store(d_out + (m * T + t) * (B * K) + y_offs, d_y, mask=y_ok & first)
        w = tl.load(w_out + m * (H * K) + cols[None, :] * K + ks[:, None],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
        dh = tl.dot(d_y, w, dh, input_precision="ieee")
    else:
        dx = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        dx = _back_gemm(dG + ((m * L + LAYER + 1) * (T + 1) + t) * (B * G),
                        w_ih_up_t + m * (G * H), rows, row_ok, cols, col_ok, dx, H,
                        BLOCK_K)  # fmt: skip
        if HAS_DROP:
            keep = drop + ((m * (L - 1) + LAYER) * T + t) * (B * H)
            dx = dx * tl.load(keep + tile, mask=tile_ok, other=0.0)
        dh += dx
    step = (m * L + LAYER) * T + t
    a = act + step * (B * G) + rows[:, None] * G + cols[None, :]
    i = tl.load(a, mask=tile_ok, other=0.0)
    f = tl.load(a + H, mask=tile_ok, other=0.0)
    o = tl.load(a + 2 * H, mask=tile_ok, other=0.0)
    g = tl.load(a + 3 * H, mask=tile_ok, other=0.0)
    tc = tl.load(TC + step * (B * H) + tile, mask=tile_ok, other=0.0)
    c_prev = tl.load(Cs + ((m * L + LAYER) * S + t) * (B * H) + tile, mask=tile_ok, other=0.0)
    carried = dc_buf + (m * L + LAYER) * (B * H) + tile
    dc = tl.load(carried, mask=tile_ok, other=0.0) + dh * o * (1.0 - tc * tc)
    tl.store(carried, dc * f, mask=tile_ok)
    # through sigmoid' = s (1 - s) for i, f, o and tanh' = 1 - g^2 for g
    out = dG + ((m * L + LAYER) * (T + 1) + t) * (B * G) + rows[:, None] * G + cols[None, :]
    tl.store(out, dc * g * i * (1.0 - i), mask=tile_ok)
    tl.store(out + H, dc * c_prev * f * (1.0 - f), mask=tile_ok)
    tl.store(out + 2 * H, dh * tc * o * (1.0 - o), mask=tile_ok)
    tl.store(out + 3 * H, dc * i * (1.0 - g * g), mask=tile_ok)


# ---- launching -----------------------------------------------------------------------------------


def _blocks(M: int, B: int, H: int, F: int, K: int, device: torch.device) -> dict:
    """Tile sizes, powers of two at least 16 wide (tl.dot's minimum). Hidden units per program:
    16 where 32 would leave streaming multiprocessors idle (few members: a layer-step is one
    wave of programs), else 32 (untuned guesses: a GPU run of benchmarks/stacked_recurrence.py
    is what tells)."""
    p2 = triton.next_power_of_2
    block_b = min(64, max(16, p2(B)))
    programs = M * triton.cdiv(B, block_b) * triton.cdiv(H, 32)
    narrow = H <= 16 or programs < _processors(device)
    return {
        "BLOCK_B": block_b,
        "BLOCK_H": 16 if narrow else 32,
        "BLOCK_K": 16 if H <= 16 else 32,
        "FP": max(16, p2(F)),
        "KP": max(16, p2(K)),
    }


@functools.cache
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for the interpreter's CPU tensors)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _grid(M: int, B: int, H: int, blocks: dict) -> tuple[int, int, int]:
    return (M, triton.cdiv(B, blocks["BLOCK_B"]), triton.cdiv(H, blocks["BLOCK_H"]))


def _forward(mm_dtype, x0, w_x, b_x, y_teacher, use_truth, h0, c0, drop, w_y, w_out, b_out,
             *layer_w, save: bool) -> dict:  # fmt: skip
    """Runs the forward; returns its buffers: y_hat (M, T, B, K), and with save what the backward
    needs (Hs, Cs (M, L, T+1, B, H): slot t holds step t-1, slot 0 the initial state; act, TC,
    Y_in; the GEMM weights)."""
    M, T, B, F = x0.shape
    L, H, K = h0.shape[1], h0.shape[3], y_teacher.shape[3]
    low = mm_dtype or x0.dtype
    w_ih, w_hh, bias = _unpack(layer_w)
    w_hh_mm = [w.to(low).contiguous() for w in w_hh]
    w_ih_mm = [None] + [w.to(low).contiguous() for w in w_ih[1:]]
    bias = [b_x.contiguous()] + [b.contiguous() for b in bias[1:]]
    S = T + 1 if save else 2  # generation keeps a ring of two steps
    new = x0.new_empty
    Hs, Cs = new(M, L, S, B, H), new(M, L, S, B, H)
    Hs[:, :, 0], Cs[:, :, 0] = h0, c0
    act = new(M, L, T, B, 4 * H) if save else Hs  # (unused without save)
    TC = new(M, L, T, B, H) if save else Hs
    Y_in, y_hat = new(M, T, B, K), new(M, T, B, K)
    x0, w_x, y_teacher = x0.contiguous(), w_x.contiguous(), y_teacher.contiguous()
    use_truth, w_y = use_truth.contiguous(), w_y.contiguous()
    w_out, b_out = w_out.contiguous(), b_out.contiguous()
    keep = drop.contiguous() if drop is not None else Hs
    blocks = _blocks(M, B, H, F, K, x0.device)
    grid = _grid(M, B, H, blocks)
    for t in range(T):
        prev, now = (t, t + 1) if save else (t % 2, (t + 1) % 2)
        for layer in range(L):
            _forward_step[grid](
                t, prev, now, T, S, Hs, Cs, act, TC,
                w_ih_mm[layer] if layer else w_hh_mm[0], w_hh_mm[layer], bias[layer], keep,
                x0, w_x, y_teacher, use_truth, w_y, w_out, b_out, Y_in, y_hat,
                LAYER=layer, L=L, B=B, H=H, F=F, K=K, HAS_DROP=drop is not None, SAVE=save,
                **blocks,
            )  # fmt: skip
    # the last step's head (every other step's runs in the next step's layer-0 kernel)
    y_hat[:, T - 1] = torch.baddbmm(b_out.unsqueeze(1), Hs[:, L - 1, T % S], w_out)
    return {"y_hat": y_hat, "Hs": Hs, "Cs": Cs, "act": act, "TC": TC, "Y_in": Y_in,
            "w_hh": w_hh_mm, "w_ih": w_ih_mm, "keep": keep}  # fmt: skip


def _backward(d_yhat, x0, w_x, use_truth, drop, w_y, w_out, Hs, Cs, act, TC, Y_in, w_hh, w_ih,
              need_x0: bool) -> tuple:  # fmt: skip
    """Gradients of x0 (or None), w_x, b_x, h0, c0, w_y, w_out, b_out and layer_w."""
    M, L, T, B, G = act.shape
    H, K, F, S = G // 4, d_yhat.shape[3], x0.shape[3], T + 1
    low, rows = w_hh[0].dtype, T * B
    new = d_yhat.new_empty
    dG = new(M, L, T + 1, B, G)
    dG[:, :, T] = 0  # nothing comes back from after the last step
    dc = d_yhat.new_zeros(M, L, B, H)
    d_out = new(M, T, B, K)
    w_hh_t = [w.transpose(1, 2).contiguous() for w in w_hh]
    w_ih_t = [None] + [w.transpose(1, 2).contiguous() for w in w_ih[1:]]
    d_yhat = d_yhat.contiguous()
    blocks = _blocks(M, B, H, F, K, d_yhat.device)
    grid = _grid(M, B, H, blocks)
    for t in range(T - 1, -1, -1):
        for layer in range(L - 1, -1, -1):
            _backward_step[grid](
                t, T, S, dG, dc, act, TC, Cs, drop if drop is not None else dc, w_hh_t[layer],
                w_ih_t[layer + 1] if layer + 1 < L else w_hh_t[layer], w_y, w_out, d_yhat,
                use_truth, d_out,
                LAYER=layer, L=L, B=B, H=H, K=K, HAS_DROP=drop is not None,
                BLOCK_B=blocks["BLOCK_B"], BLOCK_H=blocks["BLOCK_H"], BLOCK_K=blocks["BLOCK_K"],
                KP=blocks["KP"],
            )  # fmt: skip

    # Weight gradients: one batched GEMM over all T*B rows of each member per weight.
    def flat(x: torch.Tensor) -> torch.Tensor:  # (M, T, B, n) -> (M, T*B, n), a view
        return x.reshape(M, rows, x.shape[-1])

    def grad_w(inputs: torch.Tensor, layer: int) -> torch.Tensor:  # GEMM dtype, as Python's
        return torch.bmm(flat(inputs).to(low).transpose(1, 2), flat(dG[:, layer, :T]).to(low))

    dG0 = flat(dG[:, 0, :T])
    d_x0 = torch.bmm(dG0, w_x.transpose(1, 2)).view(x0.shape) if need_x0 else None
    d_layer = [grad_w(Hs[:, 0, :T], 0).to(d_yhat.dtype)]
    for layer in range(1, L):
        x = Hs[:, layer - 1, 1:] * (drop[:, layer - 1] if drop is not None else 1.0)
        d_layer += [
            grad_w(x, layer).to(d_yhat.dtype),
            grad_w(Hs[:, layer, :T], layer).to(d_yhat.dtype),
            flat(dG[:, layer, :T]).sum(dim=1),
        ]
    d_h0 = torch.stack(
        [torch.bmm(dG[:, layer, 0].to(low), w_hh_t[layer]).to(d_yhat.dtype) for layer in range(L)],
        dim=1,
    )
    d_w_y = torch.bmm(flat(Y_in).transpose(1, 2), dG0)
    d_w_x = torch.bmm(flat(x0).transpose(1, 2), dG0)
    d_w_out = torch.bmm(flat(Hs[:, L - 1, 1:]).transpose(1, 2), flat(d_out))
    return (d_x0, d_w_x, dG0.sum(dim=1), d_h0, dc, d_w_y, d_w_out, d_out.sum(dim=(1, 2)),
            *d_layer)  # fmt: skip


class TritonRecurrence:
    """The recurrence with forward and backward in Triton kernels (recurrence.Recurrence runs it:
    arguments as autoregressive_lstm)."""

    @staticmethod
    def forward(mm_dtype, args, save: bool) -> list[torch.Tensor]:
        """y_hat; with save also what the backward needs: Hs, Cs, act, TC, Y_in and the GEMM
        weights (w_hh per layer, then w_ih of layers >= 1)."""
        out = _forward(mm_dtype, *args, save=save)
        if not save:
            return [out["y_hat"]]
        saved = [out[k] for k in ("Hs", "Cs", "act", "TC", "Y_in")]
        return [out["y_hat"], *saved, *out["w_hh"], *out["w_ih"][1:]]

    @staticmethod
    def backward(mm_dtype, args, saved, d_yhat, needs) -> tuple:
        x0, w_x, _, _, use_truth, h0, _, drop, w_y, w_out, *_ = args
        L = h0.shape[1]
        Hs, Cs, act, TC, Y_in, *weights = saved
        w_hh, w_ih = weights[:L], [None, *weights[L:]]
        grads = _backward(
            d_yhat, x0, w_x, use_truth, drop, w_y, w_out, Hs, Cs, act, TC, Y_in, w_hh, w_ih,
            needs[0],
        )  # fmt: skip
        d_x0, d_w_x, d_b_x, d_h0, d_c0, d_w_y, d_w_out, d_b_out, *d_layer = grads
        return (d_x0, d_w_x, d_b_x, None, None, d_h0, d_c0, None, d_w_y, d_w_out, d_b_out,
                *d_layer)  # fmt: skip


def triton_lstm(mm_dtype, *args) -> torch.Tensor:
    """autoregressive_lstm in Triton kernels (on CPU tensors under TRITON_INTERPRET=1 too)."""
    return run_recurrence(TritonRecurrence, mm_dtype, *args)
