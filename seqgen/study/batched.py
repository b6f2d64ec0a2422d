"""`seqgen study --batched`: every chain of a study in this process, side by side, phase after
phase, as one stacked model (seqgen/training/train.py: `train_phases`). Each chain keeps its own
runs, folders, registered models and aliases, settings and random draws; the phases of a chain
hand over exactly as in `seqgen pipeline`. Run the same command again after any interruption:
each chain goes on from its own furthest checkpoint.

Why one process: a layer-step of one small model leaves a GPU idle between tiny kernels, and on a
CPU a stack runs whole members per thread without a process per chain; the figures are in the
README (benchmarks/study_stacked.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time

from seqgen.config import PhaseSettings
from seqgen.errors import SeqgenError
from seqgen.model.bundle import Bundle
from seqgen.runs import tracking
from seqgen.runs.keeper import Landings, PhaseResult, RunOptions
from seqgen.study.board import (
    Chain,
    ChainOutcome,
    Screen,
    end_study_run,
    load_study_data,
    name_chains,
    open_study_run,
    plan_chains,
    registered_models,
    study_run_open,
    study_view,
)
from seqgen.study.chain import chain_runs, chain_runs_open, end_chain_run, phase_done
from seqgen.training.epochs import EpochRecord
from seqgen.training.train import STACK_KEYS, train_phases

log = logging.getLogger(__name__)


def batched_by_default(ray_options_given: bool) -> bool:
    """`seqgen study` without --batched: batched on a machine with a GPU unless a Ray option
    says otherwise (one model leaves a GPU idle between tiny kernels; nine ride in the same
    launches), the Ray study on CPUs: there a stack does the same GEMMs as the chains apart
    (batched was 1.15x faster at demo size and 1.02x at the full size on 2 cores: README, Running
    the study; benchmarks/study_stacked.py), and Ray lets each chain go at its own pace."""
    import torch

    return not ray_options_given and torch.cuda.is_available()


def run_batched_study(
    strategies: list[str],
    seeds: list[int],
    phases: list[int],
    preset: str,
    overrides: dict,
    options: RunOptions | None = None,
    out=sys.stderr,
    points: list[dict] | None = None,
) -> list[ChainOutcome]:
    """Every chain's phases (strategy x grid point x seed), phase by phase, each phase of the
    chains of one model shape as one stack; a live line per chain, then the final table."""
    options = options or RunOptions()
    chains = plan_chains(strategies, seeds, points or [{}], phases, preset, overrides)
    tracking.check_tracking_store()
    data = load_study_data(chains, phases, preset, overrides)
    chains = name_chains(chains, phases[0], preset, overrides, data)
    models = registered_models(chains, phases, preset, overrides)
    tracking.check_can_log(tracking.experiment_id(), models)  # before the study's run is made
    exp_id = tracking.experiment_id()
    study_run = open_study_run(exp_id, chains, phases, preset, overrides, batched=True)
    with study_run_open(study_run):
        outcomes = train_study(chains, phases, preset, overrides, options, data, study_run, out)
    end_study_run(study_run, outcomes)
    for line in tracking.browse_lines(exp_id, study_view(points)):
        log.info(line)
    return outcomes


def train_study(chains, phases, preset, overrides, options, data, study_run, out):
    """run_batched_study's chains under its study run: the board, the chains' runs, the phases,
    the outcomes."""
    # off a terminal the phases' own lines say what the board would: no echo
    screen = Screen(out, [c.name for c in chains], len(phases), echo=False)
    board: dict[str, dict] = {c.name: {"host": "this process"} for c in chains}

    def on_epoch(settings: PhaseSettings, record: EpochRecord, last_epoch: int, eta: float):
        name = f"{settings.variant_name}-s{settings.seed}"
        board[name] |= {"phase": settings.phase, "epoch": record.epoch}
        board[name] |= {"last_epoch": last_epoch, "eta": eta}
        screen.draw(board, {})

    # every chain's phases nest under its own run (kind=chain), which carries its curves
    made_by = f"`seqgen study --batched` (run {study_run})"
    runs = {}
    for chain in chains:
        first = chain.settings(phases[0], preset, overrides)
        runs |= chain_runs([first], chain.overrides(overrides), data[first.data_dir], made_by)
    options = dataclasses.replace(options, chain_runs=runs, on_epoch=on_epoch, hint_next=False)
    started, done = time.monotonic(), {c.name: [] for c in chains}
    failures: dict[str, str] = {}
    try:
        with chain_runs_open(runs):
            failures = train_chains(chains, phases, preset, overrides, options, data, done)
    except SeqgenError as e:
        failures = {c.name: f"failed: {e}" for c in chains}
    else:
        for chain in chains:
            end_chain_run(
                runs[chain.variant, chain.seed], done[chain.name], len(phases),
                failed=chain.name in failures,
            )  # fmt: skip
    outcomes = [
        outcome(c, done[c.name], len(phases), started, failures.get(c.name, "")) for c in chains
    ]
    screen.table(outcomes)
    return outcomes


def train_chains(chains, phases, preset, overrides, options, data, done) -> dict[str, str]:
    """Phase by phase: every chain's phase p, the chains of one model shape and data as one
    stack, each continuing from the exact version its own phase p-1 registered, from that model
    in memory: a round's records (model files, registration, descriptions) land in the
    background while the next round trains (keeper.Landings). done[chain] collects each
    chain's results; a chain whose training diverged ends there, the others go on: {chain: why}
    for those."""
    previous = {c.name: overrides.get("existing_model") for c in chains}
    models: dict[str, Bundle | None] = {c.name: None for c in chains}  # previous[c.name]'s model
    failed: dict[str, str] = {}
    landings = Landings()
    options = dataclasses.replace(options, landings=landings)
    try:
        for phase in phases:
            landings.check()
            members = [
                (c, c.settings(phase, preset, overrides | {"existing_model": previous[c.name]}))
                for c in chains
                if c.name not in failed
            ]
            for group in stacks(members):
                settings = [s for _, s in group]
                parents = [models[chain.name] for chain, _ in group]
                results = train_phases(settings, options, data[settings[0].data_dir], parents)
                for (chain, _), result in zip(group, results, strict=True):
                    if result.status == "failed":
                        failed[chain.name] = f"failed: {result.stop_reason}"
                        continue
                    previous[chain.name], models[chain.name] = result.model_uri, result.model
                    done[chain.name].append(result)
                # after the round's records (no step mirrored twice), in the background too
                landings.submit(functools.partial(chains_done, options.chain_runs, results))
        landings.wait()
    finally:
        landings.close()
    return failed


def chains_done(chain_runs: dict[tuple[str, int], str], results: list[PhaseResult]) -> None:
    for result in results:
        if result.status != "failed":
            phase_done(chain_runs[result.strategy, result.seed], result)


def stacks(members: list[tuple[Chain, PhaseSettings]]) -> list[list[tuple[Chain, PhaseSettings]]]:
    """The members that can train as one stack (one model shape, batches, device and data),
    grouped in the order of their first member."""
    groups: dict[tuple, list] = {}
    for chain, s in members:
        key = (*(getattr(s, k) for k in STACK_KEYS), s.device, s.data_dir)
        groups.setdefault(key, []).append((chain, s))
    return list(groups.values())


def outcome(
    chain: Chain, results: list[PhaseResult], n_phases: int, started: float, failure: str
) -> ChainOutcome:
    model = results[-1].model_uri or "" if results else ""
    status = "done" if len(results) == n_phases else failure or "failed: stopped early"
    seconds = time.monotonic() - started
    return ChainOutcome(chain.name, len(results), n_phases, model, seconds, status)
