"""Typed, strict settings for one training phase, resolved from experiments/phases.toml.

The table is read on first use (not at import), so an error in it reaches the CLI's error net as
one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from seqgen.errors import ConfigError

# experiments/ ships inside the package as seqgen.experiments (see pyproject.toml), so the table is
# found the same way from a source checkout, an editable install and a plain `pip install .`.
PHASES_FILE = Path(str(resources.files("seqgen.experiments").joinpath("phases.toml")))
N_PHASES = 5
SCHEDULES = ("warmup_cosine", "warmup_linear", "linear")
SPLITS = ("random", "edge")  # seqgen/data/split.py: make_split, make_edge_split
SELECTORS = ("strategy", "phase", "preset")  # chosen on the command line, never by the table
MAX_OUTAGE = 600.0  # seconds the tracking server may be away before a phase pauses
CHECKPOINT_SECONDS = 30.0  # at most this long between checkpoints (and metrics sent) of a phase
MAX_SEED = 2**32 - 1  # an epoch's draws are seeded seed * 1_000_003 + epoch: within torch's 64 bits

# The range of every integer option of every command (a setting, or a command's own option of the
# same name), in one place: (lowest, highest or None). The highest bounds what the machinery can
# hold: torch's seeds, and memory (hidden 8192 is 2 GiB of weights per layer; 10^9 asks for 10^19).
INT_RANGES: dict[str, tuple[int, int | None]] = {
    "seed": (0, MAX_SEED),
    "epochs": (1, 100_000),
    "batch_size": (1, 1_000_000),
    "grad_accum_steps": (1, 10_000),
    "hidden_size": (1, 8192),
    "num_layers": (1, 64),
    "save_every": (1, None),
    "n_components": (1, 10_000),
    "n_params": (1, 10_000),
    "max_samples": (3, None),
    "max_nonfinite_steps": (1, None),
    "max_lag": (1, None),  # and below the sequence length, checked against the data
    "num_workers": (0, None),
    # commands' own options
    "n_samples": (3, 10_000_000),  # synth: train, val and test need one each
    "batches": (1, 100_000),  # bench
    "members": (1, 1_000),  # bench
    "threads": (1, 4096),  # bench, study --threads_per_chain
}


def check_int(name: str, value: int | None, option: str | None = None) -> None:
    """Raise ConfigError naming the option (--name) when value is outside INT_RANGES[name]."""
    low, high = INT_RANGES[name]
    option = option or f"--{name}"
    if value is None:
        return
    if value < low:
        raise ConfigError(f"{option} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{option} must be at most {high}, got {value}")


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True, kw_only=True)
class PhaseSettings:
    """Everything one phase of one strategy trains with. Flag names follow the original scripts."""

    strategy: str = _doc("loss strategy: a section of experiments/phases.toml")
    phase: int = _doc("phase 1..5 of the 500-epoch plan")
    preset: str = _doc("full (the table as is), demo or smoke", default="full")
    seed: int = _doc("seed of the split, initialisation, sampling and noise", default=0)
    # data
    data_dir: str = _doc("folder of CSV samples (the data contract)", default="data")
    n_components: int = _doc("component columns after `step`", default=5)
    n_params: int = _doc("parameter columns after the components", default=2)
    max_samples: int | None = _doc("use only the first N files (sorted)", default=None)
    split: str = _doc(
        "random (the seeded 4400/550/rest) or edge (validation and test outside the training "
        "range: the top --edge_fraction of each parameter's range)",
        default="random",
    )
    edge_fraction: float = _doc(
        "with --split edge: the share of each parameter's range held out", default=0.1
    )
    # model
    cell: str = _doc(
        "recurrent cell: lstm, gru or another registered in seqgen/model/cells/", default="lstm"
    )
    hidden_size: int = _doc("hidden dimension of the cell")
    num_layers: int = _doc("stacked layers of the cell")
    dropout: float = _doc("dropout between the cell's layers, in [0, 1)")
    # optimisation
    epochs: int = _doc("epochs in this phase")
    batch_size: int = _doc("sequences per micro-batch")
    grad_accum_steps: int = _doc("micro-batches accumulated per optimiser step", default=1)
    start_lr: float = _doc("learning rate at the start of the phase (after warm-up)")
    min_lr: float = _doc("learning rate at the end of the phase")
    new_training_schedule: str = _doc("lr schedule of a phase that starts a new model")
    continued_schedule: str = _doc("lr schedule of a phase that continues a model")
    weight_decay: float = _doc("AdamW weight decay")
    clip_grad_norm: float = _doc("gradient clipping norm")
    teacher_forcing: bool = _doc("scheduled sampling with ground truth", default=True)
    teacher_forcing_start: float = _doc("teacher-forcing ratio at the phase start")
    teacher_forcing_end: float = _doc("teacher-forcing ratio floor at the phase end")
    noise_level: float = _doc("std of Gaussian noise on the model inputs")
    # loss: weights over the terms of seqgen/training/losses.py, or alpha for mae/autocorr
    alpha: float | None = _doc(
        "weight of MAE in the loss; the rest is the autocorrelation term (a strategy weighted "
        "by alpha: mae, autocorr, combined)",
        default=None,
    )
    terms: dict[str, float] | None = _doc(
        "weights over loss terms, mae=0.5,spectral=0.5 (a weight of 0: computed and logged, not "
        "trained), for a strategy that weighs terms in the table instead of alpha",
        default=None,
    )
    max_lag: int = _doc("lags 1..max_lag of the autocorrelation term (reported by every strategy)")
    # machinery
    mixed_precision: bool = _doc("fp16+GradScaler on CUDA, bf16 on capable CPUs", default=True)
    num_workers: int = _doc(
        "accepted from the original; ignored: batches come from memory", default=0
    )
    device: str = _doc("auto, cpu or cuda", default="auto")
    save_every: int = _doc("write checkpoint_epoch_N.pth every N epochs")
    outputs_root: str = _doc("root of the per-phase output folders", default="outputs")
    output_dir: str | None = _doc("this phase's folder (default: derived)", default=None)
    existing_model: str | None = _doc(
        "model to continue from: models:/, runs:/ or .pth", default=None
    )
    variant: str | None = _doc(
        "a name for this variant of the table's plan (default: derived from what differs, "
        "mae+hidden_size=24)",
        default=None,
    )
    # early stopping (each opt-in)
    early_stopping_patience: int | None = _doc(
        "stop after more than N epochs without val gain", default=None
    )
    overfit_gap: float | None = _doc("stop when (val - train) / train exceeds this", default=None)
    grad_explosion_norm: float | None = _doc(
        "stop when the pre-clip gradient norm exceeds this", default=None
    )
    max_nonfinite_steps: int = _doc("consecutive non-finite steps before the run fails", default=20)

    @property
    def weights(self) -> dict[str, float]:
        """What the loss trains: {term: weight} over seqgen/training/losses.py's terms, from
        `terms`, else from alpha (mae: alpha, autocorr: 1 - alpha). A weight of 0: reported."""
        return strategy_weights(self.alpha, self.terms)

    @property
    def loss_name(self) -> str:
        """The original's name of the loss, from alpha: 100mae, 100auto, 50mae_50auto,
        30mae_70auto (a percentage that is not whole keeps its digits: 30.5mae_69.5auto); from
        the weighted terms of a strategy that weighs terms: 50mae_50spectral."""
        if self.terms is not None:
            return "_".join(
                f"{round(100 * w, 6):g}{'auto' if t == 'autocorr' else t}"
                for t, w in self.terms.items()
                if w > 0
            )
        assert self.alpha is not None  # validate() checked
        mae = round(100 * self.alpha, 6)
        if mae == 100 or mae == 0:
            return "100mae" if mae == 100 else "100auto"
        return f"{mae:g}mae_{round(100 - mae, 6):g}auto"

    def differences(self) -> dict[str, Any]:
        """What this phase trains differently from the table's plan for its strategy, phase and
        preset: every setting that shapes training (all but where and how it runs, the seed and
        the bookkeeping), as {name: value}. The plan itself has none."""
        plan = dataclasses.asdict(resolve(self.strategy, self.phase, self.preset))
        mine = dataclasses.asdict(self)
        return {k: mine[k] for k in sorted(mine) if k not in NOT_VARIANT and mine[k] != plan[k]}

    @functools.cached_property
    def variant_name(self) -> str:
        """The variant trained: the strategy's name for the table's plan; for any difference
        --variant's name, else one derived from what differs (mae+hidden_size=24). A variant has
        its own runs, folders, registered model and aliases and never moves the plan's."""
        return self.variant or variant_name(self.strategy, self.differences())

    @property
    def is_plan(self) -> bool:
        """The table's plan for the strategy: no differences, no other name."""
        return self.variant_name == self.strategy

    @property
    def trains_two_terms(self) -> bool:
        """Two terms or more carry weight: the CSV gets the combined script's component columns."""
        return sum(w > 0 for w in self.weights.values()) >= 2

    @property
    def run_name(self) -> str:
        return f"{self.variant_name}-p{self.phase}-s{self.seed}"

    @property
    def registered_model(self) -> str:
        """Registry name; presets other than full get their own: demos never move real aliases."""
        return f"seqgen-{self.variant_name}" + ("" if self.preset == "full" else f"-{self.preset}")

    def alias(self, phase: int | None = None) -> str:
        """This seed's alias of a phase's model (the plain phase-N alias follows any seed)."""
        return f"phase-{self.phase if phase is None else phase}-s{self.seed}"

    @property
    def continues_from(self) -> str | None:
        """Phase N >= 2 continues from this seed's phase N-1 model, unless told otherwise."""
        if self.existing_model or self.phase == 1:
            return self.existing_model
        return f"models:/{self.registered_model}@{self.alias(self.phase - 1)}"

    @property
    def planned_first_epoch(self) -> int:
        """First global epoch if every earlier phase ran its table epochs (phase 2 of full: 101).
        Training starts after the parent's real last epoch instead, which this assumes."""
        return 1 + sum(
            resolve_table_value("epochs", self.strategy, p, self.preset)
            for p in range(1, self.phase)
        )

    @property
    def folder_prefix(self) -> str:
        """The folder's name before its epochs. The plan's is the original's (100mae, 100auto,
        50mae_50auto), named from alpha; a table strategy that shares another's alpha puts its
        name first (half-50mae_50auto), so two strategies never share a folder. A variant's
        folder is named by the variant (mae+hidden_size=24)."""
        if not self.is_plan:
            return self.variant_name
        owner = next(
            (
                name
                for name in strategies()
                if same_weights(table_weights(name, self.phase, self.preset), self.weights)
            ),
            None,
        )
        if owner == self.strategy:
            return self.loss_name
        return f"{self.strategy}-{self.loss_name}"

    def folder(self, first_epoch: int) -> Path:
        """This phase's output folder, named as the original's: 50mae_50auto_101_200."""
        if self.output_dir:
            return Path(self.output_dir)
        name = f"{self.folder_prefix}_{first_epoch}_{first_epoch + self.epochs - 1}"
        return Path(self.outputs_root) / f"{self.preset}-s{self.seed}" / name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"existing_model": self.continues_from}

    def overrides(self) -> dict[str, Any]:
        """Settings that differ from the table and preset (what the command line changed)."""
        table_values = dataclasses.asdict(resolve(self.strategy, self.phase, self.preset))
        return {k: v for k, v in dataclasses.asdict(self).items() if table_values[k] != v}


FIELDS = {f.name: f for f in dataclasses.fields(PhaseSettings)}


def alpha_weights(alpha: float) -> dict[str, float]:
    """The seed's strategies: alpha * MAE + (1 - alpha) * autocorrelation."""
    return {"mae": alpha, "autocorr": 1 - alpha}


def strategy_weights(alpha: float | None, terms: dict[str, float] | None) -> dict[str, float]:
    """{term: weight}: `terms` where given, else mae alpha and autocorr 1 - alpha."""
    if terms is not None:
        return dict(terms)
    return alpha_weights(alpha if alpha is not None else math.nan)  # load_table: one is given


def table_weights(strategy: str, phase: int, preset: str) -> dict[str, float]:
    """The weights the table gives a strategy's phase."""
    return strategy_weights(
        resolve_table_value("alpha", strategy, phase, preset),
        resolve_table_value("terms", strategy, phase, preset),
    )


def same_weights(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], abs_tol=1e-12) for k in a)


# Settings that do not make a variant: where and how a phase runs (data folder, outputs, device,
# workers, the model it starts from), the seed (a variant's seeds are its replicas), bookkeeping
# (checkpoint cadence, the divergence guard) and the name itself.
NOT_VARIANT = (
    *SELECTORS, "seed", "data_dir", "outputs_root", "output_dir", "device", "num_workers",
    "existing_model", "save_every", "max_nonfinite_steps", "variant",
)  # fmt: skip
# A variant's own name: letters, digits and . _ = + - (safe in folders, registry names, shells).
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")


def format_value(value: Any) -> str:
    """A setting's value as a variant name shows it: 24, 0.0002, 1e-05, true, linear."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same float
    if isinstance(value, dict):  # a strategy's terms: 0.5mae_0.5spectral
        return "_".join(f"{format_value(float(w))}{t}" for t, w in value.items())
    return str(value)


def variant_name(strategy: str, differences: dict[str, Any]) -> str:
    """mae for the plan; mae+hidden_size=24+start_lr=0.0002 for differences (sorted by name)."""
    return "+".join([strategy, *(f"{k}={format_value(v)}" for k, v in sorted(differences.items()))])


@functools.cache  # typing.get_type_hints takes about 0.5 ms, and a phase's settings ask 40 times
def _field_kind(name: str) -> tuple[type, bool]:
    """(the value type, whether None is allowed) of one setting."""
    hint = typing.get_type_hints(PhaseSettings)[name]
    if isinstance(hint, types.UnionType):
        kinds = [t for t in typing.get_args(hint) if t is not type(None)]
        return typing.get_origin(kinds[0]) or kinds[0], type(None) in typing.get_args(hint)
    return typing.get_origin(hint) or hint, False


def coerce(name: str, value: Any, where: str | None = None) -> Any:
    """Check (and convert where lossless) one setting's value; raise ConfigError naming it, as
    `--name` for a command-line value or `where: name` for one from a file."""
    label = f"{where}: {name}" if where else f"--{name}"
    if name not in FIELDS:
        raise ConfigError(f"{where}: unknown setting {name!r}" if where else f"unknown {label}")
    kind, optional = _field_kind(name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{label} cannot be empty")
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{label} must be a finite number, got {value!r}")
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is dict:
        return coerce_terms(value, label)
    raise ConfigError(f"{label} must be {kind.__name__}, got {value!r}")


def parse_terms(text: str, label: str) -> dict[str, Any]:
    """--terms mae=0.5,spectral=0.5 -> {"mae": 0.5, "spectral": 0.5} (checked by coerce_terms)."""
    terms: dict[str, Any] = {}
    for part in text.split(","):
        name, eq, weight = part.partition("=")
        if not eq or not name.strip():
            raise ConfigError(
                f"{label}: give name=weight pairs, mae=0.5,spectral=0.5, got {text!r}"
            )
        try:
            terms[name.strip()] = float(weight)
        except ValueError:
            terms[name.strip()] = weight.strip()
    return terms


def coerce_terms(value: Any, label: str) -> dict[str, float]:
    """A strategy's weights over loss terms, from the table (a TOML table) or a flag (text):
    known terms, each weight a number >= 0, not all 0; ConfigError naming the section or flag."""
    from seqgen.training.losses import check_weights  # the registry: torch, on first use only

    if isinstance(value, str):
        value = parse_terms(value, label)
    if not isinstance(value, dict):
        raise ConfigError(
            f"{label} must be weights over loss terms, {{ mae = 0.5 }}, got {value!r}"
        )
    where = label.removesuffix(": terms") if label.endswith(": terms") else label
    try:
        check_weights(value, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {str(k): float(v) for k, v in value.items()}


def load_table(path: Path = PHASES_FILE) -> dict[str, Any]:
    """Read the phase table; unknown sections or settings and wrong list lengths are errors."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    unknown = set(table) - {"shared", "strategies", "presets", "default_strategies"}
    if unknown:
        raise ConfigError(f"{path.name}: unknown section(s) {sorted(unknown)}")
    defaults = table.setdefault("default_strategies", list(table.get("strategies", {})))
    if (
        not isinstance(defaults, list)
        or not defaults
        or not all(isinstance(d, str) and d in table.get("strategies", {}) for d in defaults)
    ):
        raise ConfigError(
            f"{path.name}: default_strategies must list [strategies.*] sections, got {defaults!r}"
        )
    sections = [("shared", table.get("shared", {}))]
    sections += [(f"strategies.{k}", v) for k, v in table.get("strategies", {}).items()]
    sections += [(f"presets.{k}", v) for k, v in table.get("presets", {}).items()]
    for section_name, section in sections:
        where = f"{path.name} [{section_name}]"
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: must be a table of settings")
        for key, value in section.items():
            if key not in FIELDS or key in SELECTORS:
                raise ConfigError(f"{where}: unknown setting {key!r}")
            if isinstance(value, list) and len(value) != N_PHASES:
                n = len(value)
                raise ConfigError(f"{where}: {key} needs one value or {N_PHASES}, got {n}")
            for v in value if isinstance(value, list) else [value]:
                coerce(key, v, where)
    for name, section in table.get("strategies", {}).items():
        where = f"{path.name} [strategies.{name}]"
        given = [k for k in ("alpha", "terms") if k in section or k in table.get("shared", {})]
        if len(given) != 1:
            how = "both" if given else "neither"
            raise ConfigError(
                f"{where}: give its loss as alpha (MAE weight, autocorrelation 1 - alpha) or as "
                f"terms = {{ mae = 0.5, spectral = 0.5 }}; it has {how}"
            )
    if not table.get("strategies") or "full" not in table.get("presets", {}):
        raise ConfigError(f"{path.name}: needs at least one [strategies.*] and [presets.full]")
    return table


@functools.cache
def table() -> dict[str, Any]:
    """The phase table, read once on first use."""
    return load_table(PHASES_FILE)


def strategies() -> tuple[str, ...]:
    """Every strategy of the table (`--strategy all-table`)."""
    return tuple(table()["strategies"])


def default_strategies() -> tuple[str, ...]:
    """What `seqgen demo`, a plain `seqgen study` and `--strategy all` train: the table's
    default_strategies (the seed's mae, autocorr and combined)."""
    return tuple(table()["default_strategies"])


def presets() -> tuple[str, ...]:
    return tuple(table()["presets"])


def resolve_table_value(name: str, strategy: str, phase: int, preset: str) -> Any:
    """One setting of (strategy, phase, preset): preset, else strategy, else shared section."""
    t = table()
    for section in (t["presets"][preset], t["strategies"][strategy], t["shared"]):
        if name in section:
            value = section[name]
            return value[phase - 1] if isinstance(value, list) else value
    default = FIELDS[name].default
    if default is dataclasses.MISSING:
        raise ConfigError(f"{PHASES_FILE.name}: no value for {name} ({strategy}, phase {phase})")
    return default


def resolve(strategy: str, phase: int, preset: str = "full", **overrides: Any) -> PhaseSettings:
    """Settings of one phase: the table, then the preset, then command-line overrides."""
    if strategy not in strategies():
        raise ConfigError(f"unknown strategy {strategy!r}: choose one of {', '.join(strategies())}")
    if not isinstance(phase, int) or isinstance(phase, bool) or not 1 <= phase <= N_PHASES:
        raise ConfigError(f"phase must be 1..{N_PHASES}, got {phase!r}")
    if preset not in presets():
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(presets())}")
    values: dict[str, Any] = {"strategy": strategy, "phase": phase, "preset": preset}
    for name in FIELDS:
        if name not in values:
            value = resolve_table_value(name, strategy, phase, preset)
            values[name] = coerce(name, value, PHASES_FILE.name)
    for name, value in overrides.items():
        if name in SELECTORS:
            raise ConfigError(f"{name} cannot be overridden")
        values[name] = coerce(name, value)
    if "alpha" in overrides and values["terms"] is not None:
        terms = ",".join(f"{k}={v:g}" for k, v in values["terms"].items())
        raise ConfigError(
            f"--alpha weighs MAE against autocorrelation; strategy {strategy} weighs terms "
            f"({terms}): give --terms instead"
            if "terms" not in overrides
            else "--alpha and --terms: give one (--terms mae=0.7,autocorr=0.3 is --alpha 0.7)"
        )
    settings = PhaseSettings(**values)
    validate(settings)
    return settings


def validate(s: PhaseSettings) -> None:
    """Cross-field and range checks; messages name the option."""
    if s.variant is not None:
        validate_variant_name(s)
    if s.alpha is not None and not 0.0 <= s.alpha <= 1.0:
        raise ConfigError(f"--alpha must be within 0..1, got {s.alpha}")
    for name in INT_RANGES:
        if name in FIELDS:
            check_int(name, getattr(s, name))
    for name in ("start_lr", "min_lr", "clip_grad_norm"):
        if not getattr(s, name) > 0:
            raise ConfigError(f"--{name} must be positive, got {getattr(s, name)}")
    if not 0.0 <= s.dropout < 1.0:
        raise ConfigError(f"--dropout must be within [0, 1) (1 drops everything), got {s.dropout}")
    for name in ("teacher_forcing_start", "teacher_forcing_end"):
        if not 0.0 <= getattr(s, name) <= 1.0:
            raise ConfigError(f"--{name} must be within 0..1, got {getattr(s, name)}")
    for name in ("noise_level", "weight_decay"):
        if getattr(s, name) < 0:
            raise ConfigError(f"--{name} cannot be negative, got {getattr(s, name)}")
    for name in ("new_training_schedule", "continued_schedule"):
        if getattr(s, name) not in SCHEDULES:
            raise ConfigError(
                f"--{name} must be one of {', '.join(SCHEDULES)}, got {getattr(s, name)!r}"
            )
    if s.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {s.device!r}")
    from seqgen.model.cells import check_cell  # imports torch: only once settings are checked

    check_cell(s.cell)
    if s.split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {s.split!r}")
    if not 0.0 < s.edge_fraction < 1.0:
        raise ConfigError(f"--edge_fraction must be within (0, 1), got {s.edge_fraction}")
    default_fraction = FIELDS["edge_fraction"].default
    if s.split != "edge" and not math.isclose(s.edge_fraction, default_fraction):
        # it would change nothing but the phase's identity (a variant that trains the same)
        raise ConfigError(f"--edge_fraction applies to --split edge only (--split is {s.split})")
    for name in ("early_stopping_patience", "overfit_gap", "grad_explosion_norm"):
        value = getattr(s, name)
        if value is not None and not value > 0:
            raise ConfigError(f"--{name} must be positive, got {value}")


def validate_variant_name(s: PhaseSettings) -> None:
    """--variant NAME: a name safe in folders and registry names, never a table strategy's
    (the plan's names belong to the plan) unless it is that strategy's plan itself."""
    name = s.variant or ""
    if not VARIANT_NAME.fullmatch(name):
        raise ConfigError(
            f"--variant {name!r}: use letters, digits and . _ = + - (starting with a letter or "
            "digit)"
        )
    if name in strategies() and (name != s.strategy or s.differences()):
        raise ConfigError(
            f"--variant {name}: {name} is the table's plan for strategy {name}; name this "
            "variant otherwise"
        )
