"""Where a phase starts: new training, the previous phase's registered model, or its own
checkpoint; and the data it trains on, split and standardised."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from seqgen import outputs, tracking
from seqgen.bundle import Checkpoint
from seqgen.config import PhaseSettings
from seqgen.data import Normalizer, SequenceData, load_sequences
from seqgen.errors import ConfigError
from seqgen.model import ModelConfig
from seqgen.split import Split, make_split


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


def load_phase_data(s: PhaseSettings) -> SequenceData:
    data = load_sequences(s.data_dir, s.n_components, s.n_params)
    if s.max_samples is not None and s.max_samples < data.n_samples:
        data = data.subset(np.arange(s.max_samples))
    if s.max_lag >= data.seq_len:
        raise ConfigError(
            f"--max_lag {s.max_lag} must be below the sequence length {data.seq_len} of "
            f"{s.data_dir}"
        )
    return data


def resolve_start(s: PhaseSettings, data: SequenceData, resume: bool) -> Start:
    """Phase 1 fits the split and statistics; a continued phase reuses its parent's; a resume
    takes everything from the phase's latest checkpoint."""
    if s.continues_from:
        start = start_from_parent(s, data)
    else:
        split = make_split(data.files, s.seed)
        train = split.indices(data.files, "train")
        norm = Normalizer.fit(data.components[train], data.params[train])
        model_config = ModelConfig(
            s.n_components, s.n_params, s.hidden_size, s.num_layers, s.dropout
        )
        start = Start(split, norm, model_config, None, None, 1, s.new_training_schedule)
    if not resume:
        return start
    checkpoint = Checkpoint.load(outputs.latest_checkpoint(s.folder(start.first_epoch)))
    if checkpoint.settings != s.to_dict():
        changed = sorted(k for k, v in s.to_dict().items() if checkpoint.settings.get(k) != v)
        raise ConfigError(
            "--resume continues with the settings the phase started with; these differ: "
            + ", ".join(changed)
        )
    b = checkpoint.bundle
    if b.data.fingerprint != data.fingerprint:
        raise ConfigError(
            f"--resume: {s.data_dir} changed since the phase started (data fingerprint "
            f"{data.fingerprint}, the checkpoint's {b.data.fingerprint})"
        )
    return dataclasses.replace(
        start,
        split=b.split,
        norm=b.normalizer,
        model_config=b.model_config,
        state_dict=b.state_dict,
        parent_uri=checkpoint.continued_from or None,
        first_epoch=checkpoint.first_epoch,
        checkpoint=checkpoint,
    )


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
