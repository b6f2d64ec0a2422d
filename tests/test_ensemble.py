"""Seed ensembles (#28): two seeds of a smoke phase on the edge split registered as one pyfunc
that answers the mean and std over members, its lineage, its evaluation (measures on the mean,
the spread's calibration) on its LoggedModel, and members that do not fit refused in one line."""

import dataclasses
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import use_store

from seqgen.cli import main
from seqgen.config import ConfigError
from seqgen.model.ensemble import check_members
from seqgen.model.generate import generate_original
from seqgen.runs import tracking


@pytest.fixture(scope="module")
def ensembled(tmp_path_factory, smoke_data, migrated_db):
    """mae phase 1, seeds 0 and 1, edge split; then `seqgen ensemble` on them."""
    from seqgen.study.chain import run_pipeline

    folder = tmp_path_factory.mktemp("ensemble-store")
    with pytest.MonkeyPatch.context() as mp:
        use_store(folder, migrated_db, mp)
        results = run_pipeline(
            "mae", [1], [0, 1], "smoke", {"data_dir": str(smoke_data), "split": "edge"}
        )
        args = ["ensemble", "--strategy", "mae", "--phase", "1", "--seeds", "0,1"]
        result = CliRunner().invoke(main, [*args, "--preset", "smoke", "--split", "edge"])
        assert result.exit_code == 0, result.output
        yield results, json.loads(result.stdout), folder


@pytest.mark.slow
def test_the_ensemble_answers_mean_and_std_over_its_pinned_members(ensembled):
    results, out, _ = ensembled
    client = mlflow.MlflowClient()
    members = [r.model_uri for r in results]
    assert out["members"] == [tracking.exact_model_uri(u) for u in members]
    version = client.get_model_version_by_alias("seqgen-mae+split=edge-smoke-ensemble", "phase-1")
    assert out["model_uri"] == f"models:/seqgen-mae+split=edge-smoke-ensemble/{version.version}"
    assert json.loads(version.tags["members"]) == out["members"]  # lineage: exact versions
    model = mlflow.pyfunc.load_model("models:/seqgen-mae+split=edge-smoke-ensemble@phase-1")
    bundles = [tracking.load_bundle(u) for u in out["members"]]
    names = list(bundles[0].data.param_names)
    params = np.array([[0.05, 1.0], [0.01, 0.5]], dtype=np.float32)
    answer = model.predict(pd.DataFrame(params, columns=names))
    seqs = np.stack([generate_original(b.build_model(), b, params) for b in bundles])
    t = bundles[0].data.seq_len
    assert len(answer) == 2 * t
    for k, c in enumerate(bundles[0].data.component_names):
        got_mean = answer[f"{c}_mean"].to_numpy().reshape(2, t)
        got_std = answer[f"{c}_std"].to_numpy().reshape(2, t)
        np.testing.assert_allclose(got_mean, seqs[..., k].mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_std, seqs[..., k].std(axis=0, ddof=1), rtol=1e-5, atol=1e-6)
    assert "outside_training_range" in answer


@pytest.mark.slow
def test_the_ensemble_evaluation_calibrates_the_spread_on_its_logged_model(ensembled):
    _, out, _ = ensembled
    ev = out["evaluation"]
    m = ev["metrics"]
    for key in ("test_mae", "test_valid_horizon", "test_spread_error_corr", "test_spread"):
        assert key in m, key
    assert 0 <= m["test_coverage_1sd"] <= m["test_coverage_2sd"] <= 1
    run = mlflow.MlflowClient().get_run(ev["run_id"])
    assert run.data.tags["ensemble"] == out["model_uri"]
    assert run.data.tags["split_kind"] == "edge"
    model_id = tracking.logged_model_id(out["model_uri"])
    on = {x.key: x.value for x in mlflow.get_logged_model(model_id).metrics}
    assert on["test_coverage_1sd"] == pytest.approx(m["test_coverage_1sd"])


@pytest.mark.slow
def test_members_that_do_not_fit_are_named_in_one_line(ensembled):
    _, out, folder = ensembled
    a, b = (tracking.load_bundle(u) for u in out["members"])
    wider = dataclasses.replace(b, model_config=dataclasses.replace(b.model_config, hidden_size=7))
    with pytest.raises(ConfigError, match=r"^ensemble members differ in shape: A and B$"):
        check_members({"A": a, "B": wider})
    other = dataclasses.replace(b, data=dataclasses.replace(b.data, fingerprint="elsewhere"))
    with pytest.raises(ConfigError, match=r"^ensemble members differ in data: A and B$"):
        check_members({"A": a, "B": other})
    with pytest.raises(ConfigError, match="at least 2 members, got 1"):
        check_members({"A": a})
    args = ["ensemble", "--strategy", "mae", "--phase", "1", "--seeds", "0,7", "--preset", "smoke"]
    result = CliRunner().invoke(main, [*args, "--split", "edge"])
    assert result.exit_code != 0
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith("error: no registered model models:/seqgen-mae+split=edge-smoke@phase-1-s7")
    ), result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_mlflow_models_serve_answers_mean_and_std_columns(ensembled):
    from test_serving import predict_served, served

    _, out, folder = ensembled
    uri = "models:/seqgen-mae+split=edge-smoke-ensemble@phase-1"
    frame = pd.DataFrame({"nu": [0.05], "amplitude": [1.0]})
    with served(uri, mlflow.get_tracking_uri(), folder) as url:
        answer = predict_served(url, frame)
    local = mlflow.pyfunc.load_model(uri).predict(frame)
    assert list(answer.columns) == list(local.columns)
    assert {"pc1_mean", "pc1_std", "pc5_mean", "pc5_std"} <= set(answer.columns)
    cols = [c for c in local.columns if c.endswith(("_mean", "_std"))]
    np.testing.assert_allclose(answer[cols].to_numpy(), local[cols].to_numpy(), rtol=1e-6)


@pytest.mark.slow
def test_the_report_draws_spread_against_error_and_gives_the_calibration(ensembled):
    from analysis.report import build_report

    _, out, folder = ensembled
    report = build_report(folder / "report", preset="smoke")
    md = report.read_text()
    assert "![" in md and "spread_error.png" in md
    assert (report.parent / "spread_error.png").stat().st_size > 0
    section = md.split("## Outside the training range")[1].split("\n## ")[0]
    m = out["evaluation"]["metrics"]
    [row] = [line for line in section.splitlines() if line.startswith(f"| {out['model_uri']} |")]
    assert row.startswith(f"| {out['model_uri']} | outside | {m['test_coverage_1sd']:.3g} | ")
