"""Where a phase starts: new training, the previous phase's registered model, or its own
checkpoint; and the data it trains on, split and standardised."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from seqgen.config import PhaseSettings
from seqgen.data.sequences import Normalizer, SequenceData, load_sequences
from seqgen.data.split import Split, make_split
from seqgen.errors import ConfigError
from seqgen.model.bundle import Checkpoint
from seqgen.model.generator import ModelConfig
from seqgen.runs import tracking


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
    checkpoint: Checkpoint | None = None


def load_phase_data(s: PhaseSettings, data: SequenceData | None = None) -> SequenceData:
    """The phase's samples: read from s.data_dir, or the arrays a cluster driver handed over."""
    if data is None:
        data = load_sequences(s.data_dir, s.n_components, s.n_params)
    if (data.n_components, data.n_params) != (s.n_components, s.n_params):
        raise ConfigError(
            f"the data has {data.n_components} components and {data.n_params} parameters; "
            f"the settings say {s.n_components} and {s.n_params}"
        )
    if s.max_samples is not None and s.max_samples < data.n_samples:
        data = data.subset(np.arange(s.max_samples))
    if s.max_lag >= data.seq_len:
        raise ConfigError(
            f"--max_lag {s.max_lag} must be below the sequence length {data.seq_len} of "
            f"{s.data_dir}"
        )
    return data


def resolve_start(s: PhaseSettings, data: SequenceData) -> Start:
    """Phase 1 fits the split and statistics; a continued phase reuses its parent's."""
    if s.continues_from:
        return start_from_parent(s, data)
    split = make_split(data.files, s.seed)
    train = split.indices(data.files, "train")
    norm = Normalizer.fit(data.components[train], data.params[train])
    model_config = ModelConfig(s.n_components, s.n_params, s.hidden_size, s.num_layers, s.dropout)
    return Start(split, norm, model_config, None, None, 1, s.new_training_schedule)


def resume_from(start: Start, checkpoint: Checkpoint) -> Start:
    """The same start, continued from the phase's own checkpoint."""
    b = checkpoint.bundle
    return dataclasses.replace(
        start,
        split=b.split,
        norm=b.normalizer,
        model_config=b.model_config,
        state_dict=b.state_dict,
        first_epoch=checkpoint.first_epoch,
        checkpoint=checkpoint,
    )


# Settings that say where and how a phase runs, not what it trains: a phase resumed on another
# node, with the data in another folder or written to another outputs root, is the same phase.
NOT_IDENTITY = ("data_dir", "outputs_root", "output_dir", "device", "num_workers", "existing_model")


def identity(s: PhaseSettings, start: Start, fingerprint: str) -> dict:
    """What defines a phase run: the settings that shape training, the exact model it continues
    and the data's fingerprint. Its digest (phase_key) finds the run again on any node."""
    settings = {k: v for k, v in s.to_dict().items() if k not in NOT_IDENTITY}
    return settings | {"parent": start.parent_uri or "", "data_fingerprint": fingerprint}


def phase_key(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def start_from_parent(s: PhaseSettings, data: SequenceData) -> Start:
    """A continued phase: the parent's exact registry version, its split, statistics and weights."""
    parent_uri = tracking.exact_model_uri(s.continues_from)
    hint = None
    if not s.existing_model:
        hint = (
            f"run phase {s.phase - 1} of {s.variant} with seed {s.seed} first (seqgen train "
            f"--strategy {s.strategy} --phase {s.phase - 1} --preset {s.preset} --seed {s.seed})"
        )
    parent = tracking.load_bundle(parent_uri, hint)
    if not s.existing_model and parent.data.fingerprint != data.fingerprint:
        raise ConfigError(
            f"{parent_uri} was trained on other data (fingerprint {parent.data.fingerprint}, "
            f"{s.data_dir} has {data.fingerprint}): pass --existing_model to continue on this "
            "data deliberately"
        )
    if list(parent.data.param_names) != list(data.param_names):
        raise ConfigError(
            f"{parent_uri} was trained on parameters {list(parent.data.param_names)}, "
            f"the data has {list(data.param_names)}"
        )
    shape = parent.model_config
    for name in ("hidden_size", "num_layers", "n_components", "n_params"):
        if getattr(s, name) != getattr(shape, name):
            raise ConfigError(
                f"--{name} {getattr(s, name)} differs from the model it continues ({parent_uri} "
                f"has {name} {getattr(shape, name)}): a continued phase keeps its parent's shape"
            )
    # Dropout is a training setting, not a shape: the continued phase applies its own.
    model_config = dataclasses.replace(shape, dropout=s.dropout)
    if parent.last_epoch is not None:
        first_epoch = parent.last_epoch + 1
    else:  # a format-1 model: assume the parent ran its table epochs
        first_epoch = s.planned_first_epoch
        if s.existing_model:
            first_epoch = parent.epoch + 1
    return Start(
        parent.split,
        parent.normalizer,
        model_config,
        parent.state_dict,
        parent_uri,
        first_epoch,
        s.continued_schedule,
    )


def split_tensors(data: SequenceData, start: Start, device: torch.device) -> dict:
    """{part: (params (N,P), components (N,T,K))}, standardised, on the device."""
    parts = {}
    for name in ("train", "val", "test"):
        idx = start.split.indices(data.files, name)
        params = torch.as_tensor(start.norm.normalize_params(data.params[idx]))
        components = torch.as_tensor(start.norm.normalize_components(data.components[idx]))
        parts[name] = (params.to(device), components.to(device))
    return parts


def choose_device(s: PhaseSettings) -> torch.device:
    if s.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but this torch build sees no CUDA device")
    if s.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(s.device)
