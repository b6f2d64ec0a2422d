"""Numbers to words: the report's answer to "which strategy, for which need?"."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import tables
from seqgen import metrics


def fmt(x: float) -> str:
    """3 significant digits; whole numbers from 1000 up to a million without an exponent."""
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.0f}" if 1000 <= abs(x) < 1e6 else f"{x:.3g}"


def pm(mean: float, std: float, n: int = 2) -> str:
    """'mean ± std', or the value alone when it comes from one seed."""
    if not np.isfinite(mean):
        return "n/a"
    return f"{fmt(mean)} ± {fmt(std)}" if n > 1 else fmt(mean)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    return f"{seconds / 60:.3g} min" if seconds < 7200 else f"{seconds / 3600:.3g} h"


def seed_means(per_sample: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per strategy: mean and std over seeds of the per-seed mean of `metric`, and n seeds."""
    by_seed = per_sample.groupby(["strategy", "seed"])[metric].mean().reset_index()
    rows = [(s, *metrics.mean_std(g[metric]), len(g)) for s, g in by_seed.groupby("strategy")]
    return pd.DataFrame(rows, columns=["strategy", "mean", "std", "n"]).set_index("strategy")


def conclusions(
    per_sample: pd.DataFrame, paired: pd.DataFrame, chosen: pd.DataFrame, per_run: pd.DataFrame
) -> list[str]:
    """The answer, in sentences drawn from the numbers: best strategy per need, how sure."""
    out = []
    phase_of = chosen.groupby("strategy")["phase"].max().to_dict()
    trained = tables.strategy_order(per_run["strategy"].unique())
    if len(phase_of) < 2:  # nothing to compare against: say so, name no winner
        missing = [s for s in trained if s not in phase_of]
        only = ", ".join(phase_of) or "no strategy"
        return [
            f"Only {only} has a test evaluation"
            + (f"; evaluate {', '.join(missing)} to compare" if missing else "")
            + "."
        ]
    worse: dict[str, list[str]] = {s: [] for s in phase_of}
    for metric, need in tables.PAIRED_METRICS.items():
        if metric not in per_sample or per_sample[metric].isna().all():
            continue
        stats = seed_means(per_sample, metric)
        best = stats["mean"].idxmin()
        b = stats.loc[best]
        text = (
            f"**{need}**: **{best}** is lowest ({pm(b['mean'], b['std'], b['n'])} over "
            f"{int(b['n'])} seed(s), phase {int(phase_of[best])})"
        )
        parts = []
        for _, r in paired[paired["metric"] == metric].iterrows():
            if r["real"]:
                worse[r["a"] if r["mean_diff"] > 0 else r["b"]].append(metric)
            if best not in (r["a"], r["b"]):
                continue
            other = r["b"] if r["a"] == best else r["a"]
            sign = 1 if r["a"] == best else -1  # difference best - other
            d, lo, hi = sign * r["mean_diff"], *sorted((sign * r["ci_low"], sign * r["ci_high"]))
            if r["real"] and d < 0:
                parts.append(
                    f"lower than {other}'s by {fmt(-d)} [95% CI {fmt(-hi)}, {fmt(-lo)}],"
                    " a real difference"
                )
            elif r["real"]:  # lowest mean over seeds, yet worse on the paired samples
                parts.append(
                    f"but higher than {other}'s on the same samples by {fmt(d)} "
                    f"[95% CI {fmt(lo)}, {fmt(hi)}]"
                )
            else:
                why = ("" if r["seeds_agree"] or r["n_seeds"] < 2 else ", seeds disagree") + (
                    f", only {r['n']} pairs" if r["n"] < tables.MIN_PAIRS else ""
                )
                parts.append(
                    f"not distinguishable from {other} (difference {fmt(d)} "
                    f"[{fmt(lo)}, {fmt(hi)}]{why})"
                )
        out.append(text + ("; " + "; ".join(parts) if parts else "") + ".")
    safe = [s for s in tables.strategy_order(worse) if not worse[s]]
    cost = per_run.groupby(["strategy", "seed"])["phase_seconds"].sum().groupby("strategy").mean()
    any_real = bool(len(paired)) and bool(paired["real"].any())
    if not any_real and len(paired):
        fastest = min(worse, key=lambda s: cost.get(s, np.inf))
        out.append(
            "**Overall**: no difference between strategies is real at this number of seeds and "
            f"samples; on cost, {fastest} trains fastest."
        )
    elif len(safe) == 1:
        out.append(
            f"**Overall**: use **{safe[0]}**: no other strategy is really better on any "
            "measure above."
        )
    elif safe:
        fastest = min(safe, key=lambda s: cost.get(s, np.inf))
        out.append(
            f"**Overall**: {', '.join(safe)} are each never really worse than another "
            f"strategy; on cost, {fastest} trains fastest."
        )
    elif worse:
        out.append(
            "**Overall**: every strategy is really worse than another on some measure: "
            "choose by the need above."
        )
    if "test_tf_gap" in chosen:
        gaps = chosen.groupby("strategy")["test_tf_gap"].mean()
        most = gaps.idxmax()
        out.append(
            "Reliance on ground truth (free-running minus teacher-forced test MAE): "
            + ", ".join(f"{s} {fmt(gaps[s])}" for s in tables.strategy_order(gaps.index))
            + f"; {most} leans on it most."
        )
    if len(cost):
        out.append(
            "Training time (selected phases summed, mean over seeds): "
            + ", ".join(f"{s} {duration(cost[s])}" for s in tables.strategy_order(cost.index))
            + "."
        )
    n_seeds = per_sample.groupby("strategy")["seed"].nunique().min() if len(per_sample) else 0
    if n_seeds < 3:
        out.append(
            f"Caution: {n_seeds} seed(s) per strategy; claims need at least 3 "
            "(`seqgen pipeline --strategy all --seeds 0,1,2`)."
        )
    return out
