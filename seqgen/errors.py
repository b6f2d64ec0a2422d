"""The project's own error family. The CLI turns exactly these into one-line `error:` messages;
anything else is a bug and keeps its traceback."""

from __future__ import annotations

import re

# scheme://user:secret@host and scheme://token@host: whatever stands before the @ is a credential.
# Clients (urllib, requests, SQLAlchemy) take the userinfo up to the *last* @ before the path, and
# accept a password holding @ or a space: so does this, within the line, erring towards hiding.
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#\n]*)@")


def redact(text: str) -> str:
    """The text with the credentials of every URI in it replaced: postgresql://user:***@host,
    https://***@host. Tracking URIs may hold passwords; they are never printed or logged."""

    def hide(m: re.Match) -> str:
        user, sep, _ = m["userinfo"].partition(":")
        return f"{m['scheme']}{user}:***@" if sep else f"{m['scheme']}***@"

    return _CREDENTIALS.sub(hide, text)


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name if it has none),
    redacted and cut to `limit` characters: how a foreign error is named in one line."""
    lines = [x.strip() for x in str(error).strip().splitlines() if x.strip()]
    return redact(lines[0] if lines else type(error).__name__)[:limit]


class SeqgenError(Exception):
    """Bad input or a state the user can fix; str(e) is one line that says what and where."""

    def __init__(self, message: str) -> None:
        # File names, cell text and server replies come from outside: keep the message one line.
        one_line = " ".join(str(message).replace("\r", "\\r").split("\n")).strip()
        super().__init__(redact(one_line))


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
