"""Synthetic data pipeline: Burgers solver physics, PCA algebra, and the files synthesize writes."""

import json
from pathlib import Path

import numpy as np
import pytest

from seqgen import log as seqgen_log
from seqgen.data import synth
from seqgen.data.split import make_split
from seqgen.errors import ConfigError


def fit_pca(snapshots, k, t=None):
    """The PCA synthesize fits, on snapshots (M, n_x) given at once."""
    snapshots = np.asarray(snapshots, dtype=np.float64)
    if snapshots.ndim != 2:
        raise ValueError(f"snapshots must be (M, n_x), got shape {snapshots.shape}")
    moments = synth.SnapshotMoments(snapshots.shape[1])
    moments.add(snapshots)
    return moments.fit(k, synth.grid(snapshots.shape[1]), np.empty(0) if t is None else t)


NU_LO, NU_HI = synth.NU_RANGE
A_LO, A_HI = synth.AMPLITUDE_RANGE
HEADER = "step,pc1,pc2,pc3,pc4,pc5,nu,amplitude"


@pytest.fixture(scope="module")
def extremes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steepest (smallest nu, largest A), smoothest (largest nu, smallest A) and a middle case."""
    nu = np.array([NU_LO, NU_HI, 0.03])
    amplitude = np.array([A_HI, A_LO, 1.0])
    return nu, amplitude, synth.simulate_burgers(nu, amplitude)


def test_simulate_shape_and_initial_snapshot(extremes):
    nu, amplitude, fields = extremes
    assert fields.shape == (3, synth.N_SNAPSHOTS, synth.N_X)
    assert fields.dtype == np.float64
    np.testing.assert_array_equal(fields[:, 0], synth.initial_condition(synth.grid(), amplitude))


def test_mean_is_conserved(extremes):
    fields = extremes[2]
    mean = fields.mean(axis=2)  # (N, T)
    drift = np.abs(mean - mean[:, :1]) / np.abs(mean[:, :1])
    assert drift.max() < 1e-12
    np.testing.assert_allclose(mean[:, 0], synth.MEAN_U, rtol=1e-12)


def test_energy_never_increases(extremes):
    fields = extremes[2]
    energy = 0.5 * (fields**2).mean(axis=2)  # (N, T)
    assert np.all(np.diff(energy, axis=1) <= 1e-14)
    assert np.all(energy[:, -1] < energy[:, 0])


def test_finite_and_maximum_principle(extremes):
    fields = extremes[2]
    assert np.isfinite(fields).all()
    max0 = np.abs(fields[:, 0]).max(axis=1)
    assert np.all(np.abs(fields).max(axis=(1, 2)) <= max0 + 1e-12)
    assert np.all(fields.min(axis=(1, 2)) >= fields[:, 0].min(axis=1) - 1e-12)


def test_small_nu_forms_a_front_and_large_nu_stays_smooth(extremes):
    fields = extremes[2]
    slope = np.abs(np.diff(fields, axis=2)).max(axis=2) / (2 * np.pi / synth.N_X)  # (N, T)
    assert slope[0].max() > 10 * slope[0, 0]  # a shock: far steeper than the initial profile
    assert slope[1].max() == slope[1, 0]  # diffusion wins: never steeper than at t = 0


@pytest.mark.parametrize("nu", [0.1, NU_HI])
def test_first_mode_decays_like_linear_heat_equation(nu):
    # at tiny amplitude Burgers is linear: mode 1 decays like exp(-nu t), the mean only shifts it
    fields = synth.simulate_burgers([nu], [1e-3])[0]
    t = np.linspace(0.0, synth.T_FINAL, synth.N_SNAPSHOTS)
    mode1 = np.abs(np.fft.rfft(fields, axis=1)[:, 1])
    rate = -np.polyfit(t, np.log(mode1), 1)[0]
    assert rate == pytest.approx(nu, rel=0.01)


def test_grid_refinement_converges():
    def on_coarse(n_x: int) -> np.ndarray:
        fields = synth.simulate_burgers([0.1], [1.0], n_x=n_x)[0]
        return fields.reshape(synth.N_SNAPSHOTS, 128, n_x // 128).mean(axis=2)  # cell averages

    coarse, fine, finer = on_coarse(128), on_coarse(256), on_coarse(512)
    assert np.abs(coarse - finer).max() < 0.01  # fields are O(1)
    assert np.abs(fine - finer).max() < 0.5 * np.abs(coarse - finer).max()


def test_sample_does_not_depend_on_its_batch(extremes):
    nu, amplitude, fields = extremes
    alone = synth.simulate_burgers(nu[1:2], amplitude[1:2])
    np.testing.assert_array_equal(alone[0], fields[1])


@pytest.mark.parametrize(
    ("nu", "amplitude", "kwargs", "message"),
    [
        ([0.1, 0.2], [1.0], {}, "equal length"),
        ([0.0], [1.0], {}, "nu must be positive"),
        ([0.1], [1.0], {"n_snapshots": 1}, "n_snapshots >= 2"),
    ],
)
def test_simulate_rejects_bad_input(nu, amplitude, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synth.simulate_burgers(nu, amplitude, **kwargs)


def test_params_in_range_deterministic_and_printable():
    nu, amplitude = synth.burgers_params(1000, np.random.default_rng(3))
    assert nu.shape == amplitude.shape == (1000,)
    assert NU_LO * 0.999 <= nu.min() and nu.max() <= NU_HI * 1.001
    assert A_LO <= amplitude.min() and amplitude.max() <= A_HI
    # log-uniform: both decades of the range are well populated
    assert 0.4 < np.mean(nu < 10**-1.5) < 0.6
    again = synth.burgers_params(1000, np.random.default_rng(3))
    np.testing.assert_array_equal(nu, again[0])
    # what the CSVs print is exactly what was simulated
    assert all(float(f"{v:.6g}") == v for v in np.concatenate([nu, amplitude]))


def test_pca_round_trip_in_span():
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.normal(size=(32, 3)))[0].T  # (3, 32) orthonormal
    data = 2.0 + (rng.normal(size=(500, 3)) * [3.0, 2.0, 1.0]) @ directions  # (500, 32)
    pca = fit_pca(data, k=3)
    np.testing.assert_allclose(pca.reconstruct(pca.project(data)), data, atol=1e-10)
    np.testing.assert_allclose(pca.basis @ pca.basis.T, np.eye(3), atol=1e-12)
    ratio = pca.explained_variance_ratio
    assert np.all(np.diff(ratio) <= 0) and np.all((ratio > 0) & (ratio <= 1))
    assert ratio.sum() == pytest.approx(1.0)
    assert pca.project(data[None, :4]).shape == (1, 4, 3)


def test_pca_matches_svd():
    data = np.random.default_rng(1).normal(size=(300, 16)) @ np.diag(np.arange(16, 0, -1.0))
    pca = fit_pca(data, k=5)
    centred = data - data.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(pca.explained_variance, s[:5] ** 2 / 299, rtol=1e-10)
    np.testing.assert_allclose(pca.explained_variance_ratio, s[:5] ** 2 / (s**2).sum(), rtol=1e-10)
    np.testing.assert_allclose(np.abs(pca.basis @ vt[:5].T), np.eye(5), atol=1e-8)
    np.testing.assert_allclose(pca.mean, data.mean(axis=0), atol=1e-12)


@pytest.mark.parametrize(
    ("snapshots", "k", "message"),
    [(np.zeros(8), 2, r"\(M, n_x\)"), (np.ones((10, 4)), 5, "k must be in 1..4")],
)
def test_fit_pca_rejects_bad_input(snapshots, k, message):
    with pytest.raises(ValueError, match=message):
        fit_pca(snapshots, k=k)


def test_pca_save_load(tmp_path):
    pca = fit_pca(np.random.default_rng(2).normal(size=(50, 8)), k=2, t=np.arange(3.0))
    assert synth.load_pca(tmp_path) is None
    pca.save(tmp_path / synth.PCA_FILE)
    loaded = synth.load_pca(tmp_path)
    for name in ("basis", "mean", "explained_variance", "explained_variance_ratio", "x", "t"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(pca, name))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = synth.synthesize(out, n_samples=40, seed=0, progress=False)
    assert summary["n_samples"] == 40 and summary["out_dir"] == str(out)
    assert len(summary["explained_variance_ratio"]) == 5
    return out


def read_csvs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("sample_*.csv"))}


def test_synthesize_writes_the_documented_files(written):
    names = sorted(p.name for p in written.iterdir())
    assert names == sorted([f"sample_{i:05d}.csv" for i in range(40)] + ["pca.npz", "synth.json"])
    assert [p.name for p in written.parent.iterdir()] == ["data"]  # no temp folder left
    for name, raw in read_csvs(written).items():
        lines = raw.decode().splitlines()
        assert lines[0] == HEADER, name
        rows = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
        assert rows.shape == (151, 8)
        assert [line.split(",")[0] for line in lines[1:]] == [str(i) for i in range(151)]
        assert np.all(rows[:, 6] == rows[0, 6]) and np.all(rows[:, 7] == rows[0, 7])
        assert NU_LO * 0.999 <= rows[0, 6] <= NU_HI * 1.001 and A_LO <= rows[0, 7] <= A_HI
    settings = json.loads((written / "synth.json").read_text())
    assert settings["n_samples"] == 40 and settings["seed"] == 0 and settings["n_x"] == 128
    assert settings["t_final"] == synth.T_FINAL and len(settings["explained_variance_ratio"]) == 5


def test_saved_basis_is_fitted_on_seed_0_training_files(written):
    pca = synth.load_pca(written)
    assert pca.basis.shape == (5, 128) and pca.mean.shape == (128,)
    np.testing.assert_allclose(pca.t, np.linspace(0, synth.T_FINAL, 151))
    files = sorted(p.name for p in written.glob("sample_*.csv"))
    tables = [np.loadtxt(written / f, delimiter=",", skiprows=1) for f in files]
    nu = np.array([t[0, 6] for t in tables])
    amplitude = np.array([t[0, 7] for t in tables])
    fields = synth.simulate_burgers(nu, amplitude)  # (40, 151, 128)
    train = np.sort(make_split(files, 0).indices(files, "train"))
    refit = fit_pca(fields[train].reshape(-1, 128), k=5)
    np.testing.assert_allclose(refit.basis, pca.basis, atol=1e-10)
    # the CSVs hold the projections, to the 6 significant digits printed
    pcs = np.stack([t[:, 1:6] for t in tables])
    np.testing.assert_allclose(pcs, pca.project(fields), rtol=1e-5, atol=1e-6 * np.abs(pcs).max())


def test_same_seed_same_bytes_other_seed_differs(written, tmp_path):
    synth.synthesize(tmp_path / "again", n_samples=40, seed=0, progress=False)
    synth.synthesize(tmp_path / "other", n_samples=40, seed=1, progress=False)
    assert read_csvs(tmp_path / "again") == read_csvs(written)
    assert (tmp_path / "again" / "pca.npz").read_bytes() == (written / "pca.npz").read_bytes()
    other = read_csvs(tmp_path / "other")
    assert all(other[name] != raw for name, raw in read_csvs(written).items())


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "data"
    synth.synthesize(out, n_samples=3, progress=False)
    with pytest.raises(ConfigError, match=f"{out} is not empty: pass --overwrite"):
        synth.synthesize(out, n_samples=5, progress=False)
    assert len(list(out.glob("sample_*.csv"))) == 3
    synth.synthesize(out, n_samples=5, overwrite=True, progress=False)
    assert len(list(out.glob("sample_*.csv"))) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_overwrite_replaces_only_a_folder_synth_made(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("keep me")
    with pytest.raises(ConfigError, match=f"only a folder seqgen synth made; {mine} has no synth"):
        synth.synthesize(mine, n_samples=3, overwrite=True, progress=False)
    made = tmp_path / "made"
    synth.synthesize(made, n_samples=3, progress=False)
    (made / "notes.txt").write_text("mine too")
    with pytest.raises(ConfigError, match=f"{made} also holds notes.txt"):
        synth.synthesize(made, n_samples=3, overwrite=True, progress=False)
    monkeypatch.chdir(made)
    (made / "notes.txt").unlink()
    with pytest.raises(ConfigError, match="never replaces .* it holds the working folder"):
        synth.synthesize(".", n_samples=3, overwrite=True, progress=False)
    assert (mine / "results.csv").read_text() == "keep me"
    assert len(list(made.glob("sample_*.csv"))) == 3


def test_empty_existing_folder_is_filled(tmp_path):
    (tmp_path / "data").mkdir()
    synth.synthesize(tmp_path / "data", n_samples=3, progress=False)
    assert len(list((tmp_path / "data").glob("sample_*.csv"))) == 3


def test_failure_leaves_no_half_written_folder(tmp_path, monkeypatch):
    written_files = []
    write_text = synth._write_text

    def fail_after_three(path, text):
        if len(written_files) == 3:
            raise OSError("disk full")
        write_text(path, text)
        written_files.append(path)

    monkeypatch.setattr(synth, "_write_text", fail_after_three)
    with pytest.raises(ConfigError, match="cannot write .*data: disk full"):
        synth.synthesize(tmp_path / "data", n_samples=10, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temp folder
    assert written_files[0].parent.parent == tmp_path  # the temp folder was beside the target

    # a failed overwrite keeps the old data
    monkeypatch.setattr(synth, "_write_text", write_text)
    synth.synthesize(tmp_path / "data", n_samples=3, progress=False)
    before = read_csvs(tmp_path / "data")
    monkeypatch.setattr(synth, "_write_text", fail_after_three)
    written_files.clear()
    with pytest.raises(ConfigError, match="cannot write .*data: disk full"):
        synth.synthesize(tmp_path / "data", n_samples=10, overwrite=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert read_csvs(tmp_path / "data") == before


def test_rejects_too_few_samples(tmp_path):
    with pytest.raises(ConfigError, match="n_samples must be at least 3"):
        synth.synthesize(tmp_path / "data", n_samples=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_progress_goes_to_stderr(tmp_path, capsys):
    seqgen_log.setup()  # as the CLI does: whatever an earlier test set up, messages go to stderr
    synth.synthesize(tmp_path / "data", n_samples=3, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "simulated 3/3 samples" in captured.err and "wrote 3 samples" in captured.err
