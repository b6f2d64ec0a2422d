"""Throughput of the trainer's own optimiser step and of free-running generation."""

from __future__ import annotations

import time

import torch
from torch import nn

from seqgen.config import resolve
from seqgen.losses import make_loss
from seqgen.model import ModelConfig, StreamlinedSequenceGenerator
from seqgen.step import choose_precision, optimizer_step
from seqgen.synth import N_SNAPSHOTS

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


def _time_training(model, settings, batches: int, precision) -> float:
    loss_fn = make_loss(settings.alpha, settings.reported_max_lag)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.start_lr, weight_decay=settings.weight_decay
    )
    B, dev = settings.batch_size, precision.device
    params = torch.randn(B, N_PARAMS, device=dev)
    targets = torch.randn(B, SEQ_LEN, N_COMPONENTS, device=dev)

    def step():
        batch = [(params, targets)]
        optimizer_step(
            model,
            loss_fn,
            batch,
            optimizer,
            precision,
            RATIO,
            settings.noise_level,
            settings.clip_grad_norm,
        )

    step()  # warm-up: allocator, threads
    started = time.perf_counter()
    for _ in range(batches):
        step()
    _sync(dev)
    return B * batches / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(
    preset: str = "full",
    batches: int = 5,
    baseline: bool = False,
    threads: int | None = None,
    mixed_precision: bool = True,
) -> dict:
    """Sequences/s for training (batch of the preset, ratio 0.7) and for generating 550."""
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
    result = {
        "preset": preset,
        "device": str(device),
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "batch_size": settings.batch_size,
        "seq_len": SEQ_LEN,
        "threads": torch.get_num_threads(),
        "precision": precision.note,
        "train_sequences_per_s": round(_time_training(model, settings, batches, precision), 1),
    }
    params = torch.randn(N_GENERATE, N_PARAMS, device=device)
    model.generate(params[:8], SEQ_LEN)
    started = time.perf_counter()
    with precision.autocast():
        model.generate(params, SEQ_LEN)
    _sync(device)
    result["generate_sequences_per_s"] = round(N_GENERATE / (time.perf_counter() - started), 1)
    if baseline:
        torch.manual_seed(0)
        reference = LSTMCellLoop(cfg).to(device).train()
        rate = _time_training(reference, settings, batches, precision)
        result["lstmcell_loop_train_sequences_per_s"] = round(rate, 1)
        result["speedup_vs_lstmcell_loop"] = round(result["train_sequences_per_s"] / rate, 2)
    return result
