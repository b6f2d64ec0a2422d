"""Baselines: the mean and the inverse-distance weights by hand, what knn reproduces and which k
it picks, what the direct network learns and when it stops, and every bad input's message."""

import time

import numpy as np
import pytest
import torch

from seqgen.data.sequences import SequenceData
from seqgen.data.split import Split
from seqgen.errors import ConfigError, DataError, SeqgenError
from seqgen.evaluation.baselines import (
    BASELINES,
    DirectSettings,
    baseline_version,
    fit_baseline,
    fit_direct,
    fit_knn,
    fit_mean,
    idw_weights,
    knn_candidates,
    sequence_basis,
)

# Small enough for a test to run in a second or two; the defaults are for the real data.
QUICK = DirectSettings(hidden=64, layers=2, lr=3e-3, batch_size=32, max_epochs=300, patience=20)


def _mae(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def smooth_family(params: np.ndarray, t: int = 16) -> np.ndarray:
    """A smooth toy family: params (N, 2) in [0, 1]^2 -> (N, t, 2) sequences."""
    s = np.linspace(0.0, 1.0, t)[None, :]
    a, b = params[:, :1], params[:, 1:]
    pc1 = np.sin(2.0 * s + 3.0 * a) * (1.0 + b)
    pc2 = np.exp(-(1.0 + 2.0 * a) * s) - b * s
    return np.stack([pc1, pc2], axis=-1)


def uniform_params(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, 2))


# ---- mean --------------------------------------------------------------------------------------


def test_mean_by_hand():
    train_y = np.array([[[1.0], [2.0], [3.0]], [[3.0], [6.0], [5.0]]])  # (2, 3, 1)
    fitted = fit_mean(np.zeros((2, 1)), train_y, np.zeros((1, 1)), np.zeros((1, 3, 1)))
    pred = fitted.predict(np.array([[0.0], [7.0], [-3.0]]))
    assert pred.shape == (3, 3, 1) and pred.dtype == np.float32
    assert np.array_equal(pred, np.tile(np.array([[2.0], [4.0], [4.0]]), (3, 1, 1)))
    assert fitted.info["val_mae"] == pytest.approx((2 + 4 + 4) / 3)


def test_mean_needs_no_validation_samples():
    fitted = fit_mean(np.zeros((2, 1)), np.ones((2, 3, 1)), np.zeros((0, 1)), np.zeros((0, 3, 1)))
    assert fitted.predict(np.zeros((1, 1))).tolist() == [[[1.0], [1.0], [1.0]]]
    assert "val_mae" not in fitted.info


# ---- knn ---------------------------------------------------------------------------------------


def test_idw_weights_by_hand():
    w = idw_weights(np.array([[1.0, 2.0, 4.0], [0.0, 1.0, 2.0], [0.0, 0.0, 3.0]]))
    np.testing.assert_allclose(w[0], np.array([1.0, 0.5, 0.25]) / 1.75)
    assert w[1].tolist() == [1.0, 0.0, 0.0]  # an exact match takes all the weight
    assert w[2].tolist() == [0.5, 0.5, 0.0]  # two exact matches share it


def test_knn_inverse_distance_by_hand_on_a_1d_toy():
    # Standardising scales every distance by the same factor, so the weights are those of the
    # raw distances.
    train_p = np.array([[0.0], [1.0], [3.0]])
    train_y = np.array([0.0, 10.0, 30.0])[:, None, None] * np.ones((1, 2, 1))  # (3, 2, 1)
    fitted = fit_knn(train_p, train_y, train_p, train_y, candidates=[2])
    pred = fitted.predict(np.array([[0.25], [2.0], [1.0]]))[:, 0, 0]
    # 0.25: neighbours 0 (d 0.25, w 4) and 1 (d 0.75, w 4/3): (4 * 0 + 4/3 * 10) / (16/3) = 2.5
    # 2.0: neighbours 1 and 3 at d 1 each: 20; 1.0: an exact match: 10
    np.testing.assert_allclose(pred, [2.5, 20.0, 10.0], rtol=1e-6)
    assert fitted.info["k"] == 2


def test_knn_reproduces_training_samples_exactly():
    rng = np.random.default_rng(0)
    train_p, train_y = rng.normal(size=(50, 2)), rng.normal(size=(50, 7, 3)).astype(np.float32)
    fitted = fit_knn(train_p, train_y, rng.normal(size=(10, 2)), rng.normal(size=(10, 7, 3)))
    assert np.array_equal(fitted.predict(train_p), train_y)


def test_knn_interpolates_a_linear_family():
    grid = np.stack(np.meshgrid(np.linspace(0, 1, 21), np.linspace(0, 1, 21)), -1).reshape(-1, 2)
    profile = np.linspace(1.0, 2.0, 8)[None, :, None]  # (1, T, 1)

    def family(p):
        return (2.0 * p[:, :1] - 3.0 * p[:, 1:])[:, None, :] * profile  # (N, T, 1)

    rng = np.random.default_rng(1)
    val_p = rng.uniform(size=(40, 2))
    test_p = rng.uniform(0.1, 0.9, (40, 2))  # interior: interpolation, not extrapolation
    knn = fit_knn(grid, family(grid), val_p, family(val_p))
    mean = fit_mean(grid, family(grid), val_p, family(val_p))
    knn_err = _mae(knn.predict(test_p), family(test_p))
    # IDW is not exact on a linear function, but close on a grid of spacing 0.05
    assert knn_err < 0.03 * _mae(mean.predict(test_p), family(test_p))
    assert knn.info["k"] in (2, 4, 8)

    # Distances are in standardised units: a parameter in other units changes nothing.
    unit = np.array([1.0, 1000.0])
    rescaled = fit_knn(grid * unit, family(grid), val_p * unit, family(val_p))
    np.testing.assert_allclose(rescaled.predict(test_p * unit), knn.predict(test_p), rtol=1e-5)


def test_knn_picks_k_1_when_neighbours_differ():
    # Every sample is unrelated to its neighbours; validation sits next to training samples.
    rng = np.random.default_rng(2)
    train_p, train_y = rng.uniform(size=(64, 2)), rng.normal(size=(64, 5, 1))
    val_p = train_p[:16] + 1e-4
    assert fit_knn(train_p, train_y, val_p, train_y[:16]).info["k"] == 1


def test_knn_picks_a_large_k_when_averaging_removes_noise():
    # A slowly varying signal under large independent noise: more neighbours, less noise.
    rng = np.random.default_rng(3)
    train_p, val_p = rng.uniform(size=(256, 1)), rng.uniform(size=(64, 1))

    def signal(p):
        return np.repeat((0.2 * p)[:, :, None], 4, axis=1)  # (N, 4, 1)

    train_y = signal(train_p) + rng.normal(size=(256, 4, 1))
    fitted = fit_knn(train_p, train_y, val_p, signal(val_p))
    assert fitted.info["k"] >= 32
    assert fitted.info["k_tried"] == "1,2,4,8,16,32,64,128,256"


def test_knn_candidates():
    assert knn_candidates(2) == [1, 2]
    assert knn_candidates(800) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert knn_candidates(4400)[-1] == 4096


# ---- direct ------------------------------------------------------------------------------------


def _toy_splits():
    train_p, val_p, test_p = uniform_params(256, 0), uniform_params(64, 1), uniform_params(64, 2)
    return train_p, val_p, test_p


def test_direct_learns_a_smooth_mapping_far_better_than_the_mean():
    train_p, val_p, test_p = _toy_splits()
    args = (train_p, smooth_family(train_p), val_p, smooth_family(val_p))
    direct, mean = fit_direct(*args, seed=0, settings=QUICK), fit_mean(*args)
    truth = smooth_family(test_p)
    assert _mae(direct.predict(test_p), truth) < 0.05 * _mae(mean.predict(test_p), truth)
    # The returned weights are the best validation epoch's, not the last epoch's.
    assert _mae(direct.predict(val_p), args[3]) == pytest.approx(direct.info["val_mae"], rel=1e-5)


def test_direct_stops_early_when_validation_stops_improving():
    # Noise unrelated to the parameters: after fitting the mean there is nothing left to learn,
    # so validation MAE stops improving while training memorises the noise.
    rng = np.random.default_rng(4)
    train_p, val_p = rng.uniform(size=(128, 2)), rng.uniform(size=(32, 2))
    train_y, val_y = rng.normal(size=(128, 8, 2)), rng.normal(size=(32, 8, 2))
    s = DirectSettings(hidden=64, layers=2, lr=3e-3, batch_size=32, max_epochs=1000, patience=10)
    info = fit_direct(train_p, train_y, val_p, val_y, seed=0, settings=s).info
    assert info["stopped_early"] is True
    assert info["epochs"] == info["best_epoch"] + s.patience < s.max_epochs


def test_sequence_basis_spans_the_training_sequences():
    rng = np.random.default_rng(5)
    y = rng.normal(size=(40, 3)) @ rng.normal(size=(3, 12)) + 7.0  # rank 3 about a mean
    mean, basis = sequence_basis(y, modes=5)
    assert basis.shape == (5, 12)  # modes beyond the rank are kept (they carry ~0 variance)
    np.testing.assert_allclose(basis @ basis.T, np.eye(5), atol=1e-12)
    top = basis[:3]
    np.testing.assert_allclose(mean + (y - mean) @ top.T @ top, y, atol=1e-10)
    assert sequence_basis(y[:4], modes=32)[1].shape == (4, 12)  # at most N directions


def test_direct_is_seeded_and_leaves_the_callers_torch_state_alone():
    train_p, val_p, test_p = _toy_splits()
    args = (train_p, smooth_family(train_p), val_p, smooth_family(val_p))
    s = DirectSettings(hidden=32, layers=1, max_epochs=5, patience=5, threads=1)
    torch.set_num_threads(2)
    rng_before = torch.get_rng_state()
    a = fit_direct(*args, seed=0, settings=s).predict(test_p)
    assert torch.equal(torch.get_rng_state(), rng_before) and torch.get_num_threads() == 2
    assert np.array_equal(a, fit_direct(*args, seed=0, settings=s).predict(test_p))
    assert not np.array_equal(a, fit_direct(*args, seed=1, settings=s).predict(test_p))


# ---- the registry ------------------------------------------------------------------------------


def _sequence_data(n: int = 30, t: int = 6) -> SequenceData:
    params = uniform_params(n, 5)
    return SequenceData.from_arrays(
        [f"s{i:03d}.csv" for i in range(n)],
        np.arange(t, dtype=np.float64),
        smooth_family(params, t),
        params,
        "step",
        ["pc1", "pc2"],
        ["nu", "amplitude"],
    )


@pytest.mark.parametrize("name", list(BASELINES))
def test_every_baseline_predicts_whole_sequences_from_a_split(name):
    data = _sequence_data()
    split = Split(data.files[:20], data.files[20:25], data.files[25:], seed=0)
    started = time.perf_counter()
    fitted = fit_baseline(name, data, split)
    wall = time.perf_counter() - started
    pred = fitted.predict(data.params[25:])
    assert fitted.name == name
    assert pred.shape == (5, 6, 2) and pred.dtype == np.float32 and np.isfinite(pred).all()
    # fit_seconds is the time the fit took: inside the wall clock around it, and not nothing
    assert 0 < fitted.info["fit_seconds"] <= wall
    # val_mae is the fitted model's MAE on the validation samples (the ones it chose by)
    val = fitted.predict(data.params[20:25])
    assert fitted.info["val_mae"] == pytest.approx(_mae(val, data.components[20:25]), rel=1e-5)


def test_fit_seconds_covers_the_whole_fit():
    # The direct network's training is nearly all of a fit: fit_seconds must be most of the
    # wall clock around it, not the time of some part of it.
    train_p, val_p, _ = _toy_splits()
    started = time.perf_counter()
    fitted = fit_direct(
        train_p, smooth_family(train_p), val_p, smooth_family(val_p), settings=QUICK
    )
    wall = time.perf_counter() - started
    assert 0.9 * wall <= fitted.info["fit_seconds"] <= wall


# ---- bad input ---------------------------------------------------------------------------------

P, Y = np.zeros((4, 2)), np.zeros((4, 5, 3))  # a valid (N, P), (N, T, K) pair


def _with(a: np.ndarray, index: tuple, value: float) -> np.ndarray:
    a = a.copy()
    a[index] = value
    return a


def _no_val():
    return np.zeros((0, 2)), np.zeros((0, 5, 3))


BAD_FITS = [
    (fit_knn, (P[:1], Y[:1], P, Y), DataError,
     "knn baseline needs at least 2 training samples to choose k, got 1"),
    (fit_knn, (P, Y, *_no_val()), DataError,
     "knn baseline chooses k on the validation split, which is empty"),
    (fit_direct, (P, Y, *_no_val()), DataError,
     "direct baseline early-stops on the validation split, which is empty"),
    (fit_mean, (P[:0], Y[:0], P, Y), DataError, "mean baseline: the training split is empty"),
    (fit_mean, (P[:3], Y, P, Y), DataError,
     "mean baseline: training params must be (N, P) and sequences (N, T, K) with the same N, "
     "got (3, 2) and (4, 5, 3)"),
    (fit_knn, (P, Y, P, Y[..., :2]), DataError,
     "knn baseline: validation shapes (4, 2), (4, 5, 2) do not match training shapes (4, 2), "
     "(4, 5, 3) beyond N"),
    (fit_direct, (P, Y[0], P, Y), DataError,
     "direct baseline: training params must be (N, P) and sequences (N, T, K) with the same N, "
     "got (4, 2) and (5, 3)"),
    (fit_mean, (P, _with(Y, (1, 2, 0), np.nan), P, Y), DataError,
     "mean baseline: training sequences hold 1 non-finite value(s), first at [1, 2, 0]"),
    (fit_knn, (P, Y, _with(P, (3, 1), np.inf), Y), DataError,
     "knn baseline: validation params hold 1 non-finite value(s), first at [3, 1]"),
    (lambda *a: fit_knn(*a, candidates=[1, 5]), (P, Y, P, Y), ConfigError,
     "knn baseline: candidate k must be integers in 1..4 (the training samples), got [1, 5]"),
    (lambda *a: fit_direct(*a, settings=DirectSettings(patience=0)), (P, Y, P, Y), ConfigError,
     "direct baseline: patience must be a positive integer, got 0"),
    (lambda *a: fit_direct(*a, settings=DirectSettings(lr=-1.0)), (P, Y, P, Y), ConfigError,
     "direct baseline: lr must be a positive number, got -1.0"),
]  # fmt: skip


@pytest.mark.parametrize("fit, args, error, message", BAD_FITS)
def test_bad_fit_input(fit, args, error, message):
    with pytest.raises(error) as caught:
        fit(*args)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "params, message",
    [
        (np.zeros((3, 3)), "knn baseline: params must have shape (N, 2), got (3, 3)"),
        (np.zeros(2), "knn baseline: params must have shape (N, 2), got (2,)"),
        (_with(P, (2, 0), np.nan),
         "knn baseline: params hold 1 non-finite value(s), first at [2, 0]"),
    ],
)  # fmt: skip
def test_bad_predict_input(params, message):
    fitted = fit_knn(uniform_params(4, 0), Y, uniform_params(4, 1), Y)
    with pytest.raises(DataError) as caught:
        fitted.predict(params)
    assert str(caught.value) == message


def test_bad_registry_input():
    data = _sequence_data()
    split = Split(data.files[:20], data.files[20:25], data.files[25:], seed=0)
    with pytest.raises(ConfigError, match=r"^unknown baseline 'lstm': use mean, knn, direct$"):
        fit_baseline("lstm", data, split)
    moved = Split(("gone.csv", *data.files[1:20]), split.val, split.test, seed=0)
    with pytest.raises(SeqgenError, match=r"^the saved split names 1 file\(s\) not in the data"):
        fit_baseline("mean", data, moved)


def test_baseline_version_follows_every_setting():
    # the digest an evaluation is found again by: defaults spelt out change nothing
    assert baseline_version("knn") == baseline_version("knn", candidates=None)
    assert baseline_version("knn") != baseline_version("knn", candidates=[1, 2])
    assert baseline_version("direct") == baseline_version("direct", settings=DirectSettings())
    assert baseline_version("direct") != baseline_version("direct", settings=QUICK)
    assert len({baseline_version(n) for n in BASELINES}) == len(BASELINES)
    assert len(baseline_version("mean")) == 16
    with pytest.raises(ConfigError, match="unknown baseline 'nope': use mean, knn, direct"):
        baseline_version("nope")
