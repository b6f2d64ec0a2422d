"""StreamlinedSequenceGenerator: parameters -> (T, K) sequence, one autoregressive pass of a
recurrent cell (seqgen/model/cells/: the LSTM, a GRU, or yours), written once with plain autograd.

A stack of members (seqgen/model/stacked.py) is this module's forward under torch.func.vmap, so a
new layer or cell changes this file or its own, and the stack follows.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

from seqgen.model.cells import make_cell

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """The generator's shape; values come from the phase settings (experiments/phases.toml)."""

    n_components: int  # K: values generated per step
    n_params: int  # P: simulation parameters that condition the sequence
    hidden_size: int  # H
    num_layers: int  # L
    dropout: float  # between stacked layers, as nn.LSTM(dropout=...)
    encoder_size: int = 64  # width of the parameter encoder that sets the initial state
    cell: str = "lstm"  # seqgen/model/cells/: a registered cell's name

    def to_dict(self) -> dict:
        return asdict(self)


class Draws(NamedTuple):
    """One forward's random numbers, each None where not drawn: noise_y (T,B,K) and noise_p
    (T,B,P) (noise_level * N(0,1) on the previous value and the parameters as step inputs),
    uniform (T,B,1) (U(0,1): the true previous value where uniform < ratio), keep (L-1,T,B,H)
    (scaled dropout keep-masks on the inputs of layers 1..L-1). A stack's have a leading M."""

    noise_y: torch.Tensor | None = None
    noise_p: torch.Tensor | None = None
    uniform: torch.Tensor | None = None
    keep: torch.Tensor | None = None


class StepInputs(NamedTuple):
    """What the cell sees at every step besides the previous value, (T, B, .) each. Layer 0's
    input at step t is [position, previous value + noise_y, cond]; the previous value is
    lerp(model's own, y_teacher, use_truth): the truth where use_truth is 1."""

    position: torch.Tensor  # (T,B,1) t / (T - 1)
    noise_y: torch.Tensor  # (T,B,K)
    cond: torch.Tensor  # (T,B,P) the parameters, with their noise
    y_teacher: torch.Tensor  # (T,B,K) the true previous value; the start value 0 at t = 0
    use_truth: torch.Tensor  # (T,B,1) 1.0 or 0.0
    keep: torch.Tensor | None  # (L-1,T,B,H) dropout keep-masks, or None


def member_draws(
    generator: torch.Generator | None,
    config: ModelConfig,
    batch: int,
    seq_len: int,
    noise_level: float,
    ratio: float,
    training: bool,
    teacher_forced: bool = True,
    device: torch.device | str | None = None,
) -> Draws:
    """One model's draws for one forward, in a fixed order, from `generator` (None: the global
    RNG on `device`). A stack's member m draws the same from its own generator."""
    T, B, K, P = seq_len, batch, config.n_components, config.n_params
    L, H = config.num_layers, config.hidden_size
    dev = generator.device if generator is not None else device
    rng = {"device": dev, "generator": generator}
    noise_y = noise_p = uniform = keep = None
    if training and noise_level > 0:
        noise_y = noise_level * torch.randn(T, B, K, **rng)
        noise_p = noise_level * torch.randn(T, B, P, **rng)
    if teacher_forced and ratio > 0:
        uniform = torch.rand(T, B, 1, **rng)
    if training and config.dropout > 0 and L > 1:
        p = 1.0 - config.dropout  # kept where U(0,1) < p: Bernoulli(p), 4x torch.bernoulli's speed
        keep = torch.rand(L - 1, T, B, H, **rng).lt_(p).div_(p)
    return Draws(noise_y, noise_p, uniform, keep)


class StreamlinedSequenceGenerator(nn.Module):
    """Autoregressive recurrent generator conditioned on simulation parameters.

    The parameters, through a small encoder, set every layer's initial state. At step t the input
    is [t / (T - 1), previous value (K), parameters (P)]; a linear head gives the K values of step
    t. The previous value at t = 0 is the start value 0, the training mean of every component
    (inputs and outputs are standardised), so generation needs only the parameters.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        K, P, H, L = config.n_components, config.n_params, config.hidden_size, config.num_layers
        self.cell = make_cell(config.cell, 1 + K + P, H, L)
        self.encoder = nn.Sequential(
            nn.Linear(P, config.encoder_size),
            nn.Tanh(),
            nn.Linear(config.encoder_size, self.cell.state_size * L * H),
        )
        self.head = nn.Linear(H, K)

    def forward(
        self,
        params: torch.Tensor,
        targets: torch.Tensor | None = None,
        teacher_forcing_ratio: float | torch.Tensor = 0.0,
        noise_level: float = 0.0,
        seq_len: int | None = None,
        draws: Draws | None = None,
    ) -> torch.Tensor:
        """params (B, P), targets (B, T, K) or None -> predictions (B, T, K), all standardised.

        With probability `teacher_forcing_ratio`, per step and per sample, the next input is the
        true previous value, otherwise the model's own prediction; ratio 0 is free generation.
        Input noise and dropout apply in training mode only. Random numbers come from `draws`
        (a stack's member's), else from the global RNG.
        """
        T = targets.shape[1] if targets is not None else seq_len
        if T is None:
            raise ValueError("give targets or seq_len")
        if draws is None:
            draws = member_draws(
                None, self.config, params.shape[0], T, noise_level, teacher_forcing_ratio,
                self.training, targets is not None, params.device,
            )  # fmt: skip
        inputs = self.step_inputs(params, targets, teacher_forcing_ratio, draws, T)
        state = self.initial_state(params)
        unroll = getattr(self.cell, "unroll", None)
        y = unroll(inputs, state, self.head) if unroll is not None else None
        if y is None:
            _plain_path_once(self.config.cell)
            y = self.decode(inputs, state)
        return y.transpose(0, 1)  # (B, T, K)

    def initial_state(self, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The cell's state at t = 0 from the parameters: state_size tensors (L, B, H)."""
        L, H = self.config.num_layers, self.config.hidden_size
        encoded = torch.tanh(self.encoder(params)).to(self.head.bias.dtype)
        encoded = encoded.view(params.shape[0], self.cell.state_size, L, H)
        return tuple(encoded[:, i].transpose(0, 1) for i in range(self.cell.state_size))

    def step_inputs(self, params, targets, ratio, draws: Draws, T: int) -> StepInputs:
        B, K, dtype = params.shape[0], self.config.n_components, self.head.bias.dtype
        params = params.to(dtype)  # states and inputs in the weights' dtype (float32 in training)
        zeros = params.new_zeros
        position = torch.linspace(0.0, 1.0, T, device=params.device, dtype=dtype)
        position = position.view(T, 1, 1).expand(T, B, 1)
        cond = params.unsqueeze(0).expand(T, B, params.shape[1])
        noise_y = zeros(T, B, K)
        if self.training and draws.noise_y is not None:
            noise_y, cond = draws.noise_y.to(dtype), cond + draws.noise_p.to(dtype)
        y_teacher, use_truth = zeros(T, B, K), zeros(T, B, 1)
        if targets is not None:
            y_teacher = torch.cat([zeros(1, B, K), targets.to(dtype).transpose(0, 1)[:-1]])
            # a model at ratio 0 never reads the truth, not even as lerp's unused end (where a
            # non-finite target would turn its own predictions into NaN)
            y_teacher = torch.where(
                torch.as_tensor(ratio, device=params.device) > 0, y_teacher, 0.0
            )
            if draws.uniform is not None:
                use_truth = (draws.uniform < ratio).to(dtype)
        keep = draws.keep.to(dtype) if self.training and draws.keep is not None else None
        return StepInputs(position, noise_y, cond, y_teacher, use_truth, keep)

    def decode(self, inputs: StepInputs, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The plain path, any cell: one step at a time on autograd, (T, B, K)."""
        y, outputs = inputs.y_teacher[0], []
        for t in range(inputs.position.shape[0]):
            if t > 0:  # the truth where use_truth is 1, the model's own where it is 0
                y = torch.lerp(y, inputs.y_teacher[t], inputs.use_truth[t])
            x = torch.cat([inputs.position[t], y + inputs.noise_y[t], inputs.cond[t]], dim=1)
            keep = inputs.keep[:, t] if inputs.keep is not None else None
            top, state = self.cell(x, state, keep)
            y = self.head(top).to(inputs.y_teacher.dtype)
            outputs.append(y)
        return torch.stack(outputs)

    @torch.no_grad()
    def generate(self, params: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Free-running generation from the parameters alone: (B, P) -> (B, T, K), standardised."""
        was_training = self.training
        self.eval()
        try:
            return self.forward(params, None, 0.0, 0.0, seq_len)
        finally:
            self.train(was_training)


@functools.cache
def _plain_path_once(cell: str) -> None:
    log.info(f"the {cell} cell runs on the plain autograd path (no faster recurrence applies)")


# State-dict keys of models saved before cells were modules of their own: the LSTM's weights sat
# on the generator itself.
_LEGACY_LSTM = ("w_in", "b_in", "w_hh.", "w_ih.", "b_ih.")


def current_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved state dict with today's keys (an older file's LSTM weights moved under cell.)."""
    return {(f"cell.{k}" if k.startswith(_LEGACY_LSTM) else k): v for k, v in state_dict.items()}
