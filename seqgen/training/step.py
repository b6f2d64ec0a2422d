"""The precision a device supports and the per-(seed, epoch) random streams, which the trainer
uses; and one model's optimiser step, CUDA-graphed step and evaluation pass (`optimizer_step`,
`StepGraphs`, `evaluate_loss`): the single-model reference that the stacked step the trainer runs
(stacked_step.py) is tested against (tests/test_stacked.py) and benchmarked against
(benchmarks/cuda_step.py, stacked_step.py, cuda_stacked_step.py)."""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seqgen.errors import ConfigError
from seqgen.model.generator import StreamlinedSequenceGenerator
from seqgen.training.graphs import Capture, CudaCapture, EagerCapture, GraphSet
from seqgen.training.losses import LossResult

EVAL_BATCH = 512


@dataclass
class Precision:
    """Mixed precision on one device: an autocast dtype (or None) and a GradScaler (fp16 only)."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    note: str

    def autocast(self):
        """No weight cache: a cast cached while a CUDA graph captures would be stale at replay
        (torch's CUDA-graph notes), and the recurrence casts its own GEMM weights anyway."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)


# Forces the CPU trainer's precision: auto (bf16 where the CPU computes bf16 natively, else
# float32), float32, or bf16 (on a CPU without native bf16 too: torch emulates it, slower). The
# test suite sets it (pytest --precision) so one machine runs the numerical tests in both.
CPU_PRECISION_ENV = "SEQGEN_CPU_PRECISION"
CPU_PRECISIONS = ("auto", "float32", "bf16")
# /proc/cpuinfo flags that decide the CPU's precision (and the speed of its GEMMs)
PRECISION_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_flags() -> tuple[str, ...]:
    """Which of PRECISION_FLAGS this CPU has, as /proc/cpuinfo lists them (() where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    line = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    flags = set(line[1].split()) if line else set()
    return tuple(f for f in PRECISION_FLAGS if f in flags)


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's reading: AVX-512 bf16 or AMX)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def forced_cpu_precision() -> str:
    """SEQGEN_CPU_PRECISION, checked: auto, float32 or bf16."""
    value = os.environ.get(CPU_PRECISION_ENV, "auto").strip().lower() or "auto"
    if value not in CPU_PRECISIONS:
        raise ConfigError(
            f"{CPU_PRECISION_ENV}={value!r}: must be one of {', '.join(CPU_PRECISIONS)}"
        )
    return value


def choose_precision(device: torch.device, enabled: bool) -> Precision:
    """CUDA: fp16 autocast + GradScaler. CPU: bf16 autocast where the CPU has native bf16, else
    float32, unless SEQGEN_CPU_PRECISION forces one. The note says which and why."""
    off = torch.amp.GradScaler(device.type, enabled=False)
    if not enabled:
        return Precision(device, None, off, "float32: mixed precision off (--no_mixed_precision)")
    if device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
        return Precision(device, torch.float16, scaler, "mixed precision: CUDA fp16 + GradScaler")
    forced, native = forced_cpu_precision(), native_cpu_bf16()
    flags = ", ".join(cpu_flags()) or "none of " + ", ".join(PRECISION_FLAGS)
    if forced == "float32":
        return Precision(device, None, off, f"float32: forced by {CPU_PRECISION_ENV}=float32")
    if forced == "bf16":
        how = "native" if native else "emulated by torch, slower: this CPU has no native bf16"
        note = f"mixed precision: CPU bf16 autocast, forced by {CPU_PRECISION_ENV}=bf16 ({how})"
        return Precision(device, torch.bfloat16, off, note)
    if native:
        note = f"mixed precision: CPU bf16 autocast (native bf16; flags {flags})"
        return Precision(device, torch.bfloat16, off, note)
    return Precision(device, None, off, f"float32: this CPU has no native bf16 (flags {flags})")


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> str:
    """Restore a checkpoint's GradScaler state into this device's scaler; returns a note ("" when
    restored as saved).

    A checkpoint made without a GradScaler (CPU, or mixed precision off) holds an empty state,
    which an enabled scaler refuses (torch raises): a CPU checkpoint resumed on CUDA starts a fresh
    scaler instead. The reverse needs nothing: a disabled scaler ignores any state."""
    if not scaler.is_enabled():
        return ""
    if not state:
        return f"the checkpoint has no GradScaler state: starting at scale {scaler.get_scale():g}"
    scaler.load_state_dict(state)
    return ""


class StepGraphs:
    """CUDA: the forward and backward of a training step captured as a CUDA graph and replayed,
    so a step's thousands of small kernels (151 steps x layers, forward and backward) launch from
    one call instead of one Python call each. One graph per batch shape, captured afresh each
    epoch (the teacher-forcing ratio is part of it), each new shape warmed up eagerly first
    (seqgen/training/graphs.py); random draws (sampling, noise, dropout) are drawn anew at every
    replay. The optimiser step, clipping and the GradScaler stay outside the graph. Gradient
    accumulation runs eagerly."""

    def __init__(
        self,
        model,
        loss_fn,
        precision: Precision,
        noise_level: float,
        capture: Capture | None = None,
    ) -> None:
        self.model, self.loss_fn, self.precision = model, loss_fn, precision
        self.noise_level = noise_level
        self.parameters = list(model.parameters())
        self.graphs = GraphSet(capture)
        self.ratio: float | None = None

    def new_epoch(self, ratio: float) -> None:
        """Graphs of the last epoch are dropped: every epoch captures at the same points, so a
        resumed phase draws the same random numbers as an uninterrupted one."""
        self.graphs.clear()
        self.ratio = ratio

    def forward_backward(self, params: torch.Tensor, targets: torch.Tensor) -> LossResult:
        # the draws the forward makes depend on whether it teacher-forces at all
        key = (len(params), targets.shape[1], self.ratio > 0)
        static, graph = self.graphs.get(
            key,
            lambda: self._make(params, targets),
            warm_guard=lambda: torch.random.fork_rng(devices=self._rng_devices(params)),
        )
        static[0].copy_(params)
        static[1].copy_(targets)
        graph.replay()
        (total, terms), grads = graph.outputs
        for p, grad in zip(self.parameters, grads, strict=True):
            p.grad = grad
        return LossResult(total, terms)

    def _make(self, params: torch.Tensor, targets: torch.Tensor):
        static = (params.clone(), targets.clone())

        def body():
            for p in self.parameters:
                p.grad = None  # the graph's backward allocates the gradients it writes
            with self.precision.autocast():
                predictions = self.model(*static, self.ratio, self.noise_level)
                result = self.loss_fn(predictions[None], static[1][None])  # a stack of one
            self.precision.scaler.scale(result.total.sum()).backward()
            # a tuple and a dict, which a graph's outputs are made of (graphs.tree_flatten)
            return (result.total, result.terms), [p.grad for p in self.parameters]

        return static, body

    @staticmethod
    def _rng_devices(params: torch.Tensor) -> list:
        """The CUDA devices whose generators a warm-up forks (it draws from them)."""
        return [params.device] if params.device.type == "cuda" else []


def graph_capture(device: torch.device, grad_accum_steps: int) -> Capture | None:
    """How single-batch training steps are graphed: CUDA graphs on CUDA, none elsewhere;
    SEQGEN_CUDA_GRAPHS=0 turns them off, SEQGEN_CUDA_GRAPHS=emulate runs the graphed path on any
    device through EagerCapture, which refuses what a capture would (tests, gpu_check --cpu)."""
    mode = os.environ.get("SEQGEN_CUDA_GRAPHS", "1")
    if grad_accum_steps != 1 or mode == "0":
        return None
    if mode == "emulate":
        return EagerCapture()
    return CudaCapture() if device.type == "cuda" else None


def cuda_graphs_wanted(device: torch.device, grad_accum_steps: int) -> bool:
    """CUDA graphs on CUDA for single-batch steps, unless SEQGEN_CUDA_GRAPHS=0."""
    return isinstance(graph_capture(device, grad_accum_steps), CudaCapture)


@dataclass
class StepResult:
    loss: float
    terms: dict[str, float]  # every term of the objective: {name: value}
    grad_norm: float  # before clipping
    finite: bool


def optimizer_step(
    model: StreamlinedSequenceGenerator,
    loss_fn,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    ratio: float,
    noise_level: float,
    clip_grad_norm: float,
    graphs: StepGraphs | None = None,
) -> StepResult:
    """One optimiser step over micro-batches [(params (B,P), targets (B,T,K))], accumulated;
    a single batch through CUDA graphs when given them."""
    if graphs is not None and len(micro_batches) == 1:
        result = graphs.forward_backward(*micro_batches[0])
        totals = result.columns()[0].cpu()  # the total, then each term
    else:
        optimizer.zero_grad(set_to_none=True)
        totals = torch.zeros(())
        for params, targets in micro_batches:
            with precision.autocast():
                predictions = model(params, targets, ratio, noise_level)
                result = loss_fn(predictions[None], targets[None])  # a stack of one
            precision.scaler.scale(result.total.sum() / len(micro_batches)).backward()
            totals = totals + result.columns()[0].cpu() / len(micro_batches)
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
    loss, *terms = totals.tolist()
    return StepResult(loss, dict(zip(result.terms, terms, strict=True)), grad_norm, finite)


@torch.no_grad()
def evaluate_loss(
    model, loss_fn, params, targets, ratio: float, precision: Precision
) -> LossResult:
    """Mean loss over a split: free-running at ratio 0, teacher-forced at ratio 1; a LossResult
    of (1,) tensors (a stack of one)."""
    model.eval()
    sums = torch.zeros(())
    for i in range(0, len(params), EVAL_BATCH):
        p, y = params[i : i + EVAL_BATCH], targets[i : i + EVAL_BATCH]
        with precision.autocast():
            result = loss_fn(model(p, y, ratio)[None], y[None])
        sums = sums + result.columns().cpu() * len(p)
    model.train()
    means = sums / len(params)  # (1, 1 + terms)
    return LossResult(means[:, 0], dict(zip(result.terms, means[:, 1:].unbind(1), strict=True)))


def sampling_seed(seed: int, global_epoch: int) -> int:
    """The seed of an epoch's sampling, noise and dropout draws: every random draw of an epoch
    derives from (seed, epoch), so a resume replays it exactly."""
    return seed * 1_000_003 + global_epoch


def order_generator(seed: int, global_epoch: int) -> torch.Generator:
    """The generator of an epoch's batch order (on the CPU, whatever the device)."""
    return torch.Generator().manual_seed(seed * 7_919 + global_epoch)


def sampling_generator(seed: int, global_epoch: int, device: torch.device | str) -> torch.Generator:
    """A chain's generator for an epoch's sampling, noise and dropout, on its device."""
    return torch.Generator(device=device).manual_seed(sampling_seed(seed, global_epoch))


def seed_epoch(seed: int, global_epoch: int) -> torch.Generator:
    """A single model's epoch (benchmarks, references in tests): the global RNG seeded for the
    draws inside its forward, and the batch-order generator returned."""
    torch.manual_seed(sampling_seed(seed, global_epoch))  # sampling, noise, dropout
    return order_generator(seed, global_epoch)
