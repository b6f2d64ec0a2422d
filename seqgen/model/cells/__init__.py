"""Recurrent cells by name. A cell is one nn.Module in one file of this folder, registered with
@cell("name") and chosen with --cell name; the generator (seqgen/model/generator.py) runs any cell
step by step on plain autograd, and the stack of a study derives from it (seqgen/model/stacked.py).

A new cell is a new file here: every module of this folder is imported (registered) on first use.
A cell class is built as Cell(input_size, hidden_size, num_layers) and has:
- `state_size`: how many (num_layers, B, hidden_size) tensors its state holds (the LSTM's h and c:
  2). The parameter encoder sets all of them from the simulation parameters.
- `forward(x (B, input_size), state, keep)` -> (top layer's output (B, hidden_size), new state):
  one step. keep (num_layers - 1, B, hidden_size) or None: dropout keep-masks, already scaled,
  for the inputs of layers 1 and up.
- optionally `unroll(inputs, state, head) -> (T, B, K) or None`: a faster whole-sequence path
  (the LSTM's C++ and Triton recurrences); None where it does not apply, and the plain loop runs.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from seqgen.errors import ConfigError

CELLS: dict[str, type[nn.Module]] = {}


def cell(name: str):
    """Class decorator: register a cell under `name` (the value of --cell)."""

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        CELLS[name] = cls
        return cls

    return register


def check_cell(name: str, option: str = "--cell") -> None:
    if name not in CELLS:
        raise ConfigError(f"{option} {name!r}: unknown cell (known: {', '.join(sorted(CELLS))})")


def make_cell(name: str, input_size: int, hidden_size: int, num_layers: int) -> nn.Module:
    check_cell(name)
    return CELLS[name](input_size, hidden_size, num_layers)


def _register_every_cell() -> None:
    """Import every module of this folder: a new cell is its file, nothing else to edit. A file
    that vanishes while this runs (a test's) is skipped."""
    for module in pkgutil.iter_modules(__path__):
        try:
            importlib.import_module(f"{__name__}.{module.name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{module.name}":
                raise


_register_every_cell()
