"""A study's chains trained side by side as one stacked model (seqgen study --batched, #14):
a member equals the chain trained alone, keeps its own run, settings and early stop, and a
killed batched study goes on from every member's own checkpoint."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from click.testing import CliRunner
from conftest import subprocess_env
from mlflow.tracking import MlflowClient

from seqgen.cli import main
from seqgen.config import resolve
from seqgen.errors import TrainingError
from seqgen.runs import tracking
from seqgen.training.epochs import PER_EPOCH_METRICS
from seqgen.training.train import train_phase, train_phases


def settings(strategy, phase, data, **kw):
    return resolve(strategy, phase, "smoke", data_dir=str(data), epochs=3, **kw)


def histories(run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient()
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in PER_EPOCH_METRICS
        if key != "epoch_seconds"
    }


# How far a member's per-epoch metrics may be from its chain trained alone, by the precision
# both train in (docs/design.md, "A member equals its chain alone"). float32: equal to the bit
# (every per-member computation has the same shapes and memory layout in a stack of 1 and of M,
# so the same kernels sum in the same order). bf16 GEMMs: oneDNN may block a batched bf16 GEMM
# by the number of members, so at most one bf16 unit roundoff (2^-8) relative.
STACK_TOLERANCE = {"float32": 0.0, "bf16": 2.0**-8}


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_a_member_trained_in_the_stack_equals_the_chain_trained_alone(
    store, smoke_data, monkeypatch, precision
):
    """Three chains with different strategies, seeds and settings: each member's per-epoch
    metrics equal those of the same phase trained alone by `seqgen train`, in runs of their own,
    within the tolerance of the precision both train in (forced, whatever this CPU would pick;
    bf16 runs emulated, slower, on a CPU without native bf16)."""
    monkeypatch.setenv("SEQGEN_CPU_PRECISION", precision)
    chains = [
        settings("mae", 1, smoke_data, seed=0),
        settings("autocorr", 1, smoke_data, seed=1, noise_level=0.02),
        settings("combined", 1, smoke_data, seed=2, clip_grad_norm=0.3, alpha=0.7),
    ]
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "alone")
    alone = [train_phase(s) for s in chains]
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "stacked")
    stacked = train_phases([dataclasses.replace(s, outputs_root="stacked") for s in chains])
    assert [r.status for r in stacked] == ["registered"] * 3
    assert len({r.run_id for r in stacked}) == 3
    rel = STACK_TOLERANCE[precision]
    for a, b in zip(alone, stacked, strict=True):
        assert (b.strategy, b.seed, b.best_epoch) == (a.strategy, a.seed, a.best_epoch)
        assert (
            MlflowClient()
            .get_run(b.run_id)
            .data.params["precision"]
            .startswith("float32" if precision == "float32" else "mixed precision: CPU bf16")
        )
        ha, hb = histories(a.run_id), histories(b.run_id)
        for key in ha:
            assert [s for s, _ in hb[key]] == [1, 2, 3], key
            assert [v for _, v in hb[key]] == pytest.approx(
                [v for _, v in ha[key]], rel=rel, abs=0.0
            ), (b.strategy, key)
    run = MlflowClient().get_run(stacked[2].run_id)
    assert run.data.tags["strategy"] == "combined"
    assert run.data.tags["variant"] == "combined+alpha=0.7+clip_grad_norm=0.3+epochs=3"
    assert run.data.params["clip_grad_norm"] == "0.3"


def test_a_member_that_stops_early_is_frozen_and_the_others_go_on(store, smoke_data):
    stopping = settings("mae", 1, smoke_data, seed=0, grad_explosion_norm=1e-6)
    going_on = settings("combined", 1, smoke_data, seed=0)
    stopped, finished = train_phases([stopping, going_on])
    assert (stopped.stop_reason, stopped.best_epoch) == ("gradient_explosion", 1)
    assert finished.stop_reason == "completed"
    client = MlflowClient()
    assert [m.step for m in client.get_metric_history(stopped.run_id, "val_loss")] == [1]
    assert [m.step for m in client.get_metric_history(finished.run_id, "val_loss")] == [1, 2, 3]
    # the frozen member's registered model is its epoch-1 weights, whatever the others did
    assert tracking.load_bundle(stopped.model_uri).epoch == 1


def test_a_member_whose_training_diverges_ends_alone_and_the_others_go_on(store, smoke_data):
    """As a chain that diverges alone: its run FAILED with the error said, its checkpoint kept;
    the member beside it trains every epoch and registers, as if it were alone."""
    diverging = settings("mae", 1, smoke_data, seed=1, start_lr=1e30, max_nonfinite_steps=2)
    going_on = settings("combined", 1, smoke_data, seed=0)
    failed, finished = train_phases([diverging, going_on])
    assert failed.status == "failed" and failed.model_uri is None
    assert "2 non-finite steps in a row at epoch 1: training diverged" in failed.stop_reason
    assert finished.status == "registered" and finished.stop_reason == "completed"
    client = MlflowClient()
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert client.get_run(finished.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(finished.run_id, "val_loss")] == [1, 2, 3]
    assert tracking.load_bundle(finished.model_uri).epoch == finished.best_epoch
    with pytest.raises(TrainingError, match="training diverged"):  # alone: the error itself
        train_phase(dataclasses.replace(diverging, seed=2))


def test_members_of_other_shapes_are_refused_in_one_line(store, smoke_data):
    code, out = run_cli(
        "study", "--batched", "--preset", "smoke", "--strategy", "mae", "--seeds", "0",
        "--data_dir", str(smoke_data), "--ray_address", "127.0.0.1:1",
    )  # fmt: skip
    assert code == 2 and out.splitlines()[-1].startswith(
        "error: --batched trains every chain in this process: leave out --ray_address"
    )
    with pytest.raises(Exception, match="cannot train as one stack: --hidden_size 8 against 16"):
        train_phases(
            [settings("mae", 1, smoke_data), settings("mae", 1, smoke_data, hidden_size=8, seed=1)]
        )


def run_cli(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output.strip()


@pytest.mark.slow
def test_a_killed_batched_study_goes_on_from_every_members_checkpoint(store, smoke_data, tmp_path):
    """kill -9 in the middle of a phase, the same command again: every chain finishes, each
    member went on from its own checkpoint, and no metric step was logged twice."""
    command = [
        sys.executable, "-m", "seqgen.cli", "study", "--batched", "--preset", "smoke",
        "--strategy", "mae,combined", "--seeds", "0,1", "--phases", "1-2", "--epochs", "30",
        "--data_dir", str(smoke_data),
    ]  # fmt: skip
    env = subprocess_env(store)
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True)
    client = MlflowClient()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # until every member of phase 1 logged some epochs
        runs = mlflow.search_runs(
            search_all_experiments=True, filter_string="tags.kind = 'phase'", output_format="list"
        )
        steps = [len(client.get_metric_history(r.info.run_id, "val_loss")) for r in runs]
        if len(runs) == 4 and min(steps) >= 5:
            break
        assert proc.poll() is None, "the study ended before it was killed"
        time.sleep(0.5)
    else:
        pytest.fail("phase 1 did not get going")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "taken up after epoch" in again.stderr
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.kind = 'phase'", output_format="list"
    )
    assert sorted(r.info.run_name for r in runs) == sorted(
        f"{s}+epochs=30-p{p}-s{seed}"
        for s in ("mae", "combined")
        for p in (1, 2)
        for seed in (0, 1)
    )
    for run in runs:
        assert run.info.status == "FINISHED"
        first = 1 if run.data.tags["phase"] == "1" else 31
        for key in ("val_loss", "train_mae", "lr"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(first, first + 30)), (run.info.run_name, key)
    # every chain's run (#17) carries its two phases' curves at the global epochs, each step
    # once through the kill, and the study ends by saying where to compare them
    chains = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.kind = 'chain'", output_format="list"
    )
    assert sorted(r.info.run_name for r in chains) == sorted(
        f"{s}+epochs=30-s{seed}" for s in ("mae", "combined") for seed in (0, 1)
    )
    for chain in chains:
        assert chain.info.status == "FINISHED"
        for key in ("val_loss", "val_mae", "val_autocorr", "train_loss", "lr"):
            steps = [m.step for m in client.get_metric_history(chain.info.run_id, key)]
            assert sorted(steps) == list(range(1, 61)), (chain.info.run_name, key)
    for run in runs:  # each phase nests under its own chain's run
        parent = client.get_run(run.data.tags["mlflow.parentRunId"])
        assert parent.info.run_name == f"{run.data.tags['variant']}-s{run.data.tags['seed']}"
    assert "workflowType=machine_learning" in again.stderr
