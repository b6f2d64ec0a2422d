"""Loss terms by name, end to end at smoke scale: a new term is one function and a table section;
the built-in spectral strategy trains, logs every term and compares; bad weights are one line."""

import csv
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from seqgen import config
from seqgen.cli import main
from seqgen.config import ConfigError, resolve
from seqgen.runs.outputs import COMPONENT_COLUMNS, SINGLE_COLUMNS
from seqgen.study.chain import parse_strategies, run_pipeline
from seqgen.training.epochs import EpochRecord, Losses, per_epoch_metrics
from seqgen.training.losses import TERMS, loss_term
from seqgen.training.train import train_phases

README = (Path(config.__file__).parent.parent / "README.md").read_text()


def readme_block(kind: str) -> str:
    """The README's new loss term (Extending): its ```python or ```toml block."""
    section = README[README.index("**A new loss term**") : README.index("**A new cell**")]
    start = section.index(f"```{kind}\n") + len(f"```{kind}\n")
    return section[start : section.index("```", start)]


PEAK_SECTION = "\n" + readme_block("toml")


REAL_TABLE = config.PHASES_FILE


def with_table(tmp_path, monkeypatch, extra: str):
    """The project's phase table with `extra` appended, read afresh."""
    path = tmp_path / "phases.toml"
    path.write_text(REAL_TABLE.read_text() + extra)
    monkeypatch.setattr(config, "PHASES_FILE", path)
    config.table.cache_clear()


@pytest.fixture
def fresh_table():
    """Whatever a test does to the table, the next one reads the real one."""
    config.table.cache_clear()
    yield
    config.table.cache_clear()


@pytest.fixture
def peak_term():
    """A researcher's own term, registered as the README shows: one decorated function."""

    namespace = {"loss_term": loss_term}
    exec(readme_block("python"), namespace)  # the README's function, as a user pastes it
    peak = namespace["peak"]
    yield peak
    TERMS.pop("peak", None)


def metric_steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_a_new_term_is_one_function_and_a_table_section(
    store, smoke_data, tmp_path, monkeypatch, peak_term, fresh_table
):
    with_table(tmp_path, monkeypatch, PEAK_SECTION)
    s = resolve("peaky", 1, "smoke", data_dir=str(smoke_data))
    assert s.weights == {"mae": 1.0, "peak": 0.5} and s.loss_name == "100mae_50peak"
    [result] = run_pipeline("peaky", [1], [0], "smoke", {"data_dir": str(smoke_data)})
    client = MlflowClient()
    metrics = client.get_run(result.run_id).data.metrics
    for key in per_epoch_metrics(("mae", "peak")):
        assert metric_steps(client, result.run_id, key) == [1, 2], key
    assert "train_autocorr" not in metrics  # only the strategy's own terms
    assert metrics["val_loss"] == pytest.approx(metrics["val_mae"] + 0.5 * metrics["val_peak"])
    # the chain's run carries the term's validation curve too
    [chain] = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.kind = 'chain'", output_format="list"
    )
    assert metric_steps(client, chain.info.run_id, "val_peak") == [1, 2]
    assert "val_autocorr" not in chain.data.metrics
    # the CSV: the original's columns of a two-term loss it has, then the new term's
    with open(
        tmp_path / "outputs" / "smoke-s0" / "100mae_50peak_1_2" / "training_metrics.csv"
    ) as f:
        rows = list(csv.reader(f))
    assert rows[0] == [
        "Epoch", "Train Loss", "Train MAE Loss", "Validation Loss", "Validation MAE Loss",
        "Test Loss", "Test MAE Loss", "Learning Rate",
        "Train Peak Loss", "Validation Peak Loss", "Test Peak Loss",
    ]  # fmt: skip
    assert [r[0] for r in rows[1:]] == ["1", "2"]
    assert float(rows[2][9]) == pytest.approx(metrics["val_peak"], rel=1e-5)


def test_spectral_stacked_beside_mae_logs_each_members_own_terms_and_compares(
    store, smoke_data, tmp_path
):
    """mae and spectral trained as one stack (as `seqgen study --batched` stacks chains of
    different strategies): each run logs its own strategy's terms; the CSVs keep the original's
    columns and append spectral's; evaluation and `seqgen compare` draw every term."""
    from seqgen.evaluation.evaluate import evaluate_model

    phases = [resolve(s, 1, "smoke", data_dir=str(smoke_data)) for s in ("mae", "spectral")]
    mae, spectral = train_phases(phases)
    client = MlflowClient()
    logged = {r.strategy: client.get_run(r.run_id).data.metrics for r in (mae, spectral)}
    assert "train_spectral" not in logged["mae"]
    for key in per_epoch_metrics(("mae", "autocorr", "spectral")):
        assert metric_steps(client, spectral.run_id, key) == [1, 2], key
    m = logged["spectral"]
    assert m["val_loss"] == pytest.approx(0.5 * m["val_mae"] + 0.5 * m["val_spectral"], rel=1e-5)
    assert m["train_loss"] == pytest.approx(
        0.5 * m["train_mae"] + 0.5 * m["train_spectral"], rel=1e-5
    )
    assert m["val_autocorr"] > 0  # reported, not trained
    folder = tmp_path / "outputs" / "smoke-s0"
    header = (folder / "100mae_1_2" / "training_metrics.csv").read_text().splitlines()[0]
    assert header.split(",") == SINGLE_COLUMNS
    with open(folder / "50mae_50spectral_1_2" / "training_metrics.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == COMPONENT_COLUMNS + [
        "Train Spectral Loss",
        "Validation Spectral Loss",
        "Test Spectral Loss",
    ]
    assert float(rows[2][12]) == pytest.approx(m["val_spectral"], rel=1e-5)

    for r in (mae, spectral):
        evaluate_model(r.model_uri)
    result = CliRunner().invoke(main, ["compare", "--out", "report"])
    assert result.exit_code == 0, result.output
    per_run = (tmp_path / "report" / "per_run.csv").read_text().splitlines()
    columns = per_run[0].split(",")
    assert {"val_mae_at_best", "val_autocorr_at_best", "val_spectral_at_best"} <= set(columns)
    rows = {r.split(",")[columns.index("variant")]: r.split(",") for r in per_run[1:]}
    at_best = columns.index("val_spectral_at_best")
    assert rows["mae"][at_best] == "" and float(rows["spectral"][at_best]) > 0
    assert "val_spectral_at_best_mean" in (tmp_path / "report" / "summary.csv").read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "spectral" in md and "val spectral@best" in md
    assert (tmp_path / "report" / "components.png").is_file()


def test_bad_weights_are_one_line_and_nothing_is_trained(
    store, smoke_data, tmp_path, monkeypatch, fresh_table
):
    train = ["train", "--phase", "1", "--preset", "smoke", "--data_dir", str(smoke_data)]

    def refused(*args):
        result = CliRunner().invoke(main, [*train, *args])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        return result.output.strip()

    known = "(known: autocorr, mae, spectral)"
    assert refused("--strategy", "mae", "--terms", "foo=1") == (
        f"error: --terms: unknown loss term 'foo' {known}"
    )
    assert refused("--strategy", "mae", "--terms", "mae=-1") == (
        "error: --terms: the weight of mae cannot be negative, got -1.0"
    )
    assert refused("--strategy", "mae", "--terms", "mae=half") == (
        "error: --terms: the weight of mae must be a number, got 'half'"
    )
    assert refused("--strategy", "mae", "--terms", "mae=0,autocorr=0") == (
        "error: --terms: the weights sum to zero: nothing would be trained"
    )
    assert refused("--strategy", "spectral", "--alpha", "0.3").startswith(
        "error: --alpha weighs MAE against autocorrelation; strategy spectral weighs terms"
    )
    for section, message in [
        ("terms = { mae = 1.0, foo = 0.5 }", f"unknown loss term 'foo' {known}"),
        ("terms = { mae = -1.0 }", "the weight of mae cannot be negative, got -1.0"),
        ('terms = { mae = "x" }', "the weight of mae must be a number, got 'x'"),
        (
            "terms = { mae = 0.0, spectral = 0 }",
            "the weights sum to zero: nothing would be trained",
        ),
        ("terms = 0.5", "terms must be weights over loss terms, { mae = 0.5 }, got 0.5"),
        ("noise_level = 0.0", "give its loss as alpha (MAE weight, autocorrelation 1 - alpha)"),
        ("alpha = 0.5\nterms = { mae = 1.0 }", "give its loss as alpha"),
    ]:
        with_table(tmp_path, monkeypatch, f"\n[strategies.x]\n{section}\n")
        line = refused("--strategy", "x")
        assert line.startswith(f"error: phases.toml [strategies.x]: {message}"), line
        assert "\n" not in line
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert not (tmp_path / "outputs").exists()


def test_a_terms_variant_is_named_from_its_weights(fresh_table):
    s = resolve("spectral", 1, terms="mae=0.5,spectral=0.5")
    assert s.weights == {"mae": 0.5, "spectral": 0.5}
    assert s.variant_name == "spectral+terms=0.5mae_0.5spectral" and not s.is_plan
    assert s.registered_model == "seqgen-spectral+terms=0.5mae_0.5spectral"
    assert resolve("spectral", 1, terms="mae=0.5,autocorr=0,spectral=0.5").is_plan
    combined = resolve("combined", 2, terms="mae=0.5,spectral=0.5")
    assert combined.weights == {"mae": 0.5, "spectral": 0.5}  # --terms decides over alpha
    assert combined.variant_name == "combined+terms=0.5mae_0.5spectral"
    assert resolve("combined", 1, alpha=0.3).weights == {"mae": 0.3, "autocorr": 0.7}
    with pytest.raises(ConfigError, match="--alpha and --terms: give one"):
        resolve("combined", 1, alpha=0.3, terms="mae=1")


def test_demo_and_study_keep_the_seeds_three_unless_told(fresh_table):
    assert config.default_strategies() == ("mae", "autocorr", "combined")
    assert parse_strategies("all") == ["mae", "autocorr", "combined"]
    assert parse_strategies("all-table") == ["mae", "autocorr", "combined", "spectral"]
    assert parse_strategies("mae,spectral") == ["mae", "spectral"]
    with pytest.raises(ConfigError, match="choose from mae, autocorr, combined, spectral, all"):
        parse_strategies("fft")


def test_checkpoints_before_named_terms_are_read():
    old = {
        "epoch": 3,
        "train": [1.0, 0.5, 1.5],
        "val": [2.0, 1.0, 3.0],
        "test": [3.0, 2.0, 4.0],
        "val_teacher_forced": 1.0,
        "lr": 0.1,
        "teacher_forcing_ratio": 0.5,
        "grad_norm": 1.0,
        "seconds": 1.0,
        "nonfinite_steps": 0,
    }
    record = EpochRecord.from_dict(old)
    assert record.val == Losses(2.0, {"mae": 1.0, "autocorr": 3.0})
    again = EpochRecord.from_dict(record.to_dict())
    assert again == record and again.metrics()["test_autocorr"] == 4.0
    assert again.max_grad_norm == 1.0  # as earlier checkpoints without it are read


@pytest.mark.slow
def test_mlflow_run_train_entry_point_takes_any_strategy(store, smoke_data, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO, subprocess_env

    mlflow_cmd = str(Path(sys.executable).with_name("mlflow"))
    args = [mlflow_cmd, "run", str(REPO), "-e", "train", "--env-manager", "local"]
    for p in ("strategy=spectral", "phase=1", "preset=smoke", f"data_dir={smoke_data}"):
        args += ["-P", p]
    args += ["-P", f"outputs_root={tmp_path / 'outputs'}"]
    proc = subprocess.run(
        args, capture_output=True, text=True, env=subprocess_env(store), timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Next phase: mlflow run . -e train -P strategy=spectral -P phase=2" in (
        proc.stdout + proc.stderr
    ).replace(str(REPO), ".")
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED" and run.info.run_name == "spectral-p1-s0"
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    assert {"train_spectral", "val_spectral", "test_spectral", "val_autocorr"} <= set(
        run.data.metrics
    )
