"""Where a phase starts (new training, the previous phase's registered model, or its own
checkpoint), the data it trains on, split and standardised, and its identity in the store: the
Setup of a phase, decided before anything is tracked, so bad input fails before a run exists."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seqgen.config import PhaseSettings
from seqgen.data.sequences import Normalizer, SequenceData, load_sequences
from seqgen.data.split import Split, phase_split
from seqgen.errors import ConfigError
from seqgen.model.bundle import Bundle, Checkpoint, DataInfo
from seqgen.model.generator import ModelConfig
from seqgen.runs import tracking
from seqgen.runs.variants import resolve_variant
from seqgen.training.step import forced_cpu_precision


@dataclass
class Start:
    """What a phase starts from: new training, a parent model, or its own checkpoint."""

    split: Split
    norm: Normalizer
    model_config: ModelConfig
    state_dict: dict | None
    parent_uri: str | None  # exact models:/name/version, or the file/URI given
    first_epoch: int  # global epoch of this phase's first epoch
    schedule: str  # the learning-rate schedule: new training or continued


@dataclass
class Setup:
    """Everything decided before the first epoch of a phase."""

    settings: PhaseSettings
    data: SequenceData
    start: Start
    identity: dict  # what defines this phase (settings, exact parent, data fingerprint)
    key: str  # its digest, the run's phase-key tag: finds the run again on any node
    experiment_id: str
    device: torch.device
    parts: dict = field(default_factory=dict)  # {split: (params (N,P), components (N,T,K))}

    @property
    def out_dir(self) -> Path:
        return self.settings.folder(self.start.first_epoch)

    @property
    def last_epoch(self) -> int:
        return self.start.first_epoch + self.settings.epochs - 1

    def global_epoch(self, epoch: int) -> int:
        """The global epoch of the phase's 0-based epoch `epoch`."""
        return self.start.first_epoch + epoch

    def bundle(self, state_dict: dict, epoch: int, val_loss: float, run_id: str) -> Bundle:
        """The model file of these weights: with the normaliser, data names, split, ranges."""
        settings, data = self.settings, self.data
        train_params = data.params[self.start.split.indices(data.files, "train")]
        lows, highs = train_params.min(axis=0), train_params.max(axis=0)
        ranges = tuple((float(lo), float(hi)) for lo, hi in zip(lows, highs, strict=True))
        return Bundle(
            model_config=self.start.model_config,
            state_dict=state_dict,
            normalizer=self.start.norm,
            data=DataInfo(
                step_name=data.step_name,
                component_names=data.component_names,
                param_names=data.param_names,
                steps=tuple(data.steps.tolist()),
                fingerprint=data.fingerprint,
                data_dir=str(settings.data_dir),
                param_ranges=ranges,
            ),
            split=self.start.split,
            strategy=settings.strategy,
            variant=settings.variant_name,
            phase=settings.phase,
            seed=settings.seed,
            preset=settings.preset,
            epoch=epoch,
            val_loss=val_loss,
            run_id=run_id,
            last_epoch=epoch,  # so far; the keeper writes the real last into the best model
        )

    def resume_from(self, checkpoint: Checkpoint) -> None:
        """Go on from the phase's own checkpoint (its weights, split, statistics, first epoch)."""
        b = checkpoint.bundle
        self.start = dataclasses.replace(
            self.start,
            split=b.split,
            norm=b.normalizer,
            model_config=b.model_config,
            state_dict=b.state_dict,
            first_epoch=checkpoint.first_epoch,
        )

    def load_tensors(self) -> None:
        """The split's standardised tensors on the device (after any resume_from)."""
        self.parts = split_tensors(self.data, self.start, self.device)


def prepare(
    settings: PhaseSettings,
    data: SequenceData | None = None,
    parent: Bundle | None = None,
    exp_id: str | None = None,
) -> Setup:
    """Data, starting point, identity and device: every check on input happens here. parent:
    the model that settings.continues_from names, in memory (else read from the store);
    exp_id: the experiment, the store checked already (a stack's other members)."""
    if exp_id is None:
        tracking.check_tracking_store()
    forced_cpu_precision()  # a bad SEQGEN_CPU_PRECISION fails here, before any run exists
    data = load_phase_data(settings, data)
    settings = resolve_variant(settings, data.fingerprint)
    start = resolve_start(settings, data, parent)
    ident = identity(settings, start, data.fingerprint)
    exp_id = exp_id or tracking.experiment_id()
    tracking.check_can_log(exp_id, [settings.registered_model])  # before training, not after
    return Setup(settings, data, start, ident, phase_key(ident), exp_id, choose_device(settings))


def load_phase_data(settings: PhaseSettings, data: SequenceData | None = None) -> SequenceData:
    """The phase's samples: read from the data folder, or the arrays a cluster driver sent."""
    if data is None:
        data = load_sequences(settings.data_dir, settings.n_components, settings.n_params)
    if (data.n_components, data.n_params) != (settings.n_components, settings.n_params):
        raise ConfigError(
            f"the data has {data.n_components} components and {data.n_params} parameters; "
            f"the settings say {settings.n_components} and {settings.n_params}"
        )
    if settings.max_samples is not None and settings.max_samples < data.n_samples:
        data = data.subset(np.arange(settings.max_samples))
    if settings.max_lag >= data.seq_len:
        raise ConfigError(
            f"--max_lag {settings.max_lag} must be below the sequence length {data.seq_len} of "
            f"{settings.data_dir}"
        )
    if settings.split != "random":  # its sizes depend on the data: checked before any run
        data_split(settings, data)
    return data


def data_split(settings: PhaseSettings, data: SequenceData) -> Split:
    """The split a new chain of these settings makes of the data (phase 1's; later phases reuse
    their parent's)."""
    return phase_split(
        data.files,
        data.params,
        settings.seed,
        settings.split,
        settings.edge_fraction,
        data.param_names,
    )


def resolve_start(
    settings: PhaseSettings, data: SequenceData, parent: Bundle | None = None
) -> Start:
    """Phase 1 fits the split and statistics; a continued phase reuses its parent's."""
    if settings.continues_from:
        return start_from_parent(settings, data, parent)
    split = data_split(settings, data)
    train = split.indices(data.files, "train")
    norm = Normalizer.fit(data.components[train], data.params[train])
    model_config = ModelConfig(
        settings.n_components,
        settings.n_params,
        settings.hidden_size,
        settings.num_layers,
        settings.dropout,
        cell=settings.cell,
    )
    return Start(split, norm, model_config, None, None, 1, settings.new_training_schedule)


# Settings that say where and how a phase runs, not what it trains: a phase resumed on another
# node, with the data in another folder or written to another outputs root, is the same phase.
NOT_IDENTITY = ("data_dir", "outputs_root", "output_dir", "device", "num_workers", "existing_model")


# Settings added after runs were keyed on the identity, each left out at the value every earlier
# run trained with (the random split, the LSTM, alpha's weights rather than named terms) so that
# those runs are found again; with each the settings that mean something only beside another
# value (edge_fraction beside an edge split).
ADDED_LATER = {
    "split": ("random", ("edge_fraction",)),
    "cell": ("lstm", ()),
    "terms": (None, ()),
}


def identity(settings: PhaseSettings, start: Start, fingerprint: str) -> dict:
    """What defines a phase run: the settings that shape training, the variant's name (a plan's
    phase has none, as before variants had names), the exact model it continues and the data's
    fingerprint. Its digest (phase_key) finds the run again on any node."""
    kept = {k: v for k, v in settings.to_dict().items() if k not in NOT_IDENTITY}
    for key, (earlier, beside) in ADDED_LATER.items():
        if kept.get(key) == earlier:
            kept = {k: v for k, v in kept.items() if k not in (key, *beside)}
    if not settings.is_plan:
        kept["variant"] = settings.variant_name
    return kept | {"parent": start.parent_uri or "", "data_fingerprint": fingerprint}


def phase_key(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def start_from_parent(
    settings: PhaseSettings, data: SequenceData, parent: Bundle | None = None
) -> Start:
    """A continued phase: the parent's exact registry version, its split, statistics and
    weights (`parent`: that model in memory, whose files may still be landing in the store)."""
    parent_uri = tracking.exact_model_uri(settings.continues_from)
    hint = None
    if not settings.existing_model:
        hint = (
            f"run phase {settings.phase - 1} of {settings.variant_name} with seed {settings.seed} "
            f"first (seqgen train --strategy {settings.strategy} --phase {settings.phase - 1} "
            f"--preset {settings.preset} --seed {settings.seed})"
        )
    if parent is None:
        parent = tracking.load_bundle(parent_uri, hint)
    if not settings.existing_model and parent.data.fingerprint != data.fingerprint:
        raise ConfigError(
            f"{parent_uri} was trained on other data (fingerprint {parent.data.fingerprint}, "
            f"{settings.data_dir} has {data.fingerprint}): pass --existing_model to continue on "
            "this data deliberately"
        )
    if (parent.split.kind, parent.split.edge_fraction) != _split_of(settings):
        trained = f"the {parent.split.kind} split" + (
            f" (--edge_fraction {parent.split.edge_fraction:g})"
            if parent.split.kind == "edge"
            else ""
        )
        raise ConfigError(
            f"{parent_uri} was trained on {trained}, this phase asks for --split {settings.split}"
            + (f" --edge_fraction {settings.edge_fraction:g}" if settings.split == "edge" else "")
            + ": a continued phase keeps its parent's split"
        )
    if list(parent.data.param_names) != list(data.param_names):
        raise ConfigError(
            f"{parent_uri} was trained on parameters {list(parent.data.param_names)}, "
            f"the data has {list(data.param_names)}"
        )
    shape = parent.model_config
    for name in ("cell", "hidden_size", "num_layers", "n_components", "n_params"):
        if getattr(settings, name) != getattr(shape, name):
            raise ConfigError(
                f"--{name} {getattr(settings, name)} differs from the model it continues "
                f"({parent_uri} has {name} {getattr(shape, name)}): a continued phase keeps its "
                "parent's shape"
            )
    # Dropout is a training setting, not a shape: the continued phase applies its own.
    model_config = dataclasses.replace(shape, dropout=settings.dropout)
    if parent.last_epoch is not None:
        first_epoch = parent.last_epoch + 1
    else:  # a format-1 model: assume the parent ran its table epochs
        first_epoch = settings.planned_first_epoch
        if settings.existing_model:
            first_epoch = parent.epoch + 1
    return Start(
        parent.split,
        parent.normalizer,
        model_config,
        parent.state_dict,
        parent_uri,
        first_epoch,
        settings.continued_schedule,
    )


def _split_of(settings: PhaseSettings) -> tuple[str, float | None]:
    """(kind, edge fraction) as a Split records them."""
    return settings.split, settings.edge_fraction if settings.split == "edge" else None


def split_tensors(data: SequenceData, start: Start, device: torch.device) -> dict:
    """{part: (params (N,P), components (N,T,K))}, standardised, on the device."""
    parts = {}
    for name in ("train", "val", "test"):
        idx = start.split.indices(data.files, name)
        params = torch.as_tensor(start.norm.normalize_params(data.params[idx]))
        components = torch.as_tensor(start.norm.normalize_components(data.components[idx]))
        parts[name] = (params.to(device), components.to(device))
    return parts


def choose_device(settings: PhaseSettings) -> torch.device:
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but this torch build sees no CUDA device")
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)
