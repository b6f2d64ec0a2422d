"""The Triton recurrence (seqgen/model/fused.py), run by Triton's interpreter on CPU tensors:
equal to the Python path, forward and every gradient; generation; the kernels compile for a GPU;
seqgen without triton."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from test_native import inputs, one_thread, run  # noqa: F401 (one_thread: autouse fixture)

from seqgen.model.cells.lstm import plain_recurrence
from seqgen.model.recurrence import TRITON_DTYPES, uses_triton
from seqgen.training.step import choose_precision

# Triton reads TRITON_INTERPRET when it decorates a kernel, its own library's included (so
# before triton is first imported), and again when an interpreted kernel calls another: set from
# here to the end of this module's tests. Nothing else in seqgen or its tests imports triton.
_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev])")
from seqgen.model import fused  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    yield
    if _interpret is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _interpret


# About 3 s per forward and backward under the interpreter: the variants beyond one are slow.
SMALL = {"T": 7, "B": 4, "K": 2, "F": 3, "H": 8}


def test_the_kernels_run_interpreted():
    assert type(fused._forward_step).__name__ == "InterpretedFunction", (
        "triton was imported before this module set TRITON_INTERPRET=1"
    )


@pytest.mark.parametrize(
    "layers,dropout",
    [
        (2, True),
        pytest.param(2, False, marks=pytest.mark.slow),
        pytest.param(1, False, marks=pytest.mark.slow),
    ],
)
def test_triton_equals_python_float32(layers, dropout):
    """Three members, mixed teacher forcing (use_truth 0 or 1 per row and step)."""
    args = inputs(**SMALL, L=layers, dropout=dropout, dtype=torch.float32, M=3)
    assert 0 < args[4].mean() < 1
    ours, ours_grads = run(fused.triton_lstm, None, args)
    ref, ref_grads = run(plain_recurrence, None, args)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_generation_without_autograd_equals_the_training_forward():
    args = inputs(**SMALL, L=2, dropout=False, dtype=torch.float32, M=2)
    with_grad = fused.triton_lstm(None, *args)  # saves every step for a backward
    with torch.no_grad():
        ring = fused.triton_lstm(None, *args)  # keeps two steps
    torch.testing.assert_close(ring, with_grad.detach(), atol=0, rtol=0)


@pytest.mark.slow
def test_half_precision_gemms_track_the_python_half_precision_path():
    """GEMM operands in float16 (CUDA's autocast dtype), states and gradients in float32. The
    Python path rounds its GEMM outputs to float16 too, the kernels accumulate in float32: they
    agree to float16 precision."""
    args = inputs(**SMALL, L=2, dtype=torch.float32, M=2)
    ours, ours_grads = run(fused.triton_lstm, torch.float16, args)
    ref, ref_grads = run(plain_recurrence, torch.float16, args)
    full, _ = run(plain_recurrence, None, args)
    assert ours.dtype == torch.float32 and not torch.equal(ours, full)  # float16 really ran
    assert (ours - ref).abs().max() < 0.01 * ref.abs().max()
    for a, b in zip(ours_grads, ref_grads, strict=True):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_cpu_tensors_never_dispatch_to_triton():
    assert not uses_triton(None, torch.zeros(1, 1, 1, 1))


def test_triton_runs_only_the_dtypes_the_trainer_gives_it_and_tests_check():
    """float32 and CUDA autocast's fp16, both checked above; not bf16 (never chosen on CUDA)."""
    with warnings.catch_warnings():  # without CUDA its GradScaler warns and turns itself off
        warnings.simplefilter("ignore")
        cuda = choose_precision(torch.device("cuda"), enabled=True).dtype
    assert TRITON_DTYPES == {(torch.float32, torch.float32), (torch.float32, cuda)}


COMPILE = """
import itertools, json, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from seqgen.model import fused

POINTER = {torch.float32: "*fp32", torch.float16: "*fp16"}
H, B, F, K, L = 256, 32, 8, 5, 2
done = []
# float32 GEMMs in the wide tiles, float16 (CUDA autocast) in the narrow ones: each way once
for (low, width), layer in itertools.product(((torch.float32, 32), (torch.float16, 16)), range(L)):
    blocks = {**fused._blocks(1, B, H, F, K, torch.device("cpu")), "BLOCK_H": width}
    shape = dict(LAYER=layer, L=L, B=B, H=H, F=F, K=K, HAS_DROP=True, SAVE=True, **blocks)
    for kernel in (fused._forward_step, fused._backward_step):
        signature, constants = {}, {}
        for i, name in enumerate(kernel.arg_names):
            if kernel.params[i].is_constexpr:
                signature[name], constants[name] = "constexpr", shape[name]
            elif name in ("t", "prev", "now", "T", "S"):  # step numbers
                signature[name] = "i32"
            else:  # tensors: the weights in the GEMM dtype, the rest float32
                weight = name in ("w_ih", "w_hh", "w_hh_t", "w_ih_up_t")
                signature[name] = POINTER[low if weight else torch.float32]
        triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))
        done.append(f"{kernel.__name__} layer {layer}, {low}, BLOCK_H {width}")
print(json.dumps(done))
"""


@pytest.mark.slow
def test_the_kernels_compile_for_a_gpu():
    """The interpreter lets through what a GPU compiler rejects (tile shapes, dtypes of dots):
    compile every kernel for sm_90 (an H100/H200) with triton's own ptxas, no GPU needed
    (about 5 s a kernel on 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's own
    done = subprocess.run(
        [sys.executable, "-c", COMPILE], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads(done.stdout)) == 8


WITHOUT_TRITON = """
import sys, torch
sys.modules["triton"] = None  # as if it were not installed: importing it raises ImportError
import seqgen.log
from seqgen.model import recurrence
from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator
seqgen.log.setup()
assert recurrence._fused() is None and recurrence._fused() is None  # said once
model = StreamlinedSequenceGenerator(ModelConfig(3, 2, 8, 2, 0.0))
print(model.generate(torch.randn(2, 2), 5).shape)
"""


def test_seqgen_runs_without_triton_and_says_so_once():
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch.Size([2, 5, 3])"
    said = [line for line in done.stderr.splitlines() if "Triton" in line]
    assert len(said) == 1 and "unavailable" in said[0] and "plain autograd path" in said[0]
