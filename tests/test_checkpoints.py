"""The time-aware checkpoint cadence (#14): fast epochs are not all written and sent, and every
epoch whose metrics the store has is covered by a stored checkpoint."""

import subprocess
import sys
import textwrap

import mlflow
import pytest
from conftest import subprocess_env
from mlflow.tracking import MlflowClient

from seqgen.model.bundle import Checkpoint
from seqgen.runs import tracking
from seqgen.runs.keeper import LAST_CHECKPOINT, checkpoint_due


def test_checkpoint_due_keeps_the_original_files_and_otherwise_waits_for_the_interval():
    # save_every 10, 100 epochs: every 10th and the last, whatever the clock says
    assert checkpoint_due(20, 10, 100, seconds_since=0.0, every_seconds=30.0)
    assert checkpoint_due(100, 10, 100, seconds_since=0.0, every_seconds=30.0)
    assert not checkpoint_due(21, 10, 100, seconds_since=29.9, every_seconds=30.0)
    assert checkpoint_due(21, 10, 100, seconds_since=30.0, every_seconds=30.0)
    # an interval of 0 is the original's every-epoch checkpoint
    assert all(checkpoint_due(e, 10, 100, 0.0, 0.0) for e in range(1, 101))


TRAIN_THEN_DIE = textwrap.dedent(
    """
    import os, sys
    from seqgen.config import resolve
    from seqgen.runs.keeper import RunOptions
    from seqgen.training.train import train_phase
    from seqgen import log

    log.setup(log.NORMAL)
    data, die_at, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

    def on_epoch(settings, record, last_epoch, eta):
        if record.epoch == die_at:
            os._exit(9)  # as a kill -9 would: no cleanup, no flush

    settings = resolve("mae", 1, "smoke", data_dir=data, epochs=9, save_every=4)
    train_phase(settings, RunOptions(checkpoint_seconds=interval, on_epoch=on_epoch))
    """
)


@pytest.mark.slow
def test_a_process_killed_between_checkpoints_logged_only_what_a_checkpoint_covers(
    store, smoke_data, tmp_path
):
    """With a long interval, epochs 5 and 6 are trained but not checkpointed when the process
    dies: the store has no metric past the checkpoint it holds, the rerun goes on from epoch 4,
    and in the end every epoch is logged exactly once."""
    env = subprocess_env(store)

    def train(die_at: int) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", TRAIN_THEN_DIE, str(smoke_data), str(die_at), "1e9"]
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)

    died = train(die_at=6)
    assert died.returncode == 9, died.stderr[-3000:]
    folder = next(tmp_path.glob("outputs/**/" + LAST_CHECKPOINT)).parent
    assert Checkpoint.load(folder / LAST_CHECKPOINT).bundle.epoch == 4
    assert sorted(p.name for p in folder.glob("checkpoint_epoch_*.pth")) == [
        "checkpoint_epoch_4.pth"
    ]
    client = MlflowClient()
    (run,) = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.kind = 'phase'", output_format="list"
    )
    logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss"))
    assert set(logged) <= {1, 2, 3, 4} and len(logged) == len(set(logged))
    stored = tracking.download(run.info.run_id, f"checkpoints/{LAST_CHECKPOINT}", tmp_path / "s")
    if logged:  # the courier had time to deliver: its checkpoint came first
        assert stored is not None and Checkpoint.load(stored).bundle.epoch >= max(logged)

    again = train(die_at=0)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "taken up after epoch 4" in again.stderr
    for key in ("val_loss", "train_loss", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(1, 10)), key
    assert sorted(p.name for p in folder.glob("checkpoint_epoch_*.pth")) == [
        "checkpoint_epoch_4.pth",
        "checkpoint_epoch_8.pth",
        "checkpoint_epoch_9.pth",
    ]
