"""The run keeper: a phase's bookkeeping, in one object the training loop calls at a few named
points. It finds the phase's run again (or knows it is registered), claims it, records the setup,
catches up what the store missed, writes and delivers each epoch's files and metrics, pauses, and
finishes (final model, registry). The loop itself holds only the machine learning.

How a live trainer is told from a dead one: the process that trains a run holds a lease on it
(seqgen/runs/delivery.py), renewed by its courier. A run left RUNNING by a process that died is
taken up by the next command that trains the same phase: at once when the dead process ran in the
same process table (its pid is gone), else once its lease has not been renewed for 60 s of this
process's own watching. A run whose lease is renewed is never taken over. Two processes that start
one new phase at the same moment both create a run; the one that sees the other's run withdraws
its own (claim_run), so one of them trains.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from seqgen.config import CHECKPOINT_SECONDS, MAX_OUTAGE, N_PHASES, PhaseSettings, strategies
from seqgen.errors import ConfigError, TrackingError, TrainingError, first_line
from seqgen.files import settle, write_atomic, write_later
from seqgen.model.bundle import Bundle, BundleError, Checkpoint
from seqgen.runs import descriptions, outputs, tracking, variants
from seqgen.runs.delivery import Courier, LeaseWatch, lease_seconds, new_owner, renew_every
from seqgen.runs.faults import kill_point
from seqgen.runs.tracking import RunRecord
from seqgen.training.epochs import EpochRecord, Progress
from seqgen.training.start import Setup
from seqgen.version import code_digest, code_version

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint.pth"  # what any interruption resumes from (see checkpoint_due)
BEST_MODEL = "best_model.pth"
CLAIM_ATTEMPTS = 5  # new runs made for a phase that others started at the same moment


@dataclass
class RunOptions:
    """How a phase is run, not what it trains: the command line's bookkeeping choices."""

    resume: bool = False  # there must be an interrupted run to take up
    retrain: bool = False  # a registered phase is trained anew, as a new version
    stop_at_epoch: int | None = None  # pause after this global epoch
    max_outage: float = MAX_OUTAGE  # seconds the tracking server may be away before a pause
    checkpoint_seconds: float = CHECKPOINT_SECONDS  # at most this long between checkpoints
    lease_wait: float = 0.0  # seconds to wait for another process's lease (a retried task)
    parent_run_id: str | None = None  # the run a new phase run is nested under
    # the chains' runs by (variant, seed): a phase nests under its chain's, its curves mirror there
    chain_runs: dict[tuple[str, int], str] = field(default_factory=dict)
    hint_next: bool = True  # say the next phase's command at the end
    # a study's progress: (the phase's settings, its epoch, its last epoch, ETA seconds)
    on_epoch: Callable[[PhaseSettings, EpochRecord, int, float], None] | None = None
    # a study's: the phases' ends land there in the background while its next round trains
    landings: Landings | None = None


class Landings:
    """The records of finished phases (RunKeeper.land), landing one round after another in one
    background thread while the next round trains from the models in memory. A round's
    landing that fails is raised by the next check() or by wait(); the runs it left are
    repaired by running the same command again, as after a kill."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="seqgen-landing")
        self._pending: list[Future] = []

    def submit(self, land: Callable[[], None]) -> None:
        self._pending.append(self._pool.submit(land))

    def check(self) -> None:
        """Raise the error of a landing that failed, if one did."""
        for future in [f for f in self._pending if f.done()]:
            self._pending.remove(future)
            future.result()

    def wait(self) -> None:
        """Wait for every landing; raise the first error."""
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pending.clear()

    def close(self) -> None:
        """Let what is under way land (a study stopped on an error: its errors are not this
        one's), then stop the thread."""
        self._pool.shutdown(wait=True)


@dataclass
class PhaseResult:
    """How a phase ended: registered (trained now), skipped (registered before) or paused."""

    strategy: str  # the variant trained
    phase: int
    seed: int
    run_id: str
    status: str  # "registered", "skipped", "paused" or (a stack's member that diverged) "failed"
    output_dir: str
    best_val: float
    best_epoch: int | None
    stop_reason: str = ""  # completed, validation_plateau, overfitting, ...; failed: the error
    model_uri: str | None = None  # models:/name/version
    version: str | None = None
    paused_at: int | None = None
    model: Bundle | None = None  # the registered model itself, for the next phase to start from


@dataclass
class Snapshot:
    """One model's training state at the end of an epoch, on the CPU, as checkpoints keep it."""

    weights: dict[str, Any]  # the model's state_dict
    optimizer: dict[str, Any]  # torch.optim.AdamW's state_dict
    scaler: dict[str, Any]  # torch.amp.GradScaler's state_dict


class TrainingState(Protocol):
    """One member's live training state, read only when the keeper needs it (copies cost time
    on a GPU)."""

    def weights(self) -> dict[str, Any]: ...  # a copy of the weights now, on their device

    def snapshot(self) -> Snapshot: ...  # weights, optimiser and scaler, on the CPU


def checkpoint_due(
    epoch: int, save_every: int, last_epoch: int, seconds_since: float, every_seconds: float
) -> bool:
    """Whether this epoch ends with a checkpoint: the original's checkpoint_epoch_N files (every
    save_every epochs and the last), and otherwise once every_seconds have passed since the last
    one, so fast epochs do not bind on the disk and the store. Stops and pauses always do."""
    return epoch % save_every == 0 or epoch == last_epoch or seconds_since >= every_seconds


class RunKeeper:
    """One phase's run in the store and its local folder, from finding it to registering it.

    Metrics are held until the checkpoint that covers them is written and queued (the courier
    delivers in order), so every epoch the store shows can be resumed from, here or elsewhere;
    a kill loses at most the epochs since the last checkpoint, and they were never logged."""

    def __init__(
        self, setup: Setup, options: RunOptions, record: RunRecord | None, seen: set[str]
    ) -> None:
        self.setup, self.options, self.record = setup, options, record
        self.settings = setup.settings
        self.seen = seen  # the phase's runs as found: a run made after that is a rival's claim
        self.skipped: PhaseResult | None = None  # set when the phase was registered before
        self.checkpoint: Checkpoint | None = None  # the furthest one, when taken up
        self.resend_checkpoint = False  # the store's copy was unreadable
        self.run_id = ""
        self.courier: Courier | None = None
        self._started = time.perf_counter()
        self._epochs_here = 0
        self._first_epoch_here = setup.start.first_epoch  # the first epoch this process trains
        self._held: list[EpochRecord] = []  # epochs not yet covered by a checkpoint
        self._best: tuple[dict[str, Any], EpochRecord] | None = None  # improved, not yet written
        self._checkpointed_at = time.monotonic()
        self._landing: tuple[Progress, Path, str, str] | None = None  # what land() records
        self._made = False  # a run this process made: its courier makes its LoggedModel

    # ---- finding the run -----------------------------------------------------------------------

    @classmethod
    def find(cls, setup: Setup, options: RunOptions) -> RunKeeper:
        """The keeper of this phase: registered already (skipped is set), taken up from its
        furthest checkpoint, or new. The folder is checked before anything is tracked."""
        record, seen = find_run(setup, options)
        if record is not None and record.state == "registered" and options.retrain:
            name = setup.settings.run_name
            log.info(f"[{name}] --retrain: a new run (run {record.run_id} stays as it is)")
            outputs.set_aside(setup.out_dir, record.run_id)
            record = None
        keeper = cls(setup, options, record, seen)
        if record is not None and record.state == "registered":
            keeper.skipped = keeper._skip(record)
            return keeper
        if record is not None:
            keeper._go_on_from(record)
        ours = keeper.record.run_id if keeper.record else None
        keep_other_runs_files(setup, ours)
        outputs.prepare_folder(setup.out_dir, ours)
        return keeper

    def _go_on_from(self, record: RunRecord) -> None:
        """Take the run up from its furthest readable checkpoint. When every copy there is
        unreadable the run is abandoned (kept as FAILED) and the phase starts over in a new
        one, so no epoch is logged twice."""
        found = newest_checkpoint(self.setup.out_dir, record.run_id, self.settings.run_name)
        self.checkpoint, unreadable = found.checkpoint, found.unreadable
        self.resend_checkpoint = found.store_unreadable
        if self.checkpoint is not None:
            self.setup.resume_from(self.checkpoint)
        elif unreadable:
            log.warning(
                f"[{self.settings.run_name}] run {record.run_id} has no readable checkpoint: the "
                f"phase starts over in a new run (run {record.run_id} is kept as FAILED, "
                "phase_state abandoned)"
            )
            reason = "no readable checkpoint"
            tracking.withdraw_run(record.run_id, "abandoned", reason, status="FAILED")
            outputs.set_aside(self.setup.out_dir, record.run_id)
            self.record = None

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
            settings.variant_name,
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
        self._first_epoch_here = self.setup.start.first_epoch + len(progress.history)
        launched = tracking.launched_by_mlflow_run()  # its run may carry `mlflow run`'s params
        self.run_id = self._claim(owner)
        made = self.record is None and not launched  # made now: nothing in it to read back
        chain = self.options.chain_runs.get((self.settings.variant_name, self.settings.seed))
        self.courier = Courier(self.run_id, owner, mirror_to=chain)
        try:
            tags = {} if made else tracking.run_tags(self.run_id)
            self._record_setup(precision_note, progress, tags, made)
            if self.checkpoint is not None:
                self.checkpoint.save(self.setup.out_dir / LAST_CHECKPOINT)  # the one to go on from
                self._catch_up(progress, tags)
            yield
        except KeyboardInterrupt:
            end_abnormally(self.run_id, self.courier, "KILLED")
            raise
        except BaseException:
            end_abnormally(self.run_id, self.courier, "FAILED")
            raise
        finally:
            self.courier.close()

    def _claim(self, owner: str) -> str:
        """The phase's run, claimed for this process: the one found, or a new one. A new run that
        lost a race with another process's (both started the phase at once) is withdrawn; the
        phase is then looked for again, which refuses (or waits for) the other's live run."""
        for _ in range(CLAIM_ATTEMPTS):
            try:
                return claim_run(self.setup, self.record, owner, self.options, self.seen)
            except LostClaim:
                time.sleep(random.uniform(0.2, 2.0))  # two that both withdrew do not meet again
                found, self.seen = find_run(
                    self.setup, dataclasses.replace(self.options, resume=False)
                )
                if found is not None and found.state == "registered":
                    raise TrackingError(
                        f"{self.settings.run_name} was registered by another process meanwhile "
                        f"(run {found.run_id}): nothing to train"
                    ) from None
                self.record = found  # a run whose maker died at once is taken up
        raise TrackingError(
            f"{self.settings.run_name}: other processes kept starting this phase at the same "
            f"moment ({CLAIM_ATTEMPTS} claims lost): run the command again"
        )

    def _record_setup(
        self, precision_note: str, progress: Progress, tags: dict, made: bool
    ) -> None:
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
        params |= {"device_used": str(setup.device), "precision": precision_note}
        if made:  # params, dataset and model in the courier's first batch, off the critical path
            earlier: dict = {}
            self.courier.params(params)
            model_tags = {k: getattr(settings, k) for k in ("strategy", "phase", "seed")}
            self.courier.model(setup.experiment_id, params, model_tags)
            self._made = True
        else:
            earlier = tracking.run_params(self.run_id)
            tracking.log_params_once(self.run_id, params)
        self._note_device(precision_note, progress, earlier, tags)
        outputs.mark_folder(setup.out_dir, self.run_id)
        files = outputs.write_setup_files(
            setup.out_dir, resolved, start.split, start.norm, write_later
        )
        for name in files:
            self.courier.artifact(setup.out_dir / name)
        counts = {k: len(start.split.part(k)) for k in ("train", "val", "test")}
        if made:
            self.courier.dataset(settings.data_dir, setup.data.fingerprint, counts)
        else:
            tracking.log_dataset(self.run_id, settings.data_dir, setup.data.fingerprint, counts)
        done = len(progress.history)
        log.info(
            f"[{settings.run_name}] {settings.variant_name} phase {settings.phase}, epochs "
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

    def _note_device(self, precision: str, progress: Progress, earlier: dict, tags: dict) -> None:
        """Device and precision belong to the run (params device_used and precision say where it
        started). A phase taken up on other hardware says so, and the tag seqgen.devices records
        from which epoch it trained where."""
        if not progress.history or "device_used" not in earlier:
            return
        here, start = f"{self.setup.device}, {precision}", self.setup.start.first_epoch
        history = tags.get(tracking.DEVICES) or (
            f"from epoch {start}: {earlier['device_used']}, {earlier.get('precision', '?')}"
        )
        then = history.split("; ")[-1].partition(": ")[2]
        if then == here:
            return
        first = start + len(progress.history)
        self.courier.tags({tracking.DEVICES: f"{history}; from epoch {first}: {here}"})
        log.warning(
            f"[{self.settings.run_name}] taken up on {here} after epoch {first - 1}, which "
            f"trained on {then}: recorded in the run's tag {tracking.DEVICES}"
        )

    def _catch_up(self, progress: Progress, tags: dict) -> None:
        """A run taken up: send what the store has not seen, each step once (after an outage
        this machine's checkpoint is ahead of the store): the best epoch's model, the
        checkpoint, the epochs' metrics."""
        logged = tracking.logged_steps(self.run_id, "epoch_seconds")
        missing = [r for r in progress.history if r.epoch not in logged]
        best = progress.best_epoch
        if best is not None and tags.get(tracking.BEST_MODEL_EPOCH) != str(best):
            if (path := self._best_model_file(progress, required=False)) is not None:
                self.courier.artifact(path)
                self.courier.tags({tracking.BEST_MODEL_EPOCH: best})
        if missing or self.resend_checkpoint:
            self.courier.artifact(self.setup.out_dir / LAST_CHECKPOINT, "checkpoints")
        for r in missing:
            self.courier.metrics(r.metrics(), step=r.epoch)
        self._write_csv(progress)

    def epoch_done(self, progress: Progress, state: TrainingState, improved: bool) -> None:
        """An epoch is over: its line, and when a checkpoint is due (checkpoint_due, or the
        phase stops, pauses or has lost the store for too long) its files here and in the store,
        the checkpoint before the metrics it covers."""
        record = progress.last
        if improved:
            self._best = (state.weights(), record)
        self._held.append(record)
        away = self.courier.outage_seconds()
        if (
            progress.stopped
            or self.should_pause(record.epoch)
            or away > self.options.max_outage
            or checkpoint_due(
                record.epoch,
                self.settings.save_every,
                self.setup.last_epoch,
                time.monotonic() - self._checkpointed_at,
                self.options.checkpoint_seconds,
            )
        ):
            self._save_checkpoint(progress, state.snapshot())
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
        if away > self.options.max_outage:
            raise TrackingError(
                f"the tracking server at {tracking.redacted_uri()} has been unreachable for "
                f"{away:.0f} s (--max_outage {self.options.max_outage:g}): "
                f"{self.settings.run_name} paused after epoch {record.epoch} with its checkpoint "
                f"in {self.setup.out_dir}; run the same command again to resume"
            )

    def _save_checkpoint(self, progress: Progress, snapshot: Snapshot) -> None:
        """best_model.pth when it improved since the last checkpoint, last_checkpoint.pth,
        checkpoint_epoch_N.pth every save_every epochs and at the end, then the held epochs'
        metrics and the CSV. Written here first (serialised now, on the disk by the file thread
        while the next epoch trains: files.write_later), then queued for the store in that order
        (the courier uploads a file once written): a phase taken up on another machine finds
        there the files of every epoch it was told of."""
        setup, out_dir, record = self.setup, self.setup.out_dir, progress.last
        if self._best is not None:
            weights, best = self._best
            cpu = {k: v.cpu() for k, v in weights.items()}
            model = setup.bundle(cpu, best.epoch, best.val.loss, self.run_id).to_bytes()
            write_later(out_dir / BEST_MODEL, model)
            write_later(out_dir / "best_model_combined.pth", model)
            self.courier.artifact(out_dir / BEST_MODEL)
            self.courier.tags({tracking.BEST_MODEL_EPOCH: best.epoch})
            self._best = None
        bundle = setup.bundle(snapshot.weights, record.epoch, record.val.loss, self.run_id)
        checkpoint = Checkpoint(
            bundle=bundle,
            optimizer=snapshot.optimizer,
            scaler=snapshot.scaler,
            progress=progress.to_dict(),
            settings=self.settings.to_dict(),
            continued_from=setup.start.parent_uri or "",
            first_epoch=setup.start.first_epoch,
        ).to_bytes()
        write_later(out_dir / LAST_CHECKPOINT, checkpoint)
        self.courier.artifact(out_dir / LAST_CHECKPOINT, "checkpoints")
        if record.epoch % self.settings.save_every == 0 or record.epoch == setup.last_epoch:
            periodic = out_dir / f"checkpoint_epoch_{record.epoch}.pth"
            write_later(periodic, checkpoint)
            self.courier.artifact(periodic, "checkpoints")
        for held in self._held:
            self.courier.metrics(held.metrics(), step=held.epoch)
        self._held.clear()
        self._write_csv(progress, write_later)
        self.courier.artifact(out_dir / outputs.METRICS_CSV)
        self._checkpointed_at = time.monotonic()

    def _write_csv(self, progress: Progress, write: Callable = write_atomic) -> None:
        s = self.settings
        headers, keys = zip(
            *outputs.metrics_columns(tuple(s.weights), s.trains_two_terms), strict=True
        )
        rows = [r.csv_row(keys) for r in progress.history]
        outputs.write_metrics_csv(self.setup.out_dir, rows, list(headers), write)

    # ---- pausing and finishing -----------------------------------------------------------------

    def should_pause(self, global_epoch: int) -> bool:
        """--stop_at_epoch N: pause after epoch N, unless it is the phase's last. The same
        command again, which takes the phase up after epoch N, trains on to the end."""
        stop = self.options.stop_at_epoch
        if stop is None or global_epoch >= self.setup.last_epoch:
            return False
        return self._first_epoch_here <= stop <= global_epoch

    def pause(self, progress: Progress) -> PhaseResult:
        """Leave the run KILLED (out of comparisons) with its checkpoint, for a later rerun."""
        epoch = progress.last.epoch
        self.courier.tags({"stop_reason": "paused", tracking.PAUSED_AT: epoch})
        self.courier.drain(self.options.max_outage)
        release_run(self.run_id, "KILLED", self.courier)
        log.info(f"[{self.settings.run_name}] paused after epoch {epoch}: run the command again")
        return self._result("paused", progress, stop_reason="paused", paused_at=epoch)

    def fail(self, error: Exception, progress: Progress) -> PhaseResult:
        """A member of a stack whose training diverged: its run ends FAILED, as a chain's that
        diverged alone; its last checkpoint stays. The other members go on."""
        log.error(f"{error}; its run ends FAILED, the other members go on")
        end_abnormally(self.run_id, self.courier, "FAILED")
        return self._result("failed", progress, stop_reason=str(error))

    def finish(
        self, progress: Progress, snapshot: Snapshot, device, lease: str | None = None
    ) -> PhaseResult:
        """The end of training: the final model and files written here and queued for the store,
        then the best model's version reserved in the registry, so the result names its exact
        version (what the next phase records as its parent) and holds the model itself (what it
        starts from). The rest of the records land with land(), which a study runs in the
        background while the next round trains. Each step is recorded (phase state), so a phase
        stopped in between does only what is missing: the end-of-phase metrics go through the
        courier, which sends a step only once. lease: the run's lease holder as read for the
        stack's members at once (lease_holders), else read here."""
        settings, out_dir, last = self.settings, self.setup.out_dir, progress.last
        reason = progress.stopped or "completed"
        if progress.stopped:
            log.info(f"[{settings.run_name}] early stop at epoch {last.epoch}: {progress.stopped}")
        if progress.best_epoch is None:
            raise TrainingError(
                f"{settings.run_name}: the validation loss was not finite in any epoch "
                f"({self.setup.start.first_epoch}-{last.epoch}, last {last.val.loss}): there is "
                "no best model to register; look for extreme values in the validation files "
                "or lower the learning rate, then delete the run to train the phase again"
            )
        best_path = self._best_model_file(progress)
        # The best model learns the phase's real last epoch (an early stop ends before the
        # plan's), so the next phase's global epochs follow on from it.
        best = dataclasses.replace(Bundle.load(best_path), last_epoch=last.epoch)
        model = best.to_bytes()  # on the disk by the file thread, each before its upload
        write_later(best_path, model)
        write_later(out_dir / "best_model_combined.pth", model)
        final = self.setup.bundle(snapshot.weights, last.epoch, last.val.loss, self.run_id)
        write_later(out_dir / "final_model.pth", final.to_bytes())
        for name in outputs.FINAL_FILES:
            self.courier.artifact(out_dir / name)
        best_epoch = {tracking.BEST_MODEL_EPOCH: progress.best_epoch}
        self.courier.tags({tracking.PHASE_STATE: "trained", "stop_reason": reason} | best_epoch)
        summary = {
            "best_val_loss": progress.best_val,
            "best_epoch": progress.best_epoch,
            "phase_seconds": sum(r.seconds for r in progress.history),
            "peak_memory_mb": outputs.peak_memory_mb(device),
        }
        self.courier.metrics(summary, last.epoch)
        try:
            self.courier.still_mine(lease)
            version, model_id = tracking.reserve_version(
                self.run_id,
                settings.registered_model,
                self._version_tags(progress),
                self._model_made(progress),
            )
        except TrackingError:
            if tracking.server_is_up():
                raise
            # The store is away: wait for it as the courier does (a reserve it cut off is
            # found again: nothing is made twice), then once more.
            self._drained(progress)
            self.courier.still_mine()
            version, model_id = tracking.reserve_version(
                self.run_id, settings.registered_model, self._version_tags(progress)
            )
        self._landing = (progress, best_path, version, model_id)
        model_uri = f"models:/{settings.registered_model}/{version}"
        kw = {"stop_reason": reason, "model_uri": model_uri, "version": version, "model": best}
        return self._result("registered", progress, **kw)

    def _model_made(self, progress: Progress) -> str | None:
        """The LoggedModel the courier made for a run made here, the first of its records
        (waited for only when delivery lags); None: the store is asked (reserve_version)."""
        if self._made and self.courier.model_id is None:
            self._drained(progress)
        return self.courier.model_id

    def land(self) -> None:
        """The rest of finish once the courier has delivered the phase's files: the model into
        its version, aliases and descriptions, the run tagged registered and ended FINISHED."""
        progress, best_path, version, model_id = self._landing
        settings = self.settings
        self._drained(progress)
        settle(best_path)
        self.courier.still_mine()
        name, parent = settings.registered_model, self.setup.start.parent_uri or ""
        tracking.complete_version(
            self.run_id,
            best_path,
            name,
            version,
            model_id,
            [f"phase-{settings.phase}", settings.alias()],
            self._version_tags(progress),
            step=progress.best_epoch or 0,  # the logged model shows the run's metrics of that epoch
        )
        tracking.describe_model(name, version, Bundle.load(best_path), parent)
        self.courier.still_mine()
        done = {tracking.PHASE_STATE: "registered", "model_version": version}
        tracking.set_run_tags(self.run_id, done | {tracking.PAUSED_AT: ""})
        kill_point("tagged-registered")
        release_run(self.run_id, "FINISHED", self.courier)
        kill_point("ended")
        model_uri = f"models:/{name}/{version}"
        log.info(
            f"[{settings.run_name}] done: best val {progress.best_val:.4f} at epoch "
            f"{progress.best_epoch}; run {self.run_id}; registered {model_uri} (alias "
            f"{settings.alias()}); outputs in {self.setup.out_dir}"
        )
        if settings.phase < N_PHASES and self.options.hint_next:
            log.info(outputs.next_phase_hint(settings, model_uri))

    def _best_model_file(self, progress: Progress, required: bool = True) -> Path | None:
        """best_model.pth of the phase's best epoch in this folder, whatever path the phase took
        (machines, outages): this folder's copy when it holds that epoch, else the store's, else
        that epoch's periodic checkpoint (here or in the store). None, or when `required` an
        error, when no copy holds it."""
        want, out_dir, path = (
            progress.best_epoch,
            self.setup.out_dir,
            self.setup.out_dir / BEST_MODEL,
        )
        if self._bundle_of_best(path, want) is not None:
            return path
        periodic = f"checkpoint_epoch_{want}.pth"
        for local in (out_dir / periodic, out_dir / LAST_CHECKPOINT):
            if (bundle := self._bundle_of_best(local, want)) is not None:
                bundle.save(path)
                return path
        with tempfile.TemporaryDirectory(prefix="seqgen-best-") as tmp:
            for stored in (BEST_MODEL, f"checkpoints/{periodic}"):
                got = tracking.download(self.run_id, stored, Path(tmp))
                if got is not None and (bundle := self._bundle_of_best(got, want)) is not None:
                    bundle.save(path)
                    return path
        if not required:
            return None
        raise TrainingError(
            f"{self.settings.run_name}: the model of its best epoch ({want}) is neither in "
            f"{out_dir} nor in run {self.run_id}'s artifacts: run the same command on the "
            "machine that trained that epoch, or delete the run to train the phase again"
        )

    def _bundle_of_best(self, path: Path, epoch: int | None) -> Bundle | None:
        """The model in `path` when it is this run's at `epoch` (a checkpoint holds one too)."""
        settle(path)
        if not path.is_file():
            return None
        try:
            bundle = Bundle.load(path)
        except BundleError as e:
            log.warning(f"[{self.settings.run_name}] {first_line(e)}: not used")
            return None
        return bundle if (bundle.run_id, bundle.epoch) == (self.run_id, epoch) else None

    def _drained(self, progress: Progress) -> None:
        """Everything queued is delivered, or the server stayed away too long (an error)."""
        if not self.courier.drain(self.options.max_outage):
            raise TrackingError(
                f"the tracking server at {tracking.redacted_uri()} stayed away after "
                f"{self.settings.run_name} finished training: its files are in "
                f"{self.setup.out_dir}; run the same command again to register it"
            )

    def _version_tags(self, progress: Progress) -> dict[str, Any]:
        settings, parent = self.settings, self.setup.start.parent_uri or ""
        return {
            "run_id": self.run_id,
            "phase": settings.phase,
            "seed": settings.seed,
            "strategy": settings.strategy,
            "variant": settings.variant_name,
            "preset": settings.preset,
            "val_loss": progress.best_val,
            "best_epoch": progress.best_epoch,
            "continued_from": parent.removeprefix("models:/"),
        }

    def _result(self, status: str, progress: Progress, **kw: Any) -> PhaseResult:
        settings = self.settings
        return PhaseResult(
            settings.variant_name,
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
RUN_TAG_KEYS = ("strategy", "variant", "phase", "seed", "preset")


def run_tags(setup: Setup) -> dict[str, str]:
    settings, parent = setup.settings, setup.start.parent_uri or ""
    return {
        tracking.NOTE: descriptions.phase_text(settings, parent),
        tracking.RUN_COLOUR: descriptions.variant_colour(settings.variant_name, strategies()),
        "kind": "phase",
        "strategy": settings.strategy,  # the table's section
        "variant": settings.variant_name,  # as trained: the strategy's name for its plan
        tracking.VARIANT_DIFFERENCES: variants.record(settings, setup.data.fingerprint),
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


def keep_other_runs_files(setup: Setup, ours: str | None) -> None:
    """The folder holds another run of this variant, phase and seed (other bookkeeping settings,
    or a parent trained anew): its files move aside to <folder>.run-<id8>, so nothing saved is
    lost and this run gets the original name; unless that run is still being trained."""
    holder = outputs.folder_holder(setup.out_dir)
    if holder is None or holder == ours:
        return
    if tracking.run_status(holder) == "RUNNING":
        raise TrackingError(
            f"output folder {setup.out_dir} is being written by run {holder} of this phase with "
            "other settings (RUNNING): run this when it has ended (or end that run if its "
            "process is gone)"
        )
    outputs.set_aside(setup.out_dir, holder)
    log.info(
        f"[{setup.settings.run_name}] {setup.out_dir} held run {holder}'s files (other settings "
        f"or parent): moved aside to {setup.out_dir.name}.run-{holder[:8]}"
    )


def find_run(setup: Setup, options: RunOptions) -> tuple[RunRecord | None, set[str]]:
    """The run of this phase identity, if any, and the ids of every run of it seen (a run made
    after this look is another process's claim). A run whose lease holder lives is refused,
    after waiting up to lease_wait seconds for it to die; whether it lives is told by watching
    its lease on this process's own clock (delivery.LeaseWatch), which can take up to
    lease_seconds() for a holder on another machine. A registered run that a process died
    ending (not FINISHED, its lease dead) is ended FINISHED here (finish_registered)."""
    run_name = setup.settings.run_name
    deadline = time.monotonic() + options.lease_wait
    watch, said = LeaseWatch(), False
    while True:
        runs = tracking.phase_runs(setup.experiment_id, setup.key)
        record = next((r for r in runs if r.state not in tracking.NOT_TAKEN_UP), None)
        ended = record is None or record.state == "registered" and record.status == "FINISHED"
        if ended:
            break
        verdict = watch.verdict(record.owner, record.lease_beat)
        if verdict == "dead":
            if record.state == "registered":
                record = finish_registered(record, run_name)
            break
        if verdict == "alive" and record.state == "registered":
            break  # its holder is ending it now
        if verdict == "alive" and time.monotonic() >= deadline:
            raise HeldElsewhere(
                f"{run_name} (run {record.run_id}) is being trained by {record.owner} right now: "
                "it is not taken over while that process lives"
            )
        if not said:
            log.info(
                f"[{run_name}] run {record.run_id} is held by {record.owner}: watching its lease "
                f"(up to {lease_seconds():.0f} s) to tell whether that process still trains it"
            )
            said = True
        time.sleep(min(2.0, renew_every() / 2))
    if options.resume and (record is None or record.state == "registered"):
        raise ConfigError(resume_refusal(setup, record))
    return record, {r.run_id for r in runs}


def finish_registered(record: RunRecord, run_name: str) -> RunRecord:
    """A run whose model was registered (every alias and tag set: phase_state registered is
    written last) but whose process died before ending it: ended FINISHED, its lease released."""
    tracking.set_run_tags(record.run_id, {tracking.LEASE_OWNER: ""})
    tracking.set_run_status(record.run_id, "FINISHED")
    log.info(
        f"[{run_name}] run {record.run_id} was registered by a process that died before ending "
        f"it ({record.status}): ended FINISHED"
    )
    return dataclasses.replace(record, status="FINISHED", owner="")


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


@dataclass
class Found:
    """The checkpoints of a run taken up: the furthest readable one, and how many copies could
    not be read (set aside here, or not used from the store)."""

    checkpoint: Checkpoint | None
    unreadable: int
    store_unreadable: bool


def newest_checkpoint(out_dir: Path, run_id: str, run_name: str) -> Found:
    """The run's furthest readable checkpoint: this machine's (ahead after an outage) or the
    store's. An unreadable copy (a node lost during a write or an upload: MLflow's copy of a
    local artifact is not atomic) is said in one line and not used; this machine's is set aside
    as last_checkpoint.pth.unreadable."""
    found, unreadable, store_bad = [], 0, False
    local = out_dir / LAST_CHECKPOINT
    settle(local)
    if local.is_file():
        try:
            found.append(Checkpoint.load(local))
        except BundleError as e:
            aside = local.with_name(f"{LAST_CHECKPOINT}.unreadable")
            local.replace(aside)
            log.warning(f"[{run_name}] {first_line(e)}: set aside as {aside}")
            unreadable += 1
    with tempfile.TemporaryDirectory(prefix="seqgen-resume-") as tmp:
        stored = tracking.download(run_id, f"checkpoints/{LAST_CHECKPOINT}", Path(tmp))
        if stored is not None:
            try:
                found.append(Checkpoint.load(stored))
            except BundleError as e:
                reason = first_line(e).rpartition(" (")[2].rstrip(")")
                log.warning(
                    f"[{run_name}] run {run_id}'s checkpoints/{LAST_CHECKPOINT} in the store "
                    f"cannot be read ({reason}): not used (a readable copy, if any, is sent in "
                    "its place)"
                )
                unreadable, store_bad = unreadable + 1, True
    mine = [c for c in found if c.bundle.run_id == run_id]
    best = max(mine, key=lambda c: len(c.progress["history"]), default=None)
    return Found(best, unreadable, store_bad)


class HeldElsewhere(TrackingError):
    """The phase's run is trained by a live process: this command leaves it, and the runs that
    process holds (its chain's), as they are."""


class LostClaim(Exception):
    """Another process made a run for the same new phase at the same moment (claim_run)."""


def claim_run(
    setup: Setup, record: RunRecord | None, owner: str, options: RunOptions, seen: set[str]
) -> str:
    """A new run for this phase, or the interrupted one taken up; this process holds its lease.

    MLflow has no compare-and-set, so a new run is claimed in two steps: make it, then look for
    runs of the phase that were not there when find_run looked. Such a run is a rival's claim:
    this one withdraws (LostClaim). Of two processes that both made a run, the one that made its
    run later always sees the other's, so at most one goes on."""
    lease = {tracking.LEASE_OWNER: owner, tracking.LEASE_BEAT: "0"}
    if record is None:
        chain = options.chain_runs.get((setup.settings.variant_name, setup.settings.seed))
        parent = chain or options.parent_run_id or tracking.active_run_id()  # a chain's, a demo's
        tags = run_tags(setup) | lease | {tracking.PHASE_STATE: "training"}
        run_id = tracking.create_run(setup.experiment_id, setup.settings.run_name, tags, parent)
        kill_point("run-created")
        rivals = [
            r
            for r in tracking.phase_runs(setup.experiment_id, setup.key)
            if r.run_id not in seen | {run_id} and r.state not in tracking.NOT_TAKEN_UP
        ]
        if rivals:
            reason = f"claimed at the same moment as run {rivals[0].run_id}"
            tracking.withdraw_run(run_id, "lost", reason)
            log.info(f"[{setup.settings.run_name}] another process started this phase too")
            raise LostClaim(reason)
        kill_point("rival-checked")
        return run_id
    tracking.set_run_tags(record.run_id, lease | {"stop_reason": "", tracking.PAUSED_AT: ""})
    tracking.set_run_status(record.run_id, "RUNNING")
    # Two processes that take one dead run up at once both write their lease; the last one
    # written holds it, and the other sees so here or before its first record (the courier).
    holder = tracking.run_tags(record.run_id).get(tracking.LEASE_OWNER, "")
    if holder != owner:
        raise HeldElsewhere(
            f"{setup.settings.run_name} (run {record.run_id}) is being trained by {holder} right "
            "now: it is not taken over while that process lives"
        )
    return record.run_id


def lease_holders(keepers: list[RunKeeper]) -> list[str | None]:
    """Each keeper's run's lease holder, read for all in one call before their ends (finish asks
    whether its run is still this process's before it registers); None where the read failed
    (finish reads again, waiting out an outage)."""
    if not keepers:
        return []
    try:
        held = tracking.lease_holders(keepers[0].setup.experiment_id, [k.run_id for k in keepers])
    except TrackingError:
        return [None] * len(keepers)
    return [held.get(k.run_id) for k in keepers]


def release_run(run_id: str, status: str, courier: Courier) -> None:
    """End the run and release its lease, when it is still this process's: a process that
    finds its run taken over leaves the new holder's lease alone (courier.still_mine raises)."""
    courier.still_mine()
    tracking.set_run_tags(run_id, {tracking.LEASE_OWNER: ""})
    tracking.set_run_status(run_id, status)


def end_abnormally(run_id: str, courier: Courier, status: str) -> None:
    """Deliver what is queued (briefly) and end the run; when the store cannot be reached the run
    stays RUNNING and its lease lapses, which a rerun recognises as a dead process."""
    if not tracking.server_is_up():
        return
    try:
        courier.drain(max_outage=10, within=10)
        release_run(run_id, status, courier)
    except TrackingError:  # the store went away or the run was taken over: the lease tells
        pass


def epoch_line(run_name: str, r: EpochRecord, last_epoch: int, eta: float, best: bool) -> str:
    return (
        f"[{run_name}] epoch {r.epoch}/{last_epoch} train {r.train.loss:.4f} "
        f"val {r.val.loss:.4f} (tf {r.val_teacher_forced:.4f}) test {r.test.loss:.4f} "
        f"lr {r.lr:.2e} tf-ratio {r.teacher_forcing_ratio:.3f} |g| {r.grad_norm:.2f} "
        f"{r.seconds:.1f}s ETA {outputs.format_eta(eta)}" + (" *" if best else "")
    )
