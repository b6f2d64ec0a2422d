"""Analysis: a smoke-scale store (3 strategies x phases 1-2 x seeds 0, 1, evaluations of phase 2)
compared through the CLI, then filters, bad selections, and the pure pieces on small frames."""

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import use_store
from matplotlib.figure import Figure

from analysis import plots, query, tables
from analysis.answer import baseline_verdicts, conclusions
from analysis.report import build_report
from seqgen.cli import main

STRATEGIES = ("mae", "autocorr", "combined")
FIGURES = (
    "val_loss",
    "components",
    "schedules",
    "sequences",
    "acf",
    "fields",
    "param_error",
    "sweep_nu",
    "sweep_amplitude",
    "error_by_step",
    "paired",
    "versus_baselines",
)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, smoke_data, migrated_db):
    """The store, and `seqgen compare --out report` run on it; yields (folder, CLI result)."""
    from seqgen.evaluation.evaluate import evaluate_model
    from seqgen.study.chain import run_pipeline

    folder = tmp_path_factory.mktemp("analysis-store")
    with pytest.MonkeyPatch.context() as mp:
        use_store(folder, migrated_db, mp)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "seqgen")  # a named experiment, as a team would use
        for strategy in STRATEGIES:
            results = run_pipeline(
                strategy,
                [1, 2],
                [0, 1],
                "smoke",
                {"data_dir": str(smoke_data)},
            )
            for r in results:
                if r.phase == 2:
                    evaluate_model(r.model_uri)
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name("seqgen")
        tags = {"kind": "phase", "strategy": "mae", "phase": "2", "seed": "2", "preset": "smoke"}
        failed = client.create_run(exp.experiment_id, run_name="mae-p2-s2", tags=tags)
        client.set_terminated(failed.info.run_id, "FAILED")
        client.create_run(
            exp.experiment_id,
            run_name="combined-p1-s3",
            tags=tags | {"strategy": "combined", "phase": "1", "seed": "3"},
        )
        client.create_experiment("empty")
        result = CliRunner().invoke(main, ["compare", "--out", "report"])
        yield folder, result


@pytest.fixture
def in_store(compared, monkeypatch):
    folder, _ = compared
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "seqgen")
    mlflow.set_tracking_uri(uri)
    return folder


def test_compare_writes_report_tables_and_figures(compared):
    folder, result = compared
    assert result.exit_code == 0, result.output
    assert "report: report/report.md" in result.output
    out = folder / "report"
    for name in (
        "report.md",
        "report.html",
        "summary.csv",
        "per_run.csv",
        "paired.csv",
        "per_sample.csv",
        "excluded.csv",
        "baselines.csv",
        "versus_baselines.csv",
        *(f"{f}.png" for f in FIGURES),
    ):
        assert (out / name).stat().st_size > 0, name


def test_summary_table_rows(compared):
    summary = pd.read_csv(compared[0] / "report" / "summary.csv")
    assert list(zip(summary["strategy"], summary["phase"], strict=True)) == [
        (s, p) for s in STRATEGIES for p in (1, 2)
    ]
    assert (summary["n_seeds"] == 2).all()
    assert summary["n_evaluated"].tolist() == [0, 2] * 3
    assert summary.loc[summary["phase"] == 2, "test_mae_mean"].notna().all()
    assert summary.loc[summary["phase"] == 1, "test_mae_mean"].isna().all()
    assert (summary["best_val_loss_mean"] > 0).all()
    assert len(pd.read_csv(compared[0] / "report" / "per_run.csv")) == 12


def test_paired_comparison_on_the_same_samples(compared):
    paired = pd.read_csv(compared[0] / "report" / "paired.csv")
    assert len(paired) == 3 * 4  # 3 pairs x (mae, acf_error, spectral_error, field_rel_l2)
    assert set(paired["metric"]) == {"mae", "acf_error", "spectral_error", "field_rel_l2"}
    assert (paired["n"] == 2 * 4).all()  # 2 seeds x 4 test samples, paired by (seed, file)
    assert (paired["ci_low"] <= paired["ci_high"]).all()
    assert not paired["real"].any()  # 8 pairs is below MIN_PAIRS: never called real


def test_strategies_beside_the_baselines_on_the_same_samples(compared):
    out = compared[0] / "report"
    beside = pd.read_csv(out / "baselines.csv")
    assert beside["name"].tolist() == [*STRATEGIES, "mean", "knn", "direct"]
    assert beside["kind"].tolist() == ["strategy"] * 3 + ["baseline"] * 3
    assert (beside["n"] == 2).all()  # each baseline fitted once per seed's split
    assert beside["test_mae_mean"].notna().all() and (beside["seconds_mean"] > 0).all()
    assert beside["test_mae_pc1_mean"].notna().all()  # per component, for strategies and baselines
    vs = pd.read_csv(out / "versus_baselines.csv")
    assert len(vs) == 3 * 5  # 3 strategies x (mae, rmse, acf_error, spectral_error, field_rel_l2)
    assert (vs["n"] == 2 * 4).all()  # the same (seed, test file) pairs as between strategies
    assert not vs["real"].any()  # 8 pairs is below MIN_PAIRS
    np.testing.assert_allclose(vs["strategy_mean"] - vs["baseline_mean"], vs["mean_diff"])
    means = beside.set_index("name")
    for r in vs.itertuples():  # the best baseline of each measure: the lowest over seeds
        column = f"test_{r.metric}_mean"
        assert means.loc[r.baseline, column] == means.loc[["mean", "knn", "direct"], column].min()
    md = (out / "report.md").read_text()
    assert "## Is it worth training? Against the baselines" in md
    assert "- **Worth training?** " in md.split("## Is it worth training?")[0]  # in the answer
    for strategy in STRATEGIES:
        assert f"- **{strategy}** (phase 2) beats the best baseline on" in md
    assert "| knn baseline | 2 |" in md and "fit " in md and "versus_baselines.png" in md


def test_report_states_setup_answer_and_left_out_runs(compared):
    md = (compared[0] / "report" / "report.md").read_text()
    for text in (
        "## Answer",
        "**pointwise accuracy (MAE)**",
        "preset smoke",
        "seeds 0, 1",
        "phases 1, 2",
        "seqgen 0.1.0",
        "fingerprint",
        "12 phase runs",
        "6 test evaluations",
        "![",
        "val_loss.png",
        "Caution: 2 seed(s)",
    ):
        assert text in md, text
    assert "mae-p2-s2 | phase | FAILED" in md
    assert "combined-p1-s3 | phase | RUNNING" in md
    excluded = pd.read_csv(compared[0] / "report" / "excluded.csv")
    assert sorted(excluded["run_name"]) == ["combined-p1-s3", "mae-p2-s2"]
    html = (compared[0] / "report" / "report.html").read_text()
    assert '<img src="val_loss.png"' in html and "<table" in html


def test_analysis_run_holds_the_report(in_store):
    [run] = mlflow.search_runs(
        experiment_names=["seqgen"], filter_string="tags.kind = 'analysis'", output_format="list"
    )
    assert run.info.run_name == "compare"
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"report.md", "report.html", "summary.csv", "val_loss.png"} <= files
    assert run.data.tags["baseline_runs"] == "6"  # 3 baselines x 2 seeds' splits


def test_filters_and_a_report_without_evaluations(in_store):
    sel = query.select_runs(
        strategies=("mae",), phases=(2,), seeds=(1,), tags=("stop_reason=completed",)
    )
    assert sel.phases["run_name"].tolist() == ["mae-p2-s1"]
    assert sel.evaluations["run_name"].tolist() == ["eval-mae-p2-s1"]
    assert sel.excluded.empty  # the failed mae-p2-s2 has seed 2: filtered out, not listed
    path = build_report(
        in_store / "filtered", strategies=("mae", "combined"), phases=(1,), seeds=(0,)
    )
    summary = pd.read_csv(path.parent / "summary.csv")
    assert list(zip(summary["strategy"], summary["phase"], strict=True)) == [
        ("mae", 1),
        ("combined", 1),
    ]
    assert "No evaluation runs" in path.read_text()
    assert {p.name for p in path.parent.glob("*.png")} == {
        "val_loss.png",
        "components.png",
        "schedules.png",
    }


def test_one_strategy_evaluated_and_reports_replace_only_reports(in_store):
    path = build_report(in_store / "one", strategies=("mae",))
    assert "mae" in path.read_text()
    assert pd.read_csv(path.parent / "paired.csv").empty  # nothing to pair with
    (path.parent / "stale.png").write_text("from an older report")
    build_report(in_store / "one", strategies=("mae",))  # a previous report is replaced whole
    assert not (path.parent / "stale.png").exists()
    (in_store / "mine").mkdir()
    (in_store / "mine" / "notes.txt").write_text("not a report")
    with pytest.raises(ValueError, match="holds other files"):
        build_report(in_store / "mine")
    assert (in_store / "mine" / "notes.txt").read_text() == "not a report"
    assert not list(in_store.glob(".mine.tmp-*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experiment", "nope"], "error: experiment 'nope' does not exist in sqlite:///"),
        (["--experiment", "empty"], "error: experiment 'empty' has no runs"),
        (
            ["--strategy", "mae", "--phase", "4"],
            "error: no phase runs in experiment 'seqgen' match strategy=mae, phase=4; the "
            "experiment has strategy autocorr, combined, mae; phase 1, 2; seed 0, 1, 2, 3",
        ),
        (["--tag", "owner=me"], "error: no phase runs in experiment 'seqgen' match owner=me"),
        (["--tag", "owner"], "error: --tag must look like KEY=VALUE, got 'owner'"),
    ],
)
def test_bad_selection_is_one_clear_line(in_store, args, message):
    result = CliRunner().invoke(main, ["compare", *args, "--out", "bad"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


# ---- pure pieces on small frames ---------------------------------------------------------------


def _per_sample(shift: dict[str, float], seeds=(0, 1), n=10, seed_sign=None) -> pd.DataFrame:
    """Per-sample errors: base + shift[strategy] (times seed_sign[seed] if given)."""
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 2, (len(seeds), n))
    rows = []
    for strategy, d in shift.items():
        for i, seed in enumerate(seeds):
            sign = 1 if seed_sign is None else seed_sign[seed]
            for j in range(n):
                rows.append(
                    {
                        "strategy": strategy,
                        "seed": seed,
                        "file": f"f{j}",
                        "mae": base[i, j] + sign * d + 0.001 * rng.standard_normal(),
                    }
                )
    return pd.DataFrame(rows)


def test_paired_verdicts():
    clear = tables.paired_comparison(_per_sample({"mae": 0.5, "combined": 0.0}))
    [row] = clear.to_dict("records")
    assert (row["a"], row["b"], row["n"], row["n_seeds"]) == ("mae", "combined", 20, 2)
    assert row["mean_diff"] == pytest.approx(0.5, abs=0.01) and row["real"]
    # seeds disagree on the sign: the pooled CI may exclude 0, but it is not called real
    mixed = tables.paired_comparison(
        _per_sample({"mae": 0.5, "combined": 0.0}, seed_sign={0: 1, 1: -0.5})
    )
    assert not mixed["seeds_agree"].iloc[0] and not mixed["real"].iloc[0]
    few = tables.paired_comparison(_per_sample({"mae": 0.5, "combined": 0.0}, n=4))
    assert few["n"].iloc[0] == 8 and not few["real"].iloc[0]


def test_conclusions_name_the_winner_and_the_difference():
    per_sample = _per_sample({"mae": 0.3, "autocorr": 0.31, "combined": 0.0})
    paired = tables.paired_comparison(per_sample)
    chosen = pd.DataFrame(
        {
            "strategy": list(STRATEGIES) * 2,
            "phase": 5,
            "seed": [0] * 3 + [1] * 3,
            "test_tf_gap": [0.1, 0.2, 0.05] * 2,
        }
    )
    per_run = chosen.assign(phase_seconds=60.0)
    text = conclusions(per_sample, paired, chosen, per_run)
    assert text[0].startswith("**pointwise accuracy (MAE)**: **combined** is lowest (")
    assert "over 2 seed(s), phase 5); lower than mae's by 0.3" in text[0]
    assert "a real difference" in text[0]
    assert "**Overall**: use **combined**" in text[1]
    assert "autocorr leans on it most" in text[2]
    assert text[-1].startswith("Caution: 2 seed(s)")


def test_plot_functions_return_labelled_figures():
    curves = pd.DataFrame(
        {
            "strategy": ["mae"] * 4 + ["combined"] * 4,
            "seed": [0, 0, 1, 1] * 2,
            "key": "val_loss",
            "step": [1, 2] * 4,
            "value": [1.0, 0.5, 1.2, 0.6, 0.9, 0.4, 1.0, 0.5],
        }
    )
    fig = plots.val_loss_figure(curves, [1.5])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() and "2 seeds" in ax.get_title()
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {
        "mae",
        "combined",
        "phase boundary",
    }
    true = np.zeros((2, 5, 3))
    figs = [
        plots.sequences_figure(
            true, {"mae": true + 1}, np.arange(5), ["a", "b", "c"], ["s0", "s1"]
        ),
        plots.acf_figure(np.arange(1, 3), np.ones((2, 3)), {"mae": np.ones((2, 3))}, list("abc")),
        plots.fields_figure(
            np.zeros((1, 5, 4)), {"mae": np.ones((1, 5, 4))}, np.arange(4.0), np.arange(5.0), ["s0"]
        ),
        plots.sweep_figure(
            np.array([0.01, 1.0]), {"mae": np.zeros((2, 5, 3))}, np.arange(5), list("abc"), "nu"
        ),
        plots.param_error_figure(
            pd.DataFrame(
                {"strategy": "mae", "nu": [0.01, 1.0], "amp": [1.0, 2.0], "mae": [0.1, 0.2]}
            ),
            ["nu", "amp"],
        ),
    ]
    for f in figs:
        assert isinstance(f, Figure) and f.get_suptitle()


def test_paused_runs_are_left_out_even_when_marked_finished(in_store):
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("seqgen")
    tags = {
        "kind": "phase",
        "strategy": "mae",
        "phase": "1",
        "seed": "7",
        "preset": "smoke",
        "stop_reason": "paused",
    }
    run = client.create_run(exp.experiment_id, run_name="mae-p1-s7", tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")  # what `mlflow run` does on exit
    try:
        sel = query.select_runs(strategies=("mae",))
        assert 7 not in set(sel.phases["seed"])
        left = sel.excluded.set_index("run_name")
        assert left.loc["mae-p1-s7", "reason"] == "paused"
    finally:
        client.delete_run(run.info.run_id)


def test_one_evaluated_strategy_names_no_winner():
    per_run = pd.DataFrame(
        {"strategy": ["mae", "combined"], "seed": [0, 0], "phase_seconds": [1.0, 1.0]}
    )
    chosen = pd.DataFrame({"strategy": ["combined"], "phase": [2], "test_tf_gap": [0.1]})
    per_sample = _per_sample({"combined": 0.0}).query("strategy == 'combined'")
    lines = conclusions(per_sample, pd.DataFrame(), chosen, per_run)
    assert lines == ["Only combined has a test evaluation; evaluate mae to compare."]


def _verdict_frames(shift: dict[str, float], baselines: dict[str, float]):
    """Per-sample MAE of strategies (shift) and baselines (offsets) around one base error."""
    per_sample = _per_sample(shift | baselines, n=12)
    is_b = per_sample["strategy"].isin(list(baselines))
    return (
        per_sample[~is_b],
        per_sample[is_b].rename(columns={"strategy": "baseline"}),
    )


def test_versus_baselines_pairs_each_strategy_with_the_best_baseline():
    models, bl = _verdict_frames({"mae": 0.0, "autocorr": 0.6}, {"mean": 1.0, "knn": 0.3})
    assert tables.best_baselines(bl) == {"mae": "knn"}
    vs = tables.versus_baselines(models, bl).set_index("strategy")
    assert (vs["baseline"] == "knn").all() and (vs["n"] == 24).all()
    assert vs.loc["mae", "mean_diff"] == pytest.approx(-0.3, abs=0.01) and vs.loc["mae", "real"]
    assert vs.loc["autocorr", "mean_diff"] == pytest.approx(0.3, abs=0.01)
    assert vs.loc["mae", "rel_diff"] == pytest.approx(
        -0.3 / vs.loc["mae", "baseline_mean"], rel=0.05
    )
    beside = pd.DataFrame(
        {
            "name": ["mae", "autocorr", "knn"],
            "kind": ["strategy", "strategy", "baseline"],
            "phase": [5, 5, None],
            "seconds_mean": [600.0, 660.0, 0.2],
        }
    )
    lines = baseline_verdicts(vs.reset_index(), beside)
    assert lines[0].startswith("**Worth training?** Yes: mae beats the best baseline on every")
    assert "; autocorr does not." in lines[0]
    assert "training mae 10 min, autocorr 11 min; fitting the baselines knn 0.2 s" in lines[0]
    assert lines[1].startswith("**mae** (phase 5) beats the best baseline on every measure: MAE ")
    assert "against knn's" in lines[1] and "lower; difference -0.3" in lines[1]
    assert lines[2].startswith("**autocorr** (phase 5) beats the best baseline on no measure: ")
    assert "it is worse on MAE" in lines[2] and "higher" in lines[2]
    few = tables.versus_baselines(models[models["file"].isin(["f0", "f1"])], bl)
    assert "Not as trained here" in baseline_verdicts(few, beside)[0]  # 4 pairs: nothing real
    assert "only 4 pairs" in baseline_verdicts(few, beside)[1]


def test_baselines_pair_with_evaluations_by_split_fingerprint():
    chosen = pd.DataFrame(
        {
            "strategy": ["mae", "combined", "mae"],
            "seed": [0, 0, 1],
            "split_fingerprint": ["aaa", "aaa", "bbb"],
            "max_lag": [20.0, 20.0, 20.0],
        }
    )
    baselines = pd.DataFrame(
        {
            "run_id": ["r1", "r2", "r3", "r4"],
            "baseline": ["knn", "mean", "knn", "knn"],
            "seed": [0, 0, 1, 0],
            "split_fingerprint": ["aaa", "aaa", "bbb", "ccc"],  # ccc: no evaluation's split
            "max_lag": [20.0, 20.0, 20.0, 20.0],
        }
    )
    side = tables.baselines_at_seeds(chosen, baselines)
    assert list(zip(side["baseline"], side["seed"], side["run_id"], strict=True)) == [
        ("mean", 0, "r2"),
        ("knn", 0, "r1"),
        ("knn", 1, "r3"),
    ]
    old = chosen.assign(split_fingerprint="")  # evaluated before baselines: nothing pairs
    assert tables.baselines_at_seeds(old, baselines.iloc[0:0]).empty


def test_figures_draw_the_baselines_dashed():
    true = np.zeros((1, 5, 2))
    fig = plots.sequences_figure(
        true, {"mae": true + 1}, np.arange(5), ["a", "b"], ["s0"], {"knn": true + 2}
    )
    labels = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert labels == {"true", "mae", "knn baseline"}
    [knn] = [line for line in fig.axes[0].get_lines() if line.get_label() == "knn baseline"]
    assert knn.get_linestyle() == "--" and knn.get_color() == plots.baseline_color("knn")
    by_step = pd.DataFrame({"strategy": "mae", "seed": 0, "step": [0, 1], "value": [1.0, 2.0]})
    fig = plots.error_by_step_figure(
        by_step, by_step.drop(columns="strategy").assign(baseline="direct")
    )
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {
        "mae",
        "direct baseline",
    }
    per_sample = pd.DataFrame({"strategy": "mae", "nu": [0.1, 1.0], "mae": [0.1, 0.2]})
    fig = plots.param_error_figure(
        per_sample, ["nu"], baselines=per_sample.drop(columns="strategy").assign(baseline="knn")
    )
    assert [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()] == [
        "mae",
        "knn baseline",
    ]
