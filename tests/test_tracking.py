"""The store under chains that run at once: what several processes log together lands for each."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import subprocess_env
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from seqgen.runs import tracking

LOG_AT = """
import sys, time
from pathlib import Path
from seqgen.runs import tracking
run_id, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()  # mlflow imported: waiting at the barrier
while not go.exists():
    time.sleep(0.01)
tracking.log_dataset(run_id, "data", "f1ngerpr1nt", {"train": 4400, "val": 550, "test": 50})
"""


@pytest.mark.slow
def test_chains_logging_the_same_data_at_once_each_record_it(store, tmp_path):
    """Each phase run records its data as a dataset input; chains that start together race to
    create the one dataset row, and every one of them must still record it."""
    exp = tracking.experiment_id()
    runs = [tracking.create_run(exp, f"chain-{i}", {}, None) for i in range(8)]
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOG_AT, run_id, str(tmp_path / f"ready-{i}"), str(go)],
            env=subprocess_env(store),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, run_id in enumerate(runs)
    ]
    # a barrier that waits for every process however loaded the machine is (a fixed delay that
    # some miss would let the test pass without the race)
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready-{i}").exists() for i in range(len(runs))):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(runs), outputs
    client = MlflowClient()
    for run_id in runs:
        [logged] = client.get_run(run_id).inputs.dataset_inputs
        assert (logged.dataset.name, logged.dataset.digest) == ("data", "f1ngerpr1nt")


def test_a_call_that_lost_a_race_is_tried_again_and_a_real_error_still_surfaces():
    """Two seeds' chains set the alias phase-2 at once: the loser's insert fails on the unique key
    (seen in `benchmarks/study_vs_pipeline.py` on sqlite) and succeeds when tried again."""
    attempts = []

    def loses_twice(alias):
        attempts.append(alias)
        if len(attempts) <= 2:
            raise MlflowException("UNIQUE constraint failed: registered_model_aliases.alias")
        return alias

    assert tracking.despite_races(loses_twice, "phase-2") == "phase-2"
    assert attempts == ["phase-2"] * 3

    def always_fails():
        attempts.append("bad")
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: no such model")

    attempts.clear()
    with pytest.raises(MlflowException, match="no such model"):
        tracking.despite_races(always_fails)
    assert len(attempts) == 3


def test_a_model_linked_to_its_run_by_a_process_that_died_is_filled(store, smoke_data):
    """Model.log links the model to the run (its first write), then uploads. A process killed
    between the two leaves a link that the rerun's Model.log may not make again (the store's
    unique key): the rerun uploads the files alone and the version loads and predicts."""
    import mlflow
    import pandas as pd
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    from seqgen.config import resolve
    from seqgen.training.train import train_phase

    done = train_phase(resolve("mae", 1, "smoke", data_dir=str(smoke_data), epochs=1))
    client = MlflowClient()
    experiment = client.get_run(done.run_id).info.experiment_id
    run_id = client.create_run(experiment).info.run_id
    model_id = client.create_logged_model(experiment, name="model", source_run_id=run_id).model_id
    client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])  # then the kill
    name = "seqgen-refilled"
    version, reserved = tracking.reserve_version(run_id, name, {})
    assert reserved == model_id  # the dead process's model, not a second one
    best = f"{done.output_dir}/best_model.pth"
    tracking.complete_version(run_id, best, name, version, model_id, ["phase-1-s0"], {})
    assert client.get_logged_model(model_id).status == LoggedModelStatus.READY
    frame = pd.DataFrame({"nu": [0.05], "amplitude": [1.0]})
    predicted = mlflow.pyfunc.load_model(f"models:/{name}@phase-1-s0").predict(frame)
    assert len(predicted) == 151 and predicted["pc1"].notna().all()
