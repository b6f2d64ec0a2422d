"""Throughput of the trainer's own optimiser step and of free-running generation, each beside
its GEMM-only limit: the time of exactly the GEMMs the recurrence runs, alone, at their real
shapes and precision. No implementation of this recurrence can beat that limit on the machine;
the fraction of it reached says how much time goes to everything else (gate math, dispatch,
memory, loss, optimiser)."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from seqgen.config import resolve
from seqgen.data.synth import N_SNAPSHOTS
from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator
from seqgen.model.recurrence import gemm_plan, recurrence_name, run_gemms
from seqgen.model.stacked import StackedGenerators
from seqgen.training.losses import Objective
from seqgen.training.stacked_step import StackedAdamW, stacked_precision, stacked_step
from seqgen.training.step import (
    choose_precision,
    cpu_flags,
    optimizer_step,
    sampling_generator,
)

SEQ_LEN, N_COMPONENTS, N_PARAMS = N_SNAPSHOTS, 5, 2  # the users' data: 151 steps
RATIO = 0.7  # per-step scheduled sampling as in phase 1
N_GENERATE = 550  # one validation split


class LSTMCellLoop(nn.Module):
    """The straightforward reference: nn.LSTMCell per layer per step, autograd over the loop."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        K, P, H, L = cfg.n_components, cfg.n_params, cfg.hidden_size, cfg.num_layers
        self.encoder = nn.Sequential(
            nn.Linear(P, cfg.encoder_size), nn.Tanh(), nn.Linear(cfg.encoder_size, 2 * L * H)
        )
        self.cells = nn.ModuleList(nn.LSTMCell(1 + K + P if i == 0 else H, H) for i in range(L))
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(H, K)

    def forward(self, params, targets, ratio, noise_level, seq_len=None):
        B, T = params.shape[0], targets.shape[1]
        L, H = self.cfg.num_layers, self.cfg.hidden_size
        state = torch.tanh(self.encoder(params)).view(B, 2, L, H)
        h, c = list(state[:, 0].unbind(1)), list(state[:, 1].unbind(1))
        dev = params.device
        prev, outputs = torch.zeros(B, self.cfg.n_components, device=dev), []
        for t in range(T):
            x = torch.cat([torch.full((B, 1), t / (T - 1), device=dev), prev, params], dim=1)
            x = x + noise_level * torch.randn_like(x)
            for i, cell in enumerate(self.cells):
                h[i], c[i] = cell(x, (h[i], c[i]))
                x = self.drop(h[i]) if i < L - 1 else h[i]
            out = self.head(x)
            outputs.append(out)
            use_truth = (torch.rand(B, 1, device=dev) < ratio).float()
            prev = use_truth * targets[:, t] + (1 - use_truth) * out
        return torch.stack(outputs, dim=1)


def _training_step(model, settings, precision):
    """One plain optimiser step of a single model (the nn.LSTMCell reference) on a fixed random
    batch, as a function of no arguments."""
    loss_fn = Objective([settings.weights], [settings.max_lag])
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.start_lr, weight_decay=settings.weight_decay
    )
    B, dev = settings.batch_size, precision.device
    batch = [
        (torch.randn(B, N_PARAMS, device=dev), torch.randn(B, SEQ_LEN, N_COMPONENTS, device=dev))
    ]
    clip = settings.clip_grad_norm
    return lambda: optimizer_step(
        model, loss_fn, batch, optimizer, precision, RATIO, settings.noise_level, clip
    )


def _trainer_step(cfg: ModelConfig, settings, precision, members: int):
    """One step of the trainer itself (a stack of `members` chains, seqgen/training/train.py)
    on a fixed random batch, as a function of no arguments."""
    torch.manual_seed(0)
    dev, M, B = precision.device, members, settings.batch_size
    model = StackedGenerators(cfg, M).to(dev).train()
    loss_fn = Objective([settings.weights] * M, [settings.max_lag] * M)
    optimizer = StackedAdamW(
        list(model.parameters()), [settings.start_lr] * M, [settings.weight_decay] * M
    )
    stacked = stacked_precision(precision, M)
    batch = [
        (
            torch.randn(M, B, N_PARAMS, device=dev),
            torch.randn(M, B, SEQ_LEN, N_COMPONENTS, device=dev),
        )
    ]
    generators = [sampling_generator(m, 1, dev) for m in range(M)]
    noise, clip = [settings.noise_level] * M, [settings.clip_grad_norm] * M
    return lambda: stacked_step(
        model, loss_fn, batch, optimizer, stacked, generators, [RATIO] * M, noise, clip
    )


def _seconds(fn, device: torch.device) -> float:
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def _median_seconds(fns: dict, repeats: int, device: torch.device) -> dict:
    """Median wall time of each function, run in turns (after one warm-up run each), so a
    slow spell of a shared machine falls on all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_seconds(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU's model name and the vector and matrix extensions that decide the precision and
    the speed of the GEMMs (seqgen.training.step.PRECISION_FLAGS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    shown = cpu_flags()
    return f"{model[1].strip() if model else 'unknown'} ({', '.join(shown) or 'no AVX2'})"


def run_bench(
    preset: str = "full",
    batches: int = 5,
    baseline: bool = False,
    threads: int | None = None,
    mixed_precision: bool = True,
    members: int = 1,
) -> dict:
    """Sequences/s for training (batch of the preset, ratio 0.7; `members` chains stacked, as
    `seqgen study --batched` trains them) and for generating 550, each beside its GEMM-only
    limit: the same recurrence's GEMMs alone, at their real shapes and in the precision the
    trainer chooses (medians of `batches` turns)."""
    if threads:
        torch.set_num_threads(threads)
    settings = resolve("combined", 1, preset)
    cfg = ModelConfig(
        N_COMPONENTS, N_PARAMS, settings.hidden_size, settings.num_layers, settings.dropout
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = choose_precision(device, mixed_precision)
    torch.manual_seed(0)
    model = StreamlinedSequenceGenerator(cfg).to(device).train()
    gemm_dtype = precision.dtype or torch.float32  # the recurrence's H-wide GEMMs under autocast
    B, H, L, K = settings.batch_size, cfg.hidden_size, cfg.num_layers, cfg.n_components
    shape = (SEQ_LEN, H, L, K, 1 + K + N_PARAMS, gemm_dtype)  # T, H, L, K, layer-0 features
    train_plan = gemm_plan(SEQ_LEN, B, *shape[1:], train=True, device=device)
    generate_plan = gemm_plan(SEQ_LEN, N_GENERATE, *shape[1:], train=False, device=device)
    params = torch.randn(N_GENERATE, N_PARAMS, device=device)

    def generate():
        with precision.autocast():
            model.generate(params, SEQ_LEN)

    seconds = _median_seconds(
        {
            "train": _trainer_step(cfg, settings, precision, members),
            "train_gemms": lambda: run_gemms(train_plan * members),
            "generate": generate,
            "generate_gemms": lambda: run_gemms(generate_plan),
        },
        batches,
        device,
    )
    rates = {
        "train_sequences_per_s": members * B / seconds["train"],
        "gemm_limit_train_sequences_per_s": members * B / seconds["train_gemms"],
        "generate_sequences_per_s": N_GENERATE / seconds["generate"],
        "gemm_limit_generate_sequences_per_s": N_GENERATE / seconds["generate_gemms"],
    }
    probe = torch.zeros(1, 1, 1, device=device)
    result = {
        "preset": preset,
        "device": str(device),
        "cpu": cpu_name(),
        "hidden_size": H,
        "num_layers": L,
        "batch_size": B,
        "members": members,
        "seq_len": SEQ_LEN,
        "threads": torch.get_num_threads(),
        "precision": precision.note,
        "gemm_dtype": str(gemm_dtype).removeprefix("torch."),
        "recurrence": recurrence_name(precision.dtype, probe),
        **{key: round(value, 1) for key, value in rates.items()},
        "train_fraction_of_gemm_limit": round(
            rates["train_sequences_per_s"] / rates["gemm_limit_train_sequences_per_s"], 3
        ),
        "generate_fraction_of_gemm_limit": round(
            rates["generate_sequences_per_s"] / rates["gemm_limit_generate_sequences_per_s"], 3
        ),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine
    }
    if baseline:
        torch.manual_seed(0)
        reference = LSTMCellLoop(cfg).to(device).train()
        step = _training_step(reference, settings, precision)
        rate = B / _median_seconds({"step": step}, batches, device)["step"]
        result["lstmcell_loop_train_sequences_per_s"] = round(rate, 1)
        result["speedup_vs_lstmcell_loop"] = round(result["train_sequences_per_s"] / rate, 2)
    return result
