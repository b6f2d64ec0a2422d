"""The three loss strategies, side by side: each returns a total and the same named components."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

DEFAULT_MAX_LAG = 10  # used to report the autocorrelation component when a strategy has no lag
VARIANCE_FLOOR = 1e-6  # keeps r_k and its gradient finite for (near-)constant sequences


class LossResult(NamedTuple):
    total: torch.Tensor  # scalar that is backpropagated
    mae: torch.Tensor  # scalar, reported for every strategy
    autocorr: torch.Tensor  # scalar, reported for every strategy


def autocorrelation(x: torch.Tensor, max_lag: int) -> torch.Tensor:
    """Normalised autocorrelation r_1..r_max_lag per sample and component: (B,T,K) -> (B,L,K)."""
    x = x.float()  # sums of squares over 151 steps lose too much in bf16/fp16
    centred = x - x.mean(dim=1, keepdim=True)
    variance = (centred * centred).sum(dim=1).clamp_min(VARIANCE_FLOOR)  # (B, K)
    lags = [(centred[:, :-k] * centred[:, k:]).sum(dim=1) for k in range(1, max_lag + 1)]
    return torch.stack(lags, dim=1) / variance.unsqueeze(1)


class AutocorrelationLoss(nn.Module):
    """Mean |r_k(pred) - r_k(true)| over lags 1..max_lag, components and batch."""

    def __init__(self, max_lag: int = DEFAULT_MAX_LAG):
        super().__init__()
        self.max_lag = max_lag

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        seq_len = y_true.shape[1]
        if self.max_lag >= seq_len:
            raise ValueError(f"max_lag {self.max_lag} must be below the sequence length {seq_len}")
        with torch.autocast(y_pred.device.type, enabled=False):
            diff = autocorrelation(y_pred, self.max_lag) - autocorrelation(y_true, self.max_lag)
            return diff.abs().mean()


class CombinedMAEAutocorrLoss(nn.Module):
    """alpha * MAE + (1 - alpha) * autocorrelation; returns (combined, mae, autocorr)."""

    def __init__(self, alpha: float = 0.5, max_lag: int = DEFAULT_MAX_LAG):
        super().__init__()
        self.alpha = alpha
        self.mae_loss = nn.L1Loss()
        self.autocorr_loss = AutocorrelationLoss(max_lag=max_lag)

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor):
        mae = self.mae_loss(y_pred.float(), y_true.float())
        autocorr = self.autocorr_loss(y_pred, y_true)
        combined = self.alpha * mae + (1 - self.alpha) * autocorr
        return combined, mae, autocorr


class Strategy(nn.Module):
    """One strategy's loss: backpropagate `total`; `mae` and `autocorr` are always reported."""

    def __init__(self, alpha: float, max_lag: int | None):
        super().__init__()
        self.combined = CombinedMAEAutocorrLoss(alpha, max_lag or DEFAULT_MAX_LAG)

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> LossResult:
        return LossResult(*self.combined(y_pred, y_true))


# alpha is the weight of MAE: pure MAE is alpha 1, pure autocorrelation alpha 0.
STRATEGY_ALPHA = {"mae": 1.0, "autocorr": 0.0, "combined": 0.5}


def make_loss(strategy: str, alpha: float | None = None, max_lag: int | None = None) -> Strategy:
    """The registry: every strategy is the combined loss at its own alpha."""
    if strategy not in STRATEGY_ALPHA:
        raise ValueError(
            f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGY_ALPHA)}"
        )
    return Strategy(STRATEGY_ALPHA[strategy] if alpha is None else alpha, max_lag)
