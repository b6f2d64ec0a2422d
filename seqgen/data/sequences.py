"""CSV sequences: one file per sample, validated against the data contract, cached, normalised."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seqgen.errors import DataError
from seqgen.files import WriteError, write_atomic

CACHE_NAME = ".seqgen-cache.npz"
_CACHE_VERSION = 1  # bump when the cache layout or the parsing rules change
_SHOW_FILES = 3  # bad files spelled out in a message; the rest are counted


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == is ambiguous on arrays
class SequenceData:
    """N samples of T steps: K component columns and P constant parameters per sample."""

    files: tuple[str, ...]  # file names (not paths), sorted
    steps: np.ndarray  # (T,) float64, the step column of the first file
    components: np.ndarray  # (N, T, K) float32, original units
    params: np.ndarray  # (N, P) float32, the constant per-file parameter values
    step_name: str
    component_names: tuple[str, ...]
    param_names: tuple[str, ...]
    fingerprint: str  # sha256 of names + arrays (16 hex chars): same content, same fingerprint

    def __post_init__(self) -> None:
        if self.components.ndim != 3:
            raise ValueError(f"components must be (N, T, K), got {self.components.shape}")
        n, t, k = self.components.shape
        if self.params.ndim != 2 or self.params.shape[0] != n or len(self.files) != n:
            raise ValueError(
                f"inconsistent SequenceData: {len(self.files)} files, components "
                f"{self.components.shape}, params {self.params.shape}"
            )
        if self.steps.shape != (t,) or len(self.component_names) != k:
            raise ValueError(f"inconsistent SequenceData: steps {self.steps.shape}, T={t}, K={k}")
        if len(self.param_names) != self.params.shape[1]:
            raise ValueError(f"{len(self.param_names)} param names for {self.params.shape[1]}")

    @classmethod
    def from_arrays(
        cls,
        files: tuple[str, ...] | list[str],
        steps: np.ndarray,
        components: np.ndarray,
        params: np.ndarray,
        step_name: str,
        component_names: tuple[str, ...] | list[str],
        param_names: tuple[str, ...] | list[str],
    ) -> SequenceData:
        """Cast to stored dtypes, fingerprint the content; components (N, T, K), params (N, P)."""
        steps = np.ascontiguousarray(steps, dtype=np.float64)
        components = np.ascontiguousarray(components, dtype=np.float32)
        params = np.ascontiguousarray(params, dtype=np.float32)
        return cls(
            files=tuple(files),
            steps=steps,
            components=components,
            params=params,
            step_name=step_name,
            component_names=tuple(component_names),
            param_names=tuple(param_names),
            fingerprint=_fingerprint(
                files, step_name, component_names, param_names, steps, components, params
            ),
        )

    def recompute_fingerprint(self) -> str:
        """The fingerprint of the arrays as they are now (a cluster task checks what it got)."""
        return _fingerprint(
            self.files,
            self.step_name,
            self.component_names,
            self.param_names,
            self.steps,
            self.components,
            self.params,
        )

    @property
    def n_samples(self) -> int:
        return self.components.shape[0]

    @property
    def seq_len(self) -> int:
        return self.components.shape[1]

    @property
    def n_components(self) -> int:
        return self.components.shape[2]

    @property
    def n_params(self) -> int:
        return self.params.shape[1]

    def subset(self, idx: np.ndarray) -> SequenceData:
        """Samples at positions idx (ints or a boolean mask); keeps the whole set's fingerprint."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return dataclasses.replace(
            self,
            files=tuple(self.files[i] for i in idx),
            components=self.components[idx],
            params=self.params[idx],
        )


def _fingerprint(files, step_name, component_names, param_names, steps, components, params) -> str:
    """sha256 of names and arrays (16 hex chars): same content, same fingerprint."""
    names = [list(files), [step_name], list(component_names), list(param_names)]
    h = hashlib.sha256(json.dumps(names).encode())
    for a in (steps, components, params):
        h.update(repr(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def load_sequences(
    data_dir: str | Path, n_components: int = 5, n_params: int = 2, use_cache: bool = True
) -> SequenceData:
    """Read every *.csv in data_dir in file-name order: step, K components, P params per row."""
    if n_components < 1 or n_params < 0:
        raise ValueError(
            f"need n_components >= 1 and n_params >= 0, got {n_components}, {n_params}"
        )
    folder = Path(data_dir)
    listing = _list_csv_files(folder)
    key_text = json.dumps([_CACHE_VERSION, n_components, n_params, listing])
    key = hashlib.sha256(key_text.encode()).hexdigest()
    if use_cache:
        cached = _load_cache(folder, key)
        if cached is not None:
            return cached
    data = _read_folder(folder, [name for name, _, _ in listing], n_components, n_params)
    if use_cache:
        _save_cache(folder, key, data)
    return data


def _list_csv_files(folder: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of the folder's CSV files, sorted by name: the cache key."""
    if not folder.exists():
        raise DataError(f"data folder '{folder}' does not exist")
    if not folder.is_dir():
        raise DataError(f"data folder '{folder}' is a file, not a folder")
    try:
        with os.scandir(folder) as it:
            # Hidden entries are never data: our cache, its temp files, macOS '._x.csv' droppings.
            entries = [e for e in it if not e.name.startswith(".")]
    except OSError as e:
        raise DataError(f"data folder '{folder}' cannot be read ({e.strerror})") from e
    if not entries:
        raise DataError(f"data folder '{folder}' is empty")
    csvs = sorted(
        (e for e in entries if e.name.lower().endswith(".csv") and not e.is_dir()),
        key=lambda e: e.name,
    )
    if not csvs:
        raise DataError(
            f"no CSV files in data folder '{folder}' ({len(entries)} other entries, "
            f"e.g. '{min(e.name for e in entries)}')"
        )
    listing = []
    for e in csvs:
        try:
            st = e.stat()
            listing.append((e.name, st.st_size, st.st_mtime_ns))
        except OSError:  # e.g. a dangling link: reading it reports the problem
            listing.append((e.name, -1, -1))
    return listing


class _Bad(Exception):
    """One file's first problem: where (row/column, may be empty) and what is wrong."""

    def __init__(self, what: str, where: str = "", kind: str = "") -> None:
        super().__init__(what)
        self.what, self.where, self.kind = what, where, kind


def _read_file(path: Path, n_columns: int, n_components: int) -> tuple[tuple[str, ...], np.ndarray]:
    """Header names and values (R, C) float64 of one file that passes every per-file check."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: drop the BOM Excel writes
    except OSError as e:
        raise _Bad(f"cannot be read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise _Bad(f"is not UTF-8 text (bad byte at offset {e.start})") from e
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines are harmless
        lines.pop()
    if not lines:
        raise _Bad("the file is empty")
    try:
        rows = list(csv.reader(lines))
    except csv.Error as e:
        raise _Bad(f"is not a valid CSV file ({e})") from e

    header = tuple(c.strip() for c in rows[0])
    if len(header) != n_columns:
        raise _Bad(
            f"{_plural(len(header), 'column')}, expected {n_columns} "
            f"(step + {n_components} components + {n_columns - 1 - n_components} params)",
            kind="width",
        )
    if all(_is_number(c) for c in header):
        raise _Bad("has no header row (the first line holds numbers)")
    if "" in header:
        raise _Bad(f"column {header.index('') + 1} has no name in the header")
    if len(set(header)) != len(header):
        twice = next(c for c in header if header.count(c) > 1)
        raise _Bad(f"column name {twice!r} appears twice in the header")
    data = rows[1:]
    if not data:
        raise _Bad("has a header but no data rows")

    try:
        values = np.array(data, dtype=np.float64)
    except ValueError:
        _diagnose_cells(data, header)
        # Reached only if numpy rejects what float() accepts; still an error, never silence.
        raise _Bad("has values that are not numbers") from None
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        r, c = bad[0]
        kind = "NaN" if np.isnan(values[r, c]) else "infinite"
        raise _Bad(f"{data[r][c].strip()!r} is {kind}", _at(r, header[c]))
    # Components and parameters are held as float32 (SequenceData): a value beyond its range
    # would become infinite there, after the check above.
    with np.errstate(over="ignore"):
        too_big = np.argwhere(~np.isfinite(values[:, 1:].astype(np.float32)))
    if too_big.size:
        r, c = too_big[0] + (0, 1)
        raise _Bad(
            f"{data[r][c].strip()!r} is beyond float32's range (|x| > 3.4e38)", _at(r, header[c])
        )

    down = np.flatnonzero(np.diff(values[:, 0]) <= 0)
    if down.size:
        r = down[0] + 1
        before, now = data[r - 1][0].strip(), data[r][0].strip()
        raise _Bad(f"step does not increase ({before} then {now})", _at(r, header[0]))

    first_param = 1 + n_components
    changed = np.argwhere(values[:, first_param:] != values[0, first_param:])
    if changed.size:
        r, c = changed[0]
        c += first_param
        before, now = data[0][c].strip(), data[r][c].strip()
        raise _Bad(f"parameter changes within the file ({before} then {now})", _at(r, header[c]))
    return header, values


def _at(r: int, column: str) -> str:
    """Location text for 0-based data row r: rows are 1-based data rows in messages."""
    return f"row {r + 1}, column '{column}'"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _diagnose_cells(data: list[list[str]], header: tuple[str, ...]) -> None:
    """Raise _Bad for the first ragged row or non-numeric cell (numpy only says that one exists)."""
    for r, row in enumerate(data):
        if len(row) != len(header):
            what = "is empty" if not row else f"has {len(row)} values, expected {len(header)}"
            raise _Bad(what, f"row {r + 1}")
        for c, cell in enumerate(row):
            if not _is_number(cell):
                what = "value is empty" if not cell.strip() else f"{cell.strip()!r} is not a number"
                raise _Bad(what, _at(r, header[c]))


def _read_folder(folder: Path, names: list[str], n_components: int, n_params: int) -> SequenceData:
    """Parse and validate every file; all problems are gathered into one DataError."""
    n_columns = 1 + n_components + n_params
    tables: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    problems: dict[str, _Bad] = {}
    for name in names:
        try:
            tables[name] = _read_file(folder / name, n_columns, n_components)
        except _Bad as bad:
            problems[name] = bad

    # Cross-file checks against what most good files agree on, so one odd file is the one blamed.
    if tables:
        ref_header = Counter(h for h, _ in tables.values()).most_common(1)[0][0]
        ref_rows = Counter(len(v) for _, v in tables.values()).most_common(1)[0][0]
        # every file's steps, not only the first's (SequenceData keeps one step column)
        ref_steps = Counter(
            tuple(v[:, 0]) for _, v in tables.values() if len(v) == ref_rows
        ).most_common(1)[0][0]
        for name, (header, values) in tables.items():
            if header != ref_header:
                i = next(
                    i for i, (a, b) in enumerate(zip(header, ref_header, strict=True)) if a != b
                )
                problems[name] = _Bad(
                    f"header differs from the other files: column {i + 1} is named "
                    f"'{header[i]}', not '{ref_header[i]}'"
                )
            elif len(values) != ref_rows:
                problems[name] = _Bad(f"{_plural(len(values), 'row')}, expected {ref_rows}")
            elif tuple(values[:, 0]) != ref_steps:
                r = int(np.flatnonzero(values[:, 0] != np.array(ref_steps))[0])
                problems[name] = _Bad(
                    f"step {values[r, 0]:g} differs from the other files' {ref_steps[r]:g}",
                    _at(r, header[0]),
                )
        if not problems and ref_rows < 2:
            raise DataError(
                f"the files in '{folder}' have {_plural(ref_rows, 'data row')}; "
                "a sequence needs at least 2"
            )
    if problems:
        raise DataError(_problem_message(folder, names, problems))

    stacked = np.stack([tables[name][1] for name in names])  # (N, T, C)
    header = tables[names[0]][0]
    return SequenceData.from_arrays(
        files=names,
        steps=stacked[0, :, 0],
        components=stacked[:, :, 1 : 1 + n_components],
        params=stacked[:, 0, 1 + n_components :],
        step_name=header[0],
        component_names=header[1 : 1 + n_components],
        param_names=header[1 + n_components :],
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _problem_message(folder: Path, names: list[str], problems: dict[str, _Bad]) -> str:
    """One line: the single bad file's path, or the first few bad files and a count of the rest."""
    bad_names = [n for n in names if n in problems]  # file-name order, not discovery order
    if len(bad_names) == 1:
        bad = problems[bad_names[0]]
        return f"{folder / bad_names[0]}{' ' + bad.where if bad.where else ''}: {bad.what}"
    whats = {problems[n].what for n in bad_names}
    same_width = all(problems[n].kind == "width" for n in bad_names) and len(whats) == 1
    if len(bad_names) == len(names) and same_width:
        # Every file has the same wrong width: the settings, not the files, are likely wrong.
        return (
            f"all {len(names)} files in '{folder}' have {whats.pop()}: "
            "set n_components and n_params to match the data"
        )
    shown = []
    for n in bad_names[:_SHOW_FILES]:
        bad = problems[n]
        shown.append(f"{n}{' ' + bad.where if bad.where else ''}: {bad.what}")
    rest = len(bad_names) - len(shown)
    more = f" ... and {_plural(rest, 'more file')}" if rest else ""
    return (
        f"{len(bad_names)} of {len(names)} files in '{folder}' break the data contract: "
        + "; ".join(shown)
        + more
    )


def _cache_paths(folder: Path) -> list[Path]:
    """Where the cache may live: inside the data folder when writable, else the user cache."""
    paths = [folder / CACHE_NAME] if os.access(folder, os.W_OK) else []
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()
    return [*paths, base / "seqgen" / f"{digest}.npz"]


def _load_cache(folder: Path, key: str) -> SequenceData | None:
    """The cached data when a cache file matches key; None when absent, stale or corrupt."""
    for path in _cache_paths(folder):
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) != key:
                    continue
                return SequenceData(
                    files=tuple(str(s) for s in z["files"]),
                    steps=np.asarray(z["steps"], dtype=np.float64),
                    components=np.asarray(z["components"], dtype=np.float32),
                    params=np.asarray(z["params"], dtype=np.float32),
                    step_name=str(z["step_name"]),
                    component_names=tuple(str(s) for s in z["component_names"]),
                    param_names=tuple(str(s) for s in z["param_names"]),
                    fingerprint=str(z["fingerprint"]),
                )
        except Exception:  # any unreadable or inconsistent cache is rebuilt, never trusted
            continue
    return None


def _save_cache(folder: Path, key: str, data: SequenceData) -> None:
    """Write the cache atomically to the first location that works."""
    arrays: dict[str, Any] = {
        "key": np.array(key),
        "files": np.array(data.files, dtype=str),
        "steps": data.steps,
        "components": data.components,
        "params": data.params,
        "step_name": np.array(data.step_name),
        "component_names": np.array(data.component_names, dtype=str),
        "param_names": np.array(data.param_names, dtype=str),
        "fingerprint": np.array(data.fingerprint),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    for path in _cache_paths(folder):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, buffer.getvalue())
            return
        except (OSError, WriteError):
            continue
    warnings.warn(
        f"could not write a data cache for '{folder}'; the next load re-reads the CSVs",
        stacklevel=3,  # point at the caller of load_sequences
    )


@dataclass(frozen=True, eq=False)
class Normalizer:
    """Per-column standardisation fitted on the training split only; travels with every model."""

    component_mean: np.ndarray  # (K,) float32
    component_std: np.ndarray  # (K,) float32, 1.0 for a constant column
    param_mean: np.ndarray  # (P,) float32
    param_std: np.ndarray  # (P,) float32, 1.0 for a constant column

    @classmethod
    def fit(cls, components: np.ndarray, params: np.ndarray) -> Normalizer:
        """Mean and std per column of components (N, T, K) and params (N, P), in float64."""
        if components.ndim != 3 or params.ndim != 2 or len(components) != len(params):
            raise ValueError(
                f"need components (N, T, K) and params (N, P), got "
                f"{components.shape} and {params.shape}"
            )
        if len(components) == 0:
            raise ValueError("cannot fit a Normalizer on zero samples")
        c_mean, c_std = _mean_std(components.reshape(-1, components.shape[-1]))
        p_mean, p_std = _mean_std(params)
        return cls(c_mean, c_std, p_mean, p_std)

    def normalize_components(self, x: Any) -> Any:
        """(..., K) array or tensor to zero mean, unit std per component; same type back."""
        return _affine(x, self.component_mean, self.component_std, forward=True)

    def denormalize_components(self, x: Any) -> Any:
        """Inverse of normalize_components: (..., K) back to original units."""
        return _affine(x, self.component_mean, self.component_std, forward=False)

    def normalize_params(self, p: Any) -> Any:
        """(..., P) array or tensor to zero mean, unit std per parameter."""
        return _affine(p, self.param_mean, self.param_std, forward=True)

    def to_dict(self) -> dict[str, list[float]]:
        """Plain lists of floats: safe for JSON and torch.load(weights_only=True)."""
        return {f.name: getattr(self, f.name).tolist() for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        """Inverse of to_dict."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"normalizer dict lacks {missing}")
        arrays = {n: np.asarray(d[n], dtype=np.float32).reshape(-1) for n in names}
        if len(arrays["component_mean"]) != len(arrays["component_std"]) or len(
            arrays["param_mean"]
        ) != len(arrays["param_std"]):
            raise ValueError("normalizer dict has means and stds of different lengths")
        return cls(**arrays)


def _mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std of x (M, D) as float32; std 1.0 where a column is (near) constant."""
    x = np.asarray(x, dtype=np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    # A constant column would divide by ~0 and blow up any other value; leave it unscaled instead.
    std = np.where(std > 1e-8 * np.abs(mean), std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def _affine(x: Any, mean: np.ndarray, std: np.ndarray, forward: bool) -> Any:
    """(x - mean) / std, or its inverse, on the last dim of a numpy array or torch tensor."""
    if isinstance(x, np.ndarray):
        return (x - mean) / std if forward else x * std + mean
    import torch  # lazily: loading data must not pay torch's import time

    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            x = x.float()
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device)
        return (x - m) / s if forward else x * s + m
    raise TypeError(f"expected a numpy array or torch tensor, got {type(x).__name__}")
