"""The test services themselves: a PostgreSQL-backed `mlflow server` with proxied artifacts that
survives a restart on its port, Ray on one node and on several, and nothing left running after."""

import contextlib
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from services import (
    MlflowServer,
    PostgresServer,
    RayCluster,
    group_members,
    live,
    local_ray,
    postgres_missing,
    require,
    with_descendants,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres():
    require(postgres_missing())
    with PostgresServer() as pg:
        yield pg


def pgrep_group(pgid: int) -> list[str]:
    """What `pgrep -g` sees of a process group, zombies included, as an outside check."""
    out = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [pid for pid in out.split() if live([int(pid)])]


def job_runners(pgid: int) -> int:
    """The server's job-runner processes (huey consumers) in its process group; the server
    starts them beside itself, possibly after it answers /health."""
    commands = []
    for pid in group_members(pgid):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            commands.append(Path(f"/proc/{pid}/cmdline").read_bytes())
    return sum(b"huey_consumer" in c for c in commands)


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_postgres_server_proxies_artifacts_and_keeps_runs_across_a_restart(postgres, tmp_path):
    artifacts = tmp_path / "artifacts"
    server = MlflowServer(postgres.uri, artifacts, job_runner=True)
    server.start()
    pgid = server.proc.pid
    try:
        assert wait_until(lambda: job_runners(pgid) >= 1, 60)  # the job runner, in the group
        client = MlflowClient(server.uri)
        run = client.create_run("0", run_name="outage")
        client.log_metric(run.info.run_id, "val_loss", 0.5, step=1)
        (tmp_path / "note.txt").write_text("through the server")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        # proxied: the file lands in --artifacts-destination, written by the server
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert [p.read_text() for p in artifacts.rglob("note.txt")] == ["through the server"]
    finally:
        server.stop()  # a failed check leaves no server running behind it either
    assert pgrep_group(pgid) == []
    with pytest.raises(OSError):
        urllib.request.urlopen(server.uri + "/health", timeout=2)

    # back on the same port (without the job runner: 10 s sooner), with the same store
    server.job_runner = False
    with server:
        client = MlflowClient(server.uri)
        client.log_metric(run.info.run_id, "val_loss", 0.4, step=2)
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.4)]
        got = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "back"))
        assert Path(got).read_text() == "through the server"
        pgid = server.proc.pid
    assert pgrep_group(pgid) == []


def test_database_copies_from_a_template_are_independent(postgres):
    import psycopg2

    def sql(database, statement):
        con = psycopg2.connect(host="127.0.0.1", port=postgres.port, user="mlflow", dbname=database)
        with con, con.cursor() as cur:  # commits
            cur.execute(statement)
            rows = cur.fetchall() if cur.description else None
        con.close()  # a template must have no open connection
        return rows

    postgres.create_database("source")
    sql("source", "CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    postgres.create_database("copy", template="source")
    sql("copy", "INSERT INTO t VALUES (2)")
    assert sql("copy", "SELECT x FROM t ORDER BY x") == [(1,), (2,)]
    assert sql("source", "SELECT x FROM t") == [(1,)]


def test_postgres_stops_without_leftovers():
    require(postgres_missing())
    pg = PostgresServer().start()
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    processes = with_descendants([postmaster])
    assert len(processes) >= 3  # postmaster, checkpointer, writer...
    pg.close()
    assert live(processes) == [] and not pg.dir.exists()


def test_local_ray_gives_tasks_their_cpus_and_leaves_nothing(monkeypatch):
    import ray

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # Ray keeps a value the shell set
    auth_before = os.environ.get("RAY_AUTH_MODE")
    with local_ray(num_cpus=2):
        node = ray._private.worker._global_node
        services = [i.process.pid for infos in node.all_processes.values() for i in infos]

        @ray.remote
        def threads():
            return os.environ["OMP_NUM_THREADS"], ray.get_runtime_context().get_assigned_resources()

        assert ray.get(threads.options(num_cpus=2).remote()) == ("2", {"CPU": 2.0})
        processes = with_descendants(services)  # now with the worker that ran the task
    assert live(processes) == [] and not ray.is_initialized()
    assert os.environ.get("RAY_AUTH_MODE") == auth_before


def test_ray_cluster_places_tasks_and_retries_on_another_node_when_one_is_lost(tmp_path):
    import ray

    with RayCluster() as cluster:
        a = cluster.add_node(num_cpus=1, resources={"node_a": 1})
        b = cluster.add_node(num_cpus=1, resources={"node_b": 1})
        cluster.connect()

        @ray.remote(num_cpus=1, max_retries=1)
        def chain(marks: str, seconds: float) -> str:
            node = ray.get_runtime_context().get_node_id()
            Path(marks, f"{node}-{time.time_ns()}").touch()  # one mark per attempt
            time.sleep(seconds)
            return node

        # a custom resource puts a task on the node that has it
        assert ray.get(chain.options(resources={"node_b": 1}).remote(str(tmp_path), 0)) == b.node_id
        for mark in tmp_path.iterdir():
            mark.unlink()

        ref = chain.remote(str(tmp_path), 3)
        deadline = time.monotonic() + 60
        while not list(tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        first = next(tmp_path.iterdir()).name.split("-")[0]
        lost, other = (a, b) if first == a.node_id else (b, a)
        processes = with_descendants(
            i.process.pid for infos in lost.all_processes.values() for i in infos
        )
        cluster.remove_node(lost, graceful=False)  # SIGKILL: a machine lost mid-task
        assert live(processes) == []  # its worker went with it

        assert ray.get(ref, timeout=60) == other.node_id
        attempts = sorted(m.name.split("-")[0] for m in tmp_path.iterdir())
        assert sorted(attempts) == sorted([lost.node_id, other.node_id])
        everything = with_descendants(
            i.process.pid
            for n in (cluster.head, other)
            for infos in n.all_processes.values()
            for i in infos
        )
    assert live(everything) == []
