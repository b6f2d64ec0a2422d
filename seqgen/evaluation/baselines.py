"""Baselines the surrogate must beat: parameters (N, P) -> whole sequences (N, T, K).

Each is fitted on the training split (and the validation split where it chooses something) and
predicts in the data's original units, so `seqgen.evaluation.evaluate.measure` scores it by the
same code and on the same samples as a trained model:

- `mean`: the per-step mean training sequence, whatever the parameters: the floor any surrogate
  must clear by far.
- `knn`: inverse-distance-weighted k-nearest-neighbour interpolation in standardised parameter
  space, k chosen on validation: the plain interpolation a researcher would try first.
- `direct`: a small MLP that maps the parameters to the whole sequence at once (as coefficients
  of the training sequences' principal directions), early-stopped on validation: what a network
  gets with no recurrence at all.

All three share one signature in `BASELINES` and return a `Baseline`: `predict` plus an `info`
dict of what was chosen and how long fitting took. Bad input raises `DataError` / `ConfigError`
with a one-line message.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from seqgen.data.sequences import Normalizer, SequenceData
from seqgen.data.split import Split
from seqgen.errors import ConfigError, DataError

# Raise when a fit changes in a way its settings do not show: evaluations logged by an older
# revision are then fitted anew instead of reused from the store. 2: the rollout and physics
# measures, which evaluations of revision 1 lack.
BASELINE_REVISION = 2
KNN_QUERY_CHUNK = 1024  # query rows per (chunk, n_train) distance matrix: 1024 x 4400 x 8 B = 36 MB


@dataclass(frozen=True)
class Baseline:
    """A fitted baseline: predict(params (N, P)) -> (N, T, K) float32 in original units."""

    name: str
    n_params: int  # P the baseline was fitted on; predict refuses any other
    predict_fn: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    info: dict[str, float | int | str | bool]  # what was chosen (k, epochs) and fit_seconds

    def predict(self, params: np.ndarray) -> np.ndarray:
        """params (N, P) original units -> sequences (N, T, K) float32, original units."""
        params = np.asarray(params, dtype=np.float64)
        if params.ndim != 2 or params.shape[1] != self.n_params:
            raise DataError(
                f"{self.name} baseline: params must have shape (N, {self.n_params}), "
                f"got {params.shape}"
            )
        _check_finite(params, f"{self.name} baseline: params")
        return self.predict_fn(params)


# ---- input checks, shared by every baseline ----------------------------------------------------


def _check_finite(a: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        where = ", ".join(str(int(i)) for i in np.argwhere(bad)[0])
        raise DataError(f"{what} hold {int(bad.sum())} non-finite value(s), first at [{where}]")


def _check_split(
    name: str,
    train_p: np.ndarray,
    train_y: np.ndarray,
    val_p: np.ndarray,
    val_y: np.ndarray,
    needs_val: bool,
) -> tuple[np.ndarray, ...]:
    """Arrays as float64 after checking shapes (N, P) / (N, T, K) agree and values are finite."""
    arrays = [np.asarray(a, dtype=np.float64) for a in (train_p, train_y, val_p, val_y)]
    train_p, train_y, val_p, val_y = arrays
    for part, p, y in (("training", train_p, train_y), ("validation", val_p, val_y)):
        if p.ndim != 2 or y.ndim != 3 or len(p) != len(y):
            raise DataError(
                f"{name} baseline: {part} params must be (N, P) and sequences (N, T, K) with the "
                f"same N, got {p.shape} and {y.shape}"
            )
    if len(train_p) == 0:
        raise DataError(f"{name} baseline: the training split is empty")
    if needs_val and len(val_p) == 0:
        why = {"knn": "chooses k", "direct": "early-stops"}.get(name, "chooses its settings")
        raise DataError(f"{name} baseline {why} on the validation split, which is empty")
    if len(val_p) and (val_p.shape[1] != train_p.shape[1] or val_y.shape[1:] != train_y.shape[1:]):
        raise DataError(
            f"{name} baseline: validation shapes {val_p.shape}, {val_y.shape} do not match "
            f"training shapes {train_p.shape}, {train_y.shape} beyond N"
        )
    for what, a in zip(("params", "sequences"), (train_p, train_y), strict=True):
        _check_finite(a, f"{name} baseline: training {what}")
    for what, a in zip(("params", "sequences"), (val_p, val_y), strict=True):
        _check_finite(a, f"{name} baseline: validation {what}")
    return train_p, train_y, val_p, val_y


def _mae(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.abs(pred - true).mean())


# ---- mean --------------------------------------------------------------------------------------


def fit_mean(
    train_p: np.ndarray, train_y: np.ndarray, val_p: np.ndarray, val_y: np.ndarray, seed: int = 0
) -> Baseline:
    """The per-step mean of the training sequences (T, K), repeated for every input."""
    started = time.perf_counter()
    train_p, train_y, val_p, val_y = _check_split("mean", train_p, train_y, val_p, val_y, False)
    mean = train_y.mean(axis=0).astype(np.float32)  # (T, K)

    def predict(params: np.ndarray) -> np.ndarray:
        return np.broadcast_to(mean, (len(params), *mean.shape)).copy()

    info: dict = {"fit_seconds": time.perf_counter() - started}
    if len(val_p):
        info["val_mae"] = _mae(predict(val_p), val_y)
    return Baseline("mean", train_p.shape[1], predict, info)


# ---- k nearest neighbours ----------------------------------------------------------------------


def knn_candidates(n_train: int) -> list[int]:
    """k tried on validation: 1, 2, 4, ... up to n_train (needs n_train >= 2, so k has a choice)."""
    return [2**i for i in range(int(math.log2(n_train)) + 1)]


def idw_weights(d: np.ndarray) -> np.ndarray:
    """Inverse-distance weights of k neighbours: distances d (Q, k) -> weights (Q, k), rows sum 1.

    w_i = (1 / d_i) / sum_j (1 / d_j). A query at distance 0 from some of them takes their plain
    average instead of 1/0, so an exact match returns that training sample.
    """
    exact = d == 0
    w = np.where(exact.any(axis=1, keepdims=True), exact, 1.0 / np.where(exact, 1.0, d))
    return w / w.sum(axis=1, keepdims=True)


def _knn_predict(
    z_query: np.ndarray, z_train: np.ndarray, flat_y: np.ndarray, ks: list[int]
) -> list[np.ndarray]:
    """Predictions (Q, T*K) for each k in ks: z_* standardised params, flat_y (M, T*K)."""
    out = [np.empty((len(z_query), flat_y.shape[1])) for _ in ks]
    for start in range(0, len(z_query), KNN_QUERY_CHUNK):
        q = z_query[start : start + KNN_QUERY_CHUNK]
        dist = np.sqrt(((q[:, None, :] - z_train[None, :, :]) ** 2).sum(axis=-1))  # (Q, M)
        order = np.argsort(dist, axis=1, kind="stable")  # nearest first; once for every k
        d_sorted = np.take_along_axis(dist, order, axis=1)
        for o, k in zip(out, ks, strict=True):
            # Weights as a dense (Q, M) matrix, zero off the k nearest: one GEMM does the sums
            # for any k, where gathering (Q, k, T*K) neighbour rows would not fit for large k.
            w = np.zeros_like(dist)
            np.put_along_axis(w, order[:, :k], idw_weights(d_sorted[:, :k]), axis=1)
            o[start : start + len(q)] = w @ flat_y
    return out


def fit_knn(
    train_p: np.ndarray,
    train_y: np.ndarray,
    val_p: np.ndarray,
    val_y: np.ndarray,
    seed: int = 0,
    candidates: list[int] | None = None,
) -> Baseline:
    """IDW k-nearest-neighbour interpolation in standardised parameter space, k by validation MAE.

    Parameters are standardised with training statistics, so no parameter dominates the distance
    by its units. k is the candidate (default `knn_candidates`) with the lowest validation MAE,
    the smaller k on a tie. Needs >= 2 training samples, so that there is a choice.
    """
    started = time.perf_counter()
    train_p, train_y, val_p, val_y = _check_split("knn", train_p, train_y, val_p, val_y, True)
    if len(train_p) < 2:
        raise DataError(
            f"knn baseline needs at least 2 training samples to choose k, got {len(train_p)}"
        )
    ks = knn_candidates(len(train_p)) if candidates is None else list(candidates)
    bad = [k for k in ks if not isinstance(k, int | np.integer) or not 1 <= k <= len(train_p)]
    if not ks or bad:
        raise ConfigError(
            f"knn baseline: candidate k must be integers in 1..{len(train_p)} (the training "
            f"samples), got {ks}"
        )
    ks = sorted({int(k) for k in ks})  # ascending, so a tie goes to the smaller k
    n, t, k_comp = train_y.shape
    mu, sd = train_p.mean(axis=0), train_p.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)  # a constant parameter adds 0 to every distance
    z_train, flat_y = (train_p - mu) / sd, train_y.reshape(n, t * k_comp)

    val_pred = _knn_predict((val_p - mu) / sd, z_train, flat_y, ks)
    val_maes = [_mae(p.reshape(val_y.shape), val_y) for p in val_pred]
    best = int(np.argmin(val_maes))  # first minimum: the smaller k on a tie
    k = ks[best]

    def predict(params: np.ndarray) -> np.ndarray:
        (pred,) = _knn_predict((params - mu) / sd, z_train, flat_y, [k])
        return pred.reshape(len(params), t, k_comp).astype(np.float32)

    info = {
        "k": k,
        "val_mae": val_maes[best],
        "k_tried": ",".join(map(str, ks)),
        "fit_seconds": time.perf_counter() - started,
    }
    return Baseline("knn", train_p.shape[1], predict, info)


# ---- direct network ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectSettings:
    """Settings of the direct network; benchmarks/baselines.py measured the defaults."""

    hidden: int = 256  # width of each hidden layer
    layers: int = 3  # hidden layers
    lr: float = 1e-3  # Adam learning rate
    batch_size: int = 64  # sequences per step
    max_epochs: int = 1000  # upper bound; early stopping ends most fits long before
    patience: int = 50  # epochs without a new best validation MAE before stopping
    modes: int = 32  # principal directions of the training sequences the output combines
    # Its GEMMs are tiny (64 x 256): a second thread gains little when the machine is idle and,
    # on 2 busy cores, made an epoch 20x slower (benchmarks/baselines.py). One thread also makes
    # a fit the same whatever the caller's thread setting.
    threads: int = 1


class DirectNetwork(nn.Module):
    """MLP params (B, P) -> `modes` coefficients -> sequences (B, T*K), standardised units.

    Why this shape: the input is a point in a 2-D parameter space and the output a smooth
    function of it, so a few wide SiLU layers carry enough capacity (SiLU is smooth, so the
    interpolated sequences have no ReLU kinks). The MLP gives coefficients of a fixed basis, the
    top principal directions of the training sequences: every prediction is then the training
    mean plus a combination of shapes the data really has. With all T*K directions instead, the
    same functions as a free output layer (benchmarks/baselines.py --direct-modes 32,755, demo
    size, 3 seeds), test MAE was 1.8x and spectral error 5.8x those of 32 modes (ACF error
    0.7x): free outputs carry step-to-step jitter the true sequences lack.
    No convolution or recurrence along T: this baseline asks what a network gets without them.
    """

    def __init__(self, n_params: int, mean: torch.Tensor, basis: torch.Tensor, s: DirectSettings):
        super().__init__()
        sizes = [n_params] + [s.hidden] * s.layers
        blocks: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            blocks += [nn.Linear(a, b), nn.SiLU()]
        self.mlp = nn.Sequential(*blocks, nn.Linear(sizes[-1], len(basis)))
        self.register_buffer("mean", mean)  # (T*K,)
        self.register_buffer("basis", basis)  # (modes, T*K), orthonormal rows

    def forward(self, params: torch.Tensor) -> torch.Tensor:
        return self.mean + self.mlp(params) @ self.basis  # (B, modes) @ (modes, T*K)


def sequence_basis(y: np.ndarray, modes: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and top principal directions (min(modes, N, D), D) of flat sequences y (N, D)."""
    y = np.asarray(y, dtype=np.float64)
    mean = y.mean(axis=0)
    _, _, vt = np.linalg.svd(y - mean, full_matrices=False)  # rows by falling singular value
    return mean, vt[:modes]


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run the block with n intra-op threads, then give the caller its own setting back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_direct_settings(s: DirectSettings) -> None:
    for name in ("hidden", "layers", "batch_size", "max_epochs", "patience", "modes", "threads"):
        value = getattr(s, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"direct baseline: {name} must be a positive integer, got {value!r}")
    if not (isinstance(s.lr, float | int) and 0 < s.lr < math.inf):
        raise ConfigError(f"direct baseline: lr must be a positive number, got {s.lr!r}")


def fit_direct(
    train_p: np.ndarray,
    train_y: np.ndarray,
    val_p: np.ndarray,
    val_y: np.ndarray,
    seed: int = 0,
    settings: DirectSettings = DirectSettings(),
) -> Baseline:
    """Train `DirectNetwork` with Adam on the MAE in standardised units; keep the weights of the
    best validation MAE (original units), stop after `patience` epochs without a new best.

    Seeded through a private torch RNG state (the caller's global state is left alone), so a fit
    is repeatable on one machine and thread count.
    """
    started = time.perf_counter()
    _check_direct_settings(settings)
    train_p, train_y, val_p, val_y = _check_split("direct", train_p, train_y, val_p, val_y, True)
    s = settings
    n, t, k = train_y.shape
    norm = Normalizer.fit(train_y, train_p)

    def to_x(params: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(norm.normalize_params(params.astype(np.float32)))

    def to_original(out: torch.Tensor) -> np.ndarray:  # (B, T*K) -> (B, T, K)
        return norm.denormalize_components(out.detach().numpy().reshape(-1, t, k))

    x = to_x(train_p)  # (N, P)
    y_flat = norm.normalize_components(train_y.astype(np.float32)).reshape(n, t * k)
    y = torch.as_tensor(y_flat)  # (N, T*K)
    x_val = to_x(val_p)
    mean, basis = (torch.as_tensor(a, dtype=torch.float32) for a in sequence_basis(y_flat, s.modes))

    with torch.random.fork_rng(devices=[]), _torch_threads(s.threads):
        torch.manual_seed(seed)
        net = DirectNetwork(x.shape[1], mean, basis, s)
        order = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=s.lr)
        best_mae, best_epoch, best_state = math.inf, 0, copy.deepcopy(net.state_dict())
        epoch, stopped_early = 0, False
        for epoch in range(1, s.max_epochs + 1):
            net.train()
            for batch in torch.randperm(n, generator=order).split(s.batch_size):
                loss = (net(x[batch]) - y[batch]).abs().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                val_mae = _mae(to_original(net(x_val)), val_y)
            if val_mae < best_mae:
                best_mae, best_epoch = val_mae, epoch
                best_state = copy.deepcopy(net.state_dict())
            elif epoch - best_epoch >= s.patience:
                stopped_early = True
                break
    net.load_state_dict(best_state)
    net.eval()

    def predict(params: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return to_original(net(to_x(params))).astype(np.float32)

    info = {
        "epochs": epoch,
        "best_epoch": best_epoch,
        "stopped_early": stopped_early,
        "val_mae": best_mae,
        "modes": len(basis),
        "n_weights": sum(p.numel() for p in net.parameters()),
        "fit_seconds": time.perf_counter() - started,
    }
    return Baseline("direct", train_p.shape[1], predict, info)


# ---- the registry ------------------------------------------------------------------------------

FitFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int], Baseline]
BASELINES: dict[str, FitFn] = {"mean": fit_mean, "knn": fit_knn, "direct": fit_direct}


def fit_baseline(
    name: str, data: SequenceData, split: Split, seed: int = 0, **options: Any
) -> Baseline:
    """Fit baseline `name` on the split's training part (validation where it chooses); options
    go to its fit function (knn: candidates, direct: settings)."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}: use {', '.join(BASELINES)}")
    try:
        train, val = split.indices(data.files, "train"), split.indices(data.files, "val")
    except ValueError as e:  # the split names files the data does not have
        raise DataError(str(e)) from e
    return BASELINES[name](
        data.params[train],
        data.components[train],
        data.params[val],
        data.components[val],
        seed,
        **options,
    )


def baseline_version(name: str, **options: Any) -> str:
    """Digest (16 hex chars) of what decides a baseline's predictions besides data, split and
    seed: the revision of its code and every setting of its fit function, defaults filled in.
    An evaluation logged under the same digest is reused; any other setting fits anew."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}: use {', '.join(BASELINES)}")
    extra = list(inspect.signature(BASELINES[name]).parameters.values())[5:]  # after seed
    chosen = {p.name: options.get(p.name, p.default) for p in extra}
    chosen = {
        k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in chosen.items()
    }
    text = json.dumps({"revision": BASELINE_REVISION, "name": name, **chosen}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
