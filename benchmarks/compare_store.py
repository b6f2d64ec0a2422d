"""Times `seqgen compare` on a store the size of a full study (the seed's 3 strategies x 5
phases x 3 seeds: 45 phase runs, 100 epochs each, every per-epoch metric) plus an evaluation run
per phase with 550 test samples. The runs are logged through the MLflow API with synthetic values
(training 45 real phases at full scale takes days); the report code cannot tell the difference.

    python benchmarks/compare_store.py [--root /tmp/seqgen-bench-compare]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import Metric

from seqgen.data.sequences import load_sequences
from seqgen.data.synth import load_pca, synthesize
from seqgen.evaluation.evaluate import (
    BY_STEP_FILE,
    GENERATED_FILE,
    PER_SAMPLE_FILE,
    measure,
    sweep_params,
)
from seqgen.training.epochs import PER_EPOCH_METRICS

SCALE = {"mae": 0.10, "autocorr": 0.14, "combined": 0.09}


def log_phase(client, rng, strategy, phase, seed, data_dir) -> str:
    first, last = 100 * (phase - 1) + 1, 100 * phase
    with mlflow.start_run(run_name=f"{strategy}-p{phase}-s{seed}") as run:
        mlflow.set_tags(
            {"kind": "phase", "strategy": strategy, "phase": phase, "seed": seed, "preset": "full"}
        )
        mlflow.log_params({"first_epoch": first, "last_epoch": last, "data_dir": data_dir})
        now, metrics = int(time.time() * 1000), []
        for epoch in range(first, last + 1):
            loss = SCALE[strategy] * (1 + 5 * np.exp(-epoch / 60)) * (1 + 0.05 * rng.normal())
            metrics += [Metric(k, float(loss), now, epoch) for k in PER_EPOCH_METRICS]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[i : i + 1000])
        mlflow.log_metrics(
            {
                "best_val_loss": SCALE[strategy],
                "best_epoch": last,
                "phase_seconds": 3600.0,
                "peak_memory_mb": 900.0,
            },
            step=last,
        )
        return run.info.run_id


def log_evaluation(rng, strategy, phase, seed, phase_run, data, pca, test_idx) -> None:
    with mlflow.start_run(run_name=f"eval-{strategy}-p{phase}-s{seed}"):
        mlflow.set_tags(
            {
                "kind": "evaluation",
                "strategy": strategy,
                "phase": phase,
                "seed": seed,
                "preset": "full",
                "split": "test",
                "evaluated_run_id": phase_run,
            }
        )
        true = data.components[test_idx]
        error = SCALE[strategy] * 3 * rng.standard_normal(true.shape).cumsum(axis=1) / 5
        pred, teacher_forced = true + error, true + error / 2
        files = [data.files[i] for i in test_idx]
        found = measure(
            pred,
            true,
            teacher_forced,
            files,
            data.params[test_idx],
            list(data.param_names),
            list(data.component_names),
            data.steps,
            20,
            pca,
        )
        mlflow.log_metrics({f"test_{k}": v for k, v in found.summary.items()}, step=100 * phase)
        with tempfile.TemporaryDirectory() as tmp:
            found.per_sample.to_csv(Path(tmp) / PER_SAMPLE_FILE, index=False)
            found.by_step.to_csv(Path(tmp) / BY_STEP_FILE, index=False)
            sweeps = sweep_params(data.params)
            np.savez_compressed(
                Path(tmp) / GENERATED_FILE,
                files=np.array(files),
                params=data.params[test_idx],
                pred=pred.astype(np.float32),
                true=true,
                steps=data.steps,
                param_names=np.array(data.param_names),
                component_names=np.array(data.component_names),
                sweep_params=sweeps,
                sweep_pred=np.repeat(true[None, : sweeps.shape[1]], sweeps.shape[0], axis=0),
                pca_basis=pca.basis,
                pca_mean=pca.mean,
                pca_x=pca.x,
                pca_t=pca.t,
            )
            mlflow.log_artifacts(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/seqgen-bench-compare")
    args = parser.parse_args()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    synthesize(root / "data", n_samples=600, seed=0, progress=False)  # 550 test samples
    data, pca = load_sequences(root / "data"), load_pca(root / "data")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient().create_experiment(
        "seqgen", artifact_location=str(root / "artifacts")
    )  # not ./mlruns of the caller
    mlflow.set_experiment(experiment_id=experiment)
    client, rng = mlflow.MlflowClient(), np.random.default_rng(0)
    started = time.perf_counter()
    for strategy in SCALE:
        for seed in (0, 1, 2):
            test_idx = np.sort(np.random.default_rng(seed).permutation(data.n_samples)[50:])
            for phase in range(1, 6):
                run_id = log_phase(client, rng, strategy, phase, seed, str(root / "data"))
                log_evaluation(rng, strategy, phase, seed, run_id, data, pca, test_idx)
    print(f"store: 45 phase runs + 45 evaluations logged in {time.perf_counter() - started:.0f} s")

    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "seqgen.cli", "compare", "--out", str(root / "report")],
        check=True,
        cwd=root,
        env=os.environ | {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "seqgen"},
    )
    print(f"seqgen compare on 45 runs: {time.perf_counter() - started:.1f} s wall")


if __name__ == "__main__":
    main()
