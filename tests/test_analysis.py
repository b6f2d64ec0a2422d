"""Analysis: a smoke-scale store (3 strategies x phases 1-2 x seeds 0, 1, evaluations of phase 2)
compared through the CLI, its tables and figures checked against the numbers the runs logged, then
filters and bad selections (all slow: they train); then the pure pieces on small frames built to
give a known answer: figures against the data they draw, verdicts, a strategy added to the table."""

import re

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import use_store

from analysis import plots, query, report, tables
from analysis.answer import baseline_verdicts, conclusions
from analysis.report import build_report
from seqgen import config
from seqgen.cli import main
from seqgen.evaluation import measures, metrics

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


def _g(x: float) -> str:
    """A number as the report writes it (3 significant digits), formatted here on its own."""
    return f"{x:.3g}"


def _md_rows(md: str, start: str) -> list[str]:
    """The lines of report.md's tables that start with `start`."""
    return [line for line in md.splitlines() if line.startswith(start)]


def _logged(kind_filter: str) -> pd.DataFrame:
    return mlflow.search_runs(
        experiment_names=["seqgen"], filter_string=kind_filter, output_format="pandas"
    )


@pytest.mark.slow
def test_compare_writes_every_file(compared):
    folder, result = compared
    assert result.exit_code == 0, result.output
    assert result.stdout == "report: report/report.md\n"
    names = {p.name for p in (folder / "report").iterdir()}
    assert names == {
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
    }
    md = (folder / "report" / "report.md").read_text()
    assert re.findall(r"^!\[.+\]\((.+)\)$", md, re.M) == [f"{f}.png" for f in FIGURES]


@pytest.mark.slow
def test_per_run_and_summary_hold_the_logged_numbers(in_store):
    out = in_store / "report"
    per_run = pd.read_csv(out / "per_run.csv")
    assert len(per_run) == 12  # 3 strategies x 2 phases x 2 seeds
    phases = _logged("tags.kind = 'phase' and attributes.status = 'FINISHED'").set_index("run_id")
    for r in per_run.itertuples():
        logged = phases.loc[r.run_id]
        assert r.best_val_loss == pytest.approx(logged["metrics.best_val_loss"], rel=1e-12)
        assert r.phase_seconds == pytest.approx(logged["metrics.phase_seconds"], rel=1e-12)
        # the validation MAE of the best epoch, from the run's own history
        history = mlflow.MlflowClient().get_metric_history(r.run_id, "val_mae")
        best = int(logged["metrics.best_epoch"])
        assert r.val_mae_at_best == pytest.approx(
            [m.value for m in history if m.step == best][-1], rel=1e-12
        )
    evals = _logged("tags.kind = 'evaluation' and tags.split = 'test'")
    evals = evals[evals["tags.evaluated_run_id"].notna()].set_index("tags.evaluated_run_id")
    for r in per_run[per_run["phase"] == 2].itertuples():
        assert r.test_mae == pytest.approx(evals.loc[r.run_id, "metrics.test_mae"], rel=1e-12)
        assert r.test_tf_gap == pytest.approx(evals.loc[r.run_id, "metrics.test_tf_gap"], rel=1e-12)
    assert per_run.loc[per_run["phase"] == 1, "test_mae"].isna().all()  # phase 1 not evaluated

    summary = pd.read_csv(out / "summary.csv")
    assert list(zip(summary["variant"], summary["phase"], strict=True)) == [
        (s, p) for s in STRATEGIES for p in (1, 2)
    ]
    assert (summary["n_seeds"] == 2).all() and summary["n_evaluated"].tolist() == [0, 2] * 3
    grouped = per_run.groupby(["variant", "phase"])
    for r in summary.itertuples():
        g = grouped.get_group((r.variant, r.phase))
        for metric in ("best_val_loss", "val_autocorr_at_best", "phase_seconds", "test_mae"):
            mean, std = getattr(r, f"{metric}_mean"), getattr(r, f"{metric}_std")
            if r.phase == 1 and metric == "test_mae":
                assert np.isnan(mean)
                continue
            assert mean == pytest.approx(g[metric].mean(), rel=1e-12)
            assert std == pytest.approx(g[metric].std(ddof=1), rel=1e-9)

    md = (out / "report.md").read_text()
    for r in summary[summary["phase"] == 2].itertuples():
        [row] = _md_rows(md, f"| {r.variant} | 2 | 2 |")
        assert f"| {_g(r.test_mae_mean)} ± {_g(r.test_mae_std)} |" in row
        assert f"| {_g(r.best_val_loss_mean)} ± {_g(r.best_val_loss_std)} |" in row
        minutes = f"| {_g(r.phase_seconds_mean / 60)} ± {_g(r.phase_seconds_std / 60)} |"
        assert minutes in row


@pytest.mark.slow
def test_paired_comparison_is_the_bootstrap_of_the_same_samples(compared):
    out = compared[0] / "report"
    paired = pd.read_csv(out / "paired.csv")
    per_sample = pd.read_csv(out / "per_sample.csv")
    # 3 pairs x (mae, acf_error, spectral_error, field_rel_l2, valid_horizon)
    assert set(paired["metric"]) == set(measures.paired()) and len(measures.paired()) == 5
    assert len(paired) == 3 * 5
    assert (paired["n"] == 2 * 4).all()  # 2 seeds x 4 test samples, paired by (seed, file)
    assert not paired["real"].any()  # 8 pairs is below MIN_PAIRS: never called real
    md = (out / "report.md").read_text()
    for r in paired.itertuples():
        a = per_sample[per_sample["variant"] == r.a].set_index(["seed", "file"])[r.metric]
        b = per_sample[per_sample["variant"] == r.b].set_index(["seed", "file"])[r.metric]
        b = b.reindex(a.index)  # the same (seed, test file) on both sides
        boot = metrics.paired_bootstrap(a.to_numpy(), b.to_numpy())
        assert (r.mean_diff, r.ci_low, r.ci_high) == pytest.approx(
            (boot["mean_diff"], boot["ci_low"], boot["ci_high"]), rel=1e-12
        )
        by_seed = (a - b).groupby(level="seed").mean()
        assert r.seed_diffs == " ".join(f"{v:+.4g}" for v in by_seed)
        [row] = _md_rows(md, f"| {r.metric} | {r.a} - {r.b} |")
        assert f"| {_g(r.mean_diff)} | [{_g(r.ci_low)}, {_g(r.ci_high)}] | 8 |" in row
        assert row.endswith("| too few pairs |")


@pytest.mark.slow
def test_strategies_beside_the_baselines_on_the_same_samples(in_store):
    out = in_store / "report"
    beside = pd.read_csv(out / "baselines.csv")
    assert beside["name"].tolist() == [*STRATEGIES, "mean", "knn", "direct"]
    assert beside["kind"].tolist() == ["variant"] * 3 + ["baseline"] * 3
    assert (beside["n"] == 2).all()  # each baseline fitted once per seed's split
    means = beside.set_index("name")
    # strategies: their phase-2 evaluations; baselines: their own evaluation runs, per seed
    per_run = pd.read_csv(out / "per_run.csv")
    evaluations = _logged("tags.kind = 'evaluation'")
    baselines = evaluations[evaluations["tags.baseline"].notna()]
    assert len(baselines) == 6  # 3 baselines x 2 seeds' splits
    for name in STRATEGIES:
        runs = per_run[(per_run["variant"] == name) & (per_run["phase"] == 2)]
        assert means.loc[name, "test_mae_mean"] == pytest.approx(runs["test_mae"].mean())
        assert means.loc[name, "seconds_mean"] == pytest.approx(
            per_run[per_run["variant"] == name].groupby("seed")["phase_seconds"].sum().mean()
        )
    for name, runs in baselines.groupby("tags.baseline"):
        assert means.loc[name, "test_mae_mean"] == pytest.approx(runs["metrics.test_mae"].mean())
        assert means.loc[name, "test_mae_pc1_mean"] == pytest.approx(
            runs["metrics.test_mae_pc1"].mean()
        )
        assert means.loc[name, "seconds_mean"] == pytest.approx(runs["metrics.fit_seconds"].mean())

    vs = pd.read_csv(out / "versus_baselines.csv")
    per_sample = pd.read_csv(out / "per_sample.csv")
    assert len(vs) == 3 * len(measures.select(versus=True))  # 3 strategies x every such measure
    assert (vs["n"] == 2 * 4).all()  # the same (seed, test file) pairs as between strategies
    assert not vs["real"].any()  # 8 pairs is below MIN_PAIRS
    for r in vs.itertuples():
        mine = per_sample.loc[per_sample["variant"] == r.variant, r.metric]
        assert r.variant_mean == pytest.approx(mine.mean())
        column = f"test_{r.metric}_mean"
        if column not in means:  # paired, not shown beside (mean-conservation violations)
            continue
        # the best baseline of each measure: the lowest over seeds (highest where higher is better)
        over_seeds = means.loc[["mean", "knn", "direct"], column]
        higher = measures.BY_KEY[r.metric].better == measures.HIGHER
        best = over_seeds.max() if higher else over_seeds.min()
        assert means.loc[r.baseline, column] == best
        if r.metric != "rmse":  # an evaluation's RMSE is over all values, not per sequence
            assert r.baseline_mean == pytest.approx(means.loc[r.baseline, column])
        if r.baseline_mean:  # no relative difference to a count of 0
            assert r.rel_diff == pytest.approx(r.mean_diff / r.baseline_mean)

    # the verdicts say what these numbers say: nothing is real at 8 pairs
    md = (out / "report.md").read_text()
    answer, section = md.split("## Is it worth training? Against the baselines")
    assert (
        "- **Worth training?** Not as trained here: no strategy beats the best baseline" in answer
    )
    names = {m.key: m.name for m in measures.MEASURES}
    for strategy in STRATEGIES:
        [line] = [x for x in section.splitlines() if x.startswith(f"- **{strategy}** (phase 2)")]
        assert " beats the best baseline on no measure: no real difference on " in line
        rows = vs[vs["variant"] == strategy]
        for r in rows.itertuples():
            said = f"{names[r.metric]} {_g(r.variant_mean)} against {r.baseline}'s "
            assert said + f"{_g(r.baseline_mean)} (" in line
            why = ("" if r.seeds_agree else ", seeds disagree") + ", only 8 pairs)"
            assert (
                f"difference {_g(r.mean_diff)}, 95% CI [{_g(r.ci_low)}, {_g(r.ci_high)}]{why}"
                in line
            )
        assert line.count("only 8 pairs)") == len(rows)
    for r in beside[beside["kind"] == "baseline"].itertuples():
        table, components = _md_rows(section, f"| {r.name} baseline | 2 |")
        assert table.startswith(f"| {r.name} baseline | 2 | {_g(r.test_mae_mean)} ± ")
        assert table.endswith(f"| fit {_g(r.seconds_mean)} s |")
        assert components.startswith(f"| {r.name} baseline | 2 | {_g(r.test_mae_pc1_mean)} ± ")


@pytest.mark.slow
def test_report_figures_draw_the_report_tables(in_store):
    sel = query.select_runs()
    c = report.compare(sel)
    figs, note = report.figures(c)
    assert [name for name, _, _ in figs] == [f"{f}.png" for f in FIGURES] and note == ""
    fig = {name[:-4]: f for name, f, _ in figs}
    out = in_store / "report"
    for name, table in (("paired", "paired.csv"), ("versus_baselines", "versus_baselines.csv")):
        rows = pd.read_csv(out / table).rename(columns={"variant": "a", "baseline": "b"})
        for ax, (_, p) in zip(fig[name].axes, rows.groupby("metric", sort=False), strict=True):
            drawn = [_errorbar(bar) for bar in ax.containers]
            np.testing.assert_allclose(drawn, p[["mean_diff", "ci_low", "ci_high"]], err_msg=name)
    # validation loss: the mean over seeds of each strategy's logged history, phases stitched
    ax = fig["val_loss"].axes[0]
    client = mlflow.MlflowClient()
    for strategy in STRATEGIES:
        runs = sel.phases[sel.phases["variant"] == strategy]
        values = pd.DataFrame(
            [
                (r.seed, m.step, m.value)
                for r in runs.itertuples()
                for m in client.get_metric_history(r.run_id, "val_loss")
            ],
            columns=["seed", "step", "value"],
        )
        mean = values.groupby("step")["value"].mean()
        line = _line(ax, strategy)
        np.testing.assert_array_equal(line.get_xdata(), mean.index)
        np.testing.assert_allclose(line.get_ydata(), mean.to_numpy())
    # error growth: each strategy's and baseline's error_by_step.csv, averaged over seeds
    ax = fig["error_by_step"].axes[0]
    for name, runs in [*c.chosen.groupby("variant"), *c.side.groupby("baseline")]:
        curves = [c.files[r].by_step.iloc[:, 1].to_numpy() for r in runs["run_id"]]
        label = name if name in STRATEGIES else f"{name} baseline"
        np.testing.assert_allclose(_line(ax, label).get_ydata(), np.mean(curves, axis=0))


@pytest.mark.slow
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
        "Caution: 2 seed(s)",
    ):
        assert text in md, text
    assert "| mae-p2-s2 | phase | FAILED | not finished |" in md
    assert "| combined-p1-s3 | phase | RUNNING | not finished |" in md
    excluded = pd.read_csv(compared[0] / "report" / "excluded.csv")
    assert sorted(excluded["run_name"]) == ["combined-p1-s3", "mae-p2-s2"]
    html = (compared[0] / "report" / "report.html").read_text()
    assert '<img src="val_loss.png"' in html and "<table" in html
    summary = pd.read_csv(compared[0] / "report" / "summary.csv")
    for r in summary[summary["phase"] == 2].itertuples():  # the same tables as report.md
        assert f"<td>{_g(r.test_mae_mean)} ± {_g(r.test_mae_std)}</td>" in html


@pytest.mark.slow
def test_analysis_run_holds_the_report(in_store):
    [run] = mlflow.search_runs(
        experiment_names=["seqgen"], filter_string="tags.kind = 'analysis'", output_format="list"
    )
    assert run.info.run_name == "compare"
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"report.md", "report.html", "summary.csv", "val_loss.png"} <= files
    assert run.data.tags["baseline_runs"] == "6"  # 3 baselines x 2 seeds' splits


@pytest.mark.slow
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
    assert list(zip(summary["variant"], summary["phase"], strict=True)) == [
        ("mae", 1),
        ("combined", 1),
    ]
    assert "No evaluation runs" in path.read_text()
    assert {p.name for p in path.parent.glob("*.png")} == {
        "val_loss.png",
        "components.png",
        "schedules.png",
    }


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experiment", "nope"], "error: experiment 'nope' does not exist in sqlite:///"),
        (["--experiment", "empty"], "error: experiment 'empty' has no runs"),
        (
            ["--strategy", "mae", "--phase", "4"],
            "error: no phase runs in experiment 'seqgen' match strategy=mae, phase=4; the "
            "experiment has variant autocorr, combined, mae; phase 1, 2; seed 0, 1, 2, 3",
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
                        "variant": strategy,
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
            "variant": list(STRATEGIES) * 2,
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


@pytest.mark.slow
def test_paused_runs_are_left_out_even_when_marked_finished(in_store):
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("seqgen")
    tags = {
        "kind": "phase",
        "variant": "mae",
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
        {"variant": ["mae", "combined"], "seed": [0, 0], "phase_seconds": [1.0, 1.0]}
    )
    chosen = pd.DataFrame({"variant": ["combined"], "phase": [2], "test_tf_gap": [0.1]})
    per_sample = _per_sample({"combined": 0.0}).query("variant == 'combined'")
    lines = conclusions(per_sample, pd.DataFrame(), chosen, per_run)
    assert lines == ["Only combined has a test evaluation; evaluate mae to compare."]


def _verdict_frames(shift: dict[str, float], baselines: dict[str, float]):
    """Per-sample MAE of strategies (shift) and baselines (offsets) around one base error."""
    per_sample = _per_sample(shift | baselines, n=12)
    is_b = per_sample["variant"].isin(list(baselines))
    return (
        per_sample[~is_b],
        per_sample[is_b].rename(columns={"variant": "baseline"}),
    )


def test_versus_baselines_pairs_each_strategy_with_the_best_baseline():
    models, bl = _verdict_frames({"mae": 0.0, "autocorr": 0.6}, {"mean": 1.0, "knn": 0.3})
    assert tables.best_baselines(bl) == {"mae": "knn"}
    vs = tables.versus_baselines(models, bl).set_index("variant")
    assert (vs["baseline"] == "knn").all() and (vs["n"] == 24).all()
    assert vs.loc["mae", "mean_diff"] == pytest.approx(-0.3, abs=0.01) and vs.loc["mae", "real"]
    assert vs.loc["autocorr", "mean_diff"] == pytest.approx(0.3, abs=0.01)
    assert vs.loc["mae", "rel_diff"] == pytest.approx(
        -0.3 / vs.loc["mae", "baseline_mean"], rel=0.05
    )
    beside = pd.DataFrame(
        {
            "name": ["mae", "autocorr", "knn"],
            "kind": ["variant", "variant", "baseline"],
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
            "variant": ["mae", "combined", "mae"],
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


def _line(ax, label: str):
    """The one line of `ax` labelled `label`."""
    [line] = [x for x in ax.get_lines() if x.get_label() == label]
    return line


def _errorbar(container) -> tuple[float, float, float]:
    """An errorbar's (x, left end, right end)."""
    data_line, _, (bars,) = container
    [[(left, _), (right, _)]] = bars.get_segments()
    return float(data_line.get_xdata()[0]), float(left), float(right)


def _curves_frame(keys=("val_loss",), strategies=("mae", "combined")) -> pd.DataFrame:
    """Histories of three seeds, spread unevenly (so mean, median and mid-range differ):
    value = (1 + strategy index) * (1 + key index) / step + 0.1 * seed^2."""
    rows = [
        (s, seed, key, step, (1 + i) * (1 + k) / step + 0.1 * seed**2)
        for i, s in enumerate(strategies)
        for k, key in enumerate(keys)
        for seed in (0, 1, 2)
        for step in (1, 2, 3)
    ]
    return pd.DataFrame(rows, columns=["variant", "seed", "key", "step", "value"])


def test_val_loss_figure_draws_the_mean_and_the_band_over_seeds():
    curves = _curves_frame()
    fig = plots.val_loss_figure(curves, [1.5])
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "3 seeds" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "mae",
        "combined",
        "phase boundary",
    ]
    assert list(_line(ax, "phase boundary").get_xdata()) == [1.5, 1.5]
    for name, band in zip(("mae", "combined"), ax.collections, strict=True):
        g = curves[curves["variant"] == name].groupby("step")["value"]
        line = _line(ax, name)
        np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
        np.testing.assert_allclose(line.get_ydata(), g.mean())
        # the band runs from the lowest to the highest seed at every step
        drawn = {(round(x, 9), round(y, 9)) for x, y in band.get_paths()[0].vertices}
        assert {(s, round(v, 9)) for s, v in g.min().items()} <= drawn
        assert {(s, round(v, 9)) for s, v in g.max().items()} <= drawn
        assert line.get_color() == plots.strategy_color(name, ["mae", "combined"])


def test_components_and_schedules_figures_draw_each_history():
    keys = ("val_mae", "train_mae", "val_autocorr", "train_autocorr", "lr", "teacher_forcing_ratio")
    curves = _curves_frame(keys, strategies=("mae",))
    mean = curves.groupby(["key", "step"])["value"].mean()
    components = plots.components_figure(curves, [])
    for ax, term in zip(components.axes, ("mae", "autocorr"), strict=True):
        solid, dashed = [x for x in ax.get_lines() if x.get_color() == plots.STRATEGY_COLORS[0]]
        assert (solid.get_linestyle(), dashed.get_linestyle()) == ("-", "--")
        np.testing.assert_allclose(solid.get_ydata(), mean[f"val_{term}"])
        np.testing.assert_allclose(dashed.get_ydata(), mean[f"train_{term}"])
    schedules = plots.schedules_figure(curves, [])
    for ax, key in zip(schedules.axes, ("lr", "teacher_forcing_ratio"), strict=True):
        np.testing.assert_allclose(_line(ax, "mae").get_ydata(), mean[key])


def test_sample_figures_draw_the_arrays_they_are_given():
    rng = np.random.default_rng(0)
    true, pred, knn = rng.normal(size=(3, 2, 5, 3))  # (S, T, K) each
    steps = np.arange(5)
    fig = plots.sequences_figure(
        true, {"mae": pred}, steps, list("abc"), ["s0", "s1"], {"knn": knn}
    )
    axes = np.array(fig.axes).reshape(2, 3)
    for i in range(2):
        for j in range(3):
            ax = axes[i, j]
            np.testing.assert_array_equal(_line(ax, "true").get_ydata(), true[i, :, j])
            np.testing.assert_array_equal(_line(ax, "mae").get_ydata(), pred[i, :, j])
            dashed = _line(ax, "knn baseline")
            np.testing.assert_array_equal(dashed.get_ydata(), knn[i, :, j])
            assert dashed.get_linestyle() == "--"
            assert dashed.get_color() == plots.baseline_color("knn")
    acf_true, acf_pred = rng.uniform(-1, 1, (2, 4, 3))  # (L, K)
    fig = plots.acf_figure(np.arange(1, 5), acf_true, {"mae": acf_pred}, list("abc"))
    for j, ax in enumerate(fig.axes):
        np.testing.assert_array_equal(_line(ax, "true").get_ydata(), acf_true[:, j])
        np.testing.assert_array_equal(_line(ax, "mae").get_ydata(), acf_pred[:, j])
    fields = rng.normal(size=(2, 1, 5, 4))  # true and generated (S, T, n_x)
    fig = plots.fields_figure(fields[0], {"mae": fields[1]}, np.arange(4.0), steps * 1.0, ["s0"])
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    np.testing.assert_array_equal(images[0], fields[0][0])
    np.testing.assert_array_equal(images[1], fields[1][0])
    sweep = rng.normal(size=(2, 5, 3))  # (values, T, K)
    fig = plots.sweep_figure(np.array([0.01, 1.0]), {"mae": sweep}, steps, list("abc"), "nu")
    for j, ax in enumerate(fig.axes[:3]):
        for line, seq in zip(ax.get_lines(), sweep, strict=True):
            np.testing.assert_array_equal(line.get_ydata(), seq[:, j])


def test_param_error_and_error_by_step_figures_draw_their_tables():
    per_sample = pd.DataFrame(
        {
            "variant": ["mae", "mae", "combined"],
            "nu": [0.01, 1.0, 0.1],
            "amp": [1.0, 2.0, 1.5],
            "mae": [0.1, 0.2, 0.3],
        }
    )
    knn = per_sample.iloc[:2].drop(columns="variant").assign(baseline="knn", mae=[0.05, 0.06])
    fig = plots.param_error_figure(per_sample, ["nu", "amp"], baselines=knn)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.get_title()}
    assert list(panels) == ["mae", "combined", "knn baseline"]
    for title, frame in (
        ("mae", per_sample.iloc[:2]),
        ("combined", per_sample.iloc[2:]),
        ("knn baseline", knn),
    ):
        [points] = panels[title].collections
        np.testing.assert_array_equal(points.get_offsets(), frame[["nu", "amp"]].to_numpy())
        np.testing.assert_array_equal(points.get_array(), frame["mae"].to_numpy())
    assert fig.get_suptitle() == "Test MAE over the parameter plane (all evaluated seeds pooled)"

    by_step = pd.DataFrame(
        {"variant": "mae", "seed": [0, 0, 1, 1], "step": [0, 1] * 2, "value": [1.0, 2, 3, 6]}
    )
    bl = by_step.drop(columns="variant").assign(baseline="direct", value=[0.1, 0.2, 0.3, 0.4])
    fig = plots.error_by_step_figure(by_step, bl)
    ax = fig.axes[0]
    np.testing.assert_allclose(_line(ax, "mae").get_ydata(), [2.0, 4.0])  # mean over seeds
    dashed = _line(ax, "direct baseline")
    np.testing.assert_allclose(dashed.get_ydata(), [0.2, 0.3])
    assert dashed.get_linestyle() == "--"


def test_paired_figure_draws_each_difference_with_its_interval():
    paired = pd.DataFrame(
        {
            "metric": ["mae", "mae", "acf_error"],
            "a": ["mae", "mae", "mae"],
            "b": ["autocorr", "combined", "combined"],
            "mean_diff": [0.5, -0.2, 0.01],
            "ci_low": [0.4, -0.3, -0.02],
            "ci_high": [0.7, -0.1, 0.03],
            "real": [True, True, False],
        }
    )
    fig = plots.paired_figure(paired, measures.paired())
    assert [ax.get_title() for ax in fig.axes] == [
        "pointwise accuracy (MAE)",
        "temporal structure (ACF error)",
    ]
    for ax, (_, p) in zip(fig.axes, paired.groupby("metric", sort=False), strict=True):
        drawn = [_errorbar(c) for c in ax.containers]
        np.testing.assert_allclose(drawn, p[["mean_diff", "ci_low", "ci_high"]])
        colors = [c[0].get_color() for c in ax.containers]
        assert colors == ["tab:red" if real else "gray" for real in p["real"]]
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == [f"{a} - {b}" for a, b in zip(p["a"], p["b"], strict=True)]


# ---- strategies are the phase table's ---------------------------------------------------------


@pytest.fixture
def table_with_first(tmp_path, monkeypatch):
    """The phase table with one more strategy, `first`, ahead of the others."""
    path = tmp_path / "phases.toml"
    section = (
        "[strategies.first]\nalpha = 0.8\nsave_every = 1\nnoise_level = 0.0\n"
        "clip_grad_norm = 1.0\n\n"
    )
    text = config.PHASES_FILE.read_text()
    path.write_text(text.replace("[strategies.mae]", section + "[strategies.mae]", 1))
    monkeypatch.setattr(config, "PHASES_FILE", path)
    config.table.cache_clear()
    yield config.strategies()
    config.table.cache_clear()


def test_a_new_strategy_section_takes_its_place_in_tables_and_figures(table_with_first):
    assert table_with_first[:2] == ("first", "mae")
    # the table's order, each strategy's variants after it, then names the table lacks
    names = ["zzz", "combined+alpha=0.3", "combined", "autocorr", "mae", "first"]
    order = tables.variant_order(names)
    assert order == ["first", "mae", "autocorr", "combined", "combined+alpha=0.3", "zzz"]
    # colours by table position, then by position among the others (after every table strategy)
    n = len(table_with_first)
    assert [plots.strategy_color(x, order) for x in order] == [
        *plots.STRATEGY_COLORS[:4],
        *plots.STRATEGY_COLORS[n : n + 2],
    ]

    shift = {"combined+alpha=0.3": 0.2, "mae": 0.5, "first": 0.0}
    per_sample = _per_sample(shift)
    paired = tables.paired_comparison(per_sample)
    assert list(zip(paired["a"], paired["b"], strict=True)) == [
        ("first", "mae"),
        ("first", "combined+alpha=0.3"),
        ("mae", "combined+alpha=0.3"),
    ]
    assert paired["real"].all()
    per_run = pd.DataFrame(
        {
            "variant": list(shift) * 2,
            "phase": 5,
            "seed": [0] * 3 + [1] * 3,
            "best_val_loss": 1.0,
            "phase_seconds": 60.0,
        }
    )
    summary = tables.summary_table(per_run)
    assert summary["variant"].tolist() == ["first", "mae", "combined+alpha=0.3"]
    text = conclusions(per_sample, paired, per_run, per_run)
    assert text[0].startswith("**pointwise accuracy (MAE)**: **first** is lowest (")
    assert "**Overall**: use **first**" in text[1]

    curves = _curves_frame(strategies=("mae", "combined+alpha=0.3", "first"))
    ax = plots.val_loss_figure(curves, []).axes[0]
    drawn = [(x.get_label(), x.get_color()) for x in ax.get_lines()]
    assert drawn == [
        ("first", plots.STRATEGY_COLORS[0]),
        ("mae", plots.STRATEGY_COLORS[1]),
        ("combined+alpha=0.3", plots.STRATEGY_COLORS[n]),
    ]


# ---- verdicts from data built to give them -----------------------------------------------------

FILES = [f"f{j:02d}" for j in range(12)]
BASE = np.linspace(0.5, 1.5, 12)  # per-sample error, mean 1


def _samples(who: str, name: str, **values) -> pd.DataFrame:
    """Per-sample rows of strategy or baseline `name` at seeds 0 and 1: values[metric] (12,)."""
    return pd.DataFrame(
        [
            {who: name, "seed": seed, "file": f, **{k: float(v[j]) for k, v in values.items()}}
            for seed in (0, 1)
            for j, f in enumerate(FILES)
        ]
    )


def _beside(names: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "name": [*names, "knn"],
            "kind": ["variant"] * len(names) + ["baseline"],
            "phase": [5] * len(names) + [None],
            "seconds_mean": [600.0] * len(names) + [0.2],
        }
    )


BASELINE_SAMPLES = pd.concat(
    [
        _samples("baseline", "mean", mae=BASE + 1, acf_error=np.full(12, 0.05)),
        _samples("baseline", "knn", mae=BASE, acf_error=np.full(12, 0.02)),
        _samples("baseline", "direct", mae=BASE + 0.2, acf_error=np.full(12, 0.01)),
    ]
)


def test_verdicts_say_on_which_measure_a_strategy_beats_the_baselines_and_by_how_much():
    first, second = config.strategies()[:2]
    models = pd.concat(
        [
            # half knn's MAE; three times direct's ACF error
            _samples("variant", first, mae=BASE - 0.5, acf_error=np.full(12, 0.03)),
            # twice knn's MAE; half direct's ACF error
            _samples("variant", second, mae=BASE + 1.0, acf_error=np.full(12, 0.005)),
        ]
    )
    assert tables.best_baselines(BASELINE_SAMPLES) == {"mae": "knn", "acf_error": "direct"}
    vs = tables.versus_baselines(models, BASELINE_SAMPLES)
    assert vs["real"].all() and (vs["n"] == 24).all()
    head, one, two = baseline_verdicts(vs, _beside([first, second]))
    assert head == (
        "**Worth training?** In part: no strategy beats the best baseline on every measure; "
        f"on some: {first} (1 of 2 measures), {second} (1 of 2 measures). Time (mean over seeds): "
        f"training {first} 10 min, {second} 10 min; fitting the baselines knn 0.2 s."
    )
    assert one == (
        f"**{first}** (phase 5) beats the best baseline on 1 of 2 measures: MAE 0.5 against "
        "knn's 1 (50% lower; difference -0.5, 95% CI [-0.5, -0.5]); it is worse on ACF error "
        "0.03 against direct's 0.01 (3 times as high; difference 0.02, 95% CI [0.02, 0.02])."
    )
    assert two == (
        f"**{second}** (phase 5) beats the best baseline on 1 of 2 measures: ACF error 0.005 "
        "against direct's 0.01 (50% lower; difference -0.005, 95% CI [-0.005, -0.005]); it is "
        "worse on MAE 2 against knn's 1 (2 times as high; difference 1, 95% CI [1, 1])."
    )


def test_verdict_no_when_every_strategy_is_worse_everywhere():
    first = config.strategies()[0]
    models = _samples("variant", first, mae=BASE * 4, acf_error=np.full(12, 0.04))
    vs = tables.versus_baselines(models, BASELINE_SAMPLES)
    head, line = baseline_verdicts(vs, _beside([first]))
    assert head.startswith(
        "**Worth training?** No: every strategy is worse than the best baseline on every measure."
    )
    assert line.startswith(
        f"**{first}** (phase 5) beats the best baseline on no measure: it is worse on MAE 4 "
        "against knn's 1 (4 times as high; difference 3, 95% CI ["
    )
    assert "ACF error 0.04 against direct's 0.01 (4 times as high; difference 0.03, " in line


def test_verdict_no_leaves_out_a_measure_equal_on_every_sample():
    """No energy rise on either side: that measure says nothing, the others still say no."""
    first = config.strategies()[0]
    zero = np.zeros(12)
    models = _samples("variant", first, mae=BASE * 4, energy_violations=zero)
    bl = BASELINE_SAMPLES.assign(energy_violations=0.0)
    head = baseline_verdicts(tables.versus_baselines(models, bl), _beside([first]))[0]
    assert head.startswith(
        "**Worth training?** No: every strategy is worse than the best baseline on every measure "
        "on which they differ."
    )


def test_which_way_is_better_comes_from_the_registry(monkeypatch):
    # A measure where higher is better: the best baseline is the highest, and a strategy above
    # it beats it.
    skill = measures.Measure("skill", "skill", "skill score", better=measures.HIGHER, need="skill")
    monkeypatch.setattr(measures, "MEASURES", (skill,))
    monkeypatch.setattr(measures, "BY_KEY", {"skill": skill})
    first, second = config.strategies()[:2]
    bl = pd.concat(
        [
            _samples("baseline", "knn", skill=np.full(12, 0.8)),
            _samples("baseline", "direct", skill=np.full(12, 0.6)),
        ]
    )
    models = pd.concat(
        [
            _samples("variant", first, skill=np.full(12, 0.9)),
            _samples("variant", second, skill=np.full(12, 0.7)),
        ]
    )
    assert tables.best_baselines(bl) == {"skill": "knn"}
    vs = tables.versus_baselines(models, bl)
    head, one, two = baseline_verdicts(vs, _beside([first, second]))
    assert head.startswith(f"**Worth training?** Yes: {first} beats the best baseline on every")
    assert one.startswith(f"**{first}** (phase 5) beats the best baseline on every measure: ")
    assert two.startswith(f"**{second}** (phase 5) beats the best baseline on no measure: it is")
    paired = tables.paired_comparison(models)
    per_run = pd.DataFrame(
        {"variant": [first, second], "phase": 5, "seed": 0, "phase_seconds": 1.0}
    )
    best = conclusions(models, paired, per_run, per_run)[0]
    assert best.startswith(f"**skill**: **{first}** is highest (0.9 ± 0 over 2 seed(s), phase 5); ")
    assert best.endswith(f"higher than {second}'s by 0.2 [95% CI 0.2, 0.2], a real difference.")
