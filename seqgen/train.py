"""Training one phase of one strategy. Start reading at `train_phase`: set up, then each epoch
train, evaluate, checkpoint, log; then finish (final model, registry)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seqgen import outputs, tracking
from seqgen.bundle import Bundle, Checkpoint, DataInfo
from seqgen.config import PhaseSettings
from seqgen.data import SequenceData
from seqgen.errors import ConfigError, TrainingError
from seqgen.losses import make_loss
from seqgen.model import StreamlinedSequenceGenerator
from seqgen.schedules import learning_rate, teacher_forcing_ratio
from seqgen.start import Start, choose_device, load_phase_data, resolve_start, split_tensors
from seqgen.step import (
    Precision,
    choose_precision,
    evaluate_loss,
    load_scaler_state,
    optimizer_step,
    seed_epoch,
)

# ---- what one epoch produced, and the bookkeeping across epochs ---------------------------------


@dataclass
class EpochStats:
    """One epoch's numbers: the MLflow metrics and the training_metrics.csv row come from here."""

    epoch: int  # global
    train: tuple[float, float, float]  # (loss, mae, autocorr) averaged over the epoch's steps
    val: tuple[float, float, float]  # free-running
    test: tuple[float, float, float]  # free-running
    val_teacher_forced: float
    lr: float
    teacher_forcing_ratio: float
    grad_norm: float  # mean pre-clip norm over the finite steps
    seconds: float
    nonfinite_steps: int

    def metrics(self) -> dict[str, float]:
        named = {}
        for split in ("train", "val", "test"):
            loss, mae, autocorr = getattr(self, split)
            named |= {f"{split}_loss": loss, f"{split}_mae": mae, f"{split}_autocorr": autocorr}
        return named | {
            "val_loss_teacher_forced": self.val_teacher_forced,
            "lr": self.lr,
            "teacher_forcing_ratio": self.teacher_forcing_ratio,
            "grad_norm": self.grad_norm,
            "epoch_seconds": self.seconds,
            "nonfinite_steps": self.nonfinite_steps,
        }

    def csv_row(self, components: bool) -> list[float]:
        """The original's columns: with the loss components when the loss has two terms."""
        if components:
            return [self.epoch, *self.train, *self.val, *self.test, self.lr]
        return [self.epoch, self.train[0], self.val[0], self.test[0], self.lr]


# Logged at step = global epoch, for every strategy.
PER_EPOCH_METRICS = tuple(
    EpochStats(0, (0, 0, 0), (0, 0, 0), (0, 0, 0), 0, 0, 0, 0, 0, 0).metrics()
)


@dataclass
class Progress:
    """What a resumed phase must know about the epochs before it (saved in checkpoints)."""

    best_val: float = float("inf")
    best_epoch: int | None = None
    stale_epochs: int = 0  # epochs since the best validation loss
    nonfinite_in_a_row: int = 0
    history: list[dict] = field(default_factory=list)  # EpochStats as dicts, in order

    def add(self, stats: EpochStats) -> bool:
        """Record an epoch; True when its validation loss is the best so far."""
        self.history.append(dataclasses.asdict(stats))
        if stats.val[0] < self.best_val:
            self.best_val, self.best_epoch, self.stale_epochs = stats.val[0], stats.epoch, 0
            return True
        self.stale_epochs += 1
        return False


def stop_reason(s: PhaseSettings, p: Progress, stats: EpochStats, grad_norms: list[float]) -> str:
    """The original's early-stopping criteria, each opt-in ("" = go on).

    The train/validation gap compares losses measured the same way, teacher-forced with the
    epoch's ratio for training and at ratio 1 for validation ... both see the truth as input, so
    the gap measures overfitting, not the exposure bias a free-running loss adds."""
    if s.early_stopping_patience and p.stale_epochs > s.early_stopping_patience:
        return "validation_plateau"
    train_loss = stats.train[0]
    if s.overfit_gap is not None and train_loss > 0:
        if (stats.val_teacher_forced - train_loss) / train_loss > s.overfit_gap:
            return "overfitting"
    if s.grad_explosion_norm is not None and grad_norms and max(grad_norms) > s.grad_explosion_norm:
        return "gradient_explosion"
    return ""


# ---- the phase ----------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    """How a phase ended: registered (with its model), or paused (resume it later)."""

    strategy: str  # the variant trained
    phase: int
    seed: int
    run_id: str
    status: str  # "registered" or "paused"
    output_dir: str
    best_val: float
    best_epoch: int | None
    stop_reason: str = ""  # completed, validation_plateau, overfitting, gradient_explosion
    model_uri: str | None = None  # models:/name/version
    version: str | None = None
    paused_at: int | None = None


@dataclass
class Phase:
    """Everything set up before the first epoch; built so bad input fails before a run exists."""

    s: PhaseSettings
    data: SequenceData
    start: Start
    out_dir: Path
    device: torch.device
    precision: Precision
    parts: dict

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

    def result(self, run_id: str, progress: Progress, status: str, **kw) -> PhaseResult:
        s = self.s
        return PhaseResult(
            s.variant,
            s.phase,
            s.seed,
            run_id,
            status,
            str(self.out_dir),
            progress.best_val,
            progress.best_epoch,
            **kw,
        )


def prepare_phase(s: PhaseSettings, resume: bool) -> Phase:
    """Data, starting point, device and output folder: every check on input happens here."""
    tracking.check_tracking_store()
    data = load_phase_data(s)
    start = resolve_start(s, data, resume)
    device = choose_device(s)
    out_dir = s.folder(start.first_epoch)
    outputs.prepare_folder(out_dir, resume)
    precision = choose_precision(device, s.mixed_precision)
    return Phase(s, data, start, out_dir, device, precision, split_tensors(data, start, device))


def train_phase(
    s: PhaseSettings,
    resume: bool = False,
    stop_at_epoch: int | None = None,
    log=print,
    hint_next: bool = True,
) -> PhaseResult:
    """Train one phase: set up, then per epoch train / evaluate / checkpoint / log, then finish."""
    ph = prepare_phase(s, resume)
    start, out_dir = ph.start, ph.out_dir
    torch.manual_seed(s.seed)
    model = StreamlinedSequenceGenerator(start.model_config).to(ph.device)
    if start.state_dict is not None:
        model.load_state_dict(start.state_dict)
    loss_fn = make_loss(s.alpha, s.max_lag)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.start_lr, weight_decay=s.weight_decay)
    progress = Progress()
    if start.checkpoint is not None:
        optimizer.load_state_dict(start.checkpoint.optimizer)
        if note := load_scaler_state(ph.precision.scaler, start.checkpoint.scaler):
            log(f"[{s.run_name}] {note}")
        progress = Progress(**start.checkpoint.progress)
    done = len(progress.history)
    if done >= s.epochs:
        raise ConfigError(f"--resume: {out_dir} already finished epoch {ph.last_epoch}")

    run_id = start.checkpoint.bundle.run_id if start.checkpoint else None
    with tracking.tracked_run(s.run_name, run_tags(ph), run_id=run_id) as run:
        run_id = run.info.run_id
        record_setup(ph, run_id, log)
        reason, phase_started = "completed", time.perf_counter()
        for epoch in range(done, s.epochs):
            global_epoch = start.first_epoch + epoch
            stats, grad_norms = run_epoch(ph, model, loss_fn, optimizer, progress, epoch)
            improved = progress.add(stats)
            pause = stop_at_epoch is not None and stop_at_epoch <= global_epoch < ph.last_epoch
            # Checkpoint before logging: the checkpoint carries the epoch's numbers
            # (progress.history), so a crash between the two loses nothing.
            bundle = save_epoch(ph, model, optimizer, progress, run_id, improved, pause)
            tracking.log_metrics(stats.metrics(), step=global_epoch)
            rows = [EpochStats(**h).csv_row(s.trains_two_terms) for h in progress.history]
            outputs.write_metrics_csv(out_dir, rows, s.trains_two_terms)
            elapsed = time.perf_counter() - phase_started
            eta = elapsed / (epoch + 1 - done) * (s.epochs - epoch - 1)
            log(epoch_line(s, stats, ph.last_epoch, eta, improved))

            if reason_now := stop_reason(s, progress, stats, grad_norms):
                reason = reason_now
                log(f"[{s.run_name}] early stop at epoch {global_epoch}: {reason}")
                break
            if pause:  # KILLED, so a comparison leaves it out until --resume finishes it
                tracking.set_tags({"stop_reason": "paused", "paused_at_epoch": global_epoch})
                tracking.end_run("KILLED")
                log(f"[{s.run_name}] paused after epoch {global_epoch}: continue with --resume")
                return ph.result(
                    run_id, progress, "paused", stop_reason="paused", paused_at=global_epoch
                )
        result = finish_phase(ph, bundle, progress, run_id, reason, phase_started)
    log(
        f"[{s.run_name}] done: best val {progress.best_val:.4f} at epoch {progress.best_epoch}; "
        f"run {run_id}; registered {result.model_uri} (alias {s.alias()}); outputs in {out_dir}"
    )
    if s.phase < 5 and hint_next:
        log(outputs.next_phase_hint(s, result.model_uri))
    return result


def save_epoch(
    ph: Phase, model, optimizer, progress: Progress, run_id: str, improved: bool, pause: bool
) -> Bundle:
    """The epoch's model files: best_model.pth when it improved, and a checkpoint every
    save_every epochs, at the phase's end and when pausing. Returns the epoch's bundle."""
    s, out_dir = ph.s, ph.out_dir
    stats = progress.history[-1]
    epoch = stats["epoch"]
    bundle = ph.bundle(model, epoch, stats["val"][0], run_id)
    if improved:
        bundle.save(out_dir / "best_model.pth")
        outputs.copy_atomic(out_dir / "best_model.pth", out_dir / "best_model_combined.pth")
    if epoch % s.save_every == 0 or epoch == ph.last_epoch or pause:
        path = out_dir / f"checkpoint_epoch_{epoch}.pth"
        Checkpoint(
            bundle=bundle,
            optimizer=optimizer.state_dict(),
            scaler=ph.precision.scaler.state_dict(),
            progress=dataclasses.asdict(progress),
            settings=s.to_dict(),
            continued_from=ph.start.parent_uri or "",
            first_epoch=ph.start.first_epoch,
        ).save(path)
        tracking.log_artifact(path, "checkpoints")
    return bundle


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
        "code_version": tracking.code_version(),
        "overrides": json.dumps(s.overrides()),
    }


def record_setup(ph: Phase, run_id: str, log) -> None:
    """Params, args.json, split and normaliser (locally and as artifacts), and the opening line."""
    s, start = ph.s, ph.start
    settings = s.to_dict() | {
        "first_epoch": start.first_epoch,
        "last_epoch": ph.last_epoch,
        "output_dir": str(ph.out_dir),
        "schedule": start.schedule,
    }
    tracking.log_params(
        settings | {"device_used": str(ph.device), "precision": str(ph.precision.dtype)}
    )
    for name in outputs.write_setup_files(ph.out_dir, settings, start.split, start.norm):
        tracking.log_artifact(ph.out_dir / name)
    counts = {k: len(ph.parts[k][0]) for k in ("train", "val", "test")}
    tracking.log_dataset(s.data_dir, ph.data.fingerprint, counts)
    sizes = "/".join(map(str, counts.values()))
    log(
        f"[{s.run_name}] {s.variant} phase {s.phase}, epochs {start.first_epoch}-{ph.last_epoch}, "
        f"{sizes} train/val/test, {ph.precision.note}, device {ph.device}, run {run_id}"
        + (f", continuing from {start.parent_uri}" if start.parent_uri else "")
    )
    if s.num_workers:
        log(f"[{s.run_name}] --num_workers {s.num_workers} is ignored: batches come from memory")
    if start.split.note:
        log(f"[{s.run_name}] {start.split.note}")


def run_epoch(
    ph: Phase, model, loss_fn, optimizer, progress: Progress, epoch: int
) -> tuple[EpochStats, list[float]]:
    """Train one epoch (0-based within the phase), then evaluate; the pre-clip gradient norms."""
    s = ph.s
    global_epoch, started = ph.start.first_epoch + epoch, time.perf_counter()
    lr = learning_rate(ph.start.schedule, epoch, s.epochs, s.start_lr, s.min_lr)
    ratio = 0.0
    if s.teacher_forcing:
        ratio = teacher_forcing_ratio(
            epoch, s.epochs, s.teacher_forcing_start, s.teacher_forcing_end
        )
    for group in optimizer.param_groups:
        group["lr"] = lr

    # Train.
    train_params, train_targets = ph.parts["train"]
    n_train, batch = len(train_params), s.batch_size * s.grad_accum_steps
    order = torch.randperm(n_train, generator=seed_epoch(s.seed, global_epoch)).to(ph.device)
    steps = -(-n_train // batch)
    sums, counted, grad_norms = np.zeros(3), 0, []
    for step, chunk in enumerate(order.split(batch)):
        micro = [(train_params[b], train_targets[b]) for b in chunk.split(s.batch_size)]
        r = optimizer_step(
            model, loss_fn, micro, optimizer, ph.precision, ratio, s.noise_level, s.clip_grad_norm
        )
        outputs.show_progress(f"epoch {global_epoch}", step + 1, steps, started)
        if not r.finite:
            progress.nonfinite_in_a_row += 1
            if progress.nonfinite_in_a_row >= s.max_nonfinite_steps:
                raise TrainingError(
                    f"{progress.nonfinite_in_a_row} non-finite steps in a row at epoch "
                    f"{global_epoch}: training diverged; the last good checkpoint is in "
                    f"{ph.out_dir} (lower --start_lr or --clip_grad_norm)"
                )
            continue
        progress.nonfinite_in_a_row = 0
        sums += np.array([r.loss, r.mae, r.autocorr]) * len(chunk)
        counted += len(chunk)
        if np.isfinite(r.grad_norm):  # not an fp16 overflow step the GradScaler skipped
            grad_norms.append(r.grad_norm)
    train = sums / counted if counted else np.full(3, np.nan)

    # Evaluate: model selection on the free-running loss, as the model is used.
    val = evaluate_loss(model, loss_fn, *ph.parts["val"], 0.0, ph.precision)
    val_tf = evaluate_loss(model, loss_fn, *ph.parts["val"], 1.0, ph.precision)
    test = evaluate_loss(model, loss_fn, *ph.parts["test"], 0.0, ph.precision)
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


def finish_phase(
    ph: Phase, bundle: Bundle, progress: Progress, run_id: str, reason: str, started: float
) -> PhaseResult:
    """The final model, the files as artifacts, the best model into the registry."""
    s, out_dir = ph.s, ph.out_dir
    bundle.save(out_dir / "final_model.pth")
    # The best model learns the phase's real last epoch (an early stop ends before the plan's),
    # so the next phase's global epochs follow on from it.
    best = Bundle.load(out_dir / "best_model.pth")
    best = dataclasses.replace(best, last_epoch=bundle.epoch)
    best.save(out_dir / "best_model.pth")
    outputs.copy_atomic(out_dir / "best_model.pth", out_dir / "best_model_combined.pth")
    for name in outputs.FINAL_FILES:
        tracking.log_artifact(out_dir / name)
    parent = ph.start.parent_uri or ""
    version = tracking.log_and_register_model(
        out_dir / "best_model.pth",
        s.registered_model,
        [f"phase-{s.phase}", s.alias()],
        {
            "run_id": run_id,
            "phase": s.phase,
            "seed": s.seed,
            "strategy": s.variant,
            "preset": s.preset,
            "val_loss": progress.best_val,
            "best_epoch": progress.best_epoch,
            "continued_from": parent.removeprefix("models:/"),
        },
    )
    tracking.describe_model(s.registered_model, version, best, parent)
    tracking.set_tags({"stop_reason": reason, "model_version": version, "paused_at_epoch": ""})
    last = progress.history[-1]["epoch"]
    tracking.log_metrics(
        {
            "best_val_loss": progress.best_val,
            "best_epoch": progress.best_epoch,
            "phase_seconds": time.perf_counter() - started,
            "peak_memory_mb": outputs.peak_memory_mb(ph.device),
        },
        last,
    )
    return ph.result(
        run_id,
        progress,
        "registered",
        stop_reason=reason,
        model_uri=f"models:/{s.registered_model}/{version}",
        version=version,
    )


def epoch_line(s: PhaseSettings, st: EpochStats, last_epoch: int, eta: float, best: bool) -> str:
    return (
        f"[{s.run_name}] epoch {st.epoch}/{last_epoch} train {st.train[0]:.4f} "
        f"val {st.val[0]:.4f} (tf {st.val_teacher_forced:.4f}) test {st.test[0]:.4f} "
        f"lr {st.lr:.2e} tf-ratio {st.teacher_forcing_ratio:.3f} |g| {st.grad_norm:.2f} "
        f"{st.seconds:.1f}s ETA {outputs.format_eta(eta)}" + (" *" if best else "")
    )
