"""`make wheelhouse` and docs/gpu.md's offline install (issue #26): a fresh venv that has only
what a GPU image has (torch, numpy, pandas, matplotlib, click, rich) gets seqgen from the
wheelhouse with --no-index and trains a smoke phase on a local sqlite store."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IMAGE = ["torch", "numpy", "pandas", "matplotlib", "click", "rich"]


def sh(*args, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_the_wheelhouse_installs_offline_and_trains(tmp_path, smoke_data):
    wheels, venv = tmp_path / "wheelhouse", tmp_path / "venv"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"  # this machine's, for the test
    made = sh("make", "wheelhouse", f"WHEELHOUSE={wheels}", f"WHEEL_PYTHON={version}", cwd=REPO)
    assert "MiB" in made.stdout
    sh(sys._base_executable, "-m", "venv", str(venv))
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    sh(*pip, "-c", str(wheels / "constraints.txt"), *IMAGE)  # the GPU image, from the registry
    offline = [*pip, "--no-index", "--find-links", str(wheels)]
    sh(*offline, "-c", str(wheels / "constraints.txt"), "-r", str(wheels / "requirements.txt"))
    sh(*offline, "--no-deps", "-e", str(REPO))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trained = sh(
        str(venv / "bin" / "seqgen"), "train", "--strategy", "mae", "--phase", "1",
        "--preset", "smoke", "--data_dir", str(smoke_data), "--epochs", "1",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert "registered" in (trained.stdout + trained.stderr).lower(), trained.stderr[-2000:]
