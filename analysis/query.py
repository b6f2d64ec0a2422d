"""The only module in analysis/ that talks to MLflow: select runs, pull histories and evaluation
artifacts into DataFrames and arrays, and log the analysis run."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from seqgen.errors import SelectionError, redact
from seqgen.evaluation import measures
from seqgen.evaluation.evaluate import BY_STEP_FILE, GENERATED_FILE, PER_SAMPLE_FILE
from seqgen.runs import descriptions, tracking
from seqgen.runs.tracking import default_experiment

# One call per run and key. On sqlite threads gain nothing (45 runs x 8 keys: 0.8 s either way);
# through a tracking server each call is a round trip, and threads overlap those.
HISTORY_THREADS = 4


@dataclass
class Selection:
    """The runs a report is drawn from."""

    experiment: str
    experiment_id: str
    phases: pd.DataFrame  # one finished phase run per row (latest per variant/phase/seed)
    evaluations: pd.DataFrame  # one finished test-split evaluation per selected phase run
    baselines: pd.DataFrame  # finished baseline evaluations on those evaluations' splits
    excluded: pd.DataFrame  # run_id, run_name, kind, status, reason: runs left out
    filters: dict
    # the latest finished test evaluation of each seed ensemble (strategy, phase, split_kind)
    ensembles: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)

    def of_split(self, kind: str) -> Selection:
        """The phase runs trained on one split kind (random, edge), their evaluations and the
        baselines on those evaluations' samples."""
        phases = self.phases[self.phases["split"] == kind]
        ev = self.evaluations[self.evaluations["evaluated_run_id"].isin(phases["run_id"])]
        bl = self.baselines[self.baselines["split_fingerprint"].isin(ev["split_fingerprint"])]
        # mae+split=edge is mae asked outside its range: named as inside, they set side by side
        return dataclasses.replace(
            self,
            phases=phases.assign(variant=phases["variant"].map(without_split)).reset_index(
                drop=True
            ),
            evaluations=ev.assign(variant=ev["variant"].map(without_split)).reset_index(drop=True),
            baselines=bl.reset_index(drop=True),
        )


def without_split(variant: str) -> str:
    """A derived variant's name without its split settings (mae+split=edge -> mae)."""
    return SPLIT_PART.sub("", variant)


SPLIT_PART = re.compile(r"\+(split|edge_fraction)=[^+]*")


def _tag(df: pd.DataFrame, name: str) -> pd.Series:
    col = f"tags.{name}"
    return df[col].fillna("").astype(str) if col in df else pd.Series("", index=df.index)


def _metric(df: pd.DataFrame, name: str) -> pd.Series:
    col = f"metrics.{name}"
    return df[col].astype(float) if col in df else pd.Series(np.nan, index=df.index)


def _param(df: pd.DataFrame, name: str) -> pd.Series:
    col = f"params.{name}"
    return df[col].fillna("").astype(str) if col in df else pd.Series("", index=df.index)


def _max_lag(runs: pd.DataFrame) -> pd.Series:
    """An evaluation's ACF lags: its tag (evaluations before 0.1 also logged it as a param)."""
    return _tag(runs, "max_lag").mask(lambda t: t == "", _param(runs, "max_lag"))


def tracking_uri() -> str:
    """The store's URI as it may be shown: credentials replaced."""
    return redact(mlflow.get_tracking_uri())


def parse_tag_filters(tags: tuple[str, ...] | list[str]) -> dict[str, str]:
    """('key=value', ...) -> {key: value}; anything without '=' is an error."""
    out = {}
    for item in tags:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SelectionError(f"--tag must look like KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _frame(runs: pd.DataFrame) -> pd.DataFrame:
    """search_runs columns -> the tidy columns the analysis uses."""
    out = pd.DataFrame(
        {
            "run_id": runs["run_id"],
            "run_name": _tag(runs, "mlflow.runName"),
            "kind": _tag(runs, "kind"),
            "status": runs["status"],
            "strategy": _tag(runs, "strategy"),
            # runs from before variants existed: the strategy was the variant
            "variant": _tag(runs, "variant").mask(lambda v: v == "", _tag(runs, "strategy")),
            "phase": pd.to_numeric(_tag(runs, "phase"), errors="coerce"),
            "seed": pd.to_numeric(_tag(runs, "seed"), errors="coerce"),
            "preset": _tag(runs, "preset"),
            "start_time": runs["start_time"],
            # seqgen's own tag; runs logged by other means may only have MLflow's git tag
            "git_commit": _tag(runs, "code_version").mask(
                lambda c: c == "", _tag(runs, "mlflow.source.git.commit")
            ),
            "dataset_fingerprint": _tag(runs, "dataset_fingerprint"),
        }
    )
    return out


def describe_filters(filters: dict) -> str:
    """{'strategy': ['mae'], 'tags': {'k': 'v'}, 'preset': None} -> 'strategy=mae, k=v'."""
    parts = []
    for key, value in filters.items():
        if isinstance(value, dict):
            parts += [f"{k}={v}" for k, v in value.items()]
        elif isinstance(value, list | tuple) and value:
            parts.append(f"{key}={','.join(map(str, value))}")
        elif value and not isinstance(value, list | tuple):
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def _describe(df: pd.DataFrame) -> str:
    parts = []
    for col in ("variant", "phase", "seed", "preset", "dataset_fingerprint"):
        values = sorted(
            {
                str(int(v)) if isinstance(v, float) else str(v)
                for v in df[col].dropna()
                if str(v) != ""
            }
        )
        label = "data" if col == "dataset_fingerprint" else col
        parts.append(f"{label} {', '.join(values) or '-'}")
    return "; ".join(parts)


def select_runs(
    experiment: str | None = None,
    strategies: tuple[str, ...] = (),
    phases: tuple[int, ...] = (),
    preset: str | None = None,
    seeds: tuple[int, ...] = (),
    tags: tuple[str, ...] = (),
    data_fingerprint: str | None = None,
    data_dir: str | None = None,
) -> Selection:
    """Finished phase runs matching the filters, their latest test evaluations, and the runs
    left out (failed, killed, still running, superseded by a later run of the same phase)."""
    # Empty values mean "no filter", so an MLproject can pass its string defaults straight on.
    filters = {
        "strategy": [s for s in strategies if s],
        "phase": [int(p) for p in phases],
        "preset": preset,
        "seed": [int(s) for s in seeds],
        "tags": parse_tag_filters(tuple(t for t in tags if t)),
        "data_fingerprint": data_fingerprint or None,
        "data_dir": data_dir or None,
    }
    name = experiment or default_experiment()
    exp, raw = _experiment_runs(name)
    runs = _frame(raw)
    matched = _matching_phases(name, raw, runs, filters)
    finished, excluded = _finished_phases(raw, matched)
    evaluations, left = _test_evaluations(raw, runs, finished)
    baselines, left_too = _baselines_on_splits(raw, runs, evaluations)
    left_out = pd.concat([*excluded, *left, *left_too])
    return Selection(
        name,
        exp.experiment_id,
        finished.reset_index(drop=True),
        evaluations.reset_index(drop=True),
        baselines.reset_index(drop=True),
        left_out[["run_id", "run_name", "kind", "status", "reason"]].reset_index(drop=True),
        filters,
        _ensemble_evaluations(raw, runs, filters).reset_index(drop=True),
    )


def _ensemble_evaluations(raw: pd.DataFrame, runs: pd.DataFrame, filters: dict) -> pd.DataFrame:
    """The latest finished test evaluation of each seed ensemble (tag ensemble) of the selected
    strategies and preset, with its metrics and split kind."""
    ev = runs[(runs["kind"] == "evaluation") & (_tag(raw, "ensemble") != "")].copy()
    ev["ensemble"] = _tag(raw, "ensemble")[ev.index]
    ev["split_kind"] = _tag(raw, "split_kind")[ev.index].replace("", "random")
    keep = (ev["status"] == "FINISHED") & (_tag(raw, "split")[ev.index] == "test")
    if filters["strategy"]:
        keep &= ev["strategy"].isin(filters["strategy"])
    if filters["preset"]:
        keep &= ev["preset"] == filters["preset"]
    ev = ev[keep].sort_values("start_time")
    ev = ev[~ev.duplicated(["strategy", "phase", "split_kind"], keep="last")]
    return ev.join(_test_metrics(raw, ev.index))


@tracking.store_call("read the experiment's runs")
def _experiment_runs(name: str):
    """The experiment called `name` and every run in it (search_runs columns)."""
    exp = MlflowClient().get_experiment_by_name(name)
    if exp is None:
        known = [e.name for e in MlflowClient().search_experiments()]
        raise SelectionError(
            f"experiment {name!r} does not exist in {tracking_uri()} "
            f"(experiments there: {', '.join(known) or 'none'})"
        )
    raw = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="pandas")
    if raw.empty:
        raise SelectionError(
            f"experiment {name!r} has no runs: train some first "
            "(seqgen pipeline --strategy all --seeds 0,1,2)"
        )
    return exp, raw


def _matching_phases(name: str, raw: pd.DataFrame, runs: pd.DataFrame, filters: dict):
    """The phase runs (with their end-of-phase metrics and where they ran) that the filters
    keep, whatever their status."""
    metrics = pd.DataFrame({m: _metric(raw, m) for m in measures.PHASE_END})
    phase = runs[runs["kind"] == "phase"].join(metrics)
    for p in ("first_epoch", "last_epoch", "data_dir", "edge_fraction"):
        phase[p] = _param(raw, p)[phase.index]
    phase["differences"] = _tag(raw, tracking.VARIANT_DIFFERENCES)[phase.index].map(_differences)
    param_cols = [c for c in raw.columns if c.startswith("params.")]
    phase["params"] = [
        {c[len("params.") :]: v for c, v in row.items() if isinstance(v, str)}
        for row in raw.loc[phase.index, param_cols].to_dict("records")
    ]
    # phases logged before the edge split trained on the random one
    phase["split"] = _param(raw, "split")[phase.index].replace("", "random")
    # the loss terms each phase logged (train_<term>): its strategy's, read from the run
    logged = raw.loc[phase.index, [c for c in raw.columns if c.startswith("metrics.train_")]]
    phase["terms"] = [
        tuple(measures.terms_in(k.removeprefix("metrics.") for k, v in row.items() if pd.notna(v)))
        for row in logged.to_dict("records")
    ]
    if phase.empty:
        raise SelectionError(
            f"experiment {name!r} has {len(runs)} run(s) but no phase runs "
            "(tag kind=phase): train some first"
        )
    keep = pd.Series(True, index=phase.index)
    if filters["strategy"]:  # a table strategy keeps its variants too; a variant, itself
        keep &= phase["strategy"].isin(filters["strategy"]) | phase["variant"].isin(
            filters["strategy"]
        )
    if filters["phase"]:
        keep &= phase["phase"].isin(filters["phase"])
    if filters["preset"]:
        keep &= phase["preset"] == filters["preset"]
    if filters["seed"]:
        keep &= phase["seed"].isin(filters["seed"])
    if filters["data_fingerprint"]:  # a prefix, as the refusal below prints them
        keep &= phase["dataset_fingerprint"].str.startswith(filters["data_fingerprint"])
    if filters["data_dir"]:
        keep &= phase["data_dir"].map(_same_dir(filters["data_dir"]))
    for key, value in filters["tags"].items():
        keep &= _tag(raw, key)[phase.index] == value
    if not keep.any():
        raise SelectionError(
            f"no phase runs in experiment {name!r} match {describe_filters(filters)}; "
            f"the experiment has {_describe(phase)}"
        )
    return phase[keep]


def _finished_phases(raw: pd.DataFrame, matched: pd.DataFrame):
    """The latest finished run of each (variant, phase, seed), and the runs left out with why."""
    # A phase paused with --stop_at_epoch is unfinished work, even when `mlflow run` marked it
    # FINISHED on exit.
    paused = _tag(raw, "stop_reason")[matched.index] == "paused"
    finished = matched[(matched["status"] == "FINISHED") & ~paused]
    excluded = [
        matched[(matched["status"] != "FINISHED") & ~paused].assign(reason="not finished"),
        matched[paused].assign(reason="paused"),
    ]
    if finished.empty:
        raise SelectionError(
            f"none of the {len(matched)} matching phase runs finished "
            f"(statuses: {', '.join(sorted(set(matched['status'])))})"
        )
    presets = sorted(set(finished["preset"]))
    if len(presets) > 1:
        raise SelectionError(
            f"the matching runs come from several presets ({', '.join(presets)})"
            ": pass --preset to compare runs of one scale"
        )
    _one_dataset(finished)
    # A phase trained twice for one seed: the later run is the one the next phase continued from.
    finished = finished.sort_values("start_time")
    latest = ~finished.duplicated(["variant", "phase", "seed"], keep="last")
    excluded.append(finished[~latest].assign(reason="superseded by a later run"))
    return finished[latest], excluded


def _differences(record: str) -> dict:
    """A run's seqgen.variant tag -> its differences from the table ({} for the plan, or for a
    run from before variants were recorded)."""
    try:
        return dict(json.loads(record)["differences"]) if record else {}
    except (ValueError, KeyError, TypeError):
        return {}


def _same_dir(wanted: str):
    """data_dir param -> whether it names the folder `wanted` (relative to here or absolute)."""
    target = os.path.realpath(wanted)
    return lambda logged: bool(logged) and os.path.realpath(logged) == target


def _one_dataset(finished: pd.DataFrame) -> None:
    """Runs on different datasets are never pooled: one line naming them and how to pick one."""
    datasets = finished.groupby("dataset_fingerprint")
    if datasets.ngroups < 2:
        return
    named = [
        f"{(fp or 'unknown')[:12]} ({len(g)} run(s), --data_dir {sorted(set(g['data_dir']))[0]})"
        for fp, g in datasets
    ]
    raise SelectionError(
        f"the matching runs were trained on {datasets.ngroups} datasets: {'; '.join(named)}: "
        "pass --data_fingerprint or --data_dir to compare one"
    )


def _test_metrics(raw: pd.DataFrame, index: pd.Index) -> pd.DataFrame:
    """Every test_* metric of the runs at `index`, named without the `metrics.` prefix."""
    test_cols = sorted(c for c in raw.columns if c.startswith("metrics.test_"))
    return raw.loc[index, test_cols].rename(columns=lambda c: c[len("metrics.") :])


def _test_evaluations(raw: pd.DataFrame, runs: pd.DataFrame, finished: pd.DataFrame):
    """The latest finished test-split evaluation of each finished phase run, with its metrics
    and what it scored; and the unfinished ones, left out."""
    ev = runs[(runs["kind"] == "evaluation")].copy()
    ev["evaluated_run_id"] = _tag(raw, "evaluated_run_id")[ev.index]
    ev["split"] = _tag(raw, "split")[ev.index]
    ev = ev[ev["evaluated_run_id"].isin(finished["run_id"]) & (ev["split"] == "test")]
    excluded = [ev[ev["status"] != "FINISHED"].assign(reason="not finished")]
    ev = ev[ev["status"] == "FINISHED"].sort_values("start_time")
    ev = ev[~ev.duplicated("evaluated_run_id", keep="last")]
    ev = ev.join(_test_metrics(raw, ev.index))
    ev["max_lag"] = pd.to_numeric(_max_lag(raw)[ev.index], errors="coerce")
    ev["n_samples"] = pd.to_numeric(_param(raw, "n_samples")[ev.index], errors="coerce")
    ev["split_fingerprint"] = _tag(raw, "split_fingerprint")[ev.index]
    ev["split_kind"] = ev["evaluated_run_id"].map(finished.set_index("run_id")["split"])
    return ev, excluded


def _baselines_on_splits(raw: pd.DataFrame, runs: pd.DataFrame, ev: pd.DataFrame):
    """The latest finished evaluation of each baseline on each evaluation's test split and lags,
    with its metrics and fitting times; and the unfinished ones, left out."""
    # Baselines scored the same samples as an evaluation when they share its split fingerprint
    # and lags (evaluations made before baselines existed have no fingerprint: none pair).
    bl = runs[(runs["kind"] == "evaluation") & (_tag(raw, "baseline") != "")].copy()
    bl["baseline"] = _tag(raw, "baseline")[bl.index]
    bl["split_fingerprint"] = _tag(raw, "split_fingerprint")[bl.index]
    bl["max_lag"] = pd.to_numeric(_max_lag(raw)[bl.index], errors="coerce")
    wanted = set(zip(ev["split_fingerprint"], ev["max_lag"], strict=True))
    on_split = [
        (f, lag) in wanted and f != ""
        for f, lag in zip(bl["split_fingerprint"], bl["max_lag"], strict=True)
    ]
    bl = bl[np.array(on_split, dtype=bool) & (_tag(raw, "split")[bl.index] == "test")]
    excluded = [bl[bl["status"] != "FINISHED"].assign(reason="not finished")]
    bl = bl[bl["status"] == "FINISHED"].sort_values("start_time")
    bl = bl[~bl.duplicated(["baseline", "split_fingerprint", "max_lag"], keep="last")]
    timing = {c: _metric(raw, c)[bl.index] for c in measures.FIT_METRICS}
    return bl.join(_test_metrics(raw, bl.index)).assign(**timing), excluded


def loss_terms(phases: pd.DataFrame) -> list[str]:
    """Every loss term the phase runs logged (their strategies' terms), in measures' order."""
    if "terms" not in phases:
        return list(measures.SEED_TERMS)
    return measures.order_terms(t for terms in phases["terms"] for t in terms)


@tracking.store_call("read metric histories")
def metric_histories(run_ids: list[str], keys: tuple[str, ...] = measures.DRAWN) -> pd.DataFrame:
    """Every logged value of `keys` for each run: long DataFrame (run_id, key, step, value),
    one row per step. A step logged twice (an interrupted phase resumed by code older than the
    exactly-once delivery) keeps its latest value: the one the finished phase went on from."""
    client = MlflowClient()

    def fetch(job: tuple[str, str]) -> list[tuple[str, str, int, float, int]]:
        run_id, key = job
        history = client.get_metric_history(run_id, key)
        return [(run_id, key, m.step, m.value, m.timestamp) for m in history]

    jobs = [(r, k) for r in run_ids for k in keys]
    with ThreadPoolExecutor(HISTORY_THREADS) as pool:
        rows = [row for part in pool.map(fetch, jobs) for row in part]
    frame = pd.DataFrame(rows, columns=["run_id", "key", "step", "value", "timestamp"])
    frame = frame.sort_values(["run_id", "key", "step", "timestamp"], kind="stable")
    frame = frame.drop_duplicates(["run_id", "key", "step"], keep="last")
    return frame.drop(columns="timestamp").reset_index(drop=True)


@dataclass
class EvaluationFiles:
    """One evaluation run's artifacts, loaded."""

    per_sample: pd.DataFrame  # one row per test sequence
    by_step: pd.DataFrame  # one row per time step
    arrays: dict[str, np.ndarray]  # generated.npz: pred, true (N, T, K), files, params...


@tracking.store_call("download the evaluations' files")
def evaluation_files(run_ids: list[str]) -> dict[str, EvaluationFiles]:
    """Download and load each evaluation run's per-sample table, error curve and sequences."""

    def fetch(run_id: str) -> EvaluationFiles:
        with tempfile.TemporaryDirectory(prefix="seqgen-compare-") as tmp:
            got = {}
            for name in (PER_SAMPLE_FILE, BY_STEP_FILE, GENERATED_FILE):
                got[name] = Path(
                    mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path=name, dst_path=tmp
                    )
                )
            with np.load(got[GENERATED_FILE], allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            return EvaluationFiles(
                pd.read_csv(got[PER_SAMPLE_FILE]), pd.read_csv(got[BY_STEP_FILE]), arrays
            )

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(run_ids, pool.map(fetch, run_ids), strict=True))


def log_analysis_run(out_dir: Path, experiment_id: str, params: dict, tags: dict) -> str:
    """An MLflow run `compare` (tag kind=analysis) with every file in out_dir as an artifact;
    under `mlflow run`, the launcher's run. The experiment's description then links its files.
    Returns its id."""
    note = descriptions.analysis_text(tags.get("compared_runs", 0), tags.get("evaluation_runs", 0))
    tags = {"kind": "analysis", **tags, tracking.NOTE: note}
    with tracking.tracked_run("compare", tags, experiment_id) as run:
        tracking.log_params(params)
        tracking.log_artifacts(out_dir)
    tracking.link_report(run.info.experiment_id, run.info.run_id)
    return run.info.run_id
