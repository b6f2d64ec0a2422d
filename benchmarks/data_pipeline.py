"""Times the data side at full scale: synthesising 5,500 Burgers samples, loading them the first
time and from the cache, and free-running generation of 550 sequences at hidden size 256.

    python benchmarks/data_pipeline.py [--out /tmp/seqgen-bench-data]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from seqgen.config import resolve
from seqgen.data.sequences import CACHE_NAME, load_sequences
from seqgen.data.synth import synthesize
from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/seqgen-bench-data")
    parser.add_argument("--n-samples", type=int, default=5500)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)

    started = time.perf_counter()
    synthesize(args.out, n_samples=args.n_samples, seed=0, progress=False)
    synth_s = time.perf_counter() - started

    started = time.perf_counter()
    data = load_sequences(args.out, use_cache=True)  # no cache yet: parses every file
    first_s = time.perf_counter() - started
    assert (Path(args.out) / CACHE_NAME).is_file(), "the first load should have written the cache"
    started = time.perf_counter()
    load_sequences(args.out)
    cached_s = time.perf_counter() - started

    torch.manual_seed(0)
    full = resolve("combined", 1)  # the full preset's model
    config = ModelConfig(5, 2, full.hidden_size, full.num_layers, full.dropout)
    model = StreamlinedSequenceGenerator(config).eval()
    params = torch.randn(550, 2)
    model.generate(params[:8], data.seq_len)  # warm-up
    started = time.perf_counter()
    model.generate(params, data.seq_len)
    generate_s = time.perf_counter() - started

    print(
        json.dumps(
            {
                "samples": data.n_samples,
                "seq_len": data.seq_len,
                "threads": torch.get_num_threads(),
                "synth_seconds": round(synth_s, 2),
                "first_load_seconds": round(first_s, 2),
                "cached_load_seconds": round(cached_s, 3),
                "generate_550_seconds": round(generate_s, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
