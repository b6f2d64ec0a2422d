"""A chain: the phases of one strategy and seed, in order, each continuing from the exact model
version its predecessor registered (the original's five batch files of one strategy). `seqgen
pipeline` runs chains one after another; `seqgen study` runs them as Ray tasks
(seqgen/study/cluster.py); both through `run_chain`. Every chain has a run of its own (kind=chain):
the parent of its phases and evaluations, carrying the chain's curves stitched at the global
epochs, so `mlflow ui` draws one line per chain."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from seqgen.config import (
    N_PHASES,
    PhaseSettings,
    check_int,
    default_strategies,
    resolve,
    strategies,
)
from seqgen.data.sequences import SequenceData
from seqgen.errors import ConfigError
from seqgen.runs import descriptions, tracking
from seqgen.runs.keeper import HeldElsewhere, PhaseResult, RunOptions
from seqgen.runs.variants import resolve_variant
from seqgen.training.start import load_phase_data
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
    for seed in seeds:  # and within the range of a seed
        check_int("seed", seed)
    return seeds


def parse_strategies(text: str) -> list[str]:
    """'all' (the table's default_strategies), 'all-table' (every strategy of the table), 'mae'
    or 'mae,spectral' -> strategy names of the phase table."""
    if text in ("all", "all-table"):
        return list(default_strategies() if text == "all" else strategies())
    names = [x.strip() for x in text.split(",")]
    unknown = [n for n in names if n not in strategies()]
    if unknown or not names:
        raise ConfigError(
            f"unknown strategy {unknown[0] if unknown else text!r}: choose from "
            f"{', '.join(strategies())}, all ({', '.join(default_strategies())}) or all-table"
        )
    return names


# Where a chain's files go or how many workers load its batches does not make another chain.
NOT_IDENTITY = ("data_dir", "outputs_root", "num_workers", "seed")


def chain_key(settings: PhaseSettings, overrides: dict, fingerprint: str) -> str:
    """A digest of what makes a chain: its variant, seed, preset, data and the settings the
    command line changed. Its run is found again by it, whichever phases a command trains
    (`--phases 1-2`, then `3-5`) and however often it runs."""
    kept = {k: v for k, v in overrides.items() if k not in NOT_IDENTITY}
    identity = [settings.variant_name, settings.seed, settings.preset, fingerprint, kept]
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_chain_run(settings: PhaseSettings, key: str, made_by: str) -> str:
    """The chain's run (tag kind=chain), found again by its key or made: top level, in the
    strategy's colour, the parent of the chain's phases and evaluations."""
    tags = {
        "kind": "chain",
        "strategy": settings.strategy,
        "variant": settings.variant_name,
        "seed": str(settings.seed),
        "preset": settings.preset,
        tracking.RUN_COLOUR: descriptions.variant_colour(settings.variant_name, strategies()),
        tracking.NOTE: descriptions.chain_text(
            settings.variant_name, settings.seed, settings.preset, made_by
        ),
    }
    name = f"{settings.variant_name}-s{settings.seed}"
    return tracking.open_run_once(tracking.experiment_id(), name, {tracking.CHAIN_KEY: key}, tags)


def chain_runs(
    firsts: list[PhaseSettings], overrides: dict, data: SequenceData, made_by: str
) -> dict[tuple[str, int], str]:
    """The runs of these chains (each given by its first phase's settings), found again or made:
    RunOptions.chain_runs, where a phase finds the run to nest under and mirror its curves to."""
    runs = {}
    for s in firsts:
        key = chain_key(s, overrides, data.fingerprint)
        runs[s.variant_name, s.seed] = open_chain_run(s, key, made_by)
    return runs


def phase_done(chain: str, result: PhaseResult) -> None:
    """A phase registered before this chain's run saw it, or a step whose mirroring an
    interruption cut off: the chain's run gets the curves it lacks, each step once."""
    tracking.copy_curves(result.run_id, chain)


def end_chain_run(
    chain: str, results: list[PhaseResult], n_phases: int, failed: bool = False
) -> None:
    """FINISHED once every phase is registered; FAILED when its training diverged; KILLED (out
    of comparisons, to go on) if it stopped otherwise."""
    done = len(results) == n_phases and all(r.status in ("registered", "skipped") for r in results)
    tracking.set_run_status(chain, "FAILED" if failed else "FINISHED" if done else "KILLED")


@contextmanager
def chain_runs_open(runs: dict[tuple[str, int], str]) -> Iterator[None]:
    """The chains' runs end KILLED on Ctrl-C and FAILED on an error, never left RUNNING; a phase
    that a live process trains (HeldElsewhere) leaves them to that process."""
    try:
        yield
    except HeldElsewhere:
        raise
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        for run_id in runs.values():
            tracking.set_run_status(run_id, status)
        raise


def first_phase(
    strategy: str, seed: int, phase: int, preset: str, overrides: dict, data: SequenceData
) -> PhaseSettings:
    """A chain's first phase, checked against its data and named as its runs go in this store
    (seqgen/runs/variants.py: on other data than its name's runs, the data joins the name)."""
    first = resolve(strategy, phase, preset, **(overrides | {"seed": seed}))
    load_phase_data(first, data)
    return resolve_variant(first, data.fingerprint)


def chain_overrides(first: PhaseSettings, overrides: dict) -> dict:
    """What every phase of the chain that starts with `first` is resolved with: its seed and,
    when its name came from the store, that name, so every phase goes under one variant."""
    named = {"variant": first.variant} if first.variant else {}
    return overrides | {"seed": first.seed} | named


def run_chain(
    strategy: str,
    seed: int,
    phases: list[int],
    preset: str,
    overrides: dict,
    options: RunOptions,
    data: SequenceData | None = None,
    on_phase: Callable[[int, PhaseResult | None], None] | None = None,
    made_by: str = "`seqgen pipeline`",
) -> list[PhaseResult]:
    """The phases of one chain in order, under the chain's run; phase N continues from the exact
    version phase N-1 registered (never through the alias, which another chain may move
    meanwhile). on_phase(phase, None) before a phase starts and (phase, result) after it ends."""
    first = resolve(strategy, phases[0], preset, **(overrides | {"seed": seed}))
    data = load_phase_data(first, data)  # read once for the whole chain; bad data fails here
    first = resolve_variant(first, data.fingerprint)
    runs = chain_runs([first], overrides, data, made_by)
    chain = runs[first.variant_name, seed]
    options = dataclasses.replace(options, hint_next=False, chain_runs=runs)
    previous = overrides.get("existing_model")
    results = []
    with chain_runs_open(runs):
        for phase in phases:
            chain_settings = chain_overrides(first, overrides) | {"existing_model": previous}
            settings = resolve(strategy, phase, preset, **chain_settings)
            if on_phase is not None:
                on_phase(phase, None)
            result = train_phase(settings, options, data)
            phase_done(chain, result)
            previous = result.model_uri
            results.append(result)
            if on_phase is not None:
                on_phase(phase, result)
    end_chain_run(chain, results, len(phases))
    return results


def run_pipeline(
    strategy: str,
    phases: list[int],
    seeds: list[int],
    preset: str,
    overrides: dict,
    options: RunOptions | None = None,
    made_by: str = "`seqgen pipeline`",
) -> list[PhaseResult]:
    """The chains of one strategy, seed after seed, each under its chain's run (kind=chain)."""
    # every phase's settings are checked before the first run starts
    models = {resolve(strategy, phase, preset, **overrides).registered_model for phase in phases}
    variant = resolve(strategy, phases[0], preset, **overrides).variant_name
    tracking.check_tracking_store()
    tracking.check_can_log(tracking.experiment_id(), sorted(models))
    results = []
    for seed in seeds:

        def say(phase: int, result: PhaseResult | None, seed: int = seed) -> None:
            if result is None:
                log.info(f"== {variant} phase {phase}/{phases[-1]} (seed {seed}) ==")

        opts = options or RunOptions()
        results += run_chain(
            strategy, seed, phases, preset, overrides, opts, on_phase=say, made_by=made_by
        )
    return results
