"""Pure DataFrame work between the query and the plots: stitched curves, the summary table, the
paired comparison. No MLflow, no drawing."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd

from seqgen import config
from seqgen.evaluation import measures, metrics
from seqgen.evaluation.baselines import BASELINES

# Below this many (seed, sample) pairs a percentile bootstrap CI is too narrow to trust.
MIN_PAIRS = 10


def variant_order(names) -> list[str]:
    """The phase table's strategies in its order, each followed by its derived variants
    (`mae+hidden_size=24`), then any others (named with --variant) sorted."""
    names, out = set(names), []
    table = config.strategies()
    for base in table:
        variants = sorted(n for n in names if n.startswith(f"{base}+") and n not in table)
        out += [n for n in [base, *variants] if n in names and n not in out]
    return out + sorted(names - set(out))


def stitch(histories: pd.DataFrame, phases: pd.DataFrame) -> pd.DataFrame:
    """Long histories (run_id, key, step, value) -> (variant, seed, phase, key, step, value),
    phases of one variant and seed joined along the global epoch."""
    cols = ["run_id", "variant", "seed", "phase"]
    out = histories.merge(phases[cols], on="run_id").drop(columns="run_id")
    return out.sort_values(["variant", "seed", "key", "step"]).reset_index(drop=True)


def phase_boundaries(phases: pd.DataFrame) -> list[float]:
    """Global epochs where a later phase starts (drawn between epochs: first_epoch - 0.5)."""
    firsts = pd.to_numeric(phases.loc[phases["phase"] > 1, "first_epoch"], errors="coerce")
    return sorted({float(f) - 0.5 for f in firsts.dropna()})


def band(curves: pd.DataFrame) -> pd.DataFrame:
    """(strategy, seed, step, value) -> per strategy and step: mean, lo, hi (min, max over seeds)
    and n (seeds)."""
    g = curves.groupby(["variant", "step"])["value"]
    return g.agg(mean="mean", lo="min", hi="max", n="count").reset_index()


def _at_best(curves: pd.DataFrame, phases: pd.DataFrame, key: str) -> pd.Series:
    """The value of `key` at each phase run's best epoch (NaN where it was not logged)."""
    sub = curves[curves["key"] == key][["variant", "seed", "phase", "step", "value"]]
    best = phases[["variant", "seed", "phase", "best_epoch"]].rename(columns={"best_epoch": "step"})
    merged = best.reset_index().merge(sub, on=["variant", "seed", "phase", "step"], how="left")
    return merged.set_index("index")["value"].reindex(phases.index)


def per_run_table(
    phases: pd.DataFrame, evaluations: pd.DataFrame, curves: pd.DataFrame
) -> pd.DataFrame:
    """One row per phase run: training numbers (each loss term the runs logged, at the best
    epoch) and, where evaluated, the test metrics."""
    columns = measures.run_columns(measures.terms_in(curves["key"].unique()))
    logged = [c.key for c in columns if not c.at_best]
    rows = phases[["run_id", "variant", "phase", "seed", *logged]].copy()
    for c in columns:
        if c.at_best:
            rows[c.key] = _at_best(curves, phases, c.at_best)
    present = [m for m in measures.logged() if m in evaluations]
    ev = evaluations[["evaluated_run_id", *present]].rename(columns={"evaluated_run_id": "run_id"})
    return rows.merge(ev, on="run_id", how="left")


def summary_table(per_run: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per strategy and phase: columns {metric}_mean, {metric}_std."""
    run_cols = [c.key for c in measures.run_columns_in(per_run.columns)]
    cols = [m for m in (*run_cols, *measures.logged()) if m in per_run]
    headline = f"test_{measures.HEADLINE}"
    rows = []
    for (strategy, phase), g in per_run.groupby(["variant", "phase"]):
        row = {
            "variant": strategy,
            "phase": int(phase),
            "n_seeds": len(g),
            "n_evaluated": int(g[headline].notna().sum()) if headline in g else 0,
        }
        for m in cols:
            values = g[m].dropna()
            mean, std = metrics.mean_std(values) if len(values) else (np.nan, np.nan)
            row[f"{m}_mean"], row[f"{m}_std"] = mean, std
        rows.append(row)
    out = pd.DataFrame(rows)
    order = {s: i for i, s in enumerate(variant_order(out["variant"]))}
    return out.sort_values(
        ["variant", "phase"], key=lambda c: c.map(order) if c.name == "variant" else c
    ).reset_index(drop=True)


def latest_evaluated(evaluations: pd.DataFrame) -> pd.DataFrame:
    """Per strategy, the evaluation runs of the latest phase that has any."""
    if evaluations.empty:
        return evaluations
    latest = evaluations.groupby("variant")["phase"].transform("max")
    return evaluations[evaluations["phase"] == latest].sort_values(["variant", "seed"])


def common_seeds(chosen: pd.DataFrame) -> list[int]:
    """Seeds at which every strategy in `chosen` was evaluated: only these pair sample by sample."""
    per_seed = chosen.groupby("seed")["variant"].nunique()
    return sorted(int(s) for s in per_seed[per_seed == chosen["variant"].nunique()].index)


def _pair(pa: pd.DataFrame, pb: pd.DataFrame, metric: str, n_boot: int) -> dict | None:
    """a minus b on the same (seed, file): pa, pb (seed, file, metric) -> the paired bootstrap,
    per-seed mean differences and whether the difference is real; None when nothing pairs."""
    pair = pa.merge(pb, on=["seed", "file"], suffixes=("_a", "_b"))
    ok = np.isfinite(pair[f"{metric}_a"]) & np.isfinite(pair[f"{metric}_b"])
    pair = pair[ok]
    if pair.empty:
        return None
    a, b = pair[f"{metric}_a"].to_numpy(), pair[f"{metric}_b"].to_numpy()
    boot = metrics.paired_bootstrap(a, b, n_boot=n_boot)
    by_seed = (pair[f"{metric}_a"] - pair[f"{metric}_b"]).groupby(pair["seed"]).mean()
    agree = bool((by_seed > 0).all() or (by_seed < 0).all())
    excludes_zero = boot["ci_low"] > 0 or boot["ci_high"] < 0
    return {
        **boot,
        "n_seeds": len(by_seed),
        "seed_diffs": " ".join(f"{v:+.4g}" for v in by_seed),
        "seeds_agree": agree,
        "real": bool(excludes_zero and agree and len(pair) >= MIN_PAIRS),
        "dropped_nonfinite": int((~ok).sum()),
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
    }


PAIR_COLUMNS = [
    "mean_diff",
    "ci_low",
    "ci_high",
    "n",
    "p_a_better",
    "n_seeds",
    "seed_diffs",
    "seeds_agree",
    "real",
    "dropped_nonfinite",
]


def paired_comparison(per_sample: pd.DataFrame, n_boot: int = 2000) -> pd.DataFrame:
    """Strategy a minus strategy b on the same (seed, test file), per metric, with a paired
    bootstrap CI over those pairs and the per-seed mean differences.

    The CI covers test-sample variability for the seeds trained. A difference is called real only
    when the CI excludes 0, there are at least MIN_PAIRS pairs and, with several seeds, every
    seed's mean difference has the same sign (training noise between seeds is not in the CI, so
    this last test stands in for it).
    """
    rows = []
    names = variant_order(per_sample["variant"].unique())
    for metric in [m for m in measures.paired() if m in per_sample]:
        for a, b in combinations(names, 2):
            pa = per_sample.loc[per_sample["variant"] == a, ["seed", "file", metric]]
            pb = per_sample.loc[per_sample["variant"] == b, ["seed", "file", metric]]
            found = _pair(pa, pb, metric, n_boot)
            if found is not None:
                rows.append({"metric": metric, "a": a, "b": b, **found})
    return pd.DataFrame(rows, columns=["metric", "a", "b", *PAIR_COLUMNS])


# ---- against the baselines ---------------------------------------------------------------------


def baseline_order(names) -> list[str]:
    """The known baselines in their registry's order, then any others sorted."""
    names = set(names)
    return [b for b in BASELINES if b in names] + sorted(names - set(BASELINES))


def baselines_at_seeds(chosen: pd.DataFrame, baselines: pd.DataFrame) -> pd.DataFrame:
    """Baseline evaluations on the split of each chosen evaluation, given that evaluation's seed
    (so they pair by (seed, file)): one row per (baseline, seed)."""
    if baselines.empty or chosen.empty:
        return baselines.iloc[0:0].assign(seed=pd.Series(dtype=float))
    keys = chosen[["seed", "split_fingerprint", "max_lag"]].drop_duplicates()
    out = baselines.drop(columns="seed").merge(keys, on=["split_fingerprint", "max_lag"])
    order = {b: i for i, b in enumerate(baseline_order(out["baseline"]))}
    out = out.drop_duplicates(["baseline", "seed"])
    return out.sort_values(
        ["baseline", "seed"], key=lambda c: c.map(order) if c.name == "baseline" else c
    ).reset_index(drop=True)


def _means_over_seeds(per_sample: pd.DataFrame, who: str, metric: str) -> pd.Series:
    """Mean over seeds of each per-seed mean of `metric`, indexed by the `who` column."""
    return per_sample.groupby([who, "seed"])[metric].mean().groupby(level=0).mean()


def best_baselines(baseline_per_sample: pd.DataFrame) -> dict[str, str]:
    """Per measure paired against the baselines, the baseline with the best mean (over seeds of
    per-seed means)."""
    out = {}
    for m in measures.select(versus=True):
        if m.key in baseline_per_sample and baseline_per_sample[m.key].notna().any():
            out[m.key] = str(m.best(_means_over_seeds(baseline_per_sample, "baseline", m.key)))
    return out


def versus_baselines(
    per_sample: pd.DataFrame, baseline_per_sample: pd.DataFrame, n_boot: int = 2000
) -> pd.DataFrame:
    """Each strategy minus the best baseline of each metric on the same (seed, test file): paired
    bootstrap as in paired_comparison, both means over the pairs and the relative difference."""
    rows = []
    best = best_baselines(baseline_per_sample)
    for strategy in variant_order(per_sample["variant"].unique()):
        for metric, baseline in best.items():
            if metric not in per_sample:
                continue
            pa = per_sample.loc[per_sample["variant"] == strategy, ["seed", "file", metric]]
            pb = baseline_per_sample.loc[
                baseline_per_sample["baseline"] == baseline, ["seed", "file", metric]
            ]
            found = _pair(pa, pb, metric, n_boot)
            if found is None:
                continue
            rel = found["mean_diff"] / found["mean_b"] if found["mean_b"] else np.nan
            rows.append(
                {
                    "variant": strategy,
                    "metric": metric,
                    "baseline": baseline,
                    "variant_mean": found.pop("mean_a"),
                    "baseline_mean": found.pop("mean_b"),
                    "rel_diff": rel,
                    **found,
                }
            )
    columns = ["variant", "metric", "baseline", "variant_mean", "baseline_mean", "rel_diff"]
    return pd.DataFrame(rows, columns=columns + PAIR_COLUMNS)


def beside_baselines(
    chosen: pd.DataFrame, baselines: pd.DataFrame, per_run: pd.DataFrame
) -> pd.DataFrame:
    """Strategies (their chosen phase) and baselines side by side: per row the mean and std over
    seeds of every test metric (columns {metric}_mean, {metric}_std), `n` seeds, and `seconds`:
    training (the selected phases summed) or fitting."""
    comp = measures.component_columns([*chosen.columns, *baselines.columns])
    cols = [*measures.logged(beside=True), *comp]
    train = per_run.groupby(["variant", "seed"])["phase_seconds"].sum()
    rows = []
    for strategy in variant_order(chosen["variant"].unique()):
        g = chosen[chosen["variant"] == strategy]
        seconds = [train.get((strategy, s), np.nan) for s in g["seed"]]
        rows.append(_beside_row(strategy, "variant", int(g["phase"].max()), g, cols, seconds))
    for baseline in baseline_order(baselines["baseline"].unique()) if len(baselines) else []:
        g = baselines[baselines["baseline"] == baseline]
        rows.append(_beside_row(baseline, "baseline", None, g, cols, list(g["fit_seconds"])))
    return pd.DataFrame(rows)


def _beside_row(name, kind, phase, g: pd.DataFrame, cols, seconds: list) -> dict:
    row = {"name": name, "kind": kind, "phase": phase, "n": len(g)}
    for m, values in [(m, g[m] if m in g else pd.Series(dtype=float)) for m in cols] + [
        ("seconds", pd.Series(seconds, dtype=float))
    ]:
        values = values.dropna()
        row[f"{m}_mean"], row[f"{m}_std"] = (
            metrics.mean_std(values) if len(values) else (np.nan, np.nan)
        )
    return row


def inside_outside(inside: pd.DataFrame, outside: pd.DataFrame) -> pd.DataFrame:
    """Every measure of every strategy and baseline inside the training range and outside it:
    two beside_baselines tables -> one row per (name, kind, measure) with the mean, std and seeds
    of each and `ratio` (outside mean / inside mean)."""
    cols = measures.logged(beside=True)
    keys = ["name", "kind"]
    both = inside.merge(outside, on=keys, how="outer", suffixes=("_in", "_out"))
    order = [*variant_order(both.loc[both["kind"] == "variant", "name"])]
    order += baseline_order(both.loc[both["kind"] == "baseline", "name"])
    rows = []
    for name in order:
        r = both[both["name"] == name].iloc[0]
        for m in cols:
            if f"{m}_mean_in" not in r and f"{m}_mean_out" not in r:
                continue
            a, b = r.get(f"{m}_mean_in", np.nan), r.get(f"{m}_mean_out", np.nan)
            rows.append(
                {
                    "name": name,
                    "kind": r["kind"],
                    "phase_in": r["phase_in"],
                    "phase_out": r["phase_out"],
                    "metric": m,
                    "inside_mean": a,
                    "inside_std": r.get(f"{m}_std_in", np.nan),
                    "inside_n": r["n_in"],
                    "outside_mean": b,
                    "outside_std": r.get(f"{m}_std_out", np.nan),
                    "outside_n": r["n_out"],
                    "ratio": b / a if a else np.nan,
                }
            )
    columns = ["name", "kind", "phase_in", "phase_out", "metric", "inside_mean", "inside_std"]
    columns += ["inside_n", "outside_mean", "outside_std", "outside_n", "ratio"]
    return pd.DataFrame(rows, columns=columns)
