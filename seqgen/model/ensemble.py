"""A seed ensemble: the registered models of several seeds of one phase, answering per step the
mean and the standard deviation over members (the spread a user reads as how far to trust a
generated sequence)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from seqgen.errors import ConfigError
from seqgen.model.bundle import Bundle
from seqgen.model.generate import OUTSIDE_RANGE, check_input, generate_original
from seqgen.model.generate import outside_training_range as outside_range

MEAN, STD = "_mean", "_std"  # suffixes of the answer's columns: u1_mean, u1_std


def check_members(bundles: dict[str, Bundle]) -> None:
    """Members must be one model of one data set: the same shape, columns, time axis and data
    (and at least two of them); else one line naming those that differ."""
    if len(bundles) < 2:
        raise ConfigError(f"an ensemble needs at least 2 members, got {len(bundles)}")

    def what(b: Bundle) -> dict:
        d = b.data
        return {
            "shape": b.model_config,
            "columns": (d.step_name, d.component_names, d.param_names, d.steps),
            "data": d.fingerprint,
            "split": (b.split.kind, b.split.edge_fraction),
        }

    first_uri, first = next(iter(bundles.items()))
    ref = what(first)
    for uri, b in bundles.items():
        differ = [k for k, v in what(b).items() if v != ref[k]]
        if differ:
            raise ConfigError(
                f"ensemble members differ in {', '.join(differ)}: {first_uri} and {uri}"
            )


def ensemble_original(models: list, bundles: list[Bundle], params: np.ndarray):
    """params (N, P) original units -> (mean, std) over members, each (N, T, K), and the
    members' sequences (M, N, T, K). std with ddof=1 (the members are a sample of seeds)."""
    seqs = np.stack([generate_original(m, b, params) for m, b in zip(models, bundles, strict=True)])
    return seqs.mean(axis=0), seqs.std(axis=0, ddof=1), seqs


def ensemble_frame(models: list, bundles: list[Bundle], frame: pd.DataFrame) -> pd.DataFrame:
    """One row per parameter set -> long format (sample, step, <component>_mean, <component>_std
    ..., outside_training_range), as a single model's pyfunc answers with the spread beside."""
    first = bundles[0]
    params = check_input(first, frame)
    mean, std, _ = ensemble_original(models, bundles, params)
    n, t, _ = mean.shape
    d = first.data
    long = pd.DataFrame({"sample": np.repeat(np.arange(n), t), d.step_name: np.tile(d.steps, n)})
    for k, c in enumerate(d.component_names):
        long[f"{c}{MEAN}"] = mean[:, :, k].reshape(-1)
        long[f"{c}{STD}"] = std[:, :, k].reshape(-1)
    flags = [outside_range(b, params) for b in bundles]
    if all(f is not None for f in flags):  # outside any member's range
        long[OUTSIDE_RANGE] = np.repeat(np.any(flags, axis=0), t)
    return long
