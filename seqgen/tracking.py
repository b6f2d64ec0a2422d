"""Everything seqgen says to MLflow: runs, params, metrics, artifacts, the model and the registry.

The logged model is a pyfunc whose only artifact is seqgen's own bundle (a .pth of tensors and
plain values: state dict, model config, normaliser, data names, split). That avoids both pickled
modules and the pt2 format (which since MLflow 3.14 reloads as a fixed-length, non-trainable
GraphModule): `load_bundle` rebuilds a trainable StreamlinedSequenceGenerator from any model URI,
and the pyfunc generates sequences in original units.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import requests
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema

from seqgen.bundle import Bundle
from seqgen.errors import TrackingError, redact

DEFAULT_EXPERIMENT = "Default"  # MLflow's own, where `mlflow run` puts runs unless told otherwise
MODEL_NAME_IN_RUN = "model"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def check_tracking_store() -> str:
    """Fail fast, before any work, when the configured tracking store cannot be used."""
    uri = mlflow.get_tracking_uri()
    if redact(uri) != uri:  # MLflow prints "View run <name> at: <tracking URI>/..." otherwise
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if uri.startswith(("http://", "https://")):
        try:  # requests takes user:password in the URI as basic auth, as MLflow's client does
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as e:
            reason = type(e).__name__ if e.response is None else f"HTTP {e.response.status_code}"
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}): start it or fix "
                "MLFLOW_TRACKING_URI"
            ) from None
        return uri
    try:  # a database store: opening it also runs its migrations once
        MlflowClient().search_experiments(max_results=1)
    except Exception as e:  # missing driver, unreadable file, bad URI: all mean "cannot use it"
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TrackingError(f"cannot open the MLflow tracking store {uri}: {first_line}") from None
    return uri


# ---- runs -----------------------------------------------------------------------------------


def default_experiment() -> str:
    """Where runs go and where `seqgen compare` looks, by MLflow's own rule, so that `seqgen` and
    `mlflow run` agree: MLFLOW_EXPERIMENT_ID (set by `mlflow run`), else MLFLOW_EXPERIMENT_NAME
    (which `mlflow run` also reads), else MLflow's Default experiment."""
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

    def end(status: str) -> None:  # unless the body already ended it (a paused phase)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run.info.run_id:
            mlflow.end_run(status)

    try:
        yield run
    except KeyboardInterrupt:
        end("KILLED")
        raise
    except BaseException:
        end("FAILED")
        raise
    end("FINISHED")


def log_params(params: dict[str, Any]) -> None:
    """Log the resolved settings. Keys already on the run stay as they are: `mlflow run` logged
    its -P values there (as typed), and a resumed phase logged them when it started."""
    run_id = mlflow.active_run().info.run_id
    existing = MlflowClient().get_run(run_id).data.params
    new = {k: "None" if v is None else str(v) for k, v in params.items() if k not in existing}
    if new:
        mlflow.log_params(new)


def log_metrics(metrics: dict[str, float], step: int) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path)


def end_run(status: str) -> None:
    """End the active run early with `status` (tracked_run's own end is then a no-op)."""
    mlflow.end_run(status)


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


# ---- the model --------------------------------------------------------------------------------


def _requirements() -> list[str]:
    # Written out so log_model skips its seconds-long requirement inference; local version tags
    # (2.13.0+cpu) dropped so another machine resolves its own build. seqgen itself travels as
    # code (code_paths), so the model loads where seqgen is not installed.
    return [f"{p}=={version(p).split('+')[0]}" for p in ("torch", "mlflow", "numpy", "pandas")]


def log_and_register_model(
    bundle_path: Path, registered_name: str, aliases: list[str], version_tags: dict[str, Any]
) -> str:
    """Log the best bundle once as a pyfunc, register it, point `aliases` at it; return version."""
    data = Bundle.load(bundle_path).data
    signature = ModelSignature(
        inputs=Schema([ColSpec("double", name) for name in data.param_names]),
        outputs=Schema(
            [ColSpec("long", "sample"), ColSpec("double", data.step_name)]
            + [ColSpec("double", n) for n in data.component_names]
            + [ColSpec("boolean", "outside_training_range")]
        ),
    )
    with warnings.catch_warnings():  # the signature is given; MLflow still asks for an example
        warnings.filterwarnings("ignore", message=".*input example.*")
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=str(PYFUNC_CODE),
            artifacts={"bundle": str(bundle_path)},
            code_paths=[str(Path(__file__).resolve().parent)],
            signature=signature,
            pip_requirements=_requirements(),
            registered_model_name=registered_name,
        )
    model_version = str(info.registered_model_version)
    client = MlflowClient()
    for alias in aliases:
        client.set_registered_model_alias(registered_name, alias, model_version)
    for key, value in version_tags.items():
        client.set_model_version_tag(registered_name, model_version, key, str(value))
    return model_version


def load_bundle(uri: str, first_phase_hint: str | None = None) -> Bundle:
    """A seqgen bundle from a `models:/` or `runs:/` URI or a local .pth; clear error if missing."""
    hint = f": {first_phase_hint}" if first_phase_hint else ""
    if "://" not in uri and not uri.startswith(("models:/", "runs:/")):
        if not Path(uri).is_file():
            raise TrackingError(f"model file {uri} does not exist{hint}")
        return Bundle.load(uri)
    tmp = Path(tempfile.mkdtemp(prefix="seqgen-model-"))
    try:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        except (MlflowException, OSError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrackingError(f"no model at {uri} ({first_line[:200]}){hint}") from None
        if local.is_file():
            return Bundle.load(local)
        candidates = sorted(local.rglob("*.pth"))
        if not candidates:
            raise TrackingError(f"{uri} holds no seqgen bundle (.pth){hint}")
        return Bundle.load(candidates[0])
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


def model_source(uri: str, bundle_run_id: str | None = None) -> dict[str, str]:
    """Registry name/version, run and experiment a model URI comes from; for a local .pth, the
    run recorded in the bundle when this store has it."""
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
    elif bundle_run_id:
        out["evaluated_run_id"] = bundle_run_id
    if out.get("evaluated_run_id"):
        try:
            out["experiment_id"] = client.get_run(out["evaluated_run_id"]).info.experiment_id
        except MlflowException:  # a .pth trained against another store
            del out["evaluated_run_id"]
    return out


# ---- what a run trained on, and what a registered model is -------------------------------------


def log_dataset(folder: str | Path, fingerprint: str, sizes: dict[str, int]) -> None:
    """The active run's data as an MLflow dataset input: named after the folder, the folder as
    source, the content fingerprint as digest, the split sizes as a small table and as tags.
    The runs table's Dataset column shows it; the data itself is not uploaded."""
    folder = Path(folder).resolve()
    summary = pd.DataFrame({"split": list(sizes), "samples": [float(n) for n in sizes.values()]})
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": a folder
        warnings.simplefilter("ignore")
        dataset = mlflow.data.from_pandas(
            summary, source=str(folder), name=folder.name, digest=fingerprint
        )
    tags = {f"{split}_samples": str(n) for split, n in sizes.items()}
    mlflow.log_input(dataset, context="training", tags=tags)


def model_descriptions(
    bundle: Bundle, name: str, version: str, continued_from: str
) -> tuple[str, str]:
    """(registered model description, version description): what the model generates, its input
    columns and their trained ranges, the phase and what it continued from, how to load it."""
    d = bundle.data
    ranges = list(zip(d.param_names, d.param_ranges, strict=True)) if d.param_ranges else []
    example = {n: [round((lo + hi) / 2, 6)] for n, (lo, hi) in ranges}
    example = example or {n: [0.0] for n in d.param_names}
    params, comps = ", ".join(d.param_names), ", ".join(d.component_names)

    def load(uri: str) -> str:
        return (
            "```python\nimport mlflow, pandas as pd\n"
            f'mlflow.pyfunc.load_model("{uri}").predict(pd.DataFrame({example}))\n```'
        )

    latest = f"models:/{name}@phase-{bundle.phase}"
    model_text = (
        f"seqgen `{bundle.strategy}` ({bundle.preset} preset): generates sequences of "
        f"{d.seq_len} steps of {len(d.component_names)} components ({comps}) from "
        f"{len(d.param_names)} simulation parameters ({params}), free-running, in the data's "
        f"original units.\n\nInput: one row per parameter set, columns {params}; other columns "
        f"are ignored. Output: long format, columns sample, {d.step_name}, {comps}, "
        "outside_training_range. Aliases `phase-N` (latest of any seed) and `phase-N-s<seed>`."
        f"\n\nLoad the latest phase {bundle.phase}:\n\n{load(latest)}"
    )
    span = "; ".join(f"{n} in [{lo:.6g}, {hi:.6g}]" for n, (lo, hi) in ranges)
    parent = continued_from.removeprefix("models:/") or "nothing (new training)"
    version_text = (
        f"Phase {bundle.phase} of `{bundle.strategy}`, seed {bundle.seed}, best validation loss "
        f"{bundle.val_loss:.6g} at epoch {bundle.epoch} (last epoch {bundle.last_epoch}); "
        f"continued from {parent}; run {bundle.run_id}.\n\nTrained on {d.data_dir} (fingerprint "
        f"{d.fingerprint}); parameter ranges of the training split: {span or 'not recorded'}. "
        f"Inputs outside them are answered and flagged (outside_training_range).\n\n"
        f"{load(f'models:/{name}/{version}')}"
    )
    return model_text, version_text


def describe_model(name: str, version: str, bundle: Bundle, continued_from: str) -> None:
    """Set the registry page texts of the model and of this version (model_descriptions)."""
    model_text, version_text = model_descriptions(bundle, name, version, continued_from)
    client = MlflowClient()
    client.update_registered_model(name, description=model_text)
    client.update_model_version(name, version, description=version_text)
