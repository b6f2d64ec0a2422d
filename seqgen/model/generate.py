"""Generation in the data's original units from a model bundle (used by pyfunc and evaluation)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from seqgen.errors import SeqgenError
from seqgen.model.bundle import Bundle

GENERATION_BATCH = 1024
OUTSIDE_RANGE = "outside_training_range"  # output column: a parameter outside the trained range


class InputError(SeqgenError, ValueError):
    """A prediction request the model refuses (no rows, a missing column, a missing value)."""


@torch.no_grad()
def generate_original(model, bundle: Bundle, params: np.ndarray) -> np.ndarray:
    """params (N, P) in original units -> generated sequences (N, T, K) in original units."""
    norm, seq_len = bundle.normalizer, bundle.data.seq_len
    device = next(model.parameters()).device
    p = torch.as_tensor(norm.normalize_params(np.asarray(params, dtype=np.float32)), device=device)
    chunks = [
        model.generate(p[i : i + GENERATION_BATCH], seq_len).cpu()
        for i in range(0, len(p), GENERATION_BATCH)
    ]
    out = torch.cat(chunks) if chunks else torch.empty(0, seq_len, model.config.n_components)
    return norm.denormalize_components(out.numpy())


def check_input(bundle: Bundle, frame: pd.DataFrame) -> np.ndarray:
    """The parameter columns of a request as (N, P) float32, or InputError saying what is wrong.

    Columns are matched by name; any other column is ignored (an id column may ride along)."""
    names = list(bundle.data.param_names)
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"input must be a table with columns {names}, got {type(frame).__name__}")
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise InputError(f"input is missing parameter column(s) {missing}; expected {names}")
    if frame.empty:
        raise InputError(f"input has no rows: send one row per parameter set with columns {names}")
    try:
        params = frame[names].to_numpy(dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(f"input columns {names} must hold numbers") from None
    bad = ~np.isfinite(params)
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        raise InputError(
            f"input row {row} has a missing or non-finite parameter value ({names[col]})"
        )
    return params


def outside_training_range(bundle: Bundle, params: np.ndarray) -> np.ndarray | None:
    """(N, P) -> (N,) bool: a parameter lies outside its training-split range; None when the
    model file does not know its ranges (format 1)."""
    if bundle.data.param_ranges is None:
        return None
    lo, hi = np.asarray(bundle.data.param_ranges, dtype=np.float32).T  # (P,), (P,)
    return ((params < lo) | (params > hi)).any(axis=1)


def generate_frame(model, bundle: Bundle, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per parameter set (columns = the data's parameter names) -> long format
    (sample, step, components..., outside_training_range), sample = the input row's position.

    Parameter sets outside the trained ranges are answered, flagged True in the last column
    (a surrogate extrapolates there); format-1 models, which do not know their ranges, have no
    such column."""
    params = check_input(bundle, frame)
    seqs = generate_original(model, bundle, params)  # (N, T, K)
    n, t, _ = seqs.shape
    steps = np.asarray(bundle.data.steps)
    long = pd.DataFrame(seqs.reshape(n * t, -1), columns=list(bundle.data.component_names))
    long.insert(0, bundle.data.step_name, np.tile(steps, n))
    long.insert(0, "sample", np.repeat(np.arange(n), t))
    outside = outside_training_range(bundle, params)
    if outside is not None:
        long[OUTSIDE_RANGE] = np.repeat(outside, t)
    return long
