"""`seqgen ensemble`: the registered models of several seeds of one phase as one pyfunc model
(`<registered model>-ensemble`, alias phase-N) that answers per step the mean and standard
deviation over members, and its evaluation: every measure on the mean, and the calibration of the
spread (how often the truth lies within mean ± k std; the correlation of spread with error).

The members are pinned by exact version (lineage: the version's `members` tag and the run's
params). They are scored on the test samples that none of them trained on: with the edge split
that is the whole band, the same for every seed; with the random split, the samples in every
seed's test part."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from seqgen.config import ConfigError, resolve
from seqgen.evaluation import metrics
from seqgen.evaluation.evaluate import EvalSet, log_evaluation, model_eval_set
from seqgen.model.bundle import Bundle
from seqgen.model.ensemble import check_members, ensemble_original
from seqgen.runs import tracking

logger = logging.getLogger(__name__)
SUFFIX = "-ensemble"


def member_uris(strategy: str, phase: int, seeds: list[int], preset: str, **overrides) -> dict:
    """{seed: exact models:/ URI} of each seed's registered model of the phase."""
    name = resolve(strategy, phase, preset, **overrides).registered_model
    out = {}
    for seed in seeds:
        uri = f"models:/{name}@phase-{phase}-s{seed}"
        exact = tracking.exact_model_uri(uri)
        if exact == uri:
            raise ConfigError(f"no registered model {uri}: train seed {seed} of phase {phase}")
        out[seed] = exact
    return out


def shared_test(es: EvalSet, bundles: list[Bundle]) -> EvalSet:
    """The EvalSet of the test samples that every member holds out (none trained on them)."""
    shared = set(bundles[0].split.test)
    for b in bundles[1:]:
        shared &= set(b.split.test)
    test = tuple(f for f in bundles[0].split.test if f in shared)
    if len(test) < 2:
        raise ConfigError(
            f"the members' test splits share {len(test)} sample(s), at least 2 are needed: "
            "train them with --split edge, whose test samples are the same for every seed"
        )
    return dataclasses.replace(es, split=dataclasses.replace(es.split, test=test), part="test")


def calibration(mean: np.ndarray, std: np.ndarray, true: np.ndarray) -> tuple[dict, dict]:
    """(summary, per-sample columns) of the spread against the error of the mean, (N, T, K)."""
    per_sample = {f"coverage_{k}sd": metrics.coverage(mean, std, true, k) for k in (1, 2)}
    per_sample["spread"] = std.mean(axis=(1, 2))
    summary = {k: float(v.mean()) for k, v in per_sample.items()}
    summary["spread_error_corr"] = metrics.spread_error_correlation(mean, std, true)
    return summary, per_sample


def make_ensemble(
    strategy: str,
    phase: int,
    seeds: list[int],
    preset: str = "full",
    evaluate: bool = True,
    **overrides,
) -> dict:
    """Register the seeds' models of a phase as one ensemble model and (evaluate) score it."""
    tracking.check_tracking_store()
    settings = resolve(strategy, phase, preset, **overrides)
    uris = member_uris(strategy, phase, seeds, preset, **overrides)
    bundles = {u: tracking.load_bundle(u) for u in uris.values()}
    check_members(bundles)
    members = list(bundles.values())
    es = shared_test(model_eval_set(members[0], None, "test", metrics.ACF_MAX_LAG), members)
    first = tracking.model_source(uris[seeds[0]], members[0].run_id)
    experiment = first.get("experiment_id")
    name = settings.registered_model + SUFFIX
    alias = f"phase-{phase}"
    tracking.check_can_log(tracking.target_experiment(experiment), [name])
    lineage = json.dumps(list(uris.values()))
    tags = {
        "kind": "ensemble",
        "strategy": strategy,
        "phase": phase,
        "preset": preset,
        "seeds": ",".join(map(str, seeds)),
        "members": lineage,
        tracking.NOTE: f"Seed ensemble of {', '.join(uris.values())}: per step the mean and "
        "standard deviation over members.",
    }
    with tracking.tracked_run(f"ensemble-{settings.variant}-p{phase}", tags, experiment) as run:
        with tempfile.TemporaryDirectory(prefix="seqgen-ensemble-") as tmp:
            paths = []
            for i, b in enumerate(members):
                paths.append(Path(tmp) / f"member_{i}.pth")
                b.save(paths[-1])
            version = tracking.register_ensemble(
                run.info.run_id, paths, name, alias, {"members": lineage, "seeds": tags["seeds"]}
            )
    uri = f"models:/{name}/{version}"
    logger.info(f"registered {uri} (alias {alias}): members {', '.join(uris.values())}")
    out = {"model_uri": uri, "members": list(uris.values()), "run_id": run.info.run_id}
    if evaluate:
        out["evaluation"] = evaluate_ensemble(uri, members, es, experiment, run.info.run_id)
    return out


def evaluate_ensemble(
    uri: str, members: list[Bundle], es: EvalSet, experiment: str | None, parent: str
) -> dict:
    """Every measure on the members' mean and the spread's calibration, logged as an evaluation
    run (tag ensemble) under the ensemble's run and on its LoggedModel."""
    models = [b.build_model() for b in members]
    mean, std, _ = ensemble_original(models, members, es.params)
    found = es.measure(mean)
    summary, per_sample = calibration(mean, std, es.true)
    found.summary |= summary
    for k, v in per_sample.items():
        found.per_sample[k] = v
    tags = {
        "model_uri": uri,
        "evaluated_model_uri": uri,
        "ensemble": uri,
        "strategy": members[0].strategy,
        "phase": members[0].phase,
        "preset": members[0].preset,
        tracking.NOTE: f"`seqgen ensemble`'s evaluation of `{uri}`: {len(es.idx)} test sequences "
        "none of its members trained on; every measure on the members' mean, and the spread's "
        "calibration (coverage of mean ± 1 and 2 std, spread-error correlation).",
    }
    arrays = {"pred": mean, "std": std, "true": es.true, "files": np.array(es.files)}
    return log_evaluation(
        f"eval-ensemble-{members[0].strategy}-p{members[0].phase}",
        tags,
        {"members": len(members)},
        es,
        found,
        arrays,
        experiment,
        parent,
        model_id=tracking.logged_model_id(uri),
    )
