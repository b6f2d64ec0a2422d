"""Evaluation: the assembly of metrics against hand-computed values, then a real evaluation run of
a smoke model in a temporary sqlite store, and every bad input's message."""

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import SMOKE_SAMPLES, use_store

from seqgen.cli import main
from seqgen.evaluate import evaluate_model, measure, metric_name, sweep_params
from seqgen.synth import PCABasis
from seqgen.tracking import TrackingError

# ---- measure() on inputs small enough to work out by hand -------------------------------------

RAMP = np.array([1.0, 2.0, 3.0, 4.0])  # sum of squares 30
TRUE = np.stack([RAMP, 2 * RAMP])[:, :, None]  # (2, 4, 1)
PRED = TRUE + 1.0  # a constant offset: error 1 everywhere, shape of the sequence unchanged
PRED_TF = TRUE + 0.25


def _measure(pca=None):
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
    ]
    assert m.per_sample["file"].tolist() == ["a.csv", "b.csv"]
    np.testing.assert_allclose(m.per_sample["mae"], [1.0, 1.0])
    np.testing.assert_allclose(m.per_sample["nu"], [0.1, 0.2], rtol=1e-6)
    np.testing.assert_allclose(m.by_step["mae"], [1.0] * 4)
    np.testing.assert_allclose(m.by_step["mae_pc_1"], [1.0] * 4)
    assert m.by_step["step"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_measure_field_error_through_the_basis():
    # basis [[1, 0]], mean 0: field = (c, 0); the offset error is 1 at each of 4 times
    pca = PCABasis(
        np.array([[1.0, 0.0]]), np.zeros(2), np.ones(1), np.ones(1), np.arange(2.0), np.arange(4.0)
    )
    m = _measure(pca)
    # sequence 1: ||diff|| = sqrt(4) = 2, ||true|| = sqrt(30); sequence 2: 2 / sqrt(120)
    np.testing.assert_allclose(m.per_sample["field_rel_l2"], [2 / np.sqrt(30), 2 / np.sqrt(120)])
    assert m.summary["field_rel_l2"] == pytest.approx((2 / np.sqrt(30) + 2 / np.sqrt(120)) / 2)


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
    from seqgen.pipeline import run_pipeline

    folder = tmp_path_factory.mktemp("eval-store")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_store(folder, migrated_db, mp)
        [result] = run_pipeline(
            "mae", [1], [0], "smoke", {"data_dir": str(smoke_data)}, log=lambda *a: None
        )
        yield uri, result, folder


@pytest.fixture
def in_store(trained, monkeypatch):
    uri, result, folder = trained
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return result


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
    assert point.step == summary["epoch"]  # the global epoch of the evaluated weights

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


def test_missing_model_is_a_clear_error(in_store):
    with pytest.raises(TrackingError, match=r"no model at models:/seqgen-nope/1 \("):
        evaluate_model("models:/seqgen-nope/1")
    with pytest.raises(TrackingError, match="model file nowhere.pth does not exist"):
        evaluate_model("nowhere.pth")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "models:/seqgen-nope/1"], "error: no model at models:/seqgen-nope/1"),
        (
            ["--model", "models:/seqgen-mae-smoke/1", "--data", "no-such-folder"],
            "error: --data no-such-folder does not exist here: pass --data_dir DIR",
        ),
        (
            ["--model", "models:/seqgen-mae-smoke/1", "--max-lag", "151"],
            "error: --max-lag must be in 1..150 for sequences of 151 steps, got 151",
        ),
    ],
)
def test_cli_bad_input(in_store, args, message):
    result = CliRunner().invoke(main, ["evaluate", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
