"""`seqgen study` for real: a local Ray instance whose driver is killed and rerun, and bad input
(the team setup's faults, a lost node, a server outage, CPUs no chain gets, are in test_team.py).
Nothing is mocked; every Ray instance is ended with all its processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from conftest import free_port, subprocess_env
from mlflow.tracking import MlflowClient
from services import group_members

from seqgen.cli import main
from seqgen.training.epochs import PER_EPOCH_METRICS

SEQGEN = str(Path(sys.executable).with_name("seqgen"))


def phase_runs(client: MlflowClient) -> list:
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.kind = 'phase'"
    )
    return sorted(runs, key=lambda r: r.info.run_name)


def steps(client: MlflowClient, run_id: str, key: str = "val_loss") -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def assert_each_epoch_once(client: MlflowClient, run, first: int, last: int) -> None:
    """Every per-epoch metric at every epoch of the phase, once, in order."""
    for key in PER_EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == list(range(first, last + 1)), (run.info.run_name, key)
        stamps = [m.timestamp for m in history]
        assert stamps == sorted(stamps), (run.info.run_name, key)  # delivered in order


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            output = proc.stdout.read()[-3000:] if proc.stdout else ""
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}:\n{output}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def epochs_logged(client: MlflowClient, at_least: int):
    """A RUNNING phase run with at least this many epochs in the store, or None."""
    for run in phase_runs(client):
        if run.info.status == "RUNNING" and len(steps(client, run.info.run_id)) >= at_least:
            return run
    return None


def api_answers(client: MlflowClient) -> bool:
    try:
        client.search_experiments(max_results=1)
    except Exception:  # refused, timed out or a server error: not yet
        return False
    return True


def start(cmd: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    """A command in a session of its own, so it can be killed with everything it started."""
    return subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole session: the driver, its local Ray instance and the chains' workers, as
    when the machine goes down."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    wait_for(lambda: not group_members(proc.pid), 30, "the killed processes to be gone")


# ---- a local Ray instance: killed, rerun, rerun -------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)  # four studies on 2 cores: over 300 s when other tests share them
def test_a_killed_study_continues_where_it_stopped(store, smoke_data, tmp_path):
    client = MlflowClient()
    cmd = [
        SEQGEN,
        "study",
        "--preset",
        "smoke",
        "--strategy",
        "mae,combined",
        "--seeds",
        "0",
        "--phases",
        "1-2",
        "--epochs",
        "6",
        "--data_dir",
        str(smoke_data),
    ]
    env = subprocess_env(store)
    first = start(cmd, env, tmp_path)
    interrupted = wait_for(lambda: epochs_logged(client, 2), 300, "two epochs of a phase", first)
    kill_group(first)
    assert client.get_run(interrupted.info.run_id).info.status == "RUNNING"  # left by the dead

    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    runs = phase_runs(client)
    assert [r.info.run_name for r in runs] == [
        "combined+epochs=6-p1-s0",
        "combined+epochs=6-p2-s0",
        "mae+epochs=6-p1-s0",
        "mae+epochs=6-p2-s0",
    ]
    assert interrupted.info.run_id in {r.info.run_id for r in runs}  # taken up, not restarted
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["seqgen.phase_state"] == "registered"
        first_epoch = 1 if run.data.tags["phase"] == "1" else 7
        assert_each_epoch_once(client, run, first_epoch, first_epoch + 5)
    by_name = {r.info.run_name: r for r in runs}
    for variant in ("mae+epochs=6", "combined+epochs=6"):
        parent = by_name[f"{variant}-p1-s0"].data.tags["model_version"]
        continued = by_name[f"{variant}-p2-s0"].data.tags["continued_from"]
        assert continued == f"models:/seqgen-{variant}-smoke/{parent}"
    table = again.stderr.splitlines()
    assert any(line.startswith("mae+epochs=6-s0") and line.endswith("done") for line in table)

    # The same command once more: every phase registered, nothing trained or logged again.
    before = {r.info.run_id: steps(client, r.info.run_id) for r in runs}
    third = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr
    assert {r.info.run_id: steps(client, r.info.run_id) for r in phase_runs(client)} == before

    # A chain that cannot run (autocorr has no phase 1) fails with its reason; the other ends.
    mixed_cmd = [*cmd]
    mixed_cmd[mixed_cmd.index("mae,combined")] = "mae,autocorr"
    mixed_cmd[mixed_cmd.index("1-2")] = "2"
    mixed = subprocess.run(
        mixed_cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert mixed.returncode == 1
    lines = mixed.stderr.splitlines()
    failed = [
        line for line in lines if line.startswith("autocorr+epochs=6-s0") and "failed:" in line
    ]
    assert failed and "run phase 1 of autocorr+epochs=6 with seed 0 first" in failed[-1]
    assert any(line.startswith("mae+epochs=6-s0") and line.endswith("done") for line in lines)


# ---- bad input: one line, nothing started -------------------------------------------------------


def run_study_cli(*args):
    result = CliRunner().invoke(main, ["study", "--preset", "smoke", *args])
    return result.exit_code, result.output.strip()


@pytest.fixture
def listening_port():
    """A port where something listens (so a Ray address probe gets through)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_study_bad_input_is_one_line_and_starts_nothing(store, smoke_data, listening_port):
    data = ["--data_dir", str(smoke_data)]
    cases = [
        (["--strategy", "l1", *data], "error: unknown strategy 'l1'"),
        (["--seeds", "0,x", *data], "error: --seeds must be comma-separated integers"),
        (["--seeds", "1,1", *data], "error: --seeds must be distinct non-negative integers"),
        (["--data_dir", "no-such-folder"], "error: data folder 'no-such-folder' does not exist"),
        (
            [*data, "--ray-address", f"127.0.0.1:{free_port()}"],
            "error: no Ray cluster answers at --ray-address 127.0.0.1:",
        ),
        (
            [*data, "--ray-address", f"127.0.0.1:{listening_port}"],
            "error: --ray-address needs one tracking server for every node",
        ),
    ]
    for args, message in cases:
        code, out = run_study_cli(*args)
        assert code == 2 and out.count("\n") == 0 and out.startswith(message), (args, out)
    uri = f"http://127.0.0.1:{free_port()}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        mlflow.set_tracking_uri(uri)
        code, out = run_study_cli(*data)
        assert code == 2 and out.startswith(f"error: MLflow tracking server {uri} is unreachable")
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = store
        mlflow.set_tracking_uri(store)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
