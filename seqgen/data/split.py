"""Train / validation / test split by file name: seeded, deterministic, saved with every run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqgen.errors import DataError

N_TRAIN = 4400  # the original workflow's split: 4400 train / 550 validation / the rest test
N_VAL = 550
FALLBACK_FRACTIONS = (0.8, 0.1)  # used when there are fewer than N_TRAIN + N_VAL + 1 samples


@dataclass(frozen=True)
class Split:
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int
    note: str | None = None  # says when the 80/10/10 fallback was used

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
