"""Losses against values computed by hand, gradients on constant sequences, the registry."""

import numpy as np
import pytest
import torch

from seqgen.config import resolve
from seqgen.training.losses import (
    AutocorrelationLoss,
    CombinedMAEAutocorrLoss,
    autocorrelation,
    make_loss,
)

# x = [1, 2, 3, 4]: centred [-1.5, -0.5, 0.5, 1.5], sum of squares 5
#   r1 = (0.75 - 0.25 + 0.75) / 5 = 0.25, r2 = (-0.75 - 0.75) / 5 = -0.3
# y = [1, -1, 1, -1]: sum of squares 4, r1 = -3 / 4 = -0.75, r2 = 2 / 4 = 0.5
X = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)
Y = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1)
MAE_XY = (0 + 3 + 2 + 5) / 4  # 2.5
AUTOCORR_XY = (abs(0.25 - -0.75) + abs(-0.3 - 0.5)) / 2  # 0.9


def test_autocorrelation_by_hand():
    np.testing.assert_allclose(autocorrelation(X, 2).view(-1).numpy(), [0.25, -0.3], rtol=1e-6)
    np.testing.assert_allclose(autocorrelation(Y, 2).view(-1).numpy(), [-0.75, 0.5], rtol=1e-6)


def test_autocorrelation_loss_by_hand_over_batch_and_components():
    pred = torch.cat([X, Y], dim=2)  # components: x, y
    true = torch.cat([Y, Y], dim=2)  # second component identical -> 0
    loss = AutocorrelationLoss(max_lag=2)(pred, true)
    assert loss.item() == pytest.approx((AUTOCORR_XY + 0.0) / 2, rel=1e-6)
    batch = AutocorrelationLoss(max_lag=2)(torch.cat([X, Y]), torch.cat([Y, Y]))
    assert batch.item() == pytest.approx(AUTOCORR_XY / 2, rel=1e-6)


def test_combined_by_hand_and_alpha_limits():
    combined, mae, autocorr = CombinedMAEAutocorrLoss(alpha=0.3, max_lag=2)(X, Y)
    assert mae.item() == pytest.approx(MAE_XY)
    assert autocorr.item() == pytest.approx(AUTOCORR_XY, rel=1e-6)
    assert combined.item() == pytest.approx(0.3 * MAE_XY + 0.7 * AUTOCORR_XY, rel=1e-6)
    torch.manual_seed(0)
    a, b = torch.randn(3, 12, 5), torch.randn(3, 12, 5)
    only_mae = CombinedMAEAutocorrLoss(alpha=1.0, max_lag=4)(a, b)[0]
    only_acf = CombinedMAEAutocorrLoss(alpha=0.0, max_lag=4)(a, b)[0]
    assert only_mae.item() == pytest.approx(torch.nn.L1Loss()(a, b).item())
    assert only_acf.item() == pytest.approx(AutocorrelationLoss(4)(a, b).item())


def test_strategies_same_result_shape_and_weights():
    torch.manual_seed(0)
    a, b = torch.randn(2, 10, 5), torch.randn(2, 10, 5)
    results = {s: make_loss(resolve(s, 1).alpha, 3)(a, b) for s in ("mae", "autocorr", "combined")}
    for r in results.values():
        assert set(r._fields) == {"total", "mae", "autocorr"}
    # every strategy reports the same two components, computed the same way
    for r in results.values():
        assert r.mae.item() == pytest.approx(results["combined"].mae.item())
        assert r.autocorr.item() == pytest.approx(results["combined"].autocorr.item())
    assert results["mae"].total.item() == pytest.approx(results["mae"].mae.item())
    assert results["autocorr"].total.item() == pytest.approx(results["autocorr"].autocorr.item())
    c = results["combined"]
    assert c.total.item() == pytest.approx(0.5 * c.mae.item() + 0.5 * c.autocorr.item())
    with pytest.raises(ValueError, match="alpha must be within 0..1, got 2"):
        make_loss(2.0, 3)


def test_pure_mae_reports_autocorrelation_without_training_on_it():
    pred = torch.randn(2, 8, 5, requires_grad=True)
    true = torch.randn(2, 8, 5)
    result = make_loss(1.0, 20)(pred, true)  # lag 20 > 7 steps: reported over the lags there are
    result.total.backward()
    expected = AutocorrelationLoss(7)(pred.detach(), true)
    assert result.autocorr.item() == pytest.approx(expected.item())
    assert not result.autocorr.requires_grad
    torch.testing.assert_close(pred.grad, torch.sign(pred.detach() - true) / pred.numel())


def test_gradients_finite_on_constant_sequences():
    pred = torch.full((2, 20, 5), 0.3, requires_grad=True)
    true = torch.randn(2, 20, 5)
    loss = make_loss(0.5, 5)(pred, true).total
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    pred2 = torch.full((2, 20, 5), 1.0, requires_grad=True)
    AutocorrelationLoss(5)(pred2, torch.ones(2, 20, 5)).backward()
    assert torch.isfinite(pred2.grad).all()


def test_autocorrelation_in_float32_under_autocast():
    torch.manual_seed(0)
    a = torch.randn(4, 151, 5).cumsum(1)
    b = a + 0.01 * torch.randn(4, 151, 5)
    exact = AutocorrelationLoss(20)(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = AutocorrelationLoss(20)(a.bfloat16(), b.bfloat16())
    assert under.dtype == torch.float32
    assert under.item() == pytest.approx(
        AutocorrelationLoss(20)(a.bfloat16().float(), b.bfloat16().float()).item(), rel=1e-5
    )
    assert exact.item() > 0


def test_max_lag_must_be_below_sequence_length():
    with pytest.raises(ValueError, match="max_lag 4 must be below the sequence length 4"):
        AutocorrelationLoss(4)(X, Y)
