"""Training one phase of one strategy: set up, then each epoch train, evaluate, log, checkpoint."""

from __future__ import annotations

import csv
import dataclasses
import json
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seqgen import tracking
from seqgen.config import PHASES_FILE, ConfigError, PhaseSettings, table_keys
from seqgen.data import Normalizer, SequenceData, load_sequences
from seqgen.errors import TrainingError
from seqgen.losses import LossResult, make_loss
from seqgen.model import ModelConfig, StreamlinedSequenceGenerator
from seqgen.schedules import learning_rate, teacher_forcing_ratio
from seqgen.split import Split, make_split

EVAL_BATCH = 512
PER_EPOCH_METRICS = (  # logged at step = global epoch, for every strategy
    "train_loss", "train_mae", "train_autocorr", "val_loss", "val_mae", "val_autocorr",
    "test_loss", "test_mae", "test_autocorr", "val_loss_teacher_forced", "lr",
    "teacher_forcing_ratio", "grad_norm", "epoch_seconds", "nonfinite_steps",
)  # fmt: skip
# The original scripts' training_metrics.csv, column for column.
SINGLE_COLUMNS = ["Epoch", "Train Loss", "Validation Loss", "Test Loss", "Learning Rate"]
COMBINED_COLUMNS = ["Epoch", "Train Loss", "Train MAE Loss", "Train Autocorr Loss",
                    "Validation Loss", "Validation MAE Loss", "Validation Autocorr Loss",
                    "Test Loss", "Test MAE Loss", "Test Autocorr Loss",
                    "Learning Rate"]  # fmt: skip


# ---- precision ----------------------------------------------------------------------------------


@dataclass
class Precision:
    """Mixed precision on one device: an autocast dtype (or None) and a GradScaler (fp16 only)."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    note: str

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def choose_precision(device: torch.device, enabled: bool) -> Precision:
    """CUDA: fp16 autocast + GradScaler. CPU: bf16 autocast where the CPU has bf16, else off."""
    off = torch.amp.GradScaler(device.type, enabled=False)
    if not enabled:
        return Precision(device, None, off, "mixed precision off (--no_mixed_precision)")
    if device.type == "cuda":
        return Precision(device, torch.float16, torch.amp.GradScaler("cuda"),
                         "mixed precision: CUDA fp16 autocast with GradScaler")  # fmt: skip
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return Precision(device, torch.bfloat16, off, "mixed precision: CPU bf16 autocast")
    return Precision(device, None, off, "mixed precision off: this CPU has no bf16 support")


# ---- one optimiser step, one evaluation ---------------------------------------------------------


@dataclass
class StepResult:
    loss: float
    mae: float
    autocorr: float
    grad_norm: float  # before clipping
    finite: bool


def optimizer_step(model, loss_fn, micro_batches, optimizer, precision: Precision, ratio: float,
                   noise_level: float, clip_grad_norm: float) -> StepResult:  # fmt: skip
    """One optimiser step over `micro_batches` [(params (B,P), targets (B,T,K))], accumulated."""
    optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(3)
    for params, targets in micro_batches:
        with precision.autocast():
            result = loss_fn(model(params, targets, ratio, noise_level), targets)
        precision.scaler.scale(result.total / len(micro_batches)).backward()
        totals += torch.stack([r.detach().float().cpu() for r in result]) / len(micro_batches)
    precision.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm).item()
    # Under fp16 an overflowing gradient is the GradScaler's business (it skips and rescales);
    # otherwise a non-finite loss or gradient skips the update and the caller counts it.
    finite = bool(torch.isfinite(totals).all()) and (
        bool(np.isfinite(grad_norm)) or precision.scaler.is_enabled()
    )
    if finite:
        precision.scaler.step(optimizer)
    precision.scaler.update()
    return StepResult(*totals.tolist(), grad_norm, finite)


@torch.no_grad()
def evaluate_loss(
    model, loss_fn, params, targets, ratio: float, precision: Precision
) -> LossResult:
    """Mean loss over a split: free-running at ratio 0, teacher-forced at ratio 1."""
    model.eval()
    sums = torch.zeros(3)
    for i in range(0, len(params), EVAL_BATCH):
        p, y = params[i : i + EVAL_BATCH], targets[i : i + EVAL_BATCH]
        with precision.autocast():
            result = loss_fn(model(p, y, ratio), y)
        sums += torch.stack([r.float().cpu() for r in result]) * len(p)
    model.train()
    return LossResult(*(sums / len(params)).tolist())


def seed_epoch(seed: int, global_epoch: int) -> torch.Generator:
    """Every random draw of an epoch derives from (seed, epoch), so a resume replays it exactly."""
    torch.manual_seed(seed * 1_000_003 + global_epoch)  # sampling, noise, dropout
    return torch.Generator().manual_seed(seed * 7_919 + global_epoch)  # batch order


# ---- where a phase starts -----------------------------------------------------------------------


@dataclass
class Start:
    """What a phase starts from: fresh, the previous phase's model, or its own checkpoint."""

    split: Split
    norm: Normalizer
    model_config: ModelConfig
    state_dict: dict | None
    parent_uri: str | None  # exact models:/name/version when it came from the registry
    checkpoint: dict | None


def load_phase_data(s: PhaseSettings) -> SequenceData:
    data = load_sequences(s.data_dir, s.n_components, s.n_params)
    if s.max_samples is not None and s.max_samples < data.n_samples:
        data = data.subset(np.arange(s.max_samples))
    if s.max_lag is not None and s.max_lag >= data.seq_len:
        raise ConfigError(f"--max_lag {s.max_lag} must be below the sequence length "
                          f"{data.seq_len} of {s.data_dir}")  # fmt: skip
    return data


def resolve_start(s: PhaseSettings, data: SequenceData, out_dir: Path, resume: bool) -> Start:
    """Phase 1 fits the split and statistics; later phases and resumes reuse the model's own."""
    if resume:
        source = torch.load(latest_checkpoint(out_dir), map_location="cpu", weights_only=True)
        parent_uri = source["continued_from"] or None
    elif s.continues_from:
        parent_uri = tracking.exact_model_uri(s.continues_from)
        hint = None
        if s.phase > 1 and not s.existing_model:
            hint = (f"run phase {s.phase - 1} of {s.strategy} with seed {s.seed} first (seqgen "
                    f"train --strategy {s.strategy} --phase {s.phase - 1} --preset {s.preset} "
                    f"--seed {s.seed})")  # fmt: skip
        source = tracking.load_bundle(parent_uri, hint)
        if not s.existing_model and source["seed"] != s.seed:
            # The phase alias follows whichever seed finished last: take this seed's own.
            parent_uri = tracking.exact_model_uri(s.seed_alias_uri(s.phase - 1))
            source = tracking.load_bundle(parent_uri, hint)
        if not s.existing_model and source["data"]["fingerprint"] != data.fingerprint:
            raise ConfigError(
                f"{parent_uri} was trained on other data (fingerprint "
                f"{source['data']['fingerprint']}, {s.data_dir} has {data.fingerprint}): pass "
                "--existing_model to continue on this data deliberately")  # fmt: skip
    else:
        split = make_split(data.files, s.seed)
        train = split.indices(data.files, "train")
        norm = Normalizer.fit(data.components[train], data.params[train])
        config = ModelConfig(s.n_components, s.n_params, s.hidden_size, s.num_layers, s.dropout)
        return Start(split, norm, config, None, None, None)
    if list(source["data"]["param_names"]) != list(data.param_names):
        raise ConfigError(
            f"{parent_uri or out_dir} was trained on parameters "
            f"{source['data']['param_names']}, the data has {list(data.param_names)}"
        )
    return Start(Split.from_dict(source["split"]), Normalizer.from_dict(source["normalizer"]),
                 ModelConfig(**source["model_config"]), source["state_dict"], parent_uri,
                 source if resume else None)  # fmt: skip


def split_tensors(data: SequenceData, start: Start, device: torch.device) -> dict:
    """{part: (params (N,P), components (N,T,K))}, standardised, on the device."""
    parts = {}
    for name in ("train", "val", "test"):
        idx = start.split.indices(data.files, name)
        params = torch.as_tensor(start.norm.normalize_params(data.params[idx]))
        components = torch.as_tensor(start.norm.normalize_components(data.components[idx]))
        parts[name] = (params.to(device), components.to(device))
    return parts


# ---- bookkeeping across epochs (saved in checkpoints) -------------------------------------------


@dataclass
class Progress:
    best_val: float = float("inf")
    best_epoch: int | None = None
    stale_epochs: int = 0  # epochs since the best validation loss
    nonfinite_in_a_row: int = 0
    history: list = field(default_factory=list)  # training_metrics.csv rows


def stop_reason(s: PhaseSettings, p: Progress, train_loss: float, val_teacher_forced: float,
                grad_norms: list[float]) -> str | None:  # fmt: skip
    """The original's early-stopping criteria, each opt-in. Overfitting compares losses measured
    the same way (teacher-forced): free-running validation would measure exposure bias instead."""
    if s.early_stopping_patience and p.stale_epochs >= s.early_stopping_patience:
        return "validation_plateau"
    if s.overfit_gap is not None and train_loss > 0 and \
            (val_teacher_forced - train_loss) / train_loss > s.overfit_gap:  # fmt: skip
        return "overfitting"
    if s.grad_explosion_norm is not None and grad_norms and max(grad_norms) > s.grad_explosion_norm:
        return "gradient_explosion"
    return None


def csv_row(strategy: str, epoch: int, train: np.ndarray, val: LossResult, test: LossResult,
            lr: float) -> list[float]:  # fmt: skip
    if strategy == "combined":
        return [epoch, *train, *val, *test, lr]
    return [epoch, train[0], val.total, test.total, lr]


# ---- the phase ----------------------------------------------------------------------------------


def train_phase(s: PhaseSettings, resume: bool = False, stop_at_epoch: int | None = None,
                log=print, hint_next: bool = True) -> dict:  # fmt: skip
    """Train one phase; returns a summary (run id, registered model URI, best validation loss)."""
    # Set up: everything that can fail on bad input does so before a run or a folder exists.
    tracking.check_tracking_store()
    out_dir = s.resolved_output_dir()
    data = load_phase_data(s)
    start = resolve_start(s, data, out_dir, resume)
    started_with = start.checkpoint["settings"] if start.checkpoint else s.to_dict()
    if started_with != s.to_dict():
        changed = sorted(k for k, v in s.to_dict().items() if started_with.get(k) != v)
        raise ConfigError(f"--resume continues with the settings the phase started with; "
                          f"these differ: {', '.join(changed)}")  # fmt: skip
    if s.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but this torch build sees no CUDA device")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if s.device == "auto" else s.device)  # fmt: skip
    prepare_output_dir(out_dir, resume)
    precision = choose_precision(device, s.mixed_precision)
    parts = split_tensors(data, start, device)
    (train_params, train_targets), n_train = parts["train"], len(parts["train"][0])
    torch.manual_seed(s.seed)
    model = StreamlinedSequenceGenerator(start.model_config).to(device)
    if start.state_dict is not None:
        model.load_state_dict(start.state_dict)
    loss_fn = make_loss(s.alpha, s.reported_max_lag)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.start_lr, weight_decay=s.weight_decay)
    progress, first = Progress(), 0
    if start.checkpoint is not None:
        optimizer.load_state_dict(start.checkpoint["optimizer"])
        precision.scaler.load_state_dict(start.checkpoint["scaler"])
        progress = Progress(**start.checkpoint["progress"])
        first = start.checkpoint["epoch"] - s.first_epoch + 1
        if first >= s.epochs:
            raise ConfigError(f"--resume: {out_dir} already finished epoch {s.last_epoch}")
    columns = COMBINED_COLUMNS if s.strategy == "combined" else SINGLE_COLUMNS
    batch = s.batch_size * s.grad_accum_steps
    steps_per_epoch = -(-n_train // batch)

    tags = {
        "kind": "phase",
        "strategy": s.strategy,
        "phase": s.phase,
        "seed": s.seed,
        "preset": s.preset,
        "dataset_fingerprint": data.fingerprint,
        "continued_from": start.parent_uri or "",
        "code_version": tracking.code_version(),
        "overrides": json.dumps(s.overrides()),
    }
    run_id = start.checkpoint["run_id"] if start.checkpoint else None
    with tracking.tracked_run(s.run_name, tags, run_id=run_id) as run:
        run_id = run.info.run_id
        settings = s.to_dict()
        tracking.log_params(settings | {"device_used": str(device),
                                        "precision": str(precision.dtype)})  # fmt: skip
        (out_dir / "args.json").write_text(json.dumps(settings, indent=2))
        start.split.save(out_dir / "split.json")
        (out_dir / "normalizer.json").write_text(json.dumps(start.norm.to_dict(), indent=2))
        for name in ("args.json", "split.json", "normalizer.json"):
            tracking.log_artifact(out_dir / name)
        sizes = "/".join(str(len(parts[k][0])) for k in ("train", "val", "test"))
        log(f"[{s.run_name}] {s.strategy} phase {s.phase}, epochs {s.first_epoch}-{s.last_epoch}, "
            f"{sizes} train/val/test, {precision.note}, device {device}, run {run_id}"
            + (f", continuing from {start.parent_uri}" if start.parent_uri else ""))  # fmt: skip
        if start.split.note:
            log(f"[{s.run_name}] {start.split.note}")

        reason, phase_started = "completed", time.perf_counter()
        for epoch in range(first, s.epochs):
            # Train.
            global_epoch, epoch_started = s.first_epoch + epoch, time.perf_counter()
            lr = learning_rate(s.scheduler, epoch, s.epochs, s.start_lr, s.min_lr)
            ratio = 0.0
            if s.teacher_forcing:
                ratio = teacher_forcing_ratio(epoch, s.epochs, s.teacher_forcing_start,
                                              s.teacher_forcing_end)  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = lr
            order = torch.randperm(n_train, generator=seed_epoch(s.seed, global_epoch)).to(device)
            sums, counted, grad_norms = np.zeros(3), 0, []
            for step, chunk in enumerate(order.split(batch)):
                micro = [(train_params[b], train_targets[b]) for b in chunk.split(s.batch_size)]
                r = optimizer_step(model, loss_fn, micro, optimizer, precision, ratio,
                                   s.noise_level, s.clip_grad_norm)  # fmt: skip
                show_progress(f"epoch {global_epoch}", step + 1, steps_per_epoch, epoch_started)
                if not r.finite:
                    progress.nonfinite_in_a_row += 1
                    if progress.nonfinite_in_a_row >= s.max_nonfinite_steps:
                        raise TrainingError(
                            f"{progress.nonfinite_in_a_row} non-finite steps in a row at epoch "
                            f"{global_epoch}: training diverged; the last good checkpoint is in "
                            f"{out_dir} (lower --start_lr or --clip_grad_norm)")  # fmt: skip
                    continue
                progress.nonfinite_in_a_row = 0
                sums += np.array([r.loss, r.mae, r.autocorr]) * len(chunk)
                counted += len(chunk)
                if np.isfinite(r.grad_norm):  # an fp16 overflow step the GradScaler skipped
                    grad_norms.append(r.grad_norm)
            train = sums / counted if counted else np.full(3, np.nan)

            # Evaluate: model selection on the free-running loss, as the model is used.
            val = evaluate_loss(model, loss_fn, *parts["val"], 0.0, precision)
            val_tf = evaluate_loss(model, loss_fn, *parts["val"], 1.0, precision)
            test = evaluate_loss(model, loss_fn, *parts["test"], 0.0, precision)
            seconds = time.perf_counter() - epoch_started

            # Log.
            grad_norm = float(np.mean(grad_norms)) if grad_norms else float("nan")
            tracking.log_metrics({
                "train_loss": train[0], "train_mae": train[1], "train_autocorr": train[2],
                "val_loss": val.total, "val_mae": val.mae, "val_autocorr": val.autocorr,
                "test_loss": test.total, "test_mae": test.mae, "test_autocorr": test.autocorr,
                "val_loss_teacher_forced": val_tf.total, "lr": lr,
                "teacher_forcing_ratio": ratio, "grad_norm": grad_norm, "epoch_seconds": seconds,
                "nonfinite_steps": steps_per_epoch - len(grad_norms),
            }, step=global_epoch)  # fmt: skip
            progress.history.append([float(v) for v in csv_row(s.strategy, global_epoch, train,
                                                               val, test, lr)])  # fmt: skip
            write_csv(out_dir / "training_metrics.csv", columns, progress.history)
            improved = val.total < progress.best_val
            if improved:
                progress.best_val, progress.best_epoch, progress.stale_epochs = (
                    val.total, global_epoch, 0)  # fmt: skip
            else:
                progress.stale_epochs += 1
            eta = (
                (time.perf_counter() - phase_started) / (epoch + 1 - first) * (s.epochs - epoch - 1)
            )
            log(f"[{s.run_name}] epoch {global_epoch}/{s.last_epoch} train {train[0]:.4f} "
                f"val {val.total:.4f} (tf {val_tf.total:.4f}) test {test.total:.4f} lr {lr:.2e} "
                f"tf-ratio {ratio:.3f} |g| {grad_norm:.2f} {seconds:.1f}s ETA {format_eta(eta)}"
                + (" *" if improved else ""))  # fmt: skip

            # Checkpoint.
            bundle = make_bundle(model, s, data, start, global_epoch, val.total, run_id)
            if improved:
                save_atomic(bundle, out_dir / "best_model.pth")
                shutil.copyfile(out_dir / "best_model.pth", out_dir / "best_model_combined.pth")
            pause = stop_at_epoch is not None and stop_at_epoch <= global_epoch < s.last_epoch
            if global_epoch % s.save_every == 0 or epoch == s.epochs - 1 or pause:
                path = out_dir / f"checkpoint_epoch_{global_epoch}.pth"
                save_atomic(bundle | {
                    "optimizer": optimizer.state_dict(), "scaler": precision.scaler.state_dict(),
                    "progress": dataclasses.asdict(progress), "settings": s.to_dict(),
                    "continued_from": start.parent_uri or ""}, path)  # fmt: skip
                tracking.log_artifact(path, "checkpoints")

            if stopped := stop_reason(s, progress, train[0], val_tf.total, grad_norms):
                reason = stopped
                log(f"[{s.run_name}] early stop at epoch {global_epoch}: {reason}")
                break
            if pause:  # KILLED, so a comparison leaves it out until --resume finishes it
                tracking.set_tags({"stop_reason": "paused", "paused_at_epoch": global_epoch})
                tracking.end_run("KILLED")
                log(f"[{s.run_name}] paused after epoch {global_epoch}: continue with --resume")
                return {"run_id": run_id, "paused_at": global_epoch, "output_dir": str(out_dir)}

        # Finish: the final model, the files as artifacts, the best model into the registry.
        save_atomic(bundle, out_dir / "final_model.pth")
        for name in ("training_metrics.csv", "best_model.pth", "final_model.pth",
                     "best_model_combined.pth"):  # fmt: skip
            tracking.log_artifact(out_dir / name)
        parent_version = start.parent_uri.removeprefix("models:/") if start.parent_uri else ""
        version = tracking.log_and_register_model(
            out_dir / "best_model.pth", s.registered_model,
            [f"phase-{s.phase}", f"phase-{s.phase}-s{s.seed}"],
            {"run_id": run_id, "phase": s.phase, "seed": s.seed, "strategy": s.strategy,
             "preset": s.preset, "val_loss": progress.best_val, "best_epoch": progress.best_epoch,
             "continued_from": parent_version})  # fmt: skip
        tracking.set_tags({"stop_reason": reason, "model_version": version, "paused_at_epoch": ""})
        tracking.log_metrics({"best_val_loss": progress.best_val, "best_epoch": progress.best_epoch,
                              "phase_seconds": time.perf_counter() - phase_started,
                              "peak_memory_mb": peak_memory_mb(device)}, global_epoch)  # fmt: skip
    model_uri = f"models:/{s.registered_model}/{version}"
    log(
        f"[{s.run_name}] done: best val {progress.best_val:.4f} at epoch {progress.best_epoch}; "
        f"run {run_id}; registered {model_uri} (alias phase-{s.phase}); outputs in {out_dir}"
    )
    if s.phase < 5 and hint_next:
        log(next_phase_hint(s, model_uri))
    return {"run_id": run_id, "model_uri": model_uri, "version": version,
            "best_val": progress.best_val, "best_epoch": progress.best_epoch,
            "output_dir": str(out_dir), "stop_reason": reason}  # fmt: skip


# ---- files and messages -------------------------------------------------------------------------


def make_bundle(model, s: PhaseSettings, data: SequenceData, start: Start, epoch: int,
                val_loss: float, run_id: str) -> dict:  # fmt: skip
    """Everything needed to rebuild, continue or use the model anywhere (weights_only-safe)."""
    return {
        "format": tracking.BUNDLE_FORMAT,
        "model_config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "normalizer": start.norm.to_dict(),
        "data": {"step_name": data.step_name, "component_names": list(data.component_names),
                 "param_names": list(data.param_names), "steps": data.steps.tolist(),
                 "fingerprint": data.fingerprint, "data_dir": str(s.data_dir)},
        "split": start.split.to_dict(),
        "strategy": s.strategy, "phase": s.phase, "seed": s.seed, "preset": s.preset,
        "epoch": epoch, "val_loss": val_loss, "run_id": run_id,
    }  # fmt: skip


def save_atomic(obj, path: Path) -> None:
    """Write then rename, so a crash never leaves a half-written model where a good one was."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def write_csv(path: Path, columns: list[str], rows: list[list[float]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[int(r[0]), *[f"{v:.6g}" for v in r[1:]]] for r in rows])
    tmp.replace(path)


def prepare_output_dir(path: Path, resume: bool) -> None:
    """Create and check the output folder before anything is tracked."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output folder {path} cannot be written: {e.strerror or e}") from None
    if not resume and any(path.glob("*.pth")):
        raise ConfigError(f"output folder {path} already holds a trained phase: pass --resume to "
                          "continue it, or --output_dir for a new folder")  # fmt: skip


def latest_checkpoint(path: Path) -> Path:
    found = sorted(path.glob("checkpoint_epoch_*.pth"), key=lambda p: int(p.stem.split("_")[-1]))
    if not found:
        raise ConfigError(f"--resume: no checkpoint_epoch_N.pth in {path} to resume from")
    return found[-1]


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory on CUDA, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def next_phase_hint(s: PhaseSettings, model_uri: str) -> str:
    """The command that continues with the next phase, as the original batch files printed."""
    # Carry over what the command line changed, except what the table sets anew for each phase.
    skip = table_keys() | {"seed", "existing_model", "output_dir"}
    carried = {k: str(v).lower() if isinstance(v, bool) else v for k, v in s.overrides().items()
               if k not in skip}  # fmt: skip
    extra = "".join(f" -P {k}={v}" for k, v in carried.items())
    flags = "".join(f" --{k} {v}" for k, v in carried.items())
    project = PHASES_FILE.parent.parent
    here = "." if Path.cwd().resolve() == project else str(project)
    return (f"Next phase: mlflow run {here} -e {s.strategy} -P phase={s.phase + 1} "
            f"-P preset={s.preset} -P seed={s.seed}{extra} --env-manager local\n"
            f"        or: seqgen train --strategy {s.strategy} --phase {s.phase + 1} "
            f"--preset {s.preset} --seed {s.seed}{flags} "
            f"--existing_model {model_uri}")  # fmt: skip


def format_eta(seconds: float) -> str:
    m, sec = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def show_progress(prefix: str, done: int, total: int, started: float) -> None:
    """A progress bar over the batches of an epoch, on a terminal only."""
    if not sys.stderr.isatty():
        return
    width, rate = 24, done / max(time.perf_counter() - started, 1e-9)
    bar = "#" * int(width * done / total) + "." * (width - int(width * done / total))
    sys.stderr.write(f"\r{prefix} [{bar}] {done}/{total} batches ({rate:.1f}/s)")
    if done == total:
        sys.stderr.write("\r" + " " * (len(prefix) + width + 40) + "\r")
    sys.stderr.flush()
