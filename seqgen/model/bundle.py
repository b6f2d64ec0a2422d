"""The model file: everything needed to rebuild, continue or use a trained generator anywhere.

A Bundle is weights + model shape + normalisation statistics + the data's names and split, saved
as a .pth of tensors and plain values (safe for torch.load(weights_only=True)). A Checkpoint is a
Bundle plus the training state a phase needs to resume. Format 1 files (wave 1) still load.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seqgen.data.sequences import Normalizer
from seqgen.data.split import Split
from seqgen.errors import SeqgenError, first_line
from seqgen.files import settle, write_atomic
from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator, current_keys

FORMAT = "seqgen-bundle-2"
READABLE_FORMATS = ("seqgen-bundle-1", FORMAT)


class BundleError(SeqgenError):
    """A model or checkpoint file that cannot be read, or is not seqgen's."""


@dataclass(frozen=True)
class DataInfo:
    """What the model was trained on: column names, time axis, content fingerprint, ranges."""

    step_name: str
    component_names: tuple[str, ...]
    param_names: tuple[str, ...]
    steps: tuple[float, ...]  # (T,)
    fingerprint: str
    data_dir: str
    # (min, max) of each parameter over the training split; None in format-1 files
    param_ranges: tuple[tuple[float, float], ...] | None = None

    @property
    def seq_len(self) -> int:
        return len(self.steps)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d | {k: list(d[k]) for k in ("component_names", "param_names", "steps")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataInfo:
        ranges = d.get("param_ranges")
        return cls(
            step_name=str(d["step_name"]),
            component_names=tuple(d["component_names"]),
            param_names=tuple(d["param_names"]),
            steps=tuple(float(x) for x in d["steps"]),
            fingerprint=str(d["fingerprint"]),
            data_dir=str(d["data_dir"]),
            param_ranges=None if ranges is None else tuple((float(a), float(b)) for a, b in ranges),
        )


@dataclass(frozen=True, eq=False)
class Bundle:
    """A trained generator and what it needs to run on new parameters."""

    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    normalizer: Normalizer
    data: DataInfo
    split: Split
    strategy: str  # the table's strategy (combined; in files before variants: the variant)
    phase: int
    seed: int
    preset: str
    epoch: int  # global epoch of these weights
    val_loss: float
    run_id: str
    last_epoch: int | None = None  # the phase's last trained epoch; None in format-1 files
    variant: str = ""  # the variant trained (combined, combined+alpha=0.3); "" in older files

    @property
    def variant_name(self) -> str:
        return self.variant or self.strategy

    def build_model(self, device: str | torch.device = "cpu") -> StreamlinedSequenceGenerator:
        """The generator with these weights, in eval mode (call .train() to continue training)."""
        model = StreamlinedSequenceGenerator(self.model_config)
        model.load_state_dict(self.state_dict)
        return model.to(device).eval()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model_config": self.model_config.to_dict(),
            "state_dict": self.state_dict,
            "normalizer": self.normalizer.to_dict(),
            "data": self.data.to_dict(),
            "split": self.split.to_dict(),
            "strategy": self.strategy,
            "phase": self.phase,
            "seed": self.seed,
            "preset": self.preset,
            "epoch": self.epoch,
            "val_loss": self.val_loss,
            "run_id": self.run_id,
            "last_epoch": self.last_epoch,
            "variant": self.variant,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bundle:
        return cls(
            model_config=ModelConfig(**d["model_config"]),
            state_dict=current_keys(d["state_dict"]),  # a file from before cells had modules
            normalizer=Normalizer.from_dict(d["normalizer"]),
            data=DataInfo.from_dict(d["data"]),
            split=Split.from_dict(d["split"]),
            strategy=str(d["strategy"]),
            phase=int(d["phase"]),
            seed=int(d["seed"]),
            preset=str(d["preset"]),
            epoch=int(d["epoch"]),
            val_loss=float(d["val_loss"]),
            run_id=str(d.get("run_id") or ""),
            last_epoch=None if d.get("last_epoch") is None else int(d["last_epoch"]),
            variant=str(d.get("variant") or ""),
        )

    def save(self, path: Path) -> None:
        write_atomic(path, self.to_bytes())

    def to_bytes(self) -> bytes:
        return serialized(self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        return cls.from_dict(_read(path, "model"))


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A Bundle plus the state that resumes its phase exactly (optimiser, scaler, progress)."""

    bundle: Bundle
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    progress: dict[str, Any]  # train.Progress as a dict
    settings: dict[str, Any]  # PhaseSettings.to_dict() the phase started with
    continued_from: str  # exact models:/name/version of the parent, or ""
    first_epoch: int  # global epoch the phase started at

    def save(self, path: Path) -> None:
        write_atomic(path, self.to_bytes())

    def to_bytes(self) -> bytes:
        state = {k: getattr(self, k) for k in self._state_keys()}
        return serialized(self.bundle.to_dict() | state)

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        d = _read(path, "checkpoint")
        missing = [k for k in cls._state_keys() if k not in d and k != "first_epoch"]
        if missing:
            raise BundleError(f"{path} is a model, not a checkpoint (it has no {missing[0]})")
        settings = d["settings"]
        first = d.get("first_epoch") or settings.get("first_epoch")  # format 1 kept it there
        state = {k: d[k] for k in cls._state_keys() if k != "first_epoch"}
        return cls(bundle=Bundle.from_dict(d), first_epoch=int(first), **state)

    @staticmethod
    def _state_keys() -> tuple[str, ...]:
        return ("optimizer", "scaler", "progress", "settings", "continued_from", "first_epoch")


def _read(path: str | Path, what: str) -> dict[str, Any]:
    """A seqgen .pth as a dict, or one line saying why it is not one."""
    path = Path(path)
    settle(path)  # its checkpoint writes, in the file thread
    if not path.is_file():
        raise BundleError(f"{what} file {path} does not exist")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickled classes, not a torch file at all: all foreign
        reason = first_line(e, 120)
        raise BundleError(f"{path} is not a readable seqgen {what} file ({reason})") from None
    if not isinstance(d, dict) or d.get("format") not in READABLE_FORMATS:
        found = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise BundleError(
            f"{path} is not a seqgen {what} file (format {found!r}; expected one of "
            f"{', '.join(READABLE_FORMATS)})"
        )
    return d


def serialized(obj: Any) -> bytes:
    """torch.save in memory, to be written atomically (files.write_atomic): torch's own writer
    hides a failed write behind a zip error, and a crash or a full disk never leaves half a
    file where a good one was."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
