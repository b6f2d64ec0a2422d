"""Losses against values computed by hand, gradients on constant sequences, the registry of
loss terms, and the objective a strategy trains against the original formulas."""

import math
import re

import numpy as np
import pytest
import torch

from seqgen.config import resolve
from seqgen.training.losses import (
    TERMS,
    Objective,
    alpha_weights,
    autocorrelation,
    check_weights,
    loss_term,
    make_loss,
)

# x = [1, 2, 3, 4]: centred [-1.5, -0.5, 0.5, 1.5], sum of squares 5
#   r1 = (0.75 - 0.25 + 0.75) / 5 = 0.25, r2 = (-0.75 - 0.75) / 5 = -0.3
# y = [1, -1, 1, -1]: sum of squares 4, r1 = -3 / 4 = -0.75, r2 = 2 / 4 = 0.5
X = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)
Y = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1)
MAE_XY = (0 + 3 + 2 + 5) / 4  # 2.5
AUTOCORR_XY = (abs(0.25 - -0.75) + abs(-0.3 - 0.5)) / 2  # 0.9
# orthonormal rfft over 4 steps: |X| = [10/2, |-1+i|, |-1|] = [5, sqrt 2, 1], |Y| = [0, 0, 2]
SPECTRAL_XY = (5 + math.sqrt(2) + 1) / 3


def objective(weights: dict, max_lag: int = 2) -> Objective:
    """A single model's objective (a stack of one)."""
    return Objective([weights], [max_lag])


def original_autocorr_loss(pred, true, max_lag):
    """The original scripts' AutocorrelationLoss: mean |r_k(pred) - r_k(true)|, (B,T,K)."""
    return (autocorrelation(pred, max_lag) - autocorrelation(true, max_lag)).abs().mean()


def test_autocorrelation_by_hand():
    np.testing.assert_allclose(autocorrelation(X, 2).view(-1).numpy(), [0.25, -0.3], rtol=1e-6)
    np.testing.assert_allclose(autocorrelation(Y, 2).view(-1).numpy(), [-0.75, 0.5], rtol=1e-6)


def test_autocorrelation_term_by_hand_over_batch_and_components():
    pred = torch.cat([X, Y], dim=2)  # components: x, y
    true = torch.cat([Y, Y], dim=2)  # second component identical -> 0
    loss = objective({"autocorr": 1.0})(pred[None], true[None]).total
    assert loss.item() == pytest.approx((AUTOCORR_XY + 0.0) / 2, rel=1e-6)
    batch = objective({"autocorr": 1.0})(torch.cat([X, Y])[None], torch.cat([Y, Y])[None]).total
    assert batch.item() == pytest.approx(AUTOCORR_XY / 2, rel=1e-6)


def test_combined_by_hand_and_alpha_limits():
    r = make_loss(0.3, 2)(X[None], Y[None])
    assert r.terms["mae"].item() == pytest.approx(MAE_XY)
    assert r.terms["autocorr"].item() == pytest.approx(AUTOCORR_XY, rel=1e-6)
    assert r.total.item() == pytest.approx(0.3 * MAE_XY + 0.7 * AUTOCORR_XY, rel=1e-6)
    torch.manual_seed(0)
    a, b = torch.randn(3, 12, 5), torch.randn(3, 12, 5)
    only_mae = make_loss(1.0, 4)(a[None], b[None]).total
    only_acf = make_loss(0.0, 4)(a[None], b[None]).total
    assert only_mae.item() == pytest.approx(torch.nn.L1Loss()(a, b).item())
    assert only_acf.item() == pytest.approx(original_autocorr_loss(a, b, 4).item())


def test_spectral_by_hand():
    r = objective({"spectral": 1.0})(X[None], Y[None])
    assert r.total.item() == pytest.approx(SPECTRAL_XY, rel=1e-6)
    assert r.terms == {"spectral": r.total}
    pred = torch.randn(1, 2, 16, 3, requires_grad=True)
    shifted = objective({"spectral": 1.0})(pred, pred.detach().roll(5, dims=2))
    assert shifted.total.item() == pytest.approx(0.0, abs=1e-5)  # a cyclic shift: same |FFT|
    shifted.total.sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_spectral_in_float32_under_autocast():
    torch.manual_seed(0)
    a, b = torch.randn(1, 4, 151, 5).cumsum(2), torch.randn(1, 4, 151, 5).cumsum(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = objective({"spectral": 1.0})(a.bfloat16(), b.bfloat16()).total
    assert under.dtype == torch.float32
    exact = objective({"spectral": 1.0})(a.bfloat16().float(), b.bfloat16().float()).total
    assert under.item() == pytest.approx(exact.item(), rel=1e-5)


def test_table_strategies_same_terms_and_the_original_values():
    """mae, autocorr and combined report both terms, computed as the original scripts did
    (nn.L1Loss and AutocorrelationLoss), and train alpha * mae + (1 - alpha) * autocorr."""
    torch.manual_seed(0)
    a, b = torch.randn(2, 10, 5), torch.randn(2, 10, 5)
    results = {
        s: Objective([resolve(s, 1).weights], [3])(a[None], b[None])
        for s in ("mae", "autocorr", "combined")
    }
    for r in results.values():
        assert list(r.terms) == ["mae", "autocorr"]
        assert r.terms["mae"].item() == pytest.approx(torch.nn.L1Loss()(a, b).item())
        assert r.terms["autocorr"].item() == pytest.approx(original_autocorr_loss(a, b, 3).item())
    assert results["mae"].total.item() == pytest.approx(results["mae"].terms["mae"].item())
    assert results["autocorr"].total.item() == results["autocorr"].terms["autocorr"].item()
    c = results["combined"].terms
    assert results["combined"].total.item() == pytest.approx(
        0.5 * c["mae"].item() + 0.5 * c["autocorr"].item()
    )
    with pytest.raises(ValueError, match="alpha must be within 0..1, got 2"):
        make_loss(2.0, 3)


def test_spectral_strategy_trains_mae_and_spectral_and_reports_autocorr():
    s = resolve("spectral", 1)
    assert s.weights == {"mae": 0.5, "autocorr": 0.0, "spectral": 0.5}
    pred = torch.randn(1, 2, 8, 5, requires_grad=True)
    true = torch.randn(1, 2, 8, 5)
    r = Objective([s.weights], [20])(pred, true)  # lag 20 > 7 steps: reported, so clamped
    assert list(r.terms) == ["mae", "autocorr", "spectral"]
    assert not r.terms["autocorr"].requires_grad and r.terms["spectral"].requires_grad
    want = 0.5 * r.terms["mae"] + 0.5 * r.terms["spectral"]
    torch.testing.assert_close(r.total, want)
    assert r.terms["autocorr"].item() == pytest.approx(
        original_autocorr_loss(pred[0].detach(), true[0], 7).item()
    )


def test_pure_mae_reports_autocorrelation_without_training_on_it():
    pred = torch.randn(2, 8, 5, requires_grad=True)
    true = torch.randn(2, 8, 5)
    result = make_loss(1.0, 20)(pred[None], true[None])  # lag 20 > 7 steps: the lags there are
    result.total.sum().backward()
    expected = original_autocorr_loss(pred.detach(), true, 7)
    assert result.terms["autocorr"].item() == pytest.approx(expected.item())
    assert not result.terms["autocorr"].requires_grad
    torch.testing.assert_close(pred.grad, torch.sign(pred.detach() - true) / pred.numel())


def test_gradients_finite_on_constant_sequences():
    pred = torch.full((2, 20, 5), 0.3, requires_grad=True)
    true = torch.randn(2, 20, 5)
    loss = make_loss(0.5, 5)(pred[None], true[None]).total
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pred.grad).all()
    pred2 = torch.full((1, 2, 20, 5), 1.0, requires_grad=True)
    both = Objective([{"autocorr": 1.0, "spectral": 1.0}], [5])
    both(pred2, torch.ones(1, 2, 20, 5)).total.sum().backward()
    assert torch.isfinite(pred2.grad).all()


def test_autocorrelation_in_float32_under_autocast():
    torch.manual_seed(0)
    a = torch.randn(4, 151, 5).cumsum(1)
    b = a + 0.01 * torch.randn(4, 151, 5)
    exact = make_loss(0.0, 20)(a[None], b[None]).total
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = make_loss(0.0, 20)(a.bfloat16()[None], b.bfloat16()[None]).total
    assert under.dtype == torch.float32
    assert under.item() == pytest.approx(
        original_autocorr_loss(a.bfloat16().float(), b.bfloat16().float(), 20).item(), rel=1e-5
    )
    assert exact.item() > 0


def test_max_lag_must_be_below_sequence_length():
    with pytest.raises(ValueError, match="max_lag 4 must be below the sequence length 4"):
        make_loss(0.5, 4)(X[None], Y[None])


def test_bad_weights_are_refused_naming_where():
    for weights, message in [
        ({"foo": 1.0}, "unknown loss term 'foo' (known: autocorr, mae, spectral)"),
        ({"mae": -0.5}, "the weight of mae cannot be negative, got -0.5"),
        ({"mae": "half"}, "the weight of mae must be a number, got 'half'"),
        ({"mae": float("nan")}, "the weight of mae must be a number, got nan"),
        ({"mae": 0.0, "spectral": 0}, "the weights sum to zero: nothing would be trained"),
        ({}, "the weights sum to zero"),
    ]:
        with pytest.raises(ValueError, match="^" + re.escape(f"here: {message}")):
            check_weights(weights, "here")


def test_a_new_term_is_one_decorated_function():
    """A term registered the way a user adds one is a known name, trained by its weight and
    reported beside the others, per member of a stack."""

    @loss_term("test_peak")
    def peak(generated, target, settings):
        """|max over time of generated - of target|, mean over batch and components."""
        return (generated.amax(dim=2) - target.amax(dim=2)).abs().float().mean(dim=(1, 2))

    try:
        assert TERMS["test_peak"] is peak
        pred = torch.randn(2, 3, 8, 2, requires_grad=True)
        true = torch.randn(2, 3, 8, 2)
        stack = Objective([{"mae": 1.0, "test_peak": 0.0}, {"test_peak": 2.0}], [3, 3])
        r = stack(pred, true)
        assert stack.names == ("mae", "test_peak")
        want = (pred.detach().amax(2) - true.amax(2)).abs().mean(dim=(1, 2))
        torch.testing.assert_close(r.terms["test_peak"], want)
        torch.testing.assert_close(r.total, torch.stack([r.terms["mae"][0], 2 * want[1]]))
        r.total.sum().backward()  # member 0 reports the peak term without training on it
        mae_grad = torch.sign(pred.detach()[0] - true[0]) / true[0].numel()
        torch.testing.assert_close(pred.grad[0], mae_grad)
        with pytest.raises(ValueError, match="'test_peak' is already registered"):
            loss_term("test_peak")(lambda g, t, s: g)
    finally:
        TERMS.pop("test_peak", None)


def test_alpha_weights_are_the_seed_strategies():
    assert alpha_weights(0.25) == {"mae": 0.25, "autocorr": 0.75}
    assert [resolve(s, 1).weights for s in ("mae", "autocorr", "combined")] == [
        alpha_weights(1.0),
        alpha_weights(0.0),
        alpha_weights(0.5),
    ]
