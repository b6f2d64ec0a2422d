"""A variant's name stands for one set of differences from the phase table and one dataset,
across the whole store: its runs, folders, registered model and aliases belong to it alone, so
no idea a researcher tries ever moves the plan's names or another variant's.

The name comes from the settings (seqgen/config.py: the strategy for the plan, mae+hidden_size=24
for a difference, or --variant NAME), except for the data: the table does not name a dataset, so
a name belongs to the data its runs were first trained on, and the same settings on other data
become the variant <name>+data=<folder> (its folder's name, or the data's fingerprint where that
name is taken too). A --variant NAME that already stands for other settings or data is refused.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from seqgen.config import PhaseSettings, variant_name
from seqgen.errors import ConfigError
from seqgen.runs import tracking


def record(settings: PhaseSettings, fingerprint: str) -> str:
    """What a variant's name stands for (the runs' tag seqgen.variant, JSON)."""
    return json.dumps(
        {"differences": settings.differences(), "data": fingerprint}, sort_keys=True, default=str
    )


def resolve_variant(settings: PhaseSettings, fingerprint: str) -> PhaseSettings:
    """The settings under the name their runs go by in this store: as derived or given, or,
    when runs of that name were trained on other data, with the data in the name."""
    mine = record(settings, fingerprint)
    name = settings.variant_name
    known = tracking.variant_records(name, settings.preset, settings.phase)
    records = {rec for rec, _ in known}
    if not known or mine in records:
        return settings
    same = _differences(mine)
    if any(
        _same_folder(folder, settings.data_dir) and _differences(rec) == same
        for rec, folder in known
    ):
        # the same folder, its contents changed: the runs' fingerprints tell them apart
        return settings
    theirs = json.loads(sorted(records)[0])
    if settings.variant is not None:
        raise ConfigError(
            f"--variant {name} already stands for {describe(theirs)} in this store; this phase "
            f"has {describe(json.loads(mine))}: name it otherwise"
        )
    for label in (data_label(settings.data_dir), fingerprint[:8]):
        named = variant_name(settings.strategy, settings.differences() | {"data": label})
        if {rec for rec, _ in tracking.variant_records(named, settings.preset, settings.phase)} <= {
            mine
        }:
            return dataclasses.replace(settings, variant=named)
    raise ConfigError(  # two datasets of one folder name and one fingerprint prefix: unheard of
        f"{name}: runs of it on other data hold every derived name; name this variant with "
        "--variant NAME"
    )


def _differences(rec: str) -> dict:
    return json.loads(rec)["differences"]


def _same_folder(a: str, b: str) -> bool:
    return bool(a) and Path(a).resolve() == Path(b).resolve()


def data_label(data_dir: str) -> str:
    """A data folder's name as a variant name may show it (letters, digits, . _ -)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(data_dir).resolve().name) or "data"


def describe(rec: dict) -> str:
    """{'differences': {...}, 'data': fp} -> 'hidden_size=24 on data 3fa2c1d0e5b6a7c8'."""
    diffs = ", ".join(f"{k}={v}" for k, v in rec["differences"].items()) or "the table's plan"
    return f"{diffs} on data {rec['data']}"
