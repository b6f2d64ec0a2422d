"""Training and generation throughput against the GEMM-only limit, as a table: for the `full` and
`demo` presets, with 2 threads and with 1 (chains under Ray run 1 thread each), in the precision
the trainer chooses on this CPU and in float32. Every row is one `seqgen bench` measurement
(medians of --batches turns, the limit timed in turn with the real work).

    python benchmarks/recurrence_limit.py [--presets full,demo] [--threads 2,1] [--batches 5]
"""

from __future__ import annotations

import argparse
import json

from seqgen.bench import cpu_name, run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="full,demo")
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="also print every result as JSON")
    args = parser.parse_args()

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
