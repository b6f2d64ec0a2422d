"""The `seqgen` logger. Library code logs through `logging.getLogger(__name__)` (a child of
`seqgen`) and never prints; the command line (or a script, or a Ray worker) calls `setup` once to
decide where messages go and how much is said. Every record is redacted on the way out, so a
tracking URI's credentials never reach a terminal or a log file, whatever a message holds."""

from __future__ import annotations

import logging
import sys

from seqgen.errors import redact

ROOT = "seqgen"
QUIET, NORMAL, VERBOSE = logging.WARNING, logging.INFO, logging.DEBUG


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def setup(level: int = NORMAL, stream=None) -> None:
    """Messages of `level` and above, as they are (no prefix), on stderr: stdout stays for the
    answers commands print (JSON, tables). Calling it again replaces the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_Redact())
    logger = logging.getLogger(ROOT)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
