"""Generation in the data's original units from a model bundle (used by pyfunc and evaluation)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from seqgen.bundle import Bundle

GENERATION_BATCH = 1024


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


def generate_frame(model, bundle: Bundle, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per parameter set (columns = the data's parameter names) -> long format
    (sample, step, components...), sample = the input row's position."""
    names = list(bundle.data.param_names)
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise ValueError(f"input is missing parameter column(s) {missing}; expected {names}")
    params = frame[names].to_numpy(dtype=np.float32)
    if not np.isfinite(params).all():
        row = int(np.flatnonzero(~np.isfinite(params).all(axis=1))[0])
        raise ValueError(f"input row {row} has a missing or non-finite parameter value")
    seqs = generate_original(model, bundle, params)  # (N, T, K)
    n, t, _ = seqs.shape
    steps = np.asarray(bundle.data.steps)
    long = pd.DataFrame(seqs.reshape(n * t, -1), columns=list(bundle.data.component_names))
    long.insert(0, bundle.data.step_name, np.tile(steps, n))
    long.insert(0, "sample", np.repeat(np.arange(n), t))
    return long
