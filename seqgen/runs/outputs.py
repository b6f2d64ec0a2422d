"""A phase's local folder, with the original's file names, and what the terminal shows.

MLflow is the record of results; these files are the original workflow's outputs, kept because
users know them, and logged as artifacts of the phase's run.
"""

from __future__ import annotations

import json
import resource
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from seqgen.config import PHASES_FILE, PhaseSettings, default_strategies, table
from seqgen.data.sequences import Normalizer
from seqgen.data.split import Split
from seqgen.errors import ConfigError
from seqgen.files import settle, write_atomic

METRICS_CSV = "training_metrics.csv"
# The original scripts' training_metrics.csv, column for column: one loss, or its components.
SINGLE_COLUMNS = ["Epoch", "Train Loss", "Validation Loss", "Test Loss", "Learning Rate"]
COMPONENT_COLUMNS = [
    "Epoch",
    "Train Loss",
    "Train MAE Loss",
    "Train Autocorr Loss",
    "Validation Loss",
    "Validation MAE Loss",
    "Validation Autocorr Loss",
    "Test Loss",
    "Test MAE Loss",
    "Test Autocorr Loss",
    "Learning Rate",
]
# The loss terms the original's columns name, with their labels there.
ORIGINAL_TERMS = {"mae": "MAE", "autocorr": "Autocorr"}
SPLIT_LABELS = {"train": "Train", "val": "Validation", "test": "Test"}


def metrics_columns(terms: Sequence[str], components: bool) -> list[tuple[str, str]]:
    """training_metrics.csv's columns as (header, metric key): the original's (SINGLE_COLUMNS,
    or COMPONENT_COLUMNS when two terms or more carry weight), then a Train, Validation and Test
    column for each term the original did not have (`Train Spectral Loss`)."""
    columns = [("Epoch", "epoch")]
    for split, label in SPLIT_LABELS.items():
        columns.append((f"{label} Loss", f"{split}_loss"))
        if components:
            columns += [
                (f"{label} {ORIGINAL_TERMS[t]} Loss", f"{split}_{t}")
                for t in terms
                if t in ORIGINAL_TERMS
            ]
    columns.append(("Learning Rate", "lr"))
    for split, label in SPLIT_LABELS.items():
        columns += [
            (f"{label} {t.replace('_', ' ').title()} Loss", f"{split}_{t}")
            for t in terms
            if t not in ORIGINAL_TERMS
        ]
    return columns


SETUP_FILES = ("args.json", "split.json", "normalizer.json")
FINAL_FILES = (METRICS_CSV, "best_model.pth", "final_model.pth", "best_model_combined.pth")


RUN_MARKER = ".seqgen-run"  # the run id whose files a folder holds


def prepare_folder(path: Path, run_id: str | None) -> None:
    """Create and check the output folder before anything is tracked: writable, and holding no
    other run's files (`run_id`: the run being taken up, None for a new one)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output folder {path} cannot be written: {e.strerror or e}") from None
    holder = folder_holder(path)
    if holder != run_id and (holder or any(path.glob("*.pth"))):
        whose = f"run {holder}" if holder else "no seqgen run"
        raise ConfigError(
            f"output folder {path} holds model files of {whose}: move them elsewhere (seqgen "
            "writes this phase's files there)"
        )


def set_aside(path: Path, run_id: str) -> None:
    """A phase trained anew (--retrain): the folder of the run it replaces moves to
    <folder>.run-<id>, so the new run gets the original name and nothing of the old is lost."""
    if folder_holder(path) == run_id:
        settle()  # no write of its files lands after the move (files.write_later)
        path.replace(path.with_name(f"{path.name}.run-{run_id[:8]}"))


def folder_holder(path: Path) -> str | None:
    """The run id the folder's marker names, None without a marker; a marker that is not a
    readable text file (a folder, other bytes) is refused in one line."""
    marker = path / RUN_MARKER
    if not marker.exists():
        return None
    try:
        return marker.read_bytes().decode("utf-8").strip() or None
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or "not UTF-8 text"
        raise ConfigError(
            f"output folder {path}: its run marker {RUN_MARKER} cannot be read ({why}); it "
            "should hold a run id: remove it if the folder holds no other run's files"
        ) from None


def mark_folder(path: Path, run_id: str) -> None:
    write_atomic(path / RUN_MARKER, run_id + "\n")


def write_setup_files(
    folder: Path,
    settings: dict[str, Any],
    split: Split,
    norm: Normalizer,
    write: Callable = write_atomic,
) -> tuple[str, ...]:
    """args.json (the resolved settings), split.json, normalizer.json; returns their names.
    write: now, or files.write_later."""
    write(folder / "args.json", json.dumps(settings, indent=2))
    write(folder / "split.json", json.dumps(split.to_dict(), indent=1))
    write(folder / "normalizer.json", json.dumps(norm.to_dict(), indent=2))
    return SETUP_FILES


def write_metrics_csv(
    folder: Path, rows: list[list[float]], columns: list[str], write: Callable = write_atomic
) -> None:
    """training_metrics.csv from the epochs so far (EpochRecord.csv_row of each), under the
    headers of metrics_columns; write: now, or files.write_later."""
    lines = [",".join(columns)]
    lines += [",".join([str(int(r[0]))] + [f"{v:.6g}" for v in r[1:]]) for r in rows]
    write(folder / METRICS_CSV, "\n".join(lines) + "\n")


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory on CUDA, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _flag(name: str, value: Any) -> str:
    return f"--{name} {shlex.quote(_value(value))}"


def next_phase_hint(s: PhaseSettings, model_uri: str | None) -> str:
    """The command that continues with the next phase, as the original batch files printed it.

    Every setting the command line changed is carried over, except those the table sets anew
    for each phase (a list in phases.toml, such as start_lr): the next phase takes its own, under
    this phase's variant name (--variant), so it continues this chain."""
    t = table()
    sections = [t["shared"], t["strategies"][s.strategy], t["presets"][s.preset]]
    per_phase = {k for section in sections for k, v in section.items() if isinstance(v, list)}
    skip = per_phase | {"seed", "existing_model", "output_dir"}
    carried = {k: v for k, v in s.overrides().items() if k not in skip}
    dropped = sorted(k for k in s.overrides() if k in per_phase)
    if dropped and not s.is_plan and s.variant is None:
        # without what it drops the next phase would name another variant: keep this one's
        carried["variant"] = s.variant_name
    project = PHASES_FILE.resolve().parent.parent
    here = "." if Path.cwd().resolve() == project else shlex.quote(str(project))
    params = "".join(f" -P {shlex.quote(f'{k}={_value(v)}')}" for k, v in carried.items())
    flags = "".join(f" {_flag(k, v)}" for k, v in carried.items())
    note = f"\n  (not carried, set per phase by the table: {', '.join(dropped)})" if dropped else ""
    existing = f" --existing_model {shlex.quote(model_uri)}" if model_uri else ""
    # the seed's strategies have entry points of their own; any strategy has `train`
    entry = s.strategy if s.strategy in default_strategies() else f"train -P strategy={s.strategy}"
    return (
        f"Next phase: mlflow run {here} -e {entry} -P phase={s.phase + 1} "
        f"-P preset={s.preset} -P seed={s.seed}{params} --env-manager local\n"
        f"        or: seqgen train --strategy {s.strategy} --phase {s.phase + 1} "
        f"--preset {s.preset} --seed {s.seed}{flags}{existing}{note}"
    )


def _value(v: Any) -> str:
    """A setting as a flag or -P parameter spells it: true, 0.5, mae=0.5,spectral=0.5."""
    if isinstance(v, dict):  # a strategy's terms, as --terms reads them
        return ",".join(f"{k}={w!r}" for k, w in v.items())
    return str(v).lower() if isinstance(v, bool) else str(v)


def format_eta(seconds: float) -> str:
    m, sec = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
