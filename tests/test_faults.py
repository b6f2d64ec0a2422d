"""Faults injected for real against a real store, and what the docs promise of each: the same
command again goes on, nothing is lost or done twice, the model registered is the best epoch's,
a live trainer is never taken over, credentials are never printed (docs/operations.md: Faults)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env
from mlflow.tracking import MlflowClient
from services import ApiProxy, MlflowServer, PostgresServer
from test_study import assert_each_epoch_once, start, steps, wait_for

from seqgen.config import resolve
from seqgen.model.bundle import Bundle, Checkpoint
from seqgen.runs import tracking
from seqgen.runs.keeper import RunOptions
from seqgen.training.train import train_phase

SEQGEN = str(Path(sys.executable).with_name("seqgen"))
SECRET = "s3cr3t-PASS"


def phase_runs(client) -> list:
    """Every phase run of the store, whatever experiment the command put it in."""
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, "tags.kind = 'phase'")


def settings(data, root: str, **kw):
    return resolve("mae", 1, "smoke", data_dir=str(data), outputs_root=root, **kw)


def steps_once(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    """Every metric of the run: its steps, asserted to be logged once each."""
    run = client.get_run(run_id)
    found = {}
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert [s for s, n in Counter(steps).items() if n > 1] == [], (key, steps)
        found[key] = sorted(steps)
    return found


def test_the_best_epochs_model_is_registered_whatever_path_the_phase_took(
    store, smoke_data, tmp_path, monkeypatch
):
    """Machine A trains epochs 1-2 and pauses; machine B takes the phase up, trains 3-6 and dies
    between the end-of-phase metrics and registering; the same command on A again registers B's
    best epoch (not A's stale best_model.pth) and logs no step twice."""
    client = MlflowClient()
    a, b = settings(smoke_data, "A", epochs=6), settings(smoke_data, "B", epochs=6)
    paused = train_phase(a, RunOptions(stop_at_epoch=2))
    stale = Bundle.load(tmp_path / "A/smoke-s0/mae+epochs=6_1_6/best_model.pth")
    assert (paused.status, stale.epoch) == ("paused", paused.best_epoch)

    def dies(*args, **kwargs):  # the process is killed while it registers
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tracking, "reserve_version", dies)
        with pytest.raises(KeyboardInterrupt):
            train_phase(b)
    run = client.get_run(paused.run_id)
    assert run.info.status == "KILLED" and run.data.tags[tracking.PHASE_STATE] == "trained"
    best = int(run.data.metrics["best_epoch"])
    assert best > 2, "B improved on A's epochs (else A's file is not stale)"
    b_best = Bundle.load(tmp_path / "B/smoke-s0/mae+epochs=6_1_6/best_model.pth")
    assert b_best.epoch == best

    done = train_phase(a)  # the same command on A again
    assert (done.status, done.run_id, done.best_epoch) == ("registered", paused.run_id, best)
    registered = tracking.load_bundle(done.model_uri)
    assert registered.epoch == best
    for name, weights in b_best.state_dict.items():
        assert torch.equal(weights, registered.state_dict[name]), name
    assert Bundle.load(tmp_path / "A/smoke-s0/mae+epochs=6_1_6/best_model.pth").epoch == best
    # nothing twice: every epoch's metrics once, the end-of-phase ones once at the last epoch
    steps = steps_once(client, done.run_id)
    assert steps["val_loss"] == [1, 2, 3, 4, 5, 6]
    assert steps["best_val_loss"] == [6]
    assert versions(client, "seqgen-mae+epochs=6-smoke") == ["1"]


def versions(client: MlflowClient, name: str = "seqgen-mae-smoke") -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def stored(client: MlflowClient, run_id: str, name: str) -> Path:
    return Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://")) / name


def test_an_unreadable_checkpoint_is_set_aside_and_a_readable_one_used(
    store, smoke_data, tmp_path, said
):
    """The store's checkpoint cut short (a node lost during its upload) with a good copy here:
    the phase goes on from this one, in one line, and the store gets a readable one. None
    readable: the phase starts over in a new run, said, the old run kept as FAILED."""
    client = MlflowClient()
    s = settings(smoke_data, "out", epochs=4)
    paused = train_phase(s, RunOptions(stop_at_epoch=2))
    in_store = stored(client, paused.run_id, "checkpoints/last_checkpoint.pth")
    truncate(in_store)
    done = train_phase(s)
    assert (done.status, done.run_id) == ("registered", paused.run_id)
    assert any("checkpoints/last_checkpoint.pth in the store cannot be read" in x for x in said)
    assert "taken up after epoch 2" in "\n".join(said)
    assert steps_once(client, done.run_id)["val_loss"] == [1, 2, 3, 4]
    assert len(Checkpoint.load(in_store).progress["history"]) == 4  # replaced, readable

    s1 = settings(smoke_data, "out", epochs=4, seed=1)
    paused = train_phase(s1, RunOptions(stop_at_epoch=2))
    local = tmp_path / "out/smoke-s1/mae+epochs=4_1_4/last_checkpoint.pth"
    truncate(local)
    truncate(stored(client, paused.run_id, "checkpoints/last_checkpoint.pth"))
    said.clear()
    again = train_phase(s1)
    assert again.status == "registered" and again.run_id != paused.run_id
    assert any("has no readable checkpoint: the phase starts over" in x for x in said)
    old = client.get_run(paused.run_id)
    assert old.info.status == "FAILED" and old.data.tags[tracking.PHASE_STATE] == "abandoned"
    assert steps_once(client, again.run_id)["val_loss"] == [1, 2, 3, 4]


# ---- processes racing, clocks that disagree ----------------------------------------------------

RACE = """
import sys, time
from pathlib import Path
from seqgen.cli import run
from seqgen.runs import keeper
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
found = keeper.find_run

def find_then_wait(*args, **kwargs):
    # both processes look for the phase's run and see none, then both claim it
    result = found(*args, **kwargs)
    if not go.exists() or not ready.exists():
        ready.touch()
        while not go.exists():
            time.sleep(0.05)
    return result

keeper.find_run = find_then_wait
sys.argv = ["seqgen", *sys.argv[3:]]
run()
"""


@pytest.mark.slow
def test_two_processes_starting_one_new_phase_train_it_once(store, smoke_data, tmp_path):
    """Both look for the phase's run at the same moment, find none and make one: one trains and
    registers, the other withdraws its run and stops with one line."""
    cmd = ["train", "--strategy", "mae", "--phase", "1", "--preset", "smoke"]
    cmd += ["--epochs", "4", "--data_dir", str(smoke_data)]
    env = subprocess_env(store) | {"SEQGEN_LEASE_SECONDS": "4"}
    tracking.experiment_id()  # the race under test is the phase's claim, not the experiment's
    go = tmp_path / "go"
    procs = []
    for i in range(2):
        script = [sys.executable, "-c", RACE, str(tmp_path / f"ready-{i}"), str(go)]
        procs.append(
            subprocess.Popen(
                [*script, *cmd, "--outputs_root", f"node{i}"],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
        ended = [p.communicate()[0] for p in procs if p.poll() is not None]
        assert time.monotonic() < deadline and not ended, ended
        time.sleep(0.05)
    go.touch()  # both have found no run: now both claim
    outs = [p.communicate(timeout=240)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)]
    assert "another process started this phase too" in loser, loser
    assert loser.strip().splitlines()[-1].startswith("error: "), loser
    assert "Traceback" not in loser
    client = MlflowClient()
    runs = phase_runs(client)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert steps_once(client, runs[0].info.run_id)["val_loss"] == [1, 2, 3, 4]
    assert versions(client, "seqgen-mae+epochs=4-smoke") == ["1"]


SKEWED = """
import sys, time
real = time.time
skew = float(sys.argv[1])
time.time = lambda: real() + skew  # this machine's wall clock is off by `skew` seconds
from seqgen.cli import run
sys.argv = ["seqgen", *sys.argv[2:]]
run()
"""


@pytest.mark.slow
def test_a_live_run_is_not_taken_over_from_a_machine_whose_clock_disagrees(
    store, smoke_data, tmp_path
):
    """The trainer's clock is an hour behind, the newcomer's an hour ahead (as two machines
    whose clocks were never set): the newcomer still sees the lease renewed and refuses, and
    the trainer finishes with every epoch once."""
    cmd = ["train", "--strategy", "mae", "--phase", "1", "--preset", "smoke"]
    cmd += ["--epochs", "400", "--data_dir", str(smoke_data)]
    env = subprocess_env(store) | {"SEQGEN_LEASE_SECONDS": "4"}
    trainer = subprocess.Popen(
        [sys.executable, "-c", SKEWED, "-3600", *cmd, "--outputs_root", "A"],
        env=env | {"SEQGEN_PROCESS_TABLE": "machine-A"},
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    client = MlflowClient()
    deadline = time.monotonic() + 240
    while True:
        runs = phase_runs(client)
        if runs and "val_loss" in runs[0].data.metrics:
            break
        assert time.monotonic() < deadline and trainer.poll() is None, trainer.stdout.read()
        time.sleep(0.2)
    newcomer = subprocess.run(
        [sys.executable, "-c", SKEWED, "3600", *cmd, "--outputs_root", "B"],
        env=env | {"SEQGEN_PROCESS_TABLE": "machine-B"},
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    alive = trainer.poll() is None
    out, _ = trainer.communicate(timeout=600)
    assert alive, "the trainer was still training when the newcomer looked"
    assert newcomer.returncode == 2, newcomer.stdout + newcomer.stderr
    last = newcomer.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "is being trained by" in last and "machine-A" in last
    assert trainer.returncode == 0, out
    [run] = phase_runs(client)
    assert run.info.status == "FINISHED"
    assert steps_once(client, run.info.run_id)["val_loss"] == list(range(1, 401))


# ---- a tracking server that fails: its API, its database ----------------------------------------


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory):
    """PostgreSQL behind a real `mlflow server`: (the database, the server)."""
    folder = tmp_path_factory.mktemp("faults-server")
    with PostgresServer() as db, MlflowServer(db.uri, folder / "artifacts") as server:
        yield db, server


def epochs_logged(client: MlflowClient, experiment: str, at_least: int):
    """The experiment's RUNNING phase run once it has this many epochs in the store, or None."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'phase'") if exp else []
    for run in runs:
        if run.info.status == "RUNNING" and len(steps(client, run.info.run_id)) >= at_least:
            return run
    return None


def train_command(data: Path, epochs: int, *more: str) -> list[str]:
    cmd = [SEQGEN, "train", "--strategy", "mae", "--phase", "1", "--preset", "smoke"]
    return cmd + ["--epochs", str(epochs), "--data_dir", str(data), *more]


@pytest.mark.slow
def test_a_server_whose_api_fails_mid_phase_is_one_line_without_the_password(
    pg_server, smoke_data, tmp_path
):
    """GET /health answers, every API call fails (500) from the middle of a phase on: the trainer
    counts the server as away, and after --max_outage ends with one line that names the server
    with its password redacted, exit code 2; the password is printed nowhere."""
    _, server = pg_server
    client = MlflowClient(server.uri)
    with ApiProxy(server.port) as proxy:
        uri = f"http://user:{SECRET}@127.0.0.1:{proxy.port}"
        env = subprocess_env(uri) | {"MLFLOW_EXPERIMENT_NAME": tmp_path.name}
        proc = start(train_command(smoke_data, 2000, "--max_outage", "5"), env, tmp_path)
        wait_for(lambda: epochs_logged(client, tmp_path.name, 2), 300, "two epochs", proc)
        proxy.fail_api_after(0)
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.port}/health", timeout=10) as ok:
            assert ok.status == 200  # the server looks alive
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"error: the tracking server at http://user:***@127.0.0.1:{proxy.port}")
    assert "unreachable" in last or "stayed away" in last, last
    assert "Traceback" not in out and SECRET not in out


@pytest.mark.slow
def test_a_database_outage_behind_a_live_server_loses_nothing(pg_server, smoke_data, tmp_path):
    """PostgreSQL stops for 20 s in the middle of a phase while `mlflow server` (and its /health)
    stays up: training goes on, the records wait, and every one lands once when it is back."""
    db, server = pg_server
    client = MlflowClient(server.uri)
    env = subprocess_env(server.uri) | {"MLFLOW_EXPERIMENT_NAME": tmp_path.name}
    proc = start(train_command(smoke_data, 40), env, tmp_path)
    wait_for(lambda: epochs_logged(client, tmp_path.name, 2), 300, "two epochs", proc)
    os.kill(proc.pid, signal.SIGSTOP)  # held while the database stops, so the phase is mid-way
    try:
        db.stop()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    time.sleep(20)
    db.start()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    lines = out.splitlines()
    away = next(i for i, line in enumerate(lines) if "tracking server unreachable" in line)
    back = max(i for i, line in enumerate(lines) if "tracking server back after" in line)
    assert [line for line in lines[away:back] if "] epoch " in line], out  # trained meanwhile
    [run] = client.search_runs(
        [client.get_experiment_by_name(tmp_path.name).experiment_id], "tags.kind = 'phase'"
    )
    assert run.info.status == "FINISHED"
    assert_each_epoch_once(client, run, 1, 40)
    steps_once(client, run.info.run_id)
    names = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {f"checkpoints/checkpoint_epoch_{e}.pth" for e in range(1, 41)} <= names
