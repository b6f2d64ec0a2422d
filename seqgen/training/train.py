"""Training phases. Start reading at `train_phases`: prepare each phase, ask each one's run keeper
where it stands, then train them side by side as one stacked model (seqgen/model/stacked.py),
epoch after epoch, handing each member's epoch to its keeper, which owns everything the tracking
store and the phase's folder are told (seqgen/runs/keeper.py). `seqgen train` is a stack of one.
This file holds only the machine learning.

A member is a phase of one chain with everything a chain has: its own settings (loss weights, lags,
noise, clipping, learning-rate values and schedule, teacher forcing, weight decay), its own data
split, order and random draws from (seed, epoch), its own optimiser state, early stopping (a
member that stops is frozen while the others go on) and its own run.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from seqgen.config import PhaseSettings
from seqgen.data.sequences import SequenceData
from seqgen.errors import ConfigError, TrainingError
from seqgen.log import progress_bar
from seqgen.model.bundle import Bundle, Checkpoint
from seqgen.model.generator import StreamlinedSequenceGenerator
from seqgen.model.stacked import StackedGenerators
from seqgen.runs.keeper import PhaseResult, RunKeeper, RunOptions, Snapshot, lease_holders
from seqgen.training.epochs import EpochRecord, Losses, Progress, stop_reason
from seqgen.training.losses import Objective
from seqgen.training.schedules import learning_rate, teacher_forcing_ratio
from seqgen.training.stacked_step import (
    StackedAdamW,
    StackedPrecision,
    StackedStepGraphs,
    StackedStepResult,
    evaluate_stacked,
    member_tensor,
    stacked_precision,
    stacked_step,
)
from seqgen.training.start import Setup, prepare
from seqgen.training.step import (
    choose_precision,
    graph_capture,
    order_generator,
    sampling_generator,
)

log = logging.getLogger(__name__)

# Settings every member of a stack shares: the model's shape, the batches, the device.
STACK_KEYS = (
    "cell", "hidden_size", "num_layers", "batch_size", "grad_accum_steps", "mixed_precision",
)  # fmt: skip


@dataclass
class TrainingStack:
    """What the epochs work on: the members' weights, optimiser and precision, and each
    member's progress and split (params (M,N,P), components (M,N,T,K) per part)."""

    model: StackedGenerators
    optimizer: StackedAdamW
    precision: StackedPrecision
    progress: list[Progress]
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]]
    graphs: StackedStepGraphs | None = None  # CUDA: each training step replayed as a CUDA graph

    def epochs_left(self, setup: Setup, m: int) -> bool:
        return len(self.progress[m].epochs_left(setup.settings.epochs)) > 0

    def snapshot(self, m: int) -> Snapshot:
        weights = {k: v.cpu() for k, v in self.model.member_state_dict(m).items()}
        scaler = self.precision.scaler.member_state_dict(m)
        return Snapshot(weights, self.optimizer.member_state_dict(m), scaler)

    def member(self, m: int) -> MemberState:
        return MemberState(self, m)


@dataclass
class MemberState:
    """Member m's live state, for its keeper to copy when it writes files (keeper.TrainingState)."""

    stack: TrainingStack
    m: int

    def weights(self) -> dict[str, torch.Tensor]:
        state = self.stack.model.member_state_dict(self.m)
        return {k: v.detach().clone() for k, v in state.items()}

    def snapshot(self) -> Snapshot:
        return self.stack.snapshot(self.m)


def train_phase(
    settings: PhaseSettings, options: RunOptions | None = None, data: SequenceData | None = None
) -> PhaseResult:
    """Train one phase, or take it up where it stopped; a registered phase is not trained again.
    data: the samples already loaded (a cluster task gets them from its driver)."""
    return train_phases([settings], options, data)[0]


def train_phases(
    settings: list[PhaseSettings],
    options: RunOptions | None = None,
    data: SequenceData | None = None,
    parents: list[Bundle | None] | None = None,
) -> list[PhaseResult]:
    """Train phases of one model shape side by side as one stacked model, each in its own run;
    registered ones are skipped, interrupted ones go on from their own checkpoints. parents:
    the models the phases continue, in memory (a study's previous round), else read from the
    store."""
    options = options or RunOptions()
    check_stackable(settings)
    parents = parents or [None] * len(settings)
    setups = [prepare(settings[0], data, parents[0])]  # checks the store, finds the experiment
    exp_id = setups[0].experiment_id
    setups += [prepare(s, data, p, exp_id) for s, p in zip(settings[1:], parents[1:], strict=True)]
    keepers = [RunKeeper.find(setup, options) for setup in setups]
    results: dict[int, PhaseResult] = {}
    results |= {i: k.skipped for i, k in enumerate(keepers) if k.skipped is not None}
    live = [i for i in range(len(setups)) if i not in results]
    if live:
        trained = train_stack([setups[i] for i in live], [keepers[i] for i in live])
        results |= dict(zip(live, trained, strict=True))
    return [results[i] for i in range(len(setups))]


def train_stack(setups: list[Setup], keepers: list[RunKeeper]) -> list[PhaseResult]:
    """Epochs of every member until each has finished, stopped early or paused."""
    for setup in setups:
        setup.load_tensors()
    stack = training_stack(setups, [k.checkpoint for k in keepers])
    loss_fn = Objective([s.settings.weights for s in setups], [s.settings.max_lag for s in setups])
    results: dict[int, PhaseResult] = {}
    with ExitStack() as running:
        for m, keeper in enumerate(keepers):
            running.enter_context(keeper.running(stack.precision.note, stack.progress[m]))
        stack.graphs = step_graphs(setups[0], stack, loss_fn)
        while active := [
            m for m, setup in enumerate(setups) if m not in results and stack.epochs_left(setup, m)
        ]:
            records, diverged = run_epoch(setups, stack, loss_fn, active)
            for m, error in diverged.items():
                if len(setups) == 1:
                    raise error  # `seqgen train`: the error itself
                results[m] = keepers[m].fail(error, stack.progress[m])  # the others go on
            for m, record in records.items():
                progress = stack.progress[m]
                improved = progress.add(record)
                progress.stopped = stop_reason(setups[m].settings, progress, record)
                keepers[m].epoch_done(progress, stack.member(m), improved)
                if keepers[m].should_pause(record.epoch) and not progress.stopped:
                    results[m] = keepers[m].pause(progress)
        ending = [m for m in range(len(keepers)) if m not in results]
        leases = lease_holders([keepers[m] for m in ending])  # one read for the members' ends
        for m, lease in zip(ending, leases, strict=True):
            snapshot, device = stack.snapshot(m), setups[m].device
            results[m] = keepers[m].finish(stack.progress[m], snapshot, device, lease)
        runs = running.pop_all()  # the runs stay open until their records have landed

    def land() -> None:
        with runs:  # a landing that fails ends the runs as training errors do
            for m in ending:
                keepers[m].land()

    landings = keepers[0].options.landings
    if landings is None:
        land()
    else:
        landings.submit(land)
    return [results[m] for m in range(len(setups))]


def check_stackable(settings: list[PhaseSettings]) -> None:
    """Phases trained as one stack share the model's shape, the batches and the device."""
    for s in settings[1:]:
        for key in (*STACK_KEYS, "device"):
            if getattr(s, key) != getattr(settings[0], key):
                raise ConfigError(
                    f"{s.run_name} and {settings[0].run_name} cannot train as one stack: "
                    f"--{key} {getattr(s, key)} against {getattr(settings[0], key)}"
                )


def training_stack(setups: list[Setup], checkpoints: list[Checkpoint | None]) -> TrainingStack:
    """The members' weights (new, their parents' or their checkpoints'), AdamW and precision."""
    first = setups[0]
    configs = [setup.start.model_config for setup in setups]
    model = StackedGenerators(configs[0], len(setups), [c.dropout for c in configs])
    model = model.to(first.device)
    precision = stacked_precision(
        choose_precision(first.device, first.settings.mixed_precision), len(setups)
    )
    lrs = [s.settings.start_lr for s in setups]
    optimizer = StackedAdamW(
        list(model.parameters()), lrs, [s.settings.weight_decay for s in setups]
    )
    progress = []
    for m, (setup, checkpoint) in enumerate(zip(setups, checkpoints, strict=True)):
        model.load_member_state_dict(m, starting_weights(setup))
        progress.append(Progress())
        if checkpoint is not None:
            optimizer.load_member_state_dict(m, checkpoint.optimizer)
            note = precision.scaler.load_member_state_dict(m, checkpoint.scaler)
            if note:
                log.info(f"[{setup.settings.run_name}] {note}")
            progress[m] = Progress.from_dict(checkpoint.progress)
    parts = {
        part: tuple(torch.stack([s.parts[part][i] for s in setups]) for i in (0, 1))
        for part in ("train", "val", "test")
    }
    return TrainingStack(model, optimizer, precision, progress, parts)


def starting_weights(setup: Setup) -> dict[str, torch.Tensor]:
    """A new model's weights, initialised from the chain's seed as a single model would be, or
    the weights the phase starts from (its parent's or its checkpoint's)."""
    if setup.start.state_dict is not None:
        return setup.start.state_dict
    torch.manual_seed(setup.settings.seed)
    return StreamlinedSequenceGenerator(setup.start.model_config).state_dict()


def step_graphs(setup: Setup, stack: TrainingStack, loss_fn) -> StackedStepGraphs | None:
    settings = setup.settings
    capture = graph_capture(setup.device, settings.grad_accum_steps)
    if capture is None:
        return None
    log.info(
        f"[{settings.run_name}] CUDA graphs ({type(capture).__name__}): one replay per step "
        "(SEQGEN_CUDA_GRAPHS=0: off)"
    )
    return StackedStepGraphs(stack.model, loss_fn, stack.optimizer, stack.precision, capture)


@dataclass(frozen=True)
class EpochPlan:
    """What one member's epoch trains with: its global epoch and its schedules' values."""

    global_epoch: int
    lr: float
    ratio: float  # teacher forcing


def epoch_plan(setup: Setup, epoch: int) -> EpochPlan:
    """The pure schedules at the member's 0-based epoch within its phase."""
    s = setup.settings
    lr = learning_rate(setup.start.schedule, epoch, s.epochs, s.start_lr, s.min_lr)
    ratio = 0.0
    if s.teacher_forcing:
        ratio = teacher_forcing_ratio(
            epoch, s.epochs, s.teacher_forcing_start, s.teacher_forcing_end
        )
    return EpochPlan(setup.global_epoch(epoch), lr, ratio)


def run_epoch(
    setups: list[Setup], stack: TrainingStack, loss_fn, active: list[int]
) -> tuple[dict[int, EpochRecord], dict[int, TrainingError]]:
    """Train every active member's next epoch, then evaluate: {member: its epoch's record}, and
    {member: why} for members whose training diverged in it.
    Members not active (finished, stopped, paused, diverged) are frozen: their weights do not
    move."""
    started = time.perf_counter()
    plans = [epoch_plan(setup, len(stack.progress[m].history)) for m, setup in enumerate(setups)]
    stack.optimizer.set_lr([plan.lr for plan in plans])
    frozen = [m not in active for m in range(len(setups))]
    train, tally, diverged = train_steps(setups, stack, loss_fn, plans, frozen)
    # Evaluate: model selection on the free-running loss, as the model is used.
    val_p, val_y = stack.parts["val"]
    val = evaluate_stacked(stack.model, loss_fn, val_p, val_y, 0.0, stack.precision)
    val_tf = evaluate_stacked(stack.model, loss_fn, val_p, val_y, 1.0, stack.precision)
    test = evaluate_stacked(stack.model, loss_fn, *stack.parts["test"], 0.0, stack.precision)
    val_rows, test_rows = val.columns().tolist(), test.columns().tolist()
    seconds = time.perf_counter() - started
    records = {
        m: EpochRecord(
            epoch=plans[m].global_epoch,
            train=member_losses(loss_fn, setups[m], train[m]),
            val=member_losses(loss_fn, setups[m], val_rows[m]),
            test=member_losses(loss_fn, setups[m], test_rows[m]),
            val_teacher_forced=float(val_tf.total[m]),
            lr=plans[m].lr,
            teacher_forcing_ratio=plans[m].ratio,
            grad_norm=tally.grad_norms(m)[0],
            max_grad_norm=tally.grad_norms(m)[1],
            seconds=seconds,
            nonfinite_steps=tally.skipped(m),
        )
        for m in active
        if m not in diverged
    }
    return records, diverged


def member_losses(loss_fn: Objective, setup: Setup, row: list[float]) -> Losses:
    """Member m's loss and its own strategy's terms, from a row (total, every term of the
    stack's objective): a stack of several strategies computes the union of their terms."""
    values = dict(zip(loss_fn.names, row[1:], strict=True))
    return Losses(row[0], {t: values[t] for t in setup.settings.weights})


def train_steps(
    setups: list[Setup], stack: TrainingStack, loss_fn, plans: list[EpochPlan], frozen: list[bool]
) -> tuple[list[list[float]], StepTally, dict[int, TrainingError]]:
    """One pass over each member's training split, in an order drawn from its (seed, epoch):
    per member the mean losses (the total, then every term of the objective) and the tally of
    its steps (read once, at the end: nothing here waits for the device), and the members
    whose training diverged, frozen from then on."""
    first, M, dev = setups[0].settings, len(setups), stack.precision.device
    params, targets = stack.parts["train"]  # (M,N,P), (M,N,T,K)
    orders = torch.stack(
        [
            torch.randperm(
                params.shape[1], generator=order_generator(s.settings.seed, p.global_epoch)
            )
            for s, p in zip(setups, plans, strict=True)
        ]
    ).to(params.device)  # (M, N)
    generators = [
        sampling_generator(s.settings.seed, p.global_epoch, params.device)
        for s, p in zip(setups, plans, strict=True)
    ]
    rows = torch.arange(M, device=params.device).unsqueeze(1)
    clip = member_tensor([s.settings.clip_grad_norm for s in setups], torch.float32, dev)
    tally = StepTally(
        frozen,
        [p.nonfinite_in_a_row for p in stack.progress],
        [s.settings.max_nonfinite_steps for s in setups],
        dev,
        loss_fn.width,
    )
    chunks = orders.split(first.batch_size * first.grad_accum_steps, dim=1)
    label = f"epoch {plans[0].global_epoch}" if M == 1 else "stacked epoch"
    for chunk in progress_bar(chunks, label):
        micro = [(params[rows, b], targets[rows, b]) for b in chunk.split(first.batch_size, dim=1)]
        result = stacked_step(
            stack.model, loss_fn, micro, stack.optimizer, stack.precision, generators,
            [p.ratio for p in plans], [s.settings.noise_level for s in setups], clip,
            tally.frozen, stack.graphs,
        )  # fmt: skip
        tally.add(result, chunk.shape[1])
    tally.read()
    diverged = {}
    for m in range(M):
        if not frozen[m]:
            stack.progress[m].nonfinite_in_a_row = tally.in_a_row[m]
        if tally.diverged[m]:
            diverged[m] = diverged_error(setups[m], tally.in_a_row[m], plans[m])
    train = [
        [x / tally.rows[m] for x in tally.sums[m]] if tally.rows[m] else [np.nan] * loss_fn.width
        for m in range(M)
    ]
    return train, tally, diverged


class StepTally:
    """An epoch's stacked step results summed per member on the device, without a host sync per
    step, as the step loop counted them on the host before: the losses of the finite steps
    times their rows, their finite pre-clip norms, non-finite steps in a row, and the members
    that reached their limit of those (diverged: frozen from their next step). `read` brings
    it all to the host once, as lists."""

    def __init__(
        self, frozen: list[bool], in_a_row: list[int], limits: list[int], device, width: int
    ):
        M, f64 = len(frozen), {"dtype": torch.float64, "device": device}
        self.frozen = torch.tensor(frozen, device=device)
        self.in_a_row = torch.tensor(in_a_row, device=device)
        self.limits = torch.tensor(limits, device=device)
        self.sums, self.rows = torch.zeros(M, width, **f64), torch.zeros(M, **f64)
        self.norm_sum, self.norm_max = torch.zeros(M, **f64), torch.full((M,), -np.inf, **f64)
        self.norms = torch.zeros(M, dtype=torch.long, device=device)  # steps with a finite norm
        self.diverged = torch.zeros(M, dtype=torch.bool, device=device)
        self.steps = 0

    def add(self, r: StackedStepResult, rows: int) -> None:
        live = ~self.frozen
        counted = live & r.finite
        self.in_a_row = torch.where(live & ~r.finite, self.in_a_row + 1, self.in_a_row)
        self.in_a_row = torch.where(counted, 0, self.in_a_row)
        losses = r.losses.double() * rows  # (M, 1 + terms)
        self.sums += torch.where(counted.unsqueeze(1), losses, 0.0)
        self.rows += counted * rows
        normed = counted & r.grad_norm.isfinite()  # not an fp16 overflow its scaler skipped
        norm = r.grad_norm.double()
        self.norm_sum += torch.where(normed, norm, 0.0)
        self.norm_max = torch.where(normed, torch.maximum(self.norm_max, norm), self.norm_max)
        self.norms += normed
        reached = live & (self.in_a_row >= self.limits)
        self.diverged |= reached
        self.frozen = self.frozen | reached
        self.steps += 1

    def read(self) -> None:
        for name in ("in_a_row", "sums", "rows", "norm_sum", "norm_max", "norms", "diverged"):
            setattr(self, name, getattr(self, name).tolist())

    def grad_norms(self, m: int) -> tuple[float, float]:
        """Member m's mean and largest finite pre-clip norm of the epoch (NaN: none)."""
        if not self.norms[m]:
            return float("nan"), float("nan")
        return self.norm_sum[m] / self.norms[m], self.norm_max[m]

    def skipped(self, m: int) -> int:
        """Member m's steps without a finite norm (non-finite, overflowed or frozen)."""
        return self.steps - self.norms[m]


def diverged_error(setup: Setup, in_a_row: int, plan: EpochPlan) -> TrainingError:
    return TrainingError(
        f"{setup.settings.run_name}: {in_a_row} non-finite steps in a row "
        f"at epoch {plan.global_epoch}: training diverged; the last good checkpoint is in "
        f"{setup.out_dir} (lower --start_lr or --clip_grad_norm)"
    )
