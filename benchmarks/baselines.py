"""Fits the three baselines on the embedded Burgers data at the demo size (the first 1000 files,
800/100/100) and the full size (5500 files, 4400/550/550), both split by make_split(seed=0) as
training does, and scores each on the test split with seqgen.evaluation.evaluate.measure.

    python benchmarks/baselines.py [--data /tmp/burgers] [--seeds 0,1,2] [--sizes demo,full]
        [--direct-modes 32,755]

The data folder must hold `seqgen synth --out DIR --n-samples 5500 --seed 0` (made if missing).
Baselines have no teacher forcing, so measure leaves its teacher-forced entries out. The direct
network is fitted once per seed (mean ± std over seeds); mean and knn do not depend on a seed.
`--direct-modes 32,755` adds a direct row per number of output modes: 755 = T*K spans every
sequence, the same functions as a free output layer.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from seqgen.data.sequences import load_sequences
from seqgen.data.split import make_split
from seqgen.data.synth import load_pca, synthesize
from seqgen.evaluation.baselines import BASELINES, DirectSettings, fit_baseline
from seqgen.evaluation.evaluate import measure
from seqgen.evaluation.metrics import ACF_MAX_LAG

SIZES = {"demo": 1000, "full": 5500}  # demo = the demo preset's max_samples
COLUMNS = ["mae", "rmse", "acf_error", "spectral_error", "field_rel_l2"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def score(name: str, data, split, seed: int, pca, **options) -> dict:
    """Fit one baseline, predict the test split, measure it: summary + info + seconds."""
    fitted = fit_baseline(name, data, split, seed, **options)
    test = split.indices(data.files, "test")
    started = time.perf_counter()
    pred = fitted.predict(data.params[test])
    predict_s = time.perf_counter() - started
    true = data.components[test]
    found = measure(
        pred,
        true,
        None,  # no teacher forcing
        [data.files[i] for i in test],
        data.params[test],
        list(data.param_names),
        list(data.component_names),
        data.steps,
        ACF_MAX_LAG,
        pca,
    )
    return {**found.summary, **fitted.info, "predict_seconds": predict_s}


def fmt(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    return f"{np.mean(values):.{digits}g} ± {np.std(values, ddof=1):.2g}"


def chosen(name: str, rows: list[dict]) -> str:
    if name == "knn":
        return f"k={rows[0]['k']}"
    if name == "direct":
        epochs = ", ".join(f"{r['best_epoch']}/{r['epochs']}" for r in rows)
        return f"{rows[0]['modes']} modes, epochs (best/run) {epochs}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/burgers")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the direct network")
    parser.add_argument("--sizes", default="demo,full")
    parser.add_argument("--direct-modes", default="32", help="output modes of direct, one row each")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    folder = Path(args.data)
    if not (folder / "pca.npz").is_file():
        synthesize(folder, n_samples=SIZES["full"], seed=0, progress=False)
    everything = load_sequences(folder)
    pca = load_pca(folder)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"data: {folder} ({everything.n_samples} samples, fingerprint {everything.fingerprint})")

    for size in args.sizes.split(","):
        data = everything.subset(np.arange(min(SIZES[size], everything.n_samples)))
        split = make_split(data.files, seed=0)
        print(
            f"\n### {size}: {len(split.train)} train / {len(split.val)} val / "
            f"{len(split.test)} test\n"
        )
        print("| baseline | chosen | fit s | " + " | ".join(f"test {c}" for c in COLUMNS) + " |")
        print("|---" * (3 + len(COLUMNS)) + "|")
        runs = [(name, [0], {}) for name in BASELINES if name != "direct"]
        runs += [
            ("direct", seeds, {"settings": DirectSettings(modes=int(m))})
            for m in args.direct_modes.split(",")
        ]
        for name, run_seeds, options in runs:
            rows = [score(name, data, split, s, pca, **options) for s in run_seeds]
            cells = [fmt([r[c] for r in rows]) for c in COLUMNS]
            fit_s = fmt([r["fit_seconds"] for r in rows], 3)
            print(
                f"| {name} | {chosen(name, rows)} | {fit_s} | " + " | ".join(cells) + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
