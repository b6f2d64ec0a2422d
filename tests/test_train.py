"""Training phases at smoke scale against a real sqlite store: run contents, hand-off, resume."""

import csv
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from seqgen.config import ConfigError, resolve
from seqgen.model.bundle import Bundle
from seqgen.model.generate import generate_original
from seqgen.runs import tracking
from seqgen.runs.keeper import RunOptions
from seqgen.runs.outputs import COMPONENT_COLUMNS
from seqgen.runs.tracking import TrackingError
from seqgen.training.epochs import PER_EPOCH_METRICS
from seqgen.training.train import train_phase


def settings(strategy, phase, data, **kw):
    return resolve(strategy, phase, "smoke", data_dir=str(data), **kw)


def test_phase_one_then_two_hand_off_through_the_registry(store, smoke_data, tmp_path):
    first = train_phase(settings("combined", 1, smoke_data))
    second = train_phase(settings("combined", 2, smoke_data))
    client = MlflowClient()

    run = client.get_run(second.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "combined-p2-s0"
    assert {k: run.data.tags[k] for k in ("kind", "strategy", "phase", "seed", "preset")} == {
        "kind": "phase",
        "strategy": "combined",
        "phase": "2",
        "seed": "0",
        "preset": "smoke",
    }
    assert len(run.data.tags["dataset_fingerprint"]) >= 16
    assert json.loads(run.data.tags["seqgen.overrides"]) == {"data_dir": str(smoke_data)}
    p = run.data.params
    assert (p["epochs"], p["start_lr"], p["max_lag"], p["alpha"]) == ("2", "0.0005", "15", "0.5")
    assert p["existing_model"] == "models:/seqgen-combined-smoke@phase-1-s0"
    assert run.data.tags["continued_from"] == "models:/seqgen-combined-smoke/1"  # the exact one
    logged = {k for k in client.get_run(second.run_id).data.metrics}
    assert set(PER_EPOCH_METRICS) <= logged
    for key in PER_EPOCH_METRICS:  # global epochs: phase 2 of a 2-epoch preset is 3..4
        assert [m.step for m in client.get_metric_history(second.run_id, key)] == [3, 4], key
    lrs = [m.value for m in client.get_metric_history(second.run_id, "lr")]
    assert lrs == pytest.approx([0.0005, 0.0001])  # linear decay over the phase

    artifacts = {a.path for a in client.list_artifacts(second.run_id)}
    assert {
        "training_metrics.csv",
        "args.json",
        "split.json",
        "normalizer.json",
        "best_model.pth",
        "final_model.pth",
        "best_model_combined.pth",
        "checkpoints",
    } <= artifacts
    checkpoints = {a.path for a in client.list_artifacts(second.run_id, "checkpoints")}
    assert checkpoints == {
        "checkpoints/checkpoint_epoch_3.pth",
        "checkpoints/checkpoint_epoch_4.pth",
        "checkpoints/last_checkpoint.pth",  # every epoch: any interruption can resume
    }

    # the registry hand-off: phase 2 continued from the exact version phase 1 registered
    v1 = client.get_model_version_by_alias("seqgen-combined-smoke", "phase-1")
    v2 = client.get_model_version_by_alias("seqgen-combined-smoke", "phase-2")
    assert (str(v1.version), str(v2.version)) == (first.version, second.version) == ("1", "2")
    assert v2.tags["continued_from"] == "seqgen-combined-smoke/1"
    assert v2.tags["run_id"] == second.run_id and v2.tags["phase"] == "2"
    assert float(v2.tags["val_loss"]) == pytest.approx(second.best_val)

    out = tmp_path / "outputs" / "smoke-s0" / "50mae_50auto_3_4"
    assert {f.name for f in out.iterdir()} >= {
        "best_model.pth",
        "final_model.pth",
        "best_model_combined.pth",
        "checkpoint_epoch_3.pth",
        "checkpoint_epoch_4.pth",
        "training_metrics.csv",
        "args.json",
    }
    with open(out / "training_metrics.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == COMPONENT_COLUMNS and len(rows[0]) == 11
    assert [r[0] for r in rows[1:]] == ["3", "4"]


def test_single_loss_csv_has_the_original_columns(store, smoke_data, tmp_path):
    train_phase(settings("mae", 1, smoke_data))  # the plan: the original's folder name
    path = tmp_path / "outputs" / "smoke-s0" / "100mae_1_2" / "training_metrics.csv"
    header = path.read_text().splitlines()[0]
    assert header == "Epoch,Train Loss,Validation Loss,Test Loss,Learning Rate"


def test_logged_model_is_a_pyfunc_in_original_units_and_a_trainable_module(store, smoke_data):
    result = train_phase(settings("autocorr", 1, smoke_data))
    uri = "models:/seqgen-autocorr-smoke@phase-1"
    frame = pd.DataFrame({"nu": [0.01, 0.1, 0.3], "amplitude": [0.6, 1.0, 1.4]})
    out = mlflow.pyfunc.load_model(uri).predict(frame)
    components = ["pc1", "pc2", "pc3", "pc4", "pc5"]
    assert list(out.columns) == ["sample", "step", *components, "outside_training_range"]
    assert len(out) == 3 * 151
    assert out["step"].tolist()[:3] == [0, 1, 2] and out["sample"].unique().tolist() == [0, 1, 2]

    bundle = tracking.load_bundle(uri)
    model = bundle.build_model()
    expected = generate_original(model, bundle, frame.to_numpy(np.float32))
    np.testing.assert_allclose(out[components].to_numpy().reshape(3, 151, 5), expected, rtol=1e-5)
    # original units: the generated values are the standardised outputs mapped back
    norm = bundle.normalizer
    mean, std = norm.component_mean, norm.component_std
    params_n = (frame.to_numpy(np.float32) - norm.param_mean) / norm.param_std
    raw = model.generate(torch.as_tensor(params_n, dtype=torch.float32), 151).numpy()
    np.testing.assert_allclose(expected, raw * std + mean, rtol=1e-4, atol=1e-5)
    assert not np.allclose(expected, raw, atol=1e-3)

    with pytest.raises(ValueError, match="input row 1 has a missing or non-finite parameter"):
        mlflow.pyfunc.load_model(uri).predict(
            pd.DataFrame({"nu": [0.1, None], "amplitude": [1, 1]})
        )

    model.train()  # reloads as a trainable torch module
    loss = model(torch.zeros(2, 2), torch.zeros(2, 151, 5), 0.5).abs().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert (
        result.run_id
        == MlflowClient().get_model_version("seqgen-autocorr-smoke", "1").tags["run_id"]
    )


def test_resume_equals_uninterrupted(store, smoke_data, tmp_path, monkeypatch):
    full = train_phase(
        settings("mae", 1, smoke_data, epochs=6, outputs_root="a", save_every=2),
    )
    # the same phase in another experiment (in the same one it would be skipped as registered)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "interrupted")
    b = settings("mae", 1, smoke_data, epochs=6, outputs_root="b", save_every=2)
    paused = train_phase(b, RunOptions(stop_at_epoch=3))  # 3 is not a periodic checkpoint epoch
    assert paused.paused_at == 3
    client = MlflowClient()
    assert client.get_run(paused.run_id).info.status == "KILLED"  # left out of comparisons

    # the same variant checkpointing otherwise is refused; other noise is another variant
    other = settings("mae", 1, smoke_data, epochs=6, outputs_root="c")
    with pytest.raises(ConfigError, match=r"differs in: save_every \(2 then, 1 now\)"):
        train_phase(other, RunOptions(resume=True))
    noisier = settings("mae", 1, smoke_data, epochs=6, outputs_root="c", noise_level=0.2)
    with pytest.raises(ConfigError, match=r"no run of mae\+epochs=6\+noise_level=0.2-p1-s0"):
        train_phase(noisier, RunOptions(resume=True))
    assert client.get_run(paused.run_id).info.status == "KILLED"  # untouched by the refusal

    resumed = train_phase(b)  # the same command again takes the phase up
    assert resumed.run_id == paused.run_id  # continued into the same run
    run = client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "completed"
    for key in ("train_loss", "val_loss", "test_loss", "lr", "grad_norm"):
        a = [(m.step, m.value) for m in client.get_metric_history(full.run_id, key)]
        b_ = [(m.step, m.value) for m in client.get_metric_history(resumed.run_id, key)]
        assert [s for s, _ in b_] == [1, 2, 3, 4, 5, 6], key
        assert b_ == a, key
    csv_a = (tmp_path / "a/smoke-s0/mae+epochs=6_1_6/training_metrics.csv").read_text()
    csv_b = (tmp_path / "b/smoke-s0/mae+epochs=6_1_6/training_metrics.csv").read_text()
    assert csv_a == csv_b
    assert resumed.best_val == full.best_val
    again = train_phase(b)  # and once more: registered, nothing to train
    assert (again.status, again.run_id, again.version) == ("skipped", run.info.run_id, "2")


def test_a_phase_taken_up_elsewhere_registers_its_best_model_from_the_store(
    store, smoke_data, tmp_path
):
    """Paused on one machine, finished on another whose folder is empty, with no new best after
    the resume: the best model (epoch 1) comes from the store, not from the first machine's disk."""
    still = dict(epochs=4, start_lr=1e-12, min_lr=1e-12, dropout=0.0, noise_level=0.0)
    paused = train_phase(
        settings("mae", 1, smoke_data, outputs_root="here", **still), RunOptions(stop_at_epoch=2)
    )
    assert (paused.status, paused.best_epoch) == ("paused", 1)
    there = settings("mae", 1, smoke_data, outputs_root="there", **still)
    done = train_phase(there)
    assert (done.status, done.run_id, done.best_epoch) == ("registered", paused.run_id, 1)
    folder = "mae+dropout=0.0+epochs=4+min_lr=1e-12+noise_level=0.0+start_lr=1e-12_1_4"
    first = Bundle.load(tmp_path / "here/smoke-s0" / folder / "best_model.pth")
    registered = tracking.load_bundle(done.model_uri)
    assert registered.epoch == 1
    for name, weights in first.state_dict.items():
        assert torch.equal(weights, registered.state_dict[name]), name


def test_a_phase_continues_from_its_own_seed(store, smoke_data):
    first_s0 = train_phase(settings("mae", 1, smoke_data, epochs=1))
    train_phase(settings("mae", 1, smoke_data, epochs=1, seed=1))  # moves phase-1
    client = MlflowClient()
    model = "seqgen-mae+epochs=1-smoke"
    assert client.get_model_version_by_alias(model, "phase-1").version == 2
    second_s0 = train_phase(settings("mae", 2, smoke_data, epochs=1))
    run = client.get_run(second_s0.run_id)
    assert run.data.tags["continued_from"] == first_s0.model_uri  # seed 0's, not seed 1's
    v = client.get_model_version_by_alias(model, "phase-2-s0")
    assert v.tags["continued_from"] == f"{model}/1"
    with pytest.raises(TrackingError, match=r"run phase 1 of mae\+epochs=1 with seed 2 first"):
        train_phase(settings("mae", 2, smoke_data, epochs=1, seed=2))


def test_early_stopping_on_plateau_is_logged(store, smoke_data):
    s = settings(
        "mae",
        1,
        smoke_data,
        epochs=8,
        start_lr=1e-12,
        min_lr=1e-12,
        dropout=0.0,
        noise_level=0.0,
        early_stopping_patience=2,
    )
    result = train_phase(s)
    assert result.stop_reason == "validation_plateau"
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["stop_reason"] == "validation_plateau"
    # more than 2 epochs without a gain: epoch 1 is the best, 2 and 3 are stale, 4 stops it
    steps = [m.step for m in MlflowClient().get_metric_history(result.run_id, "val_loss")]
    assert steps == [1, 2, 3, 4]


def test_non_finite_loss_skips_the_step():
    from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator
    from seqgen.training.losses import LossResult
    from seqgen.training.step import choose_precision, optimizer_step

    model = StreamlinedSequenceGenerator(ModelConfig(2, 2, 4, 1, 0.0))
    before = [p.detach().clone() for p in model.parameters()]
    nan = lambda pred, y: LossResult(pred.sum(dim=(1, 2, 3)) * float("nan"), {})  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    r = optimizer_step(
        model,
        nan,
        [(torch.zeros(2, 2), torch.zeros(2, 5, 2))],
        opt,
        choose_precision(torch.device("cpu"), False),
        0.5,
        0.0,
        1.0,
    )
    assert not r.finite
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_retrain_trains_a_registered_phase_anew_as_a_new_version(store, smoke_data):
    first = train_phase(settings("mae", 1, smoke_data, epochs=1))
    skipped = train_phase(settings("mae", 1, smoke_data, epochs=1))
    assert (skipped.status, skipped.version, skipped.run_id) == (
        "skipped",
        first.version,
        first.run_id,
    )
    retrained = train_phase(settings("mae", 1, smoke_data, epochs=1), RunOptions(retrain=True))
    assert retrained.status == "registered" and retrained.run_id != first.run_id
    assert int(retrained.version) == int(first.version) + 1
    client, model = MlflowClient(), "seqgen-mae+epochs=1-smoke"
    alias = client.get_model_version_by_alias(model, "phase-1-s0")
    assert str(alias.version) == retrained.version
    assert client.get_model_version(model, first.version).run_id == first.run_id
    # the plain command again finds the new run registered: nothing is trained a third time
    again = train_phase(settings("mae", 1, smoke_data, epochs=1))
    assert (again.status, again.run_id) == ("skipped", retrained.run_id)


def test_a_phase_registered_by_other_code_is_said_when_skipped(store, smoke_data, said):
    first = train_phase(settings("mae", 1, smoke_data, epochs=1))
    said.clear()
    assert train_phase(settings("mae", 1, smoke_data, epochs=1)).status == "skipped"
    assert not any("other seqgen code" in line for line in said)  # same code: nothing to say
    tracking.set_run_tags(first.run_id, {tracking.CODE_DIGEST: "0123456789ab"})
    said.clear()
    assert train_phase(settings("mae", 1, smoke_data, epochs=1)).status == "skipped"
    [line] = [x for x in said if "other seqgen code" in x]
    assert "(0123456789ab; this is " in line and "--retrain" in line


def test_the_step_loop_reads_the_device_once_an_epoch(store, smoke_data, monkeypatch):
    """No host sync per step (issue #26, item 2): two members, 32 training samples in batches
    of 4, 8 steps an epoch; the loop's reads of tensor values do not grow with its steps."""
    from seqgen.training import train
    from seqgen.training.graphs import HostReads
    from seqgen.training.train import train_phases

    reads, real = [], train.train_steps

    def counted(*args):
        with HostReads() as mode:
            out = real(*args)
        reads.append(mode.count)
        return out

    monkeypatch.setattr(train, "train_steps", counted)
    train_phases([settings(s, 1, smoke_data, batch_size=4) for s in ("mae", "combined")])
    assert len(reads) == 2 and max(reads) < 8, reads
