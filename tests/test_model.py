"""The generator: scheduled sampling, generation, noise, mixed precision. (Its recurrences against
the plain path: tests/test_native.py, test_fused.py, test_cells.py.)"""

import pytest
import torch

from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator


def small_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_components=3, n_params=2, hidden_size=8, num_layers=2, **({"dropout": 0.0} | kw)
    )
    return StreamlinedSequenceGenerator(cfg)


def test_ratio_one_is_teacher_forcing_and_zero_is_generation():
    model = small_model(dropout=0.0).train()
    params, targets = torch.randn(4, 2), torch.randn(4, 6, 3)
    free = model(params, targets, teacher_forcing_ratio=0.0)
    torch.testing.assert_close(free, model.generate(params, 6))
    forced = model(params, targets, teacher_forcing_ratio=1.0)
    assert not torch.allclose(forced, free)
    # teacher forcing: step t's output cannot depend on the prediction at t-1, only on the truth
    changed = targets.clone()
    changed[:, 3] += 5.0
    forced2 = model(params, changed, teacher_forcing_ratio=1.0)
    torch.testing.assert_close(forced2[:, :4], forced[:, :4])
    assert not torch.allclose(forced2[:, 4], forced[:, 4])


def test_scheduled_sampling_is_per_sample_and_per_step():
    model = small_model(dropout=0.0).train()
    params, targets = torch.randn(64, 2), torch.randn(64, 12, 3)
    forced = model(params, targets, teacher_forcing_ratio=1.0)
    free = model(params, targets, teacher_forcing_ratio=0.0)
    torch.manual_seed(1)
    mixed = model(params, targets, teacher_forcing_ratio=0.5)
    # step 1 sees either the truth (as forced) or the model's own step 0 (as free), per sample
    as_forced = torch.isclose(mixed[:, 1], forced[:, 1]).all(dim=1)
    as_free = torch.isclose(mixed[:, 1], free[:, 1]).all(dim=1)
    assert bool((as_forced | as_free).all())
    assert 10 < int(as_forced.sum()) < 54


def test_generation_needs_only_parameters_and_is_deterministic_in_eval():
    model = small_model()
    params = torch.randn(5, 2)
    out = model.generate(params, 9)
    assert out.shape == (5, 9, 3)
    torch.testing.assert_close(out, model.generate(params, 9))
    assert model.training  # generate restores the mode


def test_noise_and_dropout_only_in_training():
    model = small_model(dropout=0.5)
    params, targets = torch.randn(4, 2), torch.randn(4, 6, 3)
    model.eval()
    a = model(params, targets, 1.0, noise_level=0.5)
    b = model(params, targets, 1.0, noise_level=0.0)
    torch.testing.assert_close(a, b)
    model.train()
    torch.manual_seed(3)
    c = model(params, targets, 1.0, noise_level=0.5)
    assert not torch.allclose(c, a)


def test_model_trains_on_a_toy_task():
    model = small_model(dropout=0.0).train()
    params = torch.randn(32, 2)
    t = torch.linspace(0, 1, 10)
    targets = torch.stack(
        [params[:, :1] * t, torch.sin(3 * t) + 0 * params[:, :1], params[:, 1:] * t * t], dim=2
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = (model(params, targets, 0.5) - targets).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < 0.3 * first


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_mixed_precision_recurrence_tracks_float32(dtype):
    """GEMM operands in low precision, states and gradients in float32: close to float32."""
    cfg = ModelConfig(n_components=5, n_params=2, hidden_size=64, num_layers=2, dropout=0.0)
    torch.manual_seed(0)
    model = StreamlinedSequenceGenerator(cfg).train()
    params, targets = torch.randn(16, 2), torch.randn(16, 40, 5).cumsum(1) * 0.1

    def run(autocast: bool):
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = model(params, targets, 0.5)
        (out - targets).abs().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    full, full_grads = run(False)
    low, low_grads = run(True)
    assert low.dtype == torch.float32
    assert (low - full).abs().max() < 0.05 * full.abs().max()
    for a, b in zip(full_grads, low_grads, strict=True):
        cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cosine > 0.99
    assert not torch.equal(low, full)  # the low-precision path really ran
