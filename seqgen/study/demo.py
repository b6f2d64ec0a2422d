"""The README's main job, `seqgen demo`: the embedded data if missing, the five phases of each of
the table's default_strategies (the seed's three) at demo scale, the phase-5 evaluations beside
the baselines, and the comparison report."""

from __future__ import annotations

import logging
from pathlib import Path

from seqgen.config import N_PHASES, default_strategies, resolve
from seqgen.runs import descriptions, tracking
from seqgen.runs.keeper import RunOptions
from seqgen.study.chain import run_pipeline

log = logging.getLogger(__name__)


def run_demo(
    data_dir: str,
    preset: str,
    seeds: list[int],
    report_dir: str,
    retrain: bool = False,
    split: dict | None = None,
) -> dict:
    """Data if missing, the default strategies' phases, the phase-5 evaluations, the report. split:
    {"split": "edge", "edge_fraction": 0.1} trains and scores outside the training range."""
    from analysis.report import build_report
    from seqgen.data.synth import synthesize
    from seqgen.evaluation.evaluate import evaluate_model

    overrides = {"data_dir": data_dir, **(split or {})}  # a second demo finds its phases again
    models = {  # the table is checked before any data is made
        resolve(strategy, phase, preset, **overrides).registered_model
        for strategy in default_strategies()
        for phase in range(1, N_PHASES + 1)
    }
    if not Path(data_dir).is_dir() or not any(Path(data_dir).glob("*.csv")):
        log.info(f"== making the embedded Burgers dataset in {data_dir} ==")
        synthesize(data_dir)
    tracking.check_tracking_store()
    tracking.check_can_log(tracking.experiment_id(), sorted(models))
    tags = {"kind": "demo", "preset": preset, tracking.NOTE: descriptions.demo_text(preset)}
    with tracking.tracked_run(f"demo-{preset}", tags) as run:
        options, phases = RunOptions(retrain=retrain), list(range(1, N_PHASES + 1))
        results = []
        for strategy in default_strategies():
            results += run_pipeline(
                strategy, phases, seeds, preset, overrides, options, made_by="`seqgen demo`"
            )
        for r in results:
            if r.phase == N_PHASES:
                log.info(f"== evaluating {r.model_uri} ==")
                evaluate_model(r.model_uri, None, "test")
        experiment = tracking.experiment_name(run.info.experiment_id)
        report = build_report(report_dir, experiment=experiment, preset=preset, seeds=tuple(seeds))
    log.info(f"\nReport: {report}")
    for line in tracking.browse_lines(run.info.experiment_id):
        log.info(line)
    return {"report": str(report), "results": results}
