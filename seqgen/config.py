"""Typed, strict settings for one training phase, resolved from experiments/phases.toml."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqgen.errors import ConfigError

PHASES_FILE = Path(__file__).resolve().parent.parent / "experiments" / "phases.toml"
N_PHASES = 5
SCHEDULERS = ("warmup_cosine", "linear")


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True, kw_only=True)
class PhaseSettings:
    """Everything one phase of one strategy trains with. Flag names follow the original scripts."""

    strategy: str = _doc("loss strategy: mae, autocorr or combined")
    phase: int = _doc("phase 1..5 of the 500-epoch plan")
    preset: str = _doc("full (the table as is), demo or smoke", default="full")
    seed: int = _doc("seed of the split, initialisation, sampling and noise", default=0)
    # data
    data_dir: str = _doc("folder of CSV samples (the data contract)", default="data")
    n_components: int = _doc("component columns after `step`", default=5)
    n_params: int = _doc("parameter columns after the components", default=2)
    max_samples: int | None = _doc("use only the first N files (sorted)", default=None)
    # model
    hidden_size: int = _doc("LSTM hidden dimension")
    num_layers: int = _doc("stacked LSTM layers")
    dropout: float = _doc("dropout between LSTM layers")
    # optimisation
    epochs: int = _doc("epochs in this phase")
    batch_size: int = _doc("sequences per optimiser step (before accumulation)")
    grad_accum_steps: int = _doc("batches accumulated per optimiser step", default=1)
    start_lr: float = _doc("learning rate at the start of the phase (after warm-up)")
    min_lr: float = _doc("learning rate at the end of the phase")
    scheduler: str = _doc("warmup_cosine (new training) or linear (continued)")
    weight_decay: float = _doc("AdamW weight decay")
    clip_grad_norm: float = _doc("gradient clipping norm")
    teacher_forcing: bool = _doc("scheduled sampling with ground truth", default=True)
    teacher_forcing_start: float = _doc("teacher-forcing ratio at the phase start")
    teacher_forcing_end: float = _doc("teacher-forcing ratio floor at the phase end")
    noise_level: float = _doc("std of Gaussian noise on the model inputs")
    # loss
    max_lag: int | None = _doc("autocorrelation lags 1..max_lag (autocorr, combined)", default=None)
    alpha: float = _doc("loss = alpha * MAE + (1 - alpha) * autocorr (combined only)")
    # machinery
    mixed_precision: bool = _doc("fp16+GradScaler on CUDA, bf16 on capable CPUs", default=True)
    num_workers: int = _doc("kept from the original; unused: batches come from memory", default=0)
    device: str = _doc("auto, cpu or cuda", default="auto")
    save_every: int = _doc("write checkpoint_epoch_N.pth every N epochs")
    output_prefix: str | None = _doc("output folder prefix (combined: from alpha)", default=None)
    outputs_root: str = _doc("root of the per-phase output folders", default="outputs")
    output_dir: str | None = _doc("this phase's folder (default: derived)", default=None)
    existing_model: str | None = _doc(
        "model to continue from: models:/, runs:/ or .pth", default=None
    )
    # early stopping (each opt-in)
    early_stopping_patience: int | None = _doc("stop after N epochs without val gain", default=None)
    overfit_gap: float | None = _doc("stop when (val - train) / train exceeds this", default=None)
    grad_explosion_norm: float | None = _doc(
        "stop when the pre-clip norm exceeds this", default=None
    )
    max_nonfinite_steps: int = _doc("consecutive non-finite steps before the run fails", default=20)

    @property
    def first_epoch(self) -> int:
        """Global number of this phase's first epoch (phase 2 of the full plan starts at 101)."""
        return 1 + sum(
            resolve_table_value("epochs", self.strategy, p, self.preset)
            for p in range(1, self.phase)
        )

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.epochs - 1

    @property
    def run_name(self) -> str:
        return f"{self.strategy}-p{self.phase}-s{self.seed}"

    @property
    def continues_from(self) -> str | None:
        """Phase N >= 2 continues from the model phase N-1 registered, unless told otherwise."""
        if self.existing_model or self.phase == 1:
            return self.existing_model
        return f"models:/{self.registered_model}@phase-{self.phase - 1}"

    @property
    def reported_max_lag(self) -> int:
        """Lags of the autocorrelation component every strategy reports: the trained ones, and for
        pure MAE (which trains on none) the lags the other strategies use in this phase."""
        if self.max_lag is not None:
            return self.max_lag
        return resolve_table_value("max_lag", self.strategy, self.phase, self.preset)

    def seed_alias_uri(self, phase: int) -> str:
        """This seed's own model of a phase (the phase-N alias follows the latest of any seed)."""
        return f"models:/{self.registered_model}@phase-{phase}-s{self.seed}"

    @property
    def registered_model(self) -> str:
        """Registry name; presets other than full get their own: demos never move real aliases."""
        return f"seqgen-{self.strategy}" + ("" if self.preset == "full" else f"-{self.preset}")

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        prefix = self.output_prefix
        if prefix is None:  # combined: 50mae_50auto for alpha 0.5, 30mae_70auto for 0.3
            prefix = f"{round(100 * self.alpha)}mae_{100 - round(100 * self.alpha)}auto"
        name = f"{prefix}_{self.first_epoch}_{self.last_epoch}"
        return Path(self.outputs_root) / f"{self.preset}-s{self.seed}" / name

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output_dir"] = str(self.resolved_output_dir())
        d["existing_model"] = self.continues_from
        d["first_epoch"], d["last_epoch"] = self.first_epoch, self.last_epoch
        return d

    def overrides(self) -> dict[str, Any]:
        """Settings that differ from the table and preset (what the command line changed)."""
        table = dataclasses.asdict(resolve(self.strategy, self.phase, self.preset))
        return {k: v for k, v in dataclasses.asdict(self).items() if table[k] != v}


FIELDS = {f.name: f for f in dataclasses.fields(PhaseSettings)}
TABLE_ONLY_KEYS = {"output_prefix"}


def _field_types(name: str) -> tuple[type, ...]:
    hint = typing.get_type_hints(PhaseSettings)[name]
    if isinstance(hint, types.UnionType):
        return tuple(t for t in typing.get_args(hint) if t is not type(None))
    return (hint,)


def coerce(name: str, value: Any, where: str) -> Any:
    """Check (and convert where lossless) one setting's value; raise ConfigError naming it."""
    if name not in FIELDS:
        raise ConfigError(f"{where}: unknown setting {name!r}")
    hint = typing.get_type_hints(PhaseSettings)[name]
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {name} cannot be empty")
    (kind,) = _field_types(name)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: {name} must be {kind.__name__}, got {value!r}")


def load_table(path: Path = PHASES_FILE) -> dict[str, Any]:
    """Read the phase table; unknown sections or settings and wrong list lengths are errors."""
    with open(path, "rb") as f:
        table = tomllib.load(f)
    unknown = set(table) - {"shared", "strategies", "presets"}
    if unknown:
        raise ConfigError(f"{path.name}: unknown section(s) {sorted(unknown)}")
    sections = [("shared", table.get("shared", {}))]
    sections += [(f"strategies.{k}", v) for k, v in table.get("strategies", {}).items()]
    sections += [(f"presets.{k}", v) for k, v in table.get("presets", {}).items()]
    for section_name, section in sections:
        for key, value in section.items():
            if key not in FIELDS or key in ("strategy", "phase", "preset"):
                raise ConfigError(f"{path.name} [{section_name}]: unknown setting {key!r}")
            for v in value if isinstance(value, list) else [value]:
                coerce(key, v, f"{path.name} [{section_name}]")
            if isinstance(value, list) and len(value) != N_PHASES:
                raise ConfigError(
                    f"{path.name} [{section_name}]: {key} needs one value or "
                    f"{N_PHASES} (one per phase), got {len(value)}"
                )
    return table


TABLE = load_table()
STRATEGIES = tuple(TABLE["strategies"])
PRESETS = tuple(TABLE["presets"])


def table_keys() -> set[str]:
    """Every setting the phase table or a preset sets."""
    sections = [TABLE["shared"], *TABLE["strategies"].values(), *TABLE["presets"].values()]
    return {key for section in sections for key in section}


def resolve_table_value(name: str, strategy: str, phase: int, preset: str) -> Any:
    """One setting of (strategy, phase, preset): preset, else strategy, else shared section."""
    for section in (TABLE["presets"][preset], TABLE["strategies"][strategy], TABLE["shared"]):
        if name in section:
            value = section[name]
            return value[phase - 1] if isinstance(value, list) else value
    default = FIELDS[name].default
    if default is dataclasses.MISSING:
        raise ConfigError(f"{PHASES_FILE.name}: no value for {name} ({strategy}, phase {phase})")
    return default


def resolve(strategy: str, phase: int, preset: str = "full", **overrides: Any) -> PhaseSettings:
    """Settings of one phase: the table, then the preset, then command-line overrides."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if not isinstance(phase, int) or not 1 <= phase <= N_PHASES:
        raise ConfigError(f"phase must be 1..{N_PHASES}, got {phase!r}")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    values: dict[str, Any] = {"strategy": strategy, "phase": phase, "preset": preset}
    for name in FIELDS:
        if name in values:
            continue
        value = resolve_table_value(name, strategy, phase, preset)
        values[name] = coerce(name, value, f"{PHASES_FILE.name}")
    if values["alpha"] == 1.0:  # pure MAE trains no autocorrelation term: it has no lag
        values["max_lag"] = None
    for name, value in overrides.items():
        if name in ("strategy", "phase", "preset") or name in TABLE_ONLY_KEYS:
            raise ConfigError(f"{name} cannot be overridden")
        values[name] = coerce(name, value, "override")
    settings = PhaseSettings(**values)
    validate(settings, overridden=set(overrides))
    return settings


def validate(s: PhaseSettings, overridden: set[str] = frozenset()) -> None:
    """Cross-field checks; messages name the option."""
    if s.strategy == "mae" and "max_lag" in overridden and s.max_lag is not None:
        raise ConfigError("--max_lag does not apply to strategy mae (pure MAE has no lag)")
    if s.strategy != "combined" and "alpha" in overridden:
        raise ConfigError(f"--alpha applies only to strategy combined, not {s.strategy}")
    if s.alpha < 1.0 and (s.max_lag is None or s.max_lag < 1):
        raise ConfigError(f"--max_lag must be a positive integer for {s.strategy}")
    if not 0.0 <= s.alpha <= 1.0:
        raise ConfigError(f"--alpha must be within 0..1, got {s.alpha}")
    positive = [
        "epochs",
        "batch_size",
        "grad_accum_steps",
        "hidden_size",
        "num_layers",
        "save_every",
        "n_components",
        "n_params",
        "max_nonfinite_steps",
    ]
    for name in positive:
        if getattr(s, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(s, name)}")
    for name in ("start_lr", "min_lr", "clip_grad_norm"):
        if not getattr(s, name) > 0:
            raise ConfigError(f"--{name} must be positive, got {getattr(s, name)}")
    for name in ("dropout", "teacher_forcing_start", "teacher_forcing_end"):
        if not 0.0 <= getattr(s, name) <= 1.0:
            raise ConfigError(f"--{name} must be within 0..1, got {getattr(s, name)}")
    if s.noise_level < 0 or s.weight_decay < 0 or s.num_workers < 0:
        raise ConfigError("--noise_level, --weight_decay and --num_workers cannot be negative")
    if s.scheduler not in SCHEDULERS:
        raise ConfigError(
            f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {s.scheduler!r}"
        )
    if s.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {s.device!r}")
    if s.max_samples is not None and s.max_samples < 3:
        raise ConfigError(f"--max_samples must be at least 3, got {s.max_samples}")
