"""What `mlflow ui` shows of a seqgen store (#17), read back from real sqlite stores: the named and
described experiment, one run per chain with its phases' curves stitched at the global epochs
(exactly once through a pause and a resume), evaluations at step 0 under their chain, the
registered version's LoggedModel, bookkeeping tags under `seqgen.` and the printed link. The
browser's view of the same store: tests/test_ui.py."""

import json

import mlflow
import pytest
from conftest import use_store
from mlflow.tracking import MlflowClient

from seqgen.runs import tracking
from seqgen.runs.keeper import RunOptions

CURVES = ("val_loss", "val_mae", "val_autocorr", "train_loss", "lr")
EPOCHS = 3  # per phase: phase 1 is epochs 1-3, phase 2 epochs 4-6


# ---- the experiment ------------------------------------------------------------------------------


def test_runs_go_to_the_described_experiment_seqgen_unless_the_environment_names_another(
    store, monkeypatch
):
    client = MlflowClient()
    exp = client.get_experiment(tracking.experiment_id())
    assert exp.name == "seqgen"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    note = exp.tags["mlflow.note.content"]
    # the description links both saved views, which the UI can open
    for key, (title, state) in tracking.VIEWS.items():
        assert f"[{title}]({tracking.view_link(exp.experiment_id, key)})" in note
        view = json.loads(exp.tags[tracking.VIEW_TAG + key])
        assert view["name"] == title and json.loads(view["state"]) == state
    assert "run `seqgen compare`" in note  # no report yet

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    assert tracking.default_experiment() == "mine"
    other = client.get_experiment(tracking.experiment_id())
    assert other.name == "mine" and other.experiment_id != exp.experiment_id
    assert other.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_description_someone_wrote_stays_and_seqgen_s_own_links_the_latest_report(store):
    client = MlflowClient()
    theirs = client.create_experiment("theirs", tags={"mlflow.note.content": "my notes"})
    tracking.experiment_id("theirs")
    tracking.link_report(theirs, "r" * 32)
    assert client.get_experiment(theirs).tags["mlflow.note.content"] == "my notes"

    ours = tracking.experiment_id()
    run = client.create_run(ours).info.run_id
    tracking.link_report(ours, run)
    note = client.get_experiment(ours).tags["mlflow.note.content"]
    assert f"]({tracking.artifacts_link(ours, run)})" in note
    assert "run `seqgen compare`" not in note


def test_the_printed_link_opens_the_saved_view_in_model_training_mode(store, monkeypatch):
    exp = tracking.experiment_id()
    command, link = tracking.browse_lines(exp)
    assert command == f"Compare the runs: mlflow ui --backend-store-uri {store} --port 5000"
    url = link.split("then open ", 1)[1]
    assert url.startswith(f"http://127.0.0.1:5000/#/experiments/{exp}/runs?")
    assert "workflowType=machine_learning" in url and "viewStateShareKey=seqgen-curves" in url
    # a server's own address, its credentials never shown
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "https://bob:hunter2@mlflow.example")
    [line] = tracking.browse_lines(exp)
    assert "hunter2" not in line and line.endswith(f"mlflow.example/{tracking.view_link(exp)}")


def test_copying_curves_logs_each_missing_step_once(store):
    client = MlflowClient()
    exp = tracking.experiment_id()
    source, target = (client.create_run(exp).info.run_id for _ in range(2))
    for step in (1, 2, 3):
        client.log_metric(source, "val_mae", step / 10, step=step)
        client.log_metric(source, "grad_norm", 1.0, step=step)  # not a chain curve
    client.log_metric(target, "val_mae", 0.1, step=1)  # mirrored before an interruption
    assert tracking.copy_curves(source, target) == 2
    assert tracking.copy_curves(source, target) == 0
    steps = [(m.step, m.value) for m in client.get_metric_history(target, "val_mae")]
    assert sorted(steps) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert client.get_metric_history(target, "grad_norm") == []


# ---- a chain, paused and taken up, then evaluated ------------------------------------------------


@pytest.fixture(scope="module")
def chain_store(tmp_path_factory, smoke_data, migrated_db):
    """mae, seed 0: phase 1 paused after epoch 2, then phases 1-2 by the same command (phase 1
    taken up from its checkpoint), then phase 2's model evaluated on the test split. Yields
    (phase results, evaluation summary)."""
    from seqgen.evaluation.evaluate import evaluate_model
    from seqgen.study.chain import run_pipeline

    folder = tmp_path_factory.mktemp("ui-store")
    overrides = {"data_dir": str(smoke_data), "epochs": EPOCHS}
    with pytest.MonkeyPatch.context() as mp:
        use_store(folder, migrated_db, mp)
        [paused] = run_pipeline("mae", [1], [0], "smoke", overrides, RunOptions(stop_at_epoch=2))
        assert paused.status == "paused"
        results = run_pipeline("mae", [1, 2], [0], "smoke", overrides)
        summary = evaluate_model(results[-1].model_uri, None, "test")
        yield results, summary


def runs_of(kind: str) -> list:
    return mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.kind = '{kind}'", output_format="list"
    )


def test_the_chain_run_carries_its_phases_curves_at_the_global_epochs_exactly_once(chain_store):
    results, _ = chain_store
    client = MlflowClient()
    [chain] = runs_of("chain")
    assert chain.info.run_name == f"mae+epochs={EPOCHS}-s0" and chain.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in chain.data.tags  # top level: a row of its own
    for key in CURVES:
        logged = [(m.step, m.value) for m in client.get_metric_history(chain.info.run_id, key)]
        steps = sorted(step for step, _ in logged)
        assert steps == list(range(1, 2 * EPOCHS + 1)), key  # each epoch once, through the pause
        phases = [
            (m.step, m.value) for r in results for m in client.get_metric_history(r.run_id, key)
        ]
        assert sorted(logged) == sorted(phases), key
    for r in results:  # the phases nest under the chain's run
        assert client.get_run(r.run_id).data.tags["mlflow.parentRunId"] == chain.info.run_id


def test_evaluations_are_at_step_0_under_their_chain_with_the_epoch_as_a_tag(chain_store):
    results, summary = chain_store
    client = MlflowClient()
    [chain] = runs_of("chain")
    run = client.get_run(summary["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == chain.info.run_id
    bundle = tracking.load_bundle(results[-1].model_uri)
    assert run.data.tags["epoch"] == str(bundle.epoch)
    for key in ("test_mae", "test_acf_error"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0], key
    # the baselines it must beat: at step 0 too, under one parent that says what it holds
    [parent] = runs_of("baselines")
    baselines = [r for r in runs_of("evaluation") if r.data.tags.get("baseline")]
    assert {r.data.tags["baseline"] for r in baselines} >= {"mean", "knn"}
    for b in baselines:
        assert b.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert b.info.run_name == f"baseline-{b.data.tags['baseline']}-s0"
        assert [m.step for m in client.get_metric_history(b.info.run_id, "test_mae")] == [0]
    colours = {b.data.tags["mlflow.runColor"] for b in baselines}
    assert len(colours) == len(baselines)  # knn and mean no longer share a colour


def test_the_registered_version_is_the_phase_run_s_logged_model(chain_store):
    results, _ = chain_store
    client = MlflowClient()
    for r in results:
        version = client.get_model_version(f"seqgen-mae+epochs={EPOCHS}-smoke", r.version)
        # the version's source is the logged model (sqlite keeps no model_id of a version)
        assert version.source.startswith("models:/m-"), version.source
        model = client.get_logged_model(version.source.removeprefix("models:/"))
        assert model.source_run_id == r.run_id and model.name == tracking.MODEL_NAME_IN_RUN
        assert model.tags["phase"] == str(r.phase)
        # the run's "Logged models" and the Models tab link back to the registry
        [mine] = client.search_logged_models(
            [model.experiment_id], filter_string=f"source_run_id = '{r.run_id}'"
        )
        assert mine.model_id == model.model_id
        linked = json.loads(model.tags["mlflow.modelVersions"])
        assert linked == [{"name": f"seqgen-mae+epochs={EPOCHS}-smoke", "version": int(r.version)}]
    # and it still loads through the registry, by version and by alias
    assert tracking.load_bundle(f"models:/seqgen-mae+epochs={EPOCHS}-smoke@phase-2").phase == 2


def test_bookkeeping_tags_are_under_seqgen_and_nothing_is_both_tag_and_param(chain_store):
    client = MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert {r.data.tags["kind"] for r in runs} >= {"chain", "phase", "evaluation", "baselines"}
    bookkeeping = ("lease_owner", "lease_expires", "phase_key", "phase_settings", "paused_at")
    for run in runs:
        tags = client.get_run(run.info.run_id).data.tags
        name = run.info.run_name
        assert tags.get("mlflow.note.content"), name  # every run says what it is
        for key in tags:
            if any(word in key for word in bookkeeping):
                assert key.startswith("seqgen."), (name, key)
        assert not set(tags) & set(run.data.params), name


def test_a_run_opened_inside_another_lands_in_its_experiment(store):
    """The demo's evaluations and comparison open inside its run: they belong beside it, not in
    MLflow's Default experiment (where a nested run goes when nothing names one)."""
    with tracking.tracked_run("demo-smoke", {"kind": "demo"}) as outer:
        with tracking.tracked_run("compare", {"kind": "analysis"}) as inner:
            pass
    assert outer.info.experiment_id == tracking.experiment_id()
    assert MlflowClient().get_run(inner.info.run_id).info.experiment_id == outer.info.experiment_id


def test_mlflow_run_of_this_project_defaults_to_the_experiment_seqgen(store, tmp_path):
    """`mlflow run <checkout>` names no experiment: MLflow asks the default experiment providers
    packages register (pyproject.toml), and seqgen's answers `seqgen` for this project only."""
    import click
    from conftest import REPO
    from mlflow.tracking.default_experiment import registry

    with click.Context(click.Command("run"), info_name="run") as ctx:
        ctx.params["uri"] = str(REPO)
        assert registry.get_experiment_id() == tracking.experiment_id()
        assert MlflowClient().get_experiment(registry.get_experiment_id()).name == "seqgen"
        ctx.params["uri"] = str(tmp_path)  # another project: MLflow's own default
        assert registry.get_experiment_id() == "0"
