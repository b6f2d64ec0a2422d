"""A team server with authentication: `mlflow server --app-name basic-auth`, PostgreSQL behind it
(runs and users alike). A trainer trains, registers and runs a study on Ray; no credentials and a
reader are refused in one line, before anything is trained, leaving nothing; a reader evaluates
and compares into a local folder; no password appears in any output, log, report or Ray log.

One server for the module (each start costs seconds on 2 cores); each test its own experiment.
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import subprocess_env
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client
from services import MlflowServer, PostgresServer, postgres_missing, require

SEQGEN = str(Path(sys.executable).with_name("seqgen"))
MODEL = "seqgen-mae-smoke"  # what the smoke preset's mae phases register
PASSWORDS = {name: f"{name}-{secrets.token_hex(8)}" for name in ("admin", "trainer", "reader")}
# each test its own seed, so its own alias of the one registered model (phase-1-s<seed>)
TRAIN = ["train", "--strategy", "mae", "--phase", "1", "--preset", "smoke", "--seed"]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """The server, with the users `trainer` and `reader` (default permission READ)."""
    require(postgres_missing())
    folder = tmp_path_factory.mktemp("auth")
    with PostgresServer() as db:
        users = db.create_database("auth")
        server = MlflowServer(
            db.uri, folder / "artifacts", admin_password=PASSWORDS["admin"], auth_database_uri=users
        )
        server.start()
        try:
            with as_user("admin"):
                admin = get_app_client("basic-auth", tracking_uri=server.uri)
                for name in ("trainer", "reader"):
                    admin.create_user(name, PASSWORDS[name])
            yield server
        finally:
            server.stop()
        assert_no_password(server.log.read_text())


class as_user:
    """MLflow's client in this process authenticates as `name` (None: nobody) inside the block."""

    def __init__(self, name: str | None):
        self.env = user_env(name)

    def __enter__(self):
        self.saved = {k: os.environ.pop(k, None) for k in self.env | user_env("admin")}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def user_env(name: str | None) -> dict[str, str]:
    if name is None:
        return {}
    return {"MLFLOW_TRACKING_USERNAME": name, "MLFLOW_TRACKING_PASSWORD": PASSWORDS[name]}


def assert_no_password(text: str) -> None:
    for name, password in PASSWORDS.items():
        assert password not in text, f"{name}'s password was written out"


def assert_no_password_in(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert_no_password(path.read_bytes().decode(errors="replace"))


class Team:
    """An experiment of the admin's in which `trainer` may edit, as it may the registered model
    (made by the admin beforehand); the reader keeps the default, READ. seqgen runs in `folder`."""

    def __init__(self, server: MlflowServer, folder: Path):
        self.uri, self.folder, self.experiment = server.uri, folder, folder.name
        with as_user("admin"):
            users = get_app_client("basic-auth", tracking_uri=server.uri)
            client = MlflowClient(server.uri)
            exp_id = client.create_experiment(self.experiment)
            users.grant_user_permission("trainer", "experiment", exp_id, "EDIT")
            try:
                client.create_registered_model(MODEL)
                users.grant_user_permission("trainer", "registered_model", MODEL, "EDIT")
            except MlflowException as e:  # made by an earlier test of this module: granted then
                assert e.error_code == "RESOURCE_ALREADY_EXISTS", e
        self.admin = Admin(client, exp_id)

    def seqgen(self, user: str | None, *args: str, env: dict | None = None):
        """seqgen as `user` (None: nobody) in a process of its own; its output has no password."""
        extra = {"MLFLOW_EXPERIMENT_NAME": self.experiment} | (env or {})
        run_env = subprocess_env(self.uri) | user_env(user) | extra
        done = subprocess.run(
            [SEQGEN, *args], env=run_env, cwd=self.folder, capture_output=True, text=True,
            timeout=280,
        )  # fmt: skip
        assert_no_password(done.stdout + done.stderr)
        return done


@pytest.fixture
def team(auth_server, tmp_path) -> Team:
    return Team(auth_server, tmp_path)


@pytest.fixture(scope="module")
def trained(auth_server, smoke_data, tmp_path_factory) -> tuple[Team, subprocess.CompletedProcess]:
    """The trainer's phase 1 of mae, seed 0, registered: trained once for the module."""
    team = Team(auth_server, tmp_path_factory.mktemp("trained"))
    return team, team.seqgen("trainer", *TRAIN, "0", "--data_dir", str(smoke_data))


class Admin:
    """What the admin sees in the test's experiment and the registered model."""

    def __init__(self, client: MlflowClient, exp_id: str):
        self.client, self.exp_id = client, exp_id

    def runs(self, kind: str | None = None) -> list:
        with as_user("admin"):
            where = f"tags.kind = '{kind}'" if kind else ""
            return self.client.search_runs([self.exp_id], where, ViewType.ALL)

    def all_versions(self) -> int:
        """How many versions the registered model has, made by any experiment's runs."""
        with as_user("admin"):
            return len(self.client.search_model_versions(f"name = '{MODEL}'"))

    def versions(self) -> list:
        """The registered model's versions made by runs of this experiment."""
        runs = {r.info.run_id for r in self.runs()}
        with as_user("admin"):
            found = self.client.search_model_versions(f"name = '{MODEL}'")
            # get_model_version: a search's versions come without their aliases
            return [
                self.client.get_model_version(MODEL, v.version) for v in found if v.run_id in runs
            ]


def refusal(done: subprocess.CompletedProcess) -> str:
    """The one line a refused command ends with, after checking it is the only such line."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert sum("tracking server" in line for line in lines) == 1, done.stderr
    return lines[-1]


@pytest.mark.slow
def test_the_unauthenticated_and_a_reader_are_refused_in_one_line_leaving_nothing(team, smoke_data):
    train = [*TRAIN, "0", "--data_dir", str(smoke_data)]
    versions = team.admin.all_versions()
    need = (
        f"error: the tracking server at {team.uri} needs credentials: set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )
    assert refusal(team.seqgen(None, *train)) == need
    wrong = {"MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    assert refusal(team.seqgen("trainer", *train, env=wrong)) == (
        need + " (it refused those of trainer)"
    )
    assert refusal(team.seqgen("reader", *train)) == (
        f"error: the tracking server at {team.uri} does not let reader create runs in "
        f"experiment '{team.experiment}' (permission denied): ask its admin for EDIT on it"
    )
    assert team.admin.runs() == [] and team.admin.all_versions() == versions  # nothing began
    assert not (team.folder / "outputs").exists()  # nor was trained


@pytest.mark.slow
def test_a_trainer_trains_and_registers_a_phase(trained):
    team, done = trained
    assert done.returncode == 0, done.stderr
    (run,) = team.admin.runs("phase")
    assert run.info.status == "FINISHED"
    (version,) = team.admin.versions()
    assert version.run_id == run.info.run_id and "phase-1-s0" in version.aliases
    assert_no_password_in(team.folder)


@pytest.mark.slow
def test_a_reader_loads_the_model_evaluates_and_compares_without_logging(trained, smoke_data):
    team, trained_phase = trained
    assert trained_phase.returncode == 0, trained_phase.stderr
    before = {r.info.run_id for r in team.admin.runs()}
    (version,) = team.admin.versions()
    model = ["--model", f"models:/{MODEL}@phase-1-s0", "--data_dir", str(smoke_data)]

    refused = refusal(team.seqgen("reader", "evaluate", *model, "--no_baselines"))
    assert refused.startswith(f"error: the tracking server at {team.uri} does not let reader ")
    assert refused.endswith(
        "(permission denied): pass --no_log to evaluate without logging, or ask its admin for "
        "EDIT on it"
    )

    done = team.seqgen("reader", "evaluate", *model, "--no_log")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["run_id"] is None
    assert summary["evaluated_model_uri"] == f"models:/{MODEL}/{version.version}"
    assert summary["metrics"]["test_mae"] > 0  # the registered model was loaded and generated
    assert {b["run_id"] for b in summary["baselines"].values()} == {None}

    done = team.seqgen("reader", "compare", "--out", "report")
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "not logged as a run" in line]
    assert said == [
        f"the tracking server at {team.uri} does not let reader create runs in experiment "
        f"'{team.experiment}' (permission denied): the report is written to report only, not "
        "logged as a run"
    ]
    assert "mae" in (team.folder / "report" / "report.md").read_text()
    assert {r.info.run_id for r in team.admin.runs()} == before  # the reader logged nothing
    assert_no_password_in(team.folder)


@pytest.mark.slow
def test_a_study_on_local_ray_gets_the_credentials_through_the_environment(team, smoke_data):
    ray_tmp = Path(tempfile.mkdtemp(prefix="seqgen-ray-"))  # short: Ray's socket paths
    study = ["study", "--strategy", "mae", "--seeds", "1", "--phases", "1", "--preset", "smoke"]
    study += ["--data_dir", str(smoke_data)]
    ray_env = {"RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        refused = refusal(team.seqgen("reader", *study, env=ray_env))
        assert "does not let reader create runs" in refused
        assert not (ray_tmp / "ray").exists() and team.admin.runs() == []  # before Ray started

        done = team.seqgen("trainer", *study, env=ray_env)
        assert done.returncode == 0, done.stderr
        (run,) = team.admin.runs("phase")
        assert run.info.status == "FINISHED"
        (version,) = team.admin.versions()
        assert "phase-1-s1" in version.aliases
        assert any((ray_tmp / "ray").rglob("worker-*")), "Ray wrote no worker logs to search"
        assert_no_password_in(ray_tmp)
        assert_no_password_in(team.folder)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_credentials_a_task_gets_say_only_their_names_and_local_ray_starts_without_them(
    monkeypatch,
):
    from seqgen.study.cluster import ClientSettings, client_environment, without_credentials

    secret = PASSWORDS["trainer"]
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    settings = ClientSettings({"MLFLOW_TRACKING_PASSWORD": secret, "MLFLOW_TRACKING_URI": "x"})
    assert secret not in repr(settings) and "MLFLOW_TRACKING_PASSWORD" in repr(settings)
    with without_credentials():
        assert "MLFLOW_TRACKING_PASSWORD" not in os.environ
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == secret
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with client_environment(settings):
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == secret
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ  # a reused worker keeps none
    assert "MLFLOW_TRACKING_URI" not in os.environ
