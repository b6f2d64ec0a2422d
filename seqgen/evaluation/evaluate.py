"""Free-running evaluation of a trained model on one split, in the data's original units, with the
baselines it must beat scored beside it on the same samples.

Every sequence of the split is generated from its parameters alone and measured against the
truth: MAE/RMSE (overall, per component, against time step), autocorrelation error (per sequence
and pooled), log-spectral distance, relative L2 error of the PCA-reconstructed fields (where the
data folder has a basis) and the gap to teacher-forced MAE. The baselines of
seqgen.evaluation.baselines (mean, knn, direct) are fitted on the same split's training part and
measured by the same code (without the teacher-forced entries, which they have no use for).

Results go to separate MLflow *evaluation runs*, not onto the model's own run: a phase run stays
a record of training only, a model can be evaluated again (on another split or data folder)
without colliding metric keys, and the analysis finds evaluations with one tag (kind=evaluation),
links a model's back through `evaluated_run_id` and pairs it with the baselines through
`split_fingerprint`. A baseline's evaluation is logged once per (data, split, seed, settings) and
found again in the store by those tags, so each further model evaluation costs no refit.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from seqgen.config import strategies
from seqgen.data.sequences import SequenceData, load_sequences
from seqgen.data.split import Split, log_scaled, phase_split
from seqgen.data.synth import PCABasis, is_burgers, load_pca
from seqgen.errors import ConfigError, DataError
from seqgen.evaluation import measures, metrics
from seqgen.evaluation.baselines import BASELINES, baseline_version, fit_baseline
from seqgen.model.bundle import Bundle
from seqgen.model.generate import GENERATION_BATCH, generate_original
from seqgen.runs import descriptions, tracking

SWEEP_POINTS = 5  # generated trajectories per swept parameter
GENERATED_FILE = "generated.npz"
PER_SAMPLE_FILE = "per_sample.csv"
BY_STEP_FILE = "error_by_step.csv"
SUMMARY_FILE = "summary.json"

logger = logging.getLogger(__name__)
NO_LOG_FIX = "pass --no_log to evaluate without logging, or ask its admin for EDIT on it"


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
    pred_tf: np.ndarray | None,
    files: list[str],
    params: np.ndarray,
    param_names: list[str],
    component_names: list[str],
    steps: np.ndarray,
    max_lag: int,
    pca: PCABasis | None = None,
    scale: np.ndarray | None = None,
    burgers: bool = False,
) -> Measures:
    """pred, true, pred_tf (N, T, K) original units; params (N, P); steps (T,) -> Measures.
    Without pred_tf (a baseline) the teacher-forced MAE and the gap to it are left out. scale (K,):
    each component's spread over the data, the unit of the valid horizon (default: over `true`);
    burgers: the data is the embedded Burgers data, whose physics the fields are checked against
    (needs pca)."""
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
    if pred_tf is not None:
        per_sample["mae_teacher_forced"] = metrics.per_sequence_mae(pred_tf, true)
    summary["acf_error"] = float(per_sample["acf_error"].mean())
    summary["acf_error_pooled"] = metrics.pooled_acf_error(pred, true, max_lag)
    summary["spectral_error"] = float(per_sample["spectral_error"].mean())
    if pca is not None:
        pred_fields, true_fields = pca.reconstruct(pred), pca.reconstruct(true)
        # Both fields go through the same basis, so this is the surrogate's error alone, not
        # the PCA truncation's.
        per_sample["field_rel_l2"] = metrics.field_relative_l2(pred_fields, true_fields)
        summary["field_rel_l2"] = float(per_sample["field_rel_l2"].mean())
        if burgers:
            summary |= _physics(pred_fields, true_fields, per_sample)
    summary |= _rollout(pred, true, true.std(axis=(0, 1)) if scale is None else scale, per_sample)
    if pred_tf is not None:
        summary["mae_teacher_forced"] = metrics.mae_rmse(pred_tf, true)["mae"]
        summary["tf_gap"] = summary["mae"] - summary["mae_teacher_forced"]

    by_step = pd.DataFrame({"step": np.asarray(steps), "mae": metrics.error_by_step(pred, true)})
    for k, c in enumerate(comp):
        by_step[f"mae_{c}"] = metrics.error_by_step(pred[..., k : k + 1], true[..., k : k + 1])
    return Measures(summary, per_sample, by_step)


def _rollout(pred, true, scale: np.ndarray, per_sample: pd.DataFrame) -> dict[str, float]:
    """The valid horizon per sequence (into per_sample) with its mean and quantiles, the MAE of
    each time window and its growth: pred, true (N, T, K), scale (K,)."""
    horizon = metrics.valid_horizon(pred, true, scale)
    per_sample["valid_horizon"] = horizon
    out = {"valid_horizon": float(horizon.mean())}
    out |= {
        f"valid_horizon_p{q}": float(v)
        for q, v in zip(measures.QUANTILES, np.percentile(horizon, measures.QUANTILES), strict=True)
    }
    windows = metrics.error_by_window(pred, true)
    out |= {f"window_{i}_mae": float(v) for i, v in enumerate(windows, start=1)}
    out["error_growth"] = float(windows[-1] / windows[0]) if windows[0] > 0 else float("nan")
    return out


def _physics(pred_fields, true_fields, per_sample: pd.DataFrame) -> dict[str, float]:
    """Conservation of the domain mean and energy that must not rise, as violating steps per
    sequence (into per_sample), their means and the true fields' own means as references."""
    out = {}
    for m in measures.select(physics=True):
        law = getattr(metrics, m.key)  # metrics.mean_violations, metrics.energy_violations
        per_sample[m.key] = law(pred_fields)
        out[m.key] = float(per_sample[m.key].mean())
        if m.reference:
            out[f"true_{m.key}"] = float(law(true_fields).mean())
    return out


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
        log = log_scaled(all_params[:, p])
        out[p, :, p] = np.geomspace(lo, hi, n_points) if log else np.linspace(lo, hi, n_points)
    return out.astype(np.float32)


# ---- what is evaluated: one part of a split of a data folder -----------------------------------


@dataclass(frozen=True)
class EvalSet:
    """The samples an evaluation scores (one part of a split of a data folder) and how."""

    data: SequenceData  # the whole folder; the split names the samples
    split: Split
    part: str  # train, val or test
    max_lag: int  # ACF lags 1..max_lag
    pca: PCABasis | None
    folder: Path
    burgers: bool = False  # the embedded Burgers data: its physics is checked

    def __post_init__(self) -> None:
        if not 1 <= self.max_lag < self.data.seq_len:
            raise ConfigError(
                f"--max_lag must be in 1..{self.data.seq_len - 1} for sequences of "
                f"{self.data.seq_len} steps, got {self.max_lag}"
            )
        if len(self.idx) == 0:
            raise DataError(f"the {self.part} split is empty: nothing to evaluate")

    @cached_property
    def idx(self) -> np.ndarray:  # (N,) positions of the part's files in the data
        return self.split.indices(self.data.files, self.part)

    @property
    def files(self) -> list[str]:
        return [self.data.files[i] for i in self.idx]

    @property
    def params(self) -> np.ndarray:  # (N, P) original units
        return self.data.params[self.idx]

    @property
    def true(self) -> np.ndarray:  # (N, T, K) original units
        return self.data.components[self.idx]

    @property
    def dataset(self) -> tuple[str, str]:
        """(name, digest) of the samples scored, as a LoggedModel's metrics name their dataset:
        the data folder and part ('burgers-test'), the split's fingerprint."""
        return f"{self.folder.name}-{self.part}", self.split.fingerprint

    @cached_property
    def scale(self) -> np.ndarray:  # (K,) each component's spread over the whole data folder
        return self.data.components.std(axis=(0, 1))

    def measure(self, pred: np.ndarray, pred_tf: np.ndarray | None = None) -> Measures:
        d = self.data
        return measure(
            pred,
            self.true,
            pred_tf,
            self.files,
            self.params,
            list(d.param_names),
            list(d.component_names),
            d.steps,
            self.max_lag,
            self.pca,
            self.scale,
            self.burgers,
        )

    def sweeps(self) -> np.ndarray:
        return sweep_params(self.data.params)  # (P, S, P)

    def arrays(self, pred: np.ndarray, sweeps: np.ndarray, sweep_pred: np.ndarray) -> dict:
        """generated.npz: the part's sequences and names, the sweeps, the PCA basis.
        pred (N, T, K); sweeps (P, S, P); sweep_pred (P * S, T, K)."""
        d = self.data
        out = {
            "files": np.array(self.files),
            "params": self.params,
            "pred": pred,
            "true": self.true,
            "steps": d.steps,
            "param_names": np.array(d.param_names),
            "component_names": np.array(d.component_names),
            "sweep_params": sweeps,
            "sweep_pred": sweep_pred.reshape(*sweeps.shape[:2], *pred.shape[1:]),
        }
        if self.pca is not None:
            p = self.pca
            out |= {"pca_basis": p.basis, "pca_mean": p.mean, "pca_x": p.x, "pca_t": p.t}
        return out

    def tags(self) -> dict[str, str]:
        """What identifies the samples and the measures: any two runs that share these scored
        the same sequences the same way."""
        return {
            "split": self.part,
            "dataset_fingerprint": self.data.fingerprint,
            "split_fingerprint": self.split.fingerprint,
            "max_lag": str(self.max_lag),
        }


def eval_set(data: SequenceData, split: Split, part: str, max_lag: int, folder: Path) -> EvalSet:
    """The EvalSet of one part of a split of the data in `folder`, with its PCA basis; says in
    one line when the physics measures are skipped (data other than the embedded Burgers)."""
    pca, burgers = load_pca(folder), is_burgers(folder)
    if not burgers:
        physics = ", ".join(m.name for m in measures.select(physics=True))
        logger.info(
            f"physics measures skipped ({physics}): {folder} is not the embedded Burgers data "
            "(seqgen synth's pca.npz and synth.json)"
        )
    return EvalSet(data, split, part, max_lag, pca, folder, burgers)


def evaluation_summary(
    es: EvalSet, found: Measures, run_id: str | None, extra: dict | None = None
) -> dict:
    """What an evaluation says: its run (None when not logged), the split, `{part}_{quantity}`
    metrics."""
    metrics = {f"{es.part}_{k}": v for k, v in found.summary.items()}
    return {
        "run_id": run_id,
        **(extra or {}),
        "split": es.part,
        "n_samples": len(es.idx),
        "metrics": metrics,
    }


def log_evaluation(
    run_name: str,
    tags: dict,
    params: dict,
    es: EvalSet,
    found: Measures,
    arrays: dict[str, np.ndarray],
    experiment_id: str | None,
    parent: str | None = None,
    extra_metrics: dict[str, float] | None = None,
    extra_summary: dict | None = None,
    model_id: str | None = None,
) -> dict:
    """One evaluation run (tag kind=evaluation), nested under `parent` when given: tags, params,
    `{part}_{quantity}` metrics at step 0 (one value each: `mlflow ui` draws them as bars),
    per_sample.csv, error_by_step.csv, generated.npz and summary.json; returns the summary.
    model_id: the LoggedModel evaluated, which gets the measures too, on the dataset named by
    the data folder and the split's samples (es.dataset)."""
    # split_fingerprint names the samples; split_kind says whether they lie outside the training
    # range (kept out of es.tags(), which finds a baseline again, so none is refitted for it)
    all_tags = {"kind": "evaluation", **es.tags(), "split_kind": es.split.kind, **tags}
    with tracking.tracked_run(run_name, all_tags, experiment_id, parent) as run:
        # what the tags say (split, max_lag, the model, the baseline, the seed) is not a param
        tracking.log_params({"data_dir": str(es.folder), "n_samples": len(es.idx)} | params)
        summary = evaluation_summary(es, found, run.info.run_id, extra_summary)
        tracking.log_metrics(summary["metrics"], 0, model_id, es.dataset if model_id else None)
        if extra_metrics:
            tracking.log_metrics(extra_metrics, step=0)
        with tempfile.TemporaryDirectory(prefix="seqgen-eval-") as tmp:
            out = Path(tmp)
            found.per_sample.to_csv(out / PER_SAMPLE_FILE, index=False)
            found.by_step.rename(columns={"step": es.data.step_name}).to_csv(
                out / BY_STEP_FILE, index=False
            )
            np.savez_compressed(out / GENERATED_FILE, **arrays)
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
            for name in (PER_SAMPLE_FILE, BY_STEP_FILE, GENERATED_FILE, SUMMARY_FILE):
                tracking.log_artifact(out / name)
    return summary


# ---- baselines ---------------------------------------------------------------------------------


def baseline_key(es: EvalSet, name: str, seed: int) -> dict[str, str]:
    """The tags a baseline evaluation is found again by: same data, split, part, lags, seed and
    baseline settings, same numbers."""
    return {
        "kind": "evaluation",
        "baseline": name,
        **es.tags(),
        "seed": str(seed),
        "baseline_version": baseline_version(name),
    }


@dataclass
class PendingBaselines:
    """Baselines looked up in the store and fitted, not yet logged."""

    seed: int
    names: tuple[str, ...]
    found: dict[str, dict]  # name -> summary of the evaluation found in the store
    fitted: dict[str, tuple]  # name -> (Baseline, pred (N, T, K), predict seconds, sweep_pred)
    sweeps: np.ndarray  # (P, S, P)


def prepare_baselines(
    es: EvalSet,
    seed: int,
    experiment_id: str | None = None,
    names: tuple[str, ...] = tuple(BASELINES),
    reuse: bool = True,
) -> PendingBaselines:
    """Find each baseline's evaluation on `es` in the store, fit (on the split's training part)
    and predict those not found. Opens no run, so bad input leaves nothing half-written."""
    where = tracking.target_experiment(experiment_id)
    found: dict[str, dict] = {}
    for name in names:
        hit = tracking.find_finished_run(where, baseline_key(es, name, seed)) if reuse else None
        if hit is not None:
            prefix = f"{es.part}_"
            found[name] = {
                "run_id": hit["run_id"],
                "reused": True,
                "fit_seconds": hit["metrics"].get("fit_seconds"),
                "metrics": {k: v for k, v in hit["metrics"].items() if k.startswith(prefix)},
            }
    sweeps = es.sweeps()
    fitted = {}
    for name in [n for n in names if n not in found]:
        logger.info(
            "fitting the %s baseline (%d training samples, seed %d)",
            name,
            len(es.split.train),
            seed,
        )
        baseline = fit_baseline(name, es.data, es.split, seed)
        started = time.perf_counter()
        pred = baseline.predict(es.params)
        predict_seconds = time.perf_counter() - started
        sweep_pred = baseline.predict(sweeps.reshape(-1, sweeps.shape[-1]))
        fitted[name] = (baseline, pred, predict_seconds, sweep_pred)
    return PendingBaselines(seed, tuple(names), found, fitted, sweeps)


def log_baselines(
    es: EvalSet, pending: PendingBaselines, experiment_id: str | None = None
) -> dict[str, dict]:
    """Log each fitted baseline as its own evaluation run (tag baseline=<name>), nested under
    the split's baselines run (`baselines-s<seed>`, kind=baselines: one per split, found again;
    under `mlflow run -e baselines`, the launcher's); returns every baseline's summary, found or
    logged, in the order asked."""
    out = dict(pending.found)
    seed = pending.seed
    parent = _baselines_run(es, seed, experiment_id) if pending.fitted else None
    for name, (baseline, pred, predict_seconds, sweep_pred) in pending.fitted.items():
        info = dict(baseline.info)
        fit_seconds = float(info.pop("fit_seconds"))
        val_mae = info.pop("val_mae", None)
        timing = dict(zip(measures.FIT_METRICS, (fit_seconds, predict_seconds), strict=True))
        look = {
            tracking.NOTE: descriptions.baseline_text(name, seed, es.part, len(es.idx)),
            tracking.RUN_COLOUR: descriptions.BASELINE_COLOURS.get(name, "#7f7f7f"),
        }
        out[name] = log_evaluation(
            f"baseline-{name}-s{seed}",
            baseline_key(es, name, seed) | look,
            info,
            es,
            es.measure(pred),
            es.arrays(pred, pending.sweeps, sweep_pred),
            experiment_id,
            parent,
            extra_metrics=timing | ({} if val_mae is None else {"fit_val_mae": val_mae}),
            extra_summary={"baseline": name, "reused": False, "fit_seconds": fit_seconds},
        )
    if parent is not None:  # the parent names each baseline's run
        tracking.set_run_tags(parent, {f"{n}_run_id": out[n]["run_id"] for n in pending.fitted})
        tracking.set_run_status(parent, "FINISHED")
    return {n: out[n] for n in pending.names}


def _baselines_run(es: EvalSet, seed: int, experiment_id: str | None) -> str:
    """The run the baselines of one split (and seed) are nested under, found again or made."""
    key = {"kind": "baselines", "seed": str(seed), **es.tags()}
    tags = {tracking.NOTE: descriptions.baselines_text(seed, es.split.fingerprint)}
    where = tracking.target_experiment(experiment_id)
    return tracking.open_run_once(where, f"baselines-s{seed}", key, tags)


def unlogged_baselines(es: EvalSet, pending: PendingBaselines) -> dict[str, dict]:
    """Every baseline's summary, found in the store or fitted here, with nothing logged."""
    out = dict(pending.found)
    for name, (baseline, pred, _, _) in pending.fitted.items():
        fit_seconds = float(baseline.info["fit_seconds"])
        fitted = {"baseline": name, "reused": False, "fit_seconds": fit_seconds}
        out[name] = evaluation_summary(es, es.measure(pred), None, fitted)
    return {n: out[n] for n in pending.names}


def ensure_baselines(
    es: EvalSet,
    seed: int,
    experiment_id: str | None = None,
    names: tuple[str, ...] = tuple(BASELINES),
    reuse: bool = True,
) -> dict[str, dict]:
    """Each baseline's evaluation on `es`: found in the store (reused: True), else fitted,
    measured and logged as its own evaluation run. Every fit runs before any run is opened."""
    pending = prepare_baselines(es, seed, experiment_id, names, reuse)
    return log_baselines(es, pending, experiment_id)


def beside_table(split_name: str, rows: dict[str, dict]) -> str:
    """A plain-text table of evaluation summaries, rows {label: summary with 'metrics'}: the
    measures a model is paired against the baselines on."""
    versus = [m.key for m in measures.select(versus=True)]
    cols = [c for c in versus if any(f"{split_name}_{c}" in r["metrics"] for r in rows.values())]
    width = max(len(label) for label in rows) + 2
    col = max([16, *(len(c) + 2 for c in cols)])  # every header apart from its neighbours
    lines = [f"{'':<{width}}" + "".join(f"{c:>{col}}" for c in cols) + f"{'fit s':>10}"]
    for label, r in rows.items():
        values = [r["metrics"].get(f"{split_name}_{c}", float("nan")) for c in cols]
        fit = r.get("fit_seconds")
        fit_text = f"{fit:>10.3g}" if fit is not None else f"{'':>10}"
        lines.append(f"{label:<{width}}" + "".join(f"{v:>{col}.5g}" for v in values) + fit_text)
    return "\n".join(lines)


# ---- entry points ------------------------------------------------------------------------------


def _data_folder(data_dir: str | None, bundle: Bundle) -> Path:
    folder = Path(data_dir or bundle.data.data_dir)
    if not folder.is_dir():
        where = "--data_dir" if data_dir else "the model's training data folder"
        raise ConfigError(f"{where} {folder} does not exist here: pass --data_dir DIR")
    return folder


def check_split_kind(bundle: Bundle, model_uri: str, split_kind: str | None) -> None:
    """A model is evaluated on its own split: --split, when given, must be the one it trained on."""
    if split_kind is not None and split_kind != bundle.split.kind:
        raise ConfigError(
            f"--split {split_kind}: {model_uri} was trained on the {bundle.split.kind} split and "
            f"is evaluated on it; train one with --split {split_kind} to evaluate that"
        )


def model_eval_set(bundle: Bundle, data_dir: str | None, split_name: str, max_lag: int) -> EvalSet:
    """The model's own split of the data folder (given, else the one it was trained on)."""
    folder = _data_folder(data_dir, bundle)
    cfg = bundle.model_config
    data = load_sequences(folder, cfg.n_components, cfg.n_params)
    if data.param_names != bundle.data.param_names:
        raise ConfigError(
            f"{folder} has parameters {list(data.param_names)}, the model was "
            f"trained on {list(bundle.data.param_names)}"
        )
    return eval_set(data, bundle.split, split_name, max_lag, folder)


def evaluate_model(
    model_uri: str,
    data_dir: str | None = None,
    split_name: str = "test",
    max_lag: int = metrics.ACF_MAX_LAG,
    baselines: bool = True,
    log: bool = True,
    split_kind: str | None = None,
) -> dict:
    """Generate `split_name` free-running, measure it, log an evaluation run with the baselines'
    beside it (fitted once per split, then found in the store); return a summary. log=False
    logs nothing (all a user who may only read can do): the summary has no run ids. split_kind,
    when given, must be the split the model trained on."""
    tracking.check_tracking_store()
    # An alias is resolved once: the version loaded is the version recorded, even if the alias
    # moves while this evaluation runs.
    exact_uri = tracking.exact_model_uri(model_uri)
    bundle = tracking.load_bundle(exact_uri)
    check_split_kind(bundle, model_uri, split_kind)
    es = model_eval_set(bundle, data_dir, split_name, max_lag)
    source = tracking.model_source(exact_uri, bundle.run_id)
    experiment = source.get("experiment_id")
    if log:  # refused before generating, not after
        tracking.check_can_log(tracking.target_experiment(experiment), fix=NO_LOG_FIX)

    model = bundle.build_model()
    pred = generate_original(model, bundle, es.params)  # (N, T, K)
    pred_tf = teacher_forced_original(model, bundle, es.params, es.true)
    found = es.measure(pred, pred_tf)
    sweeps = es.sweeps()
    sweep_pred = generate_original(model, bundle, sweeps.reshape(-1, sweeps.shape[-1]))

    names = tuple(BASELINES) if baselines else ()
    pending = prepare_baselines(es, bundle.seed, experiment, names)
    described = {"model_uri": model_uri, "evaluated_model_uri": exact_uri, "epoch": bundle.epoch}
    if not log:
        summary = evaluation_summary(es, found, None, described)
        return summary | {"baselines": unlogged_baselines(es, pending)}
    tags = {
        "model_uri": model_uri,
        "evaluated_model_uri": exact_uri,
        "strategy": bundle.strategy,
        "variant": bundle.variant_name,
        "phase": bundle.phase,
        "seed": bundle.seed,
        "preset": bundle.preset,
        "same_data_as_training": es.data.fingerprint == bundle.data.fingerprint,
        "epoch": bundle.epoch,  # the global epoch of the evaluated weights
        **{k: v for k, v in source.items() if k not in ("experiment_id", "chain_run_id")},
        tracking.NOTE: descriptions.evaluation_text(
            model_uri, exact_uri, split_name, len(es.idx), bundle.epoch
        ),
        tracking.RUN_COLOUR: descriptions.variant_colour(bundle.variant_name, strategies()),
    }
    summary = log_evaluation(
        f"eval-{bundle.variant_name}-p{bundle.phase}-s{bundle.seed}",
        tags,
        {},
        es,
        found,
        es.arrays(pred, sweeps, sweep_pred),
        experiment,
        source.get("chain_run_id"),  # nested under the chain whose phase made the model
        extra_summary=described,
        model_id=tracking.logged_model_id(exact_uri),
    )
    # Logged after the model's run, which under `mlflow run` is the run the launcher made.
    return summary | {"baselines": log_baselines(es, pending, experiment)}


def evaluate_baselines(
    data_dir: str | None,
    split_name: str = "test",
    model_uri: str | None = None,
    seed: int = 0,
    max_samples: int | None = None,
    max_lag: int = metrics.ACF_MAX_LAG,
    n_components: int | None = None,
    n_params: int | None = None,
    reuse: bool = True,
    split_kind: str | None = None,
    edge_fraction: float | None = None,
) -> dict[str, dict]:
    """The baselines alone, on a model's split (model_uri) or on the split training makes of
    data_dir's first max_samples files with `seed` (split_kind random, or edge with
    edge_fraction); logged (or found) as evaluation runs."""
    tracking.check_tracking_store()
    if model_uri is not None:
        exact_uri = tracking.exact_model_uri(model_uri)
        bundle = tracking.load_bundle(exact_uri)
        check_split_kind(bundle, model_uri, split_kind)
        es = model_eval_set(bundle, data_dir, split_name, max_lag)
        experiment = tracking.model_source(exact_uri, bundle.run_id).get("experiment_id")
        return _baselines_alone(es, bundle.seed, experiment, reuse)
    if not data_dir:
        raise ConfigError("pass --data_dir DIR (or --model URI to use a model's data and split)")
    if max_samples is not None and max_samples < 3:
        raise ConfigError(f"--max_samples must be at least 3, got {max_samples}")
    if seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed}")
    shape = {"n_components": n_components, "n_params": n_params}
    data = load_sequences(data_dir, **{k: v for k, v in shape.items() if v is not None})
    # The same split a phase of this seed and --max_samples makes, so its evaluations pair.
    n = min(max_samples or data.n_samples, data.n_samples)
    kind = split_kind or "random"
    fraction = edge_fraction if kind == "edge" else None
    split = phase_split(data.files[:n], data.params[:n], seed, kind, fraction, data.param_names)
    es = eval_set(data, split, split_name, max_lag, Path(data_dir))
    return _baselines_alone(es, seed, None, reuse)


def _baselines_alone(
    es: EvalSet, seed: int, experiment_id: str | None, reuse: bool
) -> dict[str, dict]:
    """ensure_baselines, every fit before any run is opened; refused before fitting when this
    user may not log."""
    tracking.check_can_log(tracking.target_experiment(experiment_id))
    return log_baselines(es, prepare_baselines(es, seed, experiment_id, reuse=reuse), experiment_id)
