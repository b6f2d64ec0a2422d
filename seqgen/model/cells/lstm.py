"""The LSTM cell (gate layout [i, f, o, g]), and its whole-sequence accelerations: the C++
recurrence on CPU and the Triton kernels on CUDA (seqgen/model/recurrence.py), picked here where
they apply to the inputs; tests/test_cells.py checks each against this file's plain step."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, vmap

from seqgen.model.cells import cell
from seqgen.model.recurrence import autoregressive_lstm, lstm_backend


@cell("lstm")
class LSTM(nn.Module):
    state_size = 2  # h, c

    def __init__(self, input_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        F, H, L = input_size, hidden_size, num_layers
        self.hidden_size, self.num_layers = H, L
        self.w_in = nn.Parameter(torch.empty(F, 4 * H))  # layer 0's input weights
        self.b_in = nn.Parameter(torch.empty(4 * H))
        self.w_hh = nn.ParameterList([nn.Parameter(torch.empty(H, 4 * H)) for _ in range(L)])
        self.w_ih = nn.ParameterList([nn.Parameter(torch.empty(H, 4 * H)) for _ in range(L - 1)])
        self.b_ih = nn.ParameterList([nn.Parameter(torch.empty(4 * H)) for _ in range(L - 1)])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.LSTM's uniform(+-1/sqrt(H)) init, forget-gate bias +1 so memory starts open."""
        H = self.hidden_size
        for p in self.parameters():
            nn.init.uniform_(p, -1.0 / math.sqrt(H), 1.0 / math.sqrt(H))
        with torch.no_grad():
            for b in [self.b_in, *self.b_ih]:
                b[H : 2 * H] += 1.0

    def forward(self, x, state, keep):
        h, c = state
        H, outputs, cells = self.hidden_size, [], []
        for layer in range(self.num_layers):
            if layer == 0:
                gates = x @ self.w_in + self.b_in
            else:
                below = outputs[-1] if keep is None else outputs[-1] * keep[layer - 1]
                gates = below @ self.w_ih[layer - 1] + self.b_ih[layer - 1]
            gates = gates + h[layer] @ self.w_hh[layer]
            i, f, o = torch.sigmoid(gates[..., : 3 * H]).chunk(3, dim=-1)
            g = torch.tanh(gates[..., 3 * H :])
            cells.append(f * c[layer] + i * g)
            outputs.append(o * torch.tanh(cells[-1]))
        return outputs[-1], (torch.stack(outputs), torch.stack(cells))

    def unroll(self, inputs, state, head: nn.Linear) -> torch.Tensor | None:
        """The whole sequence in the C++ or Triton recurrence, (T, B, K); None where neither
        applies (then the generator runs the plain loop)."""
        dev = inputs.cond.device
        autocast = torch.is_autocast_enabled(dev.type)
        mm_dtype = torch.get_autocast_dtype(dev.type) if autocast else None
        features = torch.cat([inputs.position, inputs.noise_y, inputs.cond], dim=2)
        if lstm_backend(mm_dtype, features) is None:
            return None
        K = inputs.y_teacher.shape[2]
        layer_w = [self.w_hh[0]]
        for layer in range(1, self.num_layers):
            layer_w += [self.w_ih[layer - 1], self.w_hh[layer], self.b_ih[layer - 1]]
        h0, c0 = state
        args = [features, self.w_in, self.b_in, inputs.y_teacher, inputs.use_truth, h0, c0]
        # rows [position, previous value (K), parameters] of w_in: the previous value's are w_y
        args += [inputs.keep, self.w_in[1 : 1 + K], head.weight.t(), head.bias, *layer_w]
        # The recurrence manages its own precision (states and gradients in float32, its GEMMs in
        # the autocast dtype), so autocast is off inside; one model is a stack of M = 1.
        with torch.autocast(dev.type, enabled=False):
            return autoregressive_lstm(mm_dtype, *[a if a is None else a[None] for a in args])[0]


def plain_recurrence(
    mm_dtype, x0, w_x, b_x, y_teacher, use_truth, h0, c0, drop, w_y, w_out, b_out, *layer_w
) -> torch.Tensor:
    """autoregressive_lstm's contract (seqgen/model/recurrence.py) on the plain path: this file's
    LSTM step under autograd, per member by torch.func.vmap, the GEMMs under autocast to mm_dtype.
    The reference the C++ and Triton recurrences are tested and benchmarked against."""
    M, T, B, F = x0.shape
    L, H, K = h0.shape[1], h0.shape[3], y_teacher.shape[3]
    with torch.device("meta"):
        lstm = LSTM(F + K, H, L)
    weights = {"w_in": torch.cat([w_x, w_y], dim=1), "b_in": b_x, "w_hh.0": layer_w[0]}
    for layer in range(1, L):
        w_ih, w_hh, b = layer_w[3 * layer - 2 : 3 * layer + 1]
        weights |= {f"w_ih.{layer - 1}": w_ih, f"w_hh.{layer}": w_hh, f"b_ih.{layer - 1}": b}

    def member(weights, x0, y_teacher, use_truth, h0, c0, drop, w_out, b_out):
        state, y, outputs = (h0, c0), y_teacher[0], []
        for t in range(T):
            if t > 0:
                y = torch.lerp(y, y_teacher[t], use_truth[t])
            keep = drop[:, t] if drop is not None else None
            x = torch.cat([x0[t], y], dim=1)
            top, state = functional_call(lstm, weights, (x, state, keep))
            y = (top @ w_out + b_out).to(y_teacher.dtype)
            outputs.append(y)
        return torch.stack(outputs)

    inputs = (weights, x0, y_teacher, use_truth, h0, c0, drop, w_out, b_out)
    dims = tuple(None if a is None else 0 for a in inputs)
    with torch.autocast(x0.device.type, dtype=mm_dtype, enabled=mm_dtype is not None):
        return vmap(member, in_dims=dims)(*inputs)
