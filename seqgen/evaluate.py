"""Free-running evaluation of a trained model on one split, in the data's original units.

Every sequence of the split is generated from its parameters alone and measured against the
truth: MAE/RMSE (overall, per component, against time step), autocorrelation error (per sequence
and pooled), log-spectral distance, relative L2 error of the PCA-reconstructed fields (where the
data folder has a basis) and the gap to teacher-forced MAE.

Results go to a separate MLflow *evaluation run* in the evaluated model's experiment, not onto the
model's own run: a phase run stays a record of training only, a model can be evaluated again (on
another split or data folder) without colliding metric keys, and the analysis finds evaluations
with one tag (kind=evaluation) and links them back through `evaluated_run_id`.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from seqgen import metrics, tracking
from seqgen.bundle import Bundle
from seqgen.data import load_sequences
from seqgen.errors import ConfigError
from seqgen.generate import GENERATION_BATCH, generate_original
from seqgen.synth import PCABasis, load_pca

SWEEP_POINTS = 5  # generated trajectories per swept parameter
GENERATED_FILE = "generated.npz"
PER_SAMPLE_FILE = "per_sample.csv"
BY_STEP_FILE = "error_by_step.csv"


@dataclass
class Measures:
    """What one evaluation found: summary numbers, a row per sequence, a row per time step."""

    summary: dict[str, float]  # quantity (no split prefix) -> value
    per_sample: pd.DataFrame  # one row per sequence: file, params, per-sequence errors
    by_step: pd.DataFrame  # one row per time step: step, mae, mae_<component>


def metric_name(text: str) -> str:
    """A column name as a safe MLflow metric-key fragment ('PC 1' -> 'pc_1')."""
    return re.sub(r"[^a-z0-9_.-]+", "_", text.lower()).strip("_") or "x"


def measure(
    pred: np.ndarray,
    true: np.ndarray,
    pred_tf: np.ndarray,
    files: list[str],
    params: np.ndarray,
    param_names: list[str],
    component_names: list[str],
    steps: np.ndarray,
    max_lag: int,
    pca: PCABasis | None = None,
) -> Measures:
    """pred, true, pred_tf (N, T, K) original units; params (N, P); steps (T,) -> Measures."""
    overall = metrics.mae_rmse(pred, true)
    comp = [metric_name(c) for c in component_names]
    summary = {"mae": overall["mae"], "rmse": overall["rmse"]}
    summary |= {
        f"mae_{c}": float(v) for c, v in zip(comp, overall["mae_per_component"], strict=True)
    }
    summary |= {
        f"rmse_{c}": float(v) for c, v in zip(comp, overall["rmse_per_component"], strict=True)
    }

    per_sample = pd.DataFrame({"file": list(files)})
    for j, name in enumerate(param_names):
        per_sample[name] = np.asarray(params)[:, j].astype(np.float64)
    per_sample["mae"] = metrics.per_sequence_mae(pred, true)
    per_sample["rmse"] = metrics.per_sequence_rmse(pred, true)
    per_sample["acf_error"] = metrics.acf_error_per_sequence(pred, true, max_lag)
    per_sample["spectral_error"] = metrics.spectral_error_per_sequence(pred, true)
    per_sample["mae_teacher_forced"] = metrics.per_sequence_mae(pred_tf, true)
    summary["acf_error"] = float(per_sample["acf_error"].mean())
    summary["acf_error_pooled"] = metrics.pooled_acf_error(pred, true, max_lag)
    summary["spectral_error"] = float(per_sample["spectral_error"].mean())
    if pca is not None:
        # Both fields go through the same basis, so this is the surrogate's error alone, not
        # the PCA truncation's.
        per_sample["field_rel_l2"] = metrics.field_relative_l2(
            pca.reconstruct(pred), pca.reconstruct(true)
        )
        summary["field_rel_l2"] = float(per_sample["field_rel_l2"].mean())
    summary["mae_teacher_forced"] = metrics.mae_rmse(pred_tf, true)["mae"]
    summary["tf_gap"] = summary["mae"] - summary["mae_teacher_forced"]

    by_step = pd.DataFrame({"step": np.asarray(steps), "mae": metrics.error_by_step(pred, true)})
    for k, c in enumerate(comp):
        by_step[f"mae_{c}"] = metrics.error_by_step(pred[..., k : k + 1], true[..., k : k + 1])
    return Measures(summary, per_sample, by_step)


@torch.no_grad()
def teacher_forced_original(
    model, bundle: Bundle, params: np.ndarray, targets: np.ndarray
) -> np.ndarray:
    """One-step-ahead predictions fed the true previous value at every step: params (N, P),
    targets (N, T, K) original units -> (N, T, K) original units."""
    norm = bundle.normalizer
    model.eval()
    p = torch.as_tensor(norm.normalize_params(np.asarray(params, dtype=np.float32)))
    y = torch.as_tensor(norm.normalize_components(np.asarray(targets, dtype=np.float32)))
    out = [
        model(p[i : i + GENERATION_BATCH], y[i : i + GENERATION_BATCH], 1.0)
        for i in range(0, len(p), GENERATION_BATCH)
    ]
    return norm.denormalize_components(torch.cat(out).numpy())


def sweep_params(all_params: np.ndarray, n_points: int = SWEEP_POINTS) -> np.ndarray:
    """For each parameter p, n_points values across the data's range (log-spaced when positive
    and spanning over a decade), the others at their median: (N, P) -> (P, n_points, P).

    The range is the whole data folder's, not the split's, so every seed sweeps the same values.
    """
    all_params = np.asarray(all_params, dtype=np.float64)
    median = np.median(all_params, axis=0)
    out = np.repeat(median[None, None, :], all_params.shape[1], axis=0)
    out = np.repeat(out, n_points, axis=1)
    for p in range(all_params.shape[1]):
        lo, hi = all_params[:, p].min(), all_params[:, p].max()
        log = lo > 0 and hi / lo > 10
        out[p, :, p] = np.geomspace(lo, hi, n_points) if log else np.linspace(lo, hi, n_points)
    return out.astype(np.float32)


def _data_folder(data_dir: str | None, bundle: Bundle) -> Path:
    folder = Path(data_dir or bundle.data.data_dir)
    if not folder.is_dir():
        where = "--data" if data_dir else "the model's training data folder"
        raise ConfigError(f"{where} {folder} does not exist here: pass --data_dir DIR")
    return folder


def evaluate_model(
    model_uri: str,
    data_dir: str | None = None,
    split_name: str = "test",
    max_lag: int = metrics.ACF_MAX_LAG,
) -> dict:
    """Generate `split_name` free-running, measure it, log an evaluation run; return a summary."""
    tracking.check_tracking_store()
    # An alias is resolved once: the version loaded is the version recorded, even if the alias
    # moves while this evaluation runs.
    exact_uri = tracking.exact_model_uri(model_uri)
    bundle = tracking.load_bundle(exact_uri)
    folder = _data_folder(data_dir, bundle)
    cfg = bundle.model_config
    data = load_sequences(folder, cfg.n_components, cfg.n_params)
    if data.param_names != bundle.data.param_names:
        raise ConfigError(
            f"{folder} has parameters {list(data.param_names)}, the model was "
            f"trained on {list(bundle.data.param_names)}"
        )
    if not 1 <= max_lag < data.seq_len:
        raise ConfigError(
            f"--max-lag must be in 1..{data.seq_len - 1} for sequences of "
            f"{data.seq_len} steps, got {max_lag}"
        )
    idx = bundle.split.indices(data.files, split_name)
    if len(idx) == 0:
        raise ConfigError(f"the model's {split_name} split is empty")
    files = [data.files[i] for i in idx]
    params, true = data.params[idx], data.components[idx]

    model = bundle.build_model()
    pred = generate_original(model, bundle, params)  # (N, T, K)
    pred_tf = teacher_forced_original(model, bundle, params, true)
    pca = load_pca(folder)
    found = measure(
        pred,
        true,
        pred_tf,
        files,
        params,
        list(data.param_names),
        list(data.component_names),
        data.steps,
        max_lag,
        pca,
    )
    sweeps = sweep_params(data.params)  # (P, S, P)
    sweep_pred = generate_original(model, bundle, sweeps.reshape(-1, sweeps.shape[-1]))

    source = tracking.model_source(exact_uri, bundle.run_id)
    run_name = f"eval-{bundle.strategy}-p{bundle.phase}-s{bundle.seed}"
    tags = {
        "kind": "evaluation",
        "model_uri": model_uri,
        "evaluated_model_uri": exact_uri,
        "strategy": bundle.strategy,
        "phase": bundle.phase,
        "seed": bundle.seed,
        "preset": bundle.preset,
        "split": split_name,
        "dataset_fingerprint": data.fingerprint,
        "same_data_as_training": data.fingerprint == bundle.data.fingerprint,
        **{k: v for k, v in source.items() if k != "experiment_id"},
    }
    with tracking.tracked_run(run_name, tags, in_experiment=source.get("experiment_id")) as run:
        run_id = run.info.run_id
        tracking.log_params(
            {
                "model_uri": model_uri,
                "data_dir": str(folder),
                "split": split_name,
                "max_lag": max_lag,
                "n_samples": len(idx),
            }
        )
        # step = the global epoch of the evaluated weights, so evaluations line up with training
        tracking.log_metrics(
            {f"{split_name}_{k}": v for k, v in found.summary.items()}, step=bundle.epoch
        )
        with tempfile.TemporaryDirectory(prefix="seqgen-eval-") as tmp:
            out = Path(tmp)
            found.per_sample.to_csv(out / PER_SAMPLE_FILE, index=False)
            found.by_step.rename(columns={"step": data.step_name}).to_csv(
                out / BY_STEP_FILE, index=False
            )
            arrays = {
                "files": np.array(files),
                "params": params,
                "pred": pred,
                "true": true,
                "steps": data.steps,
                "param_names": np.array(data.param_names),
                "component_names": np.array(data.component_names),
                "sweep_params": sweeps,
                "sweep_pred": sweep_pred.reshape(*sweeps.shape[:2], *pred.shape[1:]),
            }
            if pca is not None:
                arrays |= {
                    "pca_basis": pca.basis,
                    "pca_mean": pca.mean,
                    "pca_x": pca.x,
                    "pca_t": pca.t,
                }
            np.savez_compressed(out / GENERATED_FILE, **arrays)
            summary = {
                "run_id": run_id,
                "model_uri": model_uri,
                "evaluated_model_uri": exact_uri,
                "split": split_name,
                "n_samples": len(idx),
                "epoch": bundle.epoch,
                "metrics": {f"{split_name}_{k}": v for k, v in found.summary.items()},
            }
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            for name in (PER_SAMPLE_FILE, BY_STEP_FILE, GENERATED_FILE, "summary.json"):
                tracking.log_artifact(out / name)
    return summary
