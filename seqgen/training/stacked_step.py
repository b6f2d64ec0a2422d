"""One optimiser step and one evaluation pass for a stack of chains (seqgen/model/stacked.py).

Each member is a chain with its own settings and state, and what happens to it is what
seqgen/training/step.py does to a single model: AdamW with torch's defaults (StackedAdamW), its
gradients clipped by its own total norm as clip_grad_norm_ does, under fp16 its own GradScaler
(StackedGradScaler), a non-finite loss or gradient skipping its update alone, and a frozen member
(one that stopped early) left untouched. Every decision is a tensor operation with a member mask,
never a Python branch on a value, so the whole step runs without a host sync and, on CUDA, as one
graph (StackedStepGraphs) that runs the same functions as the eager step. Optimiser and scaler
state convert to and from torch's per-model formats, so checkpoints store them per member as
today.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from seqgen.model.stacked import Draws, StackedGenerators, draw, neutral_draws
from seqgen.training.graphs import Capture, GraphSet
from seqgen.training.losses import LossResult, Objective
from seqgen.training.step import EVAL_BATCH, Precision, StepResult

# torch.optim.AdamW's defaults, which the trainer uses
BETAS, EPS = (0.9, 0.999), 1e-8


def _per_member(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(M,) -> (M, 1, ...) broadcasting over a stacked tensor like (M, ...)."""
    return x.view(-1, *[1] * (like.dim() - 1))


def _adamw_group(lr: float, weight_decay: float, n_params: int) -> dict:
    """torch.optim.AdamW's param_group, as its state_dict() writes it for a single model."""
    return copy.deepcopy(_adamw_group_of(n_params)) | {"lr": lr, "weight_decay": weight_decay}


@functools.cache  # a new torch optimiser takes about 25 ms, and every checkpoint of a member asks
def _adamw_group_of(n_params: int) -> dict:
    placeholders = [torch.nn.Parameter(torch.zeros(0)) for _ in range(n_params)]
    optimizer = torch.optim.AdamW(placeholders, lr=1e-3, weight_decay=0.0, betas=BETAS, eps=EPS)
    return optimizer.state_dict()["param_groups"][0]


class StackedAdamW:
    """torch.optim.AdamW (single-tensor algorithm, torch's betas and eps) for each member, with
    lr and weight decay (M,) per member, and a step that updates only the members a mask names.

    Its coefficients are formed in float64 and cast once, as torch forms them from Python floats,
    so on the CPU a member's update is torch's to the bit. State is allocated at construction
    (a CUDA graph must find it in place); a member's step count says whether it has state yet."""

    def __init__(
        self, params: Sequence[torch.Tensor], lr: Sequence[float], weight_decay: Sequence[float]
    ):
        self.params = list(params)  # (M, ...) each, in the single model's parameter order
        dev = self.params[0].device
        self.lr = torch.tensor(lr, dtype=torch.float64, device=dev)
        self.weight_decay = torch.tensor(weight_decay, dtype=torch.float64, device=dev)
        self.steps = torch.zeros_like(self.lr)  # (M,) updates made
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def set_lr(self, lr: Sequence[float] | torch.Tensor) -> None:
        """The members' learning rates (M,), in place (a captured graph reads this tensor)."""
        self.lr.copy_(torch.as_tensor(lr, dtype=torch.float64))

    @torch.no_grad()
    def step(self, update: torch.Tensor) -> None:
        """One AdamW update of the members where update (M,) bool is True, from p.grad; the
        others' weights and state do not change (their gradients may be anything, NaN too)."""
        beta1, beta2 = BETAS
        steps = self.steps + update
        n = steps.clamp(min=1)  # a member not updated yet: any finite coefficient will do
        decay = (1 - self.lr * self.weight_decay).float()
        neg_step_size = (-(self.lr / (1 - beta1**n))).float()
        bias_correction2_sqrt = (1 - beta2**n).sqrt().float()
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            g = p.grad
            m_new = torch.lerp(m, g, 1 - beta1)
            v_new = (v * beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v_new.sqrt() / _per_member(bias_correction2_sqrt, p)).add_(EPS)
            # torch: p.mul_(1 - lr * wd), then p.addcdiv_(m, denom, value=-step_size), which
            # computes p + (value * m) / denom
            p_new = p * _per_member(decay, p) + _per_member(neg_step_size, p) * m_new / denom
            keep = _per_member(update, p)
            p.copy_(torch.where(keep, p_new, p))
            m.copy_(torch.where(keep, m_new, m))
            v.copy_(torch.where(keep, v_new, v))
        self.steps.copy_(steps)

    def member_state_dict(self, m: int) -> dict:
        """Member m's state as torch.optim.AdamW(single_model.parameters()).state_dict()."""
        n = int(self.steps[m])
        state = {}
        if n > 0:  # torch creates a parameter's state at its first step
            for i, (avg, avg_sq) in enumerate(zip(self.exp_avg, self.exp_avg_sq, strict=True)):
                state[i] = {
                    "step": torch.tensor(float(n)),
                    "exp_avg": avg[m].clone(),
                    "exp_avg_sq": avg_sq[m].clone(),
                }
        lr, wd = float(self.lr[m]), float(self.weight_decay[m])
        return {"state": state, "param_groups": [_adamw_group(lr, wd, len(self.params))]}

    @torch.no_grad()
    def load_member_state_dict(self, m: int, state_dict: dict) -> None:
        """Member m's state from a single model's AdamW state_dict (a checkpoint's); as torch's
        load_state_dict, its lr and weight decay come with it."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(
                f"optimizer state: {len(groups)} groups of {[len(g['params']) for g in groups]} "
                f"parameters, the stack has one group of {len(self.params)}"
            )
        group = groups[0]
        if tuple(group["betas"]) != BETAS or group["eps"] != EPS or group.get("amsgrad"):
            raise ValueError(
                f"optimizer state: betas {group['betas']}, eps {group['eps']}, amsgrad "
                f"{group.get('amsgrad')}; the stack runs AdamW's defaults"
            )
        self.lr[m], self.weight_decay[m] = group["lr"], group["weight_decay"]
        state = state_dict["state"]
        self.steps[m] = float(state[0]["step"]) if state else 0.0
        for i, (avg, avg_sq) in enumerate(zip(self.exp_avg, self.exp_avg_sq, strict=True)):
            avg[m].copy_(state[i]["exp_avg"] if state else 0.0)
            avg_sq[m].copy_(state[i]["exp_avg_sq"] if state else 0.0)


class StackedGradScaler:
    """torch.amp.GradScaler (its defaults for init scale, growth, backoff and interval) per
    member: a member whose gradients overflow skips its step and backs off alone."""

    def __init__(self, members: int, device: torch.device | str, enabled: bool):
        self.enabled = enabled
        defaults = torch.amp.GradScaler("cpu").state_dict()  # torch's defaults, one place
        self.growth_factor = defaults["growth_factor"]
        self.backoff_factor = defaults["backoff_factor"]
        self.growth_interval = defaults["growth_interval"]
        self.scale = torch.full((members,), defaults["scale"], device=device)
        self.growth_tracker = torch.zeros(members, dtype=torch.int32, device=device)

    def is_enabled(self) -> bool:
        return self.enabled

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """loss (M,) times each member's scale (unchanged when disabled)."""
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Gradients (M, ...) divided by each member's scale, in place; found_inf (M,) bool:
        a member with a non-finite gradient (as GradScaler.unscale_ finds it)."""
        found_inf = torch.zeros_like(self.growth_tracker, dtype=torch.bool)
        if not self.enabled:
            return found_inf
        inv_scale = self.scale.double().reciprocal().float()  # as GradScaler forms it
        for g in grads:
            found_inf |= ~g.isfinite().flatten(1).all(dim=1)
            g.mul_(_per_member(inv_scale, g))
        return found_inf

    @torch.no_grad()
    def update(self, found_inf: torch.Tensor, active: torch.Tensor) -> None:
        """GradScaler.update per member where active (M,) bool: back off after an overflow, grow
        after growth_interval clean steps in a row (if the grown scale is finite)."""
        if not self.enabled:
            return
        tracker = self.growth_tracker + 1
        grow = ~found_inf & (tracker == self.growth_interval)
        grown = self.scale * self.growth_factor
        scale = torch.where(grow & grown.isfinite(), grown, self.scale)
        scale = torch.where(found_inf, self.scale * self.backoff_factor, scale)
        tracker = torch.where(found_inf | grow, 0, tracker).to(torch.int32)
        self.scale.copy_(torch.where(active, scale, self.scale))
        self.growth_tracker.copy_(torch.where(active, tracker, self.growth_tracker))

    def member_state_dict(self, m: int) -> dict:
        """Member m's state as torch.amp.GradScaler.state_dict(): {} when disabled."""
        if not self.enabled:
            return {}
        return {
            "scale": float(self.scale[m]),
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "_growth_tracker": int(self.growth_tracker[m]),
        }

    def load_member_state_dict(self, m: int, state: dict) -> str:
        """Member m's scale from a checkpoint's GradScaler state; a note as load_scaler_state
        (seqgen/training/step.py) gives one: a state without a scaler starts a fresh one."""
        if not self.enabled:
            return ""
        if not state:
            return f"the checkpoint has no GradScaler state: starting at scale {self.scale[m]:g}"
        ours = (self.growth_factor, self.backoff_factor, self.growth_interval)
        theirs = (state["growth_factor"], state["backoff_factor"], state["growth_interval"])
        if theirs != ours:
            raise ValueError(f"GradScaler state: growth, backoff, interval {theirs}, not {ours}")
        self.scale[m], self.growth_tracker[m] = state["scale"], state["_growth_tracker"]
        return ""


@dataclass
class StackedPrecision:
    """Precision's choice (autocast dtype or None) for a stack, with a per-member GradScaler."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: StackedGradScaler
    note: str

    def autocast(self):
        """As Precision.autocast: no weight cache."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)


def stacked_precision(precision: Precision, members: int) -> StackedPrecision:
    """The stack's precision from the one choose_precision picks for a single chain."""
    scaler = StackedGradScaler(members, precision.device, precision.scaler.is_enabled())
    return StackedPrecision(precision.device, precision.dtype, scaler, precision.note)


@dataclass
class StackedStepResult:
    """A stacked step's outcome per member, (M,) tensors on the stack's device."""

    losses: torch.Tensor  # (M, 1 + terms): the total, then each term of the objective
    grad_norm: torch.Tensor  # before clipping; non-finite after an fp16 overflow
    finite: torch.Tensor  # bool: StepResult.finite (False: a non-finite loss or gradient)
    stepped: torch.Tensor  # bool: the member's weights were updated

    @property
    def loss(self) -> torch.Tensor:
        """(M,) what each member trains."""
        return self.losses[:, 0]

    def members(self, names: Sequence[str]) -> list[StepResult]:
        """Today's StepResult for each member, the terms `names` (the objective's) named (one
        transfer from the device)."""
        rows = torch.cat([self.losses, self.grad_norm.unsqueeze(1)], dim=1).cpu().tolist()
        finite = self.finite.cpu()
        return [
            StepResult(row[0], dict(zip(names, row[1:-1], strict=True)), row[-1], bool(ok))
            for row, ok in zip(rows, finite, strict=True)
        ]


def forward_backward(
    model: StackedGenerators,
    loss_fn: Objective,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor, Draws]],
    precision: StackedPrecision,
    ratio: torch.Tensor,
) -> torch.Tensor:
    """Scaled gradients accumulated over micro-batches [(params (M,B,P), targets (M,B,T,K),
    draws)] into p.grad, as optimizer_step accumulates them; the mean (loss, *terms) per
    member (M, 1 + terms). Members' losses are summed for one backward: each member's weights
    reach only its own loss, so each gets its own gradient."""
    n = len(micro_batches)
    totals = torch.zeros(model.members, loss_fn.width, device=ratio.device)
    for params, targets, draws in micro_batches:
        with precision.autocast():
            result = loss_fn(model(params, targets, ratio, draws), targets)
        precision.scaler.scale_loss(result.total / n).sum().backward()
        totals += result.columns() / n
    return totals


def member_grad_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each member's total 2-norm over all its gradients, as clip_grad_norm_ computes it: (M,)."""
    norms = [torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms), dim=0)


def apply_update(
    model: StackedGenerators,
    optimizer: StackedAdamW,
    precision: StackedPrecision,
    totals: torch.Tensor,
    clip_grad_norm: torch.Tensor,
    frozen: torch.Tensor,
) -> StackedStepResult:
    """After forward_backward: unscale, clip each member to its own norm, update the members
    whose loss and gradients are finite and that are not frozen, then the scalers of the members
    not frozen. Tensor operations only: no host sync, so it can be part of a CUDA graph."""
    grads = [p.grad for p in model.parameters()]
    found_inf = precision.scaler.unscale_(grads)
    grad_norm = member_grad_norms(grads)
    # clip_grad_norm_: max_norm / (total + 1e-6), which torch computes as a reciprocal times
    clip_coef = ((grad_norm + 1e-6).reciprocal() * clip_grad_norm).clamp(max=1.0)
    for g in grads:
        g.mul_(_per_member(clip_coef, g))
    # As optimizer_step: under fp16 an overflow is the scaler's business (skipped, backed off);
    # otherwise a non-finite loss or gradient skips the update and the caller counts it.
    finite = totals.isfinite().all(dim=1)
    if not precision.scaler.is_enabled():
        finite = finite & grad_norm.isfinite()
    stepped = finite & ~found_inf & ~frozen
    optimizer.step(stepped)
    precision.scaler.update(found_inf, ~frozen)
    return StackedStepResult(totals, grad_norm, finite, stepped)


def member_tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-member values (a sequence or a tensor) as an (M,) tensor on the device."""
    return torch.as_tensor(values, dtype=dtype).to(device)


def stacked_step(
    model: StackedGenerators,
    loss_fn: Objective,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    optimizer: StackedAdamW,
    precision: StackedPrecision,
    generators: Sequence[torch.Generator],
    ratio: Sequence[float],
    noise_level: Sequence[float],
    clip_grad_norm: Sequence[float],
    frozen: Sequence[bool] | None = None,
    graphs: StackedStepGraphs | None = None,
) -> StackedStepResult:
    """One optimiser step of every member over micro-batches [(params (M,B,P), targets
    (M,B,T,K))], accumulated; member m draws from generators[m] in the order a single chain
    draws. ratio, noise_level, clip_grad_norm, frozen: per member (M,). A single batch runs as
    one CUDA-graph replay when given graphs."""
    dev = precision.device
    frozen = frozen if frozen is not None else [False] * model.members
    frozen_t = member_tensor(frozen, torch.bool, dev)
    clip_t = member_tensor(clip_grad_norm, torch.float32, dev)
    if graphs is not None and len(micro_batches) == 1:
        params, targets = micro_batches[0]
        return graphs.step(params, targets, generators, ratio, noise_level, clip_t, frozen_t)
    ratio_t = member_tensor(ratio, torch.float32, dev)
    for p in model.parameters():
        p.grad = None
    micro = [
        (p, y, draw(model, generators, y.shape[1], y.shape[2], noise_level, ratio))
        for p, y in micro_batches
    ]
    totals = forward_backward(model, loss_fn, micro, precision, ratio_t)
    return apply_update(model, optimizer, precision, totals, clip_t, frozen_t)


class StackedStepGraphs:
    """CUDA: a whole stacked training step (forward, backward, unscaling, clipping, AdamW and
    the scalers: forward_backward then apply_update, the functions the eager step runs) captured
    as one CUDA graph per batch shape and replayed; each new shape is warmed up eagerly before its
    capture (seqgen/training/graphs.py), the last batch of an epoch too. Its inputs are static
    tensors (batch, and shared by every graph of the stack: ratio, clipping norms, frozen mask,
    the optimiser's lr and weight decay); the random draws are made eagerly from each member's
    generator into static buffers before every replay, so a graphed step draws exactly what an
    eager one draws. Gradient accumulation runs eagerly."""

    def __init__(
        self,
        model,
        loss_fn,
        optimizer: StackedAdamW,
        precision: StackedPrecision,
        capture: Capture | None = None,
    ):
        self.model, self.loss_fn = model, loss_fn
        self.optimizer, self.precision = optimizer, precision
        self.graphs = GraphSet(capture)
        M, dev = model.members, optimizer.lr.device
        self.ratio, self.clip = torch.zeros(M, device=dev), torch.ones(M, device=dev)
        self.frozen = torch.ones(M, dtype=torch.bool, device=dev)
        self._ratio_host: list[float] | None = None  # what self.ratio holds

    def step(self, params, targets, generators, ratio, noise_level, clip, frozen):
        """stacked_step's single-batch step as one replay; ratio and noise_level as sequences
        (the draws need them on the host), clip and frozen (M,) tensors on the device. Nothing
        here waits for the device: the ratio goes to it only when it changes (each epoch)."""
        B, T = targets.shape[1:3]
        key = (self.model.members, B, T, self.precision.dtype)
        static, graph = self.graphs.get(key, lambda: self._make(params, targets))
        static["params"].copy_(params)
        static["targets"].copy_(targets)
        if self._ratio_host != list(ratio):
            self.ratio.copy_(torch.as_tensor(ratio, dtype=torch.float32))
            self._ratio_host = list(ratio)
        self.clip.copy_(clip)
        self.frozen.copy_(frozen)
        draw(self.model, generators, B, T, noise_level, ratio, out=static["draws"])
        graph.replay()
        result, _ = graph.outputs
        return StackedStepResult(*(x.clone() for x in result))  # the next replay overwrites them

    def _make(self, params: torch.Tensor, targets: torch.Tensor):
        """Static inputs and the step's body over them. Every member is frozen until the first
        real step fills the mask in: the warm-up (and the CPU stand-in's capture, which runs)
        changes no weight, optimiser or scaler state."""
        static = {
            "params": params.clone(),
            "targets": targets.clone(),
            "draws": neutral_draws(self.model, targets.shape[1], targets.shape[2], params.device),
        }
        self.frozen.fill_(True)
        parameters = list(self.model.parameters())

        def body():
            for p in parameters:
                p.grad = None  # the graph's backward allocates the gradients it writes
            micro = [(static["params"], static["targets"], static["draws"])]
            totals = forward_backward(self.model, self.loss_fn, micro, self.precision, self.ratio)
            result = apply_update(
                self.model, self.optimizer, self.precision, totals, self.clip, self.frozen
            )
            fields = [getattr(result, f.name) for f in dataclasses.fields(result)]
            return fields, [p.grad for p in parameters]  # the gradients live with the graph

        return static, body


@torch.no_grad()
def evaluate_stacked(
    model: StackedGenerators,
    loss_fn: Objective,
    params: torch.Tensor,
    targets: torch.Tensor,
    ratio: float,
    precision: StackedPrecision,
) -> LossResult:
    """Each member's mean loss over a split, params (M,N,P), targets (M,N,T,K) (expand a split
    the members share): free-running at ratio 0, teacher-forced at 1, as evaluate_loss. Returns
    LossResult of (M,) tensors on the device, read by the caller when it needs them (no host
    sync per batch). Eager, not graphed: without draws the forward checks its ratio on the host."""
    model.eval()
    M, N = params.shape[:2]
    ratio_t = torch.full((M,), float(ratio), device=params.device)
    sums = torch.zeros(M, loss_fn.width, device=params.device)
    for i in range(0, N, EVAL_BATCH):
        p, y = params[:, i : i + EVAL_BATCH], targets[:, i : i + EVAL_BATCH]
        with precision.autocast():
            result = loss_fn(model(p, y, ratio_t), y)
        sums += result.columns() * p.shape[1]
    model.train()
    means = sums / N
    return LossResult(means[:, 0], dict(zip(loss_fn.names, means[:, 1:].unbind(1), strict=True)))
