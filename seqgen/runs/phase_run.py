"""A phase's run in the tracking store: found again by its identity, claimed with a lease,
caught up after an interruption, released at the end.

How a live trainer is told from a dead one: the process that trains a run holds a lease on it
(tags lease_owner = host:pid:token, lease_expires), renewed every 15 s by its courier. A run left
RUNNING by a process that died is taken up by the next command that trains the same phase: at
once when the dead process ran on the same host (its pid is gone), else when its lease lapses
(60 s). A run whose lease is current is never taken over.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from seqgen.errors import ConfigError, TrackingError
from seqgen.model.bundle import Checkpoint
from seqgen.runs import tracking
from seqgen.runs.delivery import LEASE_SECONDS, Courier, owner_is_alive
from seqgen.runs.tracking import PhaseRecord
from seqgen.training.epochs import EpochStats, Progress

LAST_CHECKPOINT = "last_checkpoint.pth"  # written every epoch: any interruption can resume


def find_run(
    experiment_id: str,
    key: str,
    run_name: str,
    identity: dict,
    resume: bool,
    lease_wait: float,
) -> PhaseRecord | None:
    """The run of this phase identity, if any. One that a live process trains is refused, after
    waiting up to lease_wait seconds for its lease to lapse."""
    deadline = time.monotonic() + lease_wait
    while True:
        record = tracking.find_phase_run(experiment_id, key)
        if record is None or record.state == "registered":
            break
        if not owner_is_alive(record.owner, record.lease_expires):
            break
        if time.monotonic() >= deadline:
            raise TrackingError(
                f"{run_name} (run {record.run_id}) is being trained by {record.owner} right now: "
                "it is not taken over while that process lives"
            )
        time.sleep(2.0)
    if resume and (record is None or record.state == "registered"):
        raise ConfigError(resume_refusal(experiment_id, run_name, identity, record))
    return record


def resume_refusal(
    experiment_id: str, run_name: str, identity: dict, record: PhaseRecord | None
) -> str:
    """Why --resume has nothing to take up, naming what differs from the runs there are."""
    if record is not None:
        return f"--resume: {run_name} is already registered (run {record.run_id})"
    others = tracking.find_phase_runs_like(experiment_id, run_name)
    if not others:
        return f"--resume: no run of {run_name} to take up; start it without --resume"
    theirs = others[0].settings
    changed = [
        f"{k} ({theirs[k]} then, {v} now)"
        for k, v in sorted(identity.items())
        if k in theirs and theirs[k] != v
    ]
    return (
        f"--resume takes up a phase with the settings and data it started with; {run_name} "
        f"(run {others[0].run_id}) differs in: {', '.join(changed) or 'settings'}"
    )


def newest_checkpoint(out_dir: Path, run_id: str) -> Checkpoint | None:
    """The run's furthest checkpoint: this machine's (ahead after an outage) or the store's."""
    found = []
    local = out_dir / LAST_CHECKPOINT
    if local.is_file():
        found.append(Checkpoint.load(local))
    with tempfile.TemporaryDirectory(prefix="seqgen-resume-") as tmp:
        stored = tracking.download(run_id, f"checkpoints/{LAST_CHECKPOINT}", Path(tmp))
        if stored is not None:
            found.append(Checkpoint.load(stored))
    mine = [c for c in found if c.bundle.run_id == run_id]
    return max(mine, key=lambda c: len(c.progress["history"]), default=None)


def claim_run(
    experiment_id: str,
    record: PhaseRecord | None,
    owner: str,
    run_name: str,
    tags: dict,
    parent_run_id: str | None,
) -> str:
    """A new run for this phase, or the interrupted one taken up; this process holds its lease."""
    lease = {"lease_owner": owner, "lease_expires": f"{time.time() + LEASE_SECONDS:.0f}"}
    if record is None:
        if parent_run_id is None:
            parent_run_id = tracking.active_run_id()  # a pipeline's or a demo's parent run
        tags = tags | lease | {"phase_state": "training"}
        return tracking.create_run(experiment_id, run_name, tags, parent_run_id)
    tracking.set_run_tags(record.run_id, lease | {"stop_reason": "", "paused_at_epoch": ""})
    tracking.set_run_status(record.run_id, "RUNNING")
    return record.run_id


def catch_up(run_id: str, courier: Courier, progress: Progress, checkpoint_path: Path) -> None:
    """A run taken up: send the checkpoint and the epochs' metrics the store has not seen (after
    an outage this machine's checkpoint is ahead of the store), each step once."""
    logged = tracking.logged_steps(run_id, "epoch_seconds")
    missing = [h for h in progress.history if h["epoch"] not in logged]
    if missing:
        courier.artifact(checkpoint_path, "checkpoints")
        for h in missing:
            courier.metrics(EpochStats(**h).metrics(), step=h["epoch"])


def release_run(run_id: str, status: str) -> None:
    tracking.set_run_tags(run_id, {"lease_owner": "", "lease_expires": "0"})
    tracking.set_run_status(run_id, status)


def end_abnormally(run_id: str, courier: Courier, status: str) -> None:
    """Deliver what is queued (briefly) and end the run; when the store cannot be reached the run
    stays RUNNING and its lease lapses, which a rerun recognises as a dead process."""
    if not tracking.server_is_up():
        return
    try:
        courier.drain(timeout=10)
        release_run(run_id, status)
    except Exception:  # the store went away or the run was taken over: the lease tells the rest
        pass
