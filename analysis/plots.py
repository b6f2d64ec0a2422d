"""Figures for the comparison report: each function takes DataFrames or arrays, returns a Figure."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from analysis.tables import band, baseline_order, variant_order
from seqgen import config
from seqgen.evaluation import measures
from seqgen.evaluation.baselines import BASELINES

# Figures are made as bare Figure objects (no pyplot state to leak) and saved as files; Agg is
# also what pyplot gets if a caller imports it, so nothing tries to open a display.
matplotlib.use("Agg")

# Strategies take these by their position in the phase table, then variants and others by
# their position in the figure; baselines take theirs by position in BASELINES, dashed. The two
# palettes share no colour, so a figure tells strategies and baselines apart at a glance.
STRATEGY_COLORS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
)
BASELINE_COLORS = ("tab:gray", "tab:purple", "tab:brown")
OTHER_BASELINE_COLOR = "darkslategray"
TRUE_COLOR = "black"
BASELINE_LS = "--"


def baseline_color(name: str) -> str:
    known = list(BASELINES)
    if name in known and known.index(name) < len(BASELINE_COLORS):
        return BASELINE_COLORS[known.index(name)]
    return OTHER_BASELINE_COLOR


def baseline_label(name: str) -> str:
    return f"{name} baseline"


def strategy_color(name: str, names: list[str]) -> str:
    """The same colour for a strategy in every figure: by its position in the phase table;
    a variant or a strategy the table lacks by its position among those in `names`."""
    table = config.strategies()
    if name in table:
        return STRATEGY_COLORS[table.index(name) % len(STRATEGY_COLORS)]
    others = [n for n in names if n not in table]
    if name not in others:
        return "gray"
    return STRATEGY_COLORS[(len(table) + others.index(name)) % len(STRATEGY_COLORS)]


def _mark_phases(ax, boundaries: list[float]) -> None:
    for i, x in enumerate(boundaries):
        ax.axvline(x, color="gray", lw=0.8, ls=":", label="phase boundary" if i == 0 else None)


def _curves(ax, curves: pd.DataFrame, names: list[str], ls: str = "-", label: bool = True) -> int:
    """Mean over seeds as a line, min-max over seeds as a band, one colour per strategy;
    returns the largest number of seeds behind a point."""
    stats = band(curves)
    most = 0
    for name in names:
        s = stats[stats["variant"] == name]
        if s.empty:
            continue
        color = strategy_color(name, names)
        n = int(s["n"].max())
        most = max(most, n)
        ax.plot(s["step"], s["mean"], ls=ls, color=color, lw=1.4, label=name if label else None)
        if n > 1:
            ax.fill_between(s["step"], s["lo"], s["hi"], color=color, alpha=0.2, lw=0)
    return most


def _seeds_note(n: int) -> str:
    return f"mean of {n} seeds, band min-max" if n > 1 else "1 seed"


def _positive(values: pd.Series) -> bool:
    return bool(len(values)) and bool((values > 0).all())


def val_loss_figure(curves: pd.DataFrame, boundaries: list[float]) -> Figure:
    """Free-running validation loss over global epochs: curves (strategy, seed, step, value)."""
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.add_subplot()
    names = variant_order(curves["variant"].unique())
    n = _curves(ax, curves, names)
    _mark_phases(ax, boundaries)
    if _positive(curves["value"]):
        ax.set_yscale("log")
    ax.set(
        xlabel="epoch (phases stitched)",
        ylabel="validation loss (own objective, log)",
        title=f"Validation loss, free-running ({_seeds_note(n)})",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def components_figure(curves: pd.DataFrame, boundaries: list[float]) -> Figure:
    """Every loss term the runs logged (train_<term>: mae, autocorr, spectral, ...), validation
    (solid) and training (dashed); curves (strategy, seed, key, step, value)."""
    terms = {t: measures.term_label(t) for t in measures.terms_in(curves["key"].unique())}
    fig = Figure(figsize=(6 * max(len(terms), 1), 4.5), layout="constrained")
    names = variant_order(curves["variant"].unique())
    axes = fig.subplots(1, len(terms), squeeze=False)[0] if terms else []
    for ax, (part, label) in zip(axes, terms.items(), strict=True):
        n = _curves(ax, curves[curves["key"] == f"val_{part}"], names)
        _curves(ax, curves[curves["key"] == f"train_{part}"], names, "--", label=False)
        _mark_phases(ax, boundaries)
        sub = curves[curves["key"].isin([f"val_{part}", f"train_{part}"])]["value"]
        if _positive(sub):
            ax.set_yscale("log")
        ax.set(
            xlabel="epoch",
            ylabel=label,
            title=f"{label}: validation solid, training dashed\n({_seeds_note(n)})",
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return fig


def schedules_figure(curves: pd.DataFrame, boundaries: list[float]) -> Figure:
    """Learning rate (log) and teacher-forcing ratio against epoch, per strategy."""
    fig = Figure(figsize=(12, 4), layout="constrained")
    names = variant_order(curves["variant"].unique())
    schedules = measures.SCHEDULES
    for ax, (key, label) in zip(fig.subplots(1, len(schedules)), schedules.items(), strict=True):
        _curves(ax, curves[curves["key"] == key], names)
        _mark_phases(ax, boundaries)
        # the learning rate spans decades; the teacher-forcing ratio falls to 0
        if key == "lr" and _positive(curves.loc[curves["key"] == key, "value"]):
            ax.set_yscale("log")
        ax.set(xlabel="epoch", ylabel=label, title=f"{label} schedule")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return fig


def sequences_figure(
    true: np.ndarray,
    preds: dict[str, np.ndarray],
    steps: np.ndarray,
    component_names: list[str],
    sample_labels: list[str],
    baselines: dict[str, np.ndarray] | None = None,
) -> Figure:
    """Generated against true sequences: true (S, T, K), preds {strategy: (S, T, K)}, baselines
    {name: (S, T, K)} dashed; one row per sample, one column per component."""
    s, _, k = true.shape
    fig = Figure(figsize=(3 * k, 2.3 * s + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(s, k, squeeze=False))
    names = list(preds)
    for i in range(s):
        for j in range(k):
            ax = axes[i, j]
            ax.plot(steps, true[i, :, j], color=TRUE_COLOR, lw=2, label="true")
            for name in names:
                ax.plot(
                    steps,
                    preds[name][i, :, j],
                    color=strategy_color(name, names),
                    lw=1.2,
                    label=name,
                )
            for name, pred in (baselines or {}).items():
                ax.plot(
                    steps,
                    pred[i, :, j],
                    color=baseline_color(name),
                    ls=BASELINE_LS,
                    lw=1.0,
                    label=baseline_label(name),
                )
            if i == 0:
                ax.set_title(component_names[j], fontsize=10)
            ax.tick_params(labelsize=7)
            if i == s - 1:
                ax.set_xlabel("step", fontsize=8)
            if j == 0:
                ax.set_ylabel(sample_labels[i], fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Generated (free-running) against true sequences")
    return fig


def acf_figure(
    lags: np.ndarray,
    true_acf: np.ndarray,
    pred_acf: dict[str, np.ndarray],
    component_names: list[str],
    baselines: dict[str, np.ndarray] | None = None,
) -> Figure:
    """Pooled autocorrelation at lags 1..L: true (L, K), pred {strategy: (L, K)}, baselines
    {name: (L, K)} dashed."""
    k = true_acf.shape[1]
    fig = Figure(figsize=(3 * k, 3.6), layout="constrained")
    names = list(pred_acf)
    for j, ax in enumerate(np.atleast_1d(fig.subplots(1, k))):
        ax.plot(lags, true_acf[:, j], "o-", color=TRUE_COLOR, lw=2, ms=3, label="true")
        for name in names:
            ax.plot(
                lags, pred_acf[name][:, j], color=strategy_color(name, names), lw=1.2, label=name
            )
        for name, acf in (baselines or {}).items():
            ax.plot(
                lags,
                acf[:, j],
                color=baseline_color(name),
                ls=BASELINE_LS,
                lw=1.0,
                label=baseline_label(name),
            )
        ax.set(xlabel="lag (steps)", title=component_names[j])
        if j == 0:
            ax.set_ylabel("autocorrelation (pooled over test split)")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle("Autocorrelation of generated against true sequences")
    return fig


def fields_figure(
    true_fields: np.ndarray,
    pred_fields: dict[str, np.ndarray],
    x: np.ndarray,
    t: np.ndarray,
    sample_labels: list[str],
) -> Figure:
    """x-t images of true and generated fields: true (S, T, n_x), pred {strategy: (S, T, n_x)};
    one row per sample, one colour scale per row."""
    s = true_fields.shape[0]
    names = list(pred_fields)
    cols = 1 + len(names)
    fig = Figure(figsize=(3.2 * cols + 1, 2.8 * s + 0.5), layout="constrained")
    axes = np.atleast_2d(fig.subplots(s, cols, squeeze=False))
    extent = (float(x[0]), float(x[-1]), float(t[-1]), float(t[0]))
    for i in range(s):
        stack = [true_fields[i]] + [pred_fields[n][i] for n in names]
        vmin, vmax = min(a.min() for a in stack), max(a.max() for a in stack)
        for j, (img, title) in enumerate(zip(stack, ["true", *names], strict=True)):
            ax = axes[i, j]
            im = ax.imshow(img, aspect="auto", extent=extent, vmin=vmin, vmax=vmax, cmap="viridis")
            if i == 0:
                ax.set_title(title, fontsize=10)
            ax.set_xlabel("x", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{sample_labels[i]}\nt", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=axes[i, :], label="u", shrink=0.9)
    fig.suptitle("Fields reconstructed through the PCA basis: true against generated")
    return fig


def _log_axis(values: np.ndarray) -> bool:
    return bool(values.min() > 0 and values.max() / values.min() > 10)


def param_error_figure(
    per_sample: pd.DataFrame,
    param_names: list[str],
    metric: str = measures.HEADLINE,
    baselines: pd.DataFrame | None = None,
) -> Figure:
    """Per-sample error over the parameter plane, one panel per strategy (first row) and per
    baseline (second row), one colour scale: per_sample (strategy, <param columns>, metric),
    baselines (baseline, <param columns>, metric)."""
    panels = [
        (name, per_sample[per_sample["variant"] == name])
        for name in variant_order(per_sample["variant"].unique())
    ]
    rows = [panels]
    if baselines is not None and len(baselines):
        order = baseline_order(baselines["baseline"].unique())
        rows.append([(baseline_label(b), baselines[baselines["baseline"] == b]) for b in order])
    n_cols = max(len(r) for r in rows)
    fig = Figure(figsize=(4.2 * n_cols + 1, 3.8 * len(rows)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), n_cols, sharex=True, sharey=True, squeeze=False))
    every = pd.concat([frame for row in rows for _, frame in row])
    values = every[metric].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    norm = (
        mcolors.LogNorm(finite.min(), finite.max())
        if len(finite) and finite.min() > 0
        else mcolors.Normalize()
    )
    px = param_names[0]
    py = param_names[1] if len(param_names) > 1 else None
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            if j >= len(row):
                ax.set_visible(False)
                continue
            name, s = row[j]
            yv = s[py] if py else s[metric]
            sc = ax.scatter(
                s[px], yv, c=s[metric], norm=norm, cmap="magma_r", s=14, edgecolors="none"
            )
            ax.set(title=name, xlabel=px, ylabel=py or metric)
            if _log_axis(every[px].to_numpy(dtype=float)):
                ax.set_xscale("log")
            if py and _log_axis(every[py].to_numpy(dtype=float)):
                ax.set_yscale("log")
    label = measures.BY_KEY[metric].name if metric in measures.BY_KEY else metric
    fig.colorbar(sc, ax=axes.ravel().tolist(), label=f"test {label} per sample")
    fig.suptitle(f"Test {label} over the parameter plane (all evaluated seeds pooled)")
    return fig


def sweep_figure(
    values: np.ndarray,
    preds: dict[str, np.ndarray],
    steps: np.ndarray,
    component_names: list[str],
    param_name: str,
) -> Figure:
    """Generated trajectories along one parameter: values (S,), preds {strategy: (S, T, K)};
    one row per strategy, one column per component, colour = parameter value."""
    names = list(preds)
    k = len(component_names)
    fig = Figure(figsize=(3 * k + 1, 2.4 * len(names) + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(names), k, squeeze=False, sharex=True, sharey="col"))
    log = _log_axis(np.asarray(values, dtype=float))
    norm = (mcolors.LogNorm if log else mcolors.Normalize)(float(min(values)), float(max(values)))
    # plasma without its pale yellow end, which vanishes on white
    cmap = mcolors.LinearSegmentedColormap.from_list(
        "plasma_dark", matplotlib.colormaps["plasma"](np.linspace(0.0, 0.85, 256))
    )
    for i, name in enumerate(names):
        for j in range(k):
            ax = axes[i, j]
            for v, seq in zip(values, preds[name], strict=True):
                ax.plot(steps, seq[:, j], color=cmap(norm(v)), lw=1.2)
            ax.set_title(f"{name}: {component_names[j]}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(names) - 1:
                ax.set_xlabel("step", fontsize=8)
    sm = ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=axes.ravel().tolist(), label=param_name, shrink=0.6, aspect=30)
    fig.suptitle(
        f"Generated trajectories along a sweep of {param_name} (other parameters at their median)"
    )
    return fig


def error_by_step_figure(by_step: pd.DataFrame, baselines: pd.DataFrame | None = None) -> Figure:
    """Test MAE at each time step: by_step (strategy, seed, step, value), band over seeds;
    baselines (baseline, seed, step, value) dashed, mean over seeds."""
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    n = _curves(ax, by_step, variant_order(by_step["variant"].unique()))
    if baselines is not None and len(baselines):
        mean = baselines.groupby(["baseline", "step"])["value"].mean().reset_index()
        for name, g in mean.groupby("baseline", sort=False):
            ax.plot(
                g["step"],
                g["value"],
                color=baseline_color(str(name)),
                ls=BASELINE_LS,
                lw=1.2,
                label=baseline_label(str(name)),
            )
    ax.set(
        xlabel="step",
        ylabel="test MAE (original units)",
        title=f"Error growth along the free-running sequence ({_seeds_note(n)})",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def paired_figure(
    paired: pd.DataFrame,
    labels: dict[str, str],
    title: str = "Paired differences on the same test samples (red: a real difference)",
) -> Figure:
    """Mean per-sample difference a - b with its bootstrap CI, one panel per metric."""
    metrics_present = list(dict.fromkeys(paired["metric"]))
    fig = Figure(
        figsize=(4.2 * len(metrics_present), 0.6 * paired.groupby("metric").size().max() + 1.6),
        layout="constrained",
    )
    for ax, metric in zip(
        np.atleast_1d(fig.subplots(1, len(metrics_present))), metrics_present, strict=True
    ):
        p = paired[paired["metric"] == metric].reset_index(drop=True)
        y = np.arange(len(p))
        err = np.vstack([p["mean_diff"] - p["ci_low"], p["ci_high"] - p["mean_diff"]])
        for i, real in enumerate(p["real"]):
            ax.errorbar(
                p["mean_diff"][i],
                y[i],
                xerr=err[:, i : i + 1],
                fmt="o",
                capsize=3,
                color="tab:red" if real else "gray",
            )
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, [f"{a} - {b}" for a, b in zip(p["a"], p["b"], strict=True)], fontsize=8)
        ax.set(
            title=labels.get(metric, metric), xlabel="error of a minus b, 95% CI (< 0: a better)"
        )
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title)
    return fig


def spread_error_figure(per_sample: pd.DataFrame) -> Figure:
    """Seed ensembles: each test sequence's spread (std over members, mean over steps and
    components) against the error of the members' mean (MAE), one panel per region.
    per_sample: strategy, region ('inside' / 'outside'), spread, mae."""
    regions = [r for r in ("inside", "outside") if r in set(per_sample["region"])]
    fig = Figure(figsize=(5.5 * len(regions), 4.5), layout="constrained")
    axes = fig.subplots(1, len(regions), squeeze=False)[0]
    names = variant_order(per_sample["strategy"].unique())
    for ax, region in zip(axes, regions, strict=True):
        part = per_sample[per_sample["region"] == region]
        for name in names:
            s = part[part["strategy"] == name]
            ax.scatter(s["spread"], s["mae"], s=16, color=strategy_color(name, names), label=name)
        top = float(np.nanmax([part["spread"].max(), part["mae"].max()]))
        ax.plot([0, top], [0, top], color=TRUE_COLOR, lw=0.8, ls=":", label="error = spread")
        ax.set_xlabel("ensemble spread (std over seeds)")
        ax.set_ylabel("MAE of the ensemble mean")
        ax.set_title(f"{region} the training range")
        ax.legend(fontsize=8)
    return fig
