"""The CPU trainer's precision: bf16 autocast where the CPU computes bf16 natively, float32
elsewhere, and SEQGEN_CPU_PRECISION (pytest --precision) to force either on any CPU."""

from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner

from seqgen.cli import main
from seqgen.errors import ConfigError
from seqgen.training.step import choose_precision, native_cpu_bf16

CPU = torch.device("cpu")


def test_auto_follows_the_cpu_and_says_why(monkeypatch):
    monkeypatch.delenv("SEQGEN_CPU_PRECISION", raising=False)
    precision = choose_precision(CPU, True)
    if native_cpu_bf16():
        assert precision.dtype == torch.bfloat16
        assert precision.note.startswith("mixed precision: CPU bf16 autocast (native bf16; flags")
    else:
        assert precision.dtype is None
        assert precision.note.startswith("float32: this CPU has no native bf16 (flags")
    assert not precision.scaler.is_enabled()


@pytest.mark.parametrize(
    "forced, dtype, note",
    [
        ("float32", None, "float32: forced by SEQGEN_CPU_PRECISION=float32"),
        ("bf16", torch.bfloat16, "mixed precision: CPU bf16 autocast, forced by"),
        ("BF16", torch.bfloat16, "mixed precision: CPU bf16 autocast, forced by"),
    ],
)
def test_the_switch_forces_either_precision_on_any_cpu(monkeypatch, forced, dtype, note):
    monkeypatch.setenv("SEQGEN_CPU_PRECISION", forced)
    precision = choose_precision(CPU, True)
    assert precision.dtype == dtype and precision.note.startswith(note)
    if dtype is not None:
        assert ("native" if native_cpu_bf16() else "emulated by torch") in precision.note
    # --no_mixed_precision is float32 whatever the switch says
    assert choose_precision(CPU, False).dtype is None


def test_a_forced_bf16_really_runs_bf16_gemms(monkeypatch):
    """The forced precision reaches the recurrence: bf16 GEMMs give other numbers than float32."""
    from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator

    torch.manual_seed(0)
    model = StreamlinedSequenceGenerator(ModelConfig(5, 2, 32, 2, 0.0)).eval()
    params = torch.randn(4, 2)
    out = {}
    for forced in ("float32", "bf16"):
        monkeypatch.setenv("SEQGEN_CPU_PRECISION", forced)
        with choose_precision(CPU, True).autocast():
            out[forced] = model.generate(params, 30)
    assert out["bf16"].dtype == torch.float32
    assert not torch.equal(out["bf16"], out["float32"])
    assert (out["bf16"] - out["float32"]).abs().max() < 0.05


def test_an_unknown_value_is_refused_in_one_line(monkeypatch, store, smoke_data):
    monkeypatch.setenv("SEQGEN_CPU_PRECISION", "fp8")
    with pytest.raises(ConfigError, match="SEQGEN_CPU_PRECISION='fp8': must be one of auto"):
        choose_precision(CPU, True)
    result = CliRunner().invoke(
        main,
        ["train", "--strategy", "mae", "--phase", "1", "--preset", "smoke"]
        + ["--data_dir", str(smoke_data), "--epochs", "1"],
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: SEQGEN_CPU_PRECISION='fp8': must be one of auto, float32, bf16"
    )
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    assert not Path("outputs").exists()
