"""The batch-file chain as one command: phases of one strategy as child runs of one parent run."""

from __future__ import annotations

from seqgen.config import MAX_OUTAGE, N_PHASES, resolve, strategies
from seqgen.errors import ConfigError, redact
from seqgen.runs import tracking
from seqgen.training.train import PhaseResult, train_phase


def parse_phases(text: str) -> list[int]:
    """'1-5', '3-5', '2' or '1,2,3' -> phase numbers (consecutive, within 1..5)."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-"))
            phases = list(range(first, last + 1))
        else:
            phases = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--phases must look like 1-5, 3-5 or 2, got {text!r}") from None
    if (
        not phases
        or any(not 1 <= p <= N_PHASES for p in phases)
        or phases != list(range(phases[0], phases[0] + len(phases)))
    ):
        raise ConfigError(f"--phases must be consecutive phases within 1..{N_PHASES}, got {text!r}")
    return phases


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: distinct non-negative integers."""
    try:
        seeds = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def parse_strategies(text: str) -> list[str]:
    """'all', 'mae' or 'mae,combined' -> strategy names of the phase table."""
    names = list(strategies()) if text == "all" else [x.strip() for x in text.split(",")]
    unknown = [n for n in names if n not in strategies()]
    if unknown or not names:
        raise ConfigError(
            f"unknown strategy {unknown[0] if unknown else text!r}: choose from "
            f"{', '.join(strategies())}, or all"
        )
    return names


def run_pipeline(
    strategy: str,
    phases: list[int],
    seeds: list[int],
    preset: str,
    overrides: dict,
    log=print,
    max_outage: float = MAX_OUTAGE,
) -> list[PhaseResult]:
    """Each phase continues from the exact model version the previous phase registered, so two
    pipelines running at once never pick up each other's models through the alias."""
    for phase in phases:  # every phase's settings are checked before the first run starts
        resolve(strategy, phase, preset, **overrides)
    tracking.check_tracking_store()
    results = []
    for seed in seeds:
        tags = {
            "kind": "pipeline",
            "strategy": strategy,
            "seed": str(seed),
            "preset": preset,
            "phases": f"{phases[0]}-{phases[-1]}",
            "pipeline": "true",
        }
        with tracking.tracked_run(f"{strategy}-pipeline-s{seed}", tags):
            previous = overrides.get("existing_model")
            for phase in phases:
                settings = resolve(
                    strategy,
                    phase,
                    preset,
                    **(overrides | {"seed": seed, "existing_model": previous}),
                )
                log(f"== {strategy} phase {phase}/{phases[-1]} (seed {seed}) ==")
                result = train_phase(settings, log=log, hint_next=False, max_outage=max_outage)
                previous = result.model_uri
                results.append(result)
    return results


def run_demo(data_dir: str, preset: str, seeds: list[int], report_dir: str, log=print) -> dict:
    """The README's main job: data if missing, 3 strategies x 5 phases, evaluation, report."""
    from pathlib import Path

    from analysis.report import build_report
    from seqgen.data.synth import synthesize
    from seqgen.evaluation.evaluate import evaluate_model

    for strategy in strategies():  # the table is checked before any data is made
        for phase in range(1, N_PHASES + 1):
            resolve(strategy, phase, preset, data_dir=data_dir)
    if not Path(data_dir).is_dir() or not any(Path(data_dir).glob("*.csv")):
        log(f"== making the embedded Burgers dataset in {data_dir} ==")
        synthesize(data_dir)
    tracking.check_tracking_store()
    with tracking.tracked_run(f"demo-{preset}", {"kind": "demo", "preset": preset}) as run:
        overrides = {"data_dir": data_dir}  # a second demo finds its phases registered
        results = []
        for strategy in strategies():
            phases = list(range(1, N_PHASES + 1))
            results += run_pipeline(strategy, phases, seeds, preset, overrides, log=log)
        for r in results:
            if r.phase == N_PHASES:
                log(f"== evaluating {r.model_uri} ==")
                evaluate_model(r.model_uri, None, "test")
        experiment = tracking.experiment_name(run.info.experiment_id)
        report = build_report(report_dir, experiment=experiment, preset=preset, seeds=tuple(seeds))
    log(
        f"\nReport: {report}\nBrowse the runs: mlflow ui --backend-store-uri "
        f"{redact(tracking.check_tracking_store())}  (then open http://127.0.0.1:5000)"
    )
    return {"report": str(report), "results": results}
