"""Which code ran: the git commit for people, a digest of the installed files for machines."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

from seqgen.config import PHASES_FILE

PACKAGE = Path(__file__).resolve().parent
SOURCE_SUFFIXES = (".py", ".toml", ".cpp", ".h")


@functools.cache
def code_version() -> str:
    """The git commit of the code that ran (+dirty for uncommitted changes), or 'unknown'. Asked
    once per process (a `git` process each time cost a study ~25 ms per phase run): the code a
    process runs is the code it loaded."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(PACKAGE.parent), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except OSError:
        return "unknown"
    return commit.stdout.strip() if commit.returncode == 0 else "unknown"


@functools.cache
def code_digest() -> str:
    """A digest of seqgen's own files as installed (the phase table included): two nodes of a
    cluster run the same code exactly when their digests agree, git or not."""
    h = hashlib.sha256()
    for path in sorted(p for p in PACKAGE.rglob("*") if p.suffix in SOURCE_SUFFIXES):
        h.update(str(path.relative_to(PACKAGE)).encode())
        h.update(path.read_bytes())
    h.update(PHASES_FILE.read_bytes())  # outside the package folder in a source checkout
    return h.hexdigest()[:12]
