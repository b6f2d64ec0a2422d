"""The run keeper: a phase's bookkeeping, in one object the training loop calls at a few named
points. It finds the phase's run again (or knows it is registered), claims it, records the setup,
catches up what the store missed, writes and delivers each epoch's files and metrics, pauses, and
finishes (final model, registry). The loop itself holds only the machine learning.

How a live trainer is told from a dead one: the process that trains a run holds a lease on it
(tags seqgen.lease_owner = host:pid:token, seqgen.lease_expires), renewed every 15 s by its
courier. A run left RUNNING by a process that died is taken up by the next command that trains
the same phase: at once when the dead process ran on the same host (its pid is gone), else when
its lease lapses (60 s). A run whose lease is current is never taken over.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqgen.config import MAX_OUTAGE, N_PHASES, PhaseSettings
from seqgen.errors import ConfigError, TrackingError, TrainingError
from seqgen.files import copy_atomic
from seqgen.model.bundle import Bundle, Checkpoint
from seqgen.runs import outputs, tracking
from seqgen.runs.delivery import LEASE_SECONDS, Courier, new_owner, owner_is_alive
from seqgen.runs.tracking import RunRecord
from seqgen.training.epochs import EpochRecord, Progress
from seqgen.training.start import Setup
from seqgen.version import code_digest, code_version

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint.pth"  # written every epoch: any interruption can resume
BEST_MODEL = "best_model.pth"


@dataclass
class RunOptions:
    """How a phase is run, not what it trains: the command line's bookkeeping choices."""

    resume: bool = False  # there must be an interrupted run to take up
    retrain: bool = False  # a registered phase is trained anew, as a new version
    stop_at_epoch: int | None = None  # pause after this global epoch
    max_outage: float = MAX_OUTAGE  # seconds the tracking server may be away before a pause
    lease_wait: float = 0.0  # seconds to wait for another process's lease (a retried task)
    parent_run_id: str | None = None  # the chain's run, for a phase of a study
    hint_next: bool = True  # say the next phase's command at the end
    # a study's progress: (the phase's settings, its epoch, its last epoch, ETA seconds)
    on_epoch: Callable[[PhaseSettings, EpochRecord, int, float], None] | None = None


@dataclass
class PhaseResult:
    """How a phase ended: registered (trained now), skipped (registered before) or paused."""

    strategy: str  # the variant trained
    phase: int
    seed: int
    run_id: str
    status: str  # "registered", "skipped" or "paused"
    output_dir: str
    best_val: float
    best_epoch: int | None
    stop_reason: str = ""  # completed, validation_plateau, overfitting, gradient_explosion
    model_uri: str | None = None  # models:/name/version
    version: str | None = None
    paused_at: int | None = None


@dataclass
class Snapshot:
    """One model's training state at the end of an epoch, on the CPU, as checkpoints keep it."""

    weights: dict[str, Any]  # the model's state_dict
    optimizer: dict[str, Any]  # torch.optim.AdamW's state_dict
    scaler: dict[str, Any]  # torch.amp.GradScaler's state_dict


class RunKeeper:
    """One phase's run in the store and its local folder, from finding it to registering it."""

    def __init__(self, setup: Setup, options: RunOptions, record: RunRecord | None) -> None:
        self.setup, self.options, self.record = setup, options, record
        self.settings = setup.settings
        self.skipped: PhaseResult | None = None  # set when the phase was registered before
        self.checkpoint: Checkpoint | None = None  # the furthest one, when taken up
        self.run_id = ""
        self.courier: Courier | None = None
        self._started = time.perf_counter()
        self._epochs_here = 0

    # ---- finding the run -----------------------------------------------------------------------

    @classmethod
    def find(cls, setup: Setup, options: RunOptions) -> RunKeeper:
        """The keeper of this phase: registered already (skipped is set), taken up from its
        furthest checkpoint, or new. The folder is checked before anything is tracked."""
        record = find_run(setup, options)
        if record is not None and record.state == "registered" and options.retrain:
            name = setup.settings.run_name
            log.info(f"[{name}] --retrain: a new run (run {record.run_id} stays as it is)")
            outputs.set_aside(setup.out_dir, record.run_id)
            record = None
        keeper = cls(setup, options, record)
        if record is not None and record.state == "registered":
            keeper.skipped = keeper._skip(record)
            return keeper
        if record is not None:
            keeper.checkpoint = newest_checkpoint(setup.out_dir, record.run_id)
            if keeper.checkpoint is not None:
                setup.resume_from(keeper.checkpoint)
        outputs.prepare_folder(setup.out_dir, record.run_id if record else None)
        return keeper

    def _skip(self, record: RunRecord) -> PhaseResult:
        settings = self.settings
        log.info(
            f"[{settings.run_name}] already registered as {settings.registered_model}/"
            f"{record.model_version} (run {record.run_id}): nothing to train"
        )
        if record.code_digest and record.code_digest != code_digest():
            log.warning(
                f"[{settings.run_name}] that version was trained by other seqgen code "
                f"({record.code_digest}; this is {code_digest()}): it is kept; --retrain trains "
                "the phase anew as a new version"
            )
        uri = f"models:/{settings.registered_model}/{record.model_version}"
        return PhaseResult(
            settings.variant,
            settings.phase,
            settings.seed,
            record.run_id,
            "skipped",
            str(self.setup.out_dir),
            float("nan"),
            None,
            model_uri=uri,
            version=record.model_version,
        )

    # ---- while training ------------------------------------------------------------------------

    @contextmanager
    def running(self, precision_note: str, progress: Progress) -> Iterator[None]:
        """Claim the run, record the setup and catch the store up; end the run as KILLED or FAILED
        when training stops on an error (the lease tells a rerun the rest)."""
        owner = new_owner()
        self._started = time.perf_counter()
        self.run_id = claim_run(self.setup, self.record, owner, self.options.parent_run_id)
        self.courier = Courier(self.run_id, owner)
        try:
            self._record_setup(precision_note, progress)
            if self.checkpoint is not None:
                self.checkpoint.save(self.setup.out_dir / LAST_CHECKPOINT)  # the one to go on from
                self._catch_up(progress)
            yield
        except KeyboardInterrupt:
            end_abnormally(self.run_id, self.courier, "KILLED")
            raise
        except BaseException:
            end_abnormally(self.run_id, self.courier, "FAILED")
            raise
        finally:
            self.courier.close()

    def _record_setup(self, precision_note: str, progress: Progress) -> None:
        """Params, args.json, split and normaliser (locally and as artifacts), the dataset, and
        the opening line."""
        setup, settings, start = self.setup, self.settings, self.setup.start
        resolved = settings.to_dict() | {
            "first_epoch": start.first_epoch,
            "last_epoch": setup.last_epoch,
            "output_dir": str(setup.out_dir),
            "schedule": start.schedule,
        }
        params = {k: v for k, v in resolved.items() if k not in RUN_TAG_KEYS}
        tracking.log_params_once(
            self.run_id,
            params | {"device_used": str(setup.device), "precision": precision_note},
        )
        outputs.mark_folder(setup.out_dir, self.run_id)
        for name in outputs.write_setup_files(setup.out_dir, resolved, start.split, start.norm):
            self.courier.artifact(setup.out_dir / name)
        counts = {k: len(start.split.part(k)) for k in ("train", "val", "test")}
        tracking.log_dataset(self.run_id, settings.data_dir, setup.data.fingerprint, counts)
        done = len(progress.history)
        log.info(
            f"[{settings.run_name}] {settings.variant} phase {settings.phase}, epochs "
            f"{start.first_epoch}-{setup.last_epoch}, {'/'.join(map(str, counts.values()))} "
            f"train/val/test, {precision_note}, device {setup.device}, run {self.run_id}"
            + (f", continuing from {start.parent_uri}" if start.parent_uri else "")
            + (f", taken up after epoch {start.first_epoch + done - 1}" if done else "")
        )
        if settings.num_workers:
            log.info(
                f"[{settings.run_name}] --num_workers {settings.num_workers} is ignored: batches "
                "come from memory"
            )
        if start.split.note:
            log.info(f"[{settings.run_name}] {start.split.note}")

    def _catch_up(self, progress: Progress) -> None:
        """A run taken up: send the checkpoint and the epochs' metrics the store has not seen
        (after an outage this machine's checkpoint is ahead of the store), each step once."""
        logged = tracking.logged_steps(self.run_id, "epoch_seconds")
        missing = [r for r in progress.history if r.epoch not in logged]
        if missing:
            self.courier.artifact(self.setup.out_dir / LAST_CHECKPOINT, "checkpoints")
            for r in missing:
                self.courier.metrics(r.metrics(), step=r.epoch)
        self._write_csv(progress)

    def epoch_done(self, progress: Progress, snapshot: Snapshot, improved: bool) -> None:
        """An epoch is over: its files here and in the store (the checkpoint before the metrics,
        so every logged epoch has one), its line, and a check that delivery can go on."""
        record = progress.last
        self._save_files(progress, snapshot, improved)
        self.courier.metrics(record.metrics(), step=record.epoch)
        self._write_csv(progress)
        self.courier.artifact(self.setup.out_dir / outputs.METRICS_CSV)
        self._epochs_here += 1
        eta = (
            (time.perf_counter() - self._started)
            / self._epochs_here
            * (self.setup.last_epoch - record.epoch)
        )
        log.info(epoch_line(self.settings.run_name, record, self.setup.last_epoch, eta, improved))
        if self.options.on_epoch is not None:
            self.options.on_epoch(self.settings, record, self.setup.last_epoch, eta)
        self.courier.check()
        if (away := self.courier.outage_seconds()) > self.options.max_outage:
            raise TrackingError(
                f"the tracking server has been unreachable for {away:.0f} s: "
                f"{self.settings.run_name} paused after epoch {record.epoch} with its checkpoint "
                f"in {self.setup.out_dir}; run the same command again to resume"
            )

    def _save_files(self, progress: Progress, snapshot: Snapshot, improved: bool) -> None:
        """last_checkpoint.pth always (any interruption can resume from it), best_model.pth when
        it improved, checkpoint_epoch_N.pth every save_every epochs and at the end. Written here
        first, then queued for the store, the best model before the checkpoint: a phase taken
        up on another machine finds both there."""
        setup, out_dir, record = self.setup, self.setup.out_dir, progress.last
        bundle = setup.bundle(snapshot.weights, record.epoch, record.val.loss, self.run_id)
        if improved:
            bundle.save(out_dir / BEST_MODEL)
            copy_atomic(out_dir / BEST_MODEL, out_dir / "best_model_combined.pth")
            self.courier.artifact(out_dir / BEST_MODEL)
        Checkpoint(
            bundle=bundle,
            optimizer=snapshot.optimizer,
            scaler=snapshot.scaler,
            progress=progress.to_dict(),
            settings=self.settings.to_dict(),
            continued_from=setup.start.parent_uri or "",
            first_epoch=setup.start.first_epoch,
        ).save(out_dir / LAST_CHECKPOINT)
        self.courier.artifact(out_dir / LAST_CHECKPOINT, "checkpoints")
        if record.epoch % self.settings.save_every == 0 or record.epoch == setup.last_epoch:
            periodic = out_dir / f"checkpoint_epoch_{record.epoch}.pth"
            copy_atomic(out_dir / LAST_CHECKPOINT, periodic)
            self.courier.artifact(periodic, "checkpoints")

    def _write_csv(self, progress: Progress) -> None:
        two = self.settings.trains_two_terms
        rows = [r.csv_row(two) for r in progress.history]
        outputs.write_metrics_csv(self.setup.out_dir, rows, two)

    # ---- pausing and finishing -----------------------------------------------------------------

    def should_pause(self, global_epoch: int) -> bool:
        """--stop_at_epoch N: pause after epoch N, unless it is the phase's last."""
        stop = self.options.stop_at_epoch
        return stop is not None and stop <= global_epoch < self.setup.last_epoch

    def pause(self, progress: Progress) -> PhaseResult:
        """Leave the run KILLED (out of comparisons) with its checkpoint, for a later rerun."""
        epoch = progress.last.epoch
        self.courier.tags({"stop_reason": "paused", tracking.PAUSED_AT: epoch})
        self.courier.drain(self.options.max_outage)
        release_run(self.run_id, "KILLED")
        log.info(f"[{self.settings.run_name}] paused after epoch {epoch}: run the command again")
        return self._result("paused", progress, stop_reason="paused", paused_at=epoch)

    def finish(self, progress: Progress, snapshot: Snapshot, device) -> PhaseResult:
        """The final model and files into the store, then the best model into the registry. Each
        step is recorded (phase state), so a phase stopped in between does only what is missing."""
        settings, out_dir, last = self.settings, self.setup.out_dir, progress.last
        reason = progress.stopped or "completed"
        if progress.stopped:
            log.info(f"[{settings.run_name}] early stop at epoch {last.epoch}: {progress.stopped}")
        best_path = self._best_model_file()
        # The best model learns the phase's real last epoch (an early stop ends before the
        # plan's), so the next phase's global epochs follow on from it.
        dataclasses.replace(Bundle.load(best_path), last_epoch=last.epoch).save(best_path)
        copy_atomic(best_path, out_dir / "best_model_combined.pth")
        final = self.setup.bundle(snapshot.weights, last.epoch, last.val.loss, self.run_id)
        final.save(out_dir / "final_model.pth")
        for name in outputs.FINAL_FILES:
            self.courier.artifact(out_dir / name)
        self.courier.tags({tracking.PHASE_STATE: "trained", "stop_reason": reason})
        if not self.courier.drain(self.options.max_outage):
            raise TrackingError(
                f"the tracking server stayed away after {settings.run_name} finished training: its "
                f"files are in {out_dir}; run the same command again to register it"
            )
        version = self._register(progress, best_path)
        summary = {
            "best_val_loss": progress.best_val,
            "best_epoch": progress.best_epoch,
            "phase_seconds": sum(r.seconds for r in progress.history),
            "peak_memory_mb": outputs.peak_memory_mb(device),
        }
        tracking.log_metrics_at(self.run_id, summary, last.epoch)
        done = {tracking.PHASE_STATE: "registered", "model_version": version}
        tracking.set_run_tags(self.run_id, done | {tracking.PAUSED_AT: ""})
        release_run(self.run_id, "FINISHED")
        model_uri = f"models:/{settings.registered_model}/{version}"
        log.info(
            f"[{settings.run_name}] done: best val {progress.best_val:.4f} at epoch "
            f"{progress.best_epoch}; run {self.run_id}; registered {model_uri} (alias "
            f"{settings.alias()}); outputs in {out_dir}"
        )
        if settings.phase < N_PHASES and self.options.hint_next:
            log.info(outputs.next_phase_hint(settings, model_uri))
        return self._result(
            "registered", progress, stop_reason=reason, model_uri=model_uri, version=version
        )

    def _best_model_file(self) -> Path:
        best_path = self.setup.out_dir / BEST_MODEL
        if best_path.is_file():
            return best_path
        # trained on another machine: its best model is in the store
        if tracking.download(self.run_id, BEST_MODEL, self.setup.out_dir) is None:
            raise TrainingError(
                f"{self.settings.run_name}: run {self.run_id} has no {BEST_MODEL} in the store and "
                f"{self.setup.out_dir} has none: run the same command on the machine that "
                "trained it, or delete the run to train the phase again"
            )
        return best_path

    def _register(self, progress: Progress, best_path: Path) -> str:
        settings, parent = self.settings, self.setup.start.parent_uri or ""
        version = tracking.register_phase_model(
            self.run_id,
            best_path,
            settings.registered_model,
            [f"phase-{settings.phase}", settings.alias()],
            {
                "run_id": self.run_id,
                "phase": settings.phase,
                "seed": settings.seed,
                "strategy": settings.variant,
                "preset": settings.preset,
                "val_loss": progress.best_val,
                "best_epoch": progress.best_epoch,
                "continued_from": parent.removeprefix("models:/"),
            },
        )
        tracking.describe_model(settings.registered_model, version, Bundle.load(best_path), parent)
        return version

    def _result(self, status: str, progress: Progress, **kw: Any) -> PhaseResult:
        settings = self.settings
        return PhaseResult(
            settings.variant,
            settings.phase,
            settings.seed,
            self.run_id,
            status,
            str(self.setup.out_dir),
            progress.best_val,
            progress.best_epoch,
            **kw,
        )


# ---- the run in the store ------------------------------------------------------------------------

# Run tags a person filters on; they are tags, so they are not logged again as params.
RUN_TAG_KEYS = ("strategy", "phase", "seed", "preset")


def run_tags(setup: Setup) -> dict[str, str]:
    settings = setup.settings
    return {
        "kind": "phase",
        "strategy": settings.variant,  # as trained: the table's name, or name-<loss> for an --alpha
        "alpha": settings.alpha,
        "phase": settings.phase,
        "seed": settings.seed,
        "preset": settings.preset,
        "dataset_fingerprint": setup.data.fingerprint,
        "continued_from": setup.start.parent_uri or "",
        "code_version": code_version(),
        tracking.CODE_DIGEST: code_digest(),
        tracking.OVERRIDES: json.dumps(settings.overrides()),
        tracking.PHASE_KEY: setup.key,
        tracking.PHASE_SETTINGS: json.dumps(setup.identity, sort_keys=True),
    }


def find_run(setup: Setup, options: RunOptions) -> RunRecord | None:
    """The run of this phase identity, if any. One that a live process trains is refused, after
    waiting up to lease_wait seconds for its lease to lapse."""
    run_name = setup.settings.run_name
    deadline = time.monotonic() + options.lease_wait
    while True:
        record = tracking.find_phase_run(setup.experiment_id, setup.key)
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
    if options.resume and (record is None or record.state == "registered"):
        raise ConfigError(resume_refusal(setup, record))
    return record


def resume_refusal(setup: Setup, record: RunRecord | None) -> str:
    """Why --resume has nothing to take up, naming what differs from the runs there are."""
    run_name = setup.settings.run_name
    if record is not None:
        return f"--resume: {run_name} is already registered (run {record.run_id})"
    others = tracking.find_phase_runs_like(setup.experiment_id, run_name)
    if not others:
        return f"--resume: no run of {run_name} to take up; start it without --resume"
    theirs = others[0].settings
    changed = [
        f"{k} ({theirs[k]} then, {v} now)"
        for k, v in sorted(setup.identity.items())
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


def claim_run(setup: Setup, record: RunRecord | None, owner: str, parent: str | None) -> str:
    """A new run for this phase, or the interrupted one taken up; this process holds its lease."""
    lease = {
        tracking.LEASE_OWNER: owner,
        tracking.LEASE_EXPIRES: f"{time.time() + LEASE_SECONDS:.0f}",
    }
    if record is None:
        parent = parent or tracking.active_run_id()  # a pipeline's or a demo's parent run
        tags = run_tags(setup) | lease | {tracking.PHASE_STATE: "training"}
        return tracking.create_run(setup.experiment_id, setup.settings.run_name, tags, parent)
    tracking.set_run_tags(record.run_id, lease | {"stop_reason": "", tracking.PAUSED_AT: ""})
    tracking.set_run_status(record.run_id, "RUNNING")
    return record.run_id


def release_run(run_id: str, status: str) -> None:
    tracking.set_run_tags(run_id, {tracking.LEASE_OWNER: "", tracking.LEASE_EXPIRES: "0"})
    tracking.set_run_status(run_id, status)


def end_abnormally(run_id: str, courier: Courier, status: str) -> None:
    """Deliver what is queued (briefly) and end the run; when the store cannot be reached the run
    stays RUNNING and its lease lapses, which a rerun recognises as a dead process."""
    if not tracking.server_is_up():
        return
    try:
        courier.drain(max_outage=10, within=10)
        release_run(run_id, status)
    except TrackingError:  # the store went away or the run was taken over: the lease tells
        pass


def epoch_line(run_name: str, r: EpochRecord, last_epoch: int, eta: float, best: bool) -> str:
    return (
        f"[{run_name}] epoch {r.epoch}/{last_epoch} train {r.train.loss:.4f} "
        f"val {r.val.loss:.4f} (tf {r.val_teacher_forced:.4f}) test {r.test.loss:.4f} "
        f"lr {r.lr:.2e} tf-ratio {r.teacher_forcing_ratio:.3f} |g| {r.grad_norm:.2f} "
        f"{r.seconds:.1f}s ETA {outputs.format_eta(eta)}" + (" *" if best else "")
    )
