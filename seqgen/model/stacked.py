"""Many generators of one shape as one stacked model: every weight has a leading member dimension M.

Chains of a study that are at the same phase train in one process as one StackedGenerators: one
batched GEMM per layer-step serves every member instead of one small GEMM each, which is what a
launch-bound step needs (docs/design.md, issue #14). A member is a chain: its weights, its dropout,
and its own random draws (`draw`, from its own torch.Generator, exactly as
StreamlinedSequenceGenerator.forward draws them from the global RNG), so a member trained in the
stack equals the same chain trained alone. Per member its state dict is the single model's, key for
key, so model files and checkpoints do not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator
from seqgen.model.recurrence import autoregressive_lstm


def member_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """StreamlinedSequenceGenerator's state_dict keys and shapes, in its order (which is also
    the order of its parameters(), and so of its optimiser's state indices)."""
    K, P, H, L = config.n_components, config.n_params, config.hidden_size, config.num_layers
    E = config.encoder_size
    shapes = {"w_in": (1 + K + P, 4 * H), "b_in": (4 * H,)}
    shapes |= {"encoder.0.weight": (E, P), "encoder.0.bias": (E,)}
    shapes |= {"encoder.2.weight": (2 * L * H, E), "encoder.2.bias": (2 * L * H,)}
    shapes |= {f"w_hh.{layer}": (H, 4 * H) for layer in range(L)}
    shapes |= {f"w_ih.{layer}": (H, 4 * H) for layer in range(L - 1)}
    shapes |= {f"b_ih.{layer}": (4 * H,) for layer in range(L - 1)}
    return shapes | {"head.weight": (K, H), "head.bias": (K,)}


@dataclass
class Draws:
    """One training forward's random numbers for every member, drawn outside the forward (on
    CUDA: eagerly, into a graph's static buffers, before each replay). A member that draws
    nothing gets neutral values: noise 0, uniforms 1 (never below its ratio), keep-masks 1."""

    noise_y: torch.Tensor  # (M,T,B,K) noise_level * N(0,1), added to layer 0's previous-value input
    noise_p: torch.Tensor  # (M,T,B,P) noise_level * N(0,1) on the parameters as step inputs
    uniform: torch.Tensor  # (M,T,B,1) U(0,1): the true previous value where uniform < ratio
    keep: torch.Tensor | None  # (M,L-1,T,B,H) scaled dropout keep-masks; None: no member drops


class StackedGenerators(nn.Module):
    """M StreamlinedSequenceGenerators of one shape as one module; weights (M, ...).

    `dropout` is per member (config.dropout for all by default): it lives here and not in the
    shared config because dropout is a chain's setting, not the model's shape. A new stack's
    member m is initialised as the m-th of M single models built in a row would be.
    """

    def __init__(
        self,
        config: ModelConfig,
        members: int,
        dropout: Sequence[float] | None = None,
        initialise: bool = True,
    ):
        super().__init__()
        self.config, self.members = config, members
        self.dropout = tuple(dropout) if dropout is not None else (config.dropout,) * members
        if len(self.dropout) != members:
            raise ValueError(f"{len(self.dropout)} dropout values for {members} members")
        self.shapes = member_shapes(config)
        # Registered in the single model's order: parameters() then lines up with its optimiser.
        for key, shape in self.shapes.items():
            self.register_parameter(_name(key), nn.Parameter(torch.empty(members, *shape)))
        if initialise:
            for m in range(members):
                self.load_member_state_dict(m, StreamlinedSequenceGenerator(config).state_dict())

    @classmethod
    def from_models(cls, models: Sequence[StreamlinedSequenceGenerator]) -> StackedGenerators:
        """A stack of these models' weights (same shape; dropout may differ), on their device."""
        config = dataclasses.replace(models[0].config, dropout=0.0)
        for i, model in enumerate(models):
            if dataclasses.replace(model.config, dropout=0.0) != config:
                raise ValueError(f"model {i} has shape {model.config}, model 0 {models[0].config}")
        dropout = [model.config.dropout for model in models]
        stack = cls(models[0].config, len(models), dropout, initialise=False)
        stack.to(next(models[0].parameters()).device)
        for m, model in enumerate(models):
            stack.load_member_state_dict(m, model.state_dict())
        return stack

    def weight(self, key: str) -> nn.Parameter:
        """The stacked parameter of a single model's state_dict key: (M, *shape)."""
        return getattr(self, _name(key))

    def member_config(self, m: int) -> ModelConfig:
        return dataclasses.replace(self.config, dropout=self.dropout[m])

    def member_state_dict(self, m: int) -> dict[str, torch.Tensor]:
        """Member m as StreamlinedSequenceGenerator.state_dict(): same keys, shapes and order.
        Copies, not views: torch.save of a view would write the whole stack."""
        return {key: self.weight(key)[m].detach().clone() for key in self.shapes}

    @torch.no_grad()
    def load_member_state_dict(self, m: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Member m's weights from a StreamlinedSequenceGenerator state dict (a model file's)."""
        missing = [k for k in self.shapes if k not in state_dict]
        unexpected = [k for k in state_dict if k not in self.shapes]
        if missing or unexpected:
            raise ValueError(f"state dict: missing keys {missing}, unexpected keys {unexpected}")
        for key, shape in self.shapes.items():
            if tuple(state_dict[key].shape) != shape:
                raise ValueError(
                    f"state dict: {key} has shape {tuple(state_dict[key].shape)}, the model {shape}"
                )
            self.weight(key)[m].copy_(state_dict[key])

    def forward(
        self,
        params: torch.Tensor,
        targets: torch.Tensor | None,
        ratio: torch.Tensor,
        draws: Draws | None = None,
        seq_len: int | None = None,
    ) -> torch.Tensor:
        """params (M,B,P), targets (M,B,T,K) or None, ratio (M,) -> predictions (M,B,T,K).

        As StreamlinedSequenceGenerator.forward per member, its random draws taken from `draws`:
        noise and dropout in training mode only; the true previous value where a uniform is below
        the member's ratio. Without draws there is no noise or dropout, and every ratio must be 0
        (free-running) or 1 (teacher-forced), which need no draws.
        """
        cfg = self.config
        (M, B, P), K, L, H = params.shape, cfg.n_components, cfg.num_layers, cfg.hidden_size
        T = targets.shape[2] if targets is not None else seq_len
        if T is None:
            raise ValueError("give targets or seq_len")
        dev = params.device

        w = self.weight
        hidden = torch.tanh(_linear(params, w("encoder.0.weight"), w("encoder.0.bias")))
        state = torch.tanh(_linear(hidden, w("encoder.2.weight"), w("encoder.2.bias")))
        state = state.view(M, B, 2, L, H).permute(2, 0, 3, 1, 4)  # (2, M, L, B, H)
        h0, c0 = state[0].contiguous(), state[1].contiguous()

        position = torch.linspace(0.0, 1.0, T, device=dev).view(1, T, 1, 1).expand(M, T, B, 1)
        cond = params.unsqueeze(1).expand(M, T, B, P)
        drawn = self.training and draws is not None  # noise and dropout: training only
        noise_y = draws.noise_y if drawn else torch.zeros(M, T, B, K, device=dev)
        if drawn:
            cond = cond + draws.noise_p
        features = torch.cat([position, noise_y, cond], dim=3)  # (M, T, B, 1 + K + P)

        y_teacher, use_truth = self._teacher(targets, ratio, draws, M, T, B)
        drop = draws.keep if drawn else None

        layer_w = [self.weight("w_hh.0")]
        for layer in range(1, L):
            layer_w += [self.weight(f"{k}.{i}") for k, i in _layer_keys(layer)]
        mm_dtype = (
            torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
        )
        w_in = self.weight("w_in")
        with torch.autocast(dev.type, enabled=False):
            y = autoregressive_lstm(
                mm_dtype,
                features.float(),
                w_in,
                self.weight("b_in"),
                y_teacher,
                use_truth,
                h0.float(),
                c0.float(),
                drop,
                w_in[:, 1 : 1 + K],
                self.weight("head.weight").transpose(1, 2),
                self.weight("head.bias"),
                *layer_w,
            )
        # contiguous: the loss's per-member sums then run over the same layout in a stack of 1 and
        # of M, so a member's sums (and so its training) equal its chain's alone to the bit
        return y.transpose(1, 2).contiguous()  # (M, B, T, K)

    def _teacher(self, targets, ratio, draws, M, T, B) -> tuple[torch.Tensor, torch.Tensor]:
        """y_teacher (M,T,B,K) and use_truth (M,T,B,1) as the single model forms them: zeros for
        a member at ratio 0 or without targets."""
        K, dev = self.config.n_components, ratio.device
        y_teacher = torch.zeros(M, T, B, K, device=dev)
        if targets is None:
            return y_teacher, torch.zeros(M, T, B, 1, device=dev)
        forced = (ratio > 0).view(M, 1, 1, 1)
        y_teacher[:, 1:] = torch.where(forced, targets.transpose(1, 2)[:, :-1], 0.0)
        if draws is not None:
            return y_teacher, (draws.uniform < ratio.view(M, 1, 1, 1)).float()
        if bool(((ratio > 0) & (ratio < 1)).any()):
            raise ValueError("a teacher-forcing ratio between 0 and 1 needs draws")
        return y_teacher, (ratio >= 1).float().view(M, 1, 1, 1).expand(M, T, B, 1)


def _name(key: str) -> str:
    """A state_dict key as a parameter name (dots are not allowed there)."""
    return key.replace(".", "_")


def _layer_keys(layer: int) -> list[tuple[str, int]]:
    """Layer l's weights in the recurrence's order: w_ih_l, w_hh_l, b_l (stored as w_ih.{l-1})."""
    return [("w_ih", layer - 1), ("w_hh", layer), ("b_ih", layer - 1)]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """nn.Linear per member as one batched GEMM: x (M,B,I), weight (M,O,I), bias (M,O) ->
    (M,B,O)."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def neutral_draws(model: StackedGenerators, batch: int, seq_len: int, device) -> Draws:
    """Draws that change nothing (no noise, no teacher forcing, dropout keeping all), shaped as
    `draw` makes them for this model in its mode: the starting contents of static buffers."""
    cfg, M, T, B = model.config, model.members, seq_len, batch
    L, H = cfg.num_layers, cfg.hidden_size
    drops = model.training and L > 1 and any(d > 0 for d in model.dropout)
    return Draws(
        noise_y=torch.zeros(M, T, B, cfg.n_components, device=device),
        noise_p=torch.zeros(M, T, B, cfg.n_params, device=device),
        uniform=torch.ones(M, T, B, 1, device=device),
        keep=torch.ones(M, L - 1, T, B, H, device=device) if drops else None,
    )


def member_draws(
    generator: torch.Generator,
    config: ModelConfig,
    batch: int,
    seq_len: int,
    noise_level: float,
    ratio: float,
    training: bool,
    teacher_forced: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """One member's (noise_y, noise_p, uniform, keep), each None where not drawn, with exactly
    the calls, shapes, order and conditions of StreamlinedSequenceGenerator.forward: a
    generator seeded x gives what that forward draws after torch.manual_seed(x)."""
    T, B, K, P = seq_len, batch, config.n_components, config.n_params
    L, H, dev = config.num_layers, config.hidden_size, generator.device
    noise_y = noise_p = uniform = keep = None
    if training and noise_level > 0:
        noise_y = noise_level * torch.randn(T, B, K, device=dev, generator=generator)
        noise_p = noise_level * torch.randn(T, B, P, device=dev, generator=generator)
    if teacher_forced and ratio > 0:
        uniform = torch.rand(T, B, 1, device=dev, generator=generator)
    if training and config.dropout > 0 and L > 1:
        p = 1.0 - config.dropout
        full = torch.full((L - 1, T, B, H), p, device=dev)
        keep = torch.bernoulli(full, generator=generator) / p
    return noise_y, noise_p, uniform, keep


def draw(
    model: StackedGenerators,
    generators: Sequence[torch.Generator],
    batch: int,
    seq_len: int,
    noise_level: Sequence[float],
    ratio: Sequence[float],
    teacher_forced: bool = True,
    out: Draws | None = None,
) -> Draws:
    """Every member's draws for one forward of `model` in its current mode, member m from
    generators[m] (on the model's device); written into `out` when given (a graph's buffers)."""
    device = model.weight("w_in").device
    out = out if out is not None else neutral_draws(model, batch, seq_len, device)
    fields = ("noise_y", "noise_p", "uniform", "keep")
    neutral = (0.0, 0.0, 1.0, 1.0)
    for m, gen in enumerate(generators):
        cfg = model.member_config(m)
        got = member_draws(
            gen, cfg, batch, seq_len, noise_level[m], ratio[m], model.training, teacher_forced
        )
        for name, value, fill in zip(fields, got, neutral, strict=True):
            buffer = getattr(out, name)
            if buffer is None:
                continue  # keep: no member of this stack drops out
            if value is None:
                buffer[m].fill_(fill)
            else:
                buffer[m].copy_(value)
    return out
