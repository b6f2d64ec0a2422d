"""The split outside the training range (#28): membership on a hand-made parameter grid, the
same split for every seed, the settings that ask for it, its place in a phase's identity, and
every bad input refused in one line before anything is trained or logged."""

import json
import re

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner

from seqgen.cli import main
from seqgen.config import ConfigError, resolve
from seqgen.data.split import Split, edge_band, make_edge_split, phase_split
from seqgen.evaluation import measures
from seqgen.runs import tracking
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
    # nor do the LSTM and alpha's weights (settings added with cells and named loss terms)
    assert "cell" not in plain and "terms" not in plain
    edge = identity(resolve("mae", 1, "smoke", split="edge"), start, "f")
    assert (edge["split"], edge["edge_fraction"]) == ("edge", 0.1)
    assert "cell" not in edge  # each added setting is left out on its own
    gru = identity(resolve("mae", 1, "smoke", cell="gru"), start, "f")
    assert gru["cell"] == "gru" and "split" not in gru
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


@pytest.fixture(scope="module")
def both_splits(tmp_path_factory, smoke_data, migrated_db):
    """mae phase 1 trained on each split and evaluated, in one store, and the report on them;
    yields ({split: evaluation summary}, {split: phase result}, report.md path)."""
    from conftest import use_store

    from analysis.report import build_report
    from seqgen.evaluation.evaluate import evaluate_model
    from seqgen.study.chain import run_pipeline

    folder = tmp_path_factory.mktemp("edge-store")
    with pytest.MonkeyPatch.context() as mp:
        use_store(folder, migrated_db, mp)
        logged, results = {}, {}
        for split in ("random", "edge"):
            # the edge phase is the variant mae+split=edge: its own folders and model
            where = {"data_dir": str(smoke_data), "split": split}
            (results[split],) = run_pipeline("mae", [1], [0], "smoke", where)
            logged[split] = evaluate_model(results[split].model_uri)
        report = build_report(folder / "report", preset="smoke")
        yield logged, results, report


@pytest.mark.slow
def test_the_report_sets_every_measure_inside_beside_outside(both_splits):
    import pandas as pd

    logged, _, report = both_splits
    md = report.read_text()
    both = pd.read_csv(report.parent / "outside.csv")
    # every measure of the strategy and of each baseline, inside and outside, as each was logged
    mae = both[both["name"] == "mae"].set_index("metric")
    for split, column in (("random", "inside_mean"), ("edge", "outside_mean")):
        got = logged[split]["metrics"]
        for metric, value in mae[column].items():
            assert value == pytest.approx(got[metric]), (split, metric)
        for name, b in logged[split]["baselines"].items():
            row = both[(both["name"] == name) & (both["metric"] == "test_mae")].iloc[0]
            assert row[column] == pytest.approx(b["metrics"]["test_mae"])
    assert {"test_mae", "test_valid_horizon", "test_energy_violations"} <= set(mae.index)
    assert set(both["name"]) == {"mae", "mean", "knn", "direct"}
    # the section, its table (inside → outside per cell) and a verdict in each region
    section = md.split("## Outside the training range")[1].split("\n## ")[0]
    assert "top 10% of each parameter's range" in section
    assert sum(" → " in line for line in section.splitlines() if line.startswith("| ")) == 4
    assert "Outside the training range, each strategy against the best baseline:" in section
    # the paired verdict of each measure in both regions: one row per measure paired with them
    verdict_rows = [line for line in section.splitlines() if line.startswith("| mae | ")]
    assert len(verdict_rows) == len(measures.select(versus=True))
    assert all(line.count("too few pairs") == 2 for line in verdict_rows)  # 4 edge test samples
    answer = md.split("## Answer")[1].split("\n## ")[0]
    assert "- Inside the training range: **Worth training?**" in answer
    assert "- Outside the training range: **Worth training?**" in answer
    # the inside tables are the random split's alone: one phase run per (strategy, seed) there
    assert len(pd.read_csv(report.parent / "per_run.csv")) == 1


@pytest.mark.slow
def test_evaluations_rank_the_logged_models(both_splits):
    logged, results, _ = both_splits
    client = mlflow.MlflowClient()
    ids = {}
    model_of = {"random": "seqgen-mae-smoke", "edge": "seqgen-mae+split=edge-smoke"}
    for split, r in results.items():
        name = model_of[split]
        version = client.get_model_version(name, r.version)
        # MLflow 3.17's SQL registry keeps no model_id of a version (its ModelVersion has none
        # to give): the version names its LoggedModel in `source`, and the model names the
        # version in mlflow.modelVersions, as mlflow.register_model leaves them
        assert version.model_id is None
        ids[split] = tracking.logged_model_id(f"models:/{name}/{r.version}")
        assert version.source == f"models:/{ids[split]}"
        model = client.get_logged_model(ids[split])
        assert json.loads(model.tags["mlflow.modelVersions"]) == [
            {"name": name, "version": int(r.version)}
        ]
        # the evaluation's measures are the model's, on the samples it scored
        on = {m.key: m for m in model.metrics}
        assert on["test_mae"].value == pytest.approx(logged[split]["metrics"]["test_mae"])
        assert on["test_mae"].dataset_name == "data-test"
        assert on["test_mae"].run_id == logged[split]["run_id"]
        assert {"test_valid_horizon", "test_energy_violations"} <= set(on)
    # search_logged_models (the Models tab) ranks them by a test measure
    experiment = client.get_logged_model(ids["edge"]).experiment_id
    for key, ascending in (("test_mae", True), ("test_spectral_error", False)):
        ranked = mlflow.search_logged_models(
            experiment_ids=[experiment],
            order_by=[{"field_name": f"metrics.{key}", "ascending": ascending}],
            filter_string=f"metrics.{key} >= 0",
            output_format="list",
        )
        values = {s: logged[s]["metrics"][key] for s in ids}
        expected = sorted(ids, key=lambda s: values[s], reverse=not ascending)
        assert [m.model_id for m in ranked] == [ids[s] for s in expected], values
    # and on one split's samples alone (the dataset's digest is the split's fingerprint)
    [digest] = {
        m.dataset_digest for m in client.get_logged_model(ids["edge"]).metrics if m.dataset_name
    }
    assert digest == client.get_run(logged["edge"]["run_id"]).data.tags["split_fingerprint"]
    only = mlflow.search_logged_models(
        experiment_ids=[experiment],
        filter_string="metrics.test_mae >= 0",
        datasets=[{"dataset_name": "data-test", "dataset_digest": digest}],
        output_format="list",
    )
    assert [m.model_id for m in only] == [ids["edge"]]
