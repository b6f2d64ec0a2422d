"""Sample production pipeline: viscous Burgers simulations, compressed by PCA, written as CSVs.

Lets the project run on a fresh machine on data that behaves like the users' (simulation output
compressed by PCA) rather than noise. Each sample solves u_t + u u_x = nu u_xx on the periodic
domain [0, 2 pi) from u0 = MEAN_U + A (sin x + 0.5 sin(2x + 1)), so the model's two inputs
(nu, A) determine the whole sequence.

Parameters. nu is log-uniform on [10^-2.5, 10^-0.5]. At the top, A / nu is 1.6 to 4.7: diffusion
wins and the profile decays smoothly (first mode like exp(-nu t), to 0.39 by T_FINAL). At the
bottom, A / nu is 160 to 470: fronts form at t = 1 / (1.57 A), 0.43 to 1.28, and persist to
T_FINAL as sawtooth waves. The viscous front's width 4 nu / jump falls below a cell (dx = 0.049)
for nu below ~0.03, so there fronts are grid-limited (2-3 cells, monotone), as in any simulation at
finite resolution; the solution away from the fronts still depends on nu. MEAN_U != 0 makes the
profile travel and makes mean conservation a meaningful check.

Scheme. Finite volumes on cell centres; Strang splitting per step: half a diffusion step, a
convection step, half a diffusion step. Convection: MUSCL reconstruction with the minmod limiter,
Rusanov (local Lax-Friedrichs) flux, SSP-RK2 in time: TVD, so no new extrema, under
CFL = max|u| dt / dx <= 0.4 (TVD needs <= 0.5). Diffusion: the exact exponential of the periodic
3-point Laplacian, applied in Fourier space: unconditionally stable, so dt is set by convection
alone and large nu costs nothing; its kernel is positive with unit sum (maximum principle) and it
leaves the k = 0 mode untouched. Both parts are in conservative form, so the mean is conserved
to round-off. dt is per sample (from its own max|u0|, which bounds |u| for all t), so a sample's
field does not depend on which other samples share the batch.

PCA. Five components fitted on the training files of make_split(files, seed=0). A run trained
with another seed's split sees a basis fitted on seed 0's training files, which include some of
its validation and test files. We accept that: the basis is a fixed, unsupervised change of
coordinates (5 x 128 numbers from ~660k snapshots, each held-out file 1/4400 of them; the model
never sees the fields), the users' data likewise arrives compressed by a basis fitted once, and
every seed must see the same files for results across seeds to be comparable. Swapping 20% of the
fitting samples barely moves the basis: at 5,500 samples, seed 1's fit is within 0.008 rad of
seed 0's (largest principal angle) and its explained variance ratios agree to 0.001.

All fields of a run are held in memory in float64 until the basis is known (~155 kB per sample,
~0.85 GB for 5,500): exact, and a second simulation pass would double the run time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqgen.data.split import make_split
from seqgen.errors import ConfigError

log = logging.getLogger(__name__)
N_X = 128
N_SNAPSHOTS = 151
T_FINAL = 3.0
NU_RANGE = (10**-2.5, 10**-0.5)
AMPLITUDE_RANGE = (0.5, 1.5)
MEAN_U = 0.5
N_COMPONENTS = 5
PCA_SPLIT_SEED = 0  # the default training seed: the basis is fitted on its training files
CFL = 0.4
CHUNK = 500  # samples per simulation batch: arrays of ~0.5 MB stay in cache
PCA_FILE = "pca.npz"
SETTINGS_FILE = "synth.json"
PARAM_DIGITS = 6  # significant digits of every number in the CSVs


def grid(n_x: int = N_X) -> np.ndarray:
    """Cell centres of the periodic grid on [0, 2 pi). (n_x,)"""
    return (np.arange(n_x) + 0.5) * (2 * np.pi / n_x)


def burgers_params(n_samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw nu (log-uniform) and amplitude (uniform). Two arrays (N,)."""
    log_nu = rng.uniform(np.log10(NU_RANGE[0]), np.log10(NU_RANGE[1]), n_samples)
    amplitude = rng.uniform(*AMPLITUDE_RANGE, n_samples)
    # rounded to what the CSVs print, so the files state exactly the parameters simulated
    return _round_sig(10.0**log_nu), _round_sig(amplitude)


def _round_sig(a: np.ndarray) -> np.ndarray:
    return np.char.mod(f"%.{PARAM_DIGITS}g", a).astype(np.float64)


def initial_condition(x: np.ndarray, amplitude: np.ndarray) -> np.ndarray:
    """u0 = MEAN_U + A (sin x + 0.5 sin(2x + 1)). x (n_x,), amplitude (N,) -> (N, n_x)"""
    shape = np.sin(x) + 0.5 * np.sin(2 * x + 1.0)
    return MEAN_U + np.asarray(amplitude, dtype=np.float64)[:, None] * shape


def _convection_rhs(u: np.ndarray, dx: float) -> np.ndarray:
    """-(F_{i+1/2} - F_{i-1/2}) / dx for f = u^2 / 2, MUSCL-minmod + Rusanov. (N, n_x)"""
    p = np.concatenate([u[:, -2:], u, u[:, :2]], axis=1)  # two ghost cells each side
    d = np.diff(p, axis=1)
    # minmod(a, b) is the median of (a, b, 0)
    half_slope = 0.5 * np.clip(d[:, :-1], np.minimum(d[:, 1:], 0.0), np.maximum(d[:, 1:], 0.0))
    c = p[:, 1:-1]  # cells -1 .. n_x
    u_left = c[:, :-1] + half_slope[:, :-1]  # states on either side of faces -1/2 .. n_x - 1/2
    u_right = c[:, 1:] - half_slope[:, 1:]
    speed = np.maximum(np.abs(u_left), np.abs(u_right))
    flux = 0.25 * (u_left * u_left + u_right * u_right) - 0.5 * speed * (u_right - u_left)
    return (flux[:, :-1] - flux[:, 1:]) / dx


def _diffusion_factor(nu: np.ndarray, n_x: int, dt: float) -> np.ndarray:
    """exp(dt nu L) in rfft space, L the periodic 3-point Laplacian. (N, n_x // 2 + 1)"""
    dx = 2 * np.pi / n_x
    eig = -4.0 / dx**2 * np.sin(np.pi * np.arange(n_x // 2 + 1) / n_x) ** 2
    return np.exp(dt * nu[:, None] * eig)


def _diffuse(u: np.ndarray, factor: np.ndarray) -> np.ndarray:
    return np.fft.irfft(np.fft.rfft(u, axis=1) * factor, n=u.shape[1], axis=1)


def _integrate(u: np.ndarray, nu: np.ndarray, dt: float, n_sub: int, out: np.ndarray) -> None:
    """Fill out (N, n_snapshots, n_x) with snapshots every n_sub steps of size dt from u."""
    n_x = u.shape[1]
    dx = 2 * np.pi / n_x
    half = _diffusion_factor(nu, n_x, 0.5 * dt)
    full = _diffusion_factor(nu, n_x, dt)
    out[:, 0] = u
    for s in range(1, out.shape[1]):
        u = _diffuse(u, half)
        for j in range(n_sub):
            u1 = u + dt * _convection_rhs(u, dx)
            u = 0.5 * (u + u1 + dt * _convection_rhs(u1, dx))
            u = _diffuse(u, full if j < n_sub - 1 else half)
        out[:, s] = u


def simulate_burgers(
    nu: np.ndarray,
    amplitude: np.ndarray,
    n_x: int = N_X,
    n_snapshots: int = N_SNAPSHOTS,
    t_final: float = T_FINAL,
) -> np.ndarray:
    """Viscous Burgers for each (nu, A), snapshots at linspace(0, t_final). (N, n_snapshots, n_x)"""
    nu = np.atleast_1d(np.asarray(nu, dtype=np.float64))
    amplitude = np.atleast_1d(np.asarray(amplitude, dtype=np.float64))
    if nu.ndim != 1 or nu.shape != amplitude.shape:
        raise ValueError(
            f"nu and amplitude must be 1-D of equal length, got {nu.shape} and {amplitude.shape}"
        )
    if np.any(~(nu > 0)):
        raise ValueError("nu must be positive")
    if n_x < 4 or n_snapshots < 2 or not t_final > 0:
        raise ValueError(
            f"need n_x >= 4, n_snapshots >= 2, t_final > 0; got {n_x}, {n_snapshots}, {t_final}"
        )
    u0 = initial_condition(grid(n_x), amplitude)
    out = np.empty((len(nu), n_snapshots, n_x))
    dt_snap = t_final / (n_snapshots - 1)
    dx = 2 * np.pi / n_x
    # max|u| never grows (maximum principle), so max|u0| sets a CFL-safe step for the whole run
    umax = np.abs(u0).max(axis=1, initial=0.0)
    n_sub = np.maximum(1, np.ceil(dt_snap * umax / (CFL * dx))).astype(np.int64)
    for n in np.unique(n_sub):
        rows = np.flatnonzero(n_sub == n)
        block = np.empty((len(rows), n_snapshots, n_x))
        _integrate(u0[rows], nu[rows], dt_snap / n, int(n), block)
        out[rows] = block
    return out


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value for ==
class PCABasis:
    """Principal components of field snapshots, and the grid and times they came from."""

    basis: np.ndarray  # (K, n_x), orthonormal rows
    mean: np.ndarray  # (n_x,)
    explained_variance: np.ndarray  # (K,)
    explained_variance_ratio: np.ndarray  # (K,)
    x: np.ndarray  # (n_x,)
    t: np.ndarray  # (n_snapshots,) snapshot times; empty when unknown

    def __post_init__(self) -> None:
        k, n_x = self.basis.shape
        if self.mean.shape != (n_x,) or self.explained_variance.shape != (k,):
            raise ValueError(
                f"inconsistent PCA shapes: basis {self.basis.shape}, mean {self.mean.shape}, "
                f"explained_variance {self.explained_variance.shape}"
            )

    def project(self, fields: np.ndarray) -> np.ndarray:
        """(..., n_x) -> (..., K)"""
        return (np.asarray(fields) - self.mean) @ self.basis.T

    def reconstruct(self, components: np.ndarray) -> np.ndarray:
        """(..., K) -> (..., n_x)"""
        return np.asarray(components) @ self.basis + self.mean

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:  # a file object, so np.savez keeps the name as given
            np.savez(
                f,
                basis=self.basis,
                mean=self.mean,
                explained_variance=self.explained_variance,
                explained_variance_ratio=self.explained_variance_ratio,
                x=self.x,
                t=self.t,
            )

    @classmethod
    def load(cls, path: str | Path) -> PCABasis:
        with np.load(path, allow_pickle=False) as z:
            return cls(**{name: z[name] for name in cls.__dataclass_fields__})


class SnapshotMoments:
    """Running count, sum and Gram matrix of snapshots, so PCA never needs them all at once."""

    def __init__(self, n_x: int) -> None:
        self.count = 0
        self.shift: np.ndarray | None = None
        self.total = np.zeros(n_x)
        self.gram = np.zeros((n_x, n_x))

    def add(self, snapshots: np.ndarray) -> None:
        """snapshots (M, n_x)"""
        if self.shift is None:
            # moments about a first-batch mean, not zero, so the covariance does not cancel
            self.shift = snapshots.mean(axis=0)
        centred = snapshots - self.shift
        self.count += len(snapshots)
        self.total += centred.sum(axis=0)
        self.gram += centred.T @ centred

    def fit(self, k: int, x: np.ndarray, t: np.ndarray) -> PCABasis:
        if self.count < 2 or self.shift is None:
            raise ValueError(f"need at least 2 snapshots to fit a PCA, got {self.count}")
        n_x = len(self.total)
        if not 1 <= k <= n_x:
            raise ValueError(f"k must be in 1..{n_x} (the field size), got {k}")
        centre = self.total / self.count
        cov = (self.gram - self.count * np.outer(centre, centre)) / (self.count - 1)
        eigval, eigvec = np.linalg.eigh(cov)  # ascending
        eigval = np.clip(eigval[::-1], 0.0, None)
        basis = eigvec[:, ::-1][:, :k].T.copy()
        # fix each component's sign (its largest entry positive) so the CSVs do not depend on LAPACK
        flip = np.sign(basis[np.arange(k), np.abs(basis).argmax(axis=1)])
        basis *= flip[:, None]
        total_var = eigval.sum()
        ratio = eigval[:k] / total_var if total_var > 0 else np.zeros(k)
        return PCABasis(basis, self.shift + centre, eigval[:k], ratio, np.asarray(x), np.asarray(t))


def load_pca(data_dir: str | Path) -> PCABasis | None:
    """The basis saved beside synthetic CSVs; None for a folder without one (user data)."""
    path = Path(data_dir) / PCA_FILE
    return PCABasis.load(path) if path.is_file() else None


def is_burgers(data_dir: str | Path) -> bool:
    """Whether a folder holds the embedded Burgers data (seqgen synth's basis and settings beside
    the CSVs), whose fields obey its physics: mean conserved, energy never rising."""
    folder = Path(data_dir)
    if not (folder / PCA_FILE).is_file() or not (folder / SETTINGS_FILE).is_file():
        return False
    try:
        settings = json.loads((folder / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(settings, dict) and "nu_range" in settings


def _csv_text(step_rows: np.ndarray, pcs: np.ndarray, nu: float, amplitude: float) -> str:
    """One sample's CSV. pcs (T, K)"""
    n_steps, k = pcs.shape
    g = f"%.{PARAM_DIGITS}g"
    row = ",".join(["%d"] + [g] * (k + 2))
    values = np.column_stack([step_rows, pcs, np.full(n_steps, nu), np.full(n_steps, amplitude)])
    # one %-format over the whole file: ~20x faster than np.savetxt's per-row formatting
    header = ",".join(["step"] + [f"pc{i + 1}" for i in range(k)] + ["nu", "amplitude"])
    return header + "\n" + ((row + "\n") * n_steps) % tuple(values.ravel().tolist())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", newline="\n") as f:
        f.write(text)


def _made_by_synth(name: str) -> bool:
    """What synthesize writes (and the data cache loading adds)."""
    return name in (PCA_FILE, SETTINGS_FILE, ".seqgen-cache.npz") or (
        name.startswith("sample_") and name.endswith(".csv")
    )


def _check_target(out: Path, overwrite: bool) -> None:
    """`out` must be missing, empty, or (with overwrite) a folder synth made and nothing else."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{out} is not empty: pass --overwrite (overwrite=True) to replace it")
    cwd = Path.cwd().resolve()
    if out.resolve() in (cwd, *cwd.parents, Path.home().resolve()):
        raise ConfigError(f"--overwrite never replaces {out}: it holds the working folder or home")
    if not (out / SETTINGS_FILE).is_file():
        raise ConfigError(
            f"--overwrite replaces only a folder seqgen synth made; {out} has no {SETTINGS_FILE}"
        )
    others = sorted(e.name for e in out.iterdir() if not _made_by_synth(e.name))
    if others:
        raise ConfigError(
            f"--overwrite replaces only a folder seqgen synth made; {out} also holds "
            f"{', '.join(others[:3])}{' ...' if len(others) > 3 else ''}"
        )


def _log(progress: bool, message: str) -> None:
    if progress:
        log.info(f"synth: {message}")


def synthesize(
    out_dir: str | Path,
    n_samples: int = 5500,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    *,
    n_x: int = N_X,
) -> dict:
    """Simulate, fit the PCA on seed 0's training files, write sample_*.csv, pca.npz, synth.json.
    The folder appears whole or not at all: it is written beside the target, then renamed."""
    start = time.perf_counter()
    out = Path(os.path.abspath(out_dir))  # so out.name is never empty ('.')
    _check_target(out, overwrite)
    if n_samples < 3:
        raise ConfigError(f"n_samples must be at least 3 (train / val / test), got {n_samples}")
    nu, amplitude = burgers_params(n_samples, np.random.default_rng(seed))
    width = max(5, len(str(n_samples - 1)))  # fixed width: sorted names = sample order
    files = [f"sample_{i:0{width}d}.csv" for i in range(n_samples)]
    # beside the target (same file system, so the final rename is atomic), hidden from globs
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{token}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:  # /proc, a read-only disk, a file where a folder should be
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    try:
        pca, pcs = _simulate_and_compress(files, nu, amplitude, n_x, progress, start)
        steps = np.arange(N_SNAPSHOTS)
        for i, name in enumerate(files):
            _write_text(tmp / name, _csv_text(steps, pcs[i], nu[i], amplitude[i]))
        pca.save(tmp / PCA_FILE)
        settings = _settings(n_samples, seed, n_x, pca)
        _write_text(tmp / SETTINGS_FILE, json.dumps(settings, indent=1) + "\n")
        _check_target(out, overwrite)  # the folder may have filled while we simulated
        _swap_in(tmp, out, token)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a read-only folder: one line, old data kept
            raise ConfigError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    seconds = time.perf_counter() - start
    _log(progress, f"wrote {n_samples} samples to {out} ({seconds:.1f} s)")
    return {
        "n_samples": n_samples,
        "seconds": seconds,
        "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
        "out_dir": str(out),
    }


def _simulate_and_compress(
    files: list[str], nu, amplitude, n_x: int, progress: bool, start: float
) -> tuple[PCABasis, np.ndarray]:
    """Every sample simulated in chunks; the PCA fitted on seed 0's training files' snapshots;
    the components (N, T, K) of every sample."""
    n_samples = len(files)
    is_train = np.zeros(n_samples, dtype=bool)
    is_train[make_split(files, PCA_SPLIT_SEED).indices(files, "train")] = True
    fields = np.empty((n_samples, N_SNAPSHOTS, n_x))  # (N, T, n_x)
    moments = SnapshotMoments(n_x)
    for lo in range(0, n_samples, CHUNK):
        hi = min(lo + CHUNK, n_samples)
        fields[lo:hi] = simulate_burgers(nu[lo:hi], amplitude[lo:hi], n_x, N_SNAPSHOTS, T_FINAL)
        moments.add(fields[lo:hi][is_train[lo:hi]].reshape(-1, n_x))
        elapsed = time.perf_counter() - start
        _log(progress, f"simulated {hi}/{n_samples} samples ({elapsed:.1f} s)")
    pca = moments.fit(N_COMPONENTS, grid(n_x), np.linspace(0.0, T_FINAL, N_SNAPSHOTS))
    pcs = np.concatenate(
        [pca.project(fields[lo : lo + CHUNK]) for lo in range(0, n_samples, CHUNK)]
    )
    return pca, pcs


def _settings(n_samples: int, seed: int, n_x: int, pca: PCABasis) -> dict:
    """synth.json: how the data was made."""
    return {
        "n_samples": n_samples,
        "seed": seed,
        "nu_range": list(NU_RANGE),
        "amplitude_range": list(AMPLITUDE_RANGE),
        "initial_condition": f"{MEAN_U} + amplitude * (sin(x) + 0.5 * sin(2 x + 1))",
        "n_x": n_x,
        "n_snapshots": N_SNAPSHOTS,
        "t_final": T_FINAL,
        "n_components": N_COMPONENTS,
        "pca_split_seed": PCA_SPLIT_SEED,
        "explained_variance_ratio": pca.explained_variance_ratio.tolist(),
    }


def _swap_in(tmp: Path, out: Path, token: str) -> None:
    """The finished folder takes the target's place; an old one is removed only afterwards."""
    old = out.parent / f".{out.name}.old-{token}"
    if out.exists():
        out.replace(old)
    try:
        tmp.replace(out)
    except BaseException:
        if old.exists():
            old.replace(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
