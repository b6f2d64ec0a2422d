"""Loss terms by name, and the objective a strategy trains: weights over terms.

A term is one function, registered by name with `@loss_term`:
(generated (M,B,T,K), target (M,B,T,K), settings) -> (M,), one value per member of a stack
(a single model is a stack of one: it passes x[None]). A strategy in experiments/phases.toml is
weights over terms (`terms = { mae = 0.5, spectral = 0.5 }`, or `alpha` for mae/autocorr), and
`Objective` is the one loss of everything that trains or measures: the stack, a single model,
evaluation and benchmarks. Every term of a strategy is computed and reported; a weight of 0
reports it without training it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from seqgen.config import alpha_weights

DEFAULT_MAX_LAG = 10  # the original scripts' default
VARIANCE_FLOOR = 1e-6  # keeps r_k and its gradient finite for (near-)constant sequences


@dataclass(frozen=True)
class TermSettings:
    """What a term reads for each of the M members: (M,) tensors on the device, and the same
    values on the host, for a term that needs a Python number (a shape): reading them never
    waits for the device, so a step stays one CUDA graph."""

    max_lag: torch.Tensor  # (M,) int64: lags 1..max_lag of the autocorrelation
    trained: torch.Tensor  # (M,) bool: the term carries weight for the member (else reported)
    max_lags: tuple[int, ...]  # max_lag on the host
    trains: tuple[bool, ...]  # trained on the host


Term = Callable[[torch.Tensor, torch.Tensor, TermSettings], torch.Tensor]
TERMS: dict[str, Term] = {}  # the registry: name -> term, in the order registered


def loss_term(name: str) -> Callable[[Term], Term]:
    """Register a term under `name`, the name a strategy's weights and its metrics use
    (train_<name>, val_<name>, test_<name>)."""

    def register(fn: Term) -> Term:
        known = TERMS.get(name)
        if known is not None and known.__qualname__ != fn.__qualname__:
            raise ValueError(f"loss term {name!r} is already registered ({known.__qualname__})")
        TERMS[name] = fn
        return fn

    return register


def known_terms() -> str:
    return ", ".join(sorted(TERMS))


# ---- the built-in terms ------------------------------------------------------------------------


@loss_term("mae")
def mae(generated: torch.Tensor, target: torch.Tensor, settings: TermSettings) -> torch.Tensor:
    """Mean absolute error over batch, time and components, in float32: (M,B,T,K) -> (M,)."""
    return (generated.float() - target.float()).abs().mean(dim=(1, 2, 3))


def autocorrelation(x: torch.Tensor, max_lag: int) -> torch.Tensor:
    """Normalised autocorrelation r_1..r_max_lag per sample and component: (B,T,K) -> (B,L,K)."""
    x = x.float()  # sums of squares over 151 steps lose too much in bf16/fp16
    centred = x - x.mean(dim=1, keepdim=True)
    variance = (centred * centred).sum(dim=1).clamp_min(VARIANCE_FLOOR)  # (B, K)
    lags = [(centred[:, :-k] * centred[:, k:]).sum(dim=1) for k in range(1, max_lag + 1)]
    return torch.stack(lags, dim=1) / variance.unsqueeze(1)


@loss_term("autocorr")
def autocorr(generated: torch.Tensor, target: torch.Tensor, settings: TermSettings) -> torch.Tensor:
    """Mean |r_k(generated) - r_k(target)| over lags 1..max_lag (each member its own), batch and
    components, in float32 outside autocast: (M,B,T,K) -> (M,). A member that trains it needs
    max_lag below the sequence length; one that only reports it counts the lags there are."""
    M, B, T, K = target.shape
    top = 0  # the most lags any member counts
    for lag, trained in zip(settings.max_lags, settings.trains, strict=True):
        if trained and lag >= T:
            raise ValueError(f"max_lag {lag} must be below the sequence length {T}")
        top = max(top, min(lag, T - 1))
    lags = settings.max_lag.clamp(max=T - 1)  # (M,) lags counted
    with torch.autocast(target.device.type, enabled=False):
        r_gen = autocorrelation(generated.reshape(M * B, T, K), top).view(M, B, top, K)
        r_true = autocorrelation(target.reshape(M * B, T, K), top).view(M, B, top, K)
        counted = torch.arange(1, top + 1, device=target.device) <= lags.view(M, 1)
        diff = torch.where(counted.view(M, 1, top, 1), (r_gen - r_true).abs(), 0.0)
        return diff.sum(dim=(1, 2, 3)) / (lags * (B * K))


@loss_term("spectral")
def spectral(generated: torch.Tensor, target: torch.Tensor, settings: TermSettings) -> torch.Tensor:
    """L1 between the FFT magnitudes over time of generated and target (orthonormal rfft, so on
    the scale of the values), mean over batch, frequencies and components, in float32 outside
    autocast: (M,B,T,K) -> (M,)."""
    with torch.autocast(target.device.type, enabled=False):
        gen = torch.fft.rfft(generated.float(), dim=2, norm="ortho").abs()  # (M,B,T//2+1,K)
        true = torch.fft.rfft(target.float(), dim=2, norm="ortho").abs()
        return (gen - true).abs().mean(dim=(1, 2, 3))


# ---- what a strategy trains --------------------------------------------------------------------


@dataclass(frozen=True)
class LossResult:
    """An objective's result: the total each member trains and every term, each (M,)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]

    def columns(self) -> torch.Tensor:
        """(M, 1 + terms): the total, then the terms in the objective's order; detached."""
        return torch.stack([self.total, *self.terms.values()], dim=1).detach().float()


def check_weights(weights: Mapping[str, float], where: str) -> None:
    """Known terms, finite non-negative numbers, not all zero; ValueError naming `where`."""
    for name, w in weights.items():
        if name not in TERMS:
            raise ValueError(f"{where}: unknown loss term {name!r} (known: {known_terms()})")
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise ValueError(f"{where}: the weight of {name} must be a number, got {w!r}")
        if w < 0:
            raise ValueError(f"{where}: the weight of {name} cannot be negative, got {w!r}")
    if not weights or not any(w > 0 for w in weights.values()):
        raise ValueError(f"{where}: the weights sum to zero: nothing would be trained")


class Objective(nn.Module):
    """The loss of a stack of M members: member m trains sum_t weights[m][t] * term_t and
    reports every term any member names, those of weight 0 without a gradient (a member that
    does not name a term reports it too; the caller logs the member's own terms).
    (M,B,T,K) generated and target -> LossResult of (M,) tensors."""

    def __init__(self, weights: Sequence[Mapping[str, float]], max_lag: Sequence[int]):
        super().__init__()
        if len(weights) != len(max_lag):
            raise ValueError(f"{len(weights)} weightings for {len(max_lag)} max_lag values")
        for m, w in enumerate(weights):
            check_weights(w, f"member {m}")
        self.names = tuple(dict.fromkeys(name for w in weights for name in w))  # first-seen order
        # (M, terms): member m's weight of each term, 0 for a term it does not name
        self.weights = tuple(tuple(float(w.get(n, 0.0)) for n in self.names) for w in weights)
        self.max_lag = tuple(int(k) for k in max_lag)
        self._constants: dict[torch.device, tuple[torch.Tensor, list[TermSettings]]] = {}

    @property
    def width(self) -> int:
        """Columns of LossResult.columns(): the total and each term."""
        return 1 + len(self.names)

    def constants(self, device: torch.device) -> tuple[torch.Tensor, list[TermSettings]]:
        """The weights (M, terms) and each term's settings, made once per device, outside any
        CUDA-graph capture."""
        if device not in self._constants:
            weights = torch.tensor(self.weights, device=device).view(len(self.max_lag), -1)
            max_lag = torch.tensor(self.max_lag, device=device)
            settings = []
            for t in range(len(self.names)):
                trains = tuple(w[t] > 0 for w in self.weights)
                trained = torch.tensor(trains, device=device)
                settings.append(TermSettings(max_lag, trained, self.max_lag, trains))
            self._constants[device] = (weights, settings)
        return self._constants[device]

    def forward(self, generated: torch.Tensor, target: torch.Tensor) -> LossResult:
        weights, settings = self.constants(generated.device)
        total = torch.zeros((), device=generated.device)
        terms = {}
        for t, name in enumerate(self.names):
            s = settings[t]
            if any(s.trains):
                value = TERMS[name](generated, target, s)
                value = torch.where(s.trained, value, value.detach())
                total = total + torch.where(s.trained, weights[:, t] * value, 0.0)
            else:  # reported, not trained by any member
                with torch.no_grad():
                    value = TERMS[name](generated.detach(), target, s)
            terms[name] = value
        return LossResult(total, terms)


def make_loss(alpha: float, max_lag: int) -> Objective:
    """A single model's loss (a stack of one) with MAE weight `alpha` and autocorrelation lags
    1..max_lag: the seed's strategies (mae: alpha 1, autocorr: 0, combined: 0.5)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within 0..1, got {alpha}")
    return Objective([alpha_weights(alpha)], [max_lag])
