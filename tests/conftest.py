"""Shared fixtures: a small embedded dataset and real MLflow sqlite stores in temporary folders."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sqlite3
import sys
from pathlib import Path

import mlflow
import pytest
import torch

# Smoke-sized models are tiny GEMMs: one thread is faster than two, and tests that run processes
# side by side (Ray chains, a served model, the CLI) do not fight over the two cores.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SMOKE_SAMPLES = 40

# `make test` runs the tests on two workers, a module at a time (pytest-xdist: -n 2 --dist
# loadfile --no-loadscope-reorder), handed out in collection order. These modules hold the
# longest end-to-end tests (one to four minutes each on 2 cores, `pytest --durations=0`) and go
# first, longest first, so that none of them starts when the other worker is almost done.
LONGEST_FIRST = (
    "test_team.py", "test_study.py", "test_project.py", "test_faults.py", "test_batched.py",
    "test_analysis.py", "test_auth.py", "test_ui.py", "test_credentials.py", "test_evaluate.py",
)  # fmt: skip


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--precision",
        choices=("auto", "float32", "bf16"),
        default=None,
        help="force the CPU trainer's precision for every test and the processes they start "
        "(SEQGEN_CPU_PRECISION): float32, or bf16 GEMMs (emulated, slower, where the CPU has no "
        "native bf16) [auto: what this CPU picks]",
    )


def pytest_configure(config: pytest.Config) -> None:
    """--precision reaches the trainer through its environment variable, so the processes the
    tests start (CLI, Ray chains, servers) train in it too. Each xdist worker configures itself."""
    precision = config.getoption("--precision")
    if precision is not None:
        os.environ["SEQGEN_CPU_PRECISION"] = precision


def trainer_dtype() -> torch.dtype:
    """The GEMM dtype the CPU trainer picks in this run of the suite: bf16 or float32."""
    from seqgen.training.step import choose_precision

    return choose_precision(torch.device("cpu"), True).dtype or torch.float32


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every module keeps its own order


@pytest.fixture(autouse=True)
def _environment_as_it_was():
    """Every test leaves os.environ as it found it. Tests change it through monkeypatch; this
    undoes what the code under test sets for its own process (seqgen bounds MLflow's retries and
    turns MLflow's URL printing off there, Ray sets its auth mode), so one test cannot change
    another's conditions."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    """40 Burgers samples (151 steps x 5 components, nu and amplitude) made by the real pipeline."""
    from seqgen.data.synth import synthesize

    out = tmp_path_factory.mktemp("smoke") / "data"
    synthesize(out, n_samples=SMOKE_SAMPLES, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """A sqlite store migrated once (about 3 s); each test gets a copy."""
    folder = tmp_path_factory.mktemp("template")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()
    return folder / "mlflow.db"


def point_default_experiment(db: Path, artifacts: Path) -> None:
    """The Default experiment stores artifacts where the template was migrated; move them."""
    with sqlite3.connect(db) as con:
        con.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            (str(artifacts),),
        )


def use_store(folder: Path, migrated_db: Path, monkeypatch) -> str:
    """Point MLflow at a fresh copy of the migrated store inside `folder`; cd there."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(migrated_db, folder / "mlflow.db")
    point_default_experiment(folder / "mlflow.db", folder / "mlruns" / "0")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def store(tmp_path, migrated_db, monkeypatch) -> str:
    """A real, empty MLflow sqlite store for one test; the working folder is tmp_path."""
    uri = use_store(tmp_path, migrated_db, monkeypatch)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = uri
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    # as in an activated virtualenv: `mlflow run` finds the `seqgen` command next to python
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def said():
    """The messages the `seqgen` logger says during a test, in order (a list of strings)."""
    logger = logging.getLogger("seqgen")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)
