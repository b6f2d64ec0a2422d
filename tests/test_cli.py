"""Every bad input: a one-line error naming the problem, exit 2, no traceback, no RUNNING run."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from conftest import free_port, subprocess_env

from seqgen.cli import main

SEQGEN = str(Path(sys.executable).with_name("seqgen"))  # the installed command
SMOKE_TRAIN = ["train", "--strategy", "mae", "--phase", "1", "--preset", "smoke"]


def run_cli(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output.strip()


def smoke_train(data, *extra):
    """`seqgen train` of mae phase 1 at smoke scale on `data`, plus `extra` options."""
    return run_cli(*SMOKE_TRAIN, "--data_dir", str(data), *extra)


def no_running_runs():
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return [r.info.run_name for r in runs if r.info.status == "RUNNING"]


@pytest.fixture
def broken_data(tmp_path, smoke_data):
    folder = tmp_path / "broken"
    shutil.copytree(smoke_data, folder)
    path = folder / "sample_00007.csv"
    lines = path.read_text().splitlines()
    lines[5] = lines[5].replace(",", ",x", 1)
    path.write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.slow
def test_usage_errors_are_one_line_too():
    proc = subprocess.run(
        [SEQGEN, "train", "--strategy", "mae", "--phase", "1", "--hiden_size", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: seqgen train: No such option '--hiden_size'. (Did you mean one of: "
        "'--batch_size', '--device', '--hidden_size'?)"
    ]


def test_booleans_take_values_as_mlflow_run_passes_them():
    cases = [
        (["--mixed_precision", "false"], False),
        (["--no_mixed_precision"], False),
        (["--mixed_precision"], True),
        ([], True),
    ]
    for args, expected in cases:
        code, out = run_cli("phase-config", "--strategy", "mae", "--phase", "1", *args)
        assert code == 0 and json.loads(out)["mixed_precision"] is expected, args


def test_pipeline_refuses_seed_for_seeds(store):
    code, out = run_cli("pipeline", "--strategy", "mae", "--seed", "3", "--preset", "smoke")
    assert (code, out) == (2, "error: pipeline takes --seeds (comma-separated), not --seed")


def test_cuda_without_cuda_is_a_clear_error(store, smoke_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out = smoke_train(smoke_data, "--device", "cuda")
    assert (code, out.splitlines()[-1]) == (
        2,
        "error: --device cuda, but this torch build sees no CUDA device",
    )
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.slow
def test_sigterm_ends_the_run_killed(store, smoke_data, tmp_path):
    proc = subprocess.Popen(
        [
            SEQGEN,
            "train",
            "--strategy",
            "mae",
            "--phase",
            "1",
            "--preset",
            "smoke",
            "--epochs",
            "400",
            "--data_dir",
            str(smoke_data),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(store),
        cwd=tmp_path,
    )
    for line in proc.stdout:  # wait until training runs
        if "epoch 2/400" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, rest
    assert "Traceback" not in rest
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["KILLED"]


def test_help_lists_the_commands():
    code, out = run_cli("--help")
    assert code == 0
    for command in ("train", "pipeline", "phase-config", "synth", "bench", "evaluate", "compare"):
        assert command in out


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--strategy", "l1", "--phase", "1"],
            "error: unknown strategy 'l1': choose one of mae, autocorr, combined, spectral",
        ),
        (["--strategy", "mae", "--phase", "6"], "error: phase must be 1..5, got 6"),
        (
            ["--strategy", "mae", "--phase", "1", "--dropout", "1"],
            "error: --dropout must be within [0, 1) (1 drops everything), got 1.0",
        ),
        (
            ["--strategy", "mae", "--phase", "1", "--start_lr", "nan"],
            "error: --start_lr must be a finite number, got nan",
        ),
        (
            ["--strategy", "mae", "--phase", "1", "--weight_decay", "inf"],
            "error: --weight_decay must be a finite number, got inf",
        ),
    ],
)
def test_bad_options(store, args, message):
    code, out = run_cli("train", *args, "--preset", "smoke")
    assert (code, out.splitlines()[-1]) == (2, message.replace("\n", ""))
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_max_lag_not_below_sequence_length(store, smoke_data):
    code, out = run_cli(
        "train",
        "--strategy",
        "autocorr",
        "--phase",
        "1",
        "--preset",
        "smoke",
        "--data_dir",
        str(smoke_data),
        "--max_lag",
        "151",
    )
    assert code == 2
    assert out.splitlines()[-1] == (
        f"error: --max_lag 151 must be below the sequence length 151 of {smoke_data}"
    )
    assert no_running_runs() == []


def test_model_uri_that_does_not_exist(store, smoke_data):
    code, out = run_cli(
        "train",
        "--strategy",
        "combined",
        "--phase",
        "3",
        "--preset",
        "smoke",
        "--data_dir",
        str(smoke_data),
    )
    assert code == 2
    last = out.splitlines()[-1]
    assert last.startswith("error: no model at models:/seqgen-combined-smoke@phase-2")
    assert last.endswith(
        "run phase 2 of combined with seed 0 first (seqgen train --strategy "
        "combined --phase 2 --preset smoke --seed 0)"
    )
    code, out = run_cli(
        "train",
        "--strategy",
        "mae",
        "--phase",
        "2",
        "--preset",
        "smoke",
        "--data_dir",
        str(smoke_data),
        "--existing_model",
        "nope/best_model.pth",
    )
    assert code == 2
    assert out.splitlines()[-1] == "error: model file nope/best_model.pth does not exist"
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.slow
def test_data_that_fails_the_contract_in_a_real_process(store, broken_data):
    proc = subprocess.run(
        [SEQGEN, *SMOKE_TRAIN, "--data_dir", str(broken_data)],
        capture_output=True,
        text=True,
        env=subprocess_env(store),
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "sample_00007.csv row 5" in last
    assert "not a number" in last
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_unreachable_tracking_server(store, smoke_data, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    code, out = smoke_train(smoke_data)
    assert code == 2
    assert out.splitlines()[-1].startswith(f"error: MLflow tracking server {uri} is unreachable")


def test_output_folder_that_cannot_be_written(store, smoke_data, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    code, out = smoke_train(
        smoke_data,
        "--outputs_root",
        str(tmp_path / "taken"),
    )
    assert code == 2
    assert out.splitlines()[-1].startswith(
        f"error: output folder {tmp_path / 'taken'}/smoke-s0/100mae_1_2 cannot be written"
    )
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_registered_phase_is_not_trained_again(store, smoke_data):
    args = [*SMOKE_TRAIN, "--epochs", "1", "--data_dir", str(smoke_data)]
    assert run_cli(*args)[0] == 0
    code, out = run_cli(*args)
    assert code == 0 and "already registered as seqgen-mae+epochs=1-smoke/1" in out
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    code, out = run_cli(*args, "--noise_level", "0.01")  # other settings: another variant
    assert code == 0 and "registered models:/seqgen-mae+epochs=1+noise_level=0.01-smoke/1" in out
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.data.tags["variant"] for r in runs) == [
        "mae+epochs=1",
        "mae+epochs=1+noise_level=0.01",
    ]


def test_every_command_takes_snake_case_and_the_old_spellings(store, smoke_data, tmp_path):
    new = run_cli("synth", "--out", str(tmp_path / "a"), "--n_samples", "3")
    old = run_cli("synth", "--out", str(tmp_path / "b"), "--n-samples", "3")
    assert new[0] == old[0] == 0
    last = [json.loads(out.splitlines()[-1]) for _, out in (new, old)]
    assert last[0]["n_samples"] == last[1]["n_samples"] == 3
    for flags in (
        ["--data_dir", "nowhere", "--max_lag", "3"],
        ["--data", "nowhere", "--max-lag", "3"],
    ):
        code, out = run_cli("evaluate", "--model", "models:/seqgen-nope/1", *flags)
        assert code == 2 and out.startswith("error: no model at models:/seqgen-nope/1")


def test_a_bug_keeps_its_traceback(store, monkeypatch):
    """Only the project's own errors become one line; anything else is a bug and shows as one."""
    from seqgen import config

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(config, "resolve", broken)
    result = CliRunner().invoke(main, ["phase-config", "--strategy", "mae", "--phase", "1"])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)
