"""What one epoch produced (EpochRecord) and the bookkeeping across a phase's epochs (Progress),
which checkpoints carry so a resumed phase knows everything before it; early stopping."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from seqgen.config import PhaseSettings

SEED_TERMS = ("mae", "autocorr")  # the terms of the seed's strategies (alpha weighs them)
# Checkpoints before named terms kept each split's losses as [loss, mae, autocorr].
LEGACY_LOSSES = ("loss", *SEED_TERMS)


@dataclass(frozen=True)
class Losses:
    """The loss a strategy trains and each of its terms, weighted or not."""

    loss: float  # what the strategy trains: sum of weight * term
    terms: dict[str, float]  # {term: value}, in the strategy's order

    def named(self) -> dict[str, float]:
        """{"loss": ..., term: ...}: the quantities of {split}_{quantity}."""
        return {"loss": self.loss, **self.terms}

    @classmethod
    def from_values(cls, names: Sequence[str], values: Sequence[float]) -> Losses:
        """From the total and the terms `names`, in that order."""
        return cls(float(values[0]), dict(zip(names, map(float, values[1:]), strict=True)))

    @classmethod
    def from_saved(cls, saved: dict[str, float] | Sequence[float]) -> Losses:
        """From to_dict's {"loss": ..., term: ...}, or an earlier checkpoint's list."""
        named = (
            dict(saved) if isinstance(saved, dict) else dict(zip(LEGACY_LOSSES, saved, strict=True))
        )
        loss = named.pop("loss")
        return cls(float(loss), {k: float(v) for k, v in named.items()})


@dataclass(frozen=True)
class EpochRecord:
    """One epoch's numbers: the MLflow metrics and the training_metrics.csv row come from here."""

    epoch: int  # global
    train: Losses  # averaged over the epoch's finite steps, as trained (noise, dropout, sampling)
    val: Losses  # free-running
    test: Losses  # free-running
    val_teacher_forced: float  # the validation loss fed the truth at every step
    lr: float
    teacher_forcing_ratio: float
    grad_norm: float  # mean pre-clip norm over the finite steps
    max_grad_norm: float  # the largest pre-clip norm of the epoch (gradient explosion)
    seconds: float
    nonfinite_steps: int

    def metrics(self) -> dict[str, float]:
        """Logged at step = global epoch: {split}_{quantity} and the epoch's schedule values."""
        named = {}
        for split in ("train", "val", "test"):
            losses: Losses = getattr(self, split)
            named |= {f"{split}_{name}": value for name, value in losses.named().items()}
        return named | {
            "val_loss_teacher_forced": self.val_teacher_forced,
            "lr": self.lr,
            "teacher_forcing_ratio": self.teacher_forcing_ratio,
            "grad_norm": self.grad_norm,
            "epoch_seconds": self.seconds,
            "nonfinite_steps": self.nonfinite_steps,
        }

    def csv_row(self, keys: Sequence[str]) -> list[float]:
        """The values of training_metrics.csv's columns (outputs.metrics_columns' keys)."""
        values = self.metrics() | {"epoch": self.epoch}
        return [values[k] for k in keys]

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (checkpoints load with weights_only): the losses as dicts."""
        d = {f: getattr(self, f) for f in FIELDS}
        return d | {split: getattr(self, split).named() for split in ("train", "val", "test")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochRecord:
        """From a checkpoint's history; checkpoints before max_grad_norm was kept lack it."""
        d = {k: v for k, v in d.items() if k in FIELDS}
        d.setdefault("max_grad_norm", d.get("grad_norm", math.nan))
        for split in ("train", "val", "test"):
            d[split] = Losses.from_saved(d[split])
        return cls(**d)


FIELDS = tuple(f.name for f in dataclasses.fields(EpochRecord))


def per_epoch_metrics(terms: Sequence[str]) -> tuple[str, ...]:
    """What a phase whose strategy names `terms` logs at each global epoch."""
    zero = Losses(0.0, dict.fromkeys(terms, 0.0))
    return tuple(EpochRecord(0, zero, zero, zero, 0, 0, 0, 0, 0, 0, 0).metrics())


# What a phase of the seed's strategies (mae, autocorr, combined) logs at each global epoch.
PER_EPOCH_METRICS = per_epoch_metrics(SEED_TERMS)


@dataclass
class Progress:
    """What a resumed phase must know about the epochs before it (saved in checkpoints)."""

    best_val: float = float("inf")
    best_epoch: int | None = None
    stale_epochs: int = 0  # epochs since the best validation loss
    nonfinite_in_a_row: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    stopped: str = ""  # the early-stopping reason, once one applied

    def add(self, record: EpochRecord) -> bool:
        """Record an epoch; True when its validation loss is the best so far."""
        self.history.append(record)
        if record.val.loss < self.best_val:
            self.best_val, self.best_epoch, self.stale_epochs = record.val.loss, record.epoch, 0
            return True
        self.stale_epochs += 1
        return False

    def epochs_left(self, epochs: int) -> range:
        """The phase's epochs (0-based) still to train; none once an early stop applied."""
        return range(epochs, epochs) if self.stopped else range(len(self.history), epochs)

    @property
    def last(self) -> EpochRecord:
        return self.history[-1]

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return fields | {"history": [r.to_dict() for r in self.history]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        return cls(**(d | {"history": [EpochRecord.from_dict(r) for r in d["history"]]}))


def stop_reason(s: PhaseSettings, p: Progress, record: EpochRecord) -> str:
    """The original's early-stopping criteria, each opt-in ("" = go on): more than N epochs
    without a better validation loss; a train/validation gap above the limit; a pre-clip
    gradient norm above the limit.

    The gap is (val_loss_teacher_forced - train_loss) / train_loss: the training loss (fed the
    truth at the epoch's teacher-forcing ratio) against the validation loss fed the truth at
    every step. The free-running validation loss would add exposure bias to the gap."""
    if s.early_stopping_patience and p.stale_epochs > s.early_stopping_patience:
        return "validation_plateau"
    train_loss = record.train.loss
    if s.overfit_gap is not None and train_loss > 0:
        if (record.val_teacher_forced - train_loss) / train_loss > s.overfit_gap:
            return "overfitting"
    if s.grad_explosion_norm is not None and record.max_grad_norm > s.grad_explosion_norm:
        return "gradient_explosion"
    return ""
