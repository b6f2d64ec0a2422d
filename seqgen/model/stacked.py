"""Many generators of one shape as one stacked model: every weight has a leading member dimension M.

Chains of a study that are at the same phase train in one process as one StackedGenerators: one
batched GEMM per layer-step serves every member instead of one small GEMM each, which is what a
launch-bound step needs (docs/design.md, issue #14). Nothing here is written twice: the stack's
weights are the single model's (torch.func.stack_module_state) and its forward is the single
model's forward under torch.func.vmap over members (functional_call), whatever the cell; the
LSTM's recurrences take the vmapped dimension as their member dimension. A member is a chain: its
weights, its dropout, and its own random draws (`draw`, from its own torch.Generator, exactly as
StreamlinedSequenceGenerator.forward draws them from the global RNG), so a member trained in the
stack equals the same chain trained alone. Per member its state dict is the single model's, key for
key, so model files and checkpoints do not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from seqgen.model.generator import (
    Draws,
    ModelConfig,
    StreamlinedSequenceGenerator,
    current_keys,
    member_draws,
)


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
        with torch.device("meta"):  # the module whose forward every member runs (no weights)
            self.template = [StreamlinedSequenceGenerator(config)]  # a list: not a submodule
        self.shapes = {k: tuple(v.shape) for k, v in self.template[0].state_dict().items()}
        if initialise:  # member m as the m-th of M single models built in a row
            weights, _ = stack_module_state(
                [StreamlinedSequenceGenerator(config) for _ in range(members)]
            )
        else:
            weights = {k: torch.empty(members, *shape) for k, shape in self.shapes.items()}
        # Registered in the single model's order: parameters() then lines up with its optimiser.
        for key in self.shapes:
            self.register_parameter(_name(key), nn.Parameter(weights[key].detach()))

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
        state_dict = current_keys(state_dict)
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

        StreamlinedSequenceGenerator.forward per member, its random draws taken from `draws`
        (M,...) each: noise and dropout in training mode only; the true previous value where a
        uniform is below the member's ratio. Without draws there is no noise or dropout, and every
        ratio must be 0 (free-running) or 1 (teacher-forced), which need no draws.
        """
        (M, B, _), T = params.shape, targets.shape[2] if targets is not None else seq_len
        if T is None:
            raise ValueError("give targets or seq_len")
        if draws is None:
            if bool(((ratio > 0) & (ratio < 1)).any()):
                raise ValueError("a teacher-forcing ratio between 0 and 1 needs draws")
            # uniform 0: below every ratio but 0, so a member at ratio 1 is fed the truth
            draws = Draws(uniform=torch.zeros(M, T, B, 1, device=params.device))
        template = self.template[0].train(self.training)
        weights = {key: self.weight(key) for key in self.shapes}

        def member(weights, params, targets, ratio, *drawn):
            args = (params, targets, ratio, 0.0, T)
            return functional_call(template, weights, args, {"draws": Draws(*drawn)})

        inputs = (weights, params, targets, ratio, *draws)
        dims = tuple(None if x is None else 0 for x in inputs)
        # contiguous: the loss's per-member sums then run over the same layout in a stack of 1 and
        # of M, so a member's sums (and so its training) equal its chain's alone to the bit
        return vmap(member, in_dims=dims)(*inputs).contiguous()


def _name(key: str) -> str:
    """A state_dict key as a parameter name (dots are not allowed there)."""
    return key.replace(".", "_")


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
    generators[m] (on the model's device). Without `out` a field no member draws is None and a
    stack of one gets its member's tensors as they are (no copy); with `out` (a graph's static
    buffers) every member's draws are written into it, the neutral value where it draws none."""
    drawn = [
        member_draws(
            gen,
            model.member_config(m),
            batch,
            seq_len,
            noise_level[m],
            ratio[m],
            model.training,
            teacher_forced,
        )  # fmt: skip
        for m, gen in enumerate(generators)
    ]
    if out is None:
        fields = zip(*drawn, strict=True)  # per field, every member's
        return Draws(*(_stack(values, fill) for values, fill in zip(fields, NEUTRAL, strict=True)))
    for name, fill in zip(Draws._fields, NEUTRAL, strict=True):
        buffer = getattr(out, name)
        if buffer is None:
            continue  # keep: no member of this stack drops out
        for m, got in enumerate(drawn):
            value = getattr(got, name)
            if value is None:
                buffer[m].fill_(fill)
            else:
                buffer[m].copy_(value)
    return out


NEUTRAL = Draws(noise_y=0.0, noise_p=0.0, uniform=1.0, keep=1.0)  # draws that change nothing


def _stack(values: Sequence[torch.Tensor | None], fill: float) -> torch.Tensor | None:
    """Members' draws of one field as (M, ...): None where no member draws it, the neutral
    value for a member that does not."""
    if all(v is None for v in values):
        return None
    if len(values) == 1:
        return values[0][None]
    like = next(v for v in values if v is not None)
    return torch.stack([torch.full_like(like, fill) if v is None else v for v in values])
