"""Evaluation metrics in the data's original units: pure numpy, shared by training and analysis.

Shapes: N sequences, T time steps, K components (or n_x field points). Everything is computed in
float64 whatever the input dtype, so float32 model outputs do not lose digits in the sums.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

ACF_MAX_LAG = 20  # lags of the evaluation's autocorrelation error, for every strategy

# A sequence/component whose standard deviation is at most this fraction of its largest |value|
# counts as constant: its autocorrelation is 0/0, and below this level x - mean is float64
# round-off (about 1e-16 of the values), not signal.
ACF_STD_FLOOR_REL = 1e-10
TINY = np.finfo(np.float64).tiny  # keeps log10 finite where a spectrum is exactly zero


def _as_seq(x: np.ndarray, name: str = "x") -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (N, T, K), got shape {x.shape}")
    return x


def _as_pair(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, true = _as_seq(pred, "pred"), _as_seq(true, "true")
    if pred.shape != true.shape:
        raise ValueError(f"pred and true shapes differ: {pred.shape} vs {true.shape}")
    return pred, true


# --- pointwise errors ---------------------------------------------------------------------------


def mae_rmse(pred: np.ndarray, true: np.ndarray) -> dict:
    """MAE and RMSE over everything and per component; pred, true (N, T, K)."""
    pred, true = _as_pair(pred, true)
    err = pred - true  # (N, T, K)
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "mae_per_component": np.abs(err).mean(axis=(0, 1)),  # (K,)
        "rmse_per_component": np.sqrt((err**2).mean(axis=(0, 1))),  # (K,)
    }


def error_by_step(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """MAE at each time step over N and K, (N, T, K) -> (T,): how error grows along the rollout."""
    pred, true = _as_pair(pred, true)
    return np.abs(pred - true).mean(axis=(0, 2))


def per_sequence_mae(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """MAE of each sequence over T and K, (N, T, K) -> (N,)."""
    pred, true = _as_pair(pred, true)
    return np.abs(pred - true).mean(axis=(1, 2))


def per_sequence_rmse(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """RMSE of each sequence over T and K, (N, T, K) -> (N,)."""
    pred, true = _as_pair(pred, true)
    return np.sqrt(((pred - true) ** 2).mean(axis=(1, 2)))


def field_relative_l2(pred_fields: np.ndarray, true_fields: np.ndarray) -> np.ndarray:
    """||pred - true||_2 / ||true||_2 over (T, n_x) per sequence, (N, T, n_x) -> (N,).

    A sequence whose true field is all zero has no relative scale: it gets 0.0 if the prediction
    is also all zero and inf otherwise (an infinite relative error, not a huge finite number that
    would pass unnoticed into an average).
    """
    pred, true = _as_pair(pred_fields, true_fields)
    diff_norm = np.sqrt(((pred - true) ** 2).sum(axis=(1, 2)))
    true_norm = np.sqrt((true**2).sum(axis=(1, 2)))
    zero = true_norm == 0
    out = diff_norm / np.where(zero, 1.0, true_norm)
    return np.where(zero, np.where(diff_norm == 0, 0.0, np.inf), out)


# --- autocorrelation ----------------------------------------------------------------------------


def _acf_sums(x: np.ndarray, max_lag: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numerators (N, max_lag, K), denominators (N, 1, K) and constant-sequence floors (N, 1, K)."""
    x = _as_seq(x)
    t = x.shape[1]
    if not 1 <= max_lag < t:
        raise ValueError(f"max_lag must be in 1..T-1 = 1..{t - 1} for T={t}, got max_lag={max_lag}")
    xc = x - x.mean(axis=1, keepdims=True)  # per-sequence, per-component mean
    den = (xc**2).sum(axis=1, keepdims=True)
    num = np.stack([(xc[:, :-k] * xc[:, k:]).sum(axis=1) for k in range(1, max_lag + 1)], axis=1)
    floor = t * (ACF_STD_FLOOR_REL * np.abs(x).max(axis=1, keepdims=True)) ** 2
    return num, den, floor


def _ratio(num: np.ndarray, den: np.ndarray, floor: np.ndarray) -> np.ndarray:
    ok = den > floor
    return np.where(ok, num / np.where(ok, den, 1.0), 0.0)


def acf(x: np.ndarray, max_lag: int) -> np.ndarray:
    """Normalised autocorrelation at lags 1..max_lag, (N, T, K) -> (N, max_lag, K).

    r_k = sum_t (x_t - m)(x_{t+k} - m) / sum_t (x_t - m)^2 with m the sequence/component mean
    (the biased estimator: one denominator for all lags, so |r_k| <= 1). A (near-)constant
    sequence, std <= ACF_STD_FLOOR_REL * max|x|, gets r_k = 0 rather than 0/0 = NaN.
    Raises ValueError unless 1 <= max_lag < T.
    """
    num, den, floor = _acf_sums(x, max_lag)
    return _ratio(num, den, floor)


def pooled_acf(x: np.ndarray, max_lag: int) -> np.ndarray:
    """Autocorrelation of a whole split, (N, T, K) -> (max_lag, K).

    Numerator and denominator are each summed over the N sequences (per-sequence means), so
    sequences weigh by their variance, and low-variance ones do not add noisy ratios.
    """
    num, den, floor = _acf_sums(x, max_lag)
    return _ratio(num.sum(axis=0), den.sum(axis=0), floor.sum(axis=0))


def acf_error_per_sequence(
    pred: np.ndarray, true: np.ndarray, max_lag: int = ACF_MAX_LAG
) -> np.ndarray:
    """Mean over lags and components of |ACF(pred) - ACF(true)|, (N, T, K) -> (N,)."""
    pred, true = _as_pair(pred, true)
    return np.abs(acf(pred, max_lag) - acf(true, max_lag)).mean(axis=(1, 2))


def pooled_acf_error(pred: np.ndarray, true: np.ndarray, max_lag: int = ACF_MAX_LAG) -> float:
    """Mean over lags and components of |pooled_acf(pred) - pooled_acf(true)|."""
    pred, true = _as_pair(pred, true)
    return float(np.abs(pooled_acf(pred, max_lag) - pooled_acf(true, max_lag)).mean())


# --- spectra ------------------------------------------------------------------------------------


def power_spectrum(x: np.ndarray) -> np.ndarray:
    """One-sided periodogram |rfft(x - mean_t)|^2 / T, (N, T, K) -> (N, T//2 + 1, K)."""
    x = _as_seq(x)
    xc = x - x.mean(axis=1, keepdims=True)
    return np.abs(np.fft.rfft(xc, axis=1)) ** 2 / x.shape[1]


def spectral_error_per_sequence(
    pred: np.ndarray, true: np.ndarray, eps_rel: float = 1e-8
) -> np.ndarray:
    """Log-spectral distance per sequence, (N, T, K) -> (N,).

    sqrt(mean over frequencies 1..F-1 and components of (log10(P_pred + eps) - log10(P_true +
    eps))^2); DC is skipped because both spectra are of mean-removed sequences. eps is set per
    sequence and component to eps_rel * max_f P_true + TINY: bins more than -10 log10(eps_rel)
    dB (80 dB by default) below the true spectrum's peak are round-off, whose log ratios would
    otherwise dominate the distance. The floor follows the true spectrum only, so the metric is
    the same in any units. TINY only keeps the log finite: a constant true component (P_true = 0)
    against a varying prediction gives a very large distance (hundreds), which it is.
    """
    pred, true = _as_pair(pred, true)
    if pred.shape[1] < 2:
        raise ValueError(f"need T >= 2 for a spectrum with a non-DC bin, got T={pred.shape[1]}")
    p_pred, p_true = power_spectrum(pred), power_spectrum(true)  # (N, F, K)
    eps = eps_rel * p_true.max(axis=1, keepdims=True) + TINY
    d = np.log10(p_pred[:, 1:] + eps) - np.log10(p_true[:, 1:] + eps)
    return np.sqrt((d**2).mean(axis=(1, 2)))


# --- comparisons and summaries ------------------------------------------------------------------


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """Paired percentile bootstrap of mean(a - b) for per-sample errors a, b (N,) of two strategies.

    Resamples samples (not a and b separately), so what the two strategies share per sample
    cancels. p_a_better is the fraction of bootstrap means below 0 (a has lower error).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be 1-D of equal length, got shapes {a.shape} and {b.shape}")
    n = a.shape[0]
    if n == 0:
        raise ValueError("a and b are empty: nothing to compare")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    diff = a - b
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    means = diff[idx].mean(axis=1)  # (n_boot,)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {
        "mean_diff": float(diff.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "n": int(n),
        "p_a_better": float((means < 0).mean()),
    }


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) over seeds; the std of a single value is 0.0, not NaN."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_std needs at least one value")
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return float(v.mean()), std


# --- rollout ------------------------------------------------------------------------------------

# A generated step stays valid while its error, RMS over components in units of each component's
# spread over the data, is at most this: a tenth of the data's own variation.
VALID_HORIZON_THRESHOLD = 0.1
ERROR_WINDOWS = 4  # time windows of the error-growth measure (151 steps: 38, 38, 38, 37)


def normalised_step_error(pred: np.ndarray, true: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """sqrt(mean_k ((pred - true) / scale_k)^2) at every step, (N, T, K) and scale (K,) -> (N, T).
    A component with scale 0 (constant in the data) counts in original units."""
    pred, true = _as_pair(pred, true)
    scale = np.asarray(scale, dtype=np.float64)
    scale = np.where(scale > 0, scale, 1.0)
    return np.sqrt((((pred - true) / scale) ** 2).mean(axis=2))


def valid_horizon(
    pred: np.ndarray,
    true: np.ndarray,
    scale: np.ndarray,
    threshold: float = VALID_HORIZON_THRESHOLD,
) -> np.ndarray:
    """Steps a sequence stays valid: the index of the first step whose normalised_step_error
    exceeds `threshold`, T when none does. (N, T, K) -> (N,) float."""
    err = normalised_step_error(pred, true, scale)  # (N, T)
    over = err > threshold
    first = np.where(over.any(axis=1), over.argmax(axis=1), err.shape[1])
    return first.astype(np.float64)


def window_bounds(t: int, n: int = ERROR_WINDOWS) -> list[tuple[int, int]]:
    """[start, stop) of n nearly equal consecutive windows over T steps (the first ones longer)."""
    edges = np.linspace(0, t, min(n, t) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def error_by_window(pred: np.ndarray, true: np.ndarray, n: int = ERROR_WINDOWS) -> np.ndarray:
    """MAE over N, K and the steps of each window, (N, T, K) -> (n,): how error grows."""
    by_step = error_by_step(pred, true)
    return np.array([by_step[a:b].mean() for a, b in window_bounds(len(by_step), n)])


# --- physics of the embedded Burgers data, on fields u (N, T, n_x) over a periodic grid ----------

# A step violates a law when the field's quantity moves by more than this fraction of its value
# (the CSVs keep 6 significant digits, so changes below about 1e-6 are rounding).
MEAN_TOLERANCE = 1e-6  # of the field's RMS at step 0
# Of the energy at the step before. The true fields, truncated to the basis's components, rise by
# up to 0.27% in a step (40 smoke samples, 5 components): energy moving into the dropped modes.
ENERGY_RISE_TOLERANCE = 1e-2


def mean_violations(fields: np.ndarray, tol: float = MEAN_TOLERANCE) -> np.ndarray:
    """Steps at which the domain mean of u has moved from its value at step 0 by more than
    tol * RMS(u at step 0): the mean is conserved on a periodic domain. (N, T, n_x) -> (N,)."""
    u = _as_seq(fields)
    m = u.mean(axis=2)  # (N, T)
    scale = np.sqrt((u[:, 0] ** 2).mean(axis=1, keepdims=True))  # (N, 1)
    return (np.abs(m[:, 1:] - m[:, :1]) > tol * scale).sum(axis=1).astype(np.float64)


def energy_violations(fields: np.ndarray, tol: float = ENERGY_RISE_TOLERANCE) -> np.ndarray:
    """Steps at which the energy mean(u^2) / 2 rises by more than tol of its previous value:
    viscous Burgers only dissipates it. (N, T, n_x) -> (N,)."""
    u = _as_seq(fields)
    e = 0.5 * (u**2).mean(axis=2)  # (N, T)
    return (np.diff(e, axis=1) > tol * e[:, :-1]).sum(axis=1).astype(np.float64)


# --- ensembles: spread against error ------------------------------------------------------------


def coverage(mean: np.ndarray, std: np.ndarray, true: np.ndarray, k: float) -> np.ndarray:
    """Per sequence, the fraction of (step, component) values with |true - mean| <= k std;
    (N, T, K) each -> (N,). For a calibrated Gaussian spread: 0.683 at k = 1, 0.954 at k = 2."""
    mean, true = _as_pair(mean, true)
    std = _as_seq(std, "std")
    return (np.abs(true - mean) <= k * std).mean(axis=(1, 2))


def spread_error_correlation(mean: np.ndarray, std: np.ndarray, true: np.ndarray) -> float:
    """Pearson correlation over every (sequence, step) of the spread (std averaged over
    components) with the error of the mean (|true - mean| averaged over components): whether a
    wider spread marks a larger error. NaN when either is constant."""
    mean, true = _as_pair(mean, true)
    spread = _as_seq(std, "std").mean(axis=2).ravel()
    error = np.abs(true - mean).mean(axis=2).ravel()
    if spread.std() == 0 or error.std() == 0:
        return float("nan")
    return float(np.corrcoef(spread, error)[0, 1])
