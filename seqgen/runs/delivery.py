"""Delivery of a phase's records to the tracking store: in order, in the background, once each.

Training never waits for the tracking server. The training loop hands each epoch's checkpoint,
metrics and files to a Courier; one background thread delivers them in the order given. When the
server is away the thread keeps the queue and probes until it is back, then delivers what waited,
still in order. A metric step that may have landed before a failure is looked up before it is
sent again, so no step is logged twice. The same thread renews this process's lease on the run,
and notices when another process has taken the run over. A second thread watches while delivery
is stalled, so an outage is reported even while a call waits inside MLflow's own retries
(minutes, by MLflow's defaults).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqgen.errors import TrackingError, first_line
from seqgen.runs import tracking

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0  # a lease not renewed for this long belongs to a dead process
RENEW_EVERY = 15.0
PROBE_EVERY = 1.0  # seconds between health probes while the server is away
ATTEMPTS_WHILE_UP = 3  # a call that fails this often with the server up is a real error


def new_owner() -> str:
    """This process's name on a lease: host:pid:token."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_alive(owner: str, lease_expires: float, now: float | None = None) -> bool:
    """Whether the lease holder may still be training: its lease is current, and when it ran on
    this host, its process still exists (so a killed process here is known dead at once)."""
    if not owner:
        return False
    now = time.time() if now is None else now
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            pass
    return lease_expires > now


@dataclass
class _Item:
    kind: str  # "metrics", "artifact" or "tags"
    payload: tuple
    queued_at: float = field(default_factory=time.monotonic)
    tried: bool = False  # a delivery attempt failed: it may have landed anyway


class Courier:
    """Ordered, background, exactly-once delivery of one run's records; holds its lease.
    With `mirror_to` (a chain's run), each epoch's chain curves (tracking.CHAIN_CURVES) go there
    too, at the same step, right after the run's own, with the same exactly-once lookup."""

    def __init__(
        self,
        run_id: str,
        owner: str,
        renew_every: float = RENEW_EVERY,
        mirror_to: str | None = None,
    ) -> None:
        self.run_id, self.owner, self.renew_every = run_id, owner, renew_every
        self.mirror_to = mirror_to
        self._items: deque[_Item] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._error: str | None = None  # why delivery stopped for good
        self._bug: Exception | None = None  # an unexpected error of the thread, raised by check()
        self._lost_to: str | None = None  # the process that took the run over
        self._down_since: float | None = None
        self._health_lock = threading.Lock()
        self._closed = threading.Event()
        self._renewed = 0.0
        self._thread = threading.Thread(target=self._run, name="seqgen-courier", daemon=True)
        self._thread.start()
        self._watcher = threading.Thread(target=self._watch, name="seqgen-watch", daemon=True)
        self._watcher.start()

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
                f"run {self.run_id} was taken over by {self._lost_to} while this process was "
                "out of touch with the tracking server: this process stops training it"
            )
        if self._bug is not None:
            raise self._bug
        if self._error:
            raise TrackingError(f"delivering to the tracking store failed: {self._error}")

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
                if not self._thread.is_alive():
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
        """Stop the thread; undelivered records are dropped (the checkpoint still has them)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._closed.set()
        self._thread.join(timeout=10)
        self._watcher.join(timeout=10)

    # ---- the delivery thread -------------------------------------------------------------------

    def _put(self, item: _Item) -> None:
        with self._cv:
            self._items.append(item)
            self._cv.notify_all()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a bug: the trainer raises it, traceback and all (check())
            with self._cv:
                self._bug = e
                self._error = f"{type(e).__name__}: {e}"
                self._cv.notify_all()

    def _loop(self) -> None:
        failures = 0  # in a row, with the server up
        while True:
            with self._cv:
                if not self._items and not self._closing:
                    self._cv.wait(timeout=self.renew_every / 3)
                if self._closing:
                    return
                item = self._items[0] if self._items else None
            if not self._wait_for_server():
                return
            try:
                self._renew_lease(item)
                if item is not None:
                    self._deliver(item)
            except _Stop:
                return
            except (TrackingError, OSError) as e:  # the server went away mid-call, or refused
                if item is not None:
                    item.tried = True
                if not tracking.server_is_up():
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
            if item is not None:
                with self._cv:
                    self._items.popleft()
                    self._cv.notify_all()
            # A call went through while the server counted as away: back, if it also answers a
            # new connection (a server shutting down finishes the calls it had already taken).
            if self._down_since is not None and tracking.server_is_up():
                self._note_health(up=True)

    def _wait_for_server(self) -> bool:
        """Probe until the server answers."""
        while not tracking.server_is_up():
            self._note_health(up=False)
            with self._cv:
                if self._closing:
                    return False
                self._cv.wait(PROBE_EVERY)
        self._note_health(up=True)
        return True

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

    def _renew_lease(self, item: _Item | None) -> None:
        """Renew the lease when due. Before metrics, also make sure the run is still this
        process's: one that was frozen (a node off the network) and wakes after another process
        took the run over must not log a step the new owner logs too."""
        due = time.monotonic() - self._renewed >= self.renew_every
        if not due and (item is None or item.kind != "metrics"):
            return
        holder = tracking.run_tags(self.run_id).get(tracking.LEASE_OWNER, "")
        if holder != self.owner:
            with self._cv:
                self._lost_to = holder or "another process"
                self._cv.notify_all()
            raise _Stop
        if due:
            lease = {tracking.LEASE_EXPIRES: f"{time.time() + LEASE_SECONDS:.0f}"}
            tracking.set_run_tags(self.run_id, lease)
            self._renewed = time.monotonic()

    def _deliver(self, item: _Item) -> None:
        if item.kind == "metrics":
            metrics, step = item.payload
            _log_once(self.run_id, metrics, step, item.tried)
            if self.mirror_to:
                curves = {k: v for k, v in metrics.items() if k in tracking.CHAIN_CURVES}
                _log_once(self.mirror_to, curves, step, item.tried)
        elif item.kind == "artifact":
            path, artifact_path = item.payload
            tracking.upload(self.run_id, path, artifact_path)
        else:
            tracking.set_run_tags(self.run_id, item.payload[0])


def _log_once(run_id: str, metrics: dict[str, float], step: int, tried: bool) -> None:
    """A step sent before a failure may have landed (a batch lands whole or not at all): look it
    up before sending it again."""
    if not metrics or (tried and step in tracking.logged_steps(run_id, next(iter(metrics)))):
        return
    tracking.log_metrics_at(run_id, metrics, step)


class _Stop(Exception):
    """The run was taken over: stop delivering."""
