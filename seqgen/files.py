"""Files that are whole or absent: every file seqgen writes goes through `write_atomic`.

The bytes go to a temporary file in the same folder, are flushed to the disk (fsync), then the
temporary file is renamed over the target: a crash, a kill or a full disk at any moment leaves
either the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path

from seqgen.errors import SeqgenError


class WriteError(SeqgenError):
    """A file that could not be written (full disk, no permission); the old one is kept."""


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` (text is UTF-8) to `path` atomically; WriteError names the file if not."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None


def copy_atomic(source: str | Path, target: str | Path) -> None:
    """Copy a file atomically (write_atomic of its bytes)."""
    write_atomic(target, Path(source).read_bytes())
