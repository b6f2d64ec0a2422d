"""Screenshots of `mlflow ui` for docs/evaluation.md ("The same comparison in `mlflow ui`"), taken
in Debian's Chromium by the same helpers as the browser test (tests/ui_browser.py) from the store
`make demo` made:

    make demo && .venv/bin/python docs/screenshots.py            # sqlite:///mlflow.db
    .venv/bin/python docs/screenshots.py sqlite:////elsewhere/mlflow.db

It writes docs/ui_curves.png (the saved view "Curves": every chain, phases stitched) and
docs/ui_test_metrics.png (the saved view "Test metrics": models beside baselines)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import ui_browser  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from seqgen.runs import tracking  # noqa: E402

SHOTS = {"seqgen-curves": "ui_curves.png", "seqgen-test-metrics": "ui_test_metrics.png"}


def main(store_uri: str = "sqlite:///mlflow.db") -> None:
    found = MlflowClient(tracking_uri=store_uri).get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    if found is None:
        sys.exit(f"{store_uri} has no experiment {tracking.DEFAULT_EXPERIMENT}: run `make demo`")
    runs = {
        "seqgen-curves": ["mae-s0", "autocorr-s0", "combined-s0"],
        "seqgen-test-metrics": ["eval-mae-p5-s0", "baseline-knn-s0"],
    }
    with tempfile.TemporaryDirectory(prefix="seqgen-shots-") as tmp:
        with ui_browser.ui(store_uri, Path(tmp), width=1500, height=1250) as (page, address):
            for view, file in SHOTS.items():
                url = f"{address}/{tracking.view_link(found.experiment_id, view)}"
                ui_browser.open_runs(page, url, runs[view])
                ui_browser.close_assistant(page)
                ui_browser.chart(page, "test_mae" if "test" in view else "val_mae")
                page.mouse.wheel(0, -5000)  # back to the top, the first charts in sight
                page.wait_for_timeout(1500)  # the charts' own entrance animation
                page.screenshot(path=str(HERE / file))
                print(f"wrote {HERE / file}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
