"""load_sequences against the data contract, its cache, and the Normalizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from seqgen.data import sequences as data_module
from seqgen.data.sequences import CACHE_NAME, DataError, Normalizer, SequenceData, load_sequences

HEADER = ["step", "pc1", "pc2", "pc3", "pc4", "pc5", "nu", "amplitude"]


def write_sample(folder: Path, name: str, seed: int, rows: int = 5, k: int = 5, p: int = 2):
    """Write one contract-abiding CSV; return its values (rows, 1 + k + p) as written."""
    rng = np.random.default_rng(seed)
    values = np.empty((rows, 1 + k + p))
    values[:, 0] = np.arange(rows) * 0.5
    values[:, 1 : 1 + k] = rng.normal(size=(rows, k)).round(4)
    values[:, 1 + k :] = rng.uniform(0.1, 2.0, size=p).round(3)
    header = ["step"] + [f"pc{i}" for i in range(1, k + 1)] + [f"par{i}" for i in range(p)]
    if (k, p) == (5, 2):
        header = HEADER
    lines = [",".join(header)] + [",".join(repr(float(v)) for v in row) for row in values]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(lines) + "\n")
    return values


def good_folder(folder: Path, n: int = 4, **kw) -> list[np.ndarray]:
    return [write_sample(folder, f"s{i:02d}.csv", seed=i, **kw) for i in range(n)]


def set_cell(path: Path, row: int, col: int, text: str) -> None:
    """Replace one cell: row is the 1-based data row (0 = header), col 0-based."""
    lines = path.read_text().splitlines()
    cells = lines[row].split(",")
    cells[col] = text
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def load_error(folder: Path, **kw) -> str:
    with pytest.raises(DataError) as info:
        load_sequences(folder, use_cache=False, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_good_folder_loads_shapes_values_and_names(tmp_path):
    written = good_folder(tmp_path, n=3)
    d = load_sequences(tmp_path)
    assert d.files == ("s00.csv", "s01.csv", "s02.csv")
    assert (d.n_samples, d.seq_len, d.n_components, d.n_params) == (3, 5, 5, 2)
    assert d.components.dtype == np.float32 and d.params.dtype == np.float32
    assert d.steps.dtype == np.float64
    np.testing.assert_array_equal(d.steps, written[0][:, 0])
    for i, w in enumerate(written):
        np.testing.assert_array_equal(d.components[i], w[:, 1:6].astype(np.float32))
        np.testing.assert_array_equal(d.params[i], w[0, 6:].astype(np.float32))
    assert d.step_name == "step"
    assert d.component_names == ("pc1", "pc2", "pc3", "pc4", "pc5")
    assert d.param_names == ("nu", "amplitude")


def test_files_are_read_in_sorted_name_order(tmp_path):
    values = {
        name: write_sample(tmp_path, name, seed)
        for seed, name in enumerate(["b.csv", "c.csv", "a.csv"])
    }
    (tmp_path / "notes.txt").write_text("not data")
    d = load_sequences(tmp_path, use_cache=False)
    assert d.files == ("a.csv", "b.csv", "c.csv")
    np.testing.assert_array_equal(d.params[0], values["a.csv"][0, 6:].astype(np.float32))


def test_windows_line_endings_bom_quoted_header_and_trailing_blank_lines_are_fine(tmp_path):
    written = good_folder(tmp_path, n=2)
    path = tmp_path / "s01.csv"
    lines = path.read_text().splitlines()
    lines[0] = ",".join(f'"{h}"' for h in HEADER)
    path.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(lines) + "\r\n\r\n").encode())
    d = load_sequences(tmp_path, use_cache=False)
    assert d.component_names[0] == "pc1"
    np.testing.assert_array_equal(d.components[1], written[1][:, 1:6].astype(np.float32))


def test_custom_component_and_param_counts(tmp_path):
    good_folder(tmp_path, n=2, k=3, p=1)
    d = load_sequences(tmp_path, n_components=3, n_params=1)
    assert d.components.shape == (2, 5, 3) and d.params.shape == (2, 1)
    assert d.param_names == ("par0",)
    message = load_error(tmp_path)  # the defaults expect 8 columns
    assert "all 2 files" in message and "5 columns, expected 8" in message
    assert "n_components" in message


def test_missing_empty_and_csv_less_folders(tmp_path):
    assert "'" + str(tmp_path / "nope") + "' does not exist" in load_error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "is empty" in load_error(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("hi")
    message = load_error(tmp_path / "other")
    assert "no CSV files" in message and "readme.txt" in message


def bad_wrong_columns(folder: Path) -> None:
    path = folder / "s01.csv"
    path.write_text("\n".join(line.rsplit(",", 1)[0] for line in path.read_text().splitlines()))


def bad_wrong_rows(folder: Path) -> None:
    write_sample(folder, "s01.csv", seed=1, rows=4)


def bad_ragged_row(folder: Path) -> None:
    set_cell(folder / "s01.csv", 2, 7, "1.0,2.0")


def bad_blank_line_inside(folder: Path) -> None:
    path = folder / "s01.csv"
    lines = path.read_text().splitlines()
    lines[2] = ""
    path.write_text("\n".join(lines) + "\n")


def bad_header_names(folder: Path) -> None:
    set_cell(folder / "s01.csv", 0, 6, "mu")


def bad_duplicate_name(folder: Path) -> None:
    set_cell(folder / "s01.csv", 0, 2, "pc1")


def bad_headerless(folder: Path) -> None:
    path = folder / "s01.csv"
    path.write_text("\n".join(path.read_text().splitlines()[1:]) + "\n")


def bad_empty_file(folder: Path) -> None:
    (folder / "s01.csv").write_text("")


def bad_header_only(folder: Path) -> None:
    (folder / "s01.csv").write_text(",".join(HEADER) + "\n")


def bad_not_utf8(folder: Path) -> None:
    (folder / "s01.csv").write_bytes(b"step,pc\xe9\n")


def bad_dangling_link(folder: Path) -> None:
    (folder / "s01.csv").unlink()
    (folder / "s01.csv").symlink_to(folder / "gone.csv")


@pytest.mark.parametrize(
    ("breaker", "expected"),
    [
        (bad_wrong_columns, ["s01.csv: 7 columns, expected 8 (step + 5 components + 2 params)"]),
        (bad_wrong_rows, ["s01.csv: 4 rows, expected 5"]),
        (bad_ragged_row, ["s01.csv row 2: has 9 values, expected 8"]),
        (bad_blank_line_inside, ["s01.csv row 2: is empty"]),
        (bad_header_names, ["s01.csv: header differs", "column 7 is named 'mu', not 'nu'"]),
        (bad_duplicate_name, ["s01.csv: column name 'pc1' appears twice in the header"]),
        (bad_headerless, ["s01.csv: has no header row"]),
        (bad_empty_file, ["s01.csv: the file is empty"]),
        (bad_header_only, ["s01.csv: has a header but no data rows"]),
        (bad_not_utf8, ["s01.csv: is not UTF-8 text"]),
        (bad_dangling_link, ["s01.csv: cannot be read"]),
    ],
)
def test_each_file_problem_names_the_file_and_what_is_wrong(tmp_path, breaker, expected):
    good_folder(tmp_path, n=4)
    breaker(tmp_path)
    message = load_error(tmp_path)
    assert message.startswith(str(tmp_path / "s01.csv"))
    for part in expected:
        assert part in message


@pytest.mark.parametrize(
    ("row", "col", "text", "expected"),
    [
        (3, 3, "abc", "row 3, column 'pc3': 'abc' is not a number"),
        (2, 1, "", "row 2, column 'pc1': value is empty"),
        (4, 2, "nan", "row 4, column 'pc2': 'nan' is NaN"),
        (5, 5, "-inf", "row 5, column 'pc5': '-inf' is infinite"),
        (3, 6, "0.123", "row 3, column 'nu': parameter changes within the file ("),
        (3, 0, "0.5", "row 3, column 'step': step does not increase (0.5 then 0.5)"),
    ],
)
def test_each_bad_value_names_file_row_and_column(tmp_path, row, col, text, expected):
    good_folder(tmp_path, n=3)
    set_cell(tmp_path / "s02.csv", row, col, text)
    assert load_error(tmp_path).startswith(f"{tmp_path / 's02.csv'} {expected}")


def test_several_bad_files_are_reported_together_with_a_count(tmp_path):
    good_folder(tmp_path, n=7)
    for i in (1, 2, 4, 5, 6):
        set_cell(tmp_path / f"s{i:02d}.csv", 2, 3, "x")
    message = load_error(tmp_path)
    assert message.startswith(f"5 of 7 files in '{tmp_path}' break the data contract: ")
    assert "s01.csv row 2, column 'pc3': 'x' is not a number; s02.csv" in message
    assert "s04.csv" in message and "s05.csv" not in message
    assert message.endswith("... and 2 more files")


def test_cache_is_written_used_and_invalidated_by_a_changed_file(tmp_path, monkeypatch):
    good_folder(tmp_path, n=3)
    first = load_sequences(tmp_path)
    assert (tmp_path / CACHE_NAME).is_file()

    def no_reading(*args, **kwargs):
        raise AssertionError("the CSVs were read although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(data_module, "_read_folder", no_reading)
        again = load_sequences(tmp_path)
    np.testing.assert_array_equal(again.components, first.components)
    np.testing.assert_array_equal(again.params, first.params)
    np.testing.assert_array_equal(again.steps, first.steps)
    assert (again.files, again.fingerprint) == (first.files, first.fingerprint)
    assert again.component_names == first.component_names

    path = tmp_path / "s01.csv"
    set_cell(path, 1, 1, "42.5")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = load_sequences(tmp_path)
    assert changed.components[1, 0, 0] == 42.5
    assert changed.fingerprint != first.fingerprint
    with monkeypatch.context() as m:  # and the rebuilt cache holds the new value
        m.setattr(data_module, "_read_folder", no_reading)
        assert load_sequences(tmp_path).components[1, 0, 0] == 42.5


def test_other_settings_or_a_new_file_do_not_reuse_the_cache(tmp_path):
    good_folder(tmp_path, n=3)
    load_sequences(tmp_path)
    assert "all 3 files" in load_error(tmp_path, n_components=4, n_params=2)
    write_sample(tmp_path, "s99.csv", seed=99)
    assert load_sequences(tmp_path).n_samples == 4


def test_corrupt_cache_is_rebuilt(tmp_path):
    written = good_folder(tmp_path, n=2)
    load_sequences(tmp_path)
    (tmp_path / CACHE_NAME).write_bytes(b"PK\x03\x04 not really a zip")
    d = load_sequences(tmp_path)
    np.testing.assert_array_equal(d.components[0], written[0][:, 1:6].astype(np.float32))
    with np.load(tmp_path / CACHE_NAME) as z:
        assert z["components"].shape == (2, 5, 5)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_read_only_data_folder_caches_under_xdg_cache_home(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    good_folder(data_dir, n=2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data_module.os, "access", lambda path, mode: False)
    load_sequences(data_dir)
    assert not (data_dir / CACHE_NAME).exists()
    assert len(list((tmp_path / "xdg" / "seqgen").glob("*.npz"))) == 1


def test_use_cache_false_writes_no_cache(tmp_path):
    good_folder(tmp_path, n=2)
    load_sequences(tmp_path, use_cache=False)
    assert not (tmp_path / CACHE_NAME).exists()


def test_fingerprint_follows_content_not_location_or_mtime(tmp_path):
    for folder in ("a", "b"):
        good_folder(tmp_path / folder, n=3)
    os.utime(tmp_path / "b" / "s00.csv", ns=(0, 10**9))
    a, b = load_sequences(tmp_path / "a"), load_sequences(tmp_path / "b")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    set_cell(tmp_path / "b" / "s02.csv", 3, 4, "7.25")
    assert load_sequences(tmp_path / "b").fingerprint != a.fingerprint


def test_subset_takes_rows_and_keeps_the_whole_fingerprint(tmp_path):
    good_folder(tmp_path, n=4)
    d = load_sequences(tmp_path)
    s = d.subset(np.array([3, 1]))
    assert s.files == ("s03.csv", "s01.csv") and s.n_samples == 2
    np.testing.assert_array_equal(s.components, d.components[[3, 1]])
    np.testing.assert_array_equal(s.params, d.params[[3, 1]])
    assert s.fingerprint == d.fingerprint
    assert d.subset(np.array([True, False, False, True])).files == ("s00.csv", "s03.csv")


def test_from_arrays_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="inconsistent"):
        SequenceData.from_arrays(
            ["a.csv"], np.arange(3.0), np.zeros((2, 3, 5)), np.zeros((2, 2)), "step", "abcde", "xy"
        )


def test_normalizer_fits_only_the_arrays_given(tmp_path):
    rng = np.random.default_rng(0)
    components = rng.normal(3.0, 2.0, size=(10, 6, 4)).astype(np.float32)
    params = rng.uniform(0, 5, size=(10, 2)).astype(np.float32)
    train = slice(0, 6)
    norm = Normalizer.fit(components[train], params[train])
    flat = components[train].reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(norm.component_mean, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm.component_std, flat.std(0), rtol=1e-6)
    np.testing.assert_allclose(norm.param_mean, params[train].mean(0), rtol=1e-6)
    z = norm.normalize_components(components[train]).reshape(-1, 4)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-5)
    assert not np.allclose(Normalizer.fit(components, params).component_mean, norm.component_mean)


def test_normalizer_constant_column_is_left_unscaled():
    components = np.ones((3, 4, 2), dtype=np.float32)
    components[..., 1] = np.arange(12).reshape(3, 4)
    norm = Normalizer.fit(components, np.full((3, 1), 0.3, dtype=np.float32))
    assert norm.component_std[0] == 1.0 and norm.param_std[0] == 1.0
    assert np.isfinite(norm.normalize_params(np.array([[0.5]], dtype=np.float32))).all()


def test_normalizer_round_trips_numpy_and_torch():
    rng = np.random.default_rng(1)
    components = rng.normal(-1.0, 5.0, size=(5, 7, 3)).astype(np.float32)
    norm = Normalizer.fit(components, rng.normal(size=(5, 2)).astype(np.float32))
    z = norm.normalize_components(components)
    assert isinstance(z, np.ndarray) and z.dtype == np.float32
    np.testing.assert_allclose(norm.denormalize_components(z), components, rtol=1e-5, atol=1e-5)
    t = torch.from_numpy(components)
    zt = norm.normalize_components(t)
    assert isinstance(zt, torch.Tensor) and zt.dtype == torch.float32
    np.testing.assert_allclose(zt.numpy(), z, rtol=1e-6, atol=1e-6)
    back = norm.denormalize_components(zt.double())
    assert back.dtype == torch.float64
    np.testing.assert_allclose(back.numpy(), components, rtol=1e-5, atol=1e-5)
    pt = norm.normalize_params(torch.zeros(4, 2))
    np.testing.assert_allclose(pt.numpy()[0], -norm.param_mean / norm.param_std, rtol=1e-6)


def test_normalizer_dict_round_trip_is_json_and_weights_only_safe(tmp_path):
    rng = np.random.default_rng(2)
    norm = Normalizer.fit(rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 2)))
    d = json.loads(json.dumps(norm.to_dict()))
    torch.save(norm.to_dict(), tmp_path / "n.pt")
    d_torch = torch.load(tmp_path / "n.pt", weights_only=True)
    for back in (Normalizer.from_dict(d), Normalizer.from_dict(d_torch)):
        for name in ("component_mean", "component_std", "param_mean", "param_std"):
            np.testing.assert_array_equal(getattr(back, name), getattr(norm, name))
            assert getattr(back, name).dtype == np.float32
    with pytest.raises(ValueError, match="param_std"):
        Normalizer.from_dict({k: v for k, v in d.items() if k != "param_std"})
