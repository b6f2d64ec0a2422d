"""The fused C++ recurrence: equal to the Python one, gradcheck, generation, fallback, GEMM plan."""

import json
import os
import subprocess
import sys

import pytest
import torch

from seqgen.model import native
from seqgen.model.cells.lstm import plain_recurrence
from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator
from seqgen.model.recurrence import gemm_plan, native_lstm, run_gemms, uses_native

pytestmark = pytest.mark.skipif(
    os.environ.get("SEQGEN_NATIVE") == "0", reason="the native recurrence is switched off"
)


@pytest.fixture(scope="module", autouse=True)
def built():
    """Builds (or loads the cached) extension once; a machine that cannot is a failure here."""
    assert native.ops() is not None, "the native recurrence did not build (see stderr)"


@pytest.fixture(autouse=True)
def one_thread():
    """conftest's one thread, whatever an earlier test left set: the Python reference's own
    gradients move by up to 5e-5 between 1 and 2 threads at these sizes (its elementwise ops
    round differently where a thread's share ends), as much as the tolerance here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def inputs(T=7, B=3, K=2, F=3, H=4, L=3, dropout=True, dtype=torch.float64, seed=0, M=1):
    """Arguments of autoregressive_lstm after mm_dtype for M members, at a small size, all with
    gradients."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(M, *s, generator=g, dtype=dtype)  # noqa: E731
    layer_w = [r(H, 4 * H) * 0.5]
    for _ in range(1, L):
        layer_w += [r(H, 4 * H) * 0.5, r(H, 4 * H) * 0.5, r(4 * H) * 0.1]
    use_truth = (torch.rand(M, T, B, 1, generator=g) < 0.5).to(dtype)
    drop = None
    if dropout:
        drop = (torch.rand(M, L - 1, T, B, H, generator=g) < 0.7).to(dtype) / 0.7
    args = [r(T, B, F), r(F, 4 * H) * 0.5, r(4 * H) * 0.1, r(T, B, K), use_truth]
    args += [r(L, B, H) * 0.5, r(L, B, H) * 0.5, drop, r(K, 4 * H) * 0.5, r(H, K) * 0.5, r(K) * 0.1]
    args += layer_w
    for i, a in enumerate(args):
        if a is not None and i not in (3, 4, 7):  # not y_teacher, use_truth, drop
            a.requires_grad_(True)
    return args


def member(args, m):
    """Member m's slices of stacked arguments, as a stack of one, with their own gradients."""
    out = []
    for i, a in enumerate(args):
        part = None if a is None else a.detach()[m : m + 1].clone()
        if part is not None and i not in (3, 4, 7):
            part.requires_grad_(True)
        out.append(part)
    return out


def run(fn, mm_dtype, args, seed=1, weights=None):
    """Outputs and the gradients of every input that has them, for a random weighting."""
    out = fn(mm_dtype, *args)
    if weights is None:
        g = torch.Generator().manual_seed(seed)
        weights = torch.randn(out.shape, generator=g, dtype=out.dtype)
    params = [a for a in args if a is not None and a.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), params)
    return out.detach(), grads


@pytest.mark.parametrize("layers,dropout", [(1, False), (2, True), (3, True), (3, False)])
def test_native_equals_python_float32(layers, dropout):
    args = inputs(T=30, B=5, K=3, F=4, H=16, L=layers, dropout=dropout, dtype=torch.float32)
    ours, ours_grads = run(native_lstm, None, args)
    ref, ref_grads = run(plain_recurrence, None, args)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("members,threads", [(3, 1), (3, 2), (2, 4)])
def test_members_are_independent_models(members, threads):
    """Stacked members (run whole on a thread each where members >= threads, else one after
    another with their rows split) give each member's output and gradients alone."""
    args = inputs(T=9, B=5, K=3, F=4, H=16, L=2, dtype=torch.float32, M=members)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stacked, stacked_grads = run(native_lstm, None, args)
        weights = torch.randn(stacked.shape, generator=torch.Generator().manual_seed(1))
        alone = [
            run(native_lstm, None, member(args, m), weights=weights[m : m + 1])
            for m in range(members)
        ]
    finally:
        torch.set_num_threads(before)
    ref, ref_grads = run(plain_recurrence, None, args)
    torch.testing.assert_close(stacked, ref, atol=1e-5, rtol=1e-5)
    for m, (out, grads) in enumerate(alone):
        torch.testing.assert_close(stacked[m : m + 1], out, atol=1e-5, rtol=1e-5)
        for got, want, ref_grad in zip(stacked_grads, grads, ref_grads, strict=True):
            torch.testing.assert_close(got[m : m + 1], want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got, ref_grad, atol=1e-5, rtol=1e-5)


def test_a_member_count_that_disagrees_is_named():
    """The C++ path indexes memory by these shapes: a wrong one stops before it runs."""
    args = inputs(T=5, B=2, K=2, F=3, H=4, L=2, dtype=torch.float32, M=3)
    args[11] = args[11][:2]  # w_hh_0 of two members only
    with pytest.raises(ValueError, match=r"w_hh_0 has shape \(2, 4, 16\), expected \(3, 4, 16\)"):
        native_lstm(None, *args)


def test_gradcheck_native():
    args = inputs(T=4, B=2, K=2, F=2, H=3, L=2)
    assert torch.autograd.gradcheck(lambda *a: native_lstm(None, *a), args)


def test_gradcheck_native_members():
    args = inputs(T=3, B=2, K=2, F=2, H=3, L=2, M=2)
    assert torch.autograd.gradcheck(lambda *a: native_lstm(None, *a), args)


def test_bfloat16_gemms_track_the_python_bfloat16_path():
    """Both round the same GEMM operands to bfloat16; the native one adds layer 0's input in
    float32, so they agree to bfloat16 precision, not bit for bit."""
    args = inputs(T=40, B=8, K=5, F=8, H=32, L=2, dtype=torch.float32)
    ours, ours_grads = run(native_lstm, torch.bfloat16, args)
    ref, ref_grads = run(plain_recurrence, torch.bfloat16, args)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() < 0.02 * ref.abs().max()
    for a, b in zip(ours_grads, ref_grads, strict=True):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_generation_without_autograd_equals_the_training_forward():
    args = inputs(T=12, B=6, K=3, F=4, H=8, L=2, dropout=False, dtype=torch.float32)
    with_grad = native_lstm(None, *args)  # saves every step for a backward
    with torch.no_grad():
        ring = native_lstm(None, *args)  # keeps two steps
    torch.testing.assert_close(ring, with_grad.detach(), atol=0, rtol=0)


def test_nan_propagates_so_the_trainer_sees_a_diverged_step():
    args = inputs(T=5, B=2, K=2, F=2, H=4, L=2, dtype=torch.float32)
    with torch.no_grad():
        args[0][0, 2, 1, 0] = float("nan")  # row 1's input at step 2
        out = native_lstm(None, *args)[0]
    assert out[:2].isfinite().all() and out[2:, 1].isnan().all() and out[:, 0].isfinite().all()


def test_the_model_runs_native_on_cpu():
    cfg = ModelConfig(n_components=3, n_params=2, hidden_size=8, num_layers=2, dropout=0.0)
    model = StreamlinedSequenceGenerator(cfg)
    assert uses_native(None, torch.zeros(1, 1, 1))
    assert uses_native(torch.bfloat16, torch.zeros(1, 1, 1))
    assert not uses_native(torch.float16, torch.zeros(1, 1, 1))  # CUDA's autocast dtype
    out = model.generate(torch.randn(4, 2), 9)
    assert out.shape == (4, 9, 3) and out.isfinite().all()


def test_gemm_plan_is_exactly_the_gemms_the_native_recurrence_runs():
    """Same count, order and shapes as the aten::mm calls of one native forward + backward."""
    T, B, K, F, H, L = 5, 3, 2, 4, 8, 3
    for mm_dtype in [torch.float32, torch.bfloat16]:
        args = inputs(T=T, B=B, K=K, F=F, H=H, L=L, dtype=torch.float32)
        with torch.profiler.profile(record_shapes=True) as prof:
            run(native_lstm, mm_dtype, args)
        seen = [
            [list(s) for s in e.input_shapes[:2]]
            for e in prof.events()
            if e.name == "aten::mm" and e.cpu_parent and e.cpu_parent.name.startswith("seqgen")
        ]
        plan = gemm_plan(T, B, H, L, K, F, mm_dtype, train=True)
        assert seen == [[list(a.shape), list(b.shape)] for _, a, b in plan]
        forward_only = gemm_plan(T, B, H, L, K, F, mm_dtype, train=False)
        assert len(forward_only) == T * L
        run_gemms(plan)  # and the plan runs
        out, a, b = plan[-1]
        torch.testing.assert_close(out, a @ b)


SNIPPET = """
import json, sys, torch
from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator
torch.manual_seed(0)
cfg = ModelConfig(n_components=3, n_params=2, hidden_size=16, num_layers=2, dropout=0.3)
model = StreamlinedSequenceGenerator(cfg).train()
params, targets = torch.randn(6, 2), torch.randn(6, 20, 3)
for _ in range(2):  # two calls: the fallback line is said once
    out = model(params, targets, 0.7, noise_level=0.05)
    out.abs().mean().backward()
grad = model.cell.w_hh[0].grad
print(json.dumps({"out": out.detach().sum().item(), "grad": grad.sum().item()}))
"""


def run_snippet(**env):
    done = subprocess.run(
        [sys.executable, "-c", SNIPPET], capture_output=True, text=True, timeout=120,
        env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


@pytest.mark.slow
def test_fallback_with_seqgen_native_0_says_so_once_and_trains_the_same():
    """Dropout masks, noise and scheduled sampling come from the same seeded draws in model.py,
    so the two paths train the same model."""
    native_result, native_err = run_snippet()
    python_result, python_err = run_snippet(SEQGEN_NATIVE="0")
    assert "seqgen:" not in native_err
    said = [line for line in python_err.splitlines() if line.startswith("seqgen:")]
    assert said == [
        "seqgen: native recurrence off (SEQGEN_NATIVE=0); running the plain autograd path"
    ]
    for key in ("out", "grad"):
        assert native_result[key] == pytest.approx(python_result[key], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_two_processes_starting_at_once_build_it_once(tmp_path):
    """A fresh cache folder and two processes that both need the library: one compiles, the other
    waits on the lock and loads the same build (about a minute on 2 cores)."""
    code = "from seqgen.model import native; assert native.ops() is not None"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop("SEQGEN_NATIVE", None)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert sum("compiling the native recurrence" in e for e in errors) == 1
    assert len(list(tmp_path.rglob("seqgen_native.so"))) == 1


def test_bench_reports_rates_beside_their_gemm_only_limits():
    from seqgen.bench import run_bench

    threads = torch.get_num_threads()
    try:
        r = run_bench("smoke", batches=1, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert r["recurrence"] == "native (C++)" and r["threads"] == 1
    assert r["gemm_dtype"] in ("bfloat16", "float32") and r["cpu"]
    for what in ("train", "generate"):
        rate, limit = r[f"{what}_sequences_per_s"], r[f"gemm_limit_{what}_sequences_per_s"]
        assert rate > 0 and limit > 0
        assert r[f"{what}_fraction_of_gemm_limit"] == pytest.approx(rate / limit, abs=0.01)


@pytest.mark.slow
def test_without_a_compiler_the_python_path_runs_and_says_so_once(tmp_path):
    result, err = run_snippet(CXX=str(tmp_path / "no-such-g++"), TORCH_EXTENSIONS_DIR=str(tmp_path))
    said = [line for line in err.splitlines() if line.startswith("seqgen:")]
    assert len(said) == 1 and "no C++ compiler" in said[0] and "plain autograd path" in said[0]
    native_result, _ = run_snippet()
    assert result["out"] == pytest.approx(native_result["out"], rel=1e-4, abs=1e-5)
