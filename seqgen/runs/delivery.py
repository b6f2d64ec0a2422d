"""Delivery of a phase's records to the tracking store: in order, in the background, once each;
and the lease that tells a live trainer from a dead one.

Training never waits for the tracking server. The training loop hands each epoch's checkpoint,
metrics and files to a Courier; one background thread delivers them in the order given. When the
server is away the thread keeps the queue and probes until it is back, then delivers what waited,
still in order. Before each record it makes sure the run is still this process's, so a process
that was cut off and finds its run taken over sends nothing more; a metric step already in the
store is not sent again. A second thread renews the lease, so renewal never waits behind a
delivery stuck in MLflow's own retries; a third watches while delivery is stalled, so an outage
is reported even while a call waits.

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
    kind: str  # "metrics", "artifact" or "tags"
    payload: tuple
    queued_at: float = field(default_factory=time.monotonic)


class Courier:
    """Ordered, background, exactly-once delivery of one run's records; holds its lease.
    With `mirror_to` (a chain's run), each epoch's chain curves (tracking.is_chain_curve) go there
    too, at the same step, right after the run's own, with the same exactly-once lookup."""

    def __init__(
        self, run_id: str, owner: str, beat: int = 0, mirror_to: str | None = None
    ) -> None:
        self.run_id, self.owner, self.mirror_to = run_id, owner, mirror_to
        self._beat = beat  # the lease's counter as this process last wrote it
        self._items: deque[_Item] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._error: str | None = None  # why delivery stopped for good
        self._bug: Exception | None = None  # an unexpected error of a thread, raised by check()
        self._lost_to: str | None = None  # the process that took the run over
        self._down_since: float | None = None
        self._health_lock = threading.Lock()
        self._closed = threading.Event()
        _LIVE.add(owner)
        self._threads = [
            threading.Thread(target=self._guard(self._loop), name="seqgen-courier", daemon=True),
            threading.Thread(target=self._guard(self._lease), name="seqgen-lease", daemon=True),
            threading.Thread(target=self._guard(self._watch), name="seqgen-watch", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # ---- what the training loop calls ----------------------------------------------------------

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put(_Item("metrics", (dict(metrics), step)))

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._put(_Item("artifact", (Path(path), artifact_path)))

    def tags(self, tags: dict[str, Any]) -> None:
        self._put(_Item("tags", (dict(tags),)))

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

    def still_mine(self) -> None:
        """Raise (check()) unless the run's lease names this process now: asked before a step
        that is not a queued record (registering, ending the run)."""
        if not self._lost_to:
            holder = tracking.run_tags(self.run_id).get(tracking.LEASE_OWNER, "")
            if holder != self.owner:
                self._lose(holder)
        self.check()

    def outage_seconds(self) -> float:
        """How long the tracking server has been unreachable, without a break (0 when it
        answers). A server that answers but is slow, with records queued behind a burst of fast
        epochs, is not an outage: delivery is merely behind."""
        with self._health_lock:
            return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    def drain(self, max_outage: float, within: float | None = None) -> bool:
        """Wait until everything queued is delivered, however long that takes while the server
        answers (or at most `within` seconds); False once the server has been unreachable for
        more than max_outage seconds, or `within` passed."""
        deadline = None if within is None else time.monotonic() + within
        with self._cv:
            while self._items and not (self._error or self._lost_to):
                if not self._threads[0].is_alive():
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
        """Stop the threads and wait for them, CLOSE_WAIT seconds at most: a call under way to
        a server that hangs (MLflow's retries of one call can take minutes) is left to end in the
        background, so Ctrl-C ends the command promptly. Undelivered records are dropped (the
        checkpoint still has them; a record a late call lands is one the store was owed)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._closed.set()
        deadline = time.monotonic() + CLOSE_WAIT
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads if t is not threading.current_thread()):
            log.warning(
                f"a call to the tracking server for run {self.run_id} is still under way after "
                f"{CLOSE_WAIT:.0f} s: left to finish in the background"
            )
        _LIVE.discard(self.owner)

    # ---- the threads ---------------------------------------------------------------------------

    def _put(self, item: _Item) -> None:
        with self._cv:
            self._items.append(item)
            self._cv.notify_all()

    def _guard(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except _Stop:
                pass
            except Exception as e:  # a bug: the trainer raises it, traceback and all (check())
                with self._cv:
                    self._bug = e
                    self._error = f"{type(e).__name__}: {e}"
                    self._cv.notify_all()

        return run

    def _loop(self) -> None:
        failures = 0  # in a row, with the server up
        while True:
            with self._cv:
                while not self._items and not self._closing:
                    self._cv.wait()
                if self._closing:
                    return
                item = self._items[0]
            if self._down_since is not None and not self._wait_for_server():
                return
            try:
                self._deliver(item)
            except (TrackingError, OSError) as e:  # the server went away mid-call, or refused
                if not tracking.server_is_up():
                    self._note_health(up=False)
                    continue  # the same item again once the server is back
                failures += 1
                if failures >= ATTEMPTS_WHILE_UP:
                    with self._cv:
                        self._error = first_line(e)
                        self._cv.notify_all()
                    return
                time.sleep(PROBE_EVERY)
                continue
            failures = 0
            with self._cv:
                self._items.popleft()
                self._cv.notify_all()
            # A call went through while the server counted as away: back, if it also answers a
            # new connection (a server shutting down finishes the calls it had already taken).
            if self._down_since is not None and tracking.server_is_up():
                self._note_health(up=True)

    def _wait_for_server(self) -> bool:
        """Probe until the server answers; False when closing meanwhile."""
        while not tracking.server_is_up():
            self._note_health(up=False)
            with self._cv:
                if self._closing:
                    return False
                self._cv.wait(PROBE_EVERY)
        self._note_health(up=True)
        return True

    def _lease(self) -> None:
        """Renew the lease every renew_every() seconds, apart from delivery. A renewal that fails
        is let go (the watcher says when the server is away); the next one tries again."""
        while not self._closed.wait(renew_every()):
            try:
                holder = tracking.run_tags(self.run_id).get(tracking.LEASE_OWNER, "")
                if holder != self.owner:
                    self._lose(holder)
                    raise _Stop
                self._beat += 1
                tracking.set_run_tags(self.run_id, {tracking.LEASE_BEAT: str(self._beat)})
            except (TrackingError, OSError):
                continue

    def _watch(self) -> None:
        """Probe the server while delivery is stalled (the oldest record waits longer than a
        probe interval) or the server is known to be away."""
        while not self._closed.wait(PROBE_EVERY):
            if self._down_since is not None or self.behind_seconds() > PROBE_EVERY:
                self._note_health(up=tracking.server_is_up())

    def _note_health(self, up: bool) -> None:
        """Say once when the server went away and once when it came back."""
        with self._health_lock:
            if not up and self._down_since is None:
                self._down_since = time.monotonic()
                waiting = self._pending()
                log.warning(
                    f"tracking server unreachable: training goes on, {waiting} record(s) wait"
                )
            elif up and self._down_since is not None:
                away = time.monotonic() - self._down_since
                waiting = self._pending()
                log.warning(
                    f"tracking server back after {away:.0f} s: delivering {waiting} record(s)"
                )
                self._down_since = None

    def _pending(self) -> int:
        with self._cv:
            return len(self._items)

    def _lose(self, holder: str) -> None:
        with self._cv:
            self._lost_to = holder or "another process"
            self._cv.notify_all()

    def _deliver(self, item: _Item) -> None:
        """One record, once the run is known to be still this process's: one that was frozen
        (a node off the network) or cut off, and finds the run taken over when it is back, must
        not land a checkpoint, a model or a step after the new owner's."""
        holder = tracking.run_tags(self.run_id).get(tracking.LEASE_OWNER, "")
        if holder != self.owner:
            self._lose(holder)
            raise _Stop
        if item.kind == "metrics":
            metrics, step = item.payload
            _log_once(self.run_id, metrics, step)
            kill_point("epoch-delivered")
            if self.mirror_to:
                curves = {k: v for k, v in metrics.items() if tracking.is_chain_curve(k)}
                _log_once(self.mirror_to, curves, step)
        elif item.kind == "artifact":
            path, artifact_path = item.payload
            tracking.upload(self.run_id, path, artifact_path)
        else:
            tracking.set_run_tags(self.run_id, item.payload[0])


def _log_once(run_id: str, metrics: dict[str, float], step: int) -> None:
    """A step already in the store (sent before a failure whose answer was lost, or caught up by
    a rerun) is not sent again: a batch lands whole or not at all."""
    if not metrics or step in tracking.logged_steps(run_id, next(iter(metrics))):
        return
    tracking.log_metrics_at(run_id, metrics, step)


class _Stop(Exception):
    """The run was taken over: stop delivering."""
