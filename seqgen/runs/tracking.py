"""Everything seqgen says to MLflow: runs, params, metrics, artifacts, the model and the registry.

The logged model is a pyfunc whose only artifact is seqgen's own bundle (a .pth of tensors and
plain values: state dict, model config, normaliser, data names, split). That avoids both pickled
modules and the pt2 format (which since MLflow 3.14 reloads as a fixed-length, non-trainable
GraphModule): `load_bundle` rebuilds a trainable StreamlinedSequenceGenerator from any model URI,
and the pyfunc generates sequences in original units.

Phase runs are addressed by explicit run ids (safe from a background thread or a Ray worker);
the parent runs of pipelines, demos, evaluations and analyses use MLflow's active run of the
calling thread (`tracked_run`), because that is how a run opened by `mlflow run` is taken up.

A store call that fails reaches the caller as a TrackingError of one line, with the URI's
credentials redacted (never the `user:password@` of MLflow's own messages); a server that asks
for credentials, or refuses this user an operation, is said so in so many words. A command that
writes tries the writes it needs first (check_can_log), so a user who may only read is refused
before anything is trained or evaluated.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import mlflow
import pandas as pd
import requests
import sqlalchemy
from mlflow.entities import DatasetInput, InputTag, LoggedModelStatus, Metric, Param, RunTag
from mlflow.environment_variables import (
    MLFLOW_TRACKING_CLIENT_CERT_PATH,
    MLFLOW_TRACKING_INSECURE_TLS,
    MLFLOW_TRACKING_SERVER_CERT_PATH,
)
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from mlflow.utils.credentials import read_mlflow_creds

from seqgen.errors import TrackingError, first_line, redact
from seqgen.model.bundle import Bundle
from seqgen.runs.descriptions import EXPERIMENT_NOTE_HEAD, experiment_text, model_descriptions
from seqgen.runs.faults import kill_point

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "seqgen"  # unless MLFLOW_EXPERIMENT_NAME (or `mlflow run`) says otherwise
MODEL_NAME_IN_RUN = "model"
PACKAGE = Path(__file__).resolve().parent.parent  # seqgen/, shipped with every logged model
PYFUNC_CODE = PACKAGE / "model" / "pyfunc.py"
ENSEMBLE_PYFUNC_CODE = PACKAGE / "model" / "ensemble_pyfunc.py"

# Bookkeeping tags: what seqgen reads back to find, lease and resume a phase run. One prefix, so
# that in `mlflow ui` the tags a person filters on (kind, strategy, phase, seed, preset,
# stop_reason, continued_from, model_version) stand out from them.
PHASE_KEY = "seqgen.phase_key"  # digest of the phase's identity: finds the run on any node
PHASE_SETTINGS = "seqgen.phase_settings"  # the identity itself (JSON): says what differs
PHASE_STATE = "seqgen.phase_state"  # training, trained, registered; lost, abandoned (not taken up)
LEASE_OWNER = "seqgen.lease_owner"  # host:pid:token:table of the process that trains the run now
LEASE_BEAT = "seqgen.lease_beat"  # a counter its holder raises at every renewal (delivery.py)
LEASE_EXPIRES = "seqgen.lease_expires"  # earlier versions' lease (their holder's clock): read only
BEST_MODEL_EPOCH = "seqgen.best_model_epoch"  # the epoch of the best_model.pth in the store
DEVICES = "seqgen.devices"  # where a phase taken up on other hardware trained which epochs
PAUSED_AT = "seqgen.paused_at_epoch"
CODE_DIGEST = "seqgen.code_digest"  # which seqgen code trained it (seqgen/version.py)
VARIANT_DIFFERENCES = "seqgen.variant"  # what a variant's name stands for (JSON, variants.py)
OVERRIDES = "seqgen.overrides"  # the settings the command line changed (JSON)
STUDY_KEY = "seqgen.study_key"  # digest of a study's chains, phases, preset and settings
# Runs made before the prefix carry the same tags without it; they are read, never written.
NOTE = "mlflow.note.content"  # a run's or an experiment's description in `mlflow ui`
RUN_COLOUR = "mlflow.runColor"  # a run's colour in the runs table and charts of `mlflow ui`
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # on a logged model: the versions made from it
CHAIN_KEY = "seqgen.chain_key"  # digest of a chain's identity: finds its run again
# The per-epoch metrics a chain's run carries, stitched across its phases at the global epochs:
# these, and the validation value of every loss term its strategy names (val_<term>).
CHAIN_CURVES = ("val_loss", "train_loss", "lr")


def is_chain_curve(key: str) -> bool:
    """Whether a phase's per-epoch metric is one of its chain's curves: CHAIN_CURVES and
    val_<term> (val_mae, val_autocorr, val_spectral, ...)."""
    return key in CHAIN_CURVES or (key.startswith("val_") and key != "val_loss_teacher_forced")


_LEGACY = {PHASE_KEY, PHASE_SETTINGS, PHASE_STATE, LEASE_OWNER, LEASE_EXPIRES}


def _tag(tags: dict[str, str], name: str, default: str = "") -> str:
    if name in tags:
        return tags[name]
    return tags.get(name.removeprefix("seqgen."), default) if name in _LEGACY else default


# ---- one line for a failed store call ----------------------------------------------------------

_NO_ALIAS = ErrorCode.Name(INVALID_PARAMETER_VALUE)
_HTTP_STATUS = re.compile(r"error code (\d{3}) != 200")


def _status(error: Exception) -> int | None:
    """The HTTP status a tracking server answered, when the error says."""
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return error.response.status_code
    if m := _HTTP_STATUS.search(str(error)):
        return int(m.group(1))
    code = getattr(error, "error_code", "")
    return {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}.get(code)


def redacted_uri() -> str:
    """The tracking URI as it may be printed: its credentials replaced (user:***@host)."""
    return redact(mlflow.get_tracking_uri())


class PermissionRefused(TrackingError):
    """The tracking server knows this user and refuses it an operation (HTTP 403)."""


def store_user() -> str:
    """Who this process is to the tracking server: MLflow's own rule (MLFLOW_TRACKING_USERNAME,
    else ~/.mlflow/credentials), else the user in the URI; "" when nobody."""
    return read_mlflow_creds().username or urlsplit(mlflow.get_tracking_uri()).username or ""


def store_error(
    error: Exception, doing: str, fix: str = "ask its admin for that permission"
) -> TrackingError:
    """A failed store call as one line: who refused what, or what failed and why."""
    uri = redacted_uri()
    status = _status(error)
    if status == 401:
        creds = read_mlflow_creds()
        refused = f" (it refused those of {creds.username})" if creds.password else ""
        return TrackingError(
            f"the tracking server at {uri} needs credentials: set MLFLOW_TRACKING_USERNAME and "
            f"MLFLOW_TRACKING_PASSWORD{refused}"
        )
    if status == 403:
        return PermissionRefused(
            f"the tracking server at {uri} does not let {store_user() or 'this user'} {doing} "
            f"(permission denied): {fix}"
        )
    cause = first_line(root_cause(error))
    return TrackingError(f"the tracking store at {uri} failed to {doing}: {cause}")


def root_cause(error: BaseException) -> BaseException:
    """The database's own error behind MLflow's and SQLAlchemy's wrappers ("attempt to write a
    readonly database", not "raised as a result of Query-invoked autoflush"), else the error."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        if isinstance(link, sqlalchemy.exc.DBAPIError) and link.orig is not None:
            return link.orig
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return error


def _store_call(doing: str):
    """Decorate a function that calls the store: its MLflow and HTTP errors become store_error."""

    def decorate(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (MlflowException, requests.RequestException) as e:
                raise store_error(e, doing) from None

        return call

    return decorate


store_call = _store_call  # for the other module that queries the store (analysis/query.py)

# MLflow retries a failed request for about 4 minutes by default (7 times, backoff 2 s doubling,
# 120 s timeout each). Seqgen's courier has its own retries, which go on through any outage while
# training continues; MLflow's own are bounded (about 14 s), so a delivery thread or a probe is
# never held for minutes (a Courier closes promptly). Values the user set are kept.
BOUNDED_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def check_tracking_store() -> str:
    """Fail fast, before any work, when the configured tracking store cannot be used."""
    uri = mlflow.get_tracking_uri()
    if redact(uri) != uri:  # MLflow prints "View run <name> at: <tracking URI>/..." otherwise
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    for name, value in BOUNDED_RETRIES.items():
        os.environ.setdefault(name, value)
    if uri.startswith(("http://", "https://")):
        try:  # requests takes user:password in the URI as basic auth, as MLflow's client does
            requests.get(uri.rstrip("/") + "/health", timeout=5, **tls()).raise_for_status()
        except requests.RequestException as e:
            reason = type(e).__name__ if e.response is None else f"HTTP {e.response.status_code}"
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}): start it or fix "
                "MLFLOW_TRACKING_URI"
            ) from None
        # /health answers anyone: a read says whether the server wants credentials
        _store_call("read its experiments")(MlflowClient().search_experiments)(max_results=1)
        return uri
    new_file = sqlite_file(uri)
    new_file = new_file if new_file is not None and not new_file.exists() else None
    try:  # a database store: opening it also runs its migrations once
        MlflowClient().search_experiments(max_results=1)
    except Exception as e:  # missing driver, unreadable file, bad URI: all mean "cannot use it"
        raise TrackingError(
            f"cannot open the MLflow tracking store {uri}: {first_line(root_cause(e), 200)}"
        ) from None
    if new_file is not None:  # a mistyped path makes a store (and its folders) silently
        log.warning(
            f"created a new, empty MLflow store {new_file.resolve()} (there was none): set "
            "MLFLOW_TRACKING_URI if you meant another"
        )
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:// tracking URI (None for any other store or in-memory)."""
    if not uri.startswith("sqlite:"):
        return None
    database = sqlalchemy.engine.make_url(uri).database or ""
    if database.startswith("file:"):  # sqlite:///file:PATH?mode=ro&uri=true
        database = urlsplit(database).path
    return Path(database) if database and database != ":memory:" else None


# A tag seqgen never sets: deleting it is a write that changes nothing, authorised as the real
# writes are (update on the experiment, as creating a run; update on the registered model, as
# adding a version).
_PROBE_TAG = "seqgen.write_check"
_MISSING = ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def is_server() -> bool:
    return mlflow.get_tracking_uri().startswith(("http://", "https://"))


def check_can_log(
    exp_id: str | None, models: list[str] | tuple[str, ...] = (), fix: str | None = None
) -> None:
    """Before any work: refuse, in one line (PermissionRefused, naming the user), a user whom
    the tracking server would not let create runs in the experiment or register versions of
    `models`. Each is tried with a write that changes nothing. A model not registered yet is
    created by the phase that registers it (any user may create one, and then owns it). A local
    store has no users: nothing to try."""
    if not is_server():
        return
    client, fix = _client(), fix or "ask its admin for EDIT on it"
    try:
        # An experiment not made yet is made by the command itself, whose maker may log to it.
        if exp_id is not None:
            name = client.get_experiment(exp_id).name
            try:
                client.delete_experiment_tag(exp_id, _PROBE_TAG)
            except MlflowException as e:
                if e.error_code != _MISSING:  # "no such tag": the write itself was let through
                    raise store_error(e, f"create runs in experiment {name!r}", fix) from None
        for model in models:
            try:
                client.get_registered_model(model)
            except MlflowException as e:
                if e.error_code == _MISSING:
                    continue
                raise
            try:
                client.delete_registered_model_tag(model, _PROBE_TAG)
            except MlflowException as e:
                raise store_error(e, f"register versions of the model {model}", fix) from None
    except (MlflowException, requests.RequestException) as e:
        raise store_error(e, "read the experiment and registered models") from None


# What MLflow's client reads from the environment to reach and authenticate to a server.
CLIENT_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)
SECRET_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def client_settings(uri: str) -> dict[str, str]:
    """The tracking URI and everything this process's MLflow client authenticates with
    (environment, else ~/.mlflow/credentials): what a process elsewhere needs to log as this
    user. Secret: never to be printed, logged or passed where others can read it."""
    out = {k: os.environ[k] for k in CLIENT_ENV if os.environ.get(k)}
    creds = read_mlflow_creds()
    if creds.username and creds.password:
        out |= {
            "MLFLOW_TRACKING_USERNAME": creds.username,
            "MLFLOW_TRACKING_PASSWORD": creds.password,
        }
    return out | {"MLFLOW_TRACKING_URI": uri}


PROBE_TIMEOUT = 5.0  # seconds a probe waits for its answer (a loaded server answers slowly)


def tls() -> dict[str, Any]:
    """The TLS options of seqgen's own requests to the server, as MLflow's client takes them
    (mlflow.utils.rest_utils.MlflowHostCreds): a private CA's bundle, no verification, or a
    client certificate, from MLflow's environment variables."""
    server_ca = MLFLOW_TRACKING_SERVER_CERT_PATH.get()
    options: dict[str, Any] = {
        "verify": server_ca if server_ca else not MLFLOW_TRACKING_INSECURE_TLS.get()
    }
    if client_cert := MLFLOW_TRACKING_CLIENT_CERT_PATH.get():
        options["cert"] = client_cert
    return options


def server_is_up(timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the tracking store answers now. For a server, an API read that needs its
    database: GET /health answers while the database behind it is down. Any answer but a server
    error counts (a 404, or a 401/403 that the call itself then reports, is the store answering)."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return True
    creds = read_mlflow_creds()  # MLflow's own rule: the environment, else ~/.mlflow/credentials
    user, password = creds.username, creds.password
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    try:
        answer = requests.get(
            uri.rstrip("/") + "/api/2.0/mlflow/experiments/get",
            params={"experiment_id": "0"},
            timeout=timeout,
            auth=(user, password) if user and password else None,
            headers={"Authorization": f"Bearer {token}"} if token else None,
            **tls(),
        )
    except requests.RequestException:
        return False
    return answer.status_code < 500


def _client() -> MlflowClient:
    return MlflowClient()


# ---- experiments and runs of the calling thread (parents, evaluations, analyses) ---------------


def default_experiment() -> str:
    """Where runs go and where `seqgen compare` looks, so that `seqgen` and `mlflow run` agree:
    MLFLOW_EXPERIMENT_ID (set by `mlflow run`), else MLFLOW_EXPERIMENT_NAME (which `mlflow run`
    also reads), else `seqgen` (also where `mlflow run` of this project puts its runs when told
    nothing: seqgen/runs/launch.py)."""
    if experiment_id := os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return experiment_name(experiment_id)
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


@_store_call("find the experiment")
def existing_experiment_id(name: str | None = None) -> str | None:
    """The id of the experiment seqgen would log to when it exists already, else None (nothing
    is created: a command refused later leaves no empty experiment)."""
    if launcher := os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return launcher
    found = _client().get_experiment_by_name(name or default_experiment())
    return None if found is None else found.experiment_id


@_store_call("find or create the experiment")
def experiment_id(name: str | None = None) -> str:
    """The id of the experiment seqgen logs to (created if missing, and described:
    present_experiment): `mlflow run`'s, else default_experiment()."""
    client = _client()
    if launcher := os.environ.get("MLFLOW_EXPERIMENT_ID"):
        found = client.get_experiment(launcher)
    else:
        name = name or default_experiment()
        found = client.get_experiment_by_name(name)
        if found is None:
            try:
                client.create_experiment(name)
            except MlflowException:
                if client.get_experiment_by_name(name) is None:
                    raise  # not made meanwhile by another process: the store refused
            found = client.get_experiment_by_name(name)
    present_experiment(found)
    return found.experiment_id


# The runs page opens in model-training mode (a first visit opens MLflow 3's GenAI mode), on a
# chart view, as a saved view of the experiment: an experiment tag `mlflow.sharedViewState.<key>`
# holding {name, createdAt, updatedAt, state}, where state is the page's search and display
# settings as JSON (MLflow 3.17's own format, read in its UI; tests/test_ui.py opens both views
# in a browser). Keys left out take the page's defaults.
VIEW_TAG = "mlflow.sharedViewState."
VIEWS = {
    "seqgen-curves": (
        "Curves: every chain, phases stitched",
        {"searchFilter": "tags.kind = 'chain'", "runsHiddenMode": "SHOW_ALL"},
    ),
    "seqgen-test-metrics": (
        "Test metrics: models beside baselines",
        {
            "searchFilter": "tags.kind = 'evaluation' and tags.split = 'test'",
            "runsHiddenMode": "SHOW_ALL",
            # grouping flattens the nesting under chains; one bar per strategy and baseline
            "groupBy": {
                "aggregateFunction": "average",
                "groupByKeys": [
                    {"mode": "tag", "groupByData": "variant"},
                    {"mode": "tag", "groupByData": "baseline"},
                ],
            },
            "chartsSearchFilter": "test_",
        },
    ),
    "seqgen-variants": (
        "Variants: one line per variant, the mean of its seeds",
        {
            "searchFilter": "tags.kind = 'chain'",
            "runsHiddenMode": "SHOW_ALL",
            "groupBy": {
                "aggregateFunction": "average",
                "groupByKeys": [{"mode": "tag", "groupByData": "variant"}],
            },
        },
    ),
}
CURVES_VIEW = "seqgen-curves"
VARIANTS_VIEW = "seqgen-variants"  # the link printed at the end of a sweep


def view_link(experiment: str, view: str = CURVES_VIEW) -> str:
    """The UI route (the part after the server's address) that opens a saved view in
    model-training mode, as charts."""
    query = f"viewStateShareKey={view}&compareRunsMode=CHART&workflowType=machine_learning"
    return f"#/experiments/{experiment}/runs?{query}"


def artifacts_link(experiment: str, run_id: str) -> str:
    return f"#/experiments/{experiment}/runs/{run_id}/artifacts"


def present_experiment(exp, report_run: str | None = None) -> None:
    """What makes an experiment readable in `mlflow ui`, set where missing: the kind
    (custom_model_development), the saved views, and a description of what it holds and how to
    compare (rewritten only while it is seqgen's own; report_run links the latest comparison)."""
    tags, ident = exp.tags, exp.experiment_id
    wanted = {}
    if "mlflow.experimentKind" not in tags:
        wanted["mlflow.experimentKind"] = "custom_model_development"
    now = int(time.time() * 1000)
    for key, (title, state) in VIEWS.items():
        if VIEW_TAG + key not in tags:
            view = {"name": title, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
            wanted[VIEW_TAG + key] = json.dumps(view)
    note = tags.get("mlflow.note.content", "")
    if not note or (report_run and note.startswith(EXPERIMENT_NOTE_HEAD)):
        views = {title: view_link(ident, key) for key, (title, _) in VIEWS.items()}
        report = artifacts_link(ident, report_run) if report_run else None
        wanted["mlflow.note.content"] = experiment_text(views, report)
    for key, value in wanted.items():
        try:
            _client().set_experiment_tag(ident, key, value)
        except MlflowException as e:
            if _status(e) != 403:
                raise
            # A reader: the experiment stays as its admin left it; whether this user may log
            # is check_can_log's to say, in its own words.
            log.debug(f"experiment {ident} not described: {first_line(e)}")
            return


@_store_call("describe the experiment")
def link_report(experiment: str, report_run: str) -> None:
    """The experiment's description links the latest comparison's files (the analysis run)."""
    present_experiment(_client().get_experiment(experiment), report_run)


def browse_lines(experiment: str, view: str = CURVES_VIEW) -> list[str]:
    """How to open the comparison in a saved view: a local store's `mlflow ui` command and its
    link, or the tracking server's own link (credentials never shown)."""
    uri = redact(mlflow.get_tracking_uri())
    link = view_link(experiment, view)
    if uri.startswith(("http://", "https://")):
        return [f"Compare the runs: {uri.rstrip('/')}/{link}"]
    return [
        f"Compare the runs: mlflow ui --backend-store-uri {uri} --port 5000",
        f"  then open http://127.0.0.1:5000/{link}",
    ]


@_store_call("read the experiment")
def experiment_name(experiment_id: str) -> str:
    return mlflow.get_experiment(experiment_id).name


@contextmanager
def tracked_run(
    run_name: str,
    tags: dict[str, Any],
    in_experiment: str | None = None,
    parent: str | None = None,
):
    """One MLflow run in this thread (a demo's, an evaluation, an analysis): a child when a run
    is active, else top level. Under `mlflow run`, MLFLOW_RUN_ID names the run the project
    launcher made; start_run takes it up. `in_experiment` puts an evaluation beside the run it
    evaluates, `parent` nests it under that run instead (an evaluation under its chain). The run
    ends FAILED on an exception and KILLED on Ctrl-C, so no half-made run is left RUNNING.
    """
    active = mlflow.active_run()
    nested = active is not None
    if nested:  # beside its parent: MLflow's own default would be its Default experiment
        where = {"experiment_id": in_experiment or active.info.experiment_id}
    elif launched_by_mlflow_run():  # the launcher's run is taken up where it is
        where = {}
    else:
        where = {"experiment_id": in_experiment or experiment_id()}
    try:
        run = mlflow.start_run(run_name=run_name, nested=nested, **where)
        nest = {"mlflow.parentRunId": parent} if parent else {}
        mlflow.set_tags({"mlflow.runName": run_name, **{k: str(v) for k, v in tags.items()} | nest})
    except (MlflowException, requests.RequestException) as e:
        if mlflow.active_run() is not None and not nested:
            _end_active_run("FAILED", run_name, quiet=True)
        raise store_error(e, f"create the run {run_name}") from None
    try:
        yield run
    except KeyboardInterrupt:
        _end_active_run("KILLED", run_name, quiet=True)
        raise
    except BaseException:
        _end_active_run("FAILED", run_name, quiet=True)
        raise
    _end_active_run("FINISHED", run_name)


def _end_active_run(status: str, run_name: str, quiet: bool = False) -> None:
    """End the thread's active run. On the way out of an error (quiet) a store that fails too
    must not hide that error: the run is left RUNNING and the error goes on."""
    try:
        mlflow.end_run(status)
    except (MlflowException, requests.RequestException) as e:
        if not quiet:
            raise store_error(e, f"end the run {run_name}") from None


def active_run_id() -> str | None:
    """The run a `with tracked_run(...)` block opened in this thread (a pipeline's), if any."""
    run = mlflow.active_run()
    return run.info.run_id if run else None


def launched_by_mlflow_run() -> bool:
    """Whether `mlflow run` made a run for this process to take up (MLFLOW_RUN_ID, until the
    first start_run takes it)."""
    return bool(os.environ.get("MLFLOW_RUN_ID"))


def target_experiment(in_experiment: str | None = None) -> str:
    """The experiment a tracked_run(..., in_experiment) opened now logs to: the active run's
    (it becomes a child), else in_experiment, else experiment_id()."""
    run = mlflow.active_run()
    return run.info.experiment_id if run else in_experiment or experiment_id()


def log_params(params: dict[str, Any]) -> None:
    """log_params_once on the active run."""
    log_params_once(mlflow.active_run().info.run_id, params)


def log_metrics(
    metrics: dict[str, float],
    step: int,
    model_id: str | None = None,
    dataset: tuple[str, str] | None = None,
) -> None:
    """log_metrics_at on the active run."""
    log_metrics_at(mlflow.active_run().info.run_id, metrics, step, model_id, dataset)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """upload to the active run."""
    upload(mlflow.active_run().info.run_id, Path(path), artifact_path)


def log_artifacts(folder: str | Path) -> None:
    """Every file of a folder as artifacts of the active run."""
    run_id = mlflow.active_run().info.run_id
    _store_call("upload artifacts")(_client().log_artifacts)(run_id, str(folder))


def set_tags(tags: dict[str, Any]) -> None:
    """set_run_tags on the active run."""
    set_run_tags(mlflow.active_run().info.run_id, tags)


@_store_call("search runs")
def find_finished_run(exp_id: str, tags: dict[str, Any]) -> dict[str, Any] | None:
    """The newest FINISHED run of the experiment carrying every one of `tags`: its run_id,
    metrics (latest values) and params; None when there is none."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = _client().search_runs(
        [exp_id],
        f"{where} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    return {"run_id": run.info.run_id, "metrics": run.data.metrics, "params": run.data.params}


@_store_call("search runs")
def running_run(exp_id: str, tags: dict[str, Any]) -> str | None:
    """The newest RUNNING run of the experiment carrying every one of `tags`, or None."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = _client().search_runs(
        [exp_id],
        f"{where} and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


# ---- runs by id: phase runs, from any thread, process or Ray worker ---------------------------


@dataclass(frozen=True)
class RunRecord:
    """What the store knows about one phase run."""

    run_id: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    state: str  # training, trained, registered ("" for wave-1 runs)
    owner: str  # host:pid:token:table of the process that holds the lease, or ""
    lease_beat: str  # the lease's counter: it moves while its holder lives
    model_version: str
    code_digest: str  # of the code that trained it ("" for runs made before it was recorded)
    settings: dict[str, Any]  # the identity settings (tag seqgen.phase_settings)


def _record(run) -> RunRecord:
    tags = run.data.tags
    return RunRecord(
        run_id=run.info.run_id,
        status=run.info.status,
        state=_tag(tags, PHASE_STATE),
        owner=_tag(tags, LEASE_OWNER),
        lease_beat=tags.get(LEASE_BEAT) or _tag(tags, LEASE_EXPIRES),  # earlier: moved too
        model_version=tags.get("model_version", ""),
        code_digest=tags.get(CODE_DIGEST, tags.get("code_digest", "")),
        settings=json.loads(_tag(tags, PHASE_SETTINGS, "{}")),
    )


NOT_TAKEN_UP = ("lost", "abandoned")  # runs a phase never goes on in: lost a claim, unreadable


@_store_call("look up what a variant's name stands for")
def variant_records(variant: str, preset: str, phase: int) -> set[tuple[str, str]]:
    """What the runs of this variant name, preset and phase, in any experiment of the store, say
    it stands for (tag seqgen.variant: its differences from the table and its data), each with
    the data folder it was trained on. Per phase: a setting the table changes from phase to
    phase may equal an override in one of them."""
    runs = _client().search_runs(
        [e.experiment_id for e in _client().search_experiments()],
        f"tags.variant = '{variant}' and tags.preset = '{preset}' and tags.phase = '{phase}' "
        "and tags.kind = 'phase'",
        max_results=1000,
    )
    return {
        (r.data.tags[VARIANT_DIFFERENCES], r.data.params.get("data_dir", ""))
        for r in runs
        if VARIANT_DIFFERENCES in r.data.tags
    }


@_store_call("search for the phase's run")
def phase_runs(exp_id: str, phase_key: str) -> list[RunRecord]:
    """Every run of this phase identity, newest first (runs of earlier versions included)."""
    for tag in (PHASE_KEY, PHASE_KEY.removeprefix("seqgen.")):
        runs = _client().search_runs(
            [exp_id],
            f"tags.`{tag}` = '{phase_key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1000,
        )
        if runs:
            return [_record(r) for r in runs]
    return []


def find_phase_run(exp_id: str, phase_key: str) -> RunRecord | None:
    """The latest run of this phase identity that a phase can be in, or None."""
    return next((r for r in phase_runs(exp_id, phase_key) if r.state not in NOT_TAKEN_UP), None)


@_store_call("search runs")
def find_phase_runs_like(exp_id: str, run_name: str) -> list[RunRecord]:
    """Runs of the same strategy, phase and seed under any settings (to say what differs)."""
    runs = _client().search_runs(
        [exp_id],
        f"tags.`mlflow.runName` = '{run_name}' and tags.kind = 'phase'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    return [_record(r) for r in runs]


@_store_call("create a run")
def create_run(exp_id: str, run_name: str, tags: dict[str, Any], parent_run_id: str | None) -> str:
    """A new run; under `mlflow run`, the run its launcher made (MLFLOW_RUN_ID) instead."""
    tags = {k: str(v) for k, v in tags.items()} | {"mlflow.runName": run_name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if launcher and not parent_run_id and not _client().get_run(launcher).data.tags.get("kind"):
        set_run_tags(launcher, tags)
        del os.environ["MLFLOW_RUN_ID"]  # taken: a later start_run must not take it up again
        return launcher
    return _client().create_run(exp_id, run_name=run_name, tags=tags).info.run_id


@_store_call("withdraw a run")
def withdraw_run(run_id: str, state: str, reason: str, status: str = "KILLED") -> None:
    """A run no phase goes on in (NOT_TAKEN_UP): marked, its lease released and ended. A claim
    lost to another process is also deleted (out of the UI and comparisons), unless it is the
    run `mlflow run` made for this process."""
    tags = {PHASE_STATE: state, "stop_reason": reason, LEASE_OWNER: ""}
    set_run_tags(run_id, tags)
    _client().set_terminated(run_id, status)
    if state == "lost" and run_id != os.environ.get("MLFLOW_RUN_ID"):
        _client().delete_run(run_id)


@_store_call("open the chain's run")
def open_run_once(exp_id: str, run_name: str, key: dict[str, str], tags: dict[str, Any]) -> str:
    """The run found by the tags `key` (the newest), taken up again (RUNNING), or a new top-level
    run (create_run: under `mlflow run`, the launcher's). A chain's run, or the parent of a
    split's baselines: one run, however often the command that needs it runs."""
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in key.items())
    found = _client().search_runs(
        [exp_id], where, order_by=["attributes.start_time DESC"], max_results=1
    )
    if not found:
        return create_run(exp_id, run_name, tags | key, None)
    run_id = found[0].info.run_id
    set_run_tags(run_id, tags)
    _client().update_run(run_id, status="RUNNING")
    return run_id


@_store_call("copy a chain's curves")
def copy_curves(source: str, target: str, keys: tuple[str, ...] | None = None) -> int:
    """The steps of `keys` (default: the chain curves `source` has, is_chain_curve) that
    `source` (a phase's run) has and `target` (its chain's run) has not, logged to target: a
    chain's run completed with a phase trained before, or a step whose mirroring an
    interruption cut off. Returns how many values it logged."""
    client, batch = _client(), []
    if keys is None:
        keys = tuple(k for k in client.get_run(source).data.metrics if is_chain_curve(k))
    for key in keys:
        there = {m.step for m in client.get_metric_history(target, key)}
        batch += [m for m in client.get_metric_history(source, key) if m.step not in there]
    for i in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
        part = [Metric(m.key, m.value, m.timestamp, m.step) for m in batch[i : i + 1000]]
        client.log_batch(target, metrics=part)
    return len(batch)


@_store_call("read a run's status")
def run_status(run_id: str) -> str | None:
    """RUNNING, FINISHED, FAILED or KILLED; None for a run the store does not have."""
    try:
        return _client().get_run(run_id).info.status
    except MlflowException as e:
        # a server answers 404; a local store (sqlite, files) raises with the code alone
        if _status(e) == 404 or e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


@_store_call("change a run's status")
def set_run_status(run_id: str, status: str) -> None:
    """RUNNING to take a run up again; FINISHED, FAILED or KILLED to end it."""
    if status == "RUNNING":
        _client().update_run(run_id, status="RUNNING")
    else:
        _client().set_terminated(run_id, status)


@_store_call("set a run's tags")
def set_run_tags(run_id: str, tags: dict[str, Any]) -> None:
    _client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


@_store_call("read a run")
def run_tags(run_id: str) -> dict[str, str]:
    return _client().get_run(run_id).data.tags


@_store_call("read the runs' leases")
def lease_holders(exp_id: str, run_ids: list[str]) -> dict[str, str]:
    """{run: the process that holds its lease, or ""} for runs of one experiment, in one read."""
    ids = ", ".join(f"'{r}'" for r in run_ids)
    runs = _client().search_runs([exp_id], f"attributes.run_id IN ({ids})", max_results=1000)
    return {r.info.run_id: _tag(r.data.tags, LEASE_OWNER) for r in runs}


@_store_call("read a run's params")
def run_params(run_id: str) -> dict[str, str]:
    return _client().get_run(run_id).data.params


@_store_call("log a run's params")
def log_params_once(run_id: str, params: dict[str, Any]) -> None:
    """Log settings not on the run yet: `mlflow run` logged its -P values there, and a resumed
    phase logged them when it started (logging a key again with another value fails)."""
    existing = _client().get_run(run_id).data.params
    new = [
        Param(k, "None" if v is None else str(v)) for k, v in params.items() if k not in existing
    ]
    for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
        _client().log_batch(run_id, params=new[i : i + 100])


@_store_call("log metrics")
def log_metrics_at(
    run_id: str,
    metrics: dict[str, float],
    step: int,
    model_id: str | None = None,
    dataset: tuple[str, str] | None = None,
) -> None:
    """All of one step's metrics in one request, so a step lands whole or not at all. With
    model_id they are also the metrics of that LoggedModel (search_logged_models ranks by them,
    the Models tab shows them), on `dataset` (name, digest) when given."""
    now = int(time.time() * 1000)
    name, digest = dataset or (None, None)
    batch = [Metric(k, float(v), now, step, model_id, name, digest) for k, v in metrics.items()]
    _client().log_batch(run_id, metrics=batch)


MAX_BATCH = 900  # values per log_batch: MLflow takes 1000 entities and 100 tags at most


@_store_call("log a run's records")
def log_steps(run_id: str, steps: list[tuple[dict[str, float], int]], tags: dict[str, Any]) -> int:
    """Many steps' metrics and some tags in one request (a courier's batch: the epochs a
    checkpoint covers), or as few as MLflow's limits of a batch allow, steps in order, each
    step whole in one request. Returns how many steps it sent."""
    now = int(time.time() * 1000)
    tag_list = [RunTag(k, str(v)) for k, v in tags.items()]
    parts: list[list[Metric]] = [[]]
    for metrics, step in steps:
        if parts[-1] and len(parts[-1]) + len(metrics) + len(tag_list) > MAX_BATCH:
            parts.append([])
        parts[-1] += [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i, part in enumerate(parts):
        if part or (tag_list and i == 0):
            _client().log_batch(run_id, metrics=part, tags=tag_list if i == 0 else [])
    return len(steps)


@_store_call("read a run")
def run_view(run_id: str) -> tuple[dict[str, str], dict[str, int]]:
    """A run's tags and the latest step of each of its metrics, in one read. MLflow's RunData
    keeps each key's latest value with its step (the entity RunData._metric_objs, which its own
    to_proto reads; MLflow is pinned)."""
    data = _client().get_run(run_id).data
    return data.tags, {m.key: m.step for m in data._metric_objs}


@_store_call("read a metric's history")
def logged_steps(run_id: str, key: str) -> set[int]:
    return {m.step for m in _client().get_metric_history(run_id, key)}


@_store_call("upload an artifact")
def upload(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    _client().log_artifact(run_id, str(path), artifact_path)


@_store_call("download an artifact")
def download(run_id: str, artifact_path: str, dst: Path) -> Path | None:
    """One artifact of a run into dst, or None when the run has no such artifact."""
    folder, _, name = artifact_path.rpartition("/")
    if name not in {Path(a.path).name for a in _client().list_artifacts(run_id, folder or None)}:
        return None
    return Path(_client().download_artifacts(run_id, artifact_path, str(dst)))


# ---- the model --------------------------------------------------------------------------------


REQUIREMENTS = ("torch", "mlflow", "numpy", "pandas")  # what a logged model needs to load


def _requirements() -> list[str]:
    # Written out so log_model skips its seconds-long requirement inference; local version tags
    # (2.13.0+cpu) dropped so another machine resolves its own build. seqgen itself travels as
    # code (code_paths), so the model loads where seqgen is not installed. MLflow by its module:
    # an offline GPU node has mlflow-skinny, not the mlflow distribution (docs/gpu.md).
    installed = {p: mlflow.__version__ if p == "mlflow" else version(p) for p in REQUIREMENTS}
    return [f"{p}=={v.split('+')[0]}" for p, v in installed.items()]


@_store_call("register the model")
def register_phase_model(
    run_id: str,
    bundle_path: Path,
    name: str,
    aliases: list[str],
    version_tags: dict[str, Any],
    step: int = 0,
) -> str:
    """Log the best bundle as the run's model and register it, once per run (reserve_version,
    then complete_version); returns the version."""
    version, model_id = reserve_version(run_id, name, version_tags)
    complete_version(run_id, bundle_path, name, version, model_id, aliases, version_tags, step)
    return version


_MADE: set[tuple[str, str]] = set()  # (store, registered model) made or found: not made again


@_store_call("make the run's model")
def create_run_model(
    run_id: str, experiment: str, params: dict[str, Any], tags: dict[str, Any], look: bool = False
) -> str:
    """A new, still empty LoggedModel of a run this process made, with its params and tags: the
    model reserve_version makes a version of when the phase ends. look: first look for one
    this run has (a call tried before, whose answer was lost), so none is made twice."""
    client = _client()
    if look:
        return _run_model(client, run_id)
    return client.create_logged_model(
        experiment,
        name=MODEL_NAME_IN_RUN,
        source_run_id=run_id,
        params={k: str(v) for k, v in params.items()},
        tags={k: str(v) for k, v in tags.items()},
    ).model_id


@_store_call("register the model")
def reserve_version(
    run_id: str, name: str, version_tags: dict[str, Any], model_id: str | None = None
) -> tuple[str, str]:
    """The version of `name` this run's model is registered as, and its LoggedModel's id: the
    one this run registered before (a rerun after a failure), else a new version made from the
    run's still empty LoggedModel (models:/m-<id>), with its tags. A few quick calls, so the
    next phase can record its parent's exact version while complete_version, which takes
    seconds, lands in the background. model_id: the LoggedModel of a run this process made
    (create_run_model, in the background while it trained), which has no version yet: nothing
    is looked for. No fluent run state is used, so this works from any thread or process."""
    client = _client()
    if model_id is None:
        mine = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if mine:
            first = min(mine, key=lambda v: int(v.version))
            return str(first.version), (first.source or "").removeprefix("models:/")
        model_id = _run_model(client, run_id)
    kill_point("model-logged")
    if (mlflow.get_tracking_uri(), name) not in _MADE:
        try:
            client.create_registered_model(name)
        except MlflowException:  # it exists (made by an earlier phase or another process)
            pass
        _MADE.add((mlflow.get_tracking_uri(), name))
    tags = {k: str(v) for k, v in version_tags.items()}
    made = client.create_model_version(
        name, f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id
    )
    kill_point("version-created")
    return str(made.version), model_id


@_store_call("register the model")
def complete_version(
    run_id: str,
    bundle_path: Path,
    name: str,
    version: str,
    model_id: str,
    aliases: list[str],
    version_tags: dict[str, Any],
    step: int = 0,
) -> None:
    """What reserve_version left to do, each part only when missing (a rerun after a failure
    does the rest): the bundle into the LoggedModel (the pyfunc from code, the bundle its only
    artifact, at `step`, the best epoch, so the model shows the run's metrics of that epoch),
    the model's link to the version, the aliases and the version's tags. The version's source
    is the logged model (models:/m-<id>), so the run's "Logged models", the experiment's Models
    tab and the registry link to one another."""
    client = _client()
    if model_id.startswith("m-") and client.get_logged_model(model_id).status != (
        LoggedModelStatus.READY
    ):
        _fill_model(client, run_id, model_id, bundle_path, step)
    mv = client.get_model_version(name, version)
    _link_logged_model(client, name, version, mv.source)
    for alias in aliases:
        despite_races(client.set_registered_model_alias, name, alias, version)
    kill_point("aliases-set")
    for key, value in version_tags.items():
        if mv.tags.get(key) != str(value):  # versions made before their tags came with them
            client.set_model_version_tag(name, version, key, str(value))


def _link_logged_model(client: MlflowClient, name: str, version: str, source: str) -> None:
    """The logged model learns the versions made from it (tag mlflow.modelVersions, what
    mlflow.register_model sets; the sqlite registry keeps no model_id of a version, only its
    source models:/m-<id>), so the Models tab and the run's model link to the registry."""
    if not source.startswith("models:/m-"):
        return  # a version of an earlier seqgen, logged as the run's artifacts
    model = client.get_logged_model(source.removeprefix("models:/"))
    linked = json.loads(model.tags.get(MODEL_VERSIONS_TAG, "[]"))
    if {"name": name, "version": int(version)} not in linked:
        linked.append({"name": name, "version": int(version)})
        client.set_logged_model_tags(model.model_id, {MODEL_VERSIONS_TAG: json.dumps(linked)})


def _signature(bundle_path: Path) -> ModelSignature:
    """What the pyfunc takes (one row per parameter set) and answers (long format)."""
    data = Bundle.load(bundle_path).data
    return ModelSignature(
        inputs=Schema([ColSpec("double", n) for n in data.param_names]),
        outputs=Schema(
            [ColSpec("long", "sample"), ColSpec("double", data.step_name)]
            + [ColSpec("double", n) for n in data.component_names]
            + [ColSpec("boolean", "outside_training_range")]
        ),
    )


def _run_model(client: MlflowClient, run_id: str) -> str:
    """The id of the run's LoggedModel: one it made before (filled or not: a retry makes none
    twice), else a new, empty one in the run's experiment."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME_IN_RUN}'",
    )
    usable = [m for m in found if m.status != LoggedModelStatus.FAILED]
    if usable:
        return min(usable, key=lambda m: m.status != LoggedModelStatus.READY).model_id
    model = client.create_logged_model(
        run.info.experiment_id,
        name=MODEL_NAME_IN_RUN,
        source_run_id=run_id,
        params=dict(run.data.params),
        tags={k: run.data.tags[k] for k in ("strategy", "phase", "seed") if k in run.data.tags},
    )
    return model.model_id


def _fill_model(
    client: MlflowClient, run_id: str, model_id: str, bundle_path: Path, step: int
) -> None:
    """The bundle into the LoggedModel `model_id` of the run, which becomes READY. Model.log
    first links the model to the run as its output, then uploads: a process that died between
    the two left a link that Model.log refuses to make again, so then the files go up alone."""
    pyfunc = {
        "python_model": str(PYFUNC_CODE),
        "artifacts": {"bundle": str(bundle_path)},
        "code_paths": [str(PACKAGE)],
        "signature": _signature(bundle_path),
        "pip_requirements": _requirements(),
    }
    outputs = client.get_run(run_id).outputs
    linked = any(o.model_id == model_id for o in (outputs.model_outputs if outputs else []))
    with warnings.catch_warnings():  # the signature is given; no input example needed
        warnings.filterwarnings("ignore", message=".*input example.*")
        if not linked:
            # pyfunc.log_model is this call without run_id: it logs to the fluent active run only
            Model.log(
                artifact_path=None, name=MODEL_NAME_IN_RUN, flavor=mlflow.pyfunc, run_id=run_id,
                model_id=model_id, step=step, flavor_name="pyfunc.ModelFromCode", **pyfunc,
            )  # fmt: skip
        else:
            model = client.get_logged_model(model_id)
            described = Model(
                artifact_path=model.artifact_location, model_uuid=model_id, run_id=run_id,
                model_id=model_id,
            )  # fmt: skip
            with tempfile.TemporaryDirectory() as tmp:
                mlflow.pyfunc.save_model(Path(tmp) / "model", mlflow_model=described, **pyfunc)
                client.log_model_artifacts(model_id, str(Path(tmp) / "model"))
    if client.get_logged_model(model_id).status != LoggedModelStatus.READY:
        client.finalize_logged_model(model_id, LoggedModelStatus.READY)


@_store_call("register the ensemble")
def register_ensemble(
    run_id: str, member_paths: list[Path], name: str, alias: str, version_tags: dict[str, str]
) -> str:
    """A seed ensemble as a LoggedModel of `run_id` (the ensemble pyfunc from code, each
    member's bundle an artifact), registered as a new version of `name` with `alias`; returns
    the version."""
    client = _client()
    run = client.get_run(run_id)
    model = client.create_logged_model(
        run.info.experiment_id,
        name=MODEL_NAME_IN_RUN,
        source_run_id=run_id,
        tags={"kind": "ensemble"},
    )
    data = Bundle.load(member_paths[0]).data
    signature = ModelSignature(
        inputs=Schema([ColSpec("double", n) for n in data.param_names]),
        outputs=Schema(
            [ColSpec("long", "sample"), ColSpec("double", data.step_name)]
            + [ColSpec("double", f"{n}_{s}") for n in data.component_names for s in ("mean", "std")]
            + [ColSpec("boolean", "outside_training_range")]
        ),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example.*")
        Model.log(
            artifact_path=None,
            name=MODEL_NAME_IN_RUN,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=model.model_id,
            python_model=str(ENSEMBLE_PYFUNC_CODE),
            artifacts={f"member_{i}": str(p) for i, p in enumerate(member_paths)},
            code_paths=[str(PACKAGE)],
            signature=signature,
            pip_requirements=_requirements(),
            flavor_name="pyfunc.ModelFromCode",
        )
    try:
        client.create_registered_model(name)
    except MlflowException:  # it exists
        pass
    made = client.create_model_version(
        name, f"models:/{model.model_id}", run_id=run_id, model_id=model.model_id
    )
    version = str(made.version)
    _link_logged_model(client, name, version, made.source)
    despite_races(client.set_registered_model_alias, name, alias, version)
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    return version


def despite_races(call, *args):
    """An idempotent call that can lose a race with another process on a unique key (two seeds'
    chains setting the alias phase-2 at once): tried again, 3 times in all."""
    for attempt in range(3):
        try:
            return call(*args)
        except MlflowException:
            if attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


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
            if _status(e) in (401, 403):
                raise store_error(e, f"read {uri}") from None
            raise TrackingError(f"no model at {uri} ({first_line(e, 200)}){hint}") from None
        if local.is_file():
            return Bundle.load(local)
        candidates = sorted(local.rglob("*.pth"))
        if not candidates:
            raise TrackingError(f"{uri} holds no seqgen bundle (.pth){hint}")
        return Bundle.load(candidates[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@_store_call("resolve a model URI to its version")
def exact_model_uri(uri: str) -> str:
    """models:/name@alias, models:/name/latest and models:/name/<stage> -> models:/name/<the
    version it points at now>; an exact version, a logged model (models:/m-<id>) and a file stay
    as given.

    A phase records and loads the exact version, so an alias moved (or a version registered) by a
    run started meanwhile cannot change what it continued from. A model, alias or stage that does
    not exist stays as given (load_bundle then says it is missing, with a hint); any other
    failure is the store's."""
    if not uri.startswith("models:/"):
        return uri
    name, at, alias = uri[len("models:/") :].partition("@")
    name, _, which = name.partition("/")
    if not (at or which) or which.isdigit():
        return uri
    client = MlflowClient()
    try:
        if at:
            versions = [client.get_model_version_by_alias(name, alias)]
        elif which.lower() == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
        else:
            with warnings.catch_warnings():  # stages are deprecated, and still accepted
                warnings.simplefilter("ignore", FutureWarning)
                versions = client.get_latest_versions(name, [which])
    except MlflowException as e:
        # a missing model is RESOURCE_DOES_NOT_EXIST, a missing alias or stage
        # INVALID_PARAMETER_VALUE
        if e.error_code in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), _NO_ALIAS):
            return uri
        raise
    if not versions:
        return uri
    return f"models:/{name}/{max(int(v.version) for v in versions)}"


@_store_call("look up the logged model")
def logged_model_id(uri: str) -> str | None:
    """The MLflow 3 LoggedModel (m-<id>) a model URI names: itself, or the one a registered
    version was made from. The version's own model_id where the registry keeps it; MLflow
    3.17's SQL registry keeps none (no column), so the version's source models:/m-<id> says it.
    None for runs:/ URIs, local files and versions logged before seqgen logged models."""
    if not uri.startswith("models:/"):
        return None
    ref = uri[len("models:/") :].strip("/")
    if ref.startswith("m-") and "/" not in ref and "@" not in ref:
        return ref
    name, _, number = ref.partition("/")
    mv = MlflowClient().get_model_version(name, number)
    if mv.model_id:
        return mv.model_id
    source = mv.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


@_store_call("look up the model's source")
def model_source(uri: str, bundle_run_id: str | None = None) -> dict[str, str]:
    """Registry name/version, run, experiment and chain run a model URI comes from; for a local
    .pth, the run recorded in the bundle when this store has it."""
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
            run = client.get_run(out["evaluated_run_id"])
        except MlflowException:  # a .pth trained against another store
            del out["evaluated_run_id"]
            return out
        out["experiment_id"] = run.info.experiment_id
        parent = run.data.tags.get("mlflow.parentRunId")
        if parent and client.get_run(parent).data.tags.get("kind") == "chain":
            out["chain_run_id"] = parent
    return out


# ---- what a run trained on, and what a registered model is -------------------------------------


@_store_call("record the dataset input")
def log_dataset(run_id: str, folder: str | Path, fingerprint: str, sizes: dict[str, int]) -> None:
    """The run's data as an MLflow dataset input (once): named after the folder, the folder as
    source, the content fingerprint as digest, the split sizes as a small table and as tags.
    The runs table's Dataset column shows it; the data itself is not uploaded."""
    client = _client()
    if client.get_run(run_id).inputs.dataset_inputs:  # a resumed run logged it when it started
        return
    folder = Path(folder).resolve()
    summary = pd.DataFrame({"split": list(sizes), "samples": [float(n) for n in sizes.values()]})
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": a folder
        warnings.simplefilter("ignore")
        dataset = mlflow.data.from_pandas(
            summary, source=str(folder), name=folder.name, digest=fingerprint
        )
    tags = [InputTag("mlflow.data.context", "training")]
    tags += [InputTag(f"{split}_samples", str(n)) for split, n in sizes.items()]
    entry = DatasetInput(dataset._to_mlflow_entity(), tags)
    for attempt in range(3):
        try:
            client.log_inputs(run_id, [entry])
            return
        except MlflowException:
            # Chains that start together race to create the one dataset row (a unique key);
            # the loser finds the row there on its next attempt.
            if client.get_run(run_id).inputs.dataset_inputs:
                return
            if attempt == 2:
                raise


@_store_call("describe the registered model")
def describe_model(name: str, version: str, bundle: Bundle, continued_from: str) -> None:
    """Set the registry page texts of the model and of this version (model_descriptions)."""
    model_text, version_text = model_descriptions(bundle, name, version, continued_from)
    client = MlflowClient()
    client.update_registered_model(name, description=model_text)
    client.update_model_version(name, version, description=version_text)
