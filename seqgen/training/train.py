"""Training one phase of one strategy. Start reading at `train_phase`: set up (or take the phase
up where it stopped), then each epoch train, evaluate, checkpoint, log; then finish (final model,
registry). Everything the tracking store is told goes through a Courier
(seqgen/runs/delivery.py), so
a tracking server that is away does not stop training."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seqgen.config import MAX_OUTAGE, N_PHASES, PhaseSettings
from seqgen.data.sequences import SequenceData
from seqgen.errors import TrackingError, TrainingError
from seqgen.files import copy_atomic
from seqgen.model.bundle import Bundle, Checkpoint, DataInfo
from seqgen.model.generator import StreamlinedSequenceGenerator
from seqgen.runs import tracking
from seqgen.runs.delivery import Courier, new_owner
from seqgen.runs.phase_run import (
    LAST_CHECKPOINT,
    catch_up,
    claim_run,
    end_abnormally,
    find_run,
    newest_checkpoint,
    release_run,
)
from seqgen.training import outputs
from seqgen.training.epochs import EpochStats, Progress, stop_reason
from seqgen.training.losses import make_loss
from seqgen.training.schedules import learning_rate, teacher_forcing_ratio
from seqgen.training.start import (
    Start,
    choose_device,
    identity,
    load_phase_data,
    phase_key,
    resolve_start,
    resume_from,
    split_tensors,
)
from seqgen.training.step import (
    Precision,
    StepGraphs,
    choose_precision,
    cuda_graphs_wanted,
    evaluate_loss,
    load_scaler_state,
    optimizer_step,
    seed_epoch,
)
from seqgen.version import code_digest, code_version


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
class Phase:
    """Everything decided before the first epoch; built so bad input fails before a run exists."""

    s: PhaseSettings
    data: SequenceData
    start: Start
    identity: dict  # what defines this phase (settings, exact parent, data fingerprint)
    key: str  # its digest, the run's phase_key tag: finds the run again on any node
    experiment_id: str
    device: torch.device
    parts: dict = field(default_factory=dict)  # {split: (params (N,P), components (N,T,K))}

    @property
    def out_dir(self) -> Path:
        return self.s.folder(self.start.first_epoch)

    @property
    def last_epoch(self) -> int:
        return self.start.first_epoch + self.s.epochs - 1

    def bundle(self, model, epoch: int, val_loss: float, run_id: str) -> Bundle:
        train_params = self.data.params[self.start.split.indices(self.data.files, "train")]
        lows, highs = train_params.min(axis=0), train_params.max(axis=0)
        ranges = tuple((float(lo), float(hi)) for lo, hi in zip(lows, highs, strict=True))
        return Bundle(
            model_config=model.config,
            state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            normalizer=self.start.norm,
            data=DataInfo(
                step_name=self.data.step_name,
                component_names=self.data.component_names,
                param_names=self.data.param_names,
                steps=tuple(self.data.steps.tolist()),
                fingerprint=self.data.fingerprint,
                data_dir=str(self.s.data_dir),
                param_ranges=ranges,
            ),
            split=self.start.split,
            strategy=self.s.variant,
            phase=self.s.phase,
            seed=self.s.seed,
            preset=self.s.preset,
            epoch=epoch,
            val_loss=val_loss,
            run_id=run_id,
            last_epoch=epoch,  # so far; finish_phase writes the real last into the best model
        )

    def result(self, run_id: str, status: str, progress: Progress | None = None, **kw):
        s, p = self.s, progress or Progress()
        return PhaseResult(
            s.variant,
            s.phase,
            s.seed,
            run_id,
            status,
            str(self.out_dir),
            p.best_val,
            p.best_epoch,
            **kw,
        )


@dataclass
class Training:
    """The state the epochs work on."""

    model: StreamlinedSequenceGenerator
    optimizer: torch.optim.Optimizer
    precision: Precision
    progress: Progress
    run_id: str
    courier: Courier
    graphs: StepGraphs | None = None  # CUDA: each training step replayed as a CUDA graph


def prepare_phase(s: PhaseSettings, data: SequenceData | None = None) -> Phase:
    """Data, starting point, identity and device: every check on input happens here."""
    tracking.check_tracking_store()
    data = load_phase_data(s, data)
    start = resolve_start(s, data)
    ident = identity(s, start, data.fingerprint)
    exp_id = tracking.experiment_id()
    return Phase(s, data, start, ident, phase_key(ident), exp_id, choose_device(s))


def train_phase(
    s: PhaseSettings,
    resume: bool = False,
    stop_at_epoch: int | None = None,
    log=print,
    hint_next: bool = True,
    data: SequenceData | None = None,
    parent_run_id: str | None = None,
    max_outage: float = MAX_OUTAGE,
    lease_wait: float = 0.0,
    on_epoch=None,
) -> PhaseResult:
    """Train one phase, or take it up where it stopped; a registered phase is not trained again.

    data: the samples already loaded (a cluster task gets them from its driver). lease_wait:
    seconds to wait for a run another process holds (a retried cluster task waits out its dead
    predecessor's lease). on_epoch(stats, last_epoch, eta): progress for a driver."""
    ph = prepare_phase(s, data)
    record = find_run(ph.experiment_id, ph.key, s.run_name, ph.identity, resume, lease_wait)
    if record is not None and record.state == "registered":
        log(
            f"[{s.run_name}] already registered as {s.registered_model}/{record.model_version} "
            f"(run {record.run_id}): nothing to train"
        )
        uri = f"models:/{s.registered_model}/{record.model_version}"
        return ph.result(record.run_id, "skipped", model_uri=uri, version=record.model_version)
    checkpoint = newest_checkpoint(ph.out_dir, record.run_id) if record else None
    if checkpoint is not None:
        ph.start = resume_from(ph.start, checkpoint)
    outputs.prepare_folder(ph.out_dir, record.run_id if record else None)
    ph.parts = split_tensors(ph.data, ph.start, ph.device)

    precision = choose_precision(ph.device, s.mixed_precision)
    torch.manual_seed(s.seed)
    model = StreamlinedSequenceGenerator(ph.start.model_config).to(ph.device)
    if ph.start.state_dict is not None:
        model.load_state_dict(ph.start.state_dict)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.start_lr, weight_decay=s.weight_decay)
    progress = Progress()
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint.optimizer)
        if note := load_scaler_state(precision.scaler, checkpoint.scaler):
            log(f"[{s.run_name}] {note}")
        progress = Progress(**checkpoint.progress)

    owner = new_owner()
    run_id = claim_run(ph.experiment_id, record, owner, s.run_name, run_tags(ph), parent_run_id)
    tr = Training(model, optimizer, precision, progress, run_id, Courier(run_id, owner, log))
    try:
        record_setup(ph, tr, log)
        if checkpoint is not None:
            checkpoint.save(ph.out_dir / LAST_CHECKPOINT)  # the one the phase goes on from
            catch_up(run_id, tr.courier, progress, ph.out_dir / LAST_CHECKPOINT)
            write_csv(ph, progress)
        if record is not None and record.state == "trained":
            log(f"[{s.run_name}] training had finished: registering only")
            return finish_phase(ph, tr, max_outage, log, record_reason(record))
        result = train_epochs(ph, tr, stop_at_epoch, max_outage, log, on_epoch)
    except KeyboardInterrupt:
        end_abnormally(run_id, tr.courier, "KILLED")
        raise
    except BaseException:
        end_abnormally(run_id, tr.courier, "FAILED")
        raise
    finally:
        tr.courier.close()
    if result.status == "registered" and s.phase < N_PHASES and hint_next:
        log(outputs.next_phase_hint(s, result.model_uri))
    return result


def train_epochs(ph: Phase, tr: Training, stop_at_epoch, max_outage, log, on_epoch) -> PhaseResult:
    """The epochs left: each trains, evaluates, checkpoints, then logs; then finish."""
    s = ph.s
    if tr.progress.stopped:  # stopped early, then interrupted before it was registered
        return finish_phase(ph, tr, max_outage, log, tr.progress.stopped)
    loss_fn = make_loss(s.alpha, s.max_lag)
    if cuda_graphs_wanted(ph.device, s.grad_accum_steps):
        tr.graphs = StepGraphs(tr.model, loss_fn, tr.precision, s.noise_level)
        log(f"[{s.run_name}] CUDA graphs: one replay per training step (SEQGEN_CUDA_GRAPHS=0: off)")
    done, started = len(tr.progress.history), time.perf_counter()
    for epoch in range(done, s.epochs):
        global_epoch = ph.start.first_epoch + epoch
        stats, grad_norms = run_epoch(ph, tr, loss_fn, epoch)
        improved = tr.progress.add(stats)
        tr.progress.stopped = stop_reason(s, tr.progress, stats, grad_norms)
        # Checkpoint before logging: the checkpoint carries the epoch's numbers
        # (progress.history), so an interruption between the two loses nothing.
        save_epoch(ph, tr, improved)
        tr.courier.metrics(stats.metrics(), step=global_epoch)
        write_csv(ph, tr.progress)
        tr.courier.artifact(ph.out_dir / outputs.METRICS_CSV)
        eta = (time.perf_counter() - started) / (epoch + 1 - done) * (s.epochs - epoch - 1)
        log(epoch_line(s, stats, ph.last_epoch, eta, improved))
        if on_epoch is not None:
            on_epoch(stats, ph.last_epoch, eta)

        tr.courier.check()
        if (behind := tr.courier.behind_seconds()) > max_outage:
            raise TrackingError(
                f"the tracking server has been unreachable for {behind:.0f} s: {s.run_name} "
                f"paused after epoch {global_epoch} with its checkpoint in {ph.out_dir}; run the "
                "same command again to resume"
            )
        if tr.progress.stopped:
            log(f"[{s.run_name}] early stop at epoch {global_epoch}: {tr.progress.stopped}")
            return finish_phase(ph, tr, max_outage, log, tr.progress.stopped)
        if stop_at_epoch is not None and stop_at_epoch <= global_epoch < ph.last_epoch:
            tr.courier.tags({"stop_reason": "paused", "paused_at_epoch": global_epoch})
            tr.courier.drain(max_outage)
            release_run(tr.run_id, "KILLED")  # left out of comparisons until taken up again
            log(f"[{s.run_name}] paused after epoch {global_epoch}: run the command again")
            return ph.result(
                tr.run_id, "paused", tr.progress, stop_reason="paused", paused_at=global_epoch
            )
    return finish_phase(ph, tr, max_outage, log)


def run_tags(ph: Phase) -> dict[str, str]:
    s = ph.s
    return {
        "kind": "phase",
        "strategy": s.variant,
        "base_strategy": s.strategy,
        "alpha": s.alpha,
        "phase": s.phase,
        "seed": s.seed,
        "preset": s.preset,
        "dataset_fingerprint": ph.data.fingerprint,
        "continued_from": ph.start.parent_uri or "",
        "code_version": code_version(),
        "code_digest": code_digest(),
        "overrides": json.dumps(s.overrides()),
        "phase_key": ph.key,
        "phase_settings": json.dumps(ph.identity, sort_keys=True),
    }


def record_setup(ph: Phase, tr: Training, log) -> None:
    """Params, args.json, split and normaliser (locally and as artifacts), and the opening line."""
    s, start = ph.s, ph.start
    settings = s.to_dict() | {
        "first_epoch": start.first_epoch,
        "last_epoch": ph.last_epoch,
        "output_dir": str(ph.out_dir),
        "schedule": start.schedule,
    }
    tracking.log_params_once(
        tr.run_id,
        settings | {"device_used": str(ph.device), "precision": str(tr.precision.dtype)},
    )
    outputs.mark_folder(ph.out_dir, tr.run_id)
    for name in outputs.write_setup_files(ph.out_dir, settings, start.split, start.norm):
        tr.courier.artifact(ph.out_dir / name)
    counts = {k: len(start.split.part(k)) for k in ("train", "val", "test")}
    tracking.log_dataset(tr.run_id, s.data_dir, ph.data.fingerprint, counts)
    sizes = "/".join(map(str, counts.values()))
    done = len(tr.progress.history)
    log(
        f"[{s.run_name}] {s.variant} phase {s.phase}, epochs {start.first_epoch}-{ph.last_epoch}, "
        f"{sizes} train/val/test, {tr.precision.note}, device {ph.device}, run {tr.run_id}"
        + (f", continuing from {start.parent_uri}" if start.parent_uri else "")
        + (f", taken up after epoch {start.first_epoch + done - 1}" if done else "")
    )
    if s.num_workers:
        log(f"[{s.run_name}] --num_workers {s.num_workers} is ignored: batches come from memory")
    if start.split.note:
        log(f"[{s.run_name}] {start.split.note}")


def run_epoch(ph: Phase, tr: Training, loss_fn, epoch: int) -> tuple[EpochStats, list[float]]:
    """Train one epoch (0-based within the phase), then evaluate; the pre-clip gradient norms."""
    s, precision = ph.s, tr.precision
    global_epoch, started = ph.start.first_epoch + epoch, time.perf_counter()
    lr = learning_rate(ph.start.schedule, epoch, s.epochs, s.start_lr, s.min_lr)
    ratio = 0.0
    if s.teacher_forcing:
        ratio = teacher_forcing_ratio(
            epoch, s.epochs, s.teacher_forcing_start, s.teacher_forcing_end
        )
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
    if tr.graphs is not None:
        tr.graphs.new_epoch(ratio)

    # Train.
    train_params, train_targets = ph.parts["train"]
    n_train, batch = len(train_params), s.batch_size * s.grad_accum_steps
    order = torch.randperm(n_train, generator=seed_epoch(s.seed, global_epoch)).to(ph.device)
    steps = -(-n_train // batch)
    sums, counted, grad_norms = np.zeros(3), 0, []
    for step, chunk in enumerate(order.split(batch)):
        micro = [(train_params[b], train_targets[b]) for b in chunk.split(s.batch_size)]
        r = optimizer_step(
            tr.model,
            loss_fn,
            micro,
            tr.optimizer,
            precision,
            ratio,
            s.noise_level,
            s.clip_grad_norm,
            tr.graphs,
        )
        outputs.show_progress(f"epoch {global_epoch}", step + 1, steps, started)
        if not r.finite:
            tr.progress.nonfinite_in_a_row += 1
            if tr.progress.nonfinite_in_a_row >= s.max_nonfinite_steps:
                raise TrainingError(
                    f"{tr.progress.nonfinite_in_a_row} non-finite steps in a row at epoch "
                    f"{global_epoch}: training diverged; the last good checkpoint is in "
                    f"{ph.out_dir} (lower --start_lr or --clip_grad_norm)"
                )
            continue
        tr.progress.nonfinite_in_a_row = 0
        sums += np.array([r.loss, r.mae, r.autocorr]) * len(chunk)
        counted += len(chunk)
        if np.isfinite(r.grad_norm):  # not an fp16 overflow step the GradScaler skipped
            grad_norms.append(r.grad_norm)
    train = sums / counted if counted else np.full(3, np.nan)

    # Evaluate: model selection on the free-running loss, as the model is used.
    val = evaluate_loss(tr.model, loss_fn, *ph.parts["val"], 0.0, precision)
    val_tf = evaluate_loss(tr.model, loss_fn, *ph.parts["val"], 1.0, precision)
    test = evaluate_loss(tr.model, loss_fn, *ph.parts["test"], 0.0, precision)
    stats = EpochStats(
        epoch=global_epoch,
        train=tuple(float(x) for x in train),
        val=tuple(val),
        test=tuple(test),
        val_teacher_forced=val_tf.total,
        lr=lr,
        teacher_forcing_ratio=ratio,
        grad_norm=float(np.mean(grad_norms)) if grad_norms else float("nan"),
        seconds=time.perf_counter() - started,
        nonfinite_steps=steps - len(grad_norms),
    )
    return stats, grad_norms


def save_epoch(ph: Phase, tr: Training, improved: bool) -> None:
    """The epoch's files: last_checkpoint.pth always (any interruption can resume from it), a
    checkpoint_epoch_N.pth every save_every epochs and at the end, best_model.pth when it
    improved. Written here first, then queued for the store, the best model before the
    checkpoint: a phase taken up on another machine finds both there."""
    s, out_dir, stats = ph.s, ph.out_dir, tr.progress.history[-1]
    epoch = stats["epoch"]
    bundle = ph.bundle(tr.model, epoch, stats["val"][0], tr.run_id)
    if improved:
        bundle.save(out_dir / "best_model.pth")
        copy_atomic(out_dir / "best_model.pth", out_dir / "best_model_combined.pth")
        tr.courier.artifact(out_dir / "best_model.pth")
    Checkpoint(
        bundle=bundle,
        optimizer=tr.optimizer.state_dict(),
        scaler=tr.precision.scaler.state_dict(),
        progress=dataclasses.asdict(tr.progress),
        settings=s.to_dict(),
        continued_from=ph.start.parent_uri or "",
        first_epoch=ph.start.first_epoch,
    ).save(out_dir / LAST_CHECKPOINT)
    tr.courier.artifact(out_dir / LAST_CHECKPOINT, "checkpoints")
    if epoch % s.save_every == 0 or epoch == ph.last_epoch:
        periodic = out_dir / f"checkpoint_epoch_{epoch}.pth"
        copy_atomic(out_dir / LAST_CHECKPOINT, periodic)
        tr.courier.artifact(periodic, "checkpoints")


def finish_phase(
    ph: Phase, tr: Training, max_outage: float, log, reason: str = "completed"
) -> PhaseResult:
    """The final model and files into the store, then the best model into the registry. Each
    step is recorded (phase_state), so a phase stopped in between does only what is missing."""
    s, out_dir, progress = ph.s, ph.out_dir, tr.progress
    last = progress.history[-1]["epoch"]
    best_path = out_dir / "best_model.pth"
    if not best_path.is_file():  # trained on another machine: its files are in the store
        if tracking.download(tr.run_id, "best_model.pth", out_dir) is None:
            raise TrainingError(
                f"{s.run_name}: run {tr.run_id} has no best_model.pth in the store and {out_dir} "
                "has none: run the same command on the machine that trained it, or delete the "
                "run to train the phase again"
            )
    # The best model learns the phase's real last epoch (an early stop ends before the plan's),
    # so the next phase's global epochs follow on from it.
    dataclasses.replace(Bundle.load(best_path), last_epoch=last).save(best_path)
    copy_atomic(best_path, out_dir / "best_model_combined.pth")
    final = ph.bundle(tr.model, last, progress.history[-1]["val"][0], tr.run_id)
    final.save(out_dir / "final_model.pth")
    for name in outputs.FINAL_FILES:
        tr.courier.artifact(out_dir / name)
    tr.courier.tags({"phase_state": "trained", "stop_reason": reason})
    if not tr.courier.drain(max_outage):
        raise TrackingError(
            f"the tracking server stayed away after {s.run_name} finished training: its files "
            f"are in {out_dir}; run the same command again to register it"
        )
    version = tracking.register_phase_model(
        tr.run_id,
        best_path,
        s.registered_model,
        [f"phase-{s.phase}", s.alias()],
        {
            "run_id": tr.run_id,
            "phase": s.phase,
            "seed": s.seed,
            "strategy": s.variant,
            "preset": s.preset,
            "val_loss": progress.best_val,
            "best_epoch": progress.best_epoch,
            "continued_from": (ph.start.parent_uri or "").removeprefix("models:/"),
        },
    )
    tracking.describe_model(
        s.registered_model, version, Bundle.load(best_path), ph.start.parent_uri or ""
    )
    summary = {
        "best_val_loss": progress.best_val,
        "best_epoch": progress.best_epoch,
        "phase_seconds": sum(h["seconds"] for h in progress.history),
        "peak_memory_mb": outputs.peak_memory_mb(ph.device),
    }
    tracking.log_metrics_at(tr.run_id, summary, last)
    done = {"phase_state": "registered", "model_version": version, "paused_at_epoch": ""}
    tracking.set_run_tags(tr.run_id, done)
    release_run(tr.run_id, "FINISHED")
    model_uri = f"models:/{s.registered_model}/{version}"
    log(
        f"[{s.run_name}] done: best val {progress.best_val:.4f} at epoch {progress.best_epoch}; "
        f"run {tr.run_id}; registered {model_uri} (alias {s.alias()}); outputs in {out_dir}"
    )
    return ph.result(
        tr.run_id,
        "registered",
        progress,
        stop_reason=reason,
        model_uri=model_uri,
        version=version,
    )


def record_reason(record) -> str:
    return tracking.run_tags(record.run_id).get("stop_reason") or "completed"


def write_csv(ph: Phase, progress: Progress) -> None:
    two = ph.s.trains_two_terms
    rows = [EpochStats(**h).csv_row(two) for h in progress.history]
    outputs.write_metrics_csv(ph.out_dir, rows, two)


def epoch_line(s: PhaseSettings, st: EpochStats, last_epoch: int, eta: float, best: bool) -> str:
    return (
        f"[{s.run_name}] epoch {st.epoch}/{last_epoch} train {st.train[0]:.4f} "
        f"val {st.val[0]:.4f} (tf {st.val_teacher_forced:.4f}) test {st.test[0]:.4f} "
        f"lr {st.lr:.2e} tf-ratio {st.teacher_forcing_ratio:.3f} |g| {st.grad_norm:.2f} "
        f"{st.seconds:.1f}s ETA {outputs.format_eta(eta)}" + (" *" if best else "")
    )
