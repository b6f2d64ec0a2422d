"""The fused C++ recurrence (recurrence.cpp): compiled on first use, cached, loaded as torch ops.

`ops()` returns `torch.ops.seqgen_native` (`forward`, `backward`, `run_gemms`), or None where
it cannot be built (no compiler, no ninja) or where SEQGEN_NATIVE=0; then it says so in one line
on stderr, once per process, and seqgen runs the plain autograd path.

The build goes to $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) in a folder named by
a hash of the source, the torch and Python versions and the CPU's vector instruction set: two
checkouts of different versions never rebuild over each other, and a cache shared by machines
of different kinds never loads code compiled for another CPU. Processes that start at once build
it once: a lock (flock, released by the kernel even when its holder dies) lets one build while the
others wait, then all load the same library.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from seqgen.files import write_atomic

SOURCE = Path(__file__).with_name("recurrence.cpp")
# Vector instructions the compiler may use, by torch's own reading of this CPU.
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"]
ISA_FLAGS = {"AVX512": ["-mavx2", "-mfma", *AVX512], "AVX2": ["-mavx2", "-mfma"]}


log = logging.getLogger(__name__)


def _say(line: str) -> None:
    """A warning: shown on stderr whether or not the caller set logging up (Python's last
    resort handler prints warnings), so a slower fallback never goes unnoticed."""
    log.warning(f"seqgen: {line}")


def build_dir() -> Path:
    """Where the library is built and cached."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    source = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    isa = torch.backends.cpu.get_cpu_capability().lower()
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"seqgen_native-{source}-torch{torch.__version__.split('+')[0]}-{py}-{isa}"


def _build_and_load() -> None:
    from torch.utils.cpp_extension import load

    compiler = os.environ.get("CXX", "c++")  # what torch compiles with
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler} not found")
    if shutil.which("ninja") is None:  # torch calls `ninja` from PATH; the pip package has one
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    isa = torch.backends.cpu.get_cpu_capability()
    with open(folder / "seqgen.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # torch's own lock file is only ever taken by a holder of ours, so one that exists now
        # was left by a process that died while building; torch would wait on it forever.
        (folder / "lock").unlink(missing_ok=True)
        if not (folder / "seqgen_native.so").exists():
            _say(f"compiling the native recurrence into {folder} (once, about a minute)")
        # Compiled from a copy inside the folder: ninja records the source's path, and a path
        # that differs between checkouts (the same source: the folder is named by its hash)
        # would make each checkout rebuild the others' library.
        source = folder / SOURCE.name
        if not source.is_file() or source.read_bytes() != SOURCE.read_bytes():
            write_atomic(source, SOURCE.read_bytes())
        load(
            name="seqgen_native",
            sources=[str(source)],
            extra_cflags=["-O3", "-fopenmp", *ISA_FLAGS.get(isa, [])],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
        )


@functools.cache
def ops():
    """torch.ops.seqgen_native, built on first use; None (said once on stderr) if unavailable."""
    if os.environ.get("SEQGEN_NATIVE", "1") == "0":
        _say("native recurrence off (SEQGEN_NATIVE=0); running the plain autograd path")
        return None
    try:
        _build_and_load()
    except Exception as err:  # any reason the build or load fails means: run the Python path
        # a failed build's message is mostly the compiler's command line; name the error
        lines = str(err).strip().splitlines() or [type(err).__name__]
        found = [x for x in lines if "error" in x.lower() or "not found" in x]
        reason = (found or lines)[0].strip()[:300]
        _say(f"native recurrence unavailable ({reason}); running the plain autograd path")
        return None
    return torch.ops.seqgen_native
