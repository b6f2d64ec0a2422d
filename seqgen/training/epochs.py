"""What one epoch produced (EpochStats) and the bookkeeping across epochs (Progress), which
checkpoints carry so a resumed phase knows everything before it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from seqgen.config import PhaseSettings


@dataclass
class EpochStats:
    """One epoch's numbers: the MLflow metrics and the training_metrics.csv row come from here."""

    epoch: int  # global
    train: tuple[float, float, float]  # (loss, mae, autocorr) averaged over the epoch's steps
    val: tuple[float, float, float]  # free-running
    test: tuple[float, float, float]  # free-running
    val_teacher_forced: float
    lr: float
    teacher_forcing_ratio: float
    grad_norm: float  # mean pre-clip norm over the finite steps
    seconds: float
    nonfinite_steps: int

    def metrics(self) -> dict[str, float]:
        named = {}
        for split in ("train", "val", "test"):
            loss, mae, autocorr = getattr(self, split)
            named |= {f"{split}_loss": loss, f"{split}_mae": mae, f"{split}_autocorr": autocorr}
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
        return [self.epoch, self.train[0], self.val[0], self.test[0], self.lr]


# Logged at step = global epoch, for every strategy.
PER_EPOCH_METRICS = tuple(
    EpochStats(0, (0, 0, 0), (0, 0, 0), (0, 0, 0), 0, 0, 0, 0, 0, 0).metrics()
)


@dataclass
class Progress:
    """What a resumed phase must know about the epochs before it (saved in checkpoints)."""

    best_val: float = float("inf")
    best_epoch: int | None = None
    stale_epochs: int = 0  # epochs since the best validation loss
    nonfinite_in_a_row: int = 0
    history: list[dict] = field(default_factory=list)  # EpochStats as dicts, in order
    stopped: str = ""  # the early-stopping reason, once one applied

    def add(self, stats: EpochStats) -> bool:
        """Record an epoch; True when its validation loss is the best so far."""
        self.history.append(dataclasses.asdict(stats))
        if stats.val[0] < self.best_val:
            self.best_val, self.best_epoch, self.stale_epochs = stats.val[0], stats.epoch, 0
            return True
        self.stale_epochs += 1
        return False


def stop_reason(s: PhaseSettings, p: Progress, stats: EpochStats, grad_norms: list[float]) -> str:
    """The original's early-stopping criteria, each opt-in ("" = go on): more than N epochs
    without a better validation loss; a train/validation gap above the limit; a pre-clip
    gradient norm above the limit.

    The gap is (val_loss_teacher_forced - train_loss) / train_loss: the training loss (fed the
    truth at the epoch's teacher-forcing ratio) against the validation loss fed the truth at
    every step. The free-running validation loss would add exposure bias to the gap."""
    if s.early_stopping_patience and p.stale_epochs > s.early_stopping_patience:
        return "validation_plateau"
    train_loss = stats.train[0]
    if s.overfit_gap is not None and train_loss > 0:
        if (stats.val_teacher_forced - train_loss) / train_loss > s.overfit_gap:
            return "overfitting"
    if s.grad_explosion_norm is not None and grad_norms and max(grad_norms) > s.grad_explosion_norm:
        return "gradient_explosion"
    return ""
