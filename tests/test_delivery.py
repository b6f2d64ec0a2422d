"""The courier against a real sqlite store: order, exactly once, leases, a run taken over."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from seqgen.errors import TrackingError
from seqgen.runs import tracking
from seqgen.runs.delivery import Courier, new_owner, owner_is_alive


@pytest.fixture
def run_id(store):
    exp = tracking.experiment_id()
    owner = new_owner()
    rid = tracking.create_run(exp, "t-p1-s0", {tracking.LEASE_OWNER: owner}, None)
    return rid, owner


def test_records_arrive_in_order_and_all_of_them(run_id, tmp_path):
    rid, owner = run_id
    courier = Courier(rid, owner)
    (tmp_path / "a.txt").write_text("first")
    for step in range(1, 6):
        courier.metrics({"val_loss": 1.0 / step, "lr": 0.1}, step)
    courier.artifact(tmp_path / "a.txt", "files")
    courier.tags({tracking.PHASE_STATE: "trained"})
    assert courier.drain(max_outage=60)
    courier.close()
    history = MlflowClient().get_metric_history(rid, "val_loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / s) for s in range(1, 6)]
    assert [a.path for a in MlflowClient().list_artifacts(rid, "files")] == ["files/a.txt"]
    assert tracking.run_tags(rid)[tracking.PHASE_STATE] == "trained"


def test_a_batch_that_landed_before_its_call_failed_is_not_sent_again(run_id, monkeypatch):
    """The request reached the store but the answer was lost: the retry finds the step there."""
    rid, owner = run_id
    real = tracking.log_metrics_at
    calls = []

    def lands_then_fails(run, metrics, step):
        calls.append(step)
        real(run, metrics, step)
        if len(calls) == 1:
            raise ConnectionError("the answer was lost")

    monkeypatch.setattr(tracking, "log_metrics_at", lands_then_fails)
    courier = Courier(rid, owner)
    courier.metrics({"val_loss": 0.5}, 1)
    courier.metrics({"val_loss": 0.25}, 2)
    assert courier.drain(max_outage=60)
    courier.close()
    assert calls == [1, 2]  # step 1 was not sent a second time
    assert [m.step for m in MlflowClient().get_metric_history(rid, "val_loss")] == [1, 2]


def test_an_outage_is_reported_while_a_call_waits_inside_mlflows_retries(run_id, monkeypatch, said):
    """MLflow's client retries a refused call for minutes: the courier still says soon that the
    server is away, and that it is back, while the call waits."""
    rid, owner = run_id
    server_up, entered, released = threading.Event(), threading.Event(), threading.Event()
    real = tracking.log_metrics_at

    def held_call(run, metrics, step):  # the call MLflow keeps retrying while the server is away
        entered.set()
        assert released.wait(timeout=60)
        real(run, metrics, step)

    monkeypatch.setattr(tracking, "server_is_up", lambda timeout=3.0: server_up.is_set())
    monkeypatch.setattr(tracking, "log_metrics_at", held_call)
    server_up.set()
    lines = said
    courier = Courier(rid, owner)
    courier.metrics({"val_loss": 1.0}, 1)
    assert entered.wait(timeout=10)
    server_up.clear()  # the server goes away while the call is under way
    deadline = time.monotonic() + 10
    while not lines and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lines == ["tracking server unreachable: training goes on, 1 record(s) wait"]
    server_up.set()
    released.set()
    assert courier.drain(max_outage=60)
    courier.close()
    assert len(lines) == 2 and lines[1].startswith("tracking server back after ")
    assert [m.step for m in MlflowClient().get_metric_history(rid, "val_loss")] == [1]


def test_a_run_taken_over_stops_this_process(run_id):
    rid, owner = run_id
    courier = Courier(rid, owner, renew_every=0.3)
    tracking.set_run_tags(rid, {tracking.LEASE_OWNER: "elsewhere:1:abc"})
    deadline = time.monotonic() + 30
    with pytest.raises(TrackingError, match="was taken over by elsewhere:1:abc"):
        while time.monotonic() < deadline:
            courier.check()
            time.sleep(0.1)
    courier.close()


def test_who_is_alive():
    here = socket.gethostname()
    later, earlier = time.time() + 60, time.time() - 1
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    assert not owner_is_alive(f"{here}:{dead}:x", later)  # its process is gone: dead at once
    assert owner_is_alive(f"{here}:{os.getpid()}:x", later)
    assert not owner_is_alive(f"{here}:{os.getpid()}:x", earlier)  # lease lapsed
    assert owner_is_alive("another-host:1:x", later)  # elsewhere: the lease decides
    assert not owner_is_alive("another-host:1:x", earlier)
    assert not owner_is_alive("", later)
