"""benchmarks/gpu_check.py, the script a GPU node's first run starts with, in its --cpu mode:
every stage at tiny shapes (kernels under Triton's interpreter, graphs through EagerCapture)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
STAGES = ["device", "kernels", "capture", "epoch", "study", "project"]


def gpu_check(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = (out / "gpu_check.jsonl").read_text().splitlines()
    return done, [json.loads(line) for line in lines]


@pytest.mark.slow
def test_every_stage_passes_on_a_cpu(tmp_path):
    done, results = gpu_check(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert [r["stage"] for r in results] == STAGES
    assert all(r["status"] == "PASS" for r in results), done.stdout
    assert done.stdout.splitlines()[2].startswith("PASS capture")
    capture = results[2]
    assert capture["batch_sizes"] == [4, 2]  # the epoch's smaller last batch has its own graph
    assert results[4]["rounds"] == 2 and results[5]["projected_s"] > 0


def test_stages_without_time_are_skipped_not_failed(tmp_path):
    done, results = gpu_check(tmp_path, "--budget", "1")
    assert done.returncode == 0, done.stderr
    assert [(r["stage"], r["status"]) for r in results] == [(s, "SKIP") for s in STAGES]
    assert "SKIP device" in done.stdout
