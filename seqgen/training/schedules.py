"""Pure schedules of the epoch within a phase (0-based `epoch`, `total_epochs` in the phase)."""

from __future__ import annotations

import math

WARMUP_FRACTION = 0.3  # new training warms up over the first 30% of its epochs


def teacher_forcing_ratio(epoch: int, total_epochs: int, start: float, end: float) -> float:
    """Linear decay from `start`, floored at `end`: exactly the original formula."""
    return max(end, start - (start - end) * epoch / total_epochs)


def warmup_cosine_lr(epoch: int, total_epochs: int, start_lr: float, min_lr: float) -> float:
    """Linear warm-up min_lr -> start_lr over 30% of the epochs, then cosine start_lr -> min_lr."""
    warmup = int(WARMUP_FRACTION * total_epochs)
    if epoch < warmup:
        return min_lr + (start_lr - min_lr) * epoch / warmup
    decay_epochs = max(1, total_epochs - 1 - warmup)
    progress = min(1.0, (epoch - warmup) / decay_epochs)
    return min_lr + (start_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_linear_lr(epoch: int, total_epochs: int, start_lr: float, min_lr: float) -> float:
    """Linear warm-up min_lr -> start_lr over 30% of the epochs, then linear start_lr -> min_lr
    (pure autocorrelation's new training in the original)."""
    warmup = int(WARMUP_FRACTION * total_epochs)
    if epoch < warmup:
        return min_lr + (start_lr - min_lr) * epoch / warmup
    return linear_lr(epoch - warmup, total_epochs - warmup, start_lr, min_lr)


def linear_lr(epoch: int, total_epochs: int, start_lr: float, min_lr: float) -> float:
    """Linear decay start_lr -> min_lr, reaching min_lr at the phase's last epoch."""
    return start_lr + (min_lr - start_lr) * epoch / max(1, total_epochs - 1)


LR_SCHEDULES = {
    "warmup_cosine": warmup_cosine_lr,
    "warmup_linear": warmup_linear_lr,
    "linear": linear_lr,
}


def learning_rate(
    scheduler: str, epoch: int, total_epochs: int, start_lr: float, min_lr: float
) -> float:
    return LR_SCHEDULES[scheduler](epoch, total_epochs, start_lr, min_lr)
