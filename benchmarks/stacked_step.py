"""Seconds per training step of a stack of M chains of the `full` shape, against the same M chains
stepped one by one as today's trainer steps them.

    python benchmarks/stacked_step.py [--members 1,3,9] [--steps 2] [--rounds 3] [--threads 1]
                                      [--device cpu|cuda] [--json PATH]

Shape and settings from the phase table (`combined`, phase 1, `full`: hidden 256, 2 layers, batch
32, dropout 0.3, noise 0.05, teacher forcing 0.7, AdamW, clipping), 151 steps of 5 components;
every member its own seed and batch. Per M it times `stacked_step` (seqgen/training/
stacked_step.py) and one round of `optimizer_step` on M single models (what M chains in one
process cost today), each the mean of --steps steps after one unmeasured step. It says which
recurrence the stack runs: the shim (member by member over today's single-member recurrence,
seqgen/model/stacked.py) or the stacked one. On CUDA it times eager and CUDA-graphed steps, in
float32 and in fp16 with a GradScaler per member; on the CPU the precision choose_precision picks.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import seqgen.model.stacked as stacked_module  # noqa: E402
from seqgen.config import resolve  # noqa: E402
from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator  # noqa: E402
from seqgen.model.recurrence import uses_native  # noqa: E402
from seqgen.model.stacked import StackedGenerators  # noqa: E402
from seqgen.training.losses import Objective  # noqa: E402
from seqgen.training.stacked_step import (  # noqa: E402
    StackedAdamW,
    StackedStepGraphs,
    sampling_generator,
    stacked_precision,
    stacked_step,
)
from seqgen.training.step import StepGraphs, choose_precision, optimizer_step  # noqa: E402

T, K, P = 151, 5, 2
S = resolve("combined", 1, "full")
RATIO = S.teacher_forcing_start


def cpu_name() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                flags = next((f for f in info if f.startswith("flags")), "").split()
                isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
                return f"{line.split(':', 1)[1].strip()} ({', '.join(isa)})"
    return platform.processor()


def recurrence_used() -> str:
    if hasattr(stacked_module, "_single_member_lstm"):
        native = uses_native(None, torch.zeros(1))
        inner = "native C++" if native else "Python"
        return f"shim: member by member over today's single-member recurrence ({inner} on CPU)"
    return "the stacked recurrence (seqgen/model/recurrence.py)"


def config() -> ModelConfig:
    return ModelConfig(K, P, S.hidden_size, S.num_layers, S.dropout)


def timed(step, steps: int, dev: torch.device) -> float:
    """Mean seconds of `steps` calls after one unmeasured call."""
    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def stacked_seconds(dev, members: int, mixed: bool, graphed: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = StackedGenerators(config(), members).to(dev).train()
    lr, wd = [S.start_lr] * members, [S.weight_decay] * members
    optimizer = StackedAdamW(list(model.parameters()), lr, wd)
    loss_fn = Objective([S.weights] * members, [S.max_lag] * members)
    precision = stacked_precision(choose_precision(dev, mixed), members)
    graphs = StackedStepGraphs(model, loss_fn, optimizer, precision) if graphed else None
    generators = [sampling_generator(seed, 0, dev) for seed in range(members)]
    params = torch.randn(members, S.batch_size, P, device=dev)
    targets = torch.randn(members, S.batch_size, T, K, device=dev)

    def step():
        stacked_step(
            model,
            loss_fn,
            [(params, targets)],
            optimizer,
            precision,
            generators,
            [RATIO] * members,
            [S.noise_level] * members,
            [S.clip_grad_norm] * members,
            graphs=graphs,
        )

    return timed(step, steps, dev)


def singles_seconds(dev, members: int, mixed: bool, graphed: bool, steps: int) -> float:
    """One round: a step of each of M single models, today's optimizer_step."""
    loss_fn = Objective([S.weights], [S.max_lag])
    chains = []
    for seed in range(members):
        torch.manual_seed(seed)
        model = StreamlinedSequenceGenerator(config()).to(dev).train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=S.start_lr, weight_decay=S.weight_decay
        )
        precision = choose_precision(dev, mixed)
        graphs = StepGraphs(model, loss_fn, precision, S.noise_level) if graphed else None
        if graphs:
            graphs.new_epoch(RATIO)
        shape = (S.batch_size, T, K)
        batch = [(torch.randn(S.batch_size, P, device=dev), torch.randn(*shape, device=dev))]
        chains.append((model, optimizer, precision, graphs, batch))

    def step():
        for model, optimizer, precision, graphs, batch in chains:
            optimizer_step(
                model,
                loss_fn,
                batch,
                optimizer,
                precision,
                RATIO,
                S.noise_level,
                S.clip_grad_norm,
                graphs,
            )

    return timed(step, steps, dev)


def ways(dev: torch.device) -> list[tuple[str, bool, bool]]:
    """(name, mixed precision, CUDA graphs) to time on this device."""
    if dev.type == "cpu":
        return [("eager", S.mixed_precision, False)]
    return [
        ("eager float32", False, False),
        ("graphed float32", False, True),
        ("eager fp16", True, False),
        ("graphed fp16", True, True),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="1,3,9", help="stack sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per figure")
    parser.add_argument("--rounds", type=int, default=3, help="alternations; the best counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    print(f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"recurrence: {recurrence_used()}")
    print(f"precision: {choose_precision(dev, S.mixed_precision).note}")
    print(f"shape: hidden {S.hidden_size}, {S.num_layers} layers, batch {S.batch_size}, T {T}")
    header = f"{'M':>3} {'way':<16} {'stack s/step':>12} {'M singles s':>12} {'speed-up':>8}"
    print(header)
    rows = []
    for members in [int(m) for m in args.members.split(",")]:
        for name, mixed, graphed in ways(dev):
            stack, singles = float("inf"), float("inf")
            for _ in range(args.rounds):
                stack = min(stack, stacked_seconds(dev, members, mixed, graphed, args.steps))
                singles = min(singles, singles_seconds(dev, members, mixed, graphed, args.steps))
            rows.append({"members": members, "way": name, "stack": stack, "singles": singles})
            print(f"{members:>3} {name:<16} {stack:12.3f} {singles:12.3f} {singles / stack:7.2f}x")
    if args.json:
        meta = {"device": where, "recurrence": recurrence_used(), "torch": torch.__version__}
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
