"""The courier against a real sqlite store: order, exactly once, leases, a run taken over."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from seqgen.config import resolve
from seqgen.errors import TrackingError
from seqgen.runs import delivery, tracking
from seqgen.runs.delivery import LEASE_SECONDS, Courier, LeaseWatch, new_owner
from seqgen.runs.keeper import RunOptions
from seqgen.training.train import train_phases


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
    real = tracking.log_steps
    calls = []

    def lands_then_fails(run, steps, tags):
        calls.append([step for _, step in steps])
        real(run, steps, tags)
        if len(calls) == 1:
            raise ConnectionError("the answer was lost")

    monkeypatch.setattr(tracking, "log_steps", lands_then_fails)
    courier = Courier(rid, owner)
    courier.metrics({"val_loss": 0.5}, 1)
    assert not courier.drain(max_outage=60, within=0.5)  # its answer is lost: tried again
    courier.metrics({"val_loss": 0.25}, 2)
    assert courier.drain(max_outage=60)
    courier.close()
    assert calls == [[1], [2]]  # step 1 was not sent a second time
    assert [m.step for m in MlflowClient().get_metric_history(rid, "val_loss")] == [1, 2]


def test_an_outage_is_reported_while_a_call_waits_inside_mlflows_retries(run_id, monkeypatch, said):
    """MLflow's client retries a refused call for minutes: the courier still says soon that the
    server is away, and that it is back, while the call waits."""
    rid, owner = run_id
    server_up, entered, released = threading.Event(), threading.Event(), threading.Event()
    real = tracking.log_steps

    def held_call(run, steps, tags):  # the call MLflow keeps retrying while the server is away
        entered.set()
        assert released.wait(timeout=60)
        real(run, steps, tags)

    monkeypatch.setattr(tracking, "server_is_up", lambda timeout=3.0: server_up.is_set())
    monkeypatch.setattr(tracking, "log_steps", held_call)
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


def test_a_run_taken_over_stops_this_process(run_id, tmp_path):
    """Another process holds the lease now: the next record is not sent, whatever its kind."""
    rid, owner = run_id
    courier = Courier(rid, owner)
    tracking.set_run_tags(rid, {tracking.LEASE_OWNER: "elsewhere:1:abc:t"})
    (tmp_path / "best_model.pth").write_bytes(b"stale")
    courier.artifact(tmp_path / "best_model.pth")
    with pytest.raises(TrackingError, match="was taken over by elsewhere:1:abc:t"):
        courier.drain(max_outage=60)
    courier.close()
    assert MlflowClient().list_artifacts(rid) == []


def test_the_lease_is_renewed_apart_from_a_delivery_that_hangs(run_id, monkeypatch):
    """A call held inside MLflow's retries does not hold the lease back: renewals go on."""
    monkeypatch.setenv("SEQGEN_LEASE_SECONDS", "4")  # a renewal every second
    rid, owner = run_id
    entered, released = threading.Event(), threading.Event()
    real = tracking.upload

    def held(*args):
        entered.set()
        assert released.wait(timeout=60)
        real(*args)

    monkeypatch.setattr(tracking, "upload", held)
    courier = Courier(rid, owner)
    courier.artifact(Path(__file__), "files")
    assert entered.wait(timeout=30)
    beats = set()
    deadline = time.monotonic() + 30
    while len(beats) < 3 and time.monotonic() < deadline:
        beats.add(tracking.run_tags(rid).get(tracking.LEASE_BEAT))
        time.sleep(0.2)
    released.set()
    assert courier.drain(max_outage=60)
    courier.close()
    assert len(beats - {None}) >= 2, beats  # the beat moved while the upload was held


def test_close_leaves_no_thread_behind(run_id, monkeypatch):
    """A courier closed while a call is under way waits for it: no thread of one phase lives on
    into the next, to renew a lease or deliver a record there."""
    rid, owner = run_id
    entered, released = threading.Event(), threading.Event()
    real = tracking.log_steps

    def slow(*args):
        entered.set()
        released.wait(timeout=60)
        real(*args)

    monkeypatch.setattr(tracking, "log_steps", slow)
    monkeypatch.setattr(delivery, "CLOSE_WAIT", 120.0)  # a loaded machine's slow call, not a hang
    before = set(threading.enumerate())  # an earlier test's call left to a hanging server
    courier = Courier(rid, owner)
    courier.metrics({"val_loss": 1.0}, 1)
    assert entered.wait(timeout=30)
    courier.metrics({"val_loss": 0.5}, 2)
    threading.Timer(1.0, released.set).start()
    courier.close()
    left = [t.name for t in set(threading.enumerate()) - before if t.name.startswith("seqgen-")]
    assert left == []
    # the call under way finished; the record after it was not started after close
    assert [m.step for m in MlflowClient().get_metric_history(rid, "val_loss")] == [1]


def test_a_lease_holder_is_judged_on_our_own_clock(monkeypatch):
    """Never another machine's wall clock: a holder elsewhere lives while its beat moves and is
    dead once it has not moved for the lease's length of our watching; one in this process
    table is dead at once when its pid is gone."""
    monkeypatch.setenv("SEQGEN_PROCESS_TABLE", "this-machine")
    now = [1000.0]
    watch = LeaseWatch(clock=lambda: now[0])
    elsewhere = "other-host:123:abcd:other-machine"
    assert watch.verdict(elsewhere, "0") == "watching"  # not known yet
    now[0] += LEASE_SECONDS - 1
    assert watch.verdict(elsewhere, "0") == "watching"
    assert watch.verdict(elsewhere, "1") == "alive"  # renewed while we watched
    now[0] += LEASE_SECONDS - 1
    assert watch.verdict(elsewhere, "1") == "alive"
    now[0] += 2
    assert watch.verdict(elsewhere, "1") == "dead"  # not renewed for a whole lease
    assert LeaseWatch(clock=lambda: now[0]).verdict("", "5") == "dead"  # released

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    here = socket.gethostname()
    assert LeaseWatch().verdict(f"{here}:{dead}:x:this-machine", "0") == "dead"  # pid gone
    # the same pid in another process table (a container, another node) says nothing
    assert LeaseWatch().verdict(f"{here}:{dead}:x:another-machine", "0") == "watching"
    # an owner of this process whose courier is closed is dead; a live one is not
    assert LeaseWatch().verdict(f"{here}:{os.getpid()}:gone:this-machine", "0") == "dead"
    assert LeaseWatch().verdict(new_owner(), "0") == "dead"  # made, but no courier holds it
    # an owner of an earlier version (host:pid:token, no table): only its lease can tell
    assert LeaseWatch().verdict(f"{here}:{dead}:x", "0") == "watching"


def count_store_calls(monkeypatch) -> Counter[tuple[str, str]]:
    """The tracking store's calls from now on, by (thread, method): calls a call makes are not
    counted again."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    calls: Counter[tuple[str, str]] = Counter()
    inside = threading.local()

    def counted(name, method):
        def call(*args, **kwargs):
            if not getattr(inside, "depth", 0):
                calls[threading.current_thread().name, name] += 1
            inside.depth = getattr(inside, "depth", 0) + 1
            try:
                return method(*args, **kwargs)
            finally:
                inside.depth -= 1

        return call

    for name, method in vars(SqlAlchemyStore).items():
        if inspect.isfunction(method) and not name.startswith("_"):
            monkeypatch.setattr(SqlAlchemyStore, name, counted(name, method))
    return calls


def on(calls: Counter[tuple[str, str]], thread: str) -> int:
    return sum(n for (t, _), n in calls.items() if t == thread)


def test_one_courier_serves_every_member_and_one_batch_each_checkpoint(
    store, smoke_data, monkeypatch
):
    """Issue 26, item 3, on a real sqlite store: a stack of 4 members trains beside as many
    threads as a stack of 1 (one courier per process, not three threads per member), and the
    courier asks the store about nothing per epoch: one read and one log_batch per member per
    checkpoint, for the epochs it covers (here one checkpoint, at the end)."""
    calls = count_store_calls(monkeypatch)

    def stack(seeds: range, epochs: int) -> tuple[int, int]:
        """(most Python threads seen at an epoch's end, the courier's store calls)."""
        threads: list[int] = []
        options = RunOptions(on_epoch=lambda *_: threads.append(threading.active_count()))
        settings = [
            resolve("mae", 1, "smoke", epochs=epochs, save_every=epochs, seed=seed,
                    data_dir=str(smoke_data))
            for seed in seeds
        ]  # fmt: skip
        calls.clear()
        assert {r.status for r in train_phases(settings, options)} == {"registered"}
        return max(threads), on(calls, "seqgen-courier")

    one, _ = stack(range(1), 2)
    four, short = stack(range(1, 5), 2)
    _, long = stack(range(1, 5), 12)
    assert four == one, (one, four)  # threads do not grow with members
    # Ten more epochs of four members: main made 3.0 calls per member-epoch (120 more here).
    # The calls a run makes outside its epochs vary by up to ~10 with how its records happen to
    # batch (43 to 52 for the 2-epoch stack), so the difference spans 40 member-epochs.
    per_member_epoch = (long - short) / (4 * 10)
    assert per_member_epoch <= 0.5, (short, long)


def test_a_members_model_lease_and_files_stay_off_the_training_thread(
    store, smoke_data, monkeypatch
):
    """Issue 26, item 4, on a real sqlite store: what a study's round does outside its epochs
    on the training thread. Its LoggedModel is made by the courier with the run's first records,
    the members' leases are read in one call before their ends (not one get_run each), and
    the checkpoint and model files are written by the file thread; the ends land on the
    landing thread."""
    from seqgen import files
    from seqgen.runs.keeper import Landings

    calls = count_store_calls(monkeypatch)
    written: Counter[str] = Counter()  # .pth files written, by thread
    write = files._write

    def counted_write(path, data):
        if path.suffix == ".pth":
            written[threading.current_thread().name] += 1
        write(path, data)

    monkeypatch.setattr(files, "_write", counted_write)
    landings = Landings()
    settings = [
        resolve("mae", 1, "smoke", epochs=2, save_every=1, seed=seed, data_dir=str(smoke_data))
        for seed in range(3)
    ]
    try:
        results = train_phases(settings, RunOptions(landings=landings))
        landings.wait()
    finally:
        landings.close()
    assert {r.status for r in results} == {"registered"}
    main = threading.main_thread().name
    assert calls[main, "create_logged_model"] == 0, calls
    assert calls["seqgen-courier", "create_logged_model"] == 3, calls
    assert calls[main, "get_run"] == 0, calls  # the leases: one search_runs for the stack
    assert written[main] == 0 and written["seqgen-files_0"] > 0, written
    assert on(calls, "seqgen-landing_0") > 0, calls
