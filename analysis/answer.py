"""Numbers to words: the report's answer to "which strategy, for which need?"."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import tables
from seqgen import config
from seqgen.evaluation import measures, metrics


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
    by_seed = per_sample.groupby(["variant", "seed"])[metric].mean().reset_index()
    rows = [(s, *metrics.mean_std(g[metric]), len(g)) for s, g in by_seed.groupby("variant")]
    return pd.DataFrame(rows, columns=["variant", "mean", "std", "n"]).set_index("variant")


def _words(m: measures.Measure) -> tuple[str, str, str]:
    """How a sentence says best, better and worse on measure m."""
    if m.better == measures.LOWER:
        return "lowest", "lower", "higher"
    return "highest", "higher", "lower"


def conclusions(
    per_sample: pd.DataFrame, paired: pd.DataFrame, chosen: pd.DataFrame, per_run: pd.DataFrame
) -> list[str]:
    """The answer, in sentences drawn from the numbers: best strategy per need, how sure."""
    phase_of = chosen.groupby("variant")["phase"].max().to_dict()
    if len(phase_of) < 2:  # nothing to compare against: say so, name no winner
        missing = [s for s in tables.variant_order(per_run["variant"]) if s not in phase_of]
        only = ", ".join(phase_of) or "no strategy"
        return [
            f"Only {only} has a test evaluation"
            + (f"; evaluate {', '.join(missing)} to compare" if missing else "")
            + "."
        ]
    out = []
    for key in measures.paired():
        if key in per_sample and per_sample[key].notna().any():
            m = measures.BY_KEY[key]
            out.append(_best_on(m, seed_means(per_sample, key), paired, phase_of))
    cost = per_run.groupby(["variant", "seed"])["phase_seconds"].sum().groupby("variant").mean()
    out += _overall(_really_worse(paired, list(phase_of)), paired, cost)
    if "test_tf_gap" in chosen:
        gaps = chosen.groupby("variant")["test_tf_gap"].mean()
        out.append(
            "Reliance on ground truth (free-running minus teacher-forced test MAE): "
            + ", ".join(f"{s} {fmt(gaps[s])}" for s in tables.variant_order(gaps.index))
            + f"; {gaps.idxmax()} leans on it most."
        )
    if len(cost):
        out.append(
            "Training time (selected phases summed, mean over seeds): "
            + ", ".join(f"{s} {duration(cost[s])}" for s in tables.variant_order(cost.index))
            + "."
        )
    n_seeds = per_sample.groupby("variant")["seed"].nunique().min() if len(per_sample) else 0
    if n_seeds < 3:
        out.append(
            f"Caution: {n_seeds} seed(s) per strategy; claims need at least 3 "
            "(`seqgen pipeline --strategy all --seeds 0,1,2`)."
        )
    return out


def _best_on(m: measures.Measure, stats: pd.DataFrame, paired: pd.DataFrame, phase_of) -> str:
    """'**need**: **best** is lowest (mean ± std over n seed(s), phase p); <how it compares
    with each other strategy on the same samples>.'"""
    best_word, _, _ = _words(m)
    best = m.best(stats["mean"])
    b = stats.loc[best]
    text = (
        f"**{m.need}**: **{best}** is {best_word} ({pm(b['mean'], b['std'], b['n'])} over "
        f"{int(b['n'])} seed(s), phase {int(phase_of[best])})"
    )
    rows = paired[(paired["metric"] == m.key) & ((paired["a"] == best) | (paired["b"] == best))]
    parts = [_against_best(m, r, best) for _, r in rows.iterrows()]
    return text + ("; " + "; ".join(parts) if parts else "") + "."


def _against_best(m: measures.Measure, r: pd.Series, best: str) -> str:
    """How the best strategy on m compares with the other one of paired row r."""
    _, better, worse = _words(m)
    other = r["b"] if r["a"] == best else r["a"]
    sign = 1 if r["a"] == best else -1  # difference best - other
    d, lo, hi = sign * r["mean_diff"], *sorted((sign * r["ci_low"], sign * r["ci_high"]))
    toward = -1 if m.better == measures.LOWER else 1  # the sign of a difference that is better
    if r["real"] and m.improves(d):
        by, (ci_lo, ci_hi) = toward * d, sorted((toward * lo, toward * hi))
        return (
            f"{better} than {other}'s by {fmt(by)} [95% CI {fmt(ci_lo)}, {fmt(ci_hi)}],"
            " a real difference"
        )
    if r["real"]:  # the best mean over seeds, yet worse on the paired samples
        by, (ci_lo, ci_hi) = -toward * d, sorted((-toward * lo, -toward * hi))
        return (
            f"but {worse} than {other}'s on the same samples by {fmt(by)} "
            f"[95% CI {fmt(ci_lo)}, {fmt(ci_hi)}]"
        )
    why = ("" if r["seeds_agree"] or r["n_seeds"] < 2 else ", seeds disagree") + (
        f", only {r['n']} pairs" if r["n"] < tables.MIN_PAIRS else ""
    )
    return f"not distinguishable from {other} (difference {fmt(d)} [{fmt(lo)}, {fmt(hi)}]{why})"


def _really_worse(paired: pd.DataFrame, names: list[str]) -> dict[str, list[str]]:
    """Per strategy, the measures on which another strategy is really better than it."""
    worse: dict[str, list[str]] = {s: [] for s in names}
    for r in paired[paired["real"]].itertuples() if len(paired) else []:
        better_a = measures.BY_KEY[r.metric].improves(r.mean_diff)
        worse[r.b if better_a else r.a].append(r.metric)
    return worse


def _overall(worse: dict[str, list[str]], paired: pd.DataFrame, cost: pd.Series) -> list[str]:
    """Which strategy to use overall, if the paired differences name one; else how to choose."""
    safe = [s for s in tables.variant_order(worse) if not worse[s]]
    if len(paired) and not paired["real"].any():
        fastest = min(worse, key=lambda s: cost.get(s, np.inf))
        return [
            "**Overall**: no difference between strategies is real at this number of seeds and "
            f"samples; on cost, {fastest} trains fastest."
        ]
    if len(safe) == 1:
        return [
            f"**Overall**: use **{safe[0]}**: no other strategy is really better on any "
            "measure above."
        ]
    if safe:
        fastest = min(safe, key=lambda s: cost.get(s, np.inf))
        return [
            f"**Overall**: {', '.join(safe)} are each never really worse than another "
            f"strategy; on cost, {fastest} trains fastest."
        ]
    if worse:
        return [
            "**Overall**: every strategy is really worse than another on some measure: "
            "choose by the need above."
        ]
    return []


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
        f"{measures.BY_KEY[r.metric].name} {fmt(r.variant_mean)} against {r.baseline}'s "
        f"{fmt(r.baseline_mean)} ({_relative(r.rel_diff)}; difference {fmt(r.mean_diff)}, "
        f"95% CI [{fmt(r.ci_low)}, {fmt(r.ci_high)}]{why})"
    )


def _beats(r) -> bool:
    """Row r of versus_baselines: the strategy is really better than the best baseline."""
    return bool(r.real) and measures.BY_KEY[r.metric].improves(r.mean_diff)


def baseline_verdicts(vs: pd.DataFrame, beside: pd.DataFrame) -> list[str]:
    """Is the surrogate worth training? A headline, then one sentence per strategy saying on which
    measures it beats the best baseline (a real paired difference), on which it is beaten, and
    by how much; vs from tables.versus_baselines, beside from tables.beside_baselines."""
    if vs.empty:
        return []
    phase = beside[beside["kind"] == "variant"].set_index("name")["phase"].to_dict()
    wins_of, lines = {}, []
    for strategy in tables.variant_order(vs["variant"].unique()):
        rows = list(vs[vs["variant"] == strategy].itertuples())
        wins_of[strategy] = (sum(_beats(r) for r in rows), len(rows))
        lines.append(_strategy_verdict(strategy, phase.get(strategy), rows))
    # Beside the table's own strategies, variants ask which one to keep: name the best per measure.
    tried = set(vs["variant"]) - set(config.strategies())
    best = _best_variants(vs) if tried and vs["variant"].nunique() > 1 else []
    return [_headline(wins_of, vs) + _time_taken(beside), *best, *lines]


def _best_variants(vs: pd.DataFrame) -> list[str]:
    """'**Best variant per measure**: MAE mae+hidden_size=24 (0.11 against knn's 0.12, better);
    ...': the variant of the lowest (highest) mean on each measure, against the best baseline."""
    parts = []
    for metric, rows in vs.groupby("metric", sort=False):
        measure = measures.BY_KEY[metric]
        r = rows.loc[measure.best(rows["variant_mean"])]
        if r.real:
            how = "better" if measure.improves(r.mean_diff) else "worse"
        else:
            how = "no real difference"
        parts.append(
            f"{measure.name} **{r.variant}** ({fmt(r.variant_mean)} against {r.baseline}'s "
            f"{fmt(r.baseline_mean)}: {how})"
        )
    return ["**Best variant per measure**: " + "; ".join(parts) + "."]


def _strategy_verdict(strategy: str, phase, rows: list) -> str:
    """'**mae** (phase 5) beats the best baseline on 2 of 5 measures: <wins>; it is worse on
    <losses>; no real difference on <the rest>.'"""
    wins = [r for r in rows if _beats(r)]
    losses = [r for r in rows if r.real and not _beats(r)]
    unclear = [r for r in rows if not r.real]
    who = f"**{strategy}**" + (f" (phase {int(phase)})" if phase is not None else "")
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
    return text + (": " if not wins and parts else "") + "; ".join(parts) + "."


def _headline(wins_of: dict[str, tuple[int, int]], vs: pd.DataFrame) -> str:
    """Worth training? Yes, in part, no, or not by a real difference."""
    everywhere = [s for s, (w, n) in wins_of.items() if w == n]
    somewhere = [s for s, (w, _) in wins_of.items() if w]
    if everywhere:
        rest = [s for s in wins_of if s not in everywhere]
        return (
            f"**Worth training?** Yes: {', '.join(everywhere)} beat"
            f"{'s' if len(everywhere) == 1 else ''} the best baseline on every measure"
            + (f"; {', '.join(rest)} {'does' if len(rest) == 1 else 'do'} not" if rest else "")
            + "."
        )
    if somewhere:
        return (
            "**Worth training?** In part: no strategy beats the best baseline on every measure; "
            "on some: "
            + ", ".join(f"{s} ({w} of {n} measures)" for s, (w, n) in wins_of.items() if w)
            + "."
        )
    # a measure on which every pair is equal (no energy rise either side) says nothing either way
    differ = [r for r in vs.itertuples() if not (r.ci_low == 0 and r.ci_high == 0)]
    if differ and all(r.real and not _beats(r) for r in differ):
        where = "" if len(differ) == len(vs) else " on which they differ"
        return (
            "**Worth training?** No: every strategy is worse than the best baseline on every "
            f"measure{where}."
        )
    return (
        "**Worth training?** Not as trained here: no strategy beats the best baseline on any "
        "measure by a real difference."
    )


def _time_taken(beside: pd.DataFrame) -> str:
    """' Time (mean over seeds): training mae 10 min; fitting the baselines knn 0.2 s.'"""
    took = {}
    for kind in ("variant", "baseline"):
        rows = beside[(beside["kind"] == kind) & np.isfinite(beside["seconds_mean"])]
        took[kind] = ", ".join(
            f"{n} {duration(t)}" for n, t in zip(rows["name"], rows["seconds_mean"], strict=True)
        )
    if not (took["variant"] or took["baseline"]):
        return ""
    return (
        " Time (mean over seeds): "
        + "; ".join(
            f"{what} {took[kind]}"
            for kind, what in (("variant", "training"), ("baseline", "fitting the baselines"))
            if took[kind]
        )
        + "."
    )
