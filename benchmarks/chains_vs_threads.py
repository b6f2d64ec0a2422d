"""Chains side by side against threads: one training process with 2 torch threads against two
processes with 1 thread each at the same time, full-size model, through `seqgen bench`.

    python benchmarks/chains_vs_threads.py [--rounds 2] [--batches 20] [--threads 2]

The two layouts alternate within each round, with and without mixed precision, so a slow spell
of the machine hits both. Each process gets OMP_NUM_THREADS=threads, as Ray sets it for a task
with that many CPUs. `other_cores` is the CPU that processes other than ours used meanwhile
(from /proc/stat): a figure taken while it is well above 0 was measured on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def cpu_name_and_flags() -> tuple[str, list[str]]:
    name, flags = platform.processor(), []
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have]
                break
    return name, flags


def busy_ticks() -> int:
    """CPU ticks spent busy by the whole machine since boot (all cores)."""
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = map(
            int, stat.readline().split()[1:9]
        )
    return user + nice + system + irq + softirq + steal


def run_side_by_side(chains: int, threads: int, batches: int, mixed: bool) -> dict:
    """Start `chains` bench processes at once; their training rates and the machine's other load."""
    cmd = [sys.executable, "-m", "seqgen.cli", "bench", "--preset", "full", "--json"]
    cmd += ["--batches", str(batches), "--threads", str(threads)]
    cmd += ["--mixed_precision" if mixed else "--no_mixed_precision"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    ours_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before, started = busy_ticks(), time.perf_counter()
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(chains)
    ]
    outputs = [p.communicate() for p in procs]
    wall = time.perf_counter() - started
    busy = busy_ticks() - busy_before
    ours_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = sum(getattr(ours_after, f) - getattr(ours_before, f) for f in ("ru_utime", "ru_stime"))
    for proc, (_, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            sys.exit(f"seqgen bench failed: {err[-2000:]}")
    results = [json.loads(out) for out, _ in outputs]
    rates = [r["train_sequences_per_s"] for r in results]
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    return {
        "layout": f"{chains} x {threads} thread{'s' if threads > 1 else ''}",
        "precision": results[0]["precision"],
        "rates": rates,
        "total_sequences_per_s": round(sum(rates), 1),
        "other_cores": round(max(0.0, busy / ticks_per_s - ours) / wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20, help="timed batches of 32 per process")
    parser.add_argument("--threads", type=int, default=2, help="cores to share out")
    args = parser.parse_args()
    name, flags = cpu_name_and_flags()
    print(f"CPU: {name}, {os.cpu_count()} cores, flags: {' '.join(flags) or 'none of note'}")
    n = args.threads
    for round_ in range(1, args.rounds + 1):
        for mixed in (True, False):
            one = run_side_by_side(1, n, args.batches, mixed)
            many = run_side_by_side(n, 1, args.batches, mixed)
            for r in (one, many):
                print(
                    f"round {round_}  {r['layout']:<11} {r['precision']:<34} "
                    f"total {r['total_sequences_per_s']:6.1f} seq/s  per process {r['rates']}  "
                    f"other load {r['other_cores']} cores"
                )
            ratio = many["total_sequences_per_s"] / one["total_sequences_per_s"]
            print(f"round {round_}  {n} chains x 1 thread / 1 chain x {n} threads = {ratio:.2f}")


if __name__ == "__main__":
    main()
