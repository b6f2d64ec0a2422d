"""What one epoch produced (EpochRecord) and the bookkeeping across a phase's epochs (Progress),
which checkpoints carry so a resumed phase knows everything before it; early stopping."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from seqgen.config import PhaseSettings


class Losses(NamedTuple):
    """A loss and its two components, as every strategy reports them."""

    loss: float  # what the strategy trains: alpha * mae + (1 - alpha) * autocorr
    mae: float
    autocorr: float


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
            named |= {f"{split}_{name}": value for name, value in losses._asdict().items()}
        return named | {
            "val_loss_teacher_forced": self.val_teacher_forced,
            "lr": self.lr,
            "teacher_forcing_ratio": self.teacher_forcing_ratio,
            "grad_norm": self.grad_norm,
            "epoch_seconds": self.seconds,
            "nonfinite_steps": self.nonfinite_steps,
        }

    def csv_row(self, components: bool) -> list[float]:
        """The original's columns: with the loss components when the loss has two terms."""
        if components:
            return [self.epoch, *self.train, *self.val, *self.test, self.lr]
        return [self.epoch, self.train.loss, self.val.loss, self.test.loss, self.lr]

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (checkpoints load with weights_only): the losses as lists."""
        d = {f: getattr(self, f) for f in FIELDS}
        return d | {split: list(getattr(self, split)) for split in ("train", "val", "test")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochRecord:
        """From a checkpoint's history; checkpoints before max_grad_norm was kept lack it."""
        d = {k: v for k, v in d.items() if k in FIELDS}
        d.setdefault("max_grad_norm", d.get("grad_norm", math.nan))
        for split in ("train", "val", "test"):
            d[split] = Losses(*d[split])
        return cls(**d)


FIELDS = tuple(f.name for f in dataclasses.fields(EpochRecord))
# What every phase logs at each global epoch, for every strategy.
PER_EPOCH_METRICS = tuple(
    EpochRecord(0, Losses(0, 0, 0), Losses(0, 0, 0), Losses(0, 0, 0), 0, 0, 0, 0, 0, 0, 0).metrics()
)


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
