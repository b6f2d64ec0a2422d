"""`mlflow run` of this project: where its runs go when the command names no experiment, and a
name for the run `mlflow run` opens.

`mlflow run` picks the experiment before the entry point starts (--experiment-name,
--experiment-id, MLFLOW_EXPERIMENT_NAME/ID, else its default) and an MLproject cannot name one.
MLflow asks the "default experiment providers" that packages register (entry-point group
`mlflow.default_experiment_provider`, pyproject.toml) for that default; seqgen's answers `seqgen`
only inside `mlflow run` of a local checkout whose MLproject is this project, so `mlflow run .`
lands beside `seqgen demo`'s runs and nothing else in the environment changes. This module is
imported whenever mlflow is, so it imports nothing heavy at the top.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROJECT_NAME = re.compile(r"^name:\s*seqgen\s*$", re.MULTILINE)


class SeqgenExperiment:
    """MLflow's default experiment inside `mlflow run <a seqgen checkout>`: `seqgen`."""

    def in_context(self) -> bool:
        import click

        ctx = click.get_current_context(silent=True)
        if ctx is None or ctx.command.name != "run" or not ctx.params.get("uri"):
            return False
        mlproject = Path(str(ctx.params["uri"])) / "MLproject"
        try:
            return bool(PROJECT_NAME.search(mlproject.read_text()))
        except OSError:  # a git URI, or another project
            return False

    def get_experiment_id(self) -> str:
        from seqgen.runs import tracking

        return tracking.experiment_id(tracking.DEFAULT_EXPERIMENT)


def name_launcher_run() -> None:
    """The run `mlflow run` opened for this command (MLFLOW_RUN_ID), named after what it
    launched and described, while no seqgen run has taken it up (a command that finds its runs
    made before leaves it as it is: named, it says what happened)."""
    import os

    from seqgen.errors import TrackingError
    from seqgen.runs import descriptions, tracking

    launcher = os.environ.get("MLFLOW_RUN_ID")
    if not launcher:
        return
    try:
        tags = tracking.run_tags(launcher)
        if tags.get("kind"):
            return
        entry = tags.get("mlflow.project.entryPoint", "main")
        command = " ".join(["seqgen", *sys.argv[1:]])
        tracking.set_run_tags(
            launcher,
            {
                "mlflow.runName": f"mlflow run -e {entry}",
                tracking.NOTE: descriptions.launcher_text(entry, command),
            },
        )
    except TrackingError:  # the command itself says what is wrong with the store
        pass
