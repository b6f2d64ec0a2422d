"""The model file: round trip, wave-1 files, and every way a file can be wrong (one line each)."""

import dataclasses
import resource
import signal

import numpy as np
import pytest
import torch

from seqgen.data.sequences import Normalizer
from seqgen.data.split import make_split
from seqgen.files import WriteError
from seqgen.model.bundle import Bundle, BundleError, Checkpoint, DataInfo
from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator


def small_bundle(hidden: int = 4) -> Bundle:
    torch.manual_seed(0)
    config = ModelConfig(n_components=2, n_params=1, hidden_size=hidden, num_layers=2, dropout=0.1)
    model = StreamlinedSequenceGenerator(config)
    files = [f"s{i}.csv" for i in range(10)]
    return Bundle(
        model_config=config,
        state_dict=model.state_dict(),
        normalizer=Normalizer.fit(np.random.rand(10, 5, 2), np.random.rand(10, 1)),
        data=DataInfo(
            "step", ("a", "b"), ("nu",), (0.0, 1.0, 2.0, 3.0, 4.0), "f" * 16, "data", ((0.1, 0.9),)
        ),
        split=make_split(files, 0),
        strategy="combined",
        phase=2,
        seed=0,
        preset="smoke",
        epoch=7,
        val_loss=0.25,
        run_id="abc",
        last_epoch=9,
    )


def test_round_trip_rebuilds_the_same_model(tmp_path):
    bundle = small_bundle()
    bundle.save(tmp_path / "m.pth")
    loaded = Bundle.load(tmp_path / "m.pth")
    assert loaded.data == bundle.data and loaded.split == bundle.split
    assert (loaded.epoch, loaded.last_epoch, loaded.strategy) == (7, 9, "combined")
    params = torch.tensor([[0.3], [-1.0]])
    torch.testing.assert_close(
        loaded.build_model().generate(params, 5), bundle.build_model().generate(params, 5)
    )
    assert not loaded.build_model().training  # eval mode: ready to generate


def test_wave_one_files_still_load(tmp_path):
    """Format 1 had no last_epoch, no parameter ranges, and first_epoch inside the settings."""
    old = small_bundle().to_dict() | {"format": "seqgen-bundle-1"}
    del old["last_epoch"]
    del old["data"]["param_ranges"]
    torch.save(old, tmp_path / "old.pth")
    loaded = Bundle.load(tmp_path / "old.pth")
    assert (loaded.last_epoch, loaded.data.param_ranges, loaded.epoch) == (None, None, 7)
    state = {"optimizer": {}, "scaler": {}, "progress": {}, "continued_from": ""}
    torch.save(old | state | {"settings": {"first_epoch": 101}}, tmp_path / "ckpt.pth")
    assert Checkpoint.load(tmp_path / "ckpt.pth").first_epoch == 101


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"PK\x03\x04 not really a zip", "is not a readable seqgen model file"),
        (b"", "is not a readable seqgen model file"),
    ],
)
def test_corrupt_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "best_model.pth"
    path.write_bytes(content)
    with pytest.raises(BundleError, match=f"{path} {message}") as info:
        Bundle.load(path)
    assert "\n" not in str(info.value)


def test_foreign_pth_is_named(tmp_path):
    torch.save(
        StreamlinedSequenceGenerator(small_bundle().model_config).state_dict(),
        tmp_path / "weights.pth",
    )
    with pytest.raises(BundleError, match=r"weights.pth is not a seqgen model file \(format None"):
        Bundle.load(tmp_path / "weights.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(BundleError, match="format 'list'"):
        Bundle.load(tmp_path / "list.pth")
    small_bundle().save(tmp_path / "model.pth")
    with pytest.raises(BundleError, match="is a model, not a checkpoint"):
        Checkpoint.load(tmp_path / "model.pth")


def test_a_write_that_fails_keeps_the_last_good_file(tmp_path):
    """A real write failure (the file-size limit, as a full disk would): one line, the good file
    stays as it was and no temporary file is left."""
    path = tmp_path / "checkpoint.pth"
    small_bundle().save(path)
    before = path.read_bytes()
    bigger = dataclasses.replace(small_bundle(hidden=64), epoch=8)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 1000, hard))
    try:
        with pytest.raises(WriteError, match=f"cannot write {path}: File too large"):
            bigger.save(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
