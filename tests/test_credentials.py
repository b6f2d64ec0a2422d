"""A tracking URI with credentials (https://user:token@..., postgresql://user:password@...) is
never printed, logged as a param or tag, or written into a file, a report or an artifact."""

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from conftest import free_port, point_default_experiment, subprocess_env
from test_serving import stop_group

from seqgen.cli import main
from seqgen.errors import redact

SECRET = "s3cr3t-PASS"
SEQGEN = str(Path(sys.executable).with_name("seqgen"))
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def test_a_store_that_cannot_be_reached_is_named_without_its_credentials(
    store, smoke_data, monkeypatch, capfd
):
    # check_tracking_store turns MLflow's "View run at <URI>" line off; undone after the test
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")
    for uri in (
        f"https://user:{SECRET}@127.0.0.1:{free_port()}",
        f"https://{SECRET}@127.0.0.1:{free_port()}",  # a token alone
        f"postgresql://user:{SECRET}@127.0.0.1:{free_port()}/mlflow",
    ):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        result = CliRunner().invoke(
            main,
            ["train", "--strategy", "mae", "--phase", "1", "--preset", "smoke"]
            + ["--data_dir", str(smoke_data)],
        )
        assert result.exit_code == 2, result.output
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("error: ") and redact(uri) in last, last
        assert SECRET not in result.output
    captured = capfd.readouterr()  # anything MLflow or a library logged on the way
    assert SECRET not in captured.out + captured.err


@pytest.mark.slow
def test_training_and_a_report_through_a_server_with_credentials(smoke_data, tmp_path, migrated_db):
    """Train and compare through http://user:secret@server: nothing anywhere holds the secret."""
    shutil.copy(migrated_db, tmp_path / "server.db")
    point_default_experiment(tmp_path / "server.db", tmp_path / "artifacts" / "0")
    port = free_port()
    server_log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [
            MLFLOW, "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=server_log, stderr=subprocess.STDOUT, env=subprocess_env(""), cwd=tmp_path,
        start_new_session=True,
    )  # fmt: skip
    uri = f"http://user:{SECRET}@127.0.0.1:{port}"  # the server ignores the basic auth header
    work = tmp_path / "work"
    work.mkdir()
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail("mlflow server did not come up")
                time.sleep(0.5)
        said = ""
        for args in (
            ["train", "--strategy", "mae", "--phase", "1", "--preset", "smoke", "--epochs", "1"]
            + ["--data_dir", str(smoke_data)],
            ["compare", "--preset", "smoke", "--out", "reports"],
        ):
            env = subprocess_env(uri) | {"OMP_NUM_THREADS": "1"}
            proc = subprocess.run(
                [SEQGEN, *args], capture_output=True, text=True, env=env, cwd=work, timeout=600
            )
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
            said += proc.stdout + proc.stderr
    finally:
        stop_group(server)
        server_log.close()

    assert SECRET not in said
    report = (work / "reports" / "report.md").read_text()
    assert f"from http://user:***@127.0.0.1:{port} in" in report
    # every file: outputs, report, the server's database, logged artifacts and its log
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 20
    assert [p for p in files if SECRET.encode() in p.read_bytes()] == []
