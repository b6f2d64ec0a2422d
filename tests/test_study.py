"""`seqgen study` for real: a local Ray instance whose driver is killed and rerun, a Ray cluster
that loses the node a chain trains on, and a PostgreSQL-backed `mlflow server` that goes away in
the middle of a phase. Nothing is mocked; every server and cluster is ended with all its
processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from conftest import free_port, subprocess_env
from mlflow.tracking import MlflowClient
from services import MlflowServer, PostgresServer, RayCluster, group_members

from seqgen.cli import main
from seqgen.config import resolve
from seqgen.training.epochs import PER_EPOCH_METRICS
from seqgen.training.train import train_phase

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
        "combined-p1-s0",
        "combined-p2-s0",
        "mae-p1-s0",
        "mae-p2-s0",
    ]
    assert interrupted.info.run_id in {r.info.run_id for r in runs}  # taken up, not restarted
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["seqgen.phase_state"] == "registered"
        first_epoch = 1 if run.data.tags["phase"] == "1" else 7
        assert_each_epoch_once(client, run, first_epoch, first_epoch + 5)
    by_name = {r.info.run_name: r for r in runs}
    for strategy in ("mae", "combined"):
        parent = by_name[f"{strategy}-p1-s0"].data.tags["model_version"]
        continued = by_name[f"{strategy}-p2-s0"].data.tags["continued_from"]
        assert continued == f"models:/seqgen-{strategy}-smoke/{parent}"
    table = again.stderr.splitlines()
    assert any(line.startswith("mae-s0") and line.endswith("done") for line in table)

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
    failed = [line for line in lines if line.startswith("autocorr-s0") and "failed:" in line]
    assert failed and "run phase 1 of autocorr with seed 0 first" in failed[-1]  # the table row
    assert any(line.startswith("mae-s0") and line.endswith("done") for line in lines)


# ---- a team setup: PostgreSQL, mlflow server, a Ray cluster -------------------------------------


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    """PostgreSQL as the backend store of a real `mlflow server` with proxied artifacts."""
    folder = tmp_path_factory.mktemp("team")
    with PostgresServer() as db:
        server = MlflowServer(db.uri, folder / "artifacts")
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def on_server(team_server, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", tmp_path.name)  # one experiment per test
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(team_server.uri)
    return team_server


def in_experiment(client: MlflowClient, name: str) -> list:
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], "tags.kind = 'phase'") if exp else []


@pytest.mark.slow
def test_a_lost_node_is_retried_on_another_and_the_chain_finishes(
    on_server, smoke_data, tmp_path, monkeypatch
):
    """The nodes are machines of their own (their own process tables): the other node tells the
    lost one's lease holder dead only by its lease, which lapses."""
    client = MlflowClient()
    env = subprocess_env(on_server.uri) | {"MLFLOW_EXPERIMENT_NAME": tmp_path.name}
    monkeypatch.setenv("SEQGEN_LEASE_SECONDS", "8")  # every node's processes inherit it
    with RayCluster() as cluster:
        nodes = [cluster.add_node(num_cpus=1, process_table=f"machine-{i}") for i in range(2)]
        cmd = [
            SEQGEN,
            "study",
            "--preset",
            "smoke",
            "--strategy",
            "mae",
            "--seeds",
            "0",
            "--phases",
            "1",
            "--epochs",
            "12",
            "--data_dir",
            str(smoke_data),
            "--ray-address",
            cluster.address,
        ]
        driver = start(cmd, env, tmp_path)
        run = wait_for(lambda: epochs_logged(client, 2), 300, "two epochs on a node", driver)
        node_prefix = Path(run.data.params["output_dir"]).parts[1].removeprefix("node-")
        [busy] = [n for n in nodes if n.node_id.startswith(node_prefix)]
        cluster.remove_node(busy, graceful=False)  # the machine is lost in the middle of the phase
        out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out
    [finished] = in_experiment(client, tmp_path.name)
    assert finished.info.run_id == run.info.run_id and finished.info.status == "FINISHED"
    assert_each_epoch_once(client, finished, 1, 12)
    # the other node took the phase up from the store's checkpoint, not from epoch 1
    [other] = [n for n in nodes if n is not busy]
    folder = tmp_path / "outputs" / f"node-{other.node_id[:8]}" / "smoke-s0" / "100mae_1_12"
    assert (folder / "checkpoint_epoch_12.pth").exists()
    assert not (folder / "checkpoint_epoch_1.pth").exists()

    # equal to an undisturbed run (one thread, as the chain trains)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"{tmp_path.name}-undisturbed")
    try:
        s = resolve("mae", 1, "smoke", data_dir=str(smoke_data), epochs=12, outputs_root="ref")
        reference = train_phase(s)
    finally:
        torch.set_num_threads(threads)
    for key in ("train_loss", "val_loss", "test_loss", "grad_norm"):
        mine = [m.value for m in client.get_metric_history(finished.info.run_id, key)]
        theirs = [m.value for m in client.get_metric_history(reference.run_id, key)]
        assert mine == theirs, key


@pytest.mark.slow
def test_a_server_outage_neither_stops_training_nor_loses_a_record(on_server, smoke_data, tmp_path):
    client = MlflowClient()
    env = subprocess_env(on_server.uri) | {"MLFLOW_EXPERIMENT_NAME": tmp_path.name}
    cmd = [
        SEQGEN,
        "train",
        "--strategy",
        "mae",
        "--phase",
        "1",
        "--preset",
        "smoke",
        "--epochs",
        "24",
        "--data_dir",
        str(smoke_data),
    ]
    proc = start(cmd, env, tmp_path)
    wait_for(lambda: epochs_logged(client, 2), 300, "two epochs", proc)
    os.kill(proc.pid, signal.SIGSTOP)  # held while the server stops, so the phase is mid-way
    on_server.stop()
    os.kill(proc.pid, signal.SIGCONT)
    time.sleep(20)
    on_server.start()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    lines = out.splitlines()
    away = next((i for i, line in enumerate(lines) if "tracking server unreachable" in line), None)
    backs = [i for i, line in enumerate(lines) if "tracking server back after" in line]
    back = backs[-1] if backs else None
    assert away is not None and back is not None, out
    trained_meanwhile = [line for line in lines[away:back] if "] epoch " in line]
    assert trained_meanwhile, out  # training went on while the server was away
    [run] = in_experiment(client, tmp_path.name)
    assert run.info.status == "FINISHED"
    assert_each_epoch_once(client, run, 1, 24)
    names = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {f"checkpoints/checkpoint_epoch_{e}.pth" for e in range(1, 25)} <= names

    # An outage longer than --max_outage: the phase pauses with a local checkpoint, one line.
    longer = [*cmd, "--max_outage", "3", "--seed", "1"]
    longer[longer.index("24")] = "80"  # long enough that the outage outlasts --max_outage
    proc = start(longer, env, tmp_path)
    wait_for(lambda: epochs_logged(client, 2), 300, "two epochs", proc)
    os.kill(proc.pid, signal.SIGSTOP)
    on_server.stop()
    os.kill(proc.pid, signal.SIGCONT)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        on_server.start()
    assert proc.returncode == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"error: the tracking server at {on_server.uri} has been unreachable")
    assert "paused after epoch" in last and "run the same command again to resume" in last
    # The same command again once the server answers its API (not only /health): a server just
    # restarted on a loaded machine can take longer than --max_outage 3 to answer its first call.
    wait_for(lambda: api_answers(client), 120, "the restarted server's API")
    resumed = subprocess.run(
        longer, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "taken up after epoch" in resumed.stderr
    paused = [r for r in in_experiment(client, tmp_path.name) if r.data.tags["seed"] == "1"]
    [run] = paused
    assert_each_epoch_once(client, run, 1, 80)


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


HOG = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)

@ray.remote(num_cpus=1)
class Hog:
    def ping(self):
        return True

hog = Hog.options(name="seqgen-test-hog", lifetime="detached").remote()
assert ray.get(hog.ping.remote(), timeout=120)
"""


@pytest.mark.slow
def test_a_study_no_node_can_run_is_refused_and_chains_waiting_for_cpus_give_up(
    on_server, smoke_data, tmp_path
):
    """--threads_per_chain beyond every node's CPUs: one line before anything starts. CPUs held
    by another job for good: the chain fails after --max_pending with its reason, and the
    study's run ends FAILED instead of waiting forever."""

    client = MlflowClient()
    env = subprocess_env(on_server.uri) | {"MLFLOW_EXPERIMENT_NAME": tmp_path.name}
    with RayCluster() as cluster:
        cluster.add_node(num_cpus=1)
        cmd = [SEQGEN, "study", "--preset", "smoke", "--strategy", "mae", "--seeds", "0"]
        cmd += ["--phases", "1", "--epochs", "2", "--data_dir", str(smoke_data)]
        cmd += ["--ray-address", cluster.address]
        refused = subprocess.run(
            [*cmd, "--threads_per_chain", "2"], env=env, cwd=tmp_path, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr.strip().startswith(
            "error: --threads_per_chain 2: no node of the Ray cluster has 2 CPUs (the most on "
            "one node: 1)"
        ), refused.stderr
        assert refused.stderr.strip().count("\n") == 0 and refused.stdout == ""
        assert client.get_experiment_by_name(tmp_path.name) is None  # nothing started

        # another job that holds the node's only CPU: a detached actor of a driver of its own
        hog = subprocess.run(
            [sys.executable, "-c", HOG, cluster.address], env=env, capture_output=True,
            text=True, timeout=200,
        )  # fmt: skip
        assert hog.returncode == 0, hog.stderr[-3000:]
        waited = subprocess.run(
            [*cmd, "--max_pending", "5"], env=env, cwd=tmp_path, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
    assert waited.returncode == 1, waited.stdout + waited.stderr
    out = waited.stdout + waited.stderr
    assert "failed: waited 5 s for a node with 1 CPU(s) while no chain ran (--max_pending)" in out
    [study] = client.search_runs(
        [client.get_experiment_by_name(tmp_path.name).experiment_id], "tags.kind = 'study'"
    )
    assert study.info.status == "FAILED" and study.data.tags["failed_chains"] == "mae-s0"
