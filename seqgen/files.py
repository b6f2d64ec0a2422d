"""Files that are whole or absent: every file seqgen writes goes through `write_atomic`.

The bytes go to a temporary file in the same folder, are flushed to the disk (fsync), then the
temporary file is renamed over the target: a crash, a kill or a full disk at any moment leaves
either the old file or the new one, never half of one.

`write_later` does the same in the process's one file thread, in the order given, so a phase's
checkpoint files reach the disk while its next epoch trains. Whatever reads, uploads or writes a
file first waits for its writes (`settle`): `write_atomic`, `copy_atomic`, the model files'
reader and the courier's upload do."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from seqgen.errors import SeqgenError


class WriteError(SeqgenError):
    """A file that could not be written (full disk, no permission); the old one is kept."""


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` (text is UTF-8) to `path` atomically, after its writes handed to
    write_later; WriteError names the file if not."""
    settle(path)
    _write(Path(path), data)


def copy_atomic(source: str | Path, target: str | Path) -> None:
    """Copy a file atomically (write_atomic of its bytes)."""
    settle(source)
    write_atomic(target, Path(source).read_bytes())


def write_later(path: str | Path, data: bytes | str) -> None:
    """write_atomic in the file thread, after the writes handed to it before; raises the error
    of an earlier one that failed (once)."""
    _LATER.raise_failed()
    _LATER.submit(Path(path).absolute(), data)


def settle(*paths: str | Path) -> None:
    """Wait for the writes of `paths` (none: of every file) handed to write_later; raise the
    error of one that failed (once)."""
    _LATER.wait([Path(p).absolute() for p in paths] or None)


def _write(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None


class _Later:
    """The file thread and each file's last write handed to it (a pool of one: in order). Its
    thread is joined when the interpreter exits, so what was handed to it is written then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0  # the process the pool's thread runs in (a forked child makes its own)
        self._last: dict[Path, Future] = {}

    def submit(self, path: Path, data: bytes | str) -> None:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="seqgen-files")
                self._pid, self._last = os.getpid(), {}
            self._last[path] = self._pool.submit(_write, path, data)

    def wait(self, paths: list[Path] | None) -> None:
        with self._lock:
            keys = list(self._last) if paths is None else [p for p in paths if p in self._last]
            futures = [(p, self._last[p]) for p in keys]
        self._forget(futures, wait=True)

    def raise_failed(self) -> None:
        with self._lock:
            futures = [(p, f) for p, f in self._last.items() if f.done()]
        self._forget(futures, wait=False)

    def _forget(self, futures: list[tuple[Path, Future]], wait: bool) -> None:
        """Drop the futures once done (a newer write of a path stays); raise the first error."""
        error = None
        for path, future in futures:
            if wait:
                future.exception()  # waits
            with self._lock:
                if self._last.get(path) is future:
                    del self._last[path]
            error = error or future.exception()
        if error is not None:
            raise error


_LATER = _Later()
