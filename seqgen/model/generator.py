"""StreamlinedSequenceGenerator: parameters -> (T, K) sequence, one autoregressive LSTM pass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from seqgen.model.recurrence import autoregressive_lstm


@dataclass(frozen=True)
class ModelConfig:
    """The generator's shape; values come from the phase settings (experiments/phases.toml)."""

    n_components: int  # K: values generated per step
    n_params: int  # P: simulation parameters that condition the sequence
    hidden_size: int  # H
    num_layers: int  # L
    dropout: float  # between stacked layers, as nn.LSTM(dropout=...)
    encoder_size: int = 64  # width of the parameter encoder that sets the initial state

    def to_dict(self) -> dict:
        return asdict(self)


class StreamlinedSequenceGenerator(nn.Module):
    """Autoregressive stacked LSTM conditioned on simulation parameters.

    The parameters, through a small encoder, set every layer's initial (h, c). At step t the input
    is [t / (T - 1), previous value (K), parameters (P)]; a linear head gives the K values of step
    t. The previous value at t = 0 is the start value 0, the training mean of every component
    (inputs and outputs are standardised), so generation needs only the parameters.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        K, P, H, L = config.n_components, config.n_params, config.hidden_size, config.num_layers
        self.encoder = nn.Sequential(
            nn.Linear(P, config.encoder_size), nn.Tanh(), nn.Linear(config.encoder_size, 2 * L * H)
        )
        # Layer 0's input weights, rows [position, previous value (K), parameters (P)].
        self.w_in = nn.Parameter(torch.empty(1 + K + P, 4 * H))
        self.b_in = nn.Parameter(torch.empty(4 * H))
        self.w_hh = nn.ParameterList([nn.Parameter(torch.empty(H, 4 * H)) for _ in range(L)])
        self.w_ih = nn.ParameterList([nn.Parameter(torch.empty(H, 4 * H)) for _ in range(L - 1)])
        self.b_ih = nn.ParameterList([nn.Parameter(torch.empty(4 * H)) for _ in range(L - 1)])
        self.head = nn.Linear(H, K)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.LSTM's uniform(+-1/sqrt(H)) init, forget-gate bias +1 so memory starts open."""
        H = self.config.hidden_size
        bound = 1.0 / math.sqrt(H)
        lstm_weights = [self.w_in, self.b_in, *self.w_hh, *self.w_ih, *self.b_ih]
        for p in lstm_weights:
            nn.init.uniform_(p, -bound, bound)
        with torch.no_grad():
            for b in [self.b_in, *self.b_ih]:
                b[H : 2 * H] += 1.0  # layout [i, f, o, g]

    def forward(
        self,
        params: torch.Tensor,
        targets: torch.Tensor | None = None,
        teacher_forcing_ratio: float = 0.0,
        noise_level: float = 0.0,
        seq_len: int | None = None,
    ) -> torch.Tensor:
        """params (B, P), targets (B, T, K) or None -> predictions (B, T, K), all standardised.

        With probability `teacher_forcing_ratio`, per step and per sample, the next input is the
        true previous value, otherwise the model's own prediction; ratio 0 is free generation.
        Input noise and dropout apply in training mode only.
        """
        cfg = self.config
        B, K, L, H = params.shape[0], cfg.n_components, cfg.num_layers, cfg.hidden_size
        T = targets.shape[1] if targets is not None else seq_len
        if T is None:
            raise ValueError("give targets or seq_len")
        dev = params.device

        state = torch.tanh(self.encoder(params)).view(B, 2, L, H).transpose(0, 2)  # (L, 2, B, H)
        h0, c0 = state[:, 0].contiguous(), state[:, 1].contiguous()

        position = torch.linspace(0.0, 1.0, T, device=dev).view(T, 1, 1).expand(T, B, 1)
        noise_y = torch.zeros(T, B, K, device=dev)
        cond = params.unsqueeze(0).expand(T, B, -1)  # (T, B, P)
        if self.training and noise_level > 0:
            noise_y = noise_level * torch.randn(T, B, K, device=dev)
            cond = cond + noise_level * torch.randn(T, B, cond.shape[2], device=dev)
        # Everything layer 0 sees except the previous value itself.
        features = torch.cat([position, noise_y, cond], dim=2)  # (T, B, 1 + K + P)

        y_teacher = torch.zeros(T, B, K, device=dev)  # start value 0 at t = 0
        use_truth = torch.zeros(T, B, 1, device=dev)
        if targets is not None and teacher_forcing_ratio > 0:
            y_teacher[1:] = targets.transpose(0, 1)[:-1]
            use_truth = (torch.rand(T, B, 1, device=dev) < teacher_forcing_ratio).float()
        drop = None
        if self.training and cfg.dropout > 0 and L > 1:
            keep = 1.0 - cfg.dropout
            drop = torch.bernoulli(torch.full((L - 1, T, B, H), keep, device=dev)) / keep

        layer_w = [self.w_hh[0]]
        for layer in range(1, L):
            layer_w += [self.w_ih[layer - 1], self.w_hh[layer], self.b_ih[layer - 1]]
        # Under autocast the recurrence's big GEMMs run in the autocast dtype; it manages its own
        # precision (states and gradients in float32), so autocast itself is off inside.
        mm_dtype = (
            torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        )
        args = [features.float(), self.w_in, self.b_in, y_teacher, use_truth, h0.float()]
        args += [c0.float(), drop, self.w_in[1 : 1 + K], self.head.weight.t(), self.head.bias]
        args += layer_w
        with torch.autocast(dev.type, enabled=False):
            # one model is a stack of M = 1 (the recurrence takes a leading member dimension)
            y = autoregressive_lstm(mm_dtype, *[a if a is None else a[None] for a in args])[0]
        return y.transpose(0, 1)  # (B, T, K)

    @torch.no_grad()
    def generate(self, params: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Free-running generation from the parameters alone: (B, P) -> (B, T, K), standardised."""
        was_training = self.training
        self.eval()
        try:
            return self.forward(params, None, 0.0, 0.0, seq_len)
        finally:
            self.train(was_training)
