"""The autoregressive stacked-LSTM recurrence as one autograd Function with hand-written BPTT.

Why by hand: with scheduled sampling every step's input depends on the previous step's output, so
the sequence cannot go through a fused multi-step LSTM kernel. Autograd over a Python loop records
~40 small ops per step and runs their backward one by one. Here the forward saves only the gate
activations, and the backward (a) keeps only the unavoidable per-step GEMMs (dh_{t-1} = dgates @ W)
and (b) forms every weight gradient once per sequence as one large GEMM over all T*B rows.

Gate layout per layer: [i, f, o, g] (sigmoid on the first 3H columns at once, tanh on the last H).
"""

from __future__ import annotations

import torch


def _cell(
    gates: torch.Tensor,
    c_prev: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    c: torch.Tensor,
    tc: torch.Tensor,
    h: torch.Tensor,
) -> None:
    """LSTM cell update written into the saved buffers s (B,3H), g, c, tc, h (B,H)."""
    hidden = c_prev.shape[1]
    torch.sigmoid(gates[:, : 3 * hidden], out=s)
    torch.tanh(gates[:, 3 * hidden :], out=g)
    torch.mul(s[:, hidden : 2 * hidden], c_prev, out=c)  # f * c_prev
    c.addcmul_(s[:, :hidden], g)  # + i * g
    torch.tanh(c, out=tc)
    torch.mul(s[:, 2 * hidden :], tc, out=h)  # o * tanh(c)


def _unpack(layer_w) -> tuple[list, list, list]:
    """(w_hh_0, w_ih_1, w_hh_1, b_1, ...) -> per-layer w_ih, w_hh, bias (None for layer 0)."""
    w_ih, w_hh, bias = [None], [layer_w[0]], [None]
    for i in range(1, len(layer_w), 3):
        w_ih.append(layer_w[i])
        w_hh.append(layer_w[i + 1])
        bias.append(layer_w[i + 2])
    return w_ih, w_hh, bias


class AutoregressiveLSTM(torch.autograd.Function):
    """yhat (T,B,K) of a stacked LSTM whose layer-0 input at step t is yhat_{t-1} or the truth."""

    @staticmethod
    def forward(
        ctx, mm_dtype, pre0, y_teacher, use_truth, h0, c0, drop, w_y, w_out, b_out, *layer_w
    ):
        """
        mm_dtype: dtype of the H-wide GEMM operands (torch.bfloat16 / float16 under mixed
            precision, else None); states, gate math and gradients accumulate in float32.
        pre0 (T,B,4H): layer-0 gate input from everything but the previous value (bias, step
            position, parameters, input noise), computed outside so autograd handles it.
        y_teacher (T,B,K): the true previous value for each step (the start value at t = 0).
        use_truth (T,B,1): 1.0 where the input is the true previous value, 0.0 for the model's own.
        h0, c0 (L,B,H): initial states. drop (L-1,T,B,H) or None: scaled dropout keep-masks on the
        inputs of layers 1..L-1. w_y (K,4H), w_out (H,K), b_out (K,).
        layer_w: w_hh_0 (H,4H), then (w_ih_l (H,4H), w_hh_l (H,4H), b_l (4H,)) for l = 1..L-1.
        """
        T, B, _ = pre0.shape
        L, _, H = h0.shape
        low = mm_dtype or pre0.dtype
        w_ih, w_hh, bias = _unpack(layer_w)
        w_ih_mm = [None] + [w.to(low) for w in w_ih[1:]]
        w_hh_mm = [w.to(low) for w in w_hh]
        new = pre0.new_empty
        S = new(L, T, B, 3 * H)
        G, C, TC, Hs = (new(L, T, B, H) for _ in range(4))
        # GEMM copies of the hidden states (h_{-1} = h0 first) and of the inputs of layers >= 1
        H_mm = Hs if low == pre0.dtype else new(L, T, B, H, dtype=low)
        h0_mm = h0.to(low)
        X = new(L, T, B, H, dtype=low) if L > 1 else None
        Y_in, Y_hat = new(T, B, y_teacher.shape[2]), new(T, B, y_teacher.shape[2])
        gates = new(B, 4 * H)
        for t in range(T):
            if t == 0:
                Y_in[0] = y_teacher[0]
            else:  # yhat + m * (truth - yhat): the truth where m = 1, the model's own where m = 0
                torch.lerp(Y_hat[t - 1], y_teacher[t], use_truth[t], out=Y_in[t])
            for layer in range(L):
                h_prev = h0_mm[layer] if t == 0 else H_mm[layer, t - 1]
                c_prev = c0[layer] if t == 0 else C[layer, t - 1]
                if layer == 0:
                    torch.addmm(pre0[t], Y_in[t], w_y, out=gates)  # K is tiny: float32
                else:
                    if drop is not None:
                        torch.mul(Hs[layer - 1, t], drop[layer - 1, t], out=X[layer, t])
                    else:
                        X[layer, t].copy_(Hs[layer - 1, t])
                    torch.add(bias[layer], torch.mm(X[layer, t], w_ih_mm[layer]), out=gates)
                gates.add_(torch.mm(h_prev, w_hh_mm[layer]))
                _cell(
                    gates, c_prev, S[layer, t], G[layer, t], C[layer, t], TC[layer, t], Hs[layer, t]
                )
                if H_mm is not Hs:
                    H_mm[layer, t].copy_(Hs[layer, t])
            torch.addmm(b_out, Hs[L - 1, t], w_out, out=Y_hat[t])
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
        L, T, B, H = G.shape
        low, acc = ctx.mm_dtype, d_yhat.dtype
        w_ih, w_hh, _ = _unpack(layer_w)
        # contiguous transposes: GEMMs on transposed low-precision views take a slow path
        w_hh_t = [w.t().to(low).contiguous() for w in w_hh]
        w_ih_t = [None] + [w.t().to(low).contiguous() for w in w_ih[1:]]
        dG = d_yhat.new_empty(L, T, B, 4 * H)
        dG_mm = dG if low == dG.dtype else d_yhat.new_empty(L, T, B, 4 * H, dtype=low)
        d_out = d_yhat.new_empty(d_yhat.shape)  # total gradient at each yhat_t
        dh_rec = [d_yhat.new_zeros(B, H) for _ in range(L)]
        dc_rec = [d_yhat.new_zeros(B, H) for _ in range(L)]
        dy_feedback = d_yhat.new_zeros(B, d_yhat.shape[2])
        for t in range(T - 1, -1, -1):
            torch.add(d_yhat[t], dy_feedback, out=d_out[t])
            dh = torch.addmm(dh_rec[L - 1], d_out[t], w_out.t())
            for layer in range(L - 1, -1, -1):
                if layer < L - 1:  # gradient from the layer above, through its input dropout
                    dx = torch.mm(dG_mm[layer + 1, t], w_ih_t[layer + 1])
                    dh = (
                        dh_rec[layer].addcmul_(dx, drop[layer, t])
                        if drop is not None
                        else dh_rec[layer].add_(dx)
                    )
                s, g, tc = S[layer, t], G[layer, t], TC[layer, t]
                i, f, o = s[:, :H], s[:, H : 2 * H], s[:, 2 * H :]
                c_prev = c0[layer] if t == 0 else C[layer, t - 1]
                dc = dc_rec[layer].addcmul_(dh, o * (1 - tc * tc))
                dgl = dG[layer, t]
                torch.mul(dc, g, out=dgl[:, :H])  # d i
                torch.mul(dc, c_prev, out=dgl[:, H : 2 * H])  # d f
                torch.mul(dh, tc, out=dgl[:, 2 * H : 3 * H])  # d o
                torch.mul(dc, i, out=dgl[:, 3 * H :])  # d g
                dgl[:, : 3 * H].mul_(s - s * s)  # through the sigmoids
                dgl[:, 3 * H :].mul_(1 - g * g)  # through the tanh
                dc_rec[layer] = dc.mul_(f)
                if dG_mm is not dG:
                    dG_mm[layer, t].copy_(dgl)
                dh_rec[layer] = torch.mm(dG_mm[layer, t], w_hh_t[layer]).to(acc)
            if t > 0:  # the input at t was yhat_{t-1} where use_truth is 0
                dy_feedback = torch.mm(dG[0, t], w_y.t()).mul_(1 - use_truth[t])

        # Weight gradients: one GEMM over all T*B rows instead of T small ones.
        rows = T * B
        dG_flat, dG_mm_flat = dG.reshape(L, rows, 4 * H), dG_mm.reshape(L, rows, 4 * H)
        h_prev = [
            torch.cat([h0_mm[layer, None], H_mm[layer, :-1]]).reshape(rows, H) for layer in range(L)
        ]
        d_w_y = Y_in.reshape(rows, -1).t() @ dG_flat[0]
        d_w_out = Hs[L - 1].reshape(rows, H).t() @ d_out.reshape(rows, -1)
        d_b_out = d_out.sum(dim=(0, 1))
        d_layer = [(h_prev[0].t() @ dG_mm_flat[0]).to(acc)]
        for layer in range(1, L):
            d_layer += [
                (X[layer].reshape(rows, H).t() @ dG_mm_flat[layer]).to(acc),
                (h_prev[layer].t() @ dG_mm_flat[layer]).to(acc),
                dG_flat[layer].sum(dim=0),
            ]
        d_h0, d_c0 = torch.stack(dh_rec), torch.stack(dc_rec)
        return (None, dG[0], None, None, d_h0, d_c0, None, d_w_y, d_w_out, d_b_out, *d_layer)
