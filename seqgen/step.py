"""One optimiser step and one evaluation pass, under the precision the device supports."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from seqgen.losses import LossResult
from seqgen.model import StreamlinedSequenceGenerator

EVAL_BATCH = 512


@dataclass
class Precision:
    """Mixed precision on one device: an autocast dtype (or None) and a GradScaler (fp16 only)."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    note: str

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def choose_precision(device: torch.device, enabled: bool) -> Precision:
    """CUDA: fp16 autocast + GradScaler. CPU: bf16 autocast where the CPU has bf16, else off."""
    off = torch.amp.GradScaler(device.type, enabled=False)
    if not enabled:
        return Precision(device, None, off, "mixed precision off (--no_mixed_precision)")
    if device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
        return Precision(device, torch.float16, scaler, "mixed precision: CUDA fp16 + GradScaler")
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return Precision(device, torch.bfloat16, off, "mixed precision: CPU bf16 autocast")
    return Precision(device, None, off, "mixed precision off: this CPU has no bf16 support")


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> str:
    """Restore a checkpoint's GradScaler state into this device's scaler; returns a note ("" when
    restored as saved).

    A checkpoint made without a GradScaler (CPU, or mixed precision off) holds an empty state,
    which an enabled scaler refuses (torch raises): a CPU checkpoint resumed on CUDA starts a fresh
    scaler instead. The reverse needs nothing: a disabled scaler ignores any state."""
    if not scaler.is_enabled():
        return ""
    if not state:
        return f"the checkpoint has no GradScaler state: starting at scale {scaler.get_scale():g}"
    scaler.load_state_dict(state)
    return ""


@dataclass
class StepResult:
    loss: float
    mae: float
    autocorr: float
    grad_norm: float  # before clipping
    finite: bool


def optimizer_step(
    model: StreamlinedSequenceGenerator,
    loss_fn,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    ratio: float,
    noise_level: float,
    clip_grad_norm: float,
) -> StepResult:
    """One optimiser step over micro-batches [(params (B,P), targets (B,T,K))], accumulated."""
    optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(3)
    for params, targets in micro_batches:
        with precision.autocast():
            result = loss_fn(model(params, targets, ratio, noise_level), targets)
        precision.scaler.scale(result.total / len(micro_batches)).backward()
        totals += torch.stack([r.detach().float().cpu() for r in result]) / len(micro_batches)
    precision.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm).item()
    # Under fp16 an overflowing gradient is the GradScaler's business (it skips and rescales);
    # otherwise a non-finite loss or gradient skips the update and the caller counts it.
    finite = bool(torch.isfinite(totals).all()) and (
        bool(np.isfinite(grad_norm)) or precision.scaler.is_enabled()
    )
    if finite:
        precision.scaler.step(optimizer)
    precision.scaler.update()
    return StepResult(*totals.tolist(), grad_norm, finite)


@torch.no_grad()
def evaluate_loss(
    model, loss_fn, params, targets, ratio: float, precision: Precision
) -> LossResult:
    """Mean loss over a split: free-running at ratio 0, teacher-forced at ratio 1."""
    model.eval()
    sums = torch.zeros(3)
    for i in range(0, len(params), EVAL_BATCH):
        p, y = params[i : i + EVAL_BATCH], targets[i : i + EVAL_BATCH]
        with precision.autocast():
            result = loss_fn(model(p, y, ratio), y)
        sums += torch.stack([r.float().cpu() for r in result]) * len(p)
    model.train()
    return LossResult(*(sums / len(params)).tolist())


def seed_epoch(seed: int, global_epoch: int) -> torch.Generator:
    """Every random draw of an epoch derives from (seed, epoch), so a resume replays it exactly."""
    torch.manual_seed(seed * 1_000_003 + global_epoch)  # sampling, noise, dropout
    return torch.Generator().manual_seed(seed * 7_919 + global_epoch)  # batch order
