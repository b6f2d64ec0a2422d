"""The phase table as the issue states it, presets, overrides, and the strict loader."""

import json
import re

import pytest
from click.testing import CliRunner

from seqgen import config
from seqgen.cli import main
from seqgen.config import ConfigError, load_table, resolve
from seqgen.model.bundle import Bundle

LR = [(0.001, 0.0005), (0.0005, 0.0001), (0.0001, 0.00005), (0.00005, 0.00001), (0.00001, 0.000005)]
TF = [(0.7, 0.6), (0.6, 0.5), (0.5, 0.4), (0.4, 0.3), (0.3, 0.2)]
TABLE = {  # strategy: max_lag, noise_level, weight_decay, clip_grad_norm for phases 1..5
    "mae": (  # the original's MAE table has no lag: pure MAE reports its ACF error at these
        [10, 15, 15, 20, 20],
        [0.05, 0.04, 0.03, 0.02, 0.01],
        [0.01, 0.008, 0.005, 0.003, 0.002],
        [1.0, 0.9, 0.8, 0.7, 0.6],
    ),
    "autocorr": (
        [10, 15, 15, 20, 20],
        [0.05, 0.05, 0.04, 0.02, 0.01],
        [0.01, 0.008, 0.005, 0.003, 0.002],
        [1.0, 1.0, 0.9, 0.7, 0.6],
    ),
    "combined": (
        [10, 15, 15, 20, 20],
        [0.05, 0.04, 0.03, 0.02, 0.01],
        [0.01, 0.008, 0.005, 0.003, 0.002],
        [1.0, 0.9, 0.8, 0.7, 0.6],
    ),
}
FOLDERS = {"mae": "100mae", "autocorr": "100auto", "combined": "50mae_50auto"}


@pytest.mark.parametrize("strategy", ["mae", "autocorr", "combined"])
@pytest.mark.parametrize("phase", [1, 2, 3, 4, 5])
def test_full_table_matches_the_original(strategy, phase):
    s = resolve(strategy, phase)
    lags, noise, decay, clip = TABLE[strategy]
    assert (s.start_lr, s.min_lr) == LR[phase - 1]
    assert (s.teacher_forcing_start, s.teacher_forcing_end) == TF[phase - 1]
    assert (s.max_lag, s.noise_level, s.weight_decay, s.clip_grad_norm) == (
        lags[phase - 1],
        noise[phase - 1],
        decay[phase - 1],
        clip[phase - 1],
    )
    assert (s.epochs, s.hidden_size, s.num_layers, s.dropout, s.batch_size) == (
        100,
        256,
        2,
        0.3,
        32,
    )
    assert s.save_every == (5 if strategy == "combined" else 10)
    assert s.alpha == {"mae": 1.0, "autocorr": 0.0, "combined": 0.5}[strategy]
    new = "warmup_linear" if strategy == "autocorr" else "warmup_cosine"
    assert (s.new_training_schedule, s.continued_schedule) == (new, "linear")
    first = 100 * (phase - 1) + 1
    assert s.planned_first_epoch == first
    assert s.folder(first).name == f"{FOLDERS[strategy]}_{first}_{first + 99}"
    assert s.run_name == f"{strategy}-p{phase}-s0" and s.variant_name == strategy and s.is_plan
    expected_parent = None if phase == 1 else f"models:/seqgen-{strategy}@phase-{phase - 1}-s0"
    assert s.continues_from == expected_parent


def test_presets_shrink_and_overrides_win():
    demo = resolve("combined", 3, "demo")
    assert (demo.epochs, demo.hidden_size, demo.start_lr) == (4, 64, 0.0001)
    assert demo.planned_first_epoch == 9 and demo.registered_model == "seqgen-combined-demo"
    s = resolve("combined", 2, "smoke", epochs=3, alpha=0.3, hidden_size=8)
    assert (s.epochs, s.alpha, s.hidden_size) == (3, 0.3, 8)
    assert s.overrides() == {"epochs": 3, "alpha": 0.3, "hidden_size": 8}
    # any difference from the table is a variant: its own folders, runs, model and aliases,
    # named by what differs, in the settings' order
    name = "combined+alpha=0.3+epochs=3+hidden_size=8"
    assert s.differences() == {"alpha": 0.3, "epochs": 3, "hidden_size": 8}
    assert (s.variant_name, s.run_name) == (name, f"{name}-p2-s0")
    assert s.folder(4).name == f"{name}_4_6"
    assert s.registered_model == f"seqgen-{name}-smoke"
    assert s.continues_from == f"models:/seqgen-{name}-smoke@phase-1-s0"
    assert resolve("mae", 1, alpha=0.0).variant_name == "mae+alpha=0.0"
    assert resolve("combined", 2, "smoke").overrides() == {}
    # where and how it runs, the seed and bookkeeping are not differences
    same = resolve("mae", 2, "smoke", seed=3, data_dir="elsewhere", outputs_root="o2", device="cpu")
    assert same.is_plan and same.registered_model == "seqgen-mae-smoke"
    named = resolve("mae", 2, "smoke", hidden_size=24, variant="wide")
    assert (named.variant_name, named.registered_model) == ("wide", "seqgen-wide-smoke")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(strategy="l2", phase=1), "unknown strategy 'l2'"),
        (dict(strategy="mae", phase=6), "phase must be 1..5"),
        (dict(strategy="mae", phase=0), "phase must be 1..5"),
        (dict(strategy="mae", phase=1, preset="huge"), "unknown preset 'huge'"),
        (dict(strategy="mae", phase=1, max_lag=0), "--max_lag must be at least 1"),
        (dict(strategy="combined", phase=1, alpha=1.5), "--alpha must be within 0..1"),
        (dict(strategy="combined", phase=1, epochs="ten"), "epochs must be int"),
        (dict(strategy="combined", phase=1, dropout=1.0), "--dropout must be within [0, 1)"),
        (dict(strategy="combined", phase=1, start_lr=float("nan")), "--start_lr must be a finite"),
        (dict(strategy="combined", phase=1, noise_level=float("inf")), "--noise_level must be a"),
        (dict(strategy="combined", phase=1, overfit_gap=-1.0), "--overfit_gap must be positive"),
        (dict(strategy="combined", phase=1, batch_size=0), "--batch_size must be at least 1"),
        (dict(strategy="combined", phase=1, learning_rate=0.1), "unknown --learning_rate"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(**kwargs)


def test_loader_rejects_typos_and_wrong_lengths(tmp_path):
    good = config.PHASES_FILE.read_text()
    bad = tmp_path / "phases.toml"
    bad.write_text(good.replace("clip_grad_norm = [1.0, 0.9", "clip_grad_nrom = [1.0, 0.9", 1))
    with pytest.raises(ConfigError, match=r"\[strategies.mae\]: unknown setting 'clip_grad_nrom'"):
        load_table(bad)
    bad.write_text(good.replace("max_lag = [10, 15, 15, 20, 20]", "max_lag = [10, 15]", 1))
    with pytest.raises(ConfigError, match="max_lag needs one value or 5"):
        load_table(bad)
    bad.write_text(good.replace("epochs = 100", 'epochs = "100"', 1))
    with pytest.raises(ConfigError, match="epochs must be int"):
        load_table(bad)


def test_phase_config_prints_original_flag_names():
    result = CliRunner().invoke(
        main,
        [
            "phase-config",
            "--strategy",
            "mae",
            "--phase",
            "2",
            "--preset",
            "full",
            "--start_lr",
            "0.0002",
        ],
    )
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    keys = {
        "epochs",
        "start_lr",
        "min_lr",
        "teacher_forcing_start",
        "teacher_forcing_end",
        "max_lag",
        "noise_level",
        "weight_decay",
        "clip_grad_norm",
        "alpha",
        "save_every",
        "new_training_schedule",
        "continued_schedule",
        "batch_size",
        "hidden_size",
        "num_layers",
        "dropout",
        "existing_model",
        "output_dir",
    }
    assert keys <= set(d)
    assert d["max_lag"] == 15 and d["start_lr"] == 0.0002 and d["min_lr"] == 0.0001
    # another start_lr is a variant: it continues its own phase 1, in its own folder
    assert d["existing_model"] == "models:/seqgen-mae+start_lr=0.0002@phase-1-s0"
    assert d["output_dir"].endswith("mae+start_lr=0.0002_101_200")


def test_cli_bad_option_is_one_line_error():
    result = CliRunner().invoke(main, ["phase-config", "--strategy", "mae", "--phase", "7"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: phase must be 1..5, got 7"


@pytest.fixture
def table_file(tmp_path, monkeypatch):
    """Point seqgen at a copy of the phase table that a test may edit."""
    path = tmp_path / "phases.toml"
    path.write_text(config.PHASES_FILE.read_text())
    monkeypatch.setattr(config, "PHASES_FILE", path)
    config.table.cache_clear()
    yield path
    config.table.cache_clear()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("clip_grad_norm = [1.0, 0.9", "clip_grad_nrom = [1.0, 0.9"),
            "phases.toml [strategies.mae]: unknown setting 'clip_grad_nrom'",
        ),
        (("epochs = 100", 'epochs = "100"'), "phases.toml [shared]: epochs must be int, got '100'"),
        (
            ("max_lag = [10, 15, 15, 20, 20]", "max_lag = [10, 15, 15, 20]"),
            "phases.toml [shared]: max_lag needs one value or 5, got 4",
        ),
        (("[shared]", "[shared"), "phases.toml: not valid TOML"),
    ],
)
@pytest.mark.parametrize(
    "command",
    [
        ["phase-config", "--strategy", "mae", "--phase", "1"],
        ["train", "--strategy", "mae", "--phase", "1"],
        ["pipeline", "--strategy", "all"],
        ["demo", "--data_dir", "nowhere"],
    ],
)
def test_a_broken_table_is_one_line_from_any_command(table_file, store, edit, message, command):
    table_file.write_text(table_file.read_text().replace(*edit, 1))
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert message in result.output


def test_a_new_strategy_is_a_table_section_and_nothing_else(table_file, store, smoke_data):
    from seqgen.training.train import train_phase

    table_file.write_text(
        table_file.read_text()
        + "\n[strategies.mostly_mae]\nalpha = 0.8\nsave_every = 1\nnoise_level = 0.0\n"
        "clip_grad_norm = 1.0\n"
    )
    s = resolve("mostly_mae", 1, "smoke", data_dir=str(smoke_data))
    assert (s.variant_name, s.loss_name, s.max_lag, s.trains_two_terms) == (
        "mostly_mae",
        "80mae_20auto",
        10,
        True,
    )
    result = train_phase(s)
    assert result.model_uri == "models:/seqgen-mostly_mae-smoke/1"
    folder = store_folder = s.folder(1)
    assert folder.name == "80mae_20auto_1_2" and (store_folder / "checkpoint_epoch_1.pth").exists()
    header = (folder / "training_metrics.csv").read_text().splitlines()[0]
    assert header.count(",") == 10  # the two-term loss gets the component columns
    out = CliRunner().invoke(main, ["phase-config", "--strategy", "mostly_mae", "--phase", "2"])
    assert json.loads(out.output)["existing_model"] == "models:/seqgen-mostly_mae@phase-1-s0"


def test_two_strategies_never_share_a_folder(table_file, store, smoke_data):
    """The original folder names stay with the table's own strategies; a strategy trained at
    another's alpha (--alpha, or a table section added with an existing alpha) gets its own, so
    the two never refuse each other's folder nor write one best_model.pth."""
    table_file.write_text(
        table_file.read_text() + "\n[strategies.half]\nalpha = 0.5\nsave_every = 1\n"
        "noise_level = 0.0\nclip_grad_norm = 1.0\n"
    )
    cases = {
        ("mae", None): "100mae_1_2",
        ("autocorr", None): "100auto_1_2",
        ("combined", None): "50mae_50auto_1_2",
        ("autocorr", 0.5): "autocorr+alpha=0.5_1_2",
        ("half", None): "half-50mae_50auto_1_2",
        ("combined", 0.3): "combined+alpha=0.3_1_2",
        ("autocorr", 0.3): "autocorr+alpha=0.3_1_2",
        ("combined", 0.305): "combined+alpha=0.305_1_2",
    }
    for (strategy, alpha), name in cases.items():
        given = {} if alpha is None else {"alpha": alpha}
        assert resolve(strategy, 1, "smoke", **given).folder(1).name == name, (strategy, alpha)

    # trained one after the other, each has its folder and its model; a rerun skips each
    from seqgen.training.train import train_phase

    first = resolve("combined", 1, "smoke", data_dir=str(smoke_data), epochs=1)
    second = resolve("autocorr", 1, "smoke", data_dir=str(smoke_data), epochs=1, alpha=0.5)
    results = [train_phase(s) for s in (first, second, first, second)]
    assert [r.status for r in results] == ["registered", "registered", "skipped", "skipped"]
    for s, r in zip((first, second), results, strict=False):
        assert Bundle.load(s.folder(1) / "best_model.pth").run_id == r.run_id
