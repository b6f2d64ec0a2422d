"""`seqgen study`: strategies x seeds on Ray, one task per chain (strategy, seed), the phases of a
chain in order, every task logging to the one tracking server.

Ray runs the tasks and retries one whose process or node died (bounded); everything else is the
phase's own restart logic (seqgen/training/train.py):
a task that starts again finds its phases in the
tracking store, skips the registered ones and takes the interrupted one up from its checkpoint.
So rerunning the same command after any interruption continues where the study stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from seqgen.config import PhaseSettings
from seqgen.data.sequences import SequenceData
from seqgen.errors import ConfigError, SeqgenError
from seqgen.log import setup as log_setup
from seqgen.runs import tracking
from seqgen.runs.delivery import lease_seconds
from seqgen.runs.keeper import PhaseResult, RunOptions
from seqgen.study.board import (
    Chain,
    ChainOutcome,
    Screen,
    end_study_run,
    load_study_data,
    name_chains,
    open_study_run,
    plan_chains,
    reason,
    registered_models,
    study_run_open,
    study_view,
)
from seqgen.study.chain import run_chain
from seqgen.training.epochs import EpochRecord
from seqgen.version import code_digest

log = logging.getLogger(__name__)

CHAIN_RETRIES = 2  # Ray reruns a chain whose process or node died this many times
THREADS_PER_CHAIN = 1  # chains side by side beat threads here (README: Running the study)
MAX_PENDING = 1800.0  # seconds chains may wait for a node while none of the study's runs
REFRESH_SECONDS = 1.0


# ---- checks before anything starts --------------------------------------------------------------


def check_tracking_for_cluster(ray_address: str | None) -> str:
    """With a cluster, every node must log to one server: a local store is refused."""
    uri = tracking.check_tracking_store()
    if ray_address and not uri.startswith(("http://", "https://")):
        raise ConfigError(
            f"--ray-address needs one tracking server for every node, but MLFLOW_TRACKING_URI is "
            f"the local store {uri}: start `mlflow server` and set "
            "MLFLOW_TRACKING_URI=http://HOST:PORT"
        )
    return uri


def absolute_store(uri: str) -> str:
    """sqlite:///mlflow.db names a file relative to the driver's folder: make it absolute so
    every worker process opens the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def probe(ray_address: str | None) -> None:
    """Fail at once where no cluster listens (ray.init would block for minutes there)."""
    if not ray_address or ray_address == "auto":
        return
    host, _, port = ray_address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError):
        raise ConfigError(
            f"no Ray cluster answers at --ray-address {ray_address} (start one with "
            "`ray start --head`, or check the address)"
        ) from None


def check_resources(threads: int, gpu: bool) -> None:
    """Refuse, before any chain starts, what no node of the cluster can run: a chain asks for
    `threads` CPUs (and a GPU when the cluster has GPUs) on one node."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = [r for r in nodes if r.get("CPU", 0) >= threads and (not gpu or r.get("GPU", 0) >= 1)]
    if fits:
        return
    most = max((int(r.get("CPU", 0)) for r in nodes if not gpu or r.get("GPU", 0) >= 1), default=0)
    where = "with a GPU " if gpu else ""
    raise ConfigError(
        f"--threads_per_chain {threads}: no node {where}of the Ray cluster has {threads} CPUs "
        f"(the most on one node{' with a GPU' if gpu else ''}: {most}); lower "
        "--threads_per_chain or add such a node"
    )


def connect(ray_address: str | None) -> None:
    """Join a running cluster, or start a local Ray instance on this machine's cores."""
    if not ray_address:
        with without_credentials():
            ray.init(
                # "local": a new instance even where one runs on this machine already (ray.init
                # without an address joins any running instance it finds: another user's study)
                address="local",
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        return
    try:
        ray.init(address=ray_address, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise ConfigError(
            f"cannot join the Ray cluster at {ray_address} ({e}): if it uses token "
            "authentication, set RAY_AUTH_MODE=token with the head's token in ~/.ray/auth_token "
            "or RAY_AUTH_TOKEN"
        ) from None


# ---- the tracking server's credentials, on their way to the tasks --------------------------------


class ClientSettings:
    """The tracking URI and credentials a chain logs with (tracking.client_settings). They travel
    through Ray's object store: not as a task argument, nor in runtime_env (the dashboard shows
    both), nor in any log line; the repr names the settings, never their values."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = dict(values)

    def __repr__(self) -> str:
        return f"ClientSettings({', '.join(sorted(self.values))})"


@contextmanager
def without_credentials() -> Iterator[None]:
    """The credentials out of this process's environment while a local Ray instance starts: its
    processes and workers inherit none, and the tasks get them as on a cluster."""
    saved = {k: os.environ.pop(k) for k in tracking.SECRET_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextmanager
def client_environment(settings: ClientSettings) -> Iterator[None]:
    """MLflow's client in this worker (every thread of it) logs with the driver's settings while
    a chain runs; afterwards the worker, which Ray may reuse, holds none of them."""
    before = {k: os.environ.get(k) for k in settings.values}
    os.environ.update(settings.values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---- the chain: one Ray task ---------------------------------------------------------------------


@ray.remote(num_cpus=0)
class Board:
    """The latest state of every chain, written by the chains, read by the driver."""

    def __init__(self) -> None:
        self.chains: dict[str, dict[str, Any]] = {}

    def report(self, chain: str, **fields: Any) -> None:
        self.chains.setdefault(chain, {}).update(fields)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return self.chains


@dataclass(frozen=True)
class Context:
    """What every chain task needs from the driver (all small: the data travels apart)."""

    phases: tuple[int, ...]
    preset: str
    overrides: dict
    client: Any  # ray.ObjectRef of ClientSettings: fetched inside the task
    experiment_id: str
    study_run_id: str
    code: str
    threads: int
    max_outage: float
    checkpoint_seconds: float
    retrain: bool
    log_level: int


def chain_task(chain: Chain, data: SequenceData, ctx: Context, board) -> list[dict]:
    """One chain's phases in a Ray worker (seqgen/study/chain.py): no shared filesystem, the data
    comes from the driver, progress goes to the board."""
    import mlflow
    import torch

    log_setup(ctx.log_level)  # the worker's stderr: Ray's worker log on that node
    if code_digest() != ctx.code:
        raise ConfigError(
            f"node {socket.gethostname()} runs other seqgen code ({code_digest()}) than the "
            f"driver ({ctx.code}): install the same version on every node"
        )
    if data.recompute_fingerprint() != data.fingerprint:
        raise ConfigError(f"the data reached {socket.gethostname()} damaged (fingerprint)")
    torch.set_num_threads(ctx.threads)  # a reused worker keeps an earlier task's thread count
    os.environ.pop("MLFLOW_RUN_ID", None)  # a driver under `mlflow run` must not lend its run
    os.environ["MLFLOW_EXPERIMENT_ID"] = ctx.experiment_id
    client = ray.get(ctx.client)
    with client_environment(client):
        mlflow.set_tracking_uri(client.values["MLFLOW_TRACKING_URI"])
        return run_chain_task(chain, data, ctx, board)


def run_chain_task(chain: Chain, data: SequenceData, ctx: Context, board) -> list[dict]:
    """chain_task's phases, once the worker is set up to log to the tracking server."""
    node = ray.get_runtime_context().get_node_id()
    board.report.remote(chain.name, node=node, host=socket.gethostname(), status="running")
    # Each node writes its own folder: nothing assumes a filesystem shared between nodes.
    root = ctx.overrides.get("outputs_root", "outputs")
    overrides = chain.overrides(ctx.overrides) | {"outputs_root": f"{root}/node-{node[:8]}"}
    done: list[PhaseResult] = []

    def on_phase(phase: int, result: PhaseResult | None) -> None:
        if result is None:
            board.report.remote(chain.name, phase=phase, epoch=None)
            return
        done.append(result)
        board.report.remote(chain.name, phases_done=len(done), model=result.model_uri)

    def on_epoch(_: PhaseSettings, record: EpochRecord, last_epoch: int, eta: float) -> None:
        board.report.remote(chain.name, epoch=record.epoch, last_epoch=last_epoch, eta=eta)

    options = RunOptions(
        lease_wait=lease_seconds() + 30,  # a retried task waits out its dead predecessor's lease
        max_outage=ctx.max_outage,
        checkpoint_seconds=ctx.checkpoint_seconds,
        retrain=ctx.retrain,
        on_epoch=on_epoch,
    )
    made_by = f"`seqgen study` (run {ctx.study_run_id})"
    results = run_chain(
        chain.strategy, chain.seed, list(ctx.phases), ctx.preset, overrides, options, data,
        on_phase, made_by,
    )  # fmt: skip
    return [dataclasses.asdict(r) for r in results]


# ---- the driver ----------------------------------------------------------------------------------


def run_study(
    strategies: list[str],
    seeds: list[int],
    phases: list[int],
    preset: str,
    overrides: dict,
    ray_address: str | None = None,
    threads: int = THREADS_PER_CHAIN,
    options: RunOptions | None = None,
    out=sys.stderr,
    max_pending: float = MAX_PENDING,
    points: list[dict] | None = None,
) -> list[ChainOutcome]:
    """Run every chain (strategy x grid point x seed) as a Ray task; show one live line per
    chain; end with a table. A chain that failed on a bug fails the study with its traceback,
    after the others ended."""
    options = options or RunOptions()
    chains = plan_chains(strategies, seeds, points or [{}], phases, preset, overrides)
    probe(ray_address)
    uri = absolute_store(check_tracking_for_cluster(ray_address))
    data = load_study_data(chains, phases, preset, overrides)
    chains = name_chains(chains, phases[0], preset, overrides, data)
    exp_id = tracking.existing_experiment_id()  # made only once nothing refuses the study
    # before Ray starts: a user who may only read leaves nothing to clean up
    tracking.check_can_log(exp_id, registered_models(chains, phases, preset, overrides))
    connect(ray_address)
    try:
        gpu = ray.cluster_resources().get("GPU", 0) >= 1
        check_resources(threads, gpu)
        exp_id = tracking.experiment_id()
        study_run = open_study_run(exp_id, chains, phases, preset, overrides)
        client = ray.put(ClientSettings(tracking.client_settings(uri)))
        ctx = Context(
            tuple(phases), preset, overrides, client, exp_id, study_run,
            code_digest(), threads, options.max_outage, options.checkpoint_seconds, options.retrain,
            logging.getLogger("seqgen").getEffectiveLevel(),
        )  # fmt: skip
        screen = Screen(out, [c.name for c in chains], len(phases))
        with study_run_open(study_run):
            outcomes, bugs = drive(chains, data, ctx, screen, gpu, max_pending)
        end_study_run(study_run, outcomes)
        for line in tracking.browse_lines(exp_id, study_view(points)):
            log.info(line)
        if bugs:
            raise bugs[0]
        return outcomes
    finally:
        ray.shutdown()


def drive(
    chains: list[Chain],
    data: dict[str, SequenceData],
    ctx: Context,
    screen: Screen,
    gpu: bool,
    max_pending: float = MAX_PENDING,
) -> tuple[list[ChainOutcome], list[BaseException]]:
    """Start a task per chain and watch them to the end, the board redrawn every second. Chains
    that wait for a node while none of the study's chains runs fail after max_pending seconds
    (the node they need is gone, or never was). Returns the outcomes and the bugs (errors that
    are not seqgen's own) of failed chains."""
    here = ray.get_runtime_context().get_node_id()
    board = Board.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
    ).remote()
    task = ray.remote(chain_task).options(
        num_cpus=ctx.threads, num_gpus=1 if gpu else 0, max_retries=CHAIN_RETRIES
    )
    refs = {data_dir: ray.put(d) for data_dir, d in data.items()}
    started = {c.name: time.monotonic() for c in chains}
    pending = {task.remote(c, refs[data_of(c, ctx)], ctx, board): c for c in chains}
    outcomes: dict[str, ChainOutcome] = {}
    bugs: list[BaseException] = []
    idle_since: float | None = time.monotonic()  # since when none of the chains runs
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=REFRESH_SECONDS)
        for ref in done:
            chain = pending.pop(ref)
            seconds = time.monotonic() - started[chain.name]
            outcomes[chain.name], bug = outcome(chain, ref, board, len(ctx.phases), seconds)
            bugs += [bug] if bug is not None else []
        state = ray.get(board.snapshot.remote())
        if any_running(state, [c.name for c in pending.values()]):
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif pending and time.monotonic() - idle_since > max_pending:
            for ref, chain in list(pending.items()):  # the node they need is gone, or never was
                ray.cancel(ref, force=True)
                seconds = time.monotonic() - started[chain.name]
                outcomes[chain.name] = given_up(chain, state, ctx, gpu, max_pending, seconds)
                del pending[ref]
        screen.draw(state, outcomes)
    ordered = [outcomes[c.name] for c in chains]
    screen.table(ordered)
    return ordered, bugs


def data_of(chain: Chain, ctx: Context) -> str:
    """The data folder a chain trains on."""
    return chain.settings(ctx.phases[0], ctx.preset, ctx.overrides).data_dir


def given_up(
    chain: Chain, board: dict, ctx: Context, gpu: bool, max_pending: float, seconds: float
) -> ChainOutcome:
    need = f"{ctx.threads} CPU(s)" + (" and a GPU" if gpu else "")
    why = (
        f"failed: waited {max_pending:.0f} s for a node with {need} while no chain ran "
        "(--max_pending): none of the cluster's nodes could take it"
    )
    line = ChainOutcome(chain.name, 0, len(ctx.phases), "", seconds, why)
    return dataclasses.replace(line, **_so_far(board.get(chain.name, {})))


def any_running(board: dict[str, dict[str, Any]], chains: list[str]) -> bool:
    """Whether any of these chains runs now: it reported from a node that is alive (a chain
    whose node died waits for Ray to start it again elsewhere)."""
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    return any(board.get(c, {}).get("node") in alive for c in chains)


def _so_far(state: dict[str, Any]) -> dict[str, Any]:
    return {"phases_done": state.get("phases_done", 0), "model": state.get("model") or ""}


def outcome(
    chain: Chain, ref, board, n_phases: int, seconds: float
) -> tuple[ChainOutcome, BaseException | None]:
    """A finished task's line: done, or failed with its one-line reason (the others go on); and
    the error itself when it is a bug (not seqgen's own error, nor what happened to a node)."""
    try:
        results = ray.get(ref)
    except ray.exceptions.RayError as e:
        so_far = _so_far(ray.get(board.snapshot.remote()).get(chain.name, {}))
        cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) else e
        bug = None
        if isinstance(e, ray.exceptions.RayTaskError) and not isinstance(cause, SeqgenError):
            bug = e
        why = reason(cause) + ("; a bug: its traceback follows the table" if bug else "")
        line = ChainOutcome(chain.name, 0, n_phases, "", seconds, f"failed: {why}")
        return dataclasses.replace(line, **so_far), bug
    last = results[-1]["model_uri"] if results else ""
    return ChainOutcome(chain.name, len(results), n_phases, last, seconds, "done"), None
