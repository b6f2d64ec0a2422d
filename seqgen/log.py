"""The `seqgen` logger. Library code logs through `logging.getLogger(__name__)` (a child of
`seqgen`) and never prints; the command line (or a script, or a Ray worker) calls `setup` once to
decide where messages go and how much is said. Every record is redacted on the way out, so a
tracking URI's credentials never reach a terminal or a log file, whatever a message holds."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from typing import TypeVar

from rich.progress import track

from seqgen.errors import redact

T = TypeVar("T")

ROOT = "seqgen"
QUIET, NORMAL, VERBOSE = logging.WARNING, logging.INFO, logging.DEBUG


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes (a test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup(level: int = NORMAL) -> None:
    """Messages of `level` and above, as they are (no prefix), on stderr: stdout stays for the
    answers commands print (JSON, tables). Calling it again replaces the handler."""
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_Redact())
    logger = logging.getLogger(ROOT)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    # A failed store call is reported by seqgen in one line naming its root cause
    # (tracking.store_error); MLflow's database layer logs it first with a traceback of some 85
    # lines that hides that cause. Kept at --verbose.
    quiet = logging.CRITICAL if level > VERBOSE else logging.NOTSET
    logging.getLogger("mlflow.store.db.utils").setLevel(quiet)


def progress_bar(items: Sequence[T], label: str) -> Iterator[T]:
    """The items, with a transient progress bar on stderr when it is a terminal and progress is
    shown (the normal level); plain iteration otherwise (logs, pipes, Ray workers, tests)."""
    logger = logging.getLogger(ROOT)
    if not (sys.stderr.isatty() and logger.isEnabledFor(NORMAL)):
        yield from items
        return
    yield from track(items, description=label, total=len(items), transient=True)
