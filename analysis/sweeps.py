"""What a sweep asks: each varied setting against the end-of-plan measures, with the seeds' spread.

A sweep is read from the runs, not from the command that made it: the variants of one strategy
whose differences from the table (the runs' seqgen.variant record) agree on everything but one
setting form a line over that setting's values (the table's plan joins where it has no other
difference). Every such setting gets a figure, and alpha also the trade-off between MAE and
autocorrelation error.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.tables import variant_order
from seqgen.evaluation import measures

matplotlib.use("Agg")

# The measures a sweep is drawn against: the ones the paired comparison answers needs with.
SWEEP_MEASURES = tuple(m.key for m in measures.MEASURES if m.need)
TRADE_OFF = ("mae", "acf_error")  # alpha weighs these two


def _value(text: str):
    """A logged param as the number it is, where it is one."""
    try:
        return float(text)
    except ValueError:
        return text


def sweep_points(chosen: pd.DataFrame, phases: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{setting: rows (strategy, line, variant, seed, value, test_<measure>...)} for every setting
    some group of variants of one strategy varies while agreeing on everything else; `line` names
    that group's other differences ('' where there are none)."""
    meta = phases.set_index("run_id")[["strategy", "differences", "params"]]
    rows = chosen.drop(columns="strategy", errors="ignore").join(meta, on="evaluated_run_id")
    keys = sorted({k for d in rows["differences"] for k in d})
    out = {}
    for key in keys:
        found = []
        for r in rows.itertuples():
            rest = {k: v for k, v in r.differences.items() if k != key}
            if key not in r.params:
                continue
            line = ", ".join(f"{k}={v}" for k, v in sorted(rest.items()))
            found.append((r.strategy, line, r.variant, int(r.seed), _value(r.params[key])))
        if not found:
            continue
        points = pd.DataFrame(found, columns=["strategy", "line", "variant", "seed", "value"])
        tested = [f"test_{m}" for m in SWEEP_MEASURES if f"test_{m}" in rows]
        points = points.join(rows[tested].reset_index(drop=True))
        # A line needs two values of the setting; lines of one value are not a sweep of it.
        spread = points.groupby(["strategy", "line"])["value"].transform("nunique")
        points = points[spread > 1]
        if len(points):
            out[key] = points.reset_index(drop=True)
    return out


def sweep_table(points: pd.DataFrame) -> pd.DataFrame:
    """Per line and value: mean and std over seeds of each measure, the number of seeds."""
    tested = [c for c in points if c.startswith("test_")]
    g = points.groupby(["strategy", "line", "variant", "value"], sort=False)
    table = g[tested].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table = table.assign(seeds=g["seed"].nunique()).reset_index()
    return table.sort_values(["strategy", "line", "value"], kind="stable", ignore_index=True)


def _numeric(points: pd.DataFrame) -> bool:
    return all(isinstance(v, float) for v in points["value"])


def sweep_figure(key: str, points: pd.DataFrame) -> Figure:
    """One panel per measure: a line with a ±1 std band over seeds for a numeric setting, bars
    with error bars for a named one; one line (or bar group) per strategy and other differences."""
    table = sweep_table(points)
    tested = [m for m in SWEEP_MEASURES if f"test_{m}_mean" in table]
    fig = Figure(figsize=(4.2 * len(tested), 3.4), layout="constrained")
    axes = fig.subplots(1, len(tested), squeeze=False)[0]
    groups = list(table.groupby(["strategy", "line"], sort=False))
    for ax, m in zip(axes, tested, strict=True):
        for i, ((strategy, line), g) in enumerate(groups):
            label = strategy + (f" ({line})" if line else "")
            mean, std = g[f"test_{m}_mean"], g[f"test_{m}_std"].fillna(0.0)
            if _numeric(points):
                x = g["value"].astype(float)
                ax.plot(x, mean, marker="o", color=f"C{i}", label=label)
                ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.2)
            else:
                x = np.arange(len(g)) + i / (len(groups) + 1)
                ax.bar(x, mean, 1 / (len(groups) + 1), yerr=std, color=f"C{i}", label=label)
                ax.set_xticks(np.arange(len(g)), [str(v) for v in g["value"]])
        ax.set_xlabel(key)
        ax.set_title(f"test {measures.BY_KEY[m].name}")
        if _numeric(points) and (points["value"].astype(float) > 0).all():
            values = points["value"].astype(float)
            if values.max() / values.min() >= 100:
                ax.set_xscale("log")
    axes[0].legend(fontsize="small")
    return fig


def pareto_front(means: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The rows no other row beats on both columns (lower is better), sorted by x."""

    def beaten(r) -> bool:
        no_worse = (means[x] <= r[x]) & (means[y] <= r[y])
        return bool((no_worse & ((means[x] < r[x]) | (means[y] < r[y]))).any())

    keep = [not beaten(r) for _, r in means.iterrows()]
    return means[keep].sort_values(x)


def trade_off_figure(points: pd.DataFrame) -> Figure:
    """alpha's trade-off: each variant's seeds (small) and mean (large, labelled with alpha) in
    test MAE against test ACF error, the Pareto front of the means joined."""
    x, y = (f"test_{m}" for m in TRADE_OFF)
    fig = Figure(figsize=(5.5, 4.4), layout="constrained")
    ax = fig.subplots()
    means = points.groupby(["variant", "value"], as_index=False)[[x, y]].mean()
    names = variant_order(means["variant"])
    for i, name in enumerate(names):
        seeds = points[points["variant"] == name]
        mean = means[means["variant"] == name].iloc[0]
        ax.scatter(seeds[x], seeds[y], s=14, color=f"C{i}", alpha=0.5)
        ax.scatter(mean[x], mean[y], s=60, color=f"C{i}", edgecolor="black", label=name)
        label = f"alpha={mean['value']:g}"
        ax.annotate(label, (mean[x], mean[y]), xytext=(4, 4), textcoords="offset points")
    front = pareto_front(means, x, y)
    ax.plot(front[x], front[y], color="black", lw=1, ls=":", label="Pareto front (means)")
    ax.set_xlabel(f"test {measures.BY_KEY[TRADE_OFF[0]].name}")
    ax.set_ylabel(f"test {measures.BY_KEY[TRADE_OFF[1]].name}")
    ax.set_title("alpha: MAE against autocorrelation error (lower left is better)")
    ax.legend(fontsize="small")
    return fig


def trades_off(key: str, points: pd.DataFrame) -> bool:
    """Whether a sweep gets the trade-off figure: alpha, with both measures evaluated."""
    return key == "alpha" and all(f"test_{m}" in points for m in TRADE_OFF)
