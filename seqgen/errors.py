"""The project's own error family. The CLI turns exactly these into one-line `error:` messages;
anything else is a bug and keeps its traceback."""

from __future__ import annotations


class SeqgenError(Exception):
    """Bad input or a state the user can fix; str(e) is one line that says what and where."""

    def __init__(self, message: str) -> None:
        # File names, cell text and server replies come from outside: keep the message one line.
        super().__init__(" ".join(str(message).replace("\r", "\\r").split("\n")).strip())


class ConfigError(SeqgenError, ValueError):
    """A setting that is unknown, of the wrong type or out of range; the message names it."""


class DataError(SeqgenError, ValueError):
    """Data that breaks the contract; the message names the file, row and column."""


class TrackingError(SeqgenError):
    """A tracking store, run or model that cannot be reached or found; says what to do."""


class TrainingError(SeqgenError):
    """Training that cannot go on (it diverged, or the tracking server stayed away)."""


class SelectionError(SeqgenError, ValueError):
    """Runs that cannot be found or selected for analysis; says what exists instead."""
