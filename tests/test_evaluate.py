"""Evaluation: the assembly of metrics against hand-computed values, then a real evaluation run of
a smoke model in a temporary sqlite store with the baselines beside it (found again, not refitted),
`seqgen baselines`, and every bad input's message."""

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import REPO, SMOKE_SAMPLES, subprocess_env, use_store

from seqgen.cli import main
from seqgen.data.sequences import load_sequences
from seqgen.data.split import Split, make_split
from seqgen.data.synth import PCABasis
from seqgen.errors import DataError
from seqgen.evaluation import measures
from seqgen.evaluation.baselines import baseline_version
from seqgen.evaluation.evaluate import (
    EvalSet,
    beside_table,
    ensure_baselines,
    evaluate_model,
    measure,
    metric_name,
    sweep_params,
)
from seqgen.model.bundle import Bundle
from seqgen.runs.tracking import TrackingError

# ---- measure() on inputs small enough to work out by hand -------------------------------------

RAMP = np.array([1.0, 2.0, 3.0, 4.0])  # sum of squares 30
TRUE = np.stack([RAMP, 2 * RAMP])[:, :, None]  # (2, 4, 1)
PRED = TRUE + 1.0  # a constant offset: error 1 everywhere, shape of the sequence unchanged
PRED_TF = TRUE + 0.25


def _measure(pca=None, burgers=False):
    return measure(
        PRED,
        TRUE,
        PRED_TF,
        ["a.csv", "b.csv"],
        np.array([[0.1], [0.2]]),
        ["nu"],
        ["PC 1"],
        np.arange(4.0),
        max_lag=2,
        pca=pca,
        burgers=burgers,
    )


def test_measure_by_hand():
    m = _measure()
    s = m.summary
    assert s["mae"] == pytest.approx(1.0) and s["rmse"] == pytest.approx(1.0)
    assert s["mae_pc_1"] == pytest.approx(1.0) and s["rmse_pc_1"] == pytest.approx(1.0)
    # an offset changes neither the autocorrelation nor the mean-removed spectrum
    assert s["acf_error"] == pytest.approx(0.0, abs=1e-12)
    assert s["acf_error_pooled"] == pytest.approx(0.0, abs=1e-12)
    assert s["spectral_error"] == pytest.approx(0.0, abs=1e-12)
    assert s["mae_teacher_forced"] == pytest.approx(0.25)
    assert s["tf_gap"] == pytest.approx(0.75)  # free-running 1.0 minus teacher-forced 0.25
    assert "field_rel_l2" not in s  # no PCA basis, no field error
    assert list(m.per_sample.columns) == [
        "file",
        "nu",
        "mae",
        "rmse",
        "acf_error",
        "spectral_error",
        "mae_teacher_forced",
        "valid_horizon",
    ]
    # the error 1 is 1 / 2.165 of the data's spread (the std of 1, 2, 3, 4, 2, 4, 6, 8), over
    # the threshold 0.1 from the first step on; four windows of one step, each with MAE 1
    np.testing.assert_allclose(m.per_sample["valid_horizon"], [0.0, 0.0])
    assert s["valid_horizon"] == 0.0 and s["valid_horizon_p90"] == 0.0
    assert [s[f"window_{i}_mae"] for i in range(1, 5)] == pytest.approx([1.0] * 4)
    assert s["error_growth"] == pytest.approx(1.0)
    assert m.per_sample["file"].tolist() == ["a.csv", "b.csv"]
    np.testing.assert_allclose(m.per_sample["mae"], [1.0, 1.0])
    np.testing.assert_allclose(m.per_sample["nu"], [0.1, 0.2], rtol=1e-6)
    np.testing.assert_allclose(m.by_step["mae"], [1.0] * 4)
    np.testing.assert_allclose(m.by_step["mae_pc_1"], [1.0] * 4)
    assert m.by_step["step"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_measure_without_teacher_forcing_leaves_its_entries_out():
    m = measure(
        PRED,
        TRUE,
        None,
        ["a.csv", "b.csv"],
        np.zeros((2, 1)),
        ["nu"],
        ["PC 1"],
        np.arange(4.0),
        max_lag=2,
    )
    assert m.summary["mae"] == pytest.approx(1.0)
    assert "mae_teacher_forced" not in m.summary and "tf_gap" not in m.summary
    assert "mae_teacher_forced" not in m.per_sample


def test_split_fingerprint_tells_splits_apart():
    files = [f"s{i:02d}.csv" for i in range(20)]
    a = make_split(files, seed=0)
    assert len(a.fingerprint) == 16
    assert make_split(list(reversed(files)), seed=0).fingerprint == a.fingerprint
    assert Split.from_dict(a.to_dict()).fingerprint == a.fingerprint  # survives the model file
    assert make_split(files, seed=1).fingerprint != a.fingerprint
    moved = Split(a.train[1:], a.val + a.train[:1], a.test, a.seed)  # same files, one moved
    assert moved.fingerprint != a.fingerprint
    assert make_split(files[:19], seed=0).fingerprint != a.fingerprint  # --max_samples


def test_measure_field_error_through_the_basis():
    # basis [[1, 0]], mean 0: field = (c, 0); the offset error is 1 at each of 4 times
    pca = PCABasis(
        np.array([[1.0, 0.0]]), np.zeros(2), np.ones(1), np.ones(1), np.arange(2.0), np.arange(4.0)
    )
    m = _measure(pca)
    # sequence 1: ||diff|| = sqrt(4) = 2, ||true|| = sqrt(30); sequence 2: 2 / sqrt(120)
    np.testing.assert_allclose(m.per_sample["field_rel_l2"], [2 / np.sqrt(30), 2 / np.sqrt(120)])
    assert m.summary["field_rel_l2"] == pytest.approx((2 / np.sqrt(30) + 2 / np.sqrt(120)) / 2)


PCA_1 = PCABasis(
    np.array([[1.0, 0.0]]), np.zeros(2), np.ones(1), np.ones(1), np.arange(2.0), np.arange(4.0)
)


def test_the_registry_names_what_measure_computes():
    # every measure of the registry but an ensemble's is computed, and nothing else but the
    # per-component values, a distribution's quantiles, the windows and the true data's references
    components = {"mae_pc_1", "rmse_pc_1"}
    components |= {f"{k}_p{q}" for k in measures.DISTRIBUTIONS for q in measures.QUANTILES}
    components |= {f"window_{i}_mae" for i in range(1, 5)}
    components |= {f"true_{m.key}" for m in measures.select(reference=True)}
    model = _measure(PCA_1, burgers=True)
    assert set(model.summary) == {m.key for m in measures.select(ensemble=False)} | components
    per_sample = set(model.per_sample.columns) - {"file", "nu"}
    assert per_sample == {m.key for m in measures.select(per_sample=True, ensemble=False)}
    # a baseline (no teacher forcing) gets exactly the measures the registry gives baselines
    baseline = measure(
        PRED, TRUE, None, ["a.csv", "b.csv"], np.zeros((2, 1)), ["nu"], ["PC 1"],
        np.arange(4.0), max_lag=2, pca=PCA_1, burgers=True,
    )  # fmt: skip
    assert set(baseline.summary) == {m.key for m in measures.select(baselines=True)} | components
    per_sample = set(baseline.per_sample.columns) - {"file", "nu"}
    assert per_sample == {m.key for m in measures.select(per_sample=True, baselines=True)}


def test_the_registry_per_epoch_names_are_what_training_logs():
    from seqgen.training.epochs import PER_EPOCH_METRICS

    assert tuple(m.key for m in measures.PER_EPOCH) == PER_EPOCH_METRICS
    assert set(measures.DRAWN) < set(PER_EPOCH_METRICS)
    # the per-run values at the best epoch are read from the histories the analysis pulls
    assert {c.at_best for c in measures.RUN_COLUMNS if c.at_best} <= set(measures.DRAWN)
    assert {f"{split}_{term}" for split in ("train", "val") for term in measures.LOSS_TERMS} <= set(
        measures.DRAWN
    )
    with pytest.raises(ValueError, match="measure x: better must be 'lower' or 'higher'"):
        measures.Measure("x", "x", "x", better="smaller")


def test_beside_table_shows_the_measures_paired_against_the_baselines():
    rows = {
        "model": {"metrics": {"test_mae": 0.5, "test_rmse": 0.75, "test_acf_error_pooled": 9.0}},
        "knn baseline": {"metrics": {"test_mae": 0.125, "test_rmse": 0.25}, "fit_seconds": 0.02},
    }
    header, model, knn = beside_table("test", rows).splitlines()
    # the columns any row has, of the measures compared with the baselines sample by sample:
    # no pooled ACF error (one number per split), no spectral error (no row has it)
    assert header.split() == ["mae", "rmse", "fit", "s"]
    assert model.split() == ["model", "0.5", "0.75"]
    assert knn.split() == ["knn", "baseline", "0.125", "0.25", "0.02"]


def test_metric_name_is_a_safe_key():
    assert metric_name("PC 1") == "pc_1"
    assert metric_name("u(x=0)") == "u_x_0"
    assert metric_name("pc1") == "pc1"


def test_sweep_params_by_hand():
    params = np.array([[0.01, 1.0], [0.1, 2.0], [1.0, 3.0]])
    s = sweep_params(params, n_points=5)  # (P, S, P)
    assert s.shape == (2, 5, 2)
    # nu spans two decades: log-spaced; amplitude does not: linear; the other at its median
    np.testing.assert_allclose(s[0, :, 0], [0.01, 10**-1.5, 0.1, 10**-0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(s[0, :, 1], [2.0] * 5)
    np.testing.assert_allclose(s[1, :, 1], [1.0, 1.5, 2.0, 2.5, 3.0])
    np.testing.assert_allclose(s[1, :, 0], [0.1] * 5, rtol=1e-6)


# ---- a real evaluation -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smoke_data, migrated_db):
    """One smoke phase of `mae` in its own store; yields (store uri, phase result, folder)."""
    from seqgen.study.chain import run_pipeline

    folder = tmp_path_factory.mktemp("eval-store")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_store(folder, migrated_db, mp)
        [result] = run_pipeline("mae", [1], [0], "smoke", {"data_dir": str(smoke_data)})
        yield uri, result, folder


@pytest.fixture
def in_store(trained, monkeypatch):
    uri, result, folder = trained
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return result


@pytest.mark.slow
def test_evaluation_run_records_model_metrics_and_tables(in_store):
    summary = evaluate_model("models:/seqgen-mae-smoke@phase-1")
    n_test = SMOKE_SAMPLES - 32 - 4  # 80/10/10 fallback split of 40 samples
    assert summary["n_samples"] == n_test
    client = mlflow.MlflowClient()
    run = client.get_run(summary["run_id"])
    phase_run = client.get_run(in_store.run_id)
    assert run.info.experiment_id == phase_run.info.experiment_id  # beside the evaluated run
    tags = run.data.tags
    assert tags["mlflow.runName"] == "eval-mae-p1-s0"
    assert {
        k: tags[k]
        for k in (
            "kind",
            "strategy",
            "phase",
            "seed",
            "preset",
            "split",
            "model_name",
            "model_version",
            "evaluated_run_id",
        )
    } == {
        "kind": "evaluation",
        "strategy": "mae",
        "phase": "1",
        "seed": "0",
        "preset": "smoke",
        "split": "test",
        "model_name": "seqgen-mae-smoke",
        "model_version": "1",
        "evaluated_run_id": in_store.run_id,
    }
    m = run.data.metrics
    for key in (
        "test_mae",
        "test_rmse",
        "test_mae_pc1",
        "test_rmse_pc5",
        "test_acf_error",
        "test_acf_error_pooled",
        "test_spectral_error",
        "test_field_rel_l2",
        "test_mae_teacher_forced",
        "test_tf_gap",
    ):
        assert np.isfinite(m[key]), key
    assert m["test_tf_gap"] == pytest.approx(m["test_mae"] - m["test_mae_teacher_forced"])
    [point] = client.get_metric_history(run.info.run_id, "test_mae")
    assert point.step == 0  # one value: `mlflow ui` draws it as a bar (#17)
    assert tags["epoch"] == str(summary["epoch"])  # the global epoch of the evaluated weights

    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_sample.csv", "error_by_step.csv", "generated.npz", "summary.json"} <= files
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="per_sample.csv"
    )
    table = pd.read_csv(local)
    assert len(table) == n_test
    assert list(table.columns[:3]) == ["file", "nu", "amplitude"]
    assert table["mae"].mean() == pytest.approx(m["test_mae"])
    assert table["field_rel_l2"].mean() == pytest.approx(m["test_field_rel_l2"])


@pytest.mark.slow
def test_pth_and_runs_uris_give_the_same_numbers(in_store):
    by_registry = evaluate_model("models:/seqgen-mae-smoke/1")["metrics"]
    pth = f"{in_store.output_dir}/best_model.pth"
    by_file = evaluate_model(pth)
    by_run = evaluate_model(f"runs:/{in_store.run_id}/best_model.pth")
    assert by_file["metrics"] == pytest.approx(by_registry)
    assert by_run["metrics"] == pytest.approx(by_registry)
    tags = mlflow.MlflowClient().get_run(by_run["run_id"]).data.tags
    assert tags["evaluated_run_id"] == in_store.run_id
    assert "model_name" not in mlflow.MlflowClient().get_run(by_file["run_id"]).data.tags


@pytest.mark.slow
def test_missing_model_is_a_clear_error(in_store):
    with pytest.raises(TrackingError, match=r"no model at models:/seqgen-nope/1 \("):
        evaluate_model("models:/seqgen-nope/1")
    with pytest.raises(TrackingError, match="model file nowhere.pth does not exist"):
        evaluate_model("nowhere.pth")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "models:/seqgen-nope/1"], "error: no model at models:/seqgen-nope/1"),
        (
            ["--model", "models:/seqgen-mae-smoke/1", "--data", "no-such-folder"],
            "error: --data_dir no-such-folder does not exist here: pass --data_dir DIR",
        ),
        (
            ["--model", "models:/seqgen-mae-smoke/1", "--max-lag", "151"],
            "error: --max_lag must be in 1..150 for sequences of 151 steps, got 151",
        ),
    ],
)
def test_cli_bad_input(in_store, args, message):
    result = CliRunner().invoke(main, ["evaluate", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


# ---- baselines beside the model ----------------------------------------------------------------


def _download(run_id: str, name: str):
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name)


def _n_runs() -> int:
    return len(mlflow.search_runs(search_all_experiments=True, output_format="list"))


@pytest.mark.slow
def test_baselines_beside_the_model_on_the_same_samples_and_found_again(in_store, smoke_data):
    first = evaluate_model("models:/seqgen-mae-smoke@phase-1")
    before = _n_runs()
    again = evaluate_model("models:/seqgen-mae-smoke@phase-1")
    assert _n_runs() == before + 1  # the model's evaluation only: no baseline refitted
    assert list(first["baselines"]) == ["mean", "knn", "direct"]
    assert all(b["reused"] for b in again["baselines"].values())
    ids = {n: b["run_id"] for n, b in first["baselines"].items()}
    assert {n: b["run_id"] for n, b in again["baselines"].items()} == ids

    client = mlflow.MlflowClient()
    model_tags = client.get_run(first["run_id"]).data.tags
    model_files = pd.read_csv(_download(first["run_id"], "per_sample.csv"))["file"]
    for name, run_id in ids.items():
        run = client.get_run(run_id)
        tags, m = run.data.tags, run.data.metrics
        assert (tags["kind"], tags["baseline"], run.info.run_name) == (
            "evaluation",
            name,
            f"baseline-{name}-s0",
        )
        for key in ("split", "dataset_fingerprint", "split_fingerprint", "seed", "max_lag"):
            assert tags[key] == model_tags[key], key
        assert tags["baseline_version"] == baseline_version(name)
        assert "evaluated_run_id" not in tags and "strategy" not in tags  # never a model's
        assert run.info.experiment_id == client.get_run(first["run_id"]).info.experiment_id
        assert "test_tf_gap" not in m and "test_mae_teacher_forced" not in m
        assert set(measures.FIT_METRICS) <= set(m) and m["predict_seconds"] > 0
        table = pd.read_csv(_download(run_id, "per_sample.csv"))
        assert table["file"].tolist() == model_files.tolist()  # the same samples, in order
        assert table["mae"].mean() == pytest.approx(m["test_mae"])
        assert again["baselines"][name]["metrics"] == pytest.approx(
            {k: v for k, v in m.items() if k.startswith("test_")}
        )
    assert client.get_run(ids["knn"]).data.params["k"] in {"1", "2", "4", "8", "16", "32"}
    # the direct network trains for epochs, the mean is one average: their times say so
    fit = {n: client.get_run(r).data.metrics["fit_seconds"] for n, r in ids.items()}
    assert fit["direct"] > 100 * fit["mean"] > 0

    # the mean baseline predicts the per-step mean of the model's own training split
    bundle = Bundle.load(f"{in_store.output_dir}/best_model.pth")
    data = load_sequences(smoke_data)
    train_mean = data.components[bundle.split.indices(data.files, "train")].mean(axis=0)
    with np.load(_download(ids["mean"], "generated.npz")) as z:
        np.testing.assert_allclose(
            z["pred"], np.broadcast_to(train_mean, z["pred"].shape), rtol=1e-5
        )
        assert z["sweep_pred"].shape == (2, 5, 151, 5)  # drawn in the sweep figures


@pytest.mark.slow
def test_evaluate_without_baselines(in_store):
    before = _n_runs()
    summary = evaluate_model("models:/seqgen-mae-smoke/1", baselines=False)
    assert summary["baselines"] == {} and _n_runs() == before + 1


@pytest.mark.slow
def test_baselines_command_finds_the_models_split_and_refits_on_request(in_store, smoke_data):
    model = evaluate_model("models:/seqgen-mae-smoke/1")
    ids = {n: b["run_id"] for n, b in model["baselines"].items()}
    runner = CliRunner()
    by_data = runner.invoke(main, ["baselines", "--data_dir", str(smoke_data), "--seed", "0"])
    assert by_data.exit_code == 0, by_data.output
    found = json.loads(by_data.stdout)
    # the split a seed-0 phase makes of the same folder: the same runs, not a refit
    assert {n: b["run_id"] for n, b in found.items()} == ids
    assert all(b["reused"] for b in found.values())
    assert "knn baseline" in by_data.stderr and "test_mae" not in by_data.stderr
    by_model = runner.invoke(main, ["baselines", "--model", "models:/seqgen-mae-smoke/1"])
    assert {n: b["run_id"] for n, b in json.loads(by_model.stdout).items()} == ids

    started = time.perf_counter()
    refit = runner.invoke(main, ["baselines", "--data_dir", str(smoke_data), "--refit"])
    wall = time.perf_counter() - started
    assert refit.exit_code == 0, refit.output
    fresh = json.loads(refit.stdout)
    assert not any(b["reused"] for b in fresh.values())
    # each fit's time is a real duration: the fits happen one after another inside the command
    fits = [b["fit_seconds"] for b in fresh.values()]
    assert min(fits) > 0 and sum(fits) < wall
    # progress through the seqgen logger, on stderr; stdout is the JSON alone
    assert [line for line in refit.stderr.splitlines() if line.startswith("fitting")] == [
        f"fitting the {n} baseline (32 training samples, seed 0)" for n in ("mean", "knn", "direct")
    ]
    assert not {b["run_id"] for b in fresh.values()} & set(ids.values())
    for name in ("mean", "knn"):  # deterministic fits: the same numbers again
        assert fresh[name]["metrics"] == pytest.approx(model["baselines"][name]["metrics"])

    other = runner.invoke(main, ["baselines", "--data_dir", str(smoke_data), "--seed", "1"])
    assert other.exit_code == 0, other.output
    assert not {b["run_id"] for b in json.loads(other.stdout).values()} & set(ids.values())


@pytest.mark.slow
def test_evaluate_command_prints_the_model_beside_the_baselines(in_store):
    result = CliRunner().invoke(main, ["evaluate", "--model", "models:/seqgen-mae-smoke/1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary["baselines"]) == {"mean", "knn", "direct"}
    lines = result.stderr.strip().splitlines()
    assert [line.split()[0] for line in lines[-4:]] == ["model", "mean", "knn", "direct"]
    keys = [m.key for m in measures.select(versus=True)]
    assert lines[-5].split() == [*keys, "fit", "s"]
    # the rows are the JSON's numbers (5 significant digits), model and baselines alike
    rows = {"model": summary, **summary["baselines"]}
    for line, who in zip(lines[-4:], rows, strict=True):
        shown = [float(v) for v in line.split()[1 if who == "model" else 2 :]][: len(keys)]
        logged = [rows[who]["metrics"][f"test_{k}"] for k in keys]
        assert shown == pytest.approx(logged, rel=1e-4), who


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--data_dir", "{data}", "--max_samples", "3"],  # 1 train / 1 val / 1 test
            "error: knn baseline needs at least 2 training samples to choose k, got 1",
        ),
        (["--data_dir", "{data}", "--max_samples", "2"], "error: --max_samples must be at least 3"),
        (["--seed", "1"], "error: pass --data_dir DIR (or --model URI"),
        (
            ["--model", "models:/seqgen-mae-smoke/1", "--seed", "1"],
            "error: --model brings its own split: leave out --seed, --max_samples",
        ),
        (
            ["--data_dir", "{data}", "--max_lag", "151"],
            "error: --max_lag must be in 1..150 for sequences of 151 steps, got 151",
        ),
        (["--data_dir", "no-such-folder"], "error: data folder 'no-such-folder' does not exist"),
    ],
)
def test_baselines_bad_input_is_one_line_and_logs_nothing(in_store, smoke_data, args, message):
    before = _n_runs()
    args = [a.replace("{data}", str(smoke_data)) for a in args]
    result = CliRunner().invoke(main, ["baselines", *args])
    assert result.exit_code == 2, result.output
    *progress, last = result.stderr.strip().splitlines()  # progress: "fitting the ... baseline"
    assert last.startswith(message) and "Traceback" not in result.output
    assert all(line.startswith("fitting the ") for line in progress)
    assert _n_runs() == before


@pytest.mark.slow
def test_a_split_without_validation_samples_is_refused_before_any_run(
    in_store, smoke_data, tmp_path
):
    bundle = Bundle.load(f"{in_store.output_dir}/best_model.pth")
    s = bundle.split
    no_val = dataclasses.replace(bundle, split=Split(s.train, (), s.val + s.test, s.seed))
    no_val.save(tmp_path / "no_val.pth")
    before = _n_runs()
    result = CliRunner().invoke(main, ["baselines", "--model", str(tmp_path / "no_val.pth")])
    assert result.exit_code == 2, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: knn baseline chooses k on the validation split, which is empty"
    data = load_sequences(smoke_data)
    es = EvalSet(data, no_val.split, "test", 20, None, smoke_data)
    with pytest.raises(DataError, match="direct baseline early-stops on the validation split"):
        ensure_baselines(es, 0, names=("mean", "direct"))
    assert _n_runs() == before  # mean fitted fine, but nothing was logged


# ---- the MLproject entry points ----------------------------------------------------------------


def _mlflow_run(uri: str, entry: str, *params: str, cwd: Path) -> None:
    args = [str(Path(sys.executable).with_name("mlflow")), "run", str(REPO), "-e", entry]
    args += ["--env-manager", "local", *[a for p in params for a in ("-P", p)]]
    proc = subprocess.run(
        args, capture_output=True, text=True, env=subprocess_env(uri), cwd=cwd, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_mlflow_run_baselines_is_their_parent(store, smoke_data, tmp_path):
    _mlflow_run(store, "baselines", f"data_dir={smoke_data}", "max_samples=30", cwd=tmp_path)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    [parent] = [r for r in runs if r.data.tags.get("kind") == "baselines"]
    assert parent.data.tags["mlflow.project.entryPoint"] == "baselines"
    assert parent.data.params["max_samples"] == "30"  # as `mlflow run` logged the -P value
    children = {r.data.tags["baseline"]: r for r in runs if r.data.tags.get("baseline")}
    assert set(children) == {"mean", "knn", "direct"} and len(runs) == 4
    for name, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and run.data.params["n_samples"] == "3"  # 24/3/3
        assert parent.data.tags[f"{name}_run_id"] == run.info.run_id


@pytest.mark.slow
def test_mlflow_run_evaluate_gives_the_launchers_run_to_the_model(trained, tmp_path):
    uri, result, folder = trained
    _mlflow_run(uri, "evaluate", f"model={result.model_uri}", cwd=folder)
    client = mlflow.MlflowClient(tracking_uri=uri)
    [run] = client.search_runs(
        [client.get_run(result.run_id).info.experiment_id],
        "tags.`mlflow.project.entryPoint` = 'evaluate'",
    )
    assert run.data.tags["kind"] == "evaluation" and run.data.tags["strategy"] == "mae"
    assert "baseline" not in run.data.tags and "test_mae" in run.data.metrics


def test_physics_on_the_burgers_data_and_skipped_with_one_line_elsewhere(
    smoke_data, tmp_path, said
):
    from seqgen.data.split import make_split
    from seqgen.evaluation.evaluate import eval_set

    data = load_sequences(smoke_data)
    split = make_split(data.files, 0)
    es = eval_set(data, split, "test", 5, smoke_data)
    truth = es.measure(es.true)
    # the true fields obey the laws they are checked against: their own references are zero,
    # and a perfect surrogate has the whole sequence as its valid horizon
    for law in ("mean_violations", "energy_violations"):
        assert truth.summary[law] == 0 and truth.summary[f"true_{law}"] == 0
    assert truth.summary["valid_horizon"] == data.seq_len
    assert not [line for line in said if "skipped" in line]
    # the same CSVs without seqgen synth's settings are data of unknown physics
    other = tmp_path / "other"
    other.mkdir()
    for f in data.files:
        (other / f).write_bytes((smoke_data / f).read_bytes())
    es = eval_set(load_sequences(other), split, "test", 5, other)
    assert "energy_violations" not in es.measure(es.true).summary
    skipped = [line for line in said if "skipped" in line]
    assert len(skipped) == 1 and "not the embedded Burgers data" in skipped[0]
