"""Train / validation / test split by file name: seeded, deterministic, saved with every run.

Two kinds: `random` (the original's seeded 4400/550/rest) and `edge`, whose validation and test
samples lie outside the training range: in the top `edge_fraction` of some parameter's range
(on a log scale for a positive parameter spanning more than a decade, as its sweep is drawn).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqgen.errors import ConfigError, DataError

N_TRAIN = 4400  # the original workflow's split: 4400 train / 550 validation / the rest test
N_VAL = 550
FALLBACK_FRACTIONS = (0.8, 0.1)  # used when there are fewer than N_TRAIN + N_VAL + 1 samples
# The edge band is divided into validation and test by this seed whatever the run's seed: every
# seed then trains on the same interior and is scored on the same outside samples, so their
# spread is training's alone and an ensemble of them has test samples none of its members saw.
EDGE_SHUFFLE_SEED = 0
MIN_PART = 2  # samples an edge split needs in each part (knn chooses k, direct stops early)


@dataclass(frozen=True)
class Split:
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int
    note: str | None = None  # says when the 80/10/10 fallback was used
    kind: str = "random"  # random or edge
    edge_fraction: float | None = None  # the band of an edge split

    def part(self, name: str) -> tuple[str, ...]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split part {name!r}: use train, val or test")
        return getattr(self, name)

    @property
    def fingerprint(self) -> str:
        """sha256 of the three file lists (16 hex chars): runs on the same samples share it.

        A data folder's fingerprint does not tell splits apart (seeds, or --max_samples, which
        keeps the whole folder's fingerprint), so evaluations are paired on this one.
        """
        parts = [list(self.train), list(self.val), list(self.test)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def indices(self, files: list[str] | tuple[str, ...], name: str) -> np.ndarray:
        """Positions of one part's files in `files` (the dataset's file order)."""
        position = {f: i for i, f in enumerate(files)}
        missing = [f for f in self.part(name) if f not in position]
        if missing:
            raise DataError(
                f"the saved split names {len(missing)} file(s) not in the data "
                f"(first: {missing[0]}): the data folder changed since this experiment started"
            )
        return np.array([position[f] for f in self.part(name)], dtype=np.int64)

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "note": self.note,
            "kind": self.kind,
            "edge_fraction": self.edge_fraction,
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Split:
        return cls(
            train=tuple(d["train"]),
            val=tuple(d["val"]),
            test=tuple(d["test"]),
            seed=int(d["seed"]),
            note=d.get("note"),
            kind=str(d.get("kind") or "random"),  # files saved before edge splits: random
            edge_fraction=None if d.get("edge_fraction") is None else float(d["edge_fraction"]),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))


def make_split(
    files: list[str] | tuple[str, ...], seed: int, n_train: int = N_TRAIN, n_val: int = N_VAL
) -> Split:
    """Seeded shuffle of the file names, then n_train / n_val / rest (80/10/10 if too few)."""
    files = sorted(files)
    n = len(files)
    if n < 3:
        raise DataError(f"need at least 3 samples to split into train/val/test, got {n}")
    note = None
    if n < n_train + n_val + 1:
        n_train = max(1, int(round(FALLBACK_FRACTIONS[0] * n)))
        n_val = max(1, int(round(FALLBACK_FRACTIONS[1] * n)))
        n_train = min(n_train, n - n_val - 1)
        note = (
            f"{n} samples is fewer than {N_TRAIN} + {N_VAL} + 1: "
            f"split 80/10/10 instead ({n_train} train / {n_val} val / {n - n_train - n_val} test)"
        )
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [files[i] for i in order]
    return Split(
        train=tuple(shuffled[:n_train]),
        val=tuple(shuffled[n_train : n_train + n_val]),
        test=tuple(shuffled[n_train + n_val :]),
        seed=seed,
        note=note,
    )


def log_scaled(values: np.ndarray) -> bool:
    """Whether a parameter is read on a log scale: positive and spanning more than a decade."""
    lo, hi = float(np.min(values)), float(np.max(values))
    return lo > 0 and hi / lo > 10


def edge_band(params: np.ndarray, fraction: float) -> np.ndarray:
    """(N, P) -> (N,) bool: for some parameter that varies, the sample's value lies in the top
    `fraction` of that parameter's range (value >= max - fraction * (max - min), on a log scale
    where log_scaled)."""
    params = np.asarray(params, dtype=np.float64)
    band = np.zeros(len(params), dtype=bool)
    for p in params.T:
        v = np.log(p) if log_scaled(p) else p
        lo, hi = v.min(), v.max()
        if hi > lo:
            band |= v >= hi - fraction * (hi - lo)
    return band


def make_edge_split(
    files: list[str] | tuple[str, ...],
    params: np.ndarray,
    seed: int,
    fraction: float,
    param_names: tuple[str, ...] | list[str] = (),
) -> Split:
    """Training on the interior, validation and test (half each, by a fixed seeded shuffle) in
    the edge band; params (N, P) row i belongs to files[i]. Raises ConfigError naming the sizes
    when a part would hold fewer than MIN_PART samples or no parameter varies."""
    params = np.asarray(params, dtype=np.float64)
    order = np.argsort(np.asarray(files, dtype=str), kind="stable")  # sorted, as make_split
    files, params = [files[i] for i in order], params[order]
    n = len(files)
    names = list(param_names) or [f"parameter {j + 1}" for j in range(params.shape[1])]
    if n == 0 or not any(np.ptp(p) > 0 for p in params.T):
        raise ConfigError(
            f"--split edge needs a parameter that varies: {', '.join(names)} each hold one value "
            f"over the {n} samples, so there is no range to hold an edge of"
        )
    band = edge_band(params, fraction)
    outside = np.flatnonzero(band)[np.random.default_rng(EDGE_SHUFFLE_SEED).permutation(band.sum())]
    n_val = len(outside) // 2
    train = [files[i] for i in np.flatnonzero(~band)]
    val, test = [files[i] for i in outside[:n_val]], [files[i] for i in outside[n_val:]]
    if min(len(train), len(val), len(test)) < MIN_PART:
        raise ConfigError(
            f"--split edge with --edge_fraction {fraction:g} leaves {len(train)} training / "
            f"{len(val)} validation / {len(test)} test samples of {n}: each part needs at "
            f"least {MIN_PART}"
        )
    note = f"edge split: {len(train)} train inside / {len(val)} val / {len(test)} test outside"
    return Split(tuple(train), tuple(val), tuple(test), seed, note, "edge", fraction)


def phase_split(
    files: list[str] | tuple[str, ...],
    params: np.ndarray,
    seed: int,
    kind: str = "random",
    fraction: float | None = None,
    param_names: tuple[str, ...] | list[str] = (),
) -> Split:
    """The split a phase of this seed makes of these files: make_split or make_edge_split."""
    if kind == "edge":
        if fraction is None:
            raise ValueError("an edge split needs its fraction")
        return make_edge_split(files, params, seed, fraction, param_names)
    return make_split(files, seed)
