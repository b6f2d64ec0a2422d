"""The phase table as the issue states it, presets, overrides, and the strict loader."""

import json

import pytest
from click.testing import CliRunner

from seqgen import config
from seqgen.cli import main
from seqgen.config import ConfigError, load_table, resolve

LR = [(0.001, 0.0005), (0.0005, 0.0001), (0.0001, 0.00005), (0.00005, 0.00001), (0.00001, 0.000005)]
TF = [(0.7, 0.6), (0.6, 0.5), (0.5, 0.4), (0.4, 0.3), (0.3, 0.2)]
TABLE = {  # strategy: max_lag, noise_level, weight_decay, clip_grad_norm for phases 1..5
    "mae": (
        [None] * 5,
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
    assert s.reported_max_lag == [10, 15, 15, 20, 20][phase - 1]  # mae reports the same lags
    assert s.scheduler == ("warmup_cosine" if phase == 1 else "linear")
    first = 100 * (phase - 1) + 1
    assert (s.first_epoch, s.last_epoch) == (first, first + 99)
    assert s.resolved_output_dir().name == f"{FOLDERS[strategy]}_{first}_{first + 99}"
    assert s.run_name == f"{strategy}-p{phase}-s0"
    expected_parent = None if phase == 1 else f"models:/seqgen-{strategy}@phase-{phase - 1}"
    assert s.continues_from == expected_parent


def test_presets_shrink_and_overrides_win():
    demo = resolve("combined", 3, "demo")
    assert (demo.epochs, demo.hidden_size, demo.start_lr) == (4, 64, 0.0001)
    assert demo.first_epoch == 9 and demo.registered_model == "seqgen-combined-demo"
    s = resolve("combined", 2, "smoke", epochs=3, alpha=0.3, hidden_size=8)
    assert (s.epochs, s.alpha, s.hidden_size) == (3, 0.3, 8)
    assert s.resolved_output_dir().name.startswith("30mae_70auto_")
    assert s.overrides() == {"epochs": 3, "alpha": 0.3, "hidden_size": 8}
    assert resolve("combined", 2, "smoke").overrides() == {}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(strategy="l2", phase=1), "unknown strategy 'l2'"),
        (dict(strategy="mae", phase=6), "phase must be 1..5"),
        (dict(strategy="mae", phase=0), "phase must be 1..5"),
        (dict(strategy="mae", phase=1, preset="huge"), "unknown preset 'huge'"),
        (dict(strategy="mae", phase=1, max_lag=5), "--max_lag does not apply to strategy mae"),
        (
            dict(strategy="autocorr", phase=1, alpha=0.2),
            "--alpha applies only to strategy combined",
        ),
        (dict(strategy="combined", phase=1, alpha=1.5), "--alpha must be within 0..1"),
        (dict(strategy="combined", phase=1, epochs="ten"), "epochs must be int"),
        (dict(strategy="combined", phase=1, batch_size=0), "--batch_size must be at least 1"),
        (dict(strategy="combined", phase=1, learning_rate=0.1), "unknown setting 'learning_rate'"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
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
        "scheduler",
        "batch_size",
        "hidden_size",
        "num_layers",
        "dropout",
        "existing_model",
        "output_dir",
    }
    assert keys <= set(d)
    assert d["max_lag"] is None and d["start_lr"] == 0.0002 and d["min_lr"] == 0.0001
    assert d["existing_model"] == "models:/seqgen-mae@phase-1"
    assert d["output_dir"].endswith("100mae_101_200")


def test_cli_bad_option_is_one_line_error():
    result = CliRunner().invoke(main, ["phase-config", "--strategy", "mae", "--phase", "7"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: phase must be 1..5, got 7"
