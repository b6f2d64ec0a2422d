"""A GRU cell: nn.GRU's equations (gate layout [r, z, n]), one step at a time. The worked example
of a cell that is one file: registered by name, it trains on the plain autograd path, alone or as
a stack of members (seqgen study --batched --cell gru)."""

from __future__ import annotations

import math

import torch
from torch import nn

from seqgen.model.cells import cell


@cell("gru")
class GRU(nn.Module):
    state_size = 1  # h

    def __init__(self, input_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        H, L = hidden_size, num_layers
        self.hidden_size, self.num_layers = H, L
        sizes = [input_size] + [H] * (L - 1)
        self.w_ih = nn.ParameterList([nn.Parameter(torch.empty(i, 3 * H)) for i in sizes])
        self.w_hh = nn.ParameterList([nn.Parameter(torch.empty(H, 3 * H)) for _ in range(L)])
        self.b_ih = nn.ParameterList([nn.Parameter(torch.empty(3 * H)) for _ in range(L)])
        self.b_hh = nn.ParameterList([nn.Parameter(torch.empty(3 * H)) for _ in range(L)])
        for p in self.parameters():  # nn.GRU's init
            nn.init.uniform_(p, -1.0 / math.sqrt(H), 1.0 / math.sqrt(H))

    def forward(self, x, state, keep):
        (h,) = state
        H, outputs = self.hidden_size, []
        for layer in range(self.num_layers):
            if layer > 0:
                x = outputs[-1] if keep is None else outputs[-1] * keep[layer - 1]
            gi = x @ self.w_ih[layer] + self.b_ih[layer]
            gh = h[layer] @ self.w_hh[layer] + self.b_hh[layer]
            r, z = torch.sigmoid(gi[..., : 2 * H] + gh[..., : 2 * H]).chunk(2, dim=-1)
            n = torch.tanh(gi[..., 2 * H :] + r * gh[..., 2 * H :])
            outputs.append((1 - z) * n + z * h[layer])
        return outputs[-1], (torch.stack(outputs),)
