"""A cell is one module file (issue #25): the plain autograd path for any cell, the LSTM's
recurrences checked against it, the stack derived from the single model, a new cell added the way
the README says, and the GRU through train, evaluate, compare, serve and the batched study."""

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, subprocess_env
from test_serving import predict_served, served

import seqgen.model.cells
from seqgen.cli import main
from seqgen.model.cells import CELLS
from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator
from seqgen.model.recurrence import recurrence_name
from seqgen.model.stacked import StackedGenerators, draw

SMOKE = ["--preset", "smoke", "--epochs", "1"]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output.strip()


def ok(*args) -> str:
    code, out = cli(*args)
    assert code == 0, out
    return out


def model_of(cell: str, dtype=torch.float32, H=16, L=2, dropout=0.3, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(n_components=3, n_params=2, hidden_size=H, num_layers=L, dropout=dropout)
    config = ModelConfig(**(config.to_dict() | {"cell": cell}))
    return StreamlinedSequenceGenerator(config).to(dtype).train()


def forward_and_grads(model, params, targets, autocast=None):
    """One training forward (teacher forcing 0.5, noise, dropout: drawn from seed 1) and the
    gradient of every weight for a fixed random weighting of the output."""
    model.zero_grad()
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(params, targets, 0.5, 0.05)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * w).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "dtype,autocast,tol",
    [
        (torch.float64, None, 1e-12),
        (torch.float32, None, 1e-5),
        (torch.float32, torch.bfloat16, None),  # the GEMMs in bf16: cosine of the gradients
    ],
)
def test_the_lstm_recurrence_equals_the_plain_path(monkeypatch, dtype, autocast, tol):
    """The C++ recurrence the trainer picks for the LSTM on CPU, at every dtype it serves,
    against the LSTM cell stepped on autograd: outputs and every weight's gradient."""
    model = model_of("lstm", dtype)
    params = torch.randn(5, 2, dtype=dtype)
    targets = torch.randn(5, 30, 3, dtype=dtype).cumsum(1) * 0.1
    mm_dtype = autocast
    assert recurrence_name(mm_dtype, params.new_zeros(1)) == "native (C++)"
    fast, fast_grads = forward_and_grads(model, params, targets, autocast)
    monkeypatch.setenv("SEQGEN_RECURRENCE", "plain")
    plain, plain_grads = forward_and_grads(model, params, targets, autocast)
    assert not torch.equal(fast, plain) or dtype == torch.float64  # two paths really ran
    if tol is not None:
        torch.testing.assert_close(fast, plain, atol=tol, rtol=tol)
        for got, want in zip(fast_grads, plain_grads, strict=True):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        return
    assert (fast - plain).abs().max() < 0.02 * plain.abs().max()
    for got, want in zip(fast_grads, plain_grads, strict=True):
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


def test_the_gru_cell_is_torchs_gru():
    """Teacher-forced at every step, one layer, no noise: the cell's states are nn.GRU's on the
    same inputs and weights."""
    model = model_of("gru", L=1, dropout=0.0).eval()
    B, T, K, P, H = 4, 9, 3, 2, 16
    params, targets = torch.randn(B, P), torch.randn(B, T, K)
    reference = torch.nn.GRU(1 + K + P, H)
    cell = model.cell
    with torch.no_grad():  # nn.GRU keeps (3H, in) matrices, gate order [r, z, n] as ours
        reference.weight_ih_l0.copy_(cell.w_ih[0].t())
        reference.weight_hh_l0.copy_(cell.w_hh[0].t())
        reference.bias_ih_l0.copy_(cell.b_ih[0])
        reference.bias_hh_l0.copy_(cell.b_hh[0])
        (h0,) = model.initial_state(params)
        previous = torch.cat([torch.zeros(B, 1, K), targets[:, :-1]], dim=1)
        position = torch.linspace(0, 1, T).view(1, T, 1).expand(B, T, 1)
        x = torch.cat([position, previous, params.unsqueeze(1).expand(B, T, P)], dim=2)
        states, _ = reference(x.transpose(0, 1), h0)
        expected = model.head(states).transpose(0, 1)
        got = model(params, targets, 1.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_stack_is_its_members_alone(cell):
    """The stack derives from the model: members built from three single models train-forward
    with their own draws and get their own gradients, as each model alone."""
    models = [model_of(cell, seed=s) for s in range(3)]
    stack = StackedGenerators.from_models(models).train()
    B, T = 4, 12
    params, targets = torch.randn(3, B, 2), torch.randn(3, B, T, 3)
    generators = [torch.Generator().manual_seed(s) for s in range(3)]
    draws = draw(stack, generators, B, T, [0.05] * 3, [0.5] * 3)
    out = stack(params, targets, torch.full((3,), 0.5), draws)
    out.square().sum().backward()
    for m, model in enumerate(models):
        torch.manual_seed(m)  # the member's generator seeded m draws what the global RNG does
        alone = model(params[m], targets[m], 0.5, 0.05)
        alone.square().sum().backward()
        torch.testing.assert_close(out[m], alone, atol=1e-6, rtol=1e-6)
        for key, p in model.named_parameters():
            torch.testing.assert_close(stack.weight(key).grad[m], p.grad, atol=1e-5, rtol=1e-5)


def readme_cell() -> str:
    """The README's new cell (Extending), as the file it tells a user to write."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("**A new cell**") :]
    code = section[section.index("```python") + len("```python") : section.index("```\n\n")]
    assert '@cell("elman")' in code
    return code.replace('@cell("elman")', '@cell("elman_test")')


def test_a_new_cell_is_one_file(store, smoke_data, tmp_path):
    """The README's file in seqgen/model/cells/ and nothing else: `--cell NAME` trains it (a new
    process, as a user would run it), a variant of its own, on the plain path, said once. The file
    goes into a copy of the package: tests beside this one (a Ray study comparing its nodes' code
    digests) see the checkout as it is."""
    package = Path(seqgen.__file__).parent
    copy = tmp_path / "src" / "seqgen"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "model" / "cells" / "elman_test.py").write_text(readme_cell())
    done = subprocess.run(
        [
            sys.executable, "-m", "seqgen.cli", "train", "--strategy", "mae", "--phase", "1",
            *SMOKE, "--data_dir", str(smoke_data), "--cell", "elman_test",
        ],
        capture_output=True, text=True, timeout=300,
        env=subprocess_env(store) | {"PYTHONPATH": str(copy.parent)},
    )  # fmt: skip
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-3000:]
    assert said.count("the elman_test cell runs on the plain autograd path") == 1
    run = mlflow.search_runs(search_all_experiments=True, filter_string="tags.kind = 'phase'")
    assert list(run["tags.variant"]) == ["mae+cell=elman_test+epochs=1"]
    assert run["status"].tolist() == ["FINISHED"] and run["metrics.val_loss"].notna().all()


def test_an_unknown_cell_or_another_cell_to_continue_is_one_line(store, smoke_data):
    code, out = cli("train", "--strategy", "mae", "--phase", 1, *SMOKE, "--cell", "tcn")
    assert code == 2 and out.splitlines()[-1] == (
        f"error: --cell 'tcn': unknown cell (known: {', '.join(sorted(CELLS))})"
    )
    assert not mlflow.search_runs(search_all_experiments=True).shape[0]  # nothing trained
    data = ["--data_dir", smoke_data]
    ok("train", "--strategy", "mae", "--phase", 1, *SMOKE, *data, "--cell", "gru")
    gru = "models:/seqgen-mae+cell=gru+epochs=1-smoke@phase-1-s0"
    code, out = cli(
        "train", "--strategy", "mae", "--phase", 2, *SMOKE, *data, "--existing_model", gru
    )
    assert code == 2 and "--cell lstm differs from the model it continues" in out
    assert "has cell gru" in out.splitlines()[-1] and "Traceback" not in out


@pytest.mark.slow
def test_spectral_on_a_gru_trains_evaluates_compares_and_serves(store, smoke_data, tmp_path):
    """The issue's two worked examples together: the spectral strategy on the GRU cell."""
    data = ["--data_dir", smoke_data]
    for phase in (1, 2):
        ok("train", "--strategy", "spectral", "--phase", phase, *SMOKE, *data, "--cell", "gru")
    model = "models:/seqgen-spectral+cell=gru+epochs=1-smoke@phase-2-s0"
    ok("evaluate", "--model", model)
    ok("compare", "--preset", "smoke")
    summary = pd.read_csv("reports/summary.csv")
    assert set(summary["variant"]) == {"spectral+cell=gru+epochs=1"}
    assert summary["val_spectral_at_best_mean"].notna().all()  # the strategy's own term
    assert sorted(summary["phase"]) == [1, 2]

    with served(model, store, tmp_path) as url:
        frame = pd.DataFrame({"nu": [0.05], "amplitude": [1.0]})
        answered = predict_served(url, frame)
        local = mlflow.pyfunc.load_model(model).predict(frame)
        assert len(answered) == len(local) == 151
        pd.testing.assert_frame_equal(answered[local.columns], local, check_dtype=False, rtol=1e-6)


@pytest.mark.slow
def test_a_batched_study_of_gru_chains(store, smoke_data):
    study = ["study", "--strategy", "mae,combined", "--phases", "1", "--seeds", "0", *SMOKE]
    ok(*study, "--data_dir", smoke_data, "--batched", "--cell", "gru")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.kind = 'phase'")
    assert sorted(runs["tags.variant"]) == ["combined+cell=gru+epochs=1", "mae+cell=gru+epochs=1"]
    assert (runs["status"] == "FINISHED").all()
