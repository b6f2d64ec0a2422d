"""A sweep: `--vary KEY=V1,V2,...` (repeatable; the grid is the product of the lists) on
`seqgen pipeline` and `seqgen study`. Each grid point is a variant (seqgen/runs/variants.py) with
its own chains, runs and registered model; a point trained before is found registered and skipped,
so a sweep run again trains nothing twice and a sweep extended by a value trains only that value.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from seqgen import config
from seqgen.errors import ConfigError

# The model's shape: a continued phase keeps its parent's, so these vary only from phase 1.
SHAPE_KEYS = ("cell", "hidden_size", "num_layers", "n_components", "n_params")
NOT_VARIED = {
    "seed": "seeds are a variant's replicas, not variants: use --seeds",
    "variant": "a sweep names each variant from what it varies",
    "existing_model": "every chain of a sweep continues its own models",
    "output_dir": "each variant has its own folders: vary --outputs_root, or nothing",
    "terms": "a weighting's commas are --vary's separators: give each weighting its own --terms "
    "(each is a variant of its own), or vary alpha",
}


def parse_vary(items: Sequence[str], phases: list[int], overrides: dict) -> list[dict[str, Any]]:
    """('alpha=0.25,0.5', 'hidden_size=16,24') -> the grid's points, each {key: value}, in
    order ([{}] without --vary). ';' also separates keys, as one `mlflow run -P vary=...` value
    needs: 'alpha=0.25,0.5;hidden_size=16,24'."""
    lists: dict[str, list[Any]] = {}
    for item in (part for text in items for part in text.split(";")):
        if not item.strip():
            continue  # `-P vary=` (empty): no sweep
        key, sep, values = (x.strip() for x in item.partition("="))
        check_key(key, sep, item, lists, overrides, phases)
        texts = [v.strip() for v in values.split(",")]
        if not values or any(not t for t in texts):
            raise ConfigError(f"--vary {key}: give its values as {key}=V1,V2,... (got {item!r})")
        parsed = [parse_value(key, t) for t in texts]
        if len(set(map(repr, parsed))) != len(parsed):
            raise ConfigError(f"--vary {key}: a value is given twice ({values})")
        lists[key] = parsed
    return [dict(zip(lists, combo, strict=True)) for combo in itertools.product(*lists.values())]


def check_key(key: str, sep: str, item: str, lists: dict, overrides: dict, phases: list[int]):
    if not sep or not key:
        raise ConfigError(f"--vary must look like KEY=V1,V2,... (got {item!r})")
    if key not in config.FIELDS or key in config.SELECTORS:
        raise ConfigError(
            f"--vary {key}: not a training setting (every option of `seqgen train --help` but "
            f"{', '.join(config.SELECTORS)} can be varied)"
        )
    if key in NOT_VARIED:
        raise ConfigError(f"--vary {key}: {NOT_VARIED[key]}")
    if key in lists:
        raise ConfigError(f"--vary {key} is given twice: list all its values in one")
    if key in overrides:
        raise ConfigError(f"--{key} and --vary {key} both set it: keep one")
    if key in SHAPE_KEYS and phases[0] > 1:
        raise ConfigError(
            f"--vary {key} changes the model's shape, which a continued phase keeps: sweep it "
            f"from phase 1 (got --phases {phases[0]}-{phases[-1]})"
        )


def parse_value(key: str, text: str) -> Any:
    """One value as its setting's type (checked by config.coerce): 24, 0.3, true, linear."""
    kind, optional = config._field_kind(key)
    if optional and text.lower() == "none":
        return None
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            value: Any = text.lower() == "true"
        else:
            value = kind(text)
    except ValueError:
        raise ConfigError(f"--vary {key}: {text!r} is not a {kind.__name__}") from None
    return config.coerce(key, value)
