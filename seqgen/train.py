"""Training one phase of one strategy: set up, then each epoch train, evaluate, log, checkpoint."""

from __future__ import annotations

import csv
import json
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seqgen import tracking
from seqgen.config import ConfigError, PhaseSettings
from seqgen.data import Normalizer, SequenceData, load_sequences
from seqgen.losses import LossResult, make_loss
from seqgen.model import ModelConfig, StreamlinedSequenceGenerator
from seqgen.schedules import learning_rate, teacher_forcing_ratio
from seqgen.split import Split, make_split

EVAL_BATCH = 512
CSV_COLUMNS = {  # the original scripts' training_metrics.csv, column for column
    "single": ["Epoch", "Train Loss", "Validation Loss", "Test Loss", "Learning Rate"],
    "combined": [
        "Epoch",
        "Train Loss",
        "Train MAE Loss",
        "Train Autocorr Loss",
        "Validation Loss",
        "Validation MAE Loss",
        "Validation Autocorr Loss",
        "Test Loss",
        "Test MAE Loss",
        "Test Autocorr Loss",
        "Learning Rate",
    ],
}


class TrainingError(RuntimeError):
    """Training that cannot go on (diverged, interrupted state); the message says what to do."""


@dataclass
class Precision:
    """Mixed precision for one device: an autocast context and a GradScaler (fp16 only)."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    note: str

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def choose_precision(device: torch.device, enabled: bool) -> Precision:
    if not enabled:
        return Precision(
            device,
            None,
            torch.amp.GradScaler(device.type, enabled=False),
            "mixed precision off (--no_mixed_precision)",
        )
    if device.type == "cuda":
        return Precision(
            device,
            torch.float16,
            torch.amp.GradScaler("cuda"),
            "mixed precision: CUDA fp16 autocast with GradScaler",
        )
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return Precision(
            device,
            torch.bfloat16,
            torch.amp.GradScaler("cpu", enabled=False),
            "mixed precision: CPU bf16 autocast",
        )
    return Precision(
        device,
        None,
        torch.amp.GradScaler("cpu", enabled=False),
        "mixed precision off: this CPU has no bf16 support",
    )


@dataclass
class StepResult:
    loss: float
    mae: float
    autocorr: float
    grad_norm: float
    finite: bool


def optimizer_step(
    model,
    loss_fn,
    micro_batches,
    optimizer,
    precision: Precision,
    ratio: float,
    noise_level: float,
    clip_grad_norm: float,
) -> StepResult:
    """One optimiser step over `micro_batches` [(params (B,P), targets (B,T,K))] (accumulated)."""
    optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(3)
    for params, targets in micro_batches:
        with precision.autocast():
            result = loss_fn(model(params, targets, ratio, noise_level), targets)
        precision.scaler.scale(result.total / len(micro_batches)).backward()
        totals += torch.stack([r.detach().float().cpu() for r in result]) / len(micro_batches)
    precision.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm).item()
    finite = bool(torch.isfinite(totals).all()) and (
        np.isfinite(grad_norm) or precision.scaler.is_enabled()
    )  # fp16 overflow: scaler skips
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
    return LossResult(*(sums / len(params)))


def seed_epoch(seed: int, global_epoch: int) -> torch.Generator:
    """Every random draw of an epoch derives from (seed, epoch): a resume replays it exactly."""
    torch.manual_seed(seed * 1_000_003 + global_epoch)
    return torch.Generator().manual_seed(seed * 7_919 + global_epoch)


def make_bundle(
    model,
    s: PhaseSettings,
    data: SequenceData,
    norm: Normalizer,
    split: Split,
    epoch: int,
    val_loss: float,
) -> dict:
    """Everything needed to rebuild, continue or use the model anywhere (weights_only-safe)."""
    return {
        "format": tracking.BUNDLE_FORMAT,
        "model_config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "normalizer": norm.to_dict(),
        "data": {
            "step_name": data.step_name,
            "component_names": list(data.component_names),
            "param_names": list(data.param_names),
            "steps": data.steps.tolist(),
            "fingerprint": data.fingerprint,
            "data_dir": str(s.data_dir),
        },
        "split": split.to_dict(),
        "strategy": s.strategy,
        "phase": s.phase,
        "seed": s.seed,
        "preset": s.preset,
        "epoch": epoch,
        "val_loss": val_loss,
    }


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
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
        raise ConfigError(
            f"output folder {path} already holds a trained phase: pass --resume to "
            "continue it, or --output_dir for a new folder"
        )


def latest_checkpoint(path: Path) -> Path:
    found = sorted(path.glob("checkpoint_epoch_*.pth"), key=lambda p: int(p.stem.split("_")[-1]))
    if not found:
        raise ConfigError(f"--resume: no checkpoint_epoch_N.pth in {path} to resume from")
    return found[-1]


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _progress(prefix: str, done: int, total: int, started: float) -> None:
    if not sys.stderr.isatty():
        return
    width = 24
    filled = int(width * done / total)
    rate = done / max(time.perf_counter() - started, 1e-9)
    sys.stderr.write(
        f"\r{prefix} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} batches ({rate:.1f}/s)"
    )
    sys.stderr.flush()
    if done == total:
        sys.stderr.write("\r" + " " * (len(prefix) + width + 40) + "\r")


def train_phase(
    s: PhaseSettings, resume: bool = False, stop_at_epoch: int | None = None, log=print
) -> dict:
    """Train one phase; returns a summary (run id, model version, best validation loss...)."""
    # ---- set up: everything that can fail does so before a run exists --------------------------
    tracking.check_tracking_store()
    out_dir = s.resolved_output_dir()
    prepare_output_dir(out_dir, resume)
    data = load_sequences(s.data_dir, s.n_components, s.n_params)
    if s.max_samples is not None and s.max_samples < data.n_samples:
        data = data.subset(np.arange(s.max_samples))
    if s.max_lag is not None and s.max_lag >= data.seq_len:
        raise ConfigError(
            f"--max_lag {s.max_lag} must be below the sequence length "
            f"{data.seq_len} of {s.data_dir}"
        )

    checkpoint = None
    parent_uri = s.continues_from
    parent = None
    if resume:
        checkpoint = torch.load(latest_checkpoint(out_dir), map_location="cpu", weights_only=True)
        parent_uri = checkpoint["continued_from"] or None
    elif parent_uri:
        hint = (
            f"run phase {s.phase - 1} of {s.strategy} first "
            f"(seqgen train --strategy {s.strategy} --phase {s.phase - 1} --preset {s.preset})"
            if s.phase > 1 and not s.existing_model
            else None
        )
        parent = tracking.load_bundle(parent_uri, hint)

    source = checkpoint or parent
    if source is not None:  # continue with the split and statistics the model was trained on
        split, norm = Split.from_dict(source["split"]), Normalizer.from_dict(source["normalizer"])
        model_config = ModelConfig(**source["model_config"])
        if list(source["data"]["param_names"]) != list(data.param_names):
            raise ConfigError(
                f"{parent_uri} was trained on parameters "
                f"{source['data']['param_names']}, the data has {data.param_names}"
            )
    else:
        split = make_split(data.files, s.seed)
        idx = split.indices(data.files, "train")
        norm = Normalizer.fit(data.components[idx], data.params[idx])
        model_config = ModelConfig(
            s.n_components, s.n_params, s.hidden_size, s.num_layers, s.dropout
        )
    parts = {}
    for name in ("train", "val", "test"):
        idx = split.indices(data.files, name)
        parts[name] = (
            torch.as_tensor(norm.normalize_params(data.params[idx])),
            torch.as_tensor(norm.normalize_components(data.components[idx])),
        )

    device = torch.device(
        "cuda"
        if s.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if s.device == "auto"
        else s.device
    )
    precision = choose_precision(device, s.mixed_precision)
    parts = {k: (p.to(device), y.to(device)) for k, (p, y) in parts.items()}
    torch.manual_seed(s.seed)
    model = StreamlinedSequenceGenerator(model_config).to(device)
    if source is not None:
        model.load_state_dict(source["state_dict"])
    loss_fn = make_loss(s.strategy, s.alpha, s.max_lag)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.start_lr, weight_decay=s.weight_decay)
    start = 0
    best_val, best_epoch, stale, history = float("inf"), None, 0, []
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        precision.scaler.load_state_dict(checkpoint["scaler"])
        start = checkpoint["epoch"] - s.first_epoch + 1
        if start >= s.epochs:
            raise ConfigError(f"--resume: {out_dir} already finished epoch {checkpoint['epoch']}")
        best_val, best_epoch = checkpoint["best_val"], checkpoint["best_epoch"]
        stale, history = checkpoint["stale_epochs"], checkpoint["history"]
    csv_kind = "combined" if s.strategy == "combined" else "single"
    parent_version = (
        tracking.model_version_of(parent_uri)
        if parent_uri and not resume
        else (checkpoint["continued_from_version"] if checkpoint else None)
    )

    tags = {
        "kind": "phase",
        "strategy": s.strategy,
        "phase": str(s.phase),
        "seed": str(s.seed),
        "preset": s.preset,
        "dataset_fingerprint": data.fingerprint,
        "continued_from": parent_uri or "",
        "code_version": tracking.code_version(),
    }
    with tracking.phase_run(s.run_name, tags, run_id=checkpoint["run_id"] if checkpoint else None):
        run_id = tracking.active_run_id()
        settings = s.to_dict() | {"existing_model": parent_uri}
        tracking.log_params(settings | {"device": str(device), "precision": str(precision.dtype)})
        (out_dir / "args.json").write_text(json.dumps(settings, indent=2))
        split.save(out_dir / "split.json")
        (out_dir / "normalizer.json").write_text(json.dumps(norm.to_dict(), indent=2))
        for name in ("args.json", "split.json", "normalizer.json"):
            tracking.log_artifact(out_dir / name)
        log(
            f"[{s.run_name}] {s.strategy} phase {s.phase}: epochs {s.first_epoch}-{s.last_epoch}, "
            f"{len(parts['train'][0])}/{len(parts['val'][0])}/{len(parts['test'][0])} "
            f"train/val/test, {precision.note}, device {device}, run {run_id}"
            + (f", continuing from {parent_uri}" if parent_uri else "")
        )
        if split.note:
            log(f"[{s.run_name}] {split.note}")

        # ---- epochs ----------------------------------------------------------------------------
        stop_reason, nonfinite_run, phase_started = "completed", 0, time.perf_counter()
        n_train = len(parts["train"][0])
        steps_per_epoch = -(-n_train // (s.batch_size * s.grad_accum_steps))
        for epoch in range(start, s.epochs):
            global_epoch = s.first_epoch + epoch
            epoch_started = time.perf_counter()
            lr = learning_rate(s.scheduler, epoch, s.epochs, s.start_lr, s.min_lr)
            ratio = (
                teacher_forcing_ratio(
                    epoch, s.epochs, s.teacher_forcing_start, s.teacher_forcing_end
                )
                if s.teacher_forcing
                else 0.0
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            order = torch.randperm(n_train, generator=seed_epoch(s.seed, global_epoch))

            model.train()
            sums, norms, skipped = np.zeros(3), [], 0
            for step in range(steps_per_epoch):
                chunk = order[
                    step * s.batch_size * s.grad_accum_steps : (step + 1)
                    * s.batch_size
                    * s.grad_accum_steps
                ].to(device)
                micro = [
                    (parts["train"][0][b], parts["train"][1][b]) for b in chunk.split(s.batch_size)
                ]
                r = optimizer_step(
                    model,
                    loss_fn,
                    micro,
                    optimizer,
                    precision,
                    ratio,
                    s.noise_level,
                    s.clip_grad_norm,
                )
                if not r.finite:
                    skipped += 1
                    nonfinite_run += 1
                    if nonfinite_run >= s.max_nonfinite_steps:
                        raise TrainingError(
                            f"{nonfinite_run} non-finite steps in a row at epoch {global_epoch}: "
                            f"training diverged; the last good checkpoint is in {out_dir} (lower "
                            "--start_lr or --clip_grad_norm)"
                        )
                    continue
                nonfinite_run = 0
                sums += np.array([r.loss, r.mae, r.autocorr]) * len(chunk)
                norms.append(r.grad_norm)
                _progress(f"epoch {global_epoch}", step + 1, steps_per_epoch, epoch_started)
            counted = max(1, n_train - skipped * s.batch_size * s.grad_accum_steps)
            train = sums / counted
            val = evaluate_loss(model, loss_fn, *parts["val"], 0.0, precision)
            val_tf = evaluate_loss(model, loss_fn, *parts["val"], 1.0, precision)
            test = evaluate_loss(model, loss_fn, *parts["test"], 0.0, precision)
            seconds = time.perf_counter() - epoch_started
            grad_norm = float(np.mean(norms)) if norms else float("nan")
            metrics = {
                "train_loss": train[0],
                "train_mae": train[1],
                "train_autocorr": train[2],
                "val_loss": val.total,
                "val_mae": val.mae,
                "val_autocorr": val.autocorr,
                "test_loss": test.total,
                "test_mae": test.mae,
                "test_autocorr": test.autocorr,
                "val_loss_teacher_forced": val_tf.total,
                "lr": lr,
                "teacher_forcing_ratio": ratio,
                "grad_norm": grad_norm,
                "epoch_seconds": seconds,
                "nonfinite_steps": skipped,
            }
            tracking.log_metrics(metrics, step=global_epoch)
            if csv_kind == "combined":
                row = [
                    *train,
                    val.total,
                    val.mae,
                    val.autocorr,
                    test.total,
                    test.mae,
                    test.autocorr,
                    lr,
                ]
            else:
                row = [train[0], val.total, test.total, lr]
            history.append([global_epoch] + [float(v) for v in row])  # plain floats: weights_only
            write_csv(out_dir / "training_metrics.csv", CSV_COLUMNS[csv_kind], history)

            val_loss = float(val.total)
            improved = val_loss < best_val
            if improved:
                best_val, best_epoch, stale = val_loss, global_epoch, 0
                bundle = make_bundle(model, s, data, norm, split, global_epoch, val_loss)
                save_atomic(bundle, out_dir / "best_model.pth")
                shutil.copyfile(out_dir / "best_model.pth", out_dir / "best_model_combined.pth")
            else:
                stale += 1
            done = epoch + 1 - start
            eta = (time.perf_counter() - phase_started) / done * (s.epochs - epoch - 1)
            log(
                f"[{s.run_name}] epoch {global_epoch}/{s.last_epoch} train {train[0]:.4f} "
                f"val {val_loss:.4f} (tf {float(val_tf.total):.4f}) test {float(test.total):.4f} "
                f"lr {lr:.2e} tf-ratio {ratio:.3f} |g| {grad_norm:.2f} {seconds:.1f}s "
                f"ETA {_fmt_eta(eta)}" + (" *" if improved else "")
            )

            if global_epoch % s.save_every == 0 or epoch == s.epochs - 1:
                path = out_dir / f"checkpoint_epoch_{global_epoch}.pth"
                save_atomic(
                    make_bundle(model, s, data, norm, split, global_epoch, val_loss)
                    | {
                        "optimizer": optimizer.state_dict(),
                        "scaler": precision.scaler.state_dict(),
                        "best_val": best_val,
                        "best_epoch": best_epoch,
                        "stale_epochs": stale,
                        "history": history,
                        "run_id": run_id,
                        "continued_from": parent_uri or "",
                        "continued_from_version": parent_version or "",
                    },
                    path,
                )
                tracking.log_artifact(path, "checkpoints")

            if s.early_stopping_patience and stale >= s.early_stopping_patience:
                stop_reason = "validation_plateau"
            elif (
                s.overfit_gap is not None
                and train[0] > 0
                and (val_loss - train[0]) / train[0] > s.overfit_gap
            ):
                stop_reason = "overfitting"
            elif s.grad_explosion_norm is not None and norms and max(norms) > s.grad_explosion_norm:
                stop_reason = "gradient_explosion"
            elif (
                stop_at_epoch is not None and global_epoch >= stop_at_epoch and epoch < s.epochs - 1
            ):
                tracking.set_tags({"stop_reason": "paused", "paused_at_epoch": global_epoch})
                log(f"[{s.run_name}] paused after epoch {global_epoch}: continue with --resume")
                return {"run_id": run_id, "paused_at": global_epoch, "output_dir": str(out_dir)}
            if stop_reason != "completed":
                log(f"[{s.run_name}] early stop at epoch {global_epoch}: {stop_reason}")
                break

        # ---- finish ------------------------------------------------------------------------------
        save_atomic(
            make_bundle(model, s, data, norm, split, global_epoch, val_loss),
            out_dir / "final_model.pth",
        )
        for name in (
            "training_metrics.csv",
            "best_model.pth",
            "final_model.pth",
            "best_model_combined.pth",
        ):
            tracking.log_artifact(out_dir / name)
        version = tracking.log_and_register_model(
            out_dir / "best_model.pth",
            s.registered_model,
            f"phase-{s.phase}",
            {
                "run_id": run_id,
                "phase": s.phase,
                "seed": s.seed,
                "strategy": s.strategy,
                "preset": s.preset,
                "val_loss": best_val,
                "best_epoch": best_epoch,
                "continued_from": parent_version or "",
            },
        )
        tracking.set_tags({"stop_reason": stop_reason, "model_version": version})
        tracking.log_metrics(
            {
                "best_val_loss": best_val,
                "best_epoch": best_epoch,
                "phase_seconds": time.perf_counter() - phase_started,
                "peak_memory_mb": peak_memory_mb(device),
            },
            global_epoch,
        )
    model_uri = f"models:/{s.registered_model}/{version}"
    log(
        f"[{s.run_name}] done: best val {best_val:.4f} at epoch {best_epoch}; run {run_id}; "
        f"registered {model_uri} (alias phase-{s.phase}); outputs in {out_dir}"
    )
    if s.phase < 5:
        log(
            f"Next phase: mlflow run . -e {s.strategy} -P phase={s.phase + 1} "
            f"-P preset={s.preset} -P seed={s.seed} --env-manager local\n"
            f"        or: seqgen train --strategy {s.strategy} --phase {s.phase + 1} "
            f"--preset {s.preset} --seed {s.seed} --existing_model {model_uri}"
        )
    return {
        "run_id": run_id,
        "model_uri": model_uri,
        "version": version,
        "best_val": best_val,
        "best_epoch": best_epoch,
        "output_dir": str(out_dir),
        "stop_reason": stop_reason,
    }


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory on CUDA, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_csv(path: Path, columns: list[str], rows: list[list[float]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows([[int(r[0]), *[f"{float(v):.6g}" for v in r[1:]]] for r in rows])
    tmp.replace(path)
