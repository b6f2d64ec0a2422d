"""Training and generation throughput against the GEMM-only limit, as a table: for the `full` and
`demo` presets, with 2 threads and with 1 (chains under Ray run 1 thread each), in the precision
the trainer chooses on this CPU and in float32. Every row is one `seqgen bench` measurement
(medians of --batches turns, the limit timed in turn with the real work).

    python benchmarks/recurrence_limit.py [--presets full,demo] [--threads 2,1] [--batches 5]
    python benchmarks/recurrence_limit.py --profile [--presets full] [--threads 1]

--profile says where a training step's time goes instead (torch.profiler over --batches steps):
the recurrence's GEMMs, the rest of the native recurrence (gate math, loop, buffers), the dropout
mask, the optimiser, and everything else (model and loss ops, autograd, Python between ops).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch

from seqgen.bench import _training_step, cpu_name, run_bench
from seqgen.config import resolve
from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator
from seqgen.training.step import choose_precision


def category(event) -> str:
    """Where a profiled op's own time belongs, by the op and the ops it ran inside."""
    names, parent = [], event
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    if any(n.startswith("seqgen_native::") for n in names):
        return "recurrence GEMMs" if event.name == "aten::mm" else "native gate math and loop"
    if any(n.startswith("Optimizer.") for n in names):
        return "optimiser (zero_grad, AdamW)"
    if "aten::bernoulli" in names:
        return "dropout mask (torch.bernoulli)"
    return "other ops (model, loss, autograd, clipping)"


def profile(preset: str, threads: int, steps: int) -> None:
    """Milliseconds per training step by category, measured with torch.profiler."""
    torch.set_num_threads(threads)
    s = resolve("combined", 1, preset)
    model = StreamlinedSequenceGenerator(ModelConfig(5, 2, s.hidden_size, s.num_layers, s.dropout))
    precision = choose_precision(torch.device("cpu"), True)
    step = _training_step(model.train(), s, precision)
    step()
    started = time.perf_counter()
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - started) / steps * 1e3
    ms = Counter()
    for event in prof.events():
        ms[category(event)] += event.self_cpu_time_total / 1e3 / steps
    ms["Python between ops (and profiler)"] = wall - sum(ms.values())
    print(f"{preset}, {threads} thread(s), {precision.note}: {wall:.1f} ms per step")
    for name, value in ms.most_common():
        print(f"  {name:40s} {value:7.1f} ms  {value / wall:5.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="full,demo")
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="also print every result as JSON")
    parser.add_argument("--profile", action="store_true", help="where a training step goes")
    args = parser.parse_args()
    if args.profile:
        for preset in args.presets.split(","):
            for threads in [int(n) for n in args.threads.split(",")]:
                profile(preset, threads, args.batches)
        return

    print(f"CPU: {cpu_name()}\n")
    print("| preset | threads | GEMMs | recurrence | train seq/s | GEMM-only limit | fraction "
          "| generate 550 seq/s | GEMM-only limit | fraction | load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for preset in args.presets.split(","):
        for threads in [int(n) for n in args.threads.split(",")]:
            trainers = run_bench(preset, args.batches, threads=threads)
            rows = [trainers]
            if trainers["gemm_dtype"] != "float32":  # bf16 on this CPU: float32 too
                rows.append(run_bench(preset, args.batches, threads=threads, mixed_precision=False))
            for r in rows:
                print(
                    f"| {preset} | {threads} | {r['gemm_dtype']} | {r['recurrence']} "
                    f"| {r['train_sequences_per_s']} | {r['gemm_limit_train_sequences_per_s']} "
                    f"| {r['train_fraction_of_gemm_limit']:.2f} "
                    f"| {r['generate_sequences_per_s']} "
                    f"| {r['gemm_limit_generate_sequences_per_s']} "
                    f"| {r['generate_fraction_of_gemm_limit']:.2f} | {r['load_average_1min']} |",
                    flush=True,
                )
            results += rows
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
