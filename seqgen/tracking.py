"""Everything seqgen says to MLflow: runs, params, metrics, artifacts, the model and the registry.

The logged model is a pyfunc whose only artifact is seqgen's own bundle (a .pth of tensors and
plain values: state dict, model config, normaliser, data names, split). That avoids both pickled
modules and the pt2 format (which since MLflow 3.14 reloads as a fixed-length, non-trainable
GraphModule): `load_bundle` rebuilds a trainable StreamlinedSequenceGenerator from any model URI,
and the pyfunc generates sequences in original units.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
import warnings
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema

BUNDLE_FORMAT = "seqgen-bundle-1"
DEFAULT_EXPERIMENT = "seqgen"
MODEL_NAME_IN_RUN = "model"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


class TrackingError(RuntimeError):
    """A tracking store or model that cannot be reached or found; the message says what to do."""


def check_tracking_store() -> str:
    """Fail fast, before any training, when a configured tracking server does not answer."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}): start it or fix "
                "MLFLOW_TRACKING_URI"
            ) from None
    return uri


# ---- runs -----------------------------------------------------------------------------------


def default_experiment() -> str:
    """Where runs go and where `seqgen compare` looks: the experiment `mlflow run` chose
    (MLFLOW_EXPERIMENT_ID), else MLFLOW_EXPERIMENT_NAME, else `seqgen`."""
    if experiment_id := os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return mlflow.get_experiment(experiment_id).name
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


@contextmanager
def tracked_run(
    run_name: str, tags: dict[str, Any], run_id: str | None = None, experiment_id: str | None = None
):
    """One MLflow run: a child when a run is active (pipeline, demo), else top level.

    Under `mlflow run`, MLFLOW_RUN_ID names the run the project launcher made; start_run resumes
    it. `run_id` resumes an interrupted phase's run; `experiment_id` puts an evaluation beside
    the run it evaluates. The run ends FAILED on an exception and KILLED on Ctrl-C, so no
    half-made run is left RUNNING.
    """
    nested = mlflow.active_run() is not None
    if not nested and run_id is None and not os.environ.get("MLFLOW_RUN_ID"):
        if experiment_id:
            mlflow.set_experiment(experiment_id=experiment_id)
        else:
            mlflow.set_experiment(default_experiment())
    run = mlflow.start_run(run_id=run_id, run_name=run_name, nested=nested)
    mlflow.set_tags({"mlflow.runName": run_name, **{k: str(v) for k, v in tags.items()}})
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    except ValueError:
        return a in ("", "None", "''") and b in ("", "None", "''")


def log_params(params: dict[str, Any]) -> None:
    """Log the resolved settings; keys `mlflow run` already logged must agree, not be re-logged."""
    run_id = mlflow.active_run().info.run_id
    existing = MlflowClient().get_run(run_id).data.params
    new = {}
    for key, value in params.items():
        text = "None" if value is None else str(value)
        if key in existing:
            if not _same(existing[key], text):
                raise TrackingError(
                    f"param {key} was logged as {existing[key]!r} but resolves to {text!r}"
                )
            continue
        new[key] = text
    if new:
        mlflow.log_params(new)


def log_metrics(metrics: dict[str, float], step: int) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path)


def set_tags(tags: dict[str, Any]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def code_version() -> str:
    """The git commit of the code that ran (+dirty for uncommitted changes), or 'unknown'."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except OSError:
        return "unknown"
    return commit.stdout.strip() if commit.returncode == 0 else "unknown"


def experiment_name(experiment_id: str) -> str:
    return mlflow.get_experiment(experiment_id).name


def active_run_id() -> str:
    return mlflow.active_run().info.run_id


# ---- the model --------------------------------------------------------------------------------


def _requirements() -> list[str]:
    # Written out so log_model skips its seconds-long requirement inference.
    return [f"{p}=={version(p)}" for p in ("torch", "mlflow", "numpy", "pandas")] + [
        f"seqgen=={version('seqgen')}"
    ]


def log_and_register_model(
    bundle_path: Path, registered_name: str, alias: str, version_tags: dict[str, Any]
) -> str:
    """Log the best bundle once as a pyfunc, register it, point `alias` at it; return version."""
    bundle = read_bundle(bundle_path)
    signature = ModelSignature(
        inputs=Schema([ColSpec("double", name) for name in bundle["data"]["param_names"]]),
        outputs=Schema(
            [ColSpec("long", "sample"), ColSpec("double", bundle["data"]["step_name"])]
            + [ColSpec("double", n) for n in bundle["data"]["component_names"]]
        ),
    )
    with warnings.catch_warnings():  # the signature is given; MLflow still asks for an example
        warnings.filterwarnings("ignore", message=".*input example.*")
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(PYFUNC_CODE),
            artifacts={"bundle": str(bundle_path)},
            signature=signature,
            pip_requirements=_requirements(),
            registered_model_name=registered_name,
        )
    model_version = str(info.registered_model_version)
    client = MlflowClient()
    client.set_registered_model_alias(registered_name, alias, model_version)
    for key, value in version_tags.items():
        client.set_model_version_tag(registered_name, model_version, key, str(value))
    return model_version


def read_bundle(path: Path) -> dict:
    bundle = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise TrackingError(f"{path} is not a seqgen model bundle")
    return bundle


def build_model(bundle: dict):
    from seqgen.model import ModelConfig, StreamlinedSequenceGenerator

    model = StreamlinedSequenceGenerator(ModelConfig(**bundle["model_config"]))
    model.load_state_dict(bundle["state_dict"])
    return model.eval()


def load_bundle(uri: str, first_phase_hint: str | None = None) -> dict:
    """A seqgen bundle from a `models:/` or `runs:/` URI or a local .pth; clear error if missing."""
    hint = f": {first_phase_hint}" if first_phase_hint else ""
    if "://" not in uri and not uri.startswith(("models:/", "runs:/")):
        path = Path(uri)
        if not path.is_file():
            raise TrackingError(f"model file {uri} does not exist{hint}")
        return read_bundle(path)
    tmp = Path(tempfile.mkdtemp(prefix="seqgen-model-"))
    try:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        except (MlflowException, OSError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrackingError(f"no model at {uri} ({first_line[:200]}){hint}") from None
        if local.is_file():
            return read_bundle(local)
        candidates = sorted(local.rglob("*.pth"))
        if not candidates:
            raise TrackingError(f"{uri} holds no seqgen bundle (.pth){hint}")
        return read_bundle(candidates[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def exact_model_uri(uri: str) -> str:
    """models:/name@alias -> models:/name/<the version it points at now>; others unchanged.

    A phase records and loads the exact version, so an alias moved by a run started meanwhile
    cannot change what it continued from."""
    if not (uri.startswith("models:/") and "@" in uri):
        return uri
    name, alias = uri[len("models:/") :].split("@", 1)
    try:
        version = MlflowClient().get_model_version_by_alias(name, alias).version
    except MlflowException:
        return uri  # load_bundle reports the missing model with a hint
    return f"models:/{name}/{version}"


def model_source(uri: str) -> dict[str, str]:
    """Registry name/version, run and experiment a model URI comes from (empty for a .pth)."""
    client = MlflowClient()
    out: dict[str, str] = {}
    if uri.startswith("models:/"):
        ref = uri[len("models:/") :].strip("/")
        if ref.startswith("m-") and "/" not in ref and "@" not in ref:  # a LoggedModel id
            out["evaluated_run_id"] = mlflow.get_logged_model(ref).source_run_id or ""
        else:
            if "@" in ref:
                name, alias = ref.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, number = ref.split("/", 1)
                mv = client.get_model_version(name, number)
            out |= {
                "model_name": name,
                "model_version": str(mv.version),
                "evaluated_run_id": mv.run_id or "",
            }
    elif uri.startswith("runs:/"):
        out["evaluated_run_id"] = uri[len("runs:/") :].split("/", 1)[0]
    if out.get("evaluated_run_id"):
        out["experiment_id"] = client.get_run(out["evaluated_run_id"]).info.experiment_id
    return out
