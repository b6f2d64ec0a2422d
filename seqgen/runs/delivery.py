"""Delivery of a phase's records to the tracking store: in order, in the background, once each;
and the lease that tells a live trainer from a dead one.

Training never waits for the tracking server. The training loop hands each epoch's checkpoint,
metrics and files to its run's Courier; the process's one courier (_Service: three threads,
however many runs train side by side) delivers each run's records in the order given, runs
taking turns. A turn takes everything a run has queued: the files in order, then all its tags and
metrics in one log_batch (the epochs a checkpoint covers), after one read of the run that tells
both whether the run is still this process's (a process that was cut off and finds its run taken
over sends nothing more) and which steps the store has (a step already there is not sent again).
When the server is away the courier keeps the queues and probes until it is back, then delivers
what waited, still in order. A second thread renews every run's lease, so renewal never waits
behind a delivery stuck in MLflow's own retries; a third watches while delivery is stalled, so
an outage is reported even while a call waits.

The lease: the process that trains a run names itself in the run's tag seqgen.lease_owner
(host:pid:token:table) and raises the counter seqgen.lease_beat every lease_seconds()/4. Another
process judges it on its own monotonic clock, never by comparing another machine's wall clock
with its own: the holder is dead when its process is gone from the same process table (same boot
and pid namespace: `table`), or when its beat has not moved for lease_seconds() of watching.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqgen.errors import ConfigError, TrackingError, first_line
from seqgen.files import settle
from seqgen.runs import tracking
from seqgen.runs.faults import kill_point

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0  # a beat that has not moved for this long belongs to a dead process
PROBE_EVERY = 1.0  # seconds between health probes while the server is away
ATTEMPTS_WHILE_UP = 3  # a call that fails this often with the server up is a real error
CLOSE_WAIT = 10.0  # seconds close() waits for a call under way (a hanging server: minutes)


def lease_seconds() -> float:
    """The lease's length: LEASE_SECONDS, or SEQGEN_LEASE_SECONDS (the same on every node: a
    reader with a shorter lease than the holder's takes a live run over)."""
    text = os.environ.get("SEQGEN_LEASE_SECONDS", "")
    if not text:
        return LEASE_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds >= 4:
        raise ConfigError(f"SEQGEN_LEASE_SECONDS must be a number of seconds >= 4, got {text!r}")
    return seconds


def renew_every() -> float:
    """Renewals per lease: four, so a holder that misses one or two is not taken for dead."""
    return lease_seconds() / 4


def process_table() -> str:
    """Which process table this process's pid belongs to: a digest of the boot id and the pid
    namespace, so containers that share a hostname (or a host) are not confused. "" where it
    cannot be told. SEQGEN_PROCESS_TABLE names it instead (tests give nodes on one machine their
    own, as if they were machines of their own)."""
    if named := os.environ.get("SEQGEN_PROCESS_TABLE"):
        return named
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return hashlib.sha256(f"{boot}:{namespace}".encode()).hexdigest()[:8]


def new_owner() -> str:
    """This process's name on a lease: host:pid:token:table."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:{process_table()}"


_LIVE: set[str] = set()  # owners of this process whose Courier is open


def holder_is_gone(owner: str) -> bool:
    """Whether the lease holder's process is known to be gone: it ran in this process table and
    its pid no longer exists (or it is this process, and that lease's courier is closed). Owners
    of earlier versions (host:pid:token) name no table: only their lease can tell."""
    parts = owner.split(":")
    if len(parts) != 4 or not parts[3] or parts[3] != process_table() or not parts[1].isdigit():
        return False
    if int(parts[1]) == os.getpid():
        return owner not in _LIVE
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user
        pass
    return False


class LeaseWatch:
    """Whether a run's lease holder lives, told on this process's own clock.

    verdict() is asked again and again while the caller polls the run: "dead" (no holder, its
    process gone from this table, or its beat unmoved for lease_seconds() of watching), "alive"
    (its beat moved while we watched) or "watching" (not known yet)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._seen: tuple[str, str, float] | None = None  # owner, beat, when first seen so
        self.renewed = False  # the holder's beat moved while we watched

    def verdict(self, owner: str, beat: str) -> str:
        if not owner or holder_is_gone(owner):
            return "dead"
        now = self.clock()
        if self._seen is None or self._seen[0] != owner:
            self._seen, self.renewed = (owner, beat, now), False
        elif self._seen[1] != beat:
            self._seen, self.renewed = (owner, beat, now), True
        if now - self._seen[2] >= lease_seconds():
            return "dead"
        return "alive" if self.renewed else "watching"


@dataclass
class _Item:
    kind: str  # "metrics", "artifact", "tags", "params", "dataset" or "model"
    payload: tuple
    queued_at: float = field(default_factory=time.monotonic)
    done: bool = False  # sent in a batch whose records are not all in yet (not tags, metrics)
    tried: bool = False  # sent before, in a batch that failed (its answer may have been lost)


class Courier:
    """One run's records and lease, served by the process's one courier (_Service): ordered,
    background, exactly-once delivery. With `mirror_to` (a chain's run), each epoch's chain
    curves (tracking.is_chain_curve) go there too, at the same step, right after the run's own,
    with the same exactly-once rule."""

    def __init__(
        self, run_id: str, owner: str, beat: int = 0, mirror_to: str | None = None
    ) -> None:
        self.run_id, self.owner, self.mirror_to = run_id, owner, mirror_to
        self._beat = beat  # the lease's counter as this process last wrote it
        self._items: deque[_Item] = deque()
        self._error: str | None = None  # why delivery stopped for good
        self._bug: Exception | None = None  # an unexpected error of the courier, raised by check()
        self._lost_to: str | None = None  # the process that took the run over
        self._failures = 0  # calls in a row that failed with the server up
        self._retry_at = 0.0  # monotonic time before which a failed batch is not tried again
        self._mirror_steps: dict[str, int] | None = None  # the chain run's latest step per key
        self.model_id: str | None = None  # the run's LoggedModel, once made (model())
        self._busy = False  # a call of this run's is under way
        self._closed = False
        _LIVE.add(owner)
        self._service = _Service.join(self)
        self._cv = self._service.cv

    # ---- what the training loop calls ----------------------------------------------------------

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put(_Item("metrics", (dict(metrics), step)))

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._put(_Item("artifact", (Path(path), artifact_path)))

    def tags(self, tags: dict[str, Any]) -> None:
        self._put(_Item("tags", (dict(tags),)))

    def params(self, params: dict[str, Any]) -> None:
        """Settings for the run, those it has not got yet (tracking.log_params_once)."""
        self._put(_Item("params", (dict(params),)))

    def dataset(self, folder: str | Path, fingerprint: str, sizes: dict[str, int]) -> None:
        """The run's data as its dataset input, once (tracking.log_dataset)."""
        self._put(_Item("dataset", (folder, fingerprint, dict(sizes))))

    def model(self, experiment: str, params: dict[str, Any], tags: dict[str, Any]) -> None:
        """The run's LoggedModel, still empty, made once (tracking.create_run_model): model_id,
        which its phase's end registers a version of, off the training thread."""
        self._put(_Item("model", (experiment, dict(params), dict(tags))))

    def behind_seconds(self) -> float:
        """Age of the oldest record not delivered yet (0 when all are delivered)."""
        with self._cv:
            return time.monotonic() - self._items[0].queued_at if self._items else 0.0

    def check(self) -> None:
        """Raise when delivery cannot go on: the run was taken over, or a call keeps failing."""
        if self._lost_to:
            raise TrackingError(
                f"run {self.run_id} was taken over by {self._lost_to}: this process stops "
                "training it and sends nothing more"
            )
        if self._bug is not None:
            raise self._bug
        if self._error:
            raise TrackingError(f"delivering to the tracking store failed: {self._error}")

    def still_mine(self, holder: str | None = None) -> None:
        """Raise (check()) unless the run's lease names this process now: asked before a step
        that is not a queued record (registering, ending the run). holder: the lease as just
        read with other runs' (tracking.lease_holders), else read now."""
        if not self._lost_to:
            if holder is None:
                holder = tracking.run_tags(self.run_id).get(tracking.LEASE_OWNER, "")
            if holder != self.owner:
                self._lose(holder)
        self.check()

    def outage_seconds(self) -> float:
        """How long the tracking server has been unreachable, without a break (0 when it
        answers). A server that answers but is slow, with records queued behind a burst of fast
        epochs, is not an outage: delivery is merely behind."""
        return self._service.outage_seconds()

    def drain(self, max_outage: float, within: float | None = None) -> bool:
        """Wait until everything queued is delivered, however long that takes while the server
        answers (or at most `within` seconds); False once the server has been unreachable for
        more than max_outage seconds, or `within` passed."""
        deadline = None if within is None else time.monotonic() + within
        with self._cv:
            while self._items and not (self._error or self._lost_to):
                if not self._service.delivering():
                    self._error = "the delivery thread ended with records left"
                    break
                if self.outage_seconds() > max_outage:
                    return False
                if deadline is not None and time.monotonic() > deadline:
                    return False
                self._cv.wait(0.5)
        self.check()
        return True

    def close(self) -> None:
        """Leave the courier: wait for a call of this run's under way, CLOSE_WAIT seconds at
        most (a call to a server that hangs, which MLflow's retries can make minutes, is left to
        end in the background, so Ctrl-C ends the command promptly); the last run to leave stops
        the courier's threads. Undelivered records are dropped (the checkpoint still has them; a
        record a late call lands is one the store was owed)."""
        deadline = time.monotonic() + CLOSE_WAIT
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            while self._busy and time.monotonic() < deadline:
                self._cv.wait(max(0.0, deadline - time.monotonic()))
            busy = self._busy
        if not self._service.leave(self, deadline) or busy:
            log.warning(
                f"a call to the tracking server for run {self.run_id} is still under way after "
                f"{CLOSE_WAIT:.0f} s: left to finish in the background"
            )
        _LIVE.discard(self.owner)

    # ---- what the courier's threads call -------------------------------------------------------

    def _put(self, item: _Item) -> None:
        with self._cv:
            self._items.append(item)
            self._cv.notify_all()

    def _ready(self, now: float) -> bool:
        """Records wait and may be tried now (called under the courier's lock)."""
        stopped = self._closed or self._error or self._lost_to
        return bool(self._items) and not stopped and now >= self._retry_at

    def _lose(self, holder: str) -> None:
        with self._cv:
            self._lost_to = holder or "another process"
            self._cv.notify_all()

    def _deliver(self, batch: list[_Item]) -> None:
        """Records queued for this run, once the run is known to be still this process's (one
        that was frozen, or cut off, and finds the run taken over when it is back must not land
        a checkpoint, a model or a step after the new owner's): the files in order, then every
        tag and metric of the batch in one request (a step is sent after the checkpoint that
        covers it; tags and steps may land after files queued later, never before files queued
        earlier). A step the store already has is not sent again (exactly_once)."""
        tags, latest = tracking.run_view(self.run_id)  # the lease and the steps in one read
        if tags.get(tracking.LEASE_OWNER, "") != self.owner:
            self._lose(tags.get(tracking.LEASE_OWNER, ""))
            raise _Stop
        for item in batch:
            if item.kind == "artifact" and not item.done:
                path, artifact_path = item.payload
                settle(path)  # written by the file thread (files.write_later)
                tracking.upload(self.run_id, path, artifact_path)
                item.done = True
            elif item.kind == "params" and not item.done:
                tracking.log_params_once(self.run_id, item.payload[0])
                item.done = True
            elif item.kind == "dataset" and not item.done:
                tracking.log_dataset(self.run_id, *item.payload)
                item.done = True
            elif item.kind == "model" and not item.done:
                item.tried, look = True, item.tried
                self.model_id = tracking.create_run_model(self.run_id, *item.payload, look=look)
                item.done = True
        steps = [item.payload for item in batch if item.kind == "metrics"]
        new_tags = {
            k: v for item in batch if item.kind == "tags" for k, v in item.payload[0].items()
        }
        if tracking.log_steps(self.run_id, exactly_once(steps, latest), new_tags):
            kill_point("epoch-delivered")
        if self.mirror_to and steps:
            self._mirror(steps)

    def _mirror(self, steps: list[tuple[dict[str, float], int]]) -> None:
        curves = [({k: v for k, v in m.items() if tracking.is_chain_curve(k)}, s) for m, s in steps]
        if self._mirror_steps is None:  # read once per run, and again after a failure
            self._mirror_steps = tracking.run_view(self.mirror_to)[1]
        known, self._mirror_steps = self._mirror_steps, None
        new = exactly_once(curves, known)
        tracking.log_steps(self.mirror_to, new, {})
        for metrics, step in new:
            for key in metrics:
                known[key] = max(step, known.get(key, step))
        self._mirror_steps = known


def exactly_once(
    steps: list[tuple[dict[str, float], int]], latest: dict[str, int]
) -> list[tuple[dict[str, float], int]]:
    """The (metrics, step) records whose values the store does not have: steps land in order
    and whole, so a key's value at a step at or below the store's latest step of that key is
    there (sent before a failure whose answer was lost, by a process that died, or caught up by
    a rerun). The last value of a key given twice at one step counts."""
    out: dict[int, dict[str, float]] = {}
    for metrics, step in steps:
        kept = {k: v for k, v in metrics.items() if step > latest.get(k, -1)}
        if kept:
            out.setdefault(step, {}).update(kept)
    return [(metrics, step) for step, metrics in sorted(out.items())]


class _Service:
    """The process's one courier, serving every open run's Courier with three threads however
    many runs train: one delivers (the runs' batches in turn), one renews every lease (so a
    renewal never waits behind a delivery stuck in MLflow's own retries), one watches the
    server while delivery is stalled (an outage is reported even while a call waits). Made by
    the first Courier, stopped when the last one closes."""

    _current: _Service | None = None
    _lock = threading.Lock()

    @classmethod
    def join(cls, courier: Courier) -> _Service:
        with cls._lock:
            if cls._current is None:
                cls._current = cls()
            service = cls._current
            with service.cv:
                service.couriers.append(courier)
            return service

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.couriers: list[Courier] = []
        self._stopping = False
        self._down_since: float | None = None
        self._health_lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=self._guard(self._loop), name="seqgen-courier", daemon=True),
            threading.Thread(target=self._guard(self._lease), name="seqgen-lease", daemon=True),
            threading.Thread(target=self._guard(self._watch), name="seqgen-watch", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def leave(self, courier: Courier, deadline: float) -> bool:
        """A run leaves; the last one stops the threads and waits for them until `deadline`.
        False when a thread is still in a call then."""
        with type(self)._lock:
            with self.cv:
                self.couriers.remove(courier)
                last = not self.couriers
                if last:
                    self._stopping = True
                    self.cv.notify_all()
            if last and type(self)._current is self:
                type(self)._current = None
        if not last:
            return True
        self._stopped.set()
        here = threading.current_thread()
        for thread in self._threads:
            if thread is not here:
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads if t is not here)

    def delivering(self) -> bool:
        return self._threads[0].is_alive()

    def outage_seconds(self) -> float:
        with self._health_lock:
            return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    def _guard(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except Exception as e:  # a bug: every run's trainer raises it (check())
                with self.cv:
                    for courier in self.couriers:
                        courier._bug = e
                        courier._error = f"{type(e).__name__}: {e}"
                    self.cv.notify_all()

        return run

    def _next(self) -> tuple[Courier, list[_Item]] | None:
        """The next run with records to try and its batch (all it has queued), in turn; None
        when stopping."""
        with self.cv:
            while not self._stopping:
                now = time.monotonic()
                ready = [c for c in self.couriers if c._ready(now)]
                if ready:
                    courier = ready[0]
                    self.couriers.remove(courier)  # to the back of the line: runs take turns
                    self.couriers.append(courier)
                    courier._busy = True
                    return courier, list(courier._items)
                waits = [c._retry_at - now for c in self.couriers if c._items and c._retry_at > now]
                self.cv.wait(min(waits, default=PROBE_EVERY))
        return None

    def _loop(self) -> None:
        while (turn := self._next()) is not None:
            courier, batch = turn
            if self._down_since is not None and not self._wait_for_server():
                self._done(courier, 0)
                return
            try:
                courier._deliver(batch)
            except _Stop:
                self._done(courier, 0)
            except (TrackingError, OSError) as e:  # the server went away mid-call, or refused
                if not tracking.server_is_up():
                    self._note_health(up=False)
                    self._done(courier, 0)  # the same batch again once the server is back
                    continue
                self._failed(courier, e)
            except Exception as e:  # a bug: this run's trainer raises it (check())
                with self.cv:
                    courier._bug, courier._error = e, f"{type(e).__name__}: {e}"
                self._done(courier, 0)
            else:
                self._done(courier, len(batch))
            # A call went through while the server counted as away: back, if it also answers a
            # new connection (a server shutting down finishes the calls it had already taken).
            if self._down_since is not None and tracking.server_is_up():
                self._note_health(up=True)

    def _done(self, courier: Courier, delivered: int) -> None:
        with self.cv:
            for _ in range(delivered):
                courier._items.popleft()
            if delivered:
                courier._failures = 0
            courier._busy = False
            self.cv.notify_all()

    def _failed(self, courier: Courier, error: Exception) -> None:
        """A call failed with the server up: tried again after PROBE_EVERY, given up after
        ATTEMPTS_WHILE_UP in a row."""
        with self.cv:
            courier._failures += 1
            if courier._failures >= ATTEMPTS_WHILE_UP:
                courier._error = first_line(error)
            courier._retry_at = time.monotonic() + PROBE_EVERY
        self._done(courier, 0)

    def _wait_for_server(self) -> bool:
        """Probe until the server answers; False when stopping meanwhile."""
        while not tracking.server_is_up():
            self._note_health(up=False)
            with self.cv:
                if self._stopping:
                    return False
                self.cv.wait(PROBE_EVERY)
        self._note_health(up=True)
        return True

    def _lease(self) -> None:
        """Renew every open run's lease every renew_every() seconds, apart from delivery. A
        renewal that fails is let go (the watcher says when the server is away); the next one
        tries again."""
        while not self._stopped.wait(renew_every()):
            with self.cv:
                couriers = [c for c in self.couriers if not (c._closed or c._lost_to)]
            for courier in couriers:
                try:
                    holder = tracking.run_tags(courier.run_id).get(tracking.LEASE_OWNER, "")
                    if holder != courier.owner:
                        courier._lose(holder)
                        continue
                    courier._beat += 1
                    beat = {tracking.LEASE_BEAT: str(courier._beat)}
                    tracking.set_run_tags(courier.run_id, beat)
                except (TrackingError, OSError):
                    continue

    def _watch(self) -> None:
        """Probe the server while delivery is stalled (a run's oldest record waits longer than a
        probe interval) or the server is known to be away."""
        while not self._stopped.wait(PROBE_EVERY):
            with self.cv:
                couriers = list(self.couriers)
            behind = max((c.behind_seconds() for c in couriers), default=0.0)
            if self._down_since is not None or behind > PROBE_EVERY:
                self._note_health(up=tracking.server_is_up())

    def _note_health(self, up: bool) -> None:
        """Say once when the server went away and once when it came back."""
        with self._health_lock:
            if not up and self._down_since is None:
                self._down_since = time.monotonic()
                log.warning(
                    f"tracking server unreachable: training goes on, {self._pending()} record(s) "
                    "wait"
                )
            elif up and self._down_since is not None:
                away = time.monotonic() - self._down_since
                log.warning(
                    f"tracking server back after {away:.0f} s: delivering {self._pending()} "
                    "record(s)"
                )
                self._down_since = None

    def _pending(self) -> int:
        with self.cv:
            return sum(len(c._items) for c in self.couriers)


class _Stop(Exception):
    """The run was taken over: stop delivering its records."""
