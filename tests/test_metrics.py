"""Metrics against values worked out by hand (arithmetic in the comments)."""

import warnings

import numpy as np
import pytest

from seqgen.evaluation import metrics as m


def seqs(*rows: list[float]) -> np.ndarray:
    """One-component sequences of equal length -> (N, T, 1)."""
    return np.array(rows, dtype=np.float64)[:, :, None]


RAMP = [1.0, 2.0, 3.0, 4.0]  # mean 2.5, deviations -1.5 -0.5 0.5 1.5, sum of squares 5
ALT = [1.0, -1.0, 1.0, -1.0]  # mean 0, sum of squares 4


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0/0 or log(0) would warn before it gave NaN
        yield


# --- pointwise errors ---------------------------------------------------------------------------

PRED = np.array([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # (1, 3, 2)
TRUE = np.array([[[0.0, 2.0], [3.0, 1.0], [5.0, 10.0]]])
# errors: component 0 -> 1, 0, 0; component 1 -> 0, 3, -4


def test_mae_rmse_overall_and_per_component():
    r = m.mae_rmse(PRED, TRUE)
    assert r["mae"] == pytest.approx(8 / 6)  # (1 + 0 + 0 + 0 + 3 + 4) / 6
    assert r["rmse"] == pytest.approx(np.sqrt(26 / 6))  # (1 + 9 + 16) / 6
    np.testing.assert_allclose(r["mae_per_component"], [1 / 3, 7 / 3])
    np.testing.assert_allclose(r["rmse_per_component"], [np.sqrt(1 / 3), np.sqrt(25 / 3)])
    assert isinstance(r["mae"], float) and isinstance(r["rmse"], float)


def test_error_by_step():
    # step 0: (1 + 0) / 2, step 1: (0 + 3) / 2, step 2: (0 + 4) / 2
    np.testing.assert_allclose(m.error_by_step(PRED, TRUE), [0.5, 1.5, 2.0])


def test_per_sequence_mae_rmse():
    pred = np.concatenate([PRED, TRUE])  # second sequence is exact
    true = np.concatenate([TRUE, TRUE])
    np.testing.assert_allclose(m.per_sequence_mae(pred, true), [8 / 6, 0.0])
    np.testing.assert_allclose(m.per_sequence_rmse(pred, true), [np.sqrt(26 / 6), 0.0])


def test_bad_shapes_are_named():
    with pytest.raises(
        ValueError, match=r"pred and true shapes differ: \(1, 3, 2\) vs \(1, 2, 2\)"
    ):
        m.mae_rmse(PRED, TRUE[:, :2])
    with pytest.raises(ValueError, match=r"pred must have shape \(N, T, K\), got shape \(3, 2\)"):
        m.per_sequence_mae(PRED[0], TRUE[0])


def test_field_relative_l2():
    pred = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    true = np.array([[[1.0, 2.0], [3.0, 2.0]]])
    # ||diff|| = 2, ||true|| = sqrt(1 + 4 + 9 + 4) = 3 sqrt(2) -> sqrt(2) / 3
    np.testing.assert_allclose(m.field_relative_l2(pred, true), [np.sqrt(2) / 3])


def test_field_relative_l2_zero_true_norm(no_warnings):
    zero = np.zeros((1, 2, 2))
    pred = np.concatenate([zero, np.ones((1, 2, 2)), 2 * np.ones((1, 2, 2))])
    true = np.concatenate([zero, zero, np.ones((1, 2, 2))])
    # both zero -> 0; only true zero -> inf; normal case ||1|| / ||1|| = 1
    np.testing.assert_array_equal(m.field_relative_l2(pred, true), [0.0, np.inf, 1.0])


# --- autocorrelation ----------------------------------------------------------------------------


def test_acf_ramp():
    # lag 1: (-1.5)(-0.5) + (-0.5)(0.5) + (0.5)(1.5) = 0.75 - 0.25 + 0.75 = 1.25 -> 1.25 / 5 = 1/4
    # lag 2: (-1.5)(0.5) + (-0.5)(1.5) = -1.5 -> -1.5 / 5 = -3/10
    np.testing.assert_allclose(m.acf(seqs(RAMP), 2)[0, :, 0], [1 / 4, -3 / 10])


def test_acf_alternating():
    # lag 1: three products of -1 -> -3/4; lag 2: two of +1 -> 2/4; lag 3: one of -1 -> -1/4
    np.testing.assert_allclose(m.acf(seqs(ALT), 3)[0, :, 0], [-3 / 4, 1 / 2, -1 / 4])


def test_acf_constant_is_zero(no_warnings):
    x = np.stack([np.full(151, 3.0), np.full(151, 0.1), np.zeros(151)], axis=0)[
        :, :, None
    ]  # 0.1 * 151 / 151 is not exactly 0.1: round-off deviations must not count
    r = m.acf(x, 20)
    assert r.shape == (3, 20, 1)
    np.testing.assert_array_equal(r, 0.0)


def test_acf_small_variation_on_large_offset_is_kept():
    # std 1e-3 against max|x| ~ 1e6 is 1e-9, above the 1e-10 floor: real signal, r_1 = -3/4
    x = seqs([1e6 + 1e-3 * v for v in ALT])
    assert m.acf(x, 1)[0, 0, 0] == pytest.approx(-3 / 4, rel=1e-6)


def test_acf_components_are_separate():
    x = np.stack([seqs(RAMP)[0, :, 0], seqs(ALT)[0, :, 0]], axis=-1)[None]  # (1, 4, 2)
    np.testing.assert_allclose(m.acf(x, 1)[0, 0], [1 / 4, -3 / 4])


@pytest.mark.parametrize("max_lag", [4, 5, 0])
def test_acf_max_lag_out_of_range(max_lag):
    with pytest.raises(
        ValueError, match=f"max_lag must be in 1..T-1 = 1..3 for T=4, got max_lag={max_lag}"
    ):
        m.acf(seqs(RAMP), max_lag)


def test_acf_error_per_sequence():
    # lag 1: |1/4 - (-3/4)| = 1; lag 2: |-3/10 - 1/2| = 4/5 -> mean 0.9
    np.testing.assert_allclose(m.acf_error_per_sequence(seqs(RAMP), seqs(ALT), max_lag=2), [0.9])


def test_pooled_acf_two_sequences():
    # lag 1 numerators 1.25 and -3, denominators 5 and 4 -> (1.25 - 3) / 9 = -7/36
    pooled = m.pooled_acf(seqs(RAMP, ALT), 1)
    assert pooled.shape == (1, 1)
    assert pooled[0, 0] == pytest.approx(-7 / 36)
    # the mean of the per-sequence ratios weighs both equally: (1/4 - 3/4) / 2 = -1/4
    assert m.acf(seqs(RAMP, ALT), 1).mean() == pytest.approx(-1 / 4)


def test_pooled_acf_ignores_constant_sequence(no_warnings):
    # the constant sequence adds 0 to numerator and denominator
    pooled = m.pooled_acf(seqs(ALT, [2.0, 2.0, 2.0, 2.0]), 3)
    np.testing.assert_allclose(pooled[:, 0], [-3 / 4, 1 / 2, -1 / 4])
    np.testing.assert_array_equal(m.pooled_acf(seqs([5.0] * 4, [0.0] * 4), 2), 0.0)


def test_pooled_acf_error():
    # pred pooled r_1 = (1.25 + 1.25) / 10 = 1/4; true pooled r_1 = -7/36 -> 9/36 + 7/36 = 4/9
    assert m.pooled_acf_error(seqs(RAMP, RAMP), seqs(RAMP, ALT), max_lag=1) == pytest.approx(4 / 9)
    # swapping which sequence is which leaves the split's pooled ACF unchanged ...
    assert m.pooled_acf_error(seqs(RAMP, ALT), seqs(ALT, RAMP), max_lag=2) == pytest.approx(0.0)
    # ... while each sequence is 0.9 off (test_acf_error_per_sequence)
    per_seq = m.acf_error_per_sequence(seqs(RAMP, ALT), seqs(ALT, RAMP), max_lag=2)
    np.testing.assert_allclose(per_seq, [0.9, 0.9])


# --- spectra ------------------------------------------------------------------------------------


def test_power_spectrum_cosine():
    # T = 8, f = 2: x = cos(pi t / 2) = 1 0 -1 0 1 0 -1 0; X_2 = 1 + 1 + 1 + 1 = 4 = T/2
    # -> |X_2|^2 / T = 16 / 8 = 2 = T/4, and no energy elsewhere
    t = np.arange(8)
    p = m.power_spectrum(np.cos(2 * np.pi * 2 * t / 8)[None, :, None])
    assert p.shape == (1, 5, 1)  # F = 8 // 2 + 1
    np.testing.assert_allclose(p[0, :, 0], [0, 0, 2, 0, 0], atol=1e-12)


def test_power_spectrum_impulse_is_flat():
    # x = 1 0 0 0 0: removing the mean only changes DC, so X_f = 1 and P_f = 1/5 for f = 1, 2
    p = m.power_spectrum(seqs([1.0, 0.0, 0.0, 0.0, 0.0]))
    np.testing.assert_allclose(p[0, :, 0], [0, 1 / 5, 1 / 5], atol=1e-15)


def test_spectral_error_identical_is_zero(no_warnings):
    x = np.random.default_rng(0).normal(size=(3, 151, 5))
    np.testing.assert_array_equal(m.spectral_error_per_sequence(x, x), 0.0)
    const = np.ones((1, 10, 1))  # P = 0 everywhere: eps keeps log10 finite
    np.testing.assert_array_equal(m.spectral_error_per_sequence(const, const), 0.0)


def test_spectral_error_scale_factor():
    # impulse: P_true = 1/5 in bins 1, 2. Component 0 scaled by 10 -> P_pred = 100 P_true:
    # log10 ratio 2 in both bins; component 1 unscaled -> 0. sqrt((4 + 4 + 0 + 0) / 4) = sqrt(2)
    impulse = np.array([1.0, 0.0, 0.0, 0.0, 0.0])
    true = np.stack([impulse, impulse], axis=-1)[None]  # (1, 5, 2)
    pred = true * np.array([10.0, 1.0])
    d = m.spectral_error_per_sequence(pred, true)
    np.testing.assert_allclose(d, [np.sqrt(2)], rtol=1e-7)  # eps = 2e-9 against P = 0.2
    # one component, scale c: |2 log10 c| whether c > 1 or < 1
    for c in (10.0, 0.5):
        d = m.spectral_error_per_sequence(c * true[..., :1], true[..., :1], eps_rel=0.0)
        np.testing.assert_allclose(d, [abs(2 * np.log10(c))], rtol=1e-12)


def test_spectral_error_floor_hides_round_off_bins():
    # cosine: bins other than f = 2 are round-off (~1e-32). Scaling by 10 moves those too;
    # with the floor they count 0, so only bin 2 of 4 differs: sqrt(2^2 / 4) = 1
    t = np.arange(8)
    true = np.cos(2 * np.pi * 2 * t / 8)[None, :, None]
    assert m.spectral_error_per_sequence(10 * true, true)[0] == pytest.approx(1.0, rel=1e-6)


# --- comparisons and summaries ------------------------------------------------------------------


def test_paired_bootstrap_identical():
    a = np.random.default_rng(1).uniform(size=30)
    r = m.paired_bootstrap(a, a.copy())
    assert r == {"mean_diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 30, "p_a_better": 0.0}


def test_paired_bootstrap_constant_shift():
    b = np.arange(10.0)
    r = m.paired_bootstrap(b + 1, b)  # every difference is exactly 1, so is every resampled mean
    assert (r["mean_diff"], r["ci_low"], r["ci_high"], r["p_a_better"]) == (1.0, 1.0, 1.0, 0.0)


def test_paired_bootstrap_detects_better_strategy():
    rng = np.random.default_rng(2)
    base = rng.uniform(1, 5, size=50)  # per-sample difficulty, shared by both strategies
    a = base + 0.3 * rng.normal(size=50)
    b = base + 1.0 + 0.3 * rng.normal(size=50)  # b is 1 worse on average
    r = m.paired_bootstrap(a, b, seed=3)
    assert r["ci_low"] < r["mean_diff"] < r["ci_high"] < 0
    assert r["p_a_better"] == 1.0
    assert r == m.paired_bootstrap(a, b, seed=3)
    assert r["ci_low"] != m.paired_bootstrap(a, b, seed=4)["ci_low"]


def test_paired_bootstrap_width_is_that_of_the_paired_differences():
    # A known answer: for n normal differences the 95% percentile interval of the resampled
    # means is mean +- 1.96 sd / sqrt(n) to within a few percent, and it is the differences'
    # spread that counts, not the (much larger) spread the two strategies share per sample.
    rng = np.random.default_rng(5)
    n = 400
    shared = rng.uniform(0, 50, n)  # per-sample difficulty, sd about 14
    diff = rng.normal(0.5, 2.0, n)
    r = m.paired_bootstrap(shared + diff, shared, n_boot=4000)
    se = diff.std(ddof=1) / np.sqrt(n)
    assert r["mean_diff"] == pytest.approx(diff.mean(), abs=1e-12)
    assert r["ci_high"] - r["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.08)
    assert (r["ci_low"] + r["ci_high"]) / 2 == pytest.approx(diff.mean(), abs=0.1 * se)
    half = m.paired_bootstrap(shared + diff, shared, n_boot=4000, level=0.5)
    assert half["ci_high"] - half["ci_low"] == pytest.approx(2 * 0.6745 * se, rel=0.1)


def test_paired_bootstrap_ci_covers_the_true_difference():
    # 300 seeded data sets whose true mean difference is 0.3: the 95% interval must hold it in
    # about 95% of them (a too narrow interval covers far less, a too wide one nearly always).
    rng = np.random.default_rng(6)
    covered = 0
    for i in range(300):
        b = rng.uniform(1, 5, 40)
        a = b + rng.normal(0.3, 1.0, 40)
        r = m.paired_bootstrap(a, b, n_boot=1000, seed=i)
        covered += r["ci_low"] <= 0.3 <= r["ci_high"]
    assert 0.90 <= covered / 300 <= 0.985


def test_paired_bootstrap_bad_input():
    with pytest.raises(ValueError, match=r"equal length, got shapes \(3,\) and \(2,\)"):
        m.paired_bootstrap(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="level must be in"):
        m.paired_bootstrap(np.zeros(3), np.zeros(3), level=95)


def test_mean_std():
    # mean 2.5; squared deviations 2.25 0.25 0.25 2.25 sum to 5, / (4 - 1) -> std sqrt(5/3)
    mean, std = m.mean_std([1, 2, 3, 4])
    assert mean == pytest.approx(2.5) and std == pytest.approx(np.sqrt(5 / 3))
    assert m.mean_std([7.0]) == (7.0, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        m.mean_std([])


# --- rollout and physics ------------------------------------------------------------------------


def test_valid_horizon_is_the_first_step_over_the_threshold():
    true = np.zeros((2, 5, 2))
    pred = true.copy()
    pred[0, 3:, 0] = 0.5  # component 0 of spread 1: RMS over 2 components 0.354 > 0.1 at step 3
    # sequence 1 stays within: error 0.1 in both components, scale 1 -> 0.1, not over
    pred[1] += 0.1
    np.testing.assert_allclose(m.valid_horizon(pred, true, np.array([1.0, 1.0])), [3.0, 5.0])
    # in units of a wider spread the same error stays valid throughout
    np.testing.assert_allclose(m.valid_horizon(pred, true, np.array([10.0, 10.0])), [5.0, 5.0])


def test_error_by_window_and_bounds():
    assert m.window_bounds(151) == [(0, 38), (38, 76), (76, 113), (113, 151)]
    assert m.window_bounds(2) == [(0, 1), (1, 2)]  # never an empty window
    true = np.zeros((1, 8, 1))
    pred = np.arange(8.0).reshape(1, 8, 1)  # error = step
    np.testing.assert_allclose(m.error_by_window(pred, true), [0.5, 2.5, 4.5, 6.5])


def test_mean_and_energy_violations():
    x = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    decaying = np.stack([np.sin(x) * 0.9**t for t in range(6)])[None]  # (1, 6, 16): mean 0
    assert m.mean_violations(decaying)[0] == 0 and m.energy_violations(decaying)[0] == 0
    bad = decaying.copy()
    bad[0, 2] += 0.01  # the mean moves at step 2 only
    bad[0, 4] *= 1.5  # the energy rises into step 4 (0.81 * 2.25 > 1), then falls
    np.testing.assert_allclose(m.mean_violations(bad), [1.0])
    np.testing.assert_allclose(m.energy_violations(bad), [1.0])  # the offset at step 2 is small


def test_coverage_and_spread_error_correlation():
    true = np.zeros((1, 4, 1))
    mean = np.array([0.5, 1.5, 2.5, -0.5]).reshape(1, 4, 1)
    std = np.ones((1, 4, 1))
    np.testing.assert_allclose(m.coverage(mean, std, true, 1), [0.5])
    np.testing.assert_allclose(m.coverage(mean, std, true, 2), [0.75])
    assert np.isnan(m.spread_error_correlation(mean, std, true))  # a constant spread says nothing
    wider = np.abs(mean) + 1.0  # spread grows with the error: r = 1
    assert m.spread_error_correlation(mean, wider, true) == pytest.approx(1.0)
