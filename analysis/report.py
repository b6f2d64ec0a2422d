"""`seqgen compare`: pull runs from MLflow, draw the figures, write the tables and report.md/html,
and log everything as an analysis run."""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plots, query, sweeps, tables
from analysis.answer import baseline_verdicts, conclusions, duration, fmt, pm
from analysis.document import Doc
from seqgen import config
from seqgen.errors import ConfigError
from seqgen.evaluation import measures, metrics
from seqgen.runs import tracking
from seqgen.runs.faults import kill_point
from seqgen.version import code_version as seqgen_code_version

REPORT_SUFFIXES = {".png", ".csv", ".md", ".html"}  # everything a report folder holds
N_SAMPLE_PLOTS = 3  # fixed test samples drawn as sequences
N_FIELD_PLOTS = 2  # of which drawn as x-t fields
DPI = 110
INSIDE, OUTSIDE = "random", "edge"  # split kinds: test samples inside / outside the training range

logger = logging.getLogger(f"seqgen.{__name__}")  # under the seqgen logger the CLI sets up


def made_by() -> str:
    """seqgen's version and the git commit of this checkout (+dirty), where git can tell."""
    return f"seqgen {version('seqgen')}, {seqgen_code_version()}"


# ---- what is compared --------------------------------------------------------------------------


@dataclass
class Compared:
    """Everything a report is drawn from: the selected runs and the tables made of them."""

    sel: query.Selection
    curves: pd.DataFrame  # (strategy, seed, phase, key, step, value): histories, phases stitched
    boundaries: list[float]  # global epochs where a later phase starts
    per_run: pd.DataFrame  # one row per phase run
    summary: pd.DataFrame  # mean and std over seeds per strategy and phase
    chosen: pd.DataFrame  # per strategy, the evaluations of its latest evaluated phase
    side: pd.DataFrame  # baseline evaluations on the chosen evaluations' splits, one per seed
    files: dict = field(default_factory=dict)  # run id -> query.EvaluationFiles
    per_sample: pd.DataFrame = field(default_factory=pd.DataFrame)  # every chosen test sample
    baseline_per_sample: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["baseline", "seed", "file"])
    )
    ranked: pd.DataFrame = field(default_factory=pd.DataFrame)  # at seeds every strategy has
    paired: pd.DataFrame = field(default_factory=pd.DataFrame)  # strategy against strategy
    vs: pd.DataFrame = field(default_factory=pd.DataFrame)  # strategy against best baseline
    beside: pd.DataFrame = field(default_factory=pd.DataFrame)  # strategies beside baselines
    sweeps: dict = field(default_factory=dict)  # varied setting -> its points (analysis/sweeps)
    # the same comparisons for the models trained with --split edge, beside these (random split)
    outside: Compared | None = None
    # the split kind of the compared models (random: inside the training range)
    split: str = INSIDE


def compare(sel: query.Selection) -> Compared:
    """The comparisons of the models trained on the random split (of those trained with --split
    edge where there are no others), and beside them those of the edge-split models."""
    kinds = set(sel.phases["split"]) if "split" in sel.phases else {INSIDE}
    main = INSIDE if INSIDE in kinds else OUTSIDE
    c = _compare(sel.of_split(main) if len(kinds) > 1 else sel)
    c.split = main
    if main == INSIDE and OUTSIDE in kinds:
        c.outside = _compare(sel.of_split(OUTSIDE))
        c.outside.split = OUTSIDE
    return c


def _compare(sel: query.Selection) -> Compared:
    """The selection's histories, evaluation files and every comparison drawn from them."""
    drawn = measures.drawn(query.loss_terms(sel.phases))  # the terms the runs logged
    curves = tables.stitch(query.metric_histories(list(sel.phases["run_id"]), drawn), sel.phases)
    per_run = tables.per_run_table(sel.phases, sel.evaluations, curves)
    chosen = tables.latest_evaluated(sel.evaluations)
    side = tables.baselines_at_seeds(chosen, sel.baselines)
    c = Compared(
        sel,
        curves,
        tables.phase_boundaries(sel.phases),
        per_run,
        tables.summary_table(per_run),
        chosen,
        side,
    )
    if chosen.empty:
        return c
    c.files = query.evaluation_files(list(chosen["run_id"]) + list(dict.fromkeys(side["run_id"])))
    c.per_sample = pd.concat(
        [
            c.files[r.run_id].per_sample.assign(variant=r.variant, seed=r.seed, phase=r.phase)
            for r in chosen.itertuples()
        ]
    )
    # Strategies are ranked and paired on the seeds all of them were evaluated at, so a mean
    # over seeds and a paired difference speak about the same test samples.
    c.sweeps = sweeps.sweep_points(chosen, sel.phases)
    c.ranked = c.per_sample[c.per_sample["seed"].isin(tables.common_seeds(chosen))]
    c.paired = tables.paired_comparison(c.ranked)
    if len(side):
        c.baseline_per_sample = pd.concat(
            [
                c.files[r.run_id].per_sample.assign(baseline=r.baseline, seed=r.seed)
                for r in side.itertuples()
            ]
        )
        # Each strategy against the best baseline at its own seeds: a baseline pairs with every
        # strategy evaluated on its split.
        c.vs = tables.versus_baselines(c.per_sample, c.baseline_per_sample)
        c.beside = tables.beside_baselines(chosen, side, per_run)
    return c


# ---- figures -----------------------------------------------------------------------------------

Figures = list[tuple[str, object, str]]  # (file name, Figure, caption)


def _training_figures(c: Compared) -> Figures:
    curves, boundaries = c.curves, c.boundaries
    return [
        (
            "val_loss.png",
            plots.val_loss_figure(curves[curves["key"] == "val_loss"], boundaries),
            "Free-running validation loss (each strategy's own objective), phases stitched; dotted "
            "lines mark phase boundaries.",
        ),
        (
            "components.png",
            plots.components_figure(curves, boundaries),
            "Every loss term the strategies log (weighted or only reported), comparable across "
            "strategies.",
        ),
        (
            "schedules.png",
            plots.schedules_figure(curves, boundaries),
            "Learning-rate and teacher-forcing schedules.",
        ),
    ]


def _reference_seed(chosen: pd.DataFrame) -> tuple[int, list[str]]:
    """The seed most strategies were evaluated at (smallest on ties) and those strategies."""
    counts = chosen.groupby("seed")["variant"].nunique()
    seed = int(counts[counts == counts.max()].index.min())
    names = tables.variant_order(chosen.loc[chosen["seed"] == seed, "variant"])
    return seed, names


@dataclass
class Reference:
    """The sequences drawn sample by sample: every strategy's and baseline's at one seed."""

    seed: int
    names: list[str]  # strategies evaluated at that seed, in table order
    arrays: dict[str, dict]  # strategy -> its generated.npz
    baselines: dict[str, dict]  # baseline -> its generated.npz

    @property
    def first(self) -> dict:  # names, steps, truth, PCA basis and sweeps are the same in all
        return self.arrays[self.names[0]]

    @property
    def components(self) -> list[str]:
        return [str(x) for x in self.first["component_names"]]

    @property
    def params(self) -> list[str]:
        return [str(p) for p in self.first["param_names"]]


def _reference(c: Compared) -> Reference:
    seed, names = _reference_seed(c.chosen)
    at_seed = c.chosen[c.chosen["seed"] == seed].set_index("variant")["run_id"]
    side = c.side[c.side["seed"] == seed] if len(c.side) else c.side
    return Reference(
        seed,
        names,
        {s: c.files[at_seed[s]].arrays for s in names},
        {r.baseline: c.files[r.run_id].arrays for r in side.itertuples()},
    )


@dataclass
class Picked:
    """The same few test samples of every strategy and baseline at the reference seed."""

    files: list[str]
    labels: list[str]  # the file's name and its parameter values
    true: np.ndarray  # (S, T, K)
    preds: dict[str, np.ndarray]  # strategy -> (S, T, K)
    baselines: dict[str, np.ndarray]  # baseline -> (S, T, K)


def _pick(ref: Reference) -> Picked:
    common = sorted(set.intersection(*(set(map(str, a["files"])) for a in ref.arrays.values())))
    pick = common[:N_SAMPLE_PLOTS]

    def rows(a: dict) -> list[int]:
        return [list(map(str, a["files"])).index(f) for f in pick]

    first = rows(ref.first)
    labels = [
        Path(f).stem
        + "".join(f"\n{p}={v:.3g}" for p, v in zip(ref.params, ref.first["params"][i], strict=True))
        for f, i in zip(pick, first, strict=True)
    ]
    return Picked(
        pick,
        labels,
        ref.first["true"][first],
        {s: a["pred"][rows(a)] for s, a in ref.arrays.items()},
        {b: a["pred"][rows(a)] for b, a in ref.baselines.items()},
    )


def _sequences(ref: Reference, picked: Picked) -> Figures:
    if not picked.files:
        return []
    fig = plots.sequences_figure(
        picked.true,
        picked.preds,
        ref.first["steps"],
        ref.components,
        picked.labels,
        picked.baselines,
    )
    caption = (
        f"Generated against true sequences for {len(picked.files)} fixed test samples "
        f"(seed {ref.seed})."
    )
    return [("sequences.png", fig, caption)]


def _acf(ref: Reference, chosen: pd.DataFrame) -> Figures:
    """Autocorrelation pooled over the split, at the lags every evaluation measured."""
    lags = chosen["max_lag"]
    max_lag = int(lags.min()) if lags.notna().any() else metrics.ACF_MAX_LAG
    true_acf = metrics.pooled_acf(ref.first["true"], max_lag)  # (L, K)
    pred_acf = {s: metrics.pooled_acf(a["pred"], max_lag) for s, a in ref.arrays.items()}
    b_acf = {b: metrics.pooled_acf(a["pred"], max_lag) for b, a in ref.baselines.items()}
    fig = plots.acf_figure(np.arange(1, max_lag + 1), true_acf, pred_acf, ref.components, b_acf)
    caption = f"Autocorrelation pooled over the test split, lags 1-{max_lag} (seed {ref.seed})."
    return [("acf.png", fig, caption)]


def _fields(ref: Reference, picked: Picked, baseline_per_sample: pd.DataFrame) -> Figures:
    """x-t fields through the PCA basis, where the data has one."""
    first = ref.first
    if "pca_basis" not in first or not picked.files:
        return []
    basis, mean = first["pca_basis"], first["pca_mean"]  # (K, n_x), (n_x,)
    steps = first["steps"]
    t = first["pca_t"] if len(first["pca_t"]) == len(steps) else steps
    n = min(N_FIELD_PLOTS, len(picked.files))
    pred_fields = {s: p[:n] @ basis + mean for s, p in picked.preds.items()}
    best = tables.best_baselines(baseline_per_sample).get(measures.HEADLINE)
    also = ""
    if best in picked.baselines:  # one baseline only: a column per baseline would not fit the page
        pred_fields[plots.baseline_label(best)] = picked.baselines[best][:n] @ basis + mean
        also = f", and the best baseline by {measures.BY_KEY[measures.HEADLINE].name} ({best})"
    fig = plots.fields_figure(
        picked.true[:n] @ basis + mean, pred_fields, first["pca_x"], t, picked.labels[:n]
    )
    caption = (
        f"True against generated fields u(x, t) through the PCA basis (seed {ref.seed}){also}."
    )
    return [("fields.png", fig, caption)]


def _param_error(c: Compared, params: list[str]) -> Figures:
    bl = c.baseline_per_sample
    fig = plots.param_error_figure(c.per_sample, params, baselines=bl)
    caption = "Per-sample test MAE over the parameter plane, all evaluated seeds" + (
        ", strategies above, baselines below." if len(bl) else "."
    )
    return [("param_error.png", fig, caption)]


def _sweeps(ref: Reference) -> Figures:
    """Trajectories along a sweep of each parameter, strategies and baselines."""
    out = []
    for p, name in enumerate(ref.params):
        sweep = {s: a["sweep_pred"][p] for s, a in ref.arrays.items()}  # (S, T, K) each
        sweep |= {plots.baseline_label(b): a["sweep_pred"][p] for b, a in ref.baselines.items()}
        values = ref.first["sweep_params"][p, :, p]
        fig = plots.sweep_figure(values, sweep, ref.first["steps"], ref.components, name)
        out.append(
            (
                f"sweep_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png",
                fig,
                f"Generated trajectories along a sweep of {name} (seed {ref.seed}).",
            )
        )
    return out


def _by_step(files: dict, runs: pd.DataFrame, label: str) -> pd.DataFrame:
    """Each run's MAE against time step (error_by_step.csv's first two columns), labelled by its
    strategy or baseline and seed: (step, value, <label>, seed)."""
    frames = [
        files[r.run_id]
        .by_step.iloc[:, :2]
        .set_axis(["step", "value"], axis=1)
        .assign(**{label: getattr(r, label)}, seed=r.seed)
        for r in runs.itertuples()
    ]
    return pd.concat(frames or [pd.DataFrame(columns=["step", "value", label, "seed"])])


def _error_by_step(c: Compared) -> Figures:
    by_step = _by_step(c.files, c.chosen, "variant")
    b_by_step = _by_step(c.files, c.side, "baseline")
    return [
        (
            "error_by_step.png",
            plots.error_by_step_figure(by_step, b_by_step),
            "Test MAE at each step of the free-running sequence (baselines dashed).",
        )
    ]


def _sample_figures(c: Compared) -> tuple[Figures, str]:
    """Sequences, ACF, fields, parameter response, error growth, each with the baselines of the
    same split: the figures, and a note for the report."""
    ref = _reference(c)
    picked = _pick(ref)
    figs = [
        *_sequences(ref, picked),
        *_acf(ref, c.chosen),
        *_fields(ref, picked, c.baseline_per_sample),
        *_param_error(c, ref.params),
        *_sweeps(ref),
        *_error_by_step(c),
    ]
    missing = sorted(set(c.chosen["variant"]) - set(ref.names))
    note = (
        f" Strategies without an evaluation at seed {ref.seed}: {', '.join(missing)}."
        if missing
        else ""
    )
    return figs, note


def _comparison_figures(c: Compared) -> Figures:
    figs = []
    if not c.paired.empty:
        figs.append(
            (
                "paired.png",
                plots.paired_figure(c.paired, measures.paired()),
                "Paired differences between strategies on the same test samples.",
            )
        )
    if not c.vs.empty:
        names = {m.key: m.name for m in measures.select(versus=True)}
        fig = plots.paired_figure(
            c.vs.rename(columns={"variant": "a", "baseline": "b"}),
            names,
            "Each strategy minus the best baseline on the same test samples "
            "(red: a real difference)",
        )
        caption = (
            "Each strategy's error minus the best baseline's (of that measure) on the same "
            "test samples, with its paired-bootstrap 95% CI: left of 0 the strategy is better."
        )
        figs.append(("versus_baselines.png", fig, caption))
    return figs


def _ensemble_figures(c: Compared) -> Figures:
    """Spread against error of the seed ensembles, inside and outside the training range."""
    ens = c.sel.ensembles
    if ens.empty:
        return []
    files = query.evaluation_files(list(ens["run_id"]))
    per_sample = pd.concat(
        [
            files[r.run_id].per_sample.assign(
                strategy=r.strategy, region="outside" if r.split_kind == OUTSIDE else "inside"
            )
            for r in ens.itertuples()
        ]
    )
    caption = (
        "Seed ensembles (`seqgen ensemble`): each test sequence's spread over the members "
        "against the error of their mean; calibrated spread follows the dotted line. Coverage "
        "and spread-error correlation: section Outside the training range."
    )
    return [("spread_error.png", plots.spread_error_figure(per_sample), caption)]


def figures(c: Compared) -> tuple[Figures, str]:
    """Every figure of the report in its order, and a note on what the sample-level ones use."""
    figs, note = _training_figures(c) + _ensemble_figures(c), ""
    if not c.chosen.empty:
        more, note = _sample_figures(c)
        figs += more
        if not tables.common_seeds(c.chosen):
            note += " No seed was evaluated for every strategy: nothing is paired."
    return figs + _comparison_figures(c) + _sweep_figures(c), note


def _sweep_figures(c: Compared) -> Figures:
    figs = []
    for key, points in c.sweeps.items():
        figs.append(
            (
                f"varied_{key}.png",
                sweeps.sweep_figure(key, points),
                f"End-of-plan test measures against {key} (mean over seeds, band or bar: ±1 std).",
            )
        )
        if sweeps.trades_off(key, points):
            figs.append(
                (
                    "alpha_trade_off.png",
                    sweeps.trade_off_figure(points),
                    "alpha's trade-off between MAE and autocorrelation error: each variant's "
                    "seeds and mean; dotted, the Pareto front of the means.",
                )
            )
    return figs


# ---- writing it --------------------------------------------------------------------------------


def build_report(
    out_dir: str | Path,
    experiment: str | None = None,
    strategies=(),
    phases=(),
    preset: str | None = None,
    seeds=(),
    tags=(),
    data_fingerprint: str | None = None,
    data_dir: str | None = None,
) -> Path:
    """Select runs, write figures, tables, report.md and report.html to out_dir, log them as an
    analysis run; returns the path of report.md."""
    started = time.perf_counter()
    tracking.check_tracking_store()
    final = Path(out_dir)
    if final.is_dir():  # replaced whole below: only ever a report of ours
        others = [p.name for p in final.iterdir() if p.suffix not in REPORT_SUFFIXES]
        if others or (any(final.iterdir()) and not (final / "report.md").is_file()):
            raise ConfigError(
                f"report folder {final} holds other files ({', '.join(others[:3])}"
                "): choose another --out"
            )
    # Written beside the target and swapped in at the end: a failure leaves the old report whole.
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        out = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as e:
        raise ConfigError(f"report folder {final} cannot be created: {e.strerror or e}") from None
    try:
        sel = query.select_runs(
            experiment,
            tuple(strategies),
            tuple(phases),
            preset,
            tuple(seeds),
            tuple(tags),
            data_fingerprint,
            data_dir,
        )
        _write_report(out, sel, started, may_log(sel, final))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    # The old report is set aside, not deleted, until the new one is in: a kill in between
    # leaves it whole (as .<name>.old-*), and the next report clears it.
    aside = out.with_name(out.name.replace(".tmp-", ".old-"))
    if final.exists():
        final.rename(aside)
    kill_point("report-set-aside")
    out.rename(final)
    for old in final.parent.glob(f".{final.name}.old-*"):
        shutil.rmtree(old, ignore_errors=True)
    return final / "report.md"


def may_log(sel: query.Selection, out: Path) -> bool:
    """Whether the analysis run can be logged; a user who may only read is told, in one line,
    that the report goes to the folder alone."""
    try:
        tracking.check_can_log(
            sel.experiment_id, fix=f"the report is written to {out} only, not logged as a run"
        )
    except tracking.PermissionRefused as e:
        logger.warning(str(e))
        return False
    return True


def _write_report(out: Path, sel: query.Selection, started: float, log: bool = True) -> None:
    """Everything build_report writes, into `out`; logged as an analysis run at the end (when
    `log`)."""
    c = compare(sel)
    figs, note = figures(c)
    for name, fig, _ in figs:
        fig.savefig(out / name, dpi=DPI)
    _write_tables(out, c)
    doc = _document(c, figs, note, time.perf_counter() - started)
    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html(f"seqgen comparison: {sel.experiment}"))
    if not log:
        return
    query.log_analysis_run(
        out,
        sel.experiment_id,
        {"experiment": sel.experiment, **{k: str(v) for k, v in sel.filters.items()}},
        {
            "compared_runs": len(sel.phases),
            "evaluation_runs": len(sel.evaluations),
            "baseline_runs": len(c.side["run_id"].unique()) if len(c.side) else 0,
        },
    )


def _write_tables(out: Path, c: Compared) -> None:
    if c.outside is not None:
        tables.inside_outside(c.beside, c.outside.beside).to_csv(out / "outside.csv", index=False)
        c.outside.vs.to_csv(out / "versus_baselines_outside.csv", index=False)
        c.outside.paired.to_csv(out / "paired_outside.csv", index=False)
        c.outside.per_sample.to_csv(out / "per_sample_outside.csv", index=False)
    c.summary.to_csv(out / "summary.csv", index=False)
    c.per_run.to_csv(out / "per_run.csv", index=False)
    c.paired.to_csv(out / "paired.csv", index=False)
    c.beside.to_csv(out / "baselines.csv", index=False)
    c.vs.to_csv(out / "versus_baselines.csv", index=False)
    c.per_sample.to_csv(out / "per_sample.csv", index=False)
    c.sel.excluded.to_csv(out / "excluded.csv", index=False)


# ---- the report's tables -----------------------------------------------------------------------


def _summary_columns(summary: pd.DataFrame) -> list[tuple[str, str, str, float]]:
    """(summary.csv metric, report column, the count it is over, divisor), in the report's order:
    how training went (each loss term the runs logged), the test measures, what training cost."""
    columns = measures.run_columns_in(summary.columns)
    run = [(c.key, c.label, "n_seeds", c.per) for c in columns if not c.cost]
    cost = [(c.key, c.label, "n_seeds", c.per) for c in columns if c.cost]
    test = [(f"test_{m.key}", m.label, "n_evaluated", 1.0) for m in measures.select(summary=True)]
    return run + test + cost


def _summary_markdown(summary: pd.DataFrame) -> pd.DataFrame:
    out = summary[["variant", "phase", "n_seeds"]].rename(columns={"n_seeds": "seeds"})
    for m, label, count, per in _summary_columns(summary):
        if f"{m}_mean" in summary and summary[f"{m}_mean"].notna().any():
            out[label] = [
                pm(a / per, b / per, k)
                for a, b, k in zip(
                    summary[f"{m}_mean"], summary[f"{m}_std"], summary[count], strict=True
                )
            ]
    return out


def _paired_markdown(paired: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "measure": paired["metric"],
            "a - b": paired["a"] + " - " + paired["b"],
            "mean diff": paired["mean_diff"].map(fmt),
            "95% CI": [
                f"[{fmt(lo)}, {fmt(hi)}]"
                for lo, hi in zip(paired["ci_low"], paired["ci_high"], strict=True)
            ],
            "pairs": paired["n"],
            "per-seed diffs": paired["seed_diffs"],
            "verdict": np.where(
                paired["real"],
                "real",
                np.where(paired["n"] < tables.MIN_PAIRS, "too few pairs", "not distinguishable"),
            ),
        }
    )


def _beside_name(row) -> str:
    return (
        f"{row['name']} (phase {int(row['phase'])})"
        if row["kind"] == "variant"
        else (plots.baseline_label(row["name"]))
    )


def _beside_markdown(beside: pd.DataFrame, columns: dict[str, str], time: bool) -> pd.DataFrame:
    out = pd.DataFrame({"": [_beside_name(r) for _, r in beside.iterrows()], "seeds": beside["n"]})
    for m, label in columns.items():
        if f"{m}_mean" in beside and beside[f"{m}_mean"].notna().any():
            out[label] = [
                pm(a, b, k)
                for a, b, k in zip(
                    beside[f"{m}_mean"], beside[f"{m}_std"], beside["n"], strict=True
                )
            ]
    if time:
        out["time"] = [
            ("train " if kind == "variant" else "fit ") + duration(t) if np.isfinite(t) else "n/a"
            for kind, t in zip(beside["kind"], beside["seconds_mean"], strict=True)
        ]
    return out


def _beside_columns() -> dict[str, str]:
    """baselines.csv metric -> report column."""
    return {f"test_{m.key}": m.label for m in measures.select(beside=True)}


def _component_columns(beside: pd.DataFrame) -> dict[str, str]:
    """baselines.csv per-component metric -> report column ('test_mae_pc1' -> 'MAE pc1')."""
    names = [c[: -len("_mean")] for c in beside.columns if c.endswith("_mean")]
    headline = measures.BY_KEY[measures.HEADLINE]
    prefix = f"test_{headline.key}_"
    return {m: f"{headline.name} {m[len(prefix) :]}" for m in measures.component_columns(names)}


def _versus_markdown(vs: pd.DataFrame) -> pd.DataFrame:
    by_key = measures.BY_KEY
    return pd.DataFrame(
        {
            "variant": vs["variant"],
            "measure": vs["metric"].map({k: m.name for k, m in by_key.items()}),
            "best baseline": vs["baseline"],
            "strategy mean": vs["variant_mean"].map(fmt),
            "baseline mean": vs["baseline_mean"].map(fmt),
            "difference": vs["mean_diff"].map(fmt),
            "95% CI": [
                f"[{fmt(lo)}, {fmt(hi)}]"
                for lo, hi in zip(vs["ci_low"], vs["ci_high"], strict=True)
            ],
            "strategy / baseline": [fmt(1 + r) for r in vs["rel_diff"]],
            "pairs": vs["n"],
            "verdict": [
                ("beats it" if by_key[m].improves(d) else "worse") if real else "no real difference"
                for m, d, real in zip(vs["metric"], vs["mean_diff"], vs["real"], strict=True)
            ],
        }
    )


# ---- the document ------------------------------------------------------------------------------


def _sweep_markdown(points: pd.DataFrame) -> pd.DataFrame:
    """One row per variant along the sweep: its value and each measure's mean ± std over seeds."""
    table = sweeps.sweep_table(points)
    out = table[["variant", "value", "seeds"]].copy()
    for m in sweeps.SWEEP_MEASURES:
        if f"test_{m}_mean" in table:
            out[f"test {measures.BY_KEY[m].name}"] = [
                f"{fmt(a)} ± {fmt(b)}" if np.isfinite(b) else fmt(a)
                for a, b in zip(table[f"test_{m}_mean"], table[f"test_{m}_std"], strict=True)
            ]
    return out


def _example_model(phases: pd.DataFrame) -> str:
    """A model to evaluate, as a command would name it: the last compared strategy of the table
    at the compared preset, its last phase."""
    preset = str(phases["preset"].iloc[0]) if len(phases) else "full"
    names = tables.variant_order(phases["variant"]) or list(config.strategies())
    name = f"seqgen-{names[-1]}" + ("" if preset == "full" else f"-{preset}")
    return f"models:/{name}@phase-{config.N_PHASES}"


def _document(c: Compared, figs: Figures, note: str, seconds: float) -> Doc:
    doc = Doc()
    doc.h(1, f"seqgen: which loss strategy? ({c.sel.experiment})")
    doc.p(
        f"Made {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from {query.tracking_uri()} in "
        f"{seconds:.1f} s, by {made_by()}."
    )
    _answer_section(doc, c)
    _outside_section(doc, c)
    _compared_section(doc, c, note)
    doc.h(2, "Summary per strategy and phase (mean ± std over seeds)")
    doc.table(_summary_markdown(c.summary))
    doc.p(
        "Losses are in standardised units; test metrics from evaluation runs in original "
        "units. Spectral distance: RMS of log10 power ratio over non-DC frequencies. "
        "TF gap: free-running minus teacher-forced test MAE. Also in summary.csv, per_run.csv."
    )
    if not c.paired.empty:
        doc.h(2, "Paired comparison on the same test samples")
        doc.table(_paired_markdown(c.paired))
    for key, points in c.sweeps.items():
        doc.h(2, f"Varied: {key}")
        doc.p(f"End-of-plan test measures per value of {key} (figure varied_{key}.png below).")
        doc.table(_sweep_markdown(points))
    doc.h(2, "Figures")
    for name, _, caption in figs:
        doc.img(name, caption)
    return doc


def _answer_section(doc: Doc, c: Compared) -> None:
    """The answer first, then whether training is worth it at all (against the baselines)."""
    doc.h(2, "Answer")
    if c.chosen.empty:
        doc.p(
            "No evaluation runs for the selected phase runs, so no test-set answer yet: "
            "evaluate the last phase of each strategy, e.g. `seqgen evaluate --model "
            f"{_example_model(c.sel.phases)}`, then compare again. Training curves follow."
        )
        return
    # Conclusions speak about the samples every strategy was scored on, where they pair.
    per_sample = c.ranked if len(c.paired) else c.per_sample
    verdicts = baseline_verdicts(c.vs, c.beside)
    outside = baseline_verdicts(c.outside.vs, c.outside.beside) if c.outside else []
    where = {INSIDE: "Inside the training range", OUTSIDE: "Outside the training range"}
    first = [f"{where[c.split]}: {verdicts[0]}"] if verdicts and c.outside else verdicts[:1]
    first += [f"{where[OUTSIDE]}: {outside[0]}"] if outside else []
    doc.ul(first + conclusions(per_sample, c.paired, c.chosen, c.per_run))
    doc.p(
        "A difference is *real* when its paired-bootstrap 95% CI over (seed, test sample) "
        f"pairs excludes 0, there are at least {tables.MIN_PAIRS} pairs, and every "
        "seed's mean difference has the same sign."
    )
    _baseline_section(doc, c, verdicts[1:])


def _compared_section(doc: Doc, c: Compared, note: str) -> None:
    """What went in: variants, data, runs, code, filters, and the runs left out."""
    ph, chosen = c.sel.phases, c.chosen
    doc.h(2, "What was compared")
    evaluated = (
        ", ".join(
            f"{s} phase {int(p)}" for s, p in chosen.groupby("variant")["phase"].max().items()
        )
        or "none"
    )
    commits = sorted(set(ph["git_commit"]) - {""})
    n_samples = sorted(set(chosen["n_samples"].dropna().astype(int)))
    doc.ul(
        [
            f"Variants: {', '.join(tables.variant_order(ph['variant']))}; phases "
            f"{', '.join(map(str, sorted(ph['phase'].astype(int).unique())))}; seeds "
            f"{', '.join(map(str, sorted(ph['seed'].astype(int).unique())))}; preset "
            f"{', '.join(sorted(set(ph['preset'])))}.",
            f"Data: {', '.join(sorted(set(ph['data_dir']) - {''})) or 'unknown'} (fingerprint "
            f"{', '.join(sorted(set(ph['dataset_fingerprint']) - {''})) or 'unknown'}).",
            f"Runs: {len(ph)} phase runs, {len(c.sel.evaluations)} test evaluations; sample-level "
            f"figures and the paired comparison use: {evaluated}; test samples per evaluation: "
            f"{', '.join(map(str, n_samples)) or '-'}." + note,
            f"Code of the runs: {', '.join(commits) or 'no git commit recorded'}.",
            "Filters: " + (query.describe_filters(c.sel.filters) or "none") + ".",
        ]
    )
    if not c.sel.excluded.empty:
        doc.p(f"Left out ({len(c.sel.excluded)} runs):")
        doc.table(c.sel.excluded)


def _baseline_section(doc: Doc, c: Compared, verdicts: list[str]) -> None:
    """Is the surrogate worth training? Each strategy beside the baselines on the same samples."""
    doc.h(2, "Is it worth training? Against the baselines")
    if c.beside.empty:
        doc.p(
            "No baseline evaluations on the splits of these evaluations (evaluations logged before "
            "baselines existed carry no split fingerprint): evaluate again, e.g. `seqgen evaluate "
            f"--model {_example_model(c.sel.phases)}`, which fits them once per split, or "
            "run `seqgen baselines --model URI`."
        )
        return
    doc.p(
        "Baselines, fitted on each evaluation's own training split and scored on the same test "
        "samples by the same code: **mean**, the per-step mean training sequence; **knn**, "
        "inverse-distance-weighted k nearest neighbours in standardised parameter space, k "
        "chosen on validation; **direct**, a small MLP from the parameters to the whole "
        "sequence at once, early-stopped on validation. Each measure is compared against the "
        "baseline that is best on it."
    )
    doc.ul(verdicts)
    doc.table(_beside_markdown(c.beside, _beside_columns(), time=True))
    components = _component_columns(c.beside)
    if components:
        doc.p("Test MAE per component (original units):")
        doc.table(_beside_markdown(c.beside, components, time=False))
    if not c.vs.empty:
        doc.p("Each strategy minus the best baseline of each measure, paired on the same samples:")
        doc.table(_versus_markdown(c.vs))


def _outside_section(doc: Doc, c: Compared) -> None:
    """Every measure inside the training range (random split) and outside it (edge split), per
    strategy and baseline, with the paired verdicts against the best baseline in each; the seed
    ensembles' calibration."""
    doc.h(2, "Outside the training range")
    _inside_outside(doc, c)
    if not c.sel.ensembles.empty:
        doc.p(
            "Seed ensembles: how often the truth lies within the members' mean ± 1 and 2 std "
            "(a calibrated Gaussian spread: 0.683, 0.954), and the correlation of spread with "
            "the error of the mean over sequences and steps."
        )
        doc.table(_ensemble_markdown(c.sel.ensembles))


def _ensemble_markdown(ens: pd.DataFrame) -> pd.DataFrame:
    keys = [m.key for m in measures.select(ensemble=True)] + [measures.HEADLINE]
    out = pd.DataFrame(
        {
            "ensemble": ens["ensemble"],
            "region": np.where(ens["split_kind"] == OUTSIDE, "outside", "inside"),
        }
    )
    for key in keys:
        if f"test_{key}" in ens:
            out[measures.BY_KEY[key].label] = ens[f"test_{key}"].map(fmt)
    return out


def _inside_outside(doc: Doc, c: Compared) -> None:
    if c.split == OUTSIDE:
        doc.p(
            "Every compared model was trained with `--split edge`: the tables of this report are "
            "outside the training range. Train the same with the random split to set them beside "
            "the inside."
        )
        return
    if c.outside is None or c.outside.chosen.empty:
        doc.p(
            ("Phase runs with `--split edge` were found but none was evaluated yet. "
             if c.outside is not None else "No compared model was trained with `--split edge`. ")
            + "Train and evaluate with `--split edge` (e.g. `seqgen demo --split edge`) to score "
            "every strategy and baseline just past the data it was fitted on."
        )  # fmt: skip
        return
    o = c.outside
    fractions = sorted({f"{float(f):.0%}" for f in o.sel.phases["edge_fraction"] if f})
    doc.p(
        "Inside: the random split's test samples, among the training data. Outside: models "
        "trained on the interior of the parameter plane and scored on the top "
        f"{', '.join(fractions) or 'fraction'} of each parameter's range (`--split edge`), with "
        "the baselines fitted on the same split. Each cell: inside → outside, mean ± std over "
        "seeds."
    )
    both = tables.inside_outside(c.beside, o.beside)
    if both.empty:
        doc.p("No measure was logged both inside and outside.")
    else:
        doc.table(_inside_outside_markdown(both))
    verdicts = baseline_verdicts(o.vs, o.beside)
    if verdicts:  # inside, they are the section above
        doc.p("Outside the training range, each strategy against the best baseline:")
        doc.ul(verdicts)
    if not (c.vs.empty and o.vs.empty):
        doc.p(
            "Each strategy minus the best baseline of each measure, paired on the same samples, "
            "inside and outside:"
        )
        doc.table(_versus_in_out_markdown(c.vs, o.vs))
    if not o.paired.empty:
        doc.p("Outside: strategies paired on the same samples:")
        doc.table(_paired_markdown(o.paired))


def _inside_outside_markdown(both: pd.DataFrame) -> pd.DataFrame:
    labels = {f"test_{m.key}": m.label for m in measures.select(beside=True)}
    rows = {}
    for r in both.itertuples():
        if r.kind == "variant":
            phases = sorted({int(p) for p in (r.phase_in, r.phase_out) if pd.notna(p)})
            who = f"{r.name} (phase {'/'.join(map(str, phases))})"
        else:
            who = plots.baseline_label(r.name)
        inside = pm(r.inside_mean, r.inside_std, int(r.inside_n) if pd.notna(r.inside_n) else 1)
        outside = pm(
            r.outside_mean, r.outside_std, int(r.outside_n) if pd.notna(r.outside_n) else 1
        )
        rows.setdefault(who, {"": who})[labels[r.metric]] = f"{inside} → {outside}"
    return pd.DataFrame(list(rows.values())).fillna("n/a")


def _versus_in_out_markdown(inside: pd.DataFrame, outside: pd.DataFrame) -> pd.DataFrame:
    """Per strategy and measure, the paired verdict against the best baseline in each region."""
    keys = ["variant", "metric"]
    both = inside.merge(outside, on=keys, how="outer", suffixes=("_in", "_out"))
    order = {m.key: i for i, m in enumerate(measures.MEASURES)}
    both = both.sort_values(keys, key=lambda col: col.map(order) if col.name == "metric" else col)
    out = pd.DataFrame(
        {
            "variant": both["variant"],
            "measure": both["metric"].map({k: m.name for k, m in measures.BY_KEY.items()}),
        }
    )
    for region, sfx in (("inside", "_in"), ("outside", "_out")):
        out[f"{region}: best baseline"] = both[f"baseline{sfx}"].fillna("n/a")
        out[f"{region}: difference [95% CI]"] = [
            f"{fmt(d)} [{fmt(lo)}, {fmt(hi)}]" if pd.notna(d) else "n/a"
            for d, lo, hi in zip(
                both[f"mean_diff{sfx}"], both[f"ci_low{sfx}"], both[f"ci_high{sfx}"], strict=True
            )
        ]
        out[f"{region}: verdict"] = [
            _verdict(m, d, real, n)
            for m, d, real, n in zip(
                both["metric"], both[f"mean_diff{sfx}"], both[f"real{sfx}"], both[f"n{sfx}"],
                strict=True,
            )
        ]  # fmt: skip
    return out


def _verdict(metric: str, diff: float, real, n) -> str:
    """A strategy against a baseline on one measure, in words."""
    if pd.isna(diff):
        return "n/a"
    if not real:
        return "too few pairs" if n < tables.MIN_PAIRS else "no real difference"
    return "beats it" if measures.BY_KEY[metric].improves(diff) else "worse"
