"""The three loss strategies, side by side: each returns a total and the same named components."""

from __future__ import annotations

from collections.abc import Sequence
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


class StackedStrategies(nn.Module):
    """The losses of a stack of M chains at once: member m's is make_loss(alpha[m], max_lag[m])
    on its slice. Lags beyond a member's max_lag carry no weight; a pure MAE member (alpha 1)
    reports its autocorrelation without training it, over the lags its sequence has, as
    Strategy does. (M,B,T,K) predictions and targets -> LossResult of (M,) tensors."""

    def __init__(self, alpha: Sequence[float], max_lag: Sequence[int]):
        super().__init__()
        for a in alpha:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha must be within 0..1, got {a}")
        if len(alpha) != len(max_lag):
            raise ValueError(f"{len(alpha)} alpha values for {len(max_lag)} max_lag values")
        self.alpha, self.max_lag = tuple(float(a) for a in alpha), tuple(int(k) for k in max_lag)
        self._constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """alpha, 1 - alpha (each from the float, as Strategy computes it), trained (alpha < 1)
        and max_lag, all (M,); made once per device, outside any CUDA-graph capture."""
        if device not in self._constants:
            self._constants[device] = (
                torch.tensor(self.alpha, device=device),
                torch.tensor([1 - a for a in self.alpha], device=device),
                torch.tensor([a < 1.0 for a in self.alpha], device=device),
                torch.tensor(self.max_lag, device=device),
            )
        return self._constants[device]

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> LossResult:
        M, B, T, K = y_true.shape
        top = 0  # the most lags any member counts
        for a, lag in zip(self.alpha, self.max_lag, strict=True):
            if a < 1.0 and lag >= T:
                raise ValueError(f"max_lag {lag} must be below the sequence length {T}")
            top = max(top, min(lag, T - 1))
        alpha, one_minus, trained, max_lag = self.constants(y_pred.device)
        lags = max_lag.clamp(max=T - 1)  # (M,) lags counted: trained members have all theirs
        mae = (y_pred.float() - y_true.float()).abs().mean(dim=(1, 2, 3))
        with torch.autocast(y_pred.device.type, enabled=False):
            r_pred = autocorrelation(y_pred.reshape(M * B, T, K), top).view(M, B, top, K)
            r_true = autocorrelation(y_true.reshape(M * B, T, K), top).view(M, B, top, K)
            counted = torch.arange(1, top + 1, device=y_pred.device) <= lags.view(M, 1)
            diff = torch.where(counted.view(M, 1, top, 1), (r_pred - r_true).abs(), 0.0)
            autocorr = diff.sum(dim=(1, 2, 3)) / (lags * (B * K))
        trained_autocorr = torch.where(trained, autocorr, autocorr.detach())
        total = torch.where(trained, alpha * mae + one_minus * trained_autocorr, mae)
        return LossResult(total, mae, trained_autocorr)
