"""Training one phase of one strategy. Start reading at `train_phase`: prepare the phase, ask the
run keeper where it stands, then train epoch after epoch and hand each to the keeper, which owns
everything the tracking store and the phase's folder are told (seqgen/runs/keeper.py). This file
holds only the machine learning."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from seqgen.config import PhaseSettings
from seqgen.data.sequences import SequenceData
from seqgen.errors import TrainingError
from seqgen.log import progress_bar
from seqgen.model.bundle import Checkpoint
from seqgen.model.generator import StreamlinedSequenceGenerator
from seqgen.runs.keeper import PhaseResult, RunKeeper, RunOptions, Snapshot
from seqgen.training.epochs import EpochRecord, Losses, Progress, stop_reason
from seqgen.training.losses import make_loss
from seqgen.training.schedules import learning_rate, teacher_forcing_ratio
from seqgen.training.start import Setup, prepare
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

log = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """What the epochs work on."""

    model: StreamlinedSequenceGenerator
    optimizer: torch.optim.Optimizer
    precision: Precision
    progress: Progress
    graphs: StepGraphs | None = None  # CUDA: each training step replayed as a CUDA graph

    def snapshot(self) -> Snapshot:
        weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return Snapshot(weights, self.optimizer.state_dict(), self.precision.scaler.state_dict())


def train_phase(
    settings: PhaseSettings, options: RunOptions | None = None, data: SequenceData | None = None
) -> PhaseResult:
    """Train one phase, or take it up where it stopped; a registered phase is not trained again.
    data: the samples already loaded (a cluster task gets them from its driver)."""
    setup = prepare(settings, data)
    keeper = RunKeeper.find(setup, options or RunOptions())
    if keeper.skipped is not None:
        return keeper.skipped
    setup.load_tensors()
    state = training_state(setup, keeper.checkpoint)
    loss_fn = make_loss(settings.alpha, settings.max_lag)
    with keeper.running(state.precision.note, state.progress):
        state.graphs = step_graphs(setup, state, loss_fn)
        for epoch in state.progress.epochs_left(settings.epochs):
            record = run_epoch(setup, state, loss_fn, epoch)
            improved = state.progress.add(record)
            state.progress.stopped = stop_reason(settings, state.progress, record)
            keeper.epoch_done(state.progress, state.snapshot(), improved)
            if state.progress.stopped:
                break
            if keeper.should_pause(record.epoch):
                return keeper.pause(state.progress)
        return keeper.finish(state.progress, state.snapshot(), setup.device)


def training_state(setup: Setup, checkpoint: Checkpoint | None) -> TrainingState:
    """The model (new, the parent's weights or the checkpoint's), AdamW and the precision."""
    settings = setup.settings
    precision = choose_precision(setup.device, settings.mixed_precision)
    torch.manual_seed(settings.seed)
    model = StreamlinedSequenceGenerator(setup.start.model_config).to(setup.device)
    if setup.start.state_dict is not None:
        model.load_state_dict(setup.start.state_dict)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.start_lr, weight_decay=settings.weight_decay
    )
    progress = Progress()
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint.optimizer)
        if note := load_scaler_state(precision.scaler, checkpoint.scaler):
            log.info(f"[{settings.run_name}] {note}")
        progress = Progress.from_dict(checkpoint.progress)
    return TrainingState(model, optimizer, precision, progress)


def step_graphs(setup: Setup, state: TrainingState, loss_fn) -> StepGraphs | None:
    settings = setup.settings
    if not cuda_graphs_wanted(setup.device, settings.grad_accum_steps):
        return None
    log.info(f"[{settings.run_name}] CUDA graphs: one replay per step (SEQGEN_CUDA_GRAPHS=0: off)")
    return StepGraphs(state.model, loss_fn, state.precision, settings.noise_level)


def run_epoch(setup: Setup, state: TrainingState, loss_fn, epoch: int) -> EpochRecord:
    """Train one epoch (0-based within the phase), then evaluate."""
    settings, global_epoch, started = setup.settings, setup.global_epoch(epoch), time.perf_counter()
    lr = learning_rate(
        setup.start.schedule, epoch, settings.epochs, settings.start_lr, settings.min_lr
    )
    ratio = 0.0
    if settings.teacher_forcing:
        ratio = teacher_forcing_ratio(
            epoch, settings.epochs, settings.teacher_forcing_start, settings.teacher_forcing_end
        )
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    if state.graphs is not None:
        state.graphs.new_epoch(ratio)
    train, grad_norms, skipped = train_steps(setup, state, loss_fn, global_epoch, ratio)

    # Evaluate: model selection on the free-running loss, as the model is used.
    val, test = setup.parts["val"], setup.parts["test"]
    return EpochRecord(
        epoch=global_epoch,
        train=train,
        val=Losses(*evaluate_loss(state.model, loss_fn, *val, 0.0, state.precision)),
        test=Losses(*evaluate_loss(state.model, loss_fn, *test, 0.0, state.precision)),
        val_teacher_forced=evaluate_loss(state.model, loss_fn, *val, 1.0, state.precision).total,
        lr=lr,
        teacher_forcing_ratio=ratio,
        grad_norm=float(np.mean(grad_norms)) if grad_norms else float("nan"),
        max_grad_norm=float(np.max(grad_norms)) if grad_norms else float("nan"),
        seconds=time.perf_counter() - started,
        nonfinite_steps=skipped,
    )


def train_steps(
    setup: Setup, state: TrainingState, loss_fn, global_epoch: int, ratio: float
) -> tuple[Losses, list[float], int]:
    """One pass over the training split in an order drawn from (seed, epoch): the mean losses,
    the pre-clip gradient norms of the finite steps, and how many steps were skipped."""
    settings = setup.settings
    params, targets = setup.parts["train"]
    batch = settings.batch_size * settings.grad_accum_steps
    order = torch.randperm(len(params), generator=seed_epoch(settings.seed, global_epoch))
    chunks = order.to(setup.device).split(batch)
    sums, counted, grad_norms = np.zeros(3), 0, []
    for chunk in progress_bar(chunks, f"epoch {global_epoch}"):
        micro = [(params[b], targets[b]) for b in chunk.split(settings.batch_size)]
        r = optimizer_step(
            state.model, loss_fn, micro, state.optimizer, state.precision, ratio,
            settings.noise_level, settings.clip_grad_norm, state.graphs,
        )  # fmt: skip
        if not r.finite:
            state.progress.nonfinite_in_a_row += 1
            if state.progress.nonfinite_in_a_row >= settings.max_nonfinite_steps:
                raise TrainingError(
                    f"{state.progress.nonfinite_in_a_row} non-finite steps in a row at epoch "
                    f"{global_epoch}: training diverged; the last good checkpoint is in "
                    f"{setup.out_dir} (lower --start_lr or --clip_grad_norm)"
                )
            continue
        state.progress.nonfinite_in_a_row = 0
        sums += np.array([r.loss, r.mae, r.autocorr]) * len(chunk)
        counted += len(chunk)
        if np.isfinite(r.grad_norm):  # not an fp16 overflow step the GradScaler skipped
            grad_norms.append(r.grad_norm)
    train = Losses(*map(float, sums / counted)) if counted else Losses(np.nan, np.nan, np.nan)
    return train, grad_norms, len(chunks) - len(grad_norms)
