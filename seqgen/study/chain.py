"""A chain: the phases of one strategy and seed, in order, each continuing from the exact model
version its predecessor registered (the original's five batch files of one strategy). `seqgen
pipeline` runs chains one after another under a parent run each; `seqgen study` runs them as Ray
tasks (seqgen/study/cluster.py); both through `run_chain`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from seqgen.config import N_PHASES, resolve, strategies
from seqgen.data.sequences import SequenceData
from seqgen.errors import ConfigError
from seqgen.runs import tracking
from seqgen.runs.keeper import PhaseResult, RunOptions
from seqgen.training.train import train_phase

log = logging.getLogger(__name__)


def parse_phases(text: str) -> list[int]:
    """'1-5', '3-5', '2' or '1,2,3' -> phase numbers (consecutive, within 1..5)."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-"))
            phases = list(range(first, last + 1))
        else:
            phases = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--phases must look like 1-5, 3-5 or 2, got {text!r}") from None
    if (
        not phases
        or any(not 1 <= p <= N_PHASES for p in phases)
        or phases != list(range(phases[0], phases[0] + len(phases)))
    ):
        raise ConfigError(f"--phases must be consecutive phases within 1..{N_PHASES}, got {text!r}")
    return phases


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: distinct non-negative integers."""
    try:
        seeds = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def parse_strategies(text: str) -> list[str]:
    """'all', 'mae' or 'mae,combined' -> strategy names of the phase table."""
    names = list(strategies()) if text == "all" else [x.strip() for x in text.split(",")]
    unknown = [n for n in names if n not in strategies()]
    if unknown or not names:
        raise ConfigError(
            f"unknown strategy {unknown[0] if unknown else text!r}: choose from "
            f"{', '.join(strategies())}, or all"
        )
    return names


def run_chain(
    strategy: str,
    seed: int,
    phases: list[int],
    preset: str,
    overrides: dict,
    options: RunOptions,
    data: SequenceData | None = None,
    on_phase: Callable[[int, PhaseResult | None], None] | None = None,
) -> list[PhaseResult]:
    """The phases of one chain in order; phase N continues from the exact version phase N-1
    registered (never through the alias, which another chain may move meanwhile).
    on_phase(phase, None) before a phase starts and (phase, result) after it ends."""
    previous = overrides.get("existing_model")
    results = []
    for phase in phases:
        chain = overrides | {"seed": seed, "existing_model": previous}
        settings = resolve(strategy, phase, preset, **chain)
        if on_phase is not None:
            on_phase(phase, None)
        result = train_phase(settings, dataclasses.replace(options, hint_next=False), data)
        previous = result.model_uri
        results.append(result)
        if on_phase is not None:
            on_phase(phase, result)
    return results


def run_pipeline(
    strategy: str,
    phases: list[int],
    seeds: list[int],
    preset: str,
    overrides: dict,
    options: RunOptions | None = None,
) -> list[PhaseResult]:
    """The chains of one strategy, seed after seed, each under a parent run (kind=pipeline)."""
    # every phase's settings are checked before the first run starts
    models = {resolve(strategy, phase, preset, **overrides).registered_model for phase in phases}
    tracking.check_tracking_store()
    tracking.check_can_log(tracking.experiment_id(), sorted(models))
    results = []
    for seed in seeds:
        tags = {
            "kind": "pipeline",
            "strategy": strategy,
            "seed": str(seed),
            "preset": preset,
            "phases": f"{phases[0]}-{phases[-1]}",
        }
        with tracking.tracked_run(f"{strategy}-pipeline-s{seed}", tags):

            def say(phase: int, result: PhaseResult | None, seed: int = seed) -> None:
                if result is None:
                    log.info(f"== {strategy} phase {phase}/{phases[-1]} (seed {seed}) ==")

            opts = options or RunOptions()
            results += run_chain(strategy, seed, phases, preset, overrides, opts, on_phase=say)
    return results
