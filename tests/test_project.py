"""The real entry points: `mlflow run` on the MLproject; the whole flow against `mlflow server`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import REPO, point_default_experiment, subprocess_env
from mlflow.tracking import MlflowClient
from services import MlflowServer

MLFLOW = str(Path(sys.executable).with_name("mlflow"))

# Every test here runs the real entry points as processes (mlflow run, a server, the demo).
pytestmark = pytest.mark.slow


def mlflow_run(uri, entry, *params, cwd=REPO):
    args = [MLFLOW, "run", str(REPO), "-e", entry, "--env-manager", "local"]
    for p in params:
        args += ["-P", p]
    proc = subprocess.run(
        args, capture_output=True, text=True, env=subprocess_env(uri), cwd=cwd, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_mlflow_run_phase_one_then_two(store, smoke_data, tmp_path):
    common = [f"data_dir={smoke_data}", "preset=smoke", f"outputs_root={tmp_path / 'outputs'}"]
    mlflow_run(store, "combined", "phase=1", *common)
    second = mlflow_run(store, "combined", "phase=2", *common)  # the plan: 2 epochs at smoke
    assert "Next phase: mlflow run . -e combined -P phase=3" in second.stdout + second.stderr

    client = MlflowClient()
    runs = mlflow.search_runs(
        search_all_experiments=True, order_by=["start_time ASC"], output_format="list"
    )
    assert [r.info.run_name for r in runs] == ["combined-p1-s0", "combined-p2-s0"]
    assert all(r.info.status == "FINISHED" for r in runs)
    p2 = runs[1]
    # -P parameters as `mlflow run` logged them, and the resolved settings beside them
    assert p2.data.params["phase"] == "2" and p2.data.params["epochs"] == "2"
    assert p2.data.params["start_lr"] == "0.0005" and p2.data.params["max_lag"] == "15"
    assert p2.data.tags["mlflow.project.entryPoint"] == "combined"
    assert [m.step for m in client.get_metric_history(p2.info.run_id, "val_loss")] == [3, 4]
    v1 = client.get_model_version_by_alias("seqgen-combined-smoke", "phase-1")
    v2 = client.get_model_version_by_alias("seqgen-combined-smoke", "phase-2")
    assert v1.run_id == runs[0].info.run_id and v2.run_id == p2.info.run_id
    assert v2.tags["continued_from"] == f"seqgen-combined-smoke/{v1.version}"
    assert (tmp_path / "outputs/smoke-s0/50mae_50auto_3_4/best_model.pth").is_file()

    # the comparison entry point, on the runs `mlflow run` just made (same experiment)
    mlflow_run(store, "compare", f"out={tmp_path / 'reports'}", "preset=smoke")
    report = (tmp_path / "reports" / "report.md").read_text()
    assert "combined" in report and (tmp_path / "reports" / "val_loss.png").is_file()
    analysis = [
        r
        for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
        if r.data.tags.get("kind") == "analysis"
    ]
    assert len(analysis) == 1 and analysis[0].info.status == "FINISHED"
    assert "report.md" in {a.path for a in client.list_artifacts(analysis[0].info.run_id)}


def test_mlflow_run_bad_phase_fails_cleanly(store):
    args = [MLFLOW, "run", str(REPO), "-e", "mae", "-P", "phase=9", "--env-manager", "local"]
    proc = subprocess.run(
        args, capture_output=True, text=True, env=subprocess_env(store), timeout=300
    )
    assert proc.returncode != 0
    assert "error: phase must be 1..5, got 9" in proc.stderr
    assert "Traceback" not in proc.stderr.split("error: phase")[0]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]  # the launcher's run, not left RUNNING


@pytest.fixture
def server(tmp_path, migrated_db, monkeypatch):
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend and proxied artifacts."""
    shutil.copy(migrated_db, tmp_path / "server.db")
    # as on a fresh server: the Default experiment's artifacts go through the server
    point_default_experiment(tmp_path / "server.db", "mlflow-artifacts:/0")
    with MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts") as server:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        mlflow.set_tracking_uri(server.uri)
        yield server.uri


def test_whole_flow_against_a_real_server(server, smoke_data, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "seqgen.cli",
            "pipeline",
            "--strategy",
            "mae",
            "--phases",
            "1-2",
            "--preset",
            "smoke",
            "--data_dir",
            str(smoke_data),
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(server),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"mae-s0", "mae-p1-s0", "mae-p2-s0"}
    assert by_name["mae-s0"].data.tags["kind"] == "chain"  # the chain's run, its curves (#17)
    parent = by_name["mae-s0"].info.run_id
    assert [m.step for m in client.get_metric_history(parent, "val_mae")] == [1, 2, 3, 4]
    for name in ("mae-p1-s0", "mae-p2-s0"):
        assert by_name[name].data.tags["mlflow.parentRunId"] == parent
        assert by_name[name].info.status == "FINISHED"
    p2 = by_name["mae-p2-s0"].info.run_id
    assert [m.step for m in client.get_metric_history(p2, "train_loss")] == [3, 4]
    # artifacts went through the server (proxied) into its --artifacts-destination
    assert len(list((tmp_path / "artifacts").rglob("training_metrics.csv"))) == 2
    assert "training_metrics.csv" in {a.path for a in client.list_artifacts(p2)}
    v2 = client.get_model_version_by_alias("seqgen-mae-smoke", "phase-2")
    assert v2.tags["continued_from"] == "seqgen-mae-smoke/1"
    model = mlflow.pyfunc.load_model("models:/seqgen-mae-smoke@phase-2")
    out = model.predict(pd.DataFrame({"nu": [0.05], "amplitude": [1.0]}))
    assert out.shape == (151, 8)  # sample, step, 5 components, outside_training_range


def test_demo_end_to_end_and_again(store, smoke_data, tmp_path):
    """The README's main job at smoke scale, twice in the same folder: the second time every
    phase is found registered and nothing is trained again."""
    from seqgen.study.demo import run_demo

    first = run_demo(str(smoke_data), "smoke", [0], "reports")
    second = run_demo(str(smoke_data), "smoke", [0], "reports")
    assert [r.status for r in first["results"]] == ["registered"] * 15
    assert [r.status for r in second["results"]] == ["skipped"] * 15
    assert [r.model_uri for r in second["results"]] == [r.model_uri for r in first["results"]]
    assert (tmp_path / "reports" / "report.md").is_file()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    kinds = sorted(r.data.tags.get("kind") for r in runs)
    # 3 model evaluations per demo, and 3 baselines fitted by the first, found by the second
    assert kinds.count("phase") == 15 and kinds.count("evaluation") == 6 + 3
    assert sorted(r.data.tags.get("baseline", "") for r in runs if r.data.tags.get("baseline")) == [
        "direct",
        "knn",
        "mean",
    ]
    assert kinds.count("demo") == 2 and kinds.count("analysis") == 2
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_plain_pip_install_finds_the_phase_table(tmp_path):
    """`pip install .` (not editable) in a fresh venv, then seqgen from another folder: the phase
    table ships inside the package. The fresh venv sees this venv's dependencies through a .pth
    file, so only seqgen itself is installed (no downloads but the build backend)."""
    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(fresh)], check=True, timeout=120)
    site = next((fresh / "lib").glob("python3*/site-packages"))
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    (site / "deps.pth").write_text(f"{deps}\n")
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ there
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "build", "outputs", "*.db"))
    build = subprocess.run(
        [fresh / "bin" / "pip", "install", "--quiet", "--no-deps", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [fresh / "bin" / "seqgen", "phase-config", "--strategy", "mae", "--phase", "1"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["start_lr"] == 0.001
    where = subprocess.run(
        [fresh / "bin" / "python", "-c", "import seqgen.config as c; print(c.PHASES_FILE)"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=120,
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout  # the installed copy
