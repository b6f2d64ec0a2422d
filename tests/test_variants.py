"""Every idea its own experiment: a variant never touches the plan's names, chains like the plan,
is compared beside it, and a sweep trains each of its points once (issue 24)."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from seqgen.cli import main
from seqgen.data.synth import synthesize

SMOKE = ["--preset", "smoke"]


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output.strip()


def ok(*args) -> str:
    code, out = cli(*args)
    assert code == 0, out
    return out


def aliases(name: str) -> dict[str, str]:
    """alias -> version of a registered model."""
    return {a: v for a, v in MlflowClient().get_registered_model(name).aliases.items()}


def phase_runs() -> pd.DataFrame:
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.kind = 'phase'")
    return runs[["tags.variant", "tags.strategy", "tags.phase", "tags.seed", "status"]]


def trained_phases(out: str) -> int:
    """How many phases a command's output says it trained (each ends 'done: best val')."""
    return out.count("done: best val")


def test_the_issues_five_commands_keep_both_chains(store, smoke_data):
    data = ["--data_dir", smoke_data]
    ok("train", "--strategy", "mae", "--phase", 1, *SMOKE, *data)
    plan = aliases("seqgen-mae-smoke")
    out = ok("train", "--strategy", "mae", "--phase", 1, *SMOKE, *data, "--hidden_size", 24)
    assert "mae+hidden_size=24" in out and "--output_dir" not in out
    variant_p1 = aliases("seqgen-mae+hidden_size=24-smoke")
    # the variant's phase 2 continues its own phase 1, without --existing_model
    out = ok("train", "--strategy", "mae", "--phase", 2, *SMOKE, *data, "--hidden_size", 24)
    assert "continuing from models:/seqgen-mae+hidden_size=24-smoke/" in out
    # the plan's phase 2 continues the plan's phase 1, whose aliases never moved
    assert aliases("seqgen-mae-smoke") == plan
    out = ok("train", "--strategy", "mae", "--phase", 2, *SMOKE, *data)
    assert f"continuing from models:/seqgen-mae-smoke/{plan['phase-1-s0']}" in out
    assert aliases("seqgen-mae+hidden_size=24-smoke").items() >= variant_p1.items()
    model = mlflow.pyfunc.load_model("models:/seqgen-mae+hidden_size=24-smoke@phase-2-s0")
    assert model is not None
    for variant in ("mae", "mae+hidden_size=24"):
        ok("evaluate", "--model", f"models:/seqgen-{variant}-smoke@phase-2-s0")
    out = ok("compare", *SMOKE)
    summary = pd.read_csv("reports/summary.csv")
    assert set(summary["variant"]) == {"mae", "mae+hidden_size=24"}
    assert sorted(summary["phase"]) == [1, 1, 2, 2]
    excluded = pd.read_csv("reports/excluded.csv")
    assert "superseded by a later run" not in set(excluded.get("reason", []))
    # every run says which variant it belongs to, and its folder is its own
    runs = phase_runs()
    assert sorted(runs["tags.variant"]) == ["mae", "mae", *["mae+hidden_size=24"] * 2]
    assert set(runs["tags.strategy"]) == {"mae"}
    assert (runs["status"] == "FINISHED").all()


def test_a_named_variant_is_recorded_and_a_clash_is_one_line(store, smoke_data):
    train = ["train", "--strategy", "mae", "--phase", 1, *SMOKE, "--data_dir", smoke_data]
    ok(*train, "--epochs", 1, "--variant", "tiny")
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.data.tags["variant"] == "tiny"
    assert json.loads(run.data.tags["seqgen.variant"])["differences"] == {"epochs": 1}
    code, out = cli(*train, "--epochs", 3, "--variant", "tiny")
    last = out.splitlines()[-1]
    assert code == 2 and last.startswith("error: --variant tiny already stands for epochs=1"), out
    assert "this phase has epochs=3" in last
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == 1
    code, out = cli(*train, "--epochs", 3, "--variant", "mae")  # the plan's name is the plan's
    assert code == 2 and out.splitlines()[-1].startswith("error: --variant mae: mae is the"), out


def test_a_second_dataset_is_its_own_variant_and_never_pooled(store, smoke_data, tmp_path):
    other = tmp_path / "other"
    synthesize(other, n_samples=40, seed=7, progress=False)
    for data in (smoke_data, other):
        ok("train", "--strategy", "mae", "--phase", 1, *SMOKE, "--data_dir", data, "--epochs", 1)
        ok("evaluate", "--model", "models:/seqgen-mae+epochs=1-smoke@phase-1-s0")
    first = aliases("seqgen-mae+epochs=1-smoke")
    assert aliases("seqgen-mae+data=other+epochs=1-smoke") and first
    code, out = cli("compare", *SMOKE)
    assert code == 2 and len(out.splitlines()) == 1, out
    assert "2 datasets" in out and "--data_fingerprint or --data_dir" in out
    ok("compare", *SMOKE, "--data_dir", other)
    summary = pd.read_csv("reports/summary.csv")
    assert list(summary["variant"]) == ["mae+data=other+epochs=1"]


def test_a_sweep_trains_each_point_once_and_compare_draws_it(store, smoke_data):
    sweep = ["pipeline", "--strategy", "combined", "--phases", "1-2", "--seeds", "0,1", *SMOKE]
    sweep += ["--data_dir", smoke_data, "--epochs", 1]
    out = ok(*sweep, "--vary", "alpha=0.25,0.75")
    assert trained_phases(out) == 2 * 2 * 2
    assert "viewStateShareKey=seqgen-variants" in out
    assert trained_phases(ok(*sweep, "--vary", "alpha=0.25,0.75")) == 0
    # extended by one value: only that value trains
    assert trained_phases(ok(*sweep, "--vary", "alpha=0.25,0.5,0.75")) == 2 * 2
    # alpha 0.5 is the table's: that point is combined at --epochs 1, with no alpha in its name
    for name in (
        "combined+alpha=0.25+epochs=1",
        "combined+epochs=1",
        "combined+alpha=0.75+epochs=1",
    ):
        for seed in (0, 1):
            ok("evaluate", "--model", f"models:/seqgen-{name}-smoke@phase-2-s{seed}")
    ok("compare", *SMOKE)
    report = open("reports/report.md").read()
    assert "## Varied: alpha" in report
    assert "Best variant per measure" in report
    for name in ("varied_alpha.png", "alpha_trade_off.png"):
        assert Path("reports", name).stat().st_size > 10_000


@pytest.mark.parametrize(
    "vary, says",
    [
        (["--vary", "nope=1,2"], "--vary nope: not a training setting"),
        (["--vary", "hidden_size=8,x"], "--vary hidden_size"),
        (["--vary", "alpha="], "--vary alpha"),
        (["--vary", "seed=1,2"], "--vary seed"),
        (["--vary", "terms=mae=0.5,spectral=0.5"], "give each weighting its own --terms"),
        (["--vary", "alpha=0.2,0.2"], "--vary alpha"),
        (["--vary", "alpha=0.2", "--vary", "alpha=0.3"], "--vary alpha"),
    ],
)
def test_bad_vary_is_one_line_and_trains_nothing(store, smoke_data, vary, says):
    code, out = cli(
        "pipeline", "--strategy", "mae", "--phases", "1", *SMOKE, "--data_dir", smoke_data, *vary
    )
    assert code == 2 and len(out.splitlines()) == 1 and says in out, out
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_shape_varied_after_phase_one_is_refused(store, smoke_data):
    code, out = cli(
        "pipeline", "--strategy", "mae", "--phases", "2-3", *SMOKE, "--vary", "hidden_size=8,16"
    )
    assert code == 2 and len(out.splitlines()) == 1 and "hidden_size" in out, out
    assert "phase 1" in out


def test_the_plan_folders_stay_as_the_original_named_them(store, smoke_data):
    ok("train", "--strategy", "combined", "--phase", 1, *SMOKE, "--data_dir", smoke_data)
    ok(
        "train",
        "--strategy",
        "combined",
        "--phase",
        1,
        *SMOKE,
        "--data_dir",
        smoke_data,
        "--alpha",
        0.3,
    )
    folders = sorted(p.name for p in Path("outputs").glob("*/*"))
    assert folders == ["50mae_50auto_1_2", "combined+alpha=0.3_1_2"]


SWEEP_STUDY = ["study", "--strategy", "combined", "--phases", "1", "--seeds", "0,1", *SMOKE]


@pytest.mark.slow
@pytest.mark.parametrize("engine", [["--batched"], ["--threads_per_chain", "1"]])
def test_a_sweep_through_a_study_trains_each_point_once(store, smoke_data, engine):
    """--batched: both alphas of one shape train in one stack; Ray: a chain each on a local
    Ray instance. Rerun, the same study trains nothing."""
    study = [*SWEEP_STUDY, "--data_dir", smoke_data, "--epochs", 1, *engine]
    out = ok(*study, "--vary", "alpha=0.25,0.75")
    assert "viewStateShareKey=seqgen-variants" in out
    runs = phase_runs()
    assert sorted(runs["tags.variant"]) == [
        *["combined+alpha=0.25+epochs=1"] * 2,
        *["combined+alpha=0.75+epochs=1"] * 2,
    ]
    assert (runs["status"] == "FINISHED").all()
    ok(*study, "--vary", "alpha=0.25,0.75")
    assert len(phase_runs()) == 4  # nothing trained twice
    for alpha in ("0.25", "0.75"):
        assert set(aliases(f"seqgen-combined+alpha={alpha}+epochs=1-smoke")) >= {
            "phase-1-s0",
            "phase-1-s1",
        }


@pytest.mark.slow
def test_mlflow_run_pipeline_takes_a_sweep(store, smoke_data, tmp_path):
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    args = [mlflow_cli, "run", str(REPO), "-e", "pipeline", "--env-manager", "local"]
    # outputs_root: `mlflow run` runs the command in the project's folder, here the checkout
    given = ("strategy=mae", "phases=1", "preset=smoke", f"data_dir={smoke_data}", "epochs=1")
    for p in (*given, f"outputs_root={tmp_path / 'outputs'}"):
        args += ["-P", p]
    args += ["-P", "vary=hidden_size=8,12;noise_level=0.0"]
    proc = subprocess.run(
        args, capture_output=True, text=True, env=subprocess_env(store), cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    names = sorted(phase_runs()["tags.variant"])
    assert names == [
        "mae+epochs=1+hidden_size=12+noise_level=0.0",
        "mae+epochs=1+hidden_size=8+noise_level=0.0",
    ]


def test_a_folder_whose_run_another_store_holds_is_set_aside(store, smoke_data, tmp_path):
    """The same working folder with a new store (a deleted mlflow.db, another server): a phase's
    folder holds a run this store has never seen. Its files move aside, none lost, and the phase
    trains under the original name."""
    train = ["train", "--strategy", "mae", "--phase", 1, *SMOKE, "--data_dir", smoke_data]
    ok(*train, "--epochs", 1)
    first = mlflow.search_runs(search_all_experiments=True)["run_id"].tolist()
    folder = next(Path("outputs").glob("smoke-s0/mae+epochs=1_1_1"))
    before = sorted(p.name for p in folder.iterdir())
    import subprocess
    import sys

    from conftest import subprocess_env

    seqgen = str(Path(sys.executable).with_name("seqgen"))
    done = subprocess.run(
        [seqgen, *map(str, train), "--epochs", "1"], capture_output=True, text=True, timeout=300,
        env=subprocess_env(f"sqlite:///{tmp_path / 'other.db'}"),
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    aside = folder.with_name(f"{folder.name}.run-{first[0][:8]}")
    assert f"moved aside to {aside.name}" in out
    assert sorted(p.name for p in aside.iterdir()) == before
    assert (folder / "best_model.pth").exists()
