"""One phase as a user of the original expects it (#10): the printed next-phase command, shapes,
global epochs, schedules, alpha variants, early stopping, the split, fp16 on CPU, bad files."""

import csv
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, subprocess_env
from mlflow.tracking import MlflowClient

from analysis import query, tables
from seqgen import config
from seqgen.cli import main
from seqgen.data.sequences import load_sequences
from seqgen.data.split import make_split
from seqgen.model.bundle import Bundle, Checkpoint
from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator
from seqgen.training.losses import LossResult, make_loss
from seqgen.training.schedules import learning_rate
from seqgen.training.step import Precision, load_scaler_state, optimizer_step
from seqgen.training.train import train_phase

SEQGEN = str(Path(sys.executable).with_name("seqgen"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Smoke models are tiny: one torch thread, or two spin-waiting threads on a busy 2-core
    machine make an epoch ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output.strip()


def train_cli(strategy, phase, data, *extra):
    return run_cli(
        "train", "--strategy", strategy, "--phase", phase, "--preset", "smoke",
        "--data_dir", data, *extra,
    )  # fmt: skip


def settings(strategy, phase, data, **kw):
    return config.resolve(strategy, phase, "smoke", data_dir=str(data), **kw)


def copy_data(smoke_data, folder):
    """A private copy of the smoke data (without its parse cache) that a test may change."""
    shutil.copytree(smoke_data, folder, ignore=shutil.ignore_patterns(".seqgen-cache*"))
    return folder


def steps_of(run_id, key="val_loss"):
    return [m.step for m in MlflowClient().get_metric_history(run_id, key)]


def csv_epochs(folder):
    with open(folder / "training_metrics.csv") as f:
        return [int(row["Epoch"]) for row in csv.DictReader(f)]


def no_runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list") == []


# ---- 1, 3, 5, 7: the printed next-phase command --------------------------------------------------


def test_printed_next_phase_command_carries_every_override_and_trains_that_phase(
    store, smoke_data, tmp_path
):
    data = copy_data(smoke_data, tmp_path / "my data")  # a space: the command must quote it
    # The table's combined first, to show that a variant never moves its aliases.
    assert train_cli("combined", 1, data, "--epochs", 1)[0] == 0
    code, out = train_cli(
        "combined", 1, data,
        "--alpha", 0.3, "--hidden_size", 12, "--epochs", 3, "--start_lr", 0.002,
        "--num_workers", 4,
    )  # fmt: skip
    assert code == 0, out
    assert "--num_workers 4 is ignored: batches come from memory" in out
    lines = [line.strip() for line in out.splitlines()]
    twin = next(line for line in lines if line.startswith("Next phase: mlflow run"))
    command = next(line for line in lines if line.startswith("or: seqgen train"))
    assert "(not carried, set per phase by the table: start_lr)" in lines

    words = shlex.split(twin.removeprefix("Next phase: "))
    assert words[:5] == ["mlflow", "run", str(REPO), "-e", "combined"]
    assert words[-2:] == ["--env-manager", "local"]
    given = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "-P")
    assert given == {
        "phase": "2",
        "preset": "smoke",
        "seed": "0",
        "data_dir": str(data),
        "hidden_size": "12",
        "epochs": "3",
        "alpha": "0.3",
        "num_workers": "4",
        # start_lr is not carried: the next phase keeps this variant's name with --variant
        "variant": "combined+alpha=0.3+epochs=3+hidden_size=12+start_lr=0.002",
    }

    args = shlex.split(command.removeprefix("or: "))
    assert args[:2] == ["seqgen", "train"]
    code, out = run_cli(*args[1:])  # the printed command, word for word
    assert code == 0, out

    client = MlflowClient()
    name = "combined+alpha=0.3+epochs=3+hidden_size=12+start_lr=0.002"
    variant = f"seqgen-{name}-smoke"
    second = client.get_model_version_by_alias(variant, "phase-2-s0")
    run = client.get_run(second.run_id)
    assert run.info.run_name == f"{name}-p2-s0"
    assert (run.data.tags["strategy"], run.data.tags["variant"]) == ("combined", name)
    p = run.data.params
    assert (p["alpha"], p["hidden_size"], p["epochs"]) == ("0.3", "12", "3")
    assert run.data.tags["phase"] == "2" and "phase" not in p  # a tag, not also a param
    assert p["start_lr"] == "0.0005"  # phase 2's own, from the table
    assert run.data.tags["continued_from"] == f"models:/{variant}/1"  # the exact version
    trained = Bundle.load(tmp_path / f"outputs/smoke-s0/{name}_4_6/best_model.pth")
    assert (trained.model_config.hidden_size, trained.variant_name) == (12, name)
    assert tables_epochs_agree(run.info.run_id, tmp_path / f"outputs/smoke-s0/{name}_4_6")
    assert (p["first_epoch"], p["last_epoch"]) == ("4", "6")  # phase 1 ran 1-3

    # 5: the variant has its own folders and model; the table's combined is untouched
    assert (tmp_path / f"outputs/smoke-s0/{name}_1_3/best_model.pth").is_file()
    table_model = client.search_model_versions("name='seqgen-combined+epochs=1-smoke'")
    assert [str(v.version) for v in table_model] == ["1"]
    aliases = client.get_registered_model("seqgen-combined+epochs=1-smoke").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"phase-1": "1", "phase-1-s0": "1"}
    assert str(client.get_model_version_by_alias(variant, "phase-1").version) == "1"


def tables_epochs_agree(run_id, folder):
    """Folder name, CSV Epoch column and MLflow steps name the same global epochs."""
    first, last = (int(x) for x in folder.name.split("_")[-2:])
    expected = list(range(first, last + 1))
    return csv_epochs(folder) == expected and steps_of(run_id) == expected


# ---- 2: a continued phase keeps its parent's shape -----------------------------------------------


def test_continued_phase_refuses_another_shape_and_records_what_it_trained(
    store, smoke_data, tmp_path
):
    assert train_cli("mae", 1, smoke_data, "--epochs", 1)[0] == 0
    parent = ["--existing_model", "models:/seqgen-mae+epochs=1-smoke/1"]
    code, out = train_cli("mae", 2, smoke_data, "--epochs", 1, "--hidden_size", 32, *parent)
    assert code == 2
    assert out.splitlines()[-1] == (
        "error: --hidden_size 32 differs from the model it continues "
        "(models:/seqgen-mae+epochs=1-smoke/1 has hidden_size 16): a continued phase keeps its "
        "parent's shape"
    )
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == 1

    # dropout is a training setting: a continued phase applies its own, and says so everywhere
    code, out = train_cli("mae", 2, smoke_data, "--epochs", 1, "--dropout", 0.1, *parent)
    assert code == 0, out
    folder = tmp_path / "outputs/smoke-s0/mae+dropout=0.1+epochs=1_2_2"
    args = json.loads((folder / "args.json").read_text())
    assert (args["hidden_size"], args["num_layers"], args["dropout"]) == (16, 2, 0.1)
    assert Bundle.load(folder / "best_model.pth").model_config.dropout == 0.1
    model = "seqgen-mae+dropout=0.1+epochs=1-smoke"
    run = MlflowClient().get_model_version_by_alias(model, "phase-2").run_id
    params = MlflowClient().get_run(run).data.params
    assert (params["hidden_size"], params["dropout"]) == ("16", "0.1")


# ---- 3: global epochs after an early stop, and the stitched curves -------------------------------


def test_next_phase_follows_the_real_last_epoch_after_an_early_stop(store, smoke_data, tmp_path):
    plateau = dict(start_lr=1e-12, min_lr=1e-12, dropout=0.0, noise_level=0.0)
    first = train_phase(
        settings(
            "mae", 1, smoke_data, epochs=6, early_stopping_patience=1, variant="flat", **plateau
        ),
    )
    assert first.stop_reason == "validation_plateau" and steps_of(first.run_id) == [1, 2, 3]
    # the table's phase 2 (2 epochs at smoke scale) of the variant named flat
    second = train_phase(settings("mae", 2, smoke_data, variant="flat"))
    folder = tmp_path / "outputs/smoke-s0/flat_4_5"
    assert Path(second.output_dir) == Path("outputs/smoke-s0/flat_4_5")
    assert tables_epochs_agree(second.run_id, folder)
    assert json.loads((folder / "args.json").read_text())["first_epoch"] == 4

    # analysis: the two phases joined along the global epoch, a boundary between 3 and 4
    sel = query.select_runs(preset="smoke")
    curves = tables.stitch(query.metric_histories(list(sel.phases["run_id"])), sel.phases)
    val = curves[curves["key"] == "val_loss"]
    assert val["step"].tolist() == [1, 2, 3, 4, 5]
    assert val["phase"].tolist() == [1, 1, 1, 2, 2]
    assert tables.phase_boundaries(sel.phases) == [3.5]


# ---- 4: schedules chosen by whether a phase continues a model ------------------------------------


def lr_history(run_id):
    return [m.value for m in MlflowClient().get_metric_history(run_id, "lr")]


def test_schedules_follow_the_parent_not_the_phase_number(store, smoke_data, tmp_path):
    lr = dict(start_lr=1e-3, min_lr=5e-4)
    expected = {
        name: [learning_rate(name, e, 5, 1e-3, 5e-4) for e in range(5)]
        for name in ("warmup_cosine", "warmup_linear", "linear")
    }
    # the three differ at 5 epochs: a warm-up epoch, then a cosine or a straight line
    assert expected["warmup_cosine"][2] != pytest.approx(expected["warmup_linear"][2])
    assert expected["linear"][0] != pytest.approx(expected["warmup_linear"][0])

    new = train_phase(settings("mae", 1, smoke_data, epochs=5, **lr))
    assert lr_history(new.run_id) == pytest.approx(expected["warmup_cosine"])
    auto = train_phase(settings("autocorr", 1, smoke_data, epochs=5, **lr))
    assert lr_history(auto.run_id) == pytest.approx(expected["warmup_linear"])
    # phase 1 given a parent continues a model: linear decay, no warm-up
    parent = str(tmp_path / new.output_dir / "best_model.pth")
    continued = train_phase(
        settings("mae", 1, smoke_data, epochs=5, existing_model=parent, outputs_root="c", **lr),
    )
    assert lr_history(continued.run_id) == pytest.approx(expected["linear"])
    assert MlflowClient().get_run(continued.run_id).data.params["schedule"] == "linear"
    assert steps_of(continued.run_id) == [6, 7, 8, 9, 10]  # after its parent's last epoch


# ---- 6: each early-stopping option does something ------------------------------------------------


def test_overfit_gap_stops_when_validation_drifts_from_training(store, smoke_data, tmp_path):
    data = copy_data(smoke_data, tmp_path / "drifted")
    # Validation sequences ten times larger than anything in training: the teacher-forced
    # validation loss ends far above the training loss after the first epoch.
    for name in make_split(sorted(p.name for p in data.glob("*.csv")), 0).val:
        frame = pd.read_csv(data / name)
        components = [c for c in frame.columns if c.startswith("pc")]
        frame[components] *= 10
        frame.to_csv(data / name, index=False)
    s = settings("mae", 1, data, epochs=3, overfit_gap=0.5)
    result = train_phase(s)
    assert result.stop_reason == "overfitting" and steps_of(result.run_id) == [1]
    history = MlflowClient().get_run(result.run_id).data.metrics
    gap = (history["val_loss_teacher_forced"] - history["train_loss"]) / history["train_loss"]
    assert gap > 0.5  # the definition of the gap in docs/training.md, on the logged numbers


def test_grad_explosion_norm_stops_on_a_large_gradient(store, smoke_data):
    result = train_phase(
        settings("mae", 1, smoke_data, epochs=3, grad_explosion_norm=1e-6),
    )
    assert result.stop_reason == "gradient_explosion" and steps_of(result.run_id) == [1]
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["stop_reason"] == "gradient_explosion"


def test_grad_accum_steps_accumulates_micro_batches_into_one_update(store, smoke_data, tmp_path):
    """Without randomness inside a step (no dropout, noise or sampling), 2 micro-batches of 8
    make the same updates as batches of 16; batches of 8 alone make twice as many."""
    exact = dict(
        epochs=1, dropout=0.0, noise_level=0.0, teacher_forcing=False, mixed_precision=False
    )
    runs = {
        name: train_phase(
            settings("mae", 1, smoke_data, outputs_root=name, **exact, **kw),
        )
        for name, kw in {
            "accumulated": dict(batch_size=8, grad_accum_steps=2),
            "large": dict(batch_size=16),
            "small": dict(batch_size=8),
        }.items()
    }

    def weights(name):
        path = Path(runs[name].output_dir) / "final_model.pth"
        return torch.cat([v.flatten() for v in Bundle.load(path).state_dict.values()])

    torch.testing.assert_close(weights("accumulated"), weights("large"), rtol=1e-5, atol=1e-6)
    assert (weights("small") - weights("large")).abs().max() > 1e-4
    assert runs["accumulated"].best_val == pytest.approx(runs["large"].best_val, rel=1e-5)


# ---- 8: the original's split on a folder of its size ---------------------------------------------


def test_the_original_split_on_4951_files(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(4951):  # the smallest folder that gets 4400 / 550 / the rest
        (folder / f"s{i:05d}.csv").write_text(f"step,pc1,nu\n0,{i},{i}\n1,{-i},{i}\n")
    data = load_sequences(folder, n_components=1, n_params=1)
    assert data.n_samples == 4951
    split = make_split(data.files, seed=0)
    assert (len(split.train), len(split.val), len(split.test)) == (4400, 550, 1)
    assert split.note is None
    assert sorted(split.train + split.val + split.test) == sorted(data.files)
    assert make_split(data.files, seed=1).train != split.train  # seeded, not fixed

    fewer = make_split(data.files[:4950], seed=0)  # one file short: the 80/10/10 fallback
    assert (len(fewer.train), len(fewer.val), len(fewer.test)) == (3960, 495, 495)
    assert fewer.note.startswith("4950 samples is fewer than 4400 + 550 + 1")


# ---- 9: fp16 + GradScaler, on the CPU ------------------------------------------------------------


def test_fp16_grad_scaler_step_on_cpu_and_a_step_skipped_for_an_overflow():
    torch.manual_seed(0)
    model = StreamlinedSequenceGenerator(ModelConfig(2, 2, 8, 2, 0.0)).train()
    precision = Precision(
        torch.device("cpu"), torch.float16, torch.amp.GradScaler("cpu"), "fp16 test"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = make_loss(0.5, 3)
    batch = [(torch.randn(4, 2), torch.randn(4, 12, 2))]

    def params():
        return [p.detach().clone() for p in model.parameters()]

    before = params()
    r = optimizer_step(model, loss_fn, batch, optimizer, precision, 0.5, 0.0, 1.0)
    assert r.finite and np.isfinite(r.grad_norm) and r.grad_norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, params(), strict=True))
    assert precision.scaler.get_scale() == 65536.0

    # a loss whose scaled gradients overflow: the scaler skips the step and halves its scale
    def huge(pred, y):
        r = loss_fn(pred, y)
        return LossResult(r.total * 1e36, {k: v * 1e36 for k, v in r.terms.items()})

    before = params()
    r = optimizer_step(model, huge, batch, optimizer, precision, 0.5, 0.0, 1.0)
    assert not np.isfinite(r.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, params(), strict=True))
    assert precision.scaler.get_scale() == 32768.0


def test_scaler_state_of_a_checkpoint_made_without_a_scaler():
    """A CPU checkpoint (scaler off, empty state) resumed on CUDA (scaler on): torch refuses the
    empty state; load_scaler_state starts a fresh scaler instead. CPU scalers stand in for both."""
    without = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert without == {}
    with pytest.raises(RuntimeError, match="state dict is empty"):
        torch.amp.GradScaler("cpu").load_state_dict(without)
    resuming = torch.amp.GradScaler("cpu")
    note = load_scaler_state(resuming, without)
    assert note == "the checkpoint has no GradScaler state: starting at scale 65536"
    assert resuming.get_scale() == 65536.0

    saved = torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict()
    restored = torch.amp.GradScaler("cpu")
    assert load_scaler_state(restored, saved) == "" and restored.get_scale() == 1024.0
    off = torch.amp.GradScaler("cpu", enabled=False)  # a CUDA checkpoint resumed on a CPU
    assert load_scaler_state(off, saved) == "" and off.state_dict() == {}


# ---- 11: bad files and changed data: one line, nothing started, nothing lost ---------------------


@pytest.mark.parametrize("kind", ["corrupt", "state_dict"])
def test_existing_model_that_is_not_a_seqgen_model(store, smoke_data, tmp_path, kind):
    path = tmp_path / "best_model.pth"
    if kind == "corrupt":  # a zip cut short, as a copy interrupted half-way leaves it
        torch.save({"weights": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:  # someone else's model file: a plain state dict
        torch.save(StreamlinedSequenceGenerator(ModelConfig(5, 2, 16, 2, 0.3)).state_dict(), path)
    code, out = train_cli("mae", 2, smoke_data, "--existing_model", path)
    assert code == 2 and "Traceback" not in out
    last = out.splitlines()[-1]
    if kind == "corrupt":
        assert last.startswith(f"error: {path} is not a readable seqgen model file (")
    else:
        assert last == (
            f"error: {path} is not a seqgen model file (format None; expected one of "
            "seqgen-bundle-1, seqgen-bundle-2)"
        )
    assert no_runs() and not (tmp_path / "outputs").exists()


def test_resume_after_the_data_changed_is_refused_and_the_checkpoint_kept(
    store, smoke_data, tmp_path
):
    data = copy_data(smoke_data, tmp_path / "data")
    code, out = train_cli("mae", 1, data, "--epochs", 3, "--stop_at_epoch", 1)
    assert code == 0 and "paused after epoch 1" in out
    checkpoint = tmp_path / "outputs/smoke-s0/mae+epochs=3_1_3/checkpoint_epoch_1.pth"
    kept = checkpoint.read_bytes()
    was = Checkpoint.load(checkpoint).bundle.data.fingerprint

    sample = sorted(data.glob("*.csv"))[0]
    lines = sample.read_text().splitlines()
    row = lines[1].split(",")
    row[1] = str(float(row[1]) + 0.5)  # one value of one sample changes
    sample.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    now = load_sequences(data).fingerprint
    assert now != was
    code, out = train_cli("mae", 1, data, "--epochs", 3, "--resume")
    assert code == 2
    last = out.splitlines()[-1]
    assert last.startswith("error: --resume takes up a phase with the settings and data it started")
    assert last.endswith(f"differs in: data_fingerprint ({was} then, {now} now)")
    assert checkpoint.read_bytes() == kept
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["KILLED"]  # the paused run, untouched


FLOAT_SETTINGS = [n for n in config.FIELDS if config._field_kind(n)[0] is float]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_number_setting_refuses_nan_and_inf(value):
    assert len(FLOAT_SETTINGS) >= 10
    for name in FLOAT_SETTINGS:
        code, out = run_cli("phase-config", "--strategy", "mae", "--phase", 1, f"--{name}", value)
        assert (code, out) == (2, f"error: --{name} must be a finite number, got {float(value)}")


@pytest.mark.slow
def test_an_integer_setting_given_nan_is_one_line_in_a_real_process(store):
    proc = subprocess.run(
        [SEQGEN, "phase-config", "--strategy", "mae", "--phase", "1", "--epochs", "nan"],
        capture_output=True,
        text=True,
        env=subprocess_env(store),
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: seqgen phase-config: Invalid value for '--epochs': 'nan' is not a valid integer."
    ]


# ---- 14: evaluate resolves an alias once ---------------------------------------------------------


def test_evaluate_records_the_version_it_loaded_even_if_the_alias_moves(
    store, smoke_data, monkeypatch
):
    from seqgen.evaluation import evaluate

    train_phase(settings("mae", 1, smoke_data, epochs=1))
    latest = train_phase(settings("mae", 1, smoke_data, epochs=1, seed=1))
    client = MlflowClient()
    assert (
        str(client.get_model_version_by_alias("seqgen-mae+epochs=1-smoke", "phase-1").version)
        == "2"
    )

    real = evaluate.generate_original

    def alias_moves_meanwhile(*args, **kwargs):  # another phase registers during the evaluation
        client.set_registered_model_alias("seqgen-mae+epochs=1-smoke", "phase-1", "1")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_original", alias_moves_meanwhile)
    summary = evaluate.evaluate_model("models:/seqgen-mae+epochs=1-smoke@phase-1")
    tags = client.get_run(summary["run_id"]).data.tags
    assert (
        str(client.get_model_version_by_alias("seqgen-mae+epochs=1-smoke", "phase-1").version)
        == "1"
    )
    assert tags["model_uri"] == "models:/seqgen-mae+epochs=1-smoke@phase-1"  # as asked
    assert tags["evaluated_model_uri"] == "models:/seqgen-mae+epochs=1-smoke/2"  # as evaluated
    assert (tags["model_version"], tags["seed"]) == ("2", "1")
    assert tags["evaluated_run_id"] == latest.run_id
    assert summary["evaluated_model_uri"] == "models:/seqgen-mae+epochs=1-smoke/2"
