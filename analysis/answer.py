"""Numbers to words: the report's answer to "which strategy, for which need?"."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import tables
from seqgen.evaluation import metrics


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


# ---- against the baselines ---------------------------------------------------------------------


def _relative(rel: float) -> str:
    """-0.73 -> '73% lower', 0.2 -> '20% higher', 4.1 -> '5.1 times as high'."""
    if not np.isfinite(rel):
        return "n/a"
    if rel >= 1:
        return f"{1 + rel:.2g} times as high"
    return f"{100 * abs(rel):.2g}% {'lower' if rel < 0 else 'higher'}"


def _against(r) -> str:
    """'MAE 0.012 against knn's 0.045 (73% lower; difference -0.033, 95% CI [-0.036, -0.031])'."""
    why = ""
    if not r.real:
        why = ("" if r.seeds_agree or r.n_seeds < 2 else ", seeds disagree") + (
            f", only {r.n} pairs" if r.n < tables.MIN_PAIRS else ""
        )
    return (
        f"{tables.BASELINE_METRICS[r.metric]} {fmt(r.strategy_mean)} against {r.baseline}'s "
        f"{fmt(r.baseline_mean)} ({_relative(r.rel_diff)}; difference {fmt(r.mean_diff)}, "
        f"95% CI [{fmt(r.ci_low)}, {fmt(r.ci_high)}]{why})"
    )


def baseline_verdicts(vs: pd.DataFrame, beside: pd.DataFrame) -> list[str]:
    """Is the surrogate worth training? A headline, then one sentence per strategy saying on which
    measures it beats the best baseline (a real paired difference), on which it is beaten, and
    by how much; vs from tables.versus_baselines, beside from tables.beside_baselines."""
    if vs.empty:
        return []
    phase = beside[beside["kind"] == "strategy"].set_index("name")["phase"].to_dict()
    wins_of, lines = {}, []
    for strategy in tables.strategy_order(vs["strategy"].unique()):
        rows = list(vs[vs["strategy"] == strategy].itertuples())
        wins = [r for r in rows if r.real and r.mean_diff < 0]
        losses = [r for r in rows if r.real and r.mean_diff > 0]
        unclear = [r for r in rows if not r.real]
        wins_of[strategy] = (len(wins), len(rows))
        who = f"**{strategy}**" + (f" (phase {int(phase[strategy])})" if strategy in phase else "")
        if len(wins) == len(rows):
            text = f"{who} beats the best baseline on every measure: "
        elif wins:
            text = f"{who} beats the best baseline on {len(wins)} of {len(rows)} measures: "
        else:
            text = f"{who} beats the best baseline on no measure"
        parts = ["; ".join(_against(r) for r in wins)] if wins else []
        if losses:
            parts.append("it is worse on " + "; ".join(_against(r) for r in losses))
        if unclear:
            parts.append("no real difference on " + "; ".join(_against(r) for r in unclear))
        lines.append(
            text + (": " if not wins and parts else "") + "; ".join(p for p in parts) + "."
        )
    everywhere = [s for s, (w, n) in wins_of.items() if w == n]
    somewhere = [s for s, (w, _) in wins_of.items() if w]
    if everywhere:
        rest = [s for s in wins_of if s not in everywhere]
        head = (
            f"**Worth training?** Yes: {', '.join(everywhere)} beat"
            f"{'s' if len(everywhere) == 1 else ''} the best baseline on every measure"
            + (f"; {', '.join(rest)} {'does' if len(rest) == 1 else 'do'} not" if rest else "")
            + "."
        )
    elif somewhere:
        head = (
            "**Worth training?** In part: no strategy beats the best baseline on every measure; "
            "on some: "
            + ", ".join(f"{s} ({w} of {n} measures)" for s, (w, n) in wins_of.items() if w)
            + "."
        )
    elif all(r.real and r.mean_diff > 0 for r in vs.itertuples()):
        head = (
            "**Worth training?** No: every strategy is worse than the best baseline on every "
            "measure."
        )
    else:
        head = (
            "**Worth training?** Not as trained here: no strategy beats the best baseline on any "
            "measure by a real difference."
        )
    took = {}
    for kind in ("strategy", "baseline"):
        rows = beside[(beside["kind"] == kind) & np.isfinite(beside["seconds_mean"])]
        took[kind] = ", ".join(
            f"{n} {duration(t)}" for n, t in zip(rows["name"], rows["seconds_mean"], strict=True)
        )
    if took["strategy"] or took["baseline"]:
        head += (
            " Time (mean over seeds): "
            + "; ".join(
                f"{what} {took[kind]}"
                for kind, what in (("strategy", "training"), ("baseline", "fitting the baselines"))
                if took[kind]
            )
            + "."
        )
    return [head, *lines]
