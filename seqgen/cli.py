"""Command line: seqgen train | pipeline | study | phase-config | synth | bench | evaluate |
baselines | compare | demo.

Options of train, pipeline and phase-config are generated from PhaseSettings, so their names are
the original scripts' flags (--hidden_size, --start_lr, ...) and their defaults live only in
experiments/phases.toml and the dataclass.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import traceback

import click

from seqgen import config
from seqgen import log as seqgen_log
from seqgen.errors import SeqgenError, redact

TRAINING = ("train", "pipeline", "study", "demo")  # commands whose interruption keeps checkpoints


def _clean_errors(fn):
    """The project's own errors -> `error: <one line>` on stderr, exit 2, no traceback. Anything
    else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SeqgenError as e:
            click.echo(f"error: {redact(str(e)) or type(e).__name__}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            kept = "; checkpoints are kept: run the same command again to go on"
            click.echo(f"interrupted{kept if fn.__name__ in TRAINING else ''}", err=True)
            sys.exit(130)

    return wrapper


def check_ints(**values: int | None) -> None:
    """A command's own integer options against config.INT_RANGES (one line naming the option)."""
    for name, value in values.items():
        config.check_int(name, value)


def _click_type(name: str):
    kind, _ = config._field_kind(name)
    return {int: int, float: click.FLOAT, str: str, bool: bool, dict: str}[kind]  # dict: --terms


def setting_options(fn):
    """One option per setting, default None (= keep the table's value).

    A boolean setting takes `--name` / `--no_name` as in the original scripts, and also
    `--name false`, which is what `mlflow run -P name=false` passes on."""
    for name, field in reversed(list(config.FIELDS.items())):
        if name in config.SELECTORS:
            continue
        kind = _click_type(name)
        help_text = field.metadata["help"]
        if kind is bool:
            fn = click.option(
                f"--no_{name}", f"no_{name}", is_flag=True, default=False, help=f"= --{name} false"
            )(fn)
            option = click.option(
                f"--{name}",
                type=click.BOOL,
                is_flag=False,
                flag_value=True,
                default=None,
                help=f"{help_text} (true/false)",
            )
        else:
            option = click.option(f"--{name}", type=kind, default=None, help=help_text)
        fn = option(fn)
    return fn


def _points(vary: tuple[str, ...], phases: list[int], overrides: dict) -> list[dict]:
    """--vary's grid ([{}] without a sweep); a sweep names its own variants."""
    from seqgen.study.sweep import parse_vary

    points = parse_vary(vary, phases, overrides)
    if points != [{}] and "variant" in overrides:
        raise config.ConfigError(
            "--variant names one variant; a sweep (--vary) names each of its own"
        )
    return points


def _overrides(kwargs: dict) -> dict:
    overrides = {k: v for k, v in kwargs.items() if k in config.FIELDS and v is not None}
    for name in config.FIELDS:
        if kwargs.get(f"no_{name}"):
            if overrides.get(name):
                raise config.ConfigError(f"--{name} and --no_{name} contradict each other")
            overrides[name] = False
    return overrides


def snake_option(name: str, *old: str, **kwargs):
    """An option spelt snake_case like the original's training flags; `old` spellings (from
    before every command agreed) are still accepted."""
    dest = name.lstrip("-")
    return click.option(name, *old, dest, **kwargs)


max_outage_option = snake_option(
    "--max_outage",
    type=click.FloatRange(min=0),
    default=config.MAX_OUTAGE,
    show_default=True,
    help="seconds the tracking server may stay unreachable before a phase pauses (local "
    "checkpoint). Unreachable: a probe (every second, 5 s to answer) got no answer or a server "
    "error, so below about 15 s a slow server can count as away",
)
checkpoint_option = snake_option(
    "--checkpoint_seconds",
    type=click.FloatRange(min=0),
    default=config.CHECKPOINT_SECONDS,
    show_default=True,
    help="at most this long between a phase's checkpoints; metrics reach the store with them "
    "(checkpoint_epoch_N files, stops and pauses always checkpoint)",
)
strategy_option = click.option(
    "--strategy", required=True, help="a strategy of experiments/phases.toml: mae, autocorr, ..."
)
preset_option = click.option(
    "--preset", default="full", show_default=True, help="full, demo or smoke (phases.toml)"
)


vary_option = click.option(
    "--vary",
    multiple=True,
    metavar="KEY=V1,V2,...",
    help="train each value of a setting as its own variant (repeatable: every combination; "
    "`;` separates keys in one value, as `mlflow run -P vary=...` passes it)",
)


edge_fraction_option = snake_option(
    "--edge_fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="with --split edge: the share of each parameter's range held out (baselines: no --model) "
    f"[default: {config.FIELDS['edge_fraction'].default}]",
)


retrain_option = click.option(
    "--retrain",
    type=click.BOOL,
    is_flag=False,
    flag_value=True,  # `--retrain`, and `--retrain true` as `mlflow run -P retrain=true` passes it
    default=False,
    help="train phases that are registered already anew, as new versions (the old ones stay)",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--quiet", "-q", is_flag=True, help="warnings and errors only")
@click.option("--verbose", "-v", is_flag=True, help="also debugging detail")
def main(quiet, verbose):
    """seqgen: an autoregressive LSTM surrogate for PCA-compressed simulations (MLflow-tracked)."""
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose contradict each other")
    level = seqgen_log.QUIET if quiet else seqgen_log.VERBOSE if verbose else seqgen_log.NORMAL
    seqgen_log.setup(level)
    from seqgen.runs.launch import name_launcher_run

    name_launcher_run()  # under `mlflow run`: its run says what it launched


@main.command("phase-config")
@strategy_option
@click.option("--phase", type=int, required=True, help="1..5")
@preset_option
@setting_options
@_clean_errors
def phase_config(strategy, phase, preset, **kwargs):
    """Print the resolved settings of one phase as JSON (epochs and folder as planned: a phase
    starts after its parent's real last epoch)."""
    s = config.resolve(strategy, phase, preset, **_overrides(kwargs))
    first = s.planned_first_epoch
    planned = {"first_epoch": first, "last_epoch": first + s.epochs - 1}
    click.echo(json.dumps(s.to_dict() | planned | {"output_dir": str(s.folder(first))}, indent=2))


@main.command()
@strategy_option
@click.option("--phase", type=int, required=True, help="1..5")
@preset_option
@click.option(
    "--resume",
    is_flag=True,
    help="insist on taking up an interrupted run of this phase (the plain command does it too)",
)
@click.option(
    "--stop_at_epoch",
    type=int,
    default=None,
    help="pause after this global epoch (run the same command again to go on)",
)
@retrain_option
@max_outage_option
@checkpoint_option
@setting_options
@_clean_errors
def train(
    strategy,
    phase,
    preset,
    resume,
    stop_at_epoch,
    retrain,
    max_outage,
    checkpoint_seconds,
    **kwargs,
):
    """Train one phase of one strategy (phase N >= 2 continues from phase N-1's model)."""
    from seqgen.runs.keeper import RunOptions
    from seqgen.training.train import train_phase

    overrides = _overrides(kwargs)
    settings = config.resolve(strategy, phase, preset, **overrides)
    if overrides:
        click.echo(f"overrides: {json.dumps(overrides)}", err=True)
    if resume and retrain:
        raise config.ConfigError("--resume takes a run up, --retrain starts a new one: pick one")
    options = RunOptions(
        resume=resume,
        retrain=retrain,
        stop_at_epoch=stop_at_epoch,
        max_outage=max_outage,
        checkpoint_seconds=checkpoint_seconds,
    )
    train_phase(settings, options)


@main.command()
@click.option(
    "--strategy",
    required=True,
    help="a strategy, several (mae,spectral), all (the table's default_strategies: mae, "
    "autocorr, combined) or all-table (every strategy of the table)",
)
@click.option("--phases", default="1-5", show_default=True, help="a range such as 1-5 or 3-5")
@click.option("--seeds", default="0", show_default=True, help="comma-separated seeds")
@preset_option
@vary_option
@retrain_option
@max_outage_option
@checkpoint_option
@setting_options
@_clean_errors
def pipeline(
    strategy, phases, seeds, preset, vary, retrain, max_outage, checkpoint_seconds, **kwargs
):
    """Train consecutive phases of one strategy, one chain per seed (and per variant of a
    sweep), each chain's phases nested under the chain's run."""
    from seqgen.runs import tracking
    from seqgen.runs.keeper import RunOptions
    from seqgen.study.chain import parse_phases, parse_seeds, parse_strategies, run_pipeline

    overrides = _overrides(kwargs)
    if "seed" in overrides:
        raise config.ConfigError("pipeline takes --seeds (comma-separated), not --seed")
    names, phase_list, seed_list = (
        parse_strategies(strategy),
        parse_phases(phases),
        parse_seeds(seeds),
    )
    points = _points(vary, phase_list, overrides)
    options = RunOptions(
        retrain=retrain, max_outage=max_outage, checkpoint_seconds=checkpoint_seconds
    )
    for name in names:
        for point in points:
            run_pipeline(name, phase_list, seed_list, preset, overrides | point, options)
    if vary:
        for line in tracking.browse_lines(tracking.experiment_id(), tracking.VARIANTS_VIEW):
            click.echo(line, err=True)


@main.command()
@click.option(
    "--strategy",
    default="all",
    show_default=True,
    help="all (the table's default_strategies: mae, autocorr, combined), all-table (every "
    "strategy of the table, spectral too) or a list: mae,spectral",
)
@click.option("--seeds", default="0,1,2", show_default=True, help="comma-separated seeds")
@click.option("--phases", default="1-5", show_default=True, help="a range such as 1-5 or 3-5")
@preset_option
@vary_option
@snake_option(
    "--ray_address",
    "--ray-address",
    envvar="RAY_ADDRESS",
    default=None,
    help="auto or HOST:PORT of a running cluster [default: RAY_ADDRESS, else a local instance]",
)
@click.option(
    "--threads_per_chain",
    type=int,
    default=None,
    help="CPU threads (Ray CPUs) per chain [1]",
)
@snake_option(
    "--max_pending",
    type=click.FloatRange(min=1),
    default=None,
    help="seconds chains may wait for a node while none of the study's chains runs, before "
    "they fail [1800]",
)
@click.option(
    "--batched",
    type=click.BOOL,
    is_flag=False,
    flag_value=True,  # `--batched`, and `--batched true` as `mlflow run -P batched=true` passes it
    default=None,
    help="train the chains side by side in this process as one stacked model (no Ray) "
    "[true on a machine with a GPU when no Ray option is given, else false]",
)
@retrain_option
@max_outage_option
@checkpoint_option
@setting_options
@_clean_errors
def study(
    strategy,
    seeds,
    phases,
    preset,
    vary,
    ray_address,
    threads_per_chain,
    max_pending,
    batched,
    retrain,
    max_outage,
    checkpoint_seconds,
    **kwargs,
):
    """Every chain (strategy x seed) as a Ray task, its phases in order, one tracking store.
    Rerun the same command after any interruption: it continues where the study stopped."""
    from seqgen.runs.keeper import RunOptions
    from seqgen.study.chain import parse_phases, parse_seeds, parse_strategies

    overrides = _overrides(kwargs)
    if "seed" in overrides:
        raise config.ConfigError("study takes --seeds (comma-separated), not --seed")
    strategies, seed_list = parse_strategies(strategy), parse_seeds(seeds)
    phase_list = parse_phases(phases)
    points = _points(vary, phase_list, overrides)
    config.check_int("threads", threads_per_chain, "--threads_per_chain")
    options = RunOptions(
        retrain=retrain, max_outage=max_outage, checkpoint_seconds=checkpoint_seconds
    )
    if batched is None:
        from seqgen.study.batched import batched_by_default

        batched = batched_by_default(bool(ray_address or threads_per_chain or max_pending))
    if batched:
        if ray_address or threads_per_chain or max_pending:
            raise config.ConfigError(
                "--batched trains every chain in this process: leave out --ray_address, "
                "--threads_per_chain and --max_pending"
            )
        from seqgen.study.batched import run_batched_study

        outcomes = run_batched_study(
            strategies, seed_list, phase_list, preset, overrides, options, points=points
        )
        sys.exit(1 if any(o.status != "done" for o in outcomes) else 0)
    from seqgen.study.cluster import MAX_PENDING, THREADS_PER_CHAIN, run_study

    outcomes = run_study(
        strategies,
        seed_list,
        phase_list,
        preset,
        overrides,
        ray_address or None,
        threads_per_chain or THREADS_PER_CHAIN,
        options,
        max_pending=max_pending or MAX_PENDING,
        points=points,
    )
    if any(o.status != "done" for o in outcomes):
        sys.exit(1)


@main.command()
@snake_option("--data_dir", default="data", show_default=True, help="made here if missing")
@click.option("--preset", default="demo", show_default=True, help="demo, smoke or full")
@click.option("--seeds", default="0", show_default=True, help="comma-separated seeds")
@click.option("--out", "report_dir", default="reports", show_default=True, help="report folder")
@click.option(
    "--split",
    "split_kind",
    default=None,
    type=click.Choice(config.SPLITS),
    help="random (the seeded 4400/550/rest) or edge: validation and test outside the training "
    "range [default: random]",
)
@edge_fraction_option
@retrain_option
@_clean_errors
def demo(data_dir, preset, seeds, report_dir, split_kind, edge_fraction, retrain):
    """The main job: Burgers data if missing, the table's default strategies (mae, autocorr,
    combined) x 5 phases, evaluation and report."""
    from seqgen.study.chain import parse_seeds
    from seqgen.study.demo import run_demo

    given = {"split": split_kind, "edge_fraction": edge_fraction}
    split = {k: v for k, v in given.items() if v is not None}  # validated with the settings
    run_demo(data_dir, preset, parse_seeds(seeds), report_dir, retrain, split)


@main.command()
@click.option("--out", "out_dir", default="data", show_default=True, help="folder to write")
@snake_option(
    "--n_samples", "--n-samples", type=int, default=None,
    help="samples [default: 5500]",
)  # fmt: skip
@click.option("--seed", type=int, default=None, help="seed of the parameters [default: 0]")
@click.option("--overwrite", is_flag=True, help="replace an existing folder")
@_clean_errors
def synth(out_dir, n_samples, seed, overwrite):
    """Make the embedded dataset: viscous Burgers runs compressed to 5 PCA components."""
    from seqgen.data.synth import synthesize

    check_ints(n_samples=n_samples, seed=seed)
    given = {k: v for k, v in {"n_samples": n_samples, "seed": seed}.items() if v is not None}
    summary = synthesize(out_dir, overwrite=overwrite, **given)  # defaults live in synthesize
    click.echo(json.dumps(summary, default=str))


@main.command()
@preset_option
@click.option("--batches", type=int, default=5, show_default=True, help="timed batches")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--baseline", is_flag=True, help="also time a plain nn.LSTMCell loop")
@click.option("--threads", type=int, default=None, help="torch threads [torch's]")
@click.option("--mixed_precision/--no_mixed_precision", default=True)
@click.option(
    "--members", type=int, default=1, show_default=True,
    help="chains trained as one stack (seqgen study --batched)",
)  # fmt: skip
@_clean_errors
def bench(preset, batches, as_json, baseline, threads, mixed_precision, members):
    """Training and generation throughput (sequences/s) through the trainer's own step."""
    from seqgen.bench import run_bench

    check_ints(batches=batches, threads=threads, members=members)
    result = run_bench(preset, batches, baseline, threads, mixed_precision, members)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:  # the precision first: it decides every figure below (and is chosen per CPU)
        click.echo(f"precision: {result['precision']}")
        for key, value in result.items():
            if key != "precision":
                click.echo(f"{key:>36}: {value}")


PARTS = ("train", "val", "test")
part_option = click.option(
    "--part",
    default=None,
    type=click.Choice(PARTS),
    help="the part of the split measured [default: test]",
)
split_option = click.option(
    "--split",
    "split_kind",
    default=None,
    type=click.Choice([*config.SPLITS, *PARTS]),
    help="random or edge, the kind of split (a model is measured on its own: given, it must be "
    "that one); train, val or test name the part, as --part does (its earlier meaning)",
)


def _kind_and_part(split_kind: str | None, part: str | None) -> tuple[str | None, str]:
    """--split and --part as (kind of split or None, part): --split test is the earlier --part."""
    if split_kind in PARTS:
        if part is not None and part != split_kind:
            raise config.ConfigError(
                f"--split {split_kind} names the part, and so does --part {part}: give one"
            )
        return None, split_kind
    return split_kind, part or "test"


max_lag_option = snake_option(
    "--max_lag",
    "--max-lag",
    type=int,
    default=None,
    help="ACF lags 1..L [default: 20]",
)


def _lag(max_lag: int | None) -> dict:
    return {"max_lag": max_lag} if max_lag is not None else {}


@main.command()
@click.option("--model", "model_uri", required=True, help="models:/..., runs:/... or a .pth")
@snake_option("--data_dir", "--data", default=None, help="data folder (default: the model's)")
@split_option
@part_option
@max_lag_option
@click.option(
    "--baselines/--no_baselines",
    default=True,
    show_default=True,
    help="score the baselines beside the model (fitted once per split, then reused)",
)
@snake_option(
    "--no_log", is_flag=True, help="log no run: evaluate and print only (a user who may read)"
)
@_clean_errors
def evaluate(model_uri, data_dir, split_kind, part, max_lag, baselines, no_log):
    """Generate a split free-running and measure it in original units, beside the baselines on
    the same samples; log evaluation runs. JSON on stdout, a table on stderr."""
    from seqgen.evaluation.evaluate import beside_table, evaluate_model

    check_ints(max_lag=max_lag)
    split_kind, split_name = _kind_and_part(split_kind, part)
    summary = evaluate_model(
        model_uri,
        data_dir,
        split_name,
        baselines=baselines,
        log=not no_log,
        split_kind=split_kind,
        **_lag(max_lag),
    )
    click.echo(json.dumps(summary, indent=2, default=str))
    if summary["baselines"]:
        rows = {"model": summary} | {f"{n} baseline": b for n, b in summary["baselines"].items()}
        click.echo(beside_table(split_name, rows), err=True)


@main.command()
@click.option("--strategy", required=True, help="a strategy of the phase table")
@click.option("--phase", type=int, required=True, help="the phase whose models are the members")
@click.option("--seeds", default="0,1,2", show_default=True, help="comma-separated seeds")
@preset_option
@click.option(
    "--split",
    "split_kind",
    default=None,
    type=click.Choice(config.SPLITS),
    help="the split the members trained on [default: random]",
)
@edge_fraction_option
@click.option(
    "--evaluate/--no_evaluate",
    default=True,
    show_default=True,
    help="score the ensemble on the test samples no member trained on",
)
@_clean_errors
def ensemble(strategy, phase, seeds, preset, split_kind, edge_fraction, evaluate):
    """Register the seeds' models of a phase as one pyfunc model (<model>-ensemble, alias
    phase-N) answering per step the mean and std over members; evaluate it. JSON on stdout."""
    from seqgen.evaluation.ensemble import make_ensemble
    from seqgen.study.chain import parse_seeds

    overrides = {"split": split_kind} if split_kind else {}
    if edge_fraction is not None:
        overrides["edge_fraction"] = edge_fraction
    out = make_ensemble(strategy, phase, parse_seeds(seeds), preset, evaluate, **overrides)
    click.echo(json.dumps(out, indent=2, default=str))


@main.command()
@snake_option("--data_dir", default=None, help="data folder (default with --model: the model's)")
@split_option
@part_option
@edge_fraction_option
@click.option("--model", "model_uri", default=None, help="use this model's data folder and split")
@click.option("--seed", type=int, default=None, help="split seed, no --model [0]")
@snake_option(
    "--max_samples", type=int, default=None,
    help="use only the first N files (no --model)",
)  # fmt: skip
@max_lag_option
@snake_option("--n_components", type=int, default=None, help="components [5]")
@snake_option("--n_params", type=int, default=None, help="parameters [2]")
@click.option("--refit", is_flag=True, help="fit again even when the store has these evaluations")
@_clean_errors
def baselines(
    data_dir,
    split_kind,
    part,
    edge_fraction,
    model_uri,
    seed,
    max_samples,
    max_lag,
    n_components,
    n_params,
    refit,
):
    """Fit the baselines (mean, knn, direct) on a split's training part and evaluate them like a
    model; the split is a model's (--model) or the one a phase with --seed and --max_samples
    makes. Found in the store instead when already evaluated. JSON on stdout, a table on stderr."""
    from seqgen.evaluation.evaluate import beside_table, evaluate_baselines

    check_ints(seed=seed, max_samples=max_samples, max_lag=max_lag)
    check_ints(n_components=n_components, n_params=n_params)
    split_kind, split_name = _kind_and_part(split_kind, part)
    if model_uri is not None and (max_samples is not None or seed is not None or edge_fraction):
        raise config.ConfigError(
            "--model brings its own split: leave out --seed, --max_samples and --edge_fraction"
        )
    if edge_fraction is not None and split_kind != "edge":
        raise config.ConfigError("--edge_fraction applies to --split edge only")
    found = evaluate_baselines(
        data_dir,
        split_name,
        model_uri,
        seed or 0,
        max_samples,
        n_components=n_components,
        n_params=n_params,
        reuse=not refit,
        split_kind=split_kind,
        edge_fraction=edge_fraction or config.FIELDS["edge_fraction"].default,
        **_lag(max_lag),
    )
    click.echo(json.dumps(found, indent=2, default=str))
    click.echo(beside_table(split_name, {f"{n} baseline": b for n, b in found.items()}), err=True)


@main.command()
@click.option(
    "--experiment",
    default=None,
    help="experiment name (default: the one `mlflow run` chose, else "
    "MLFLOW_EXPERIMENT_NAME, else Default)",
)
@click.option(
    "--strategy",
    multiple=True,
    help="keep only these strategies (with their variants) or variants (repeatable)",
)
@click.option("--phase", multiple=True, type=int, help="keep only these phases (repeatable)")
@click.option("--preset", default=None, help="keep only runs of this preset")
@click.option("--seed", multiple=True, type=int, help="keep only these seeds (repeatable)")
@click.option("--tag", multiple=True, help="KEY=VALUE run tag filter (repeatable)")
@click.option("--data_fingerprint", default=None, help="keep only runs on this dataset (prefix)")
@click.option("--data_dir", default=None, help="keep only runs trained on this data folder")
@click.option("--out", "out_dir", default="reports", show_default=True, help="report folder")
@_clean_errors
def compare(experiment, strategy, phase, preset, seed, tag, data_fingerprint, data_dir, out_dir):
    """Pull runs from MLflow and write comparison figures, a summary table and report.md."""
    from analysis.report import build_report

    path = build_report(
        out_dir,
        experiment=experiment,
        strategies=strategy,
        phases=phase,
        preset=preset,
        seeds=seed,
        tags=tag,
        data_fingerprint=data_fingerprint,
        data_dir=data_dir,
    )
    click.echo(f"report: {path}")


def _redacted_traceback(kind, error, tb) -> None:
    """A bug's traceback as Python prints it, with any URI's credentials redacted: a foreign
    error (MLflow's client names the URL it called) may hold the tracking URI's password."""
    sys.stderr.write(redact("".join(traceback.format_exception(kind, error, tb))))


def run() -> None:
    """Entry point: click usage errors as one line too, and SIGTERM handled like Ctrl-C so a
    killed job still ends its MLflow run (KILLED) instead of leaving it RUNNING."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.excepthook = _redacted_traceback
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as e:  # bare `seqgen`: the help, as usual
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:
        context = f"{e.ctx.command_path}: " if getattr(e, "ctx", None) else ""
        click.echo(f"error: {context}{' '.join(e.format_message().split())}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    run()
