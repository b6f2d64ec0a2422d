"""The three loss strategies, side by side: each returns a total and the same named components."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

DEFAULT_MAX_LAG = 10  # the original scripts' default
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
    """A loss strategy: alpha * MAE + (1 - alpha) * autocorrelation. The strategies themselves
    are data, side by side in experiments/phases.toml (mae: alpha 1, autocorr: 0, combined: 0.5),
    so the trainer never branches on a strategy's name. Every strategy reports both components;
    pure MAE computes the autocorrelation term without a gradient, only to report it."""

    def __init__(self, alpha: float, max_lag: int):
        super().__init__()
        self.alpha = alpha
        self.combined = CombinedMAEAutocorrLoss(alpha, max_lag)

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> LossResult:
        if self.alpha < 1.0:
            return LossResult(*self.combined(y_pred, y_true))
        mae = self.combined.mae_loss(y_pred.float(), y_true.float())
        with torch.no_grad():  # reported, not trained: short sequences report what lags they have
            lag = min(self.combined.autocorr_loss.max_lag, y_true.shape[1] - 1)
            autocorr = AutocorrelationLoss(lag)(y_pred.detach(), y_true)
        return LossResult(mae, mae, autocorr)


def make_loss(alpha: float, max_lag: int) -> Strategy:
    """The loss of a strategy with MAE weight `alpha` and autocorrelation lags 1..max_lag."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within 0..1, got {alpha}")
    return Strategy(alpha, max_lag)
