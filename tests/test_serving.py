"""The registered model as a service (#10): requests it refuses, parameters outside the trained
ranges, the model behind `mlflow models serve`, its dataset input and its registry page."""

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import free_port, subprocess_env, use_store
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from seqgen.config import resolve
from seqgen.data.sequences import load_sequences
from seqgen.model.generate import OUTSIDE_RANGE, InputError, generate_frame
from seqgen.runs import tracking
from seqgen.training.train import train_phase

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
MODEL = "seqgen-mae+epochs=1-smoke"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, smoke_data, migrated_db):
    """A store with mae phases 1 and 2 (one epoch each) registered as seqgen-mae+epochs=1-smoke
    1 and 2."""
    folder = tmp_path_factory.mktemp("served")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second spin-waiting thread only slows them down
    with pytest.MonkeyPatch.context() as mp:
        uri = use_store(folder, migrated_db, mp)
        results = [
            train_phase(
                resolve("mae", phase, "smoke", data_dir=str(smoke_data), epochs=1),
            )
            for phase in (1, 2)
        ]
        yield SimpleNamespace(folder=folder, uri=uri, first=results[0], second=results[1])
        while mlflow.active_run():
            mlflow.end_run()
    torch.set_num_threads(threads)


def inside(bundle) -> pd.DataFrame:
    """Two parameter sets well inside the training ranges."""
    (nu_lo, nu_hi), (a_lo, a_hi) = bundle.data.param_ranges
    return pd.DataFrame(
        {
            "nu": [nu_lo + 0.3 * (nu_hi - nu_lo), nu_hi - 0.1 * (nu_hi - nu_lo)],
            "amplitude": [a_lo + 0.5 * (a_hi - a_lo)] * 2,
        }
    )


# ---- 16: what predict refuses, flags and ignores ----------------------------------------------


def test_predict_refuses_nan_and_empty_requests_in_one_line(registered):
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@phase-1-s0")
    with pytest.raises(ValueError, match=r"^input row 1 has a missing or non-finite parameter "):
        model.predict(pd.DataFrame({"nu": [0.1, 0.2], "amplitude": [1.0, np.nan]}))
    with pytest.raises(ValueError) as refused:
        model.predict(pd.DataFrame({"nu": [], "amplitude": []}))
    assert str(refused.value) == (
        "input has no rows: send one row per parameter set with columns ['nu', 'amplitude']"
    )
    # a missing column or a word for a number: MLflow's own schema check refuses them first
    with pytest.raises(MlflowException, match=r"Model is missing inputs \['amplitude'\]"):
        model.predict(pd.DataFrame({"nu": [0.1]}))
    with pytest.raises(MlflowException, match="Can not safely convert"):
        model.predict(pd.DataFrame({"nu": ["a lot"], "amplitude": [1.0]}))

    # the same checks without MLflow in front (a bundle used directly)
    bundle = tracking.load_bundle(f"models:/{MODEL}@phase-1-s0")
    torch_model = bundle.build_model()
    for frame, message in [
        (
            pd.DataFrame({"nu": [0.1]}),
            "input is missing parameter column(s) ['amplitude']; expected ['nu', 'amplitude']",
        ),
        (
            pd.DataFrame({"nu": ["a lot"], "amplitude": [1.0]}),
            "input columns ['nu', 'amplitude'] must hold numbers",
        ),
        (
            pd.DataFrame({"nu": [0.1, np.inf], "amplitude": [1.0, 1.0]}),
            "input row 1 has a missing or non-finite parameter value (nu)",
        ),
    ]:
        with pytest.raises(InputError) as refused:
            generate_frame(torch_model, bundle, frame)
        assert str(refused.value) == message


def test_parameters_outside_the_trained_ranges_are_flagged_and_extra_columns_ignored(
    registered, smoke_data
):
    bundle = tracking.load_bundle(f"models:/{MODEL}@phase-1-s0")
    data = load_sequences(smoke_data)
    train = data.params[bundle.split.indices(data.files, "train")]
    ranges = [(float(lo), float(hi)) for lo, hi in zip(train.min(0), train.max(0), strict=True)]
    assert list(bundle.data.param_ranges) == ranges  # the training split's, stored in the model

    (nu_lo, nu_hi), (a_lo, a_hi) = ranges
    frame = pd.concat(
        [
            inside(bundle),
            pd.DataFrame({"nu": [nu_lo, nu_lo * 0.5, nu_hi], "amplitude": [a_lo, a_hi, a_hi * 2]}),
        ],
        ignore_index=True,
    )
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@phase-1-s0")
    out = model.predict(frame.assign(sample_id=["a", "b", "c", "d", "e"]))
    flags = out.groupby("sample")[OUTSIDE_RANGE].agg(["min", "max"])
    assert (flags["min"] == flags["max"]).all()  # one flag per sample, on each of its rows
    assert flags["min"].tolist() == [False, False, False, True, True]  # the bounds are inside
    plain = model.predict(frame)
    pd.testing.assert_frame_equal(out, plain)  # the extra column changed nothing

    # a format-1 model does not know its ranges: the same sequences, no flag column
    old = dataclasses.replace(bundle, data=dataclasses.replace(bundle.data, param_ranges=None))
    legacy = generate_frame(old.build_model(), old, frame)
    assert OUTSIDE_RANGE not in legacy
    pd.testing.assert_frame_equal(legacy, plain.drop(columns=OUTSIDE_RANGE))


# ---- 18: the dataset input and the registry page -----------------------------------------------


def test_a_phase_run_logs_its_dataset(registered, smoke_data):
    run = MlflowClient().get_run(registered.first.run_id)
    (found,) = run.inputs.dataset_inputs
    assert found.dataset.name == smoke_data.name
    assert found.dataset.digest == run.data.tags["dataset_fingerprint"]
    assert json.loads(found.dataset.source) == {"uri": str(smoke_data.resolve())}
    tags = {t.key: t.value for t in found.tags}
    assert tags == {
        "mlflow.data.context": "training",
        "train_samples": "32",
        "val_samples": "4",
        "test_samples": "4",
    }


def python_block(text: str) -> list[str]:
    return re.search(r"```python\n(.*?)\n```", text, re.S).group(1).splitlines()


def test_registry_pages_say_what_the_model_is_and_how_to_load_it(registered):
    client = MlflowClient()
    model = client.get_registered_model(MODEL).description
    assert "151 steps of 5 components (pc1, pc2, pc3, pc4, pc5)" in model
    assert "parameters (nu, amplitude)" in model
    version = client.get_model_version(MODEL, "2").description
    bundle = tracking.load_bundle(f"models:/{MODEL}/2")
    (nu_lo, nu_hi), _ = bundle.data.param_ranges
    assert version.startswith("Phase 2 of `mae+epochs=1`, seed 0")
    assert f"continued from {MODEL}/1;" in version
    assert f"nu in [{nu_lo:.6g}, {nu_hi:.6g}]" in version
    first = client.get_model_version(MODEL, "1").description
    assert "continued from nothing (new training)" in first

    # the two lines on the page load the model and generate
    for text, uri in ((model, f"models:/{MODEL}@phase-2"), (version, f"models:/{MODEL}/2")):
        setup, call = python_block(text)
        assert uri in call
        names: dict = {}
        exec(setup, names)
        out = eval(call, names)
        assert len(out) == 151 and not out[OUTSIDE_RANGE].any()


# ---- 17: the model as users serve it ------------------------------------------------------------


@pytest.mark.slow
def test_mlflow_models_serve_answers_as_predict_does(registered):
    with served(f"models:/{MODEL}@phase-1-s0", registered.uri, registered.folder) as url:
        check_served(url)


def check_served(url: str) -> None:
    def post(frame: pd.DataFrame) -> tuple[int, dict]:
        split = json.loads(frame.to_json(orient="split", index=False))
        body = json.dumps({"dataframe_split": split}).encode()
        request = urllib.request.Request(
            url + "/invocations", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    bundle = tracking.load_bundle(f"models:/{MODEL}@phase-1-s0")
    frame = inside(bundle)
    status, answer = post(frame)
    assert status == 200
    answered = pd.DataFrame(answer["predictions"])
    local = mlflow.pyfunc.load_model(f"models:/{MODEL}@phase-1-s0").predict(frame)
    assert list(answered.columns) == list(local.columns)
    np.testing.assert_allclose(
        answered[["pc1", "pc2", "pc3", "pc4", "pc5"]].to_numpy(),
        local[["pc1", "pc2", "pc3", "pc4", "pc5"]].to_numpy(),
        rtol=1e-6,
    )

    for bad, message in [
        (
            pd.DataFrame({"nu": [None], "amplitude": [1.0]}),
            "input row 0 has a missing or non-finite parameter value (nu)",
        ),
        (pd.DataFrame({"nu": [], "amplitude": []}), "input has no rows"),
        (pd.DataFrame({"nu": [0.1]}), "Model is missing inputs ['amplitude']"),
    ]:
        status, answer = post(bad)
        assert (status, answer["error_code"]) == (400, "INVALID_PARAMETER_VALUE"), answer
        assert message in answer["message"]


def predict_served(url: str, frame: pd.DataFrame) -> pd.DataFrame:
    """A served model's predictions for the frame (dataframe_split, as a client sends it)."""
    body = json.dumps({"dataframe_split": json.loads(frame.to_json(orient="split", index=False))})
    request = urllib.request.Request(
        url + "/invocations", body.encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return pd.DataFrame(json.load(answer)["predictions"])


@contextlib.contextmanager
def served(model_uri: str, tracking_uri: str, folder: Path):
    """`mlflow models serve` of a model on 127.0.0.1, up (answering /ping within 180 s); yields
    its URL and stops it and its workers after."""
    port, log_path = free_port(), folder / "serve.log"
    log = open(log_path, "w")
    server = subprocess.Popen(
        [MLFLOW, "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(tracking_uri), cwd=folder,
        start_new_session=True,  # its workers die with it, in stop_group
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"model server did not come up: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        stop_group(server)
        log.close()


def stop_group(proc: subprocess.Popen) -> None:
    """End a process started in its own session and everything it started (uvicorn workers):
    SIGTERM, a grace period, then SIGKILL for whatever is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
