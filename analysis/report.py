"""`seqgen compare`: pull runs from MLflow, draw the figures, write the tables and report.md/html,
and log everything as an analysis run."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plots, query, tables
from analysis.answer import baseline_verdicts, conclusions, duration, fmt, pm
from analysis.document import Doc
from seqgen.errors import ConfigError
from seqgen.evaluation import metrics
from seqgen.runs import tracking
from seqgen.version import code_version as seqgen_code_version

REPORT_SUFFIXES = {".png", ".csv", ".md", ".html"}  # everything a report folder holds
N_SAMPLE_PLOTS = 3  # fixed test samples drawn as sequences
N_FIELD_PLOTS = 2  # of which drawn as x-t fields
DPI = 110


def code_version() -> str:
    """seqgen's version and the git commit of this checkout (+dirty), where git can tell."""
    return f"seqgen {version('seqgen')}, {seqgen_code_version()}"


# ---- the report --------------------------------------------------------------------------------


SUMMARY_COLUMNS = {  # summary.csv metric -> report column
    "best_val_loss": "best val loss",
    "val_mae_at_best": "val MAE@best",
    "val_autocorr_at_best": "val autocorr@best",
    "test_mae": "test MAE",
    "test_rmse": "test RMSE",
    "test_acf_error": "ACF err",
    "test_acf_error_pooled": "ACF err pooled",
    "test_spectral_error": "spectral dist",
    "test_field_rel_l2": "field rel L2",
    "test_tf_gap": "TF gap",
    "phase_minutes": "train time (min)",
    "peak_memory_mb": "peak MB",
}


def _summary_markdown(summary: pd.DataFrame) -> pd.DataFrame:
    summary = summary.assign(
        phase_minutes_mean=summary["phase_seconds_mean"] / 60,
        phase_minutes_std=summary["phase_seconds_std"] / 60,
    )
    out = summary[["strategy", "phase", "n_seeds"]].rename(columns={"n_seeds": "seeds"})
    for m, label in SUMMARY_COLUMNS.items():
        if f"{m}_mean" in summary and summary[f"{m}_mean"].notna().any():
            n = summary["n_evaluated" if m.startswith("test_") else "n_seeds"]
            out[label] = [
                pm(a, b, k)
                for a, b, k in zip(summary[f"{m}_mean"], summary[f"{m}_std"], n, strict=True)
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


BESIDE_COLUMNS = {  # beside.csv metric -> report column
    "test_mae": "test MAE",
    "test_rmse": "test RMSE",
    "test_acf_error": "ACF err",
    "test_acf_error_pooled": "ACF err pooled",
    "test_spectral_error": "spectral dist",
    "test_field_rel_l2": "field rel L2",
}


def _beside_name(row) -> str:
    return (
        f"{row['name']} (phase {int(row['phase'])})"
        if row["kind"] == "strategy"
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
            ("train " if kind == "strategy" else "fit ") + duration(t) if np.isfinite(t) else "n/a"
            for kind, t in zip(beside["kind"], beside["seconds_mean"], strict=True)
        ]
    return out


def _component_columns(beside: pd.DataFrame) -> dict[str, str]:
    names = [c[: -len("_mean")] for c in beside.columns if c.endswith("_mean")]
    return {
        m: f"MAE {m[len('test_mae_') :]}"
        for m in names
        if m.startswith("test_mae_") and m != "test_mae_teacher_forced"
    }


def _versus_markdown(vs: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "strategy": vs["strategy"],
            "measure": vs["metric"].map(tables.BASELINE_METRICS),
            "best baseline": vs["baseline"],
            "strategy mean": vs["strategy_mean"].map(fmt),
            "baseline mean": vs["baseline_mean"].map(fmt),
            "difference": vs["mean_diff"].map(fmt),
            "95% CI": [
                f"[{fmt(lo)}, {fmt(hi)}]"
                for lo, hi in zip(vs["ci_low"], vs["ci_high"], strict=True)
            ],
            "strategy / baseline": [fmt(1 + r) for r in vs["rel_diff"]],
            "pairs": vs["n"],
            "verdict": [
                ("beats it" if d < 0 else "worse") if real else "no real difference"
                for d, real in zip(vs["mean_diff"], vs["real"], strict=True)
            ],
        }
    )


def _reference_seed(chosen: pd.DataFrame) -> tuple[int, list[str]]:
    """The seed most strategies were evaluated at (smallest on ties) and those strategies."""
    counts = chosen.groupby("seed")["strategy"].nunique()
    seed = int(counts[counts == counts.max()].index.min())
    names = tables.strategy_order(chosen.loc[chosen["seed"] == seed, "strategy"])
    return seed, names


def _sample_figures(
    chosen: pd.DataFrame,
    files: dict,
    per_sample: pd.DataFrame,
    side: pd.DataFrame,
    baseline_per_sample: pd.DataFrame,
) -> tuple:
    """Sequences, ACF, fields, parameter response, error growth, each with the baselines of the
    same split: ([(file, Figure, caption)], a note for the report)."""
    figs = []
    seed, names = _reference_seed(chosen)
    at_seed = chosen[chosen["seed"] == seed].set_index("strategy")["run_id"]
    arr = {s: files[at_seed[s]].arrays for s in names}
    b_at_seed = side[side["seed"] == seed].set_index("baseline")["run_id"] if len(side) else {}
    arr_b = {b: files[r].arrays for b, r in dict(b_at_seed).items()}
    first = arr[names[0]]
    steps, comps = first["steps"], [str(c) for c in first["component_names"]]
    params = [str(p) for p in first["param_names"]]
    common = sorted(set.intersection(*(set(map(str, a["files"])) for a in arr.values())))
    pick = common[:N_SAMPLE_PLOTS]  # the same test files for every strategy
    pos = {s: [list(map(str, a["files"])).index(f) for f in pick] for s, a in arr.items()}
    true = first["true"][pos[names[0]]]  # (S, T, K)
    labels = [
        Path(f).stem
        + "".join(f"\n{p}={v:.3g}" for p, v in zip(params, first["params"][i], strict=True))
        for f, i in zip(pick, pos[names[0]], strict=True)
    ]
    preds = {s: arr[s]["pred"][pos[s]] for s in names}  # (S, T, K) each
    b_preds = {
        b: a["pred"][[list(map(str, a["files"])).index(f) for f in pick]] for b, a in arr_b.items()
    }
    if pick:
        fig = plots.sequences_figure(true, preds, steps, comps, labels, b_preds)
        figs.append(
            (
                "sequences.png",
                fig,
                f"Generated against true sequences for {len(pick)} "
                f"fixed test samples (seed {seed}).",
            )
        )

    max_lag = (
        int(chosen["max_lag"].min()) if chosen["max_lag"].notna().any() else metrics.ACF_MAX_LAG
    )
    true_acf = metrics.pooled_acf(first["true"], max_lag)  # (L, K)
    pred_acf = {s: metrics.pooled_acf(arr[s]["pred"], max_lag) for s in names}
    b_acf = {b: metrics.pooled_acf(a["pred"], max_lag) for b, a in arr_b.items()}
    fig = plots.acf_figure(np.arange(1, max_lag + 1), true_acf, pred_acf, comps, b_acf)
    figs.append(
        (
            "acf.png",
            fig,
            f"Autocorrelation pooled over the test split, lags 1-{max_lag} (seed {seed}).",
        )
    )

    if "pca_basis" in first and pick:
        basis, mean = first["pca_basis"], first["pca_mean"]  # (K, n_x), (n_x,)
        t = first["pca_t"] if len(first["pca_t"]) == len(steps) else steps
        n = min(N_FIELD_PLOTS, len(pick))
        pred_fields = {s: preds[s][:n] @ basis + mean for s in names}
        best = tables.best_baselines(baseline_per_sample).get("mae")
        also = ""
        if best in b_preds:  # one baseline only: a column per baseline would not fit the page
            pred_fields[plots.baseline_label(best)] = b_preds[best][:n] @ basis + mean
            also = f", and the best baseline by MAE ({best})"
        fig = plots.fields_figure(
            true[:n] @ basis + mean, pred_fields, first["pca_x"], t, labels[:n]
        )
        figs.append(
            (
                "fields.png",
                fig,
                f"True against generated fields u(x, t) through the PCA basis (seed {seed}){also}.",
            )
        )

    fig = plots.param_error_figure(per_sample, params, baselines=baseline_per_sample)
    figs.append(
        (
            "param_error.png",
            fig,
            "Per-sample test MAE over the parameter plane, all evaluated seeds"
            + (", strategies above, baselines below." if len(baseline_per_sample) else "."),
        )
    )
    for p, name in enumerate(params):
        sweep = {s: arr[s]["sweep_pred"][p] for s in names}  # (S, T, K) each
        sweep |= {plots.baseline_label(b): a["sweep_pred"][p] for b, a in arr_b.items()}
        fig = plots.sweep_figure(first["sweep_params"][p, :, p], sweep, steps, comps, name)
        figs.append(
            (
                f"sweep_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png",
                fig,
                f"Generated trajectories along a sweep of {name} (seed {seed}).",
            )
        )

    def error_by_step(runs, label: str) -> pd.DataFrame:
        """Each run's MAE against time step, labelled by its strategy or baseline and seed."""
        frames = [
            files[r.run_id]
            .by_step.iloc[:, :2]
            .set_axis(["step", "value"], axis=1)
            .assign(**{label: getattr(r, label)}, seed=r.seed)
            for r in runs.itertuples()
        ]
        return pd.concat(frames or [pd.DataFrame(columns=["step", "value", label, "seed"])])

    by_step = error_by_step(chosen, "strategy")
    b_by_step = error_by_step(side, "baseline")
    figs.append(
        (
            "error_by_step.png",
            plots.error_by_step_figure(by_step, b_by_step),
            "Test MAE at each step of the free-running sequence (baselines dashed).",
        )
    )
    missing = sorted(set(chosen["strategy"]) - set(names))
    note = (
        f" Strategies without an evaluation at seed {seed}: {', '.join(missing)}."
        if missing
        else ""
    )
    return figs, note


def build_report(
    out_dir: str | Path,
    experiment: str | None = None,
    strategies=(),
    phases=(),
    preset: str | None = None,
    seeds=(),
    tags=(),
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
        _write_report(out, experiment, strategies, phases, preset, seeds, tags, started)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    return final / "report.md"


def _write_report(
    out: Path, experiment, strategies, phases, preset, seeds, tags, started: float
) -> None:
    """Everything build_report writes, into `out`; logged as an analysis run at the end."""
    sel = query.select_runs(
        experiment, tuple(strategies), tuple(phases), preset, tuple(seeds), tuple(tags)
    )
    curves = tables.stitch(query.metric_histories(list(sel.phases["run_id"])), sel.phases)
    boundaries = tables.phase_boundaries(sel.phases)
    per_run = tables.per_run_table(sel.phases, sel.evaluations, curves)
    summary = tables.summary_table(per_run)
    chosen = tables.latest_evaluated(sel.evaluations)

    figs: list[tuple[str, object, str]] = [
        (
            "val_loss.png",
            plots.val_loss_figure(curves[curves["key"] == "val_loss"], boundaries),
            "Free-running validation loss (each strategy's own objective), phases stitched; dotted "
            "lines mark phase boundaries.",
        ),
        (
            "components.png",
            plots.components_figure(curves, boundaries),
            "MAE and autocorrelation components of the loss, comparable across strategies.",
        ),
        (
            "schedules.png",
            plots.schedules_figure(curves, boundaries),
            "Learning-rate and teacher-forcing schedules.",
        ),
    ]
    paired, per_sample, ranked, note = pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), ""
    side = tables.baselines_at_seeds(chosen, sel.baselines)
    baseline_per_sample = pd.DataFrame(columns=["baseline", "seed", "file"])
    if not chosen.empty:
        files = query.evaluation_files(list(chosen["run_id"]) + list(dict.fromkeys(side["run_id"])))
        per_sample = pd.concat(
            [
                files[r.run_id].per_sample.assign(strategy=r.strategy, seed=r.seed, phase=r.phase)
                for r in chosen.itertuples()
            ]
        )
        if len(side):
            baseline_per_sample = pd.concat(
                [
                    files[r.run_id].per_sample.assign(baseline=r.baseline, seed=r.seed)
                    for r in side.itertuples()
                ]
            )
        # Strategies are ranked and paired on the seeds all of them were evaluated at, so a
        # mean over seeds and a paired difference speak about the same test samples.
        seeds_all = tables.common_seeds(chosen)
        ranked = per_sample[per_sample["seed"].isin(seeds_all)]
        paired = tables.paired_comparison(ranked)
        more, note = _sample_figures(chosen, files, per_sample, side, baseline_per_sample)
        figs += more
        if not seeds_all:
            note += " No seed was evaluated for every strategy: nothing is paired."
        if not paired.empty:
            figs.append(
                (
                    "paired.png",
                    plots.paired_figure(paired, tables.PAIRED_METRICS),
                    "Paired differences between strategies on the same test samples.",
                )
            )
    # Each strategy against the best baseline at its own seeds: a baseline pairs with every
    # strategy evaluated on its split.
    vs = tables.versus_baselines(per_sample, baseline_per_sample) if len(side) else pd.DataFrame()
    beside = tables.beside_baselines(chosen, side, per_run) if len(side) else pd.DataFrame()
    if not vs.empty:
        figs.append(
            (
                "versus_baselines.png",
                plots.paired_figure(
                    vs.rename(columns={"strategy": "a", "baseline": "b"}),
                    tables.BASELINE_METRICS,
                    "Each strategy minus the best baseline on the same test samples "
                    "(red: a real difference)",
                ),
                "Each strategy's error minus the best baseline's (of that measure) on the same "
                "test samples, with its paired-bootstrap 95% CI: left of 0 the strategy is better.",
            )
        )
    for name, fig, _ in figs:
        fig.savefig(out / name, dpi=DPI)

    summary.to_csv(out / "summary.csv", index=False)
    per_run.to_csv(out / "per_run.csv", index=False)
    paired.to_csv(out / "paired.csv", index=False)
    beside.to_csv(out / "baselines.csv", index=False)
    vs.to_csv(out / "versus_baselines.csv", index=False)
    per_sample.to_csv(out / "per_sample.csv", index=False)
    sel.excluded.to_csv(out / "excluded.csv", index=False)

    doc = _document(
        sel,
        summary,
        per_run,
        chosen,
        ranked if len(paired) else per_sample,
        paired,
        beside,
        vs,
        figs,
        note,
        time.perf_counter() - started,
    )
    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html(f"seqgen comparison: {sel.experiment}"))
    query.log_analysis_run(
        out,
        sel.experiment_id,
        {"experiment": sel.experiment, **{k: str(v) for k, v in sel.filters.items()}},
        {
            "compared_runs": len(sel.phases),
            "evaluation_runs": len(sel.evaluations),
            "baseline_runs": len(side["run_id"].unique()) if len(side) else 0,
        },
    )


def _example_model(phases: pd.DataFrame) -> str:
    """The registry name of the combined strategy at the compared preset."""
    preset = str(phases["preset"].iloc[0]) if len(phases) else "full"
    return "seqgen-combined" + ("" if preset == "full" else f"-{preset}")


def _document(
    sel, summary, per_run, chosen, per_sample, paired, beside, vs, figs, note, seconds: float
) -> Doc:
    ph = sel.phases
    doc = Doc()
    doc.h(1, f"seqgen: which loss strategy? ({sel.experiment})")
    doc.p(
        f"Made {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from {query.tracking_uri()} in "
        f"{seconds:.1f} s, by {code_version()}."
    )
    doc.h(2, "Answer")
    if chosen.empty:
        doc.p(
            "No evaluation runs for the selected phase runs, so no test-set answer yet: "
            "evaluate the last phase of each strategy, e.g. `seqgen evaluate --model "
            f"models:/{_example_model(ph)}@phase-5`, then compare again. Training curves follow."
        )
    else:
        verdicts = baseline_verdicts(vs, beside)
        doc.ul(verdicts[:1] + conclusions(per_sample, paired, chosen, per_run))
        doc.p(
            "A difference is *real* when its paired-bootstrap 95% CI over (seed, test sample) "
            f"pairs excludes 0, there are at least {tables.MIN_PAIRS} pairs, and every "
            "seed's mean difference has the same sign."
        )
    if not chosen.empty:
        _baseline_section(doc, beside, vs, verdicts[1:], ph)
    doc.h(2, "What was compared")
    evaluated = (
        ", ".join(
            f"{s} phase {int(p)}" for s, p in chosen.groupby("strategy")["phase"].max().items()
        )
        or "none"
    )
    commits = sorted(set(ph["git_commit"]) - {""})
    doc.ul(
        [
            f"Strategies: {', '.join(tables.strategy_order(ph['strategy']))}; phases "
            f"{', '.join(map(str, sorted(ph['phase'].astype(int).unique())))}; seeds "
            f"{', '.join(map(str, sorted(ph['seed'].astype(int).unique())))}; preset "
            f"{', '.join(sorted(set(ph['preset'])))}.",
            f"Data: {', '.join(sorted(set(ph['data_dir']) - {''})) or 'unknown'} (fingerprint "
            f"{', '.join(sorted(set(ph['dataset_fingerprint']) - {''})) or 'unknown'}).",
            f"Runs: {len(ph)} phase runs, {len(sel.evaluations)} test evaluations; sample-level "
            f"figures and the paired comparison use: {evaluated}; test samples per evaluation: "
            f"{', '.join(map(str, sorted(set(chosen['n_samples'].dropna().astype(int))))) or '-'}."
            + note,
            f"Code of the runs: {', '.join(commits) or 'no git commit recorded'}.",
            "Filters: " + (query.describe_filters(sel.filters) or "none") + ".",
        ]
    )
    if not sel.excluded.empty:
        doc.p(f"Left out ({len(sel.excluded)} runs):")
        doc.table(sel.excluded)
    doc.h(2, "Summary per strategy and phase (mean ± std over seeds)")
    doc.table(_summary_markdown(summary))
    doc.p(
        "Losses are in standardised units; test metrics from evaluation runs in original "
        "units. Spectral distance: RMS of log10 power ratio over non-DC frequencies. "
        "TF gap: free-running minus teacher-forced test MAE. Also in summary.csv, per_run.csv."
    )
    if not paired.empty:
        doc.h(2, "Paired comparison on the same test samples")
        doc.table(_paired_markdown(paired))
    doc.h(2, "Figures")
    for name, _, caption in figs:
        doc.img(name, caption)
    return doc


def _baseline_section(doc: Doc, beside: pd.DataFrame, vs: pd.DataFrame, verdicts, ph) -> None:
    """Is the surrogate worth training? Each strategy beside the baselines on the same samples."""
    doc.h(2, "Is it worth training? Against the baselines")
    if beside.empty:
        doc.p(
            "No baseline evaluations on the splits of these evaluations (evaluations logged before "
            "baselines existed carry no split fingerprint): evaluate again, e.g. `seqgen evaluate "
            f"--model models:/{_example_model(ph)}@phase-5`, which fits them once per split, or "
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
    doc.table(_beside_markdown(beside, BESIDE_COLUMNS, time=True))
    components = _component_columns(beside)
    if components:
        doc.p("Test MAE per component (original units):")
        doc.table(_beside_markdown(beside, components, time=False))
    if not vs.empty:
        doc.p("Each strategy minus the best baseline of each measure, paired on the same samples:")
        doc.table(_versus_markdown(vs))
