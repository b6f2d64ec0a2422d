"""The split outside the training range (#28): membership on a hand-made parameter grid, the
same split for every seed, the settings that ask for it, its place in a phase's identity, and
every bad input refused in one line before anything is trained or logged."""

import re

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner

from seqgen.cli import main
from seqgen.config import ConfigError, resolve
from seqgen.data.split import Split, edge_band, make_edge_split, phase_split
from seqgen.training.start import Start, identity

# A 10 x 10 grid: a in 0..9 (linear), nu in 10^-3 .. 10^-1 (two decades: read on a log scale).
A = np.repeat(np.arange(10.0), 10)
NU = np.tile(np.logspace(-3, -1, 10), 10)
GRID = np.column_stack([A, NU])
FILES = [f"s{i:03d}.csv" for i in range(100)]


def test_the_band_is_the_top_tenth_of_each_range_on_a_hand_made_grid():
    band = edge_band(GRID, 0.1)
    # a: top tenth of [0, 9] is a >= 8.1, so a = 9; log10 nu: top tenth of [-3, -1] is >= -1.2,
    # which only the last grid value (-1) reaches (the one before is -1.22)
    expected = (A == 9) | (np.isclose(NU, 0.1))
    np.testing.assert_array_equal(band, expected)
    assert band.sum() == 19  # a row and a column of the grid, their corner once
    # a quarter: a >= 6.75 (7, 8, 9), log10 nu >= -1.5 (-1.44, -1.22, -1)
    wide = edge_band(GRID, 0.25)
    assert wide.sum() == 100 - 7 * 7


def test_training_on_the_interior_validation_and_test_outside():
    split = make_edge_split(FILES, GRID, seed=3, fraction=0.1, param_names=("a", "nu"))
    assert (split.kind, split.edge_fraction, split.seed) == ("edge", 0.1, 3)
    assert (len(split.train), len(split.val), len(split.test)) == (81, 9, 10)
    inside = {FILES[i] for i in np.flatnonzero(~edge_band(GRID, 0.1))}
    assert set(split.train) == inside
    train_idx = split.indices(FILES, "train")
    for part in ("val", "test"):  # every held-out sample lies beyond the training range
        held = GRID[split.indices(FILES, part)]
        assert (
            (held[:, 0] > GRID[train_idx, 0].max()) | (held[:, 1] > GRID[train_idx, 1].max())
        ).all()
    # the same split for every seed (only the seed it records differs), in any file order
    other = make_edge_split(FILES[::-1], GRID[::-1], seed=7, fraction=0.1)
    assert (other.train, other.val, other.test) == (split.train, split.val, split.test)
    assert other.fingerprint == split.fingerprint
    # it survives the model file, and files saved before edge splits read as random
    assert Split.from_dict(split.to_dict()) == split
    old = {k: v for k, v in split.to_dict().items() if k not in ("kind", "edge_fraction")}
    assert Split.from_dict(old).kind == "random"
    # the random split is the original's, untouched
    random = phase_split(FILES, GRID, 3)
    assert (random.kind, len(random.train), len(random.val), len(random.test)) == (
        "random", 80, 10, 10,
    )  # fmt: skip


@pytest.mark.parametrize(
    "n,fraction,message",
    [
        # a in {0, 1}: a = 1 (2 samples) and the top nu (1) are outside
        (12, 0.1, "--split edge with --edge_fraction 0.1 leaves 9 training / 1 validation / 2 "),
        (100, 0.999, "--split edge with --edge_fraction 0.999 leaves 1 training / 49 validation"),
    ],
)
def test_an_edge_split_too_small_names_the_sizes(n, fraction, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        make_edge_split(FILES[:n], GRID[:n], 0, fraction, ("a", "nu"))
    assert str(refused.value).endswith(f"samples of {n}: each part needs at least 2")
    with pytest.raises(ConfigError) as refused:
        make_edge_split(FILES, np.ones((100, 2)), 0, 0.1, ("a", "nu"))
    assert str(refused.value) == (
        "--split edge needs a parameter that varies: a, nu each hold one value over the 100 "
        "samples, so there is no range to hold an edge of"
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(split="outer"), "--split must be one of random, edge, got 'outer'"),
        (dict(split="edge", edge_fraction=0.0), "--edge_fraction must be within (0, 1), got 0.0"),
        (dict(split="edge", edge_fraction=1.0), "--edge_fraction must be within (0, 1)"),
        (dict(edge_fraction=0.2), "--edge_fraction applies to --split edge only"),
    ],
)
def test_bad_split_settings_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve("mae", 1, "smoke", **kwargs)


def test_the_split_is_part_of_a_phases_identity_and_earlier_runs_keep_theirs():
    start = Start(None, None, None, None, None, 1, "warmup_cosine")
    plain = identity(resolve("mae", 1, "smoke"), start, "f")
    # the random split is what every earlier run trained on: its key does not move
    assert "split" not in plain and "edge_fraction" not in plain
    edge = identity(resolve("mae", 1, "smoke", split="edge"), start, "f")
    assert (edge["split"], edge["edge_fraction"]) == ("edge", 0.1)
    wider = identity(resolve("mae", 1, "smoke", split="edge", edge_fraction=0.2), start, "f")
    assert len({str(sorted(d.items())) for d in (plain, edge, wider)}) == 3
    # a variant of the plan once #24 lands: it differs from the table
    assert resolve("mae", 1, "smoke", split="edge").overrides() == {"split": "edge"}


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--strategy", "mae", "--phase", "1"],
        ["pipeline", "--strategy", "mae", "--phases", "1-2"],
        ["study", "--strategy", "mae", "--seeds", "0", "--batched"],
        ["baselines", "--max_samples", "40"],
    ],
)
def test_an_edge_split_too_small_is_one_line_and_trains_nothing(store, smoke_data, command):
    args = [*command, "--split", "edge", "--edge_fraction", "0.02", "--data_dir", str(smoke_data)]
    if command[0] != "baselines":
        args += ["--preset", "smoke"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: --split edge with --edge_fraction 0\.02 leaves \d+ training / [01] validation / "
        r"\d+ test samples of 40: each part needs at least 2",
        line,
    ), result.output
    assert mlflow.search_runs(search_all_experiments=True).empty  # nothing trained or logged
