"""What the registry and the runs say about themselves in `mlflow ui`: description texts built
from a model bundle and a run's settings. Pure text, no MLflow calls."""

from __future__ import annotations

import hashlib

from seqgen.config import PhaseSettings
from seqgen.model.bundle import Bundle


def model_descriptions(
    bundle: Bundle, name: str, version: str, continued_from: str
) -> tuple[str, str]:
    """(registered model description, version description): what the model generates, its input
    columns and their trained ranges, the phase and what it continued from, how to load it."""
    d = bundle.data
    ranges = list(zip(d.param_names, d.param_ranges, strict=True)) if d.param_ranges else []
    example = {n: [round((lo + hi) / 2, 6)] for n, (lo, hi) in ranges}
    example = example or {n: [0.0] for n in d.param_names}
    params, comps = ", ".join(d.param_names), ", ".join(d.component_names)

    def load(uri: str) -> str:
        return (
            "```python\nimport mlflow, pandas as pd\n"
            f'mlflow.pyfunc.load_model("{uri}").predict(pd.DataFrame({example}))\n```'
        )

    latest = f"models:/{name}@phase-{bundle.phase}"
    model_text = (
        f"seqgen `{bundle.variant_name}` ({bundle.preset} preset): generates sequences of "
        f"{d.seq_len} steps of {len(d.component_names)} components ({comps}) from "
        f"{len(d.param_names)} simulation parameters ({params}), free-running, in the data's "
        f"original units.\n\nInput: one row per parameter set, columns {params}; other columns "
        f"are ignored. Output: long format, columns sample, {d.step_name}, {comps}, "
        "outside_training_range. Aliases `phase-N` (latest of any seed) and `phase-N-s<seed>`."
        f"\n\nLoad the latest phase {bundle.phase}:\n\n{load(latest)}"
    )
    span = "; ".join(f"{n} in [{lo:.6g}, {hi:.6g}]" for n, (lo, hi) in ranges)
    parent = continued_from.removeprefix("models:/") or "nothing (new training)"
    version_text = (
        f"Phase {bundle.phase} of `{bundle.variant_name}`, seed {bundle.seed}, best validation "
        f"loss {bundle.val_loss:.6g} at epoch {bundle.epoch} (last epoch {bundle.last_epoch}); "
        f"continued from {parent}; run {bundle.run_id}.\n\nTrained on {d.data_dir} (fingerprint "
        f"{d.fingerprint}); parameter ranges of the training split: {span or 'not recorded'}. "
        f"Inputs outside them are answered and flagged (outside_training_range).\n\n"
        f"{load(f'models:/{name}/{version}')}"
    )
    return model_text, version_text


# ---- what runs and the experiment say about themselves in `mlflow ui` ---------------------------

# The report's strategy palette (matplotlib's tab10, analysis/plots.py), as the hex colours the
# runs table and charts take from a run's `mlflow.runColor` tag: a strategy has one colour in the
# report and in the UI. Strategies take them by their position in the phase table.
STRATEGY_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#e377c2", "#bcbd22", "#17becf")
BASELINE_COLOURS = {"mean": "#7f7f7f", "knn": "#9467bd", "direct": "#8c564b"}  # gray, purple, brown
EXPERIMENT_NOTE_HEAD = "**seqgen**"  # a description that starts so is seqgen's to rewrite


# Variants take the other colours of matplotlib's tab20 (none of the strategies' or baselines'),
# by their name: the same colour in every run, chart and figure, and none shared with a plan.
VARIANT_COLOURS = (
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
    "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173",
)  # fmt: skip


def variant_colour(variant: str, table: list[str]) -> str:
    """The colour of a variant: a table strategy's plan by its position in the table; any other
    variant by its name (a stable hash), so each is its own line in the report and the UI."""
    if variant in table:
        return STRATEGY_COLOURS[table.index(variant) % len(STRATEGY_COLOURS)]
    digest = int(hashlib.sha256(variant.encode()).hexdigest(), 16)
    return VARIANT_COLOURS[digest % len(VARIANT_COLOURS)]


def experiment_text(views: dict[str, str], report: str | None) -> str:
    """The experiment's description: what it holds and how to compare. views: {title: link};
    report: a link to the latest comparison's files, or None before the first `seqgen compare`."""
    links = "\n".join(f"- [{title}]({link})" for title, link in views.items())
    latest = (
        f"- [The latest comparison report and its figures]({report}) (`report.html`, "
        "`report.md`, the PNG figures and CSV tables of `seqgen compare`)"
        if report
        else "- The comparison report: run `seqgen compare` (or `seqgen demo`); a link appears here"
    )
    return (
        f"{EXPERIMENT_NOTE_HEAD}: an autoregressive LSTM that generates sequences of PCA "
        "components from simulation parameters, trained with the loss strategies of "
        "`experiments/phases.toml` (weights over loss terms: `mae`, `autocorr`, `combined`, "
        "...), each in five phases that continue from one another.\n\n"
        "What the runs are (tag `kind`):\n"
        "- `chain`: one strategy and seed, its phases stitched: `val_loss`, `val_<term>` for "
        "each loss term (`val_mae`, `val_autocorr`, ...), `train_loss` and `lr` at the global "
        "epochs, one line per chain;\n"
        "- `phase`: one phase of a chain (nested under it), with every per-epoch metric, its "
        "checkpoints and its logged model, registered as `seqgen-<strategy>` (alias `phase-N`);\n"
        "- `evaluation`: a model's test metrics (step 0, so they draw as bars), nested under its "
        "chain; the baselines it must beat (`baseline-knn-s0`, ...) under `baselines-s<seed>`;\n"
        "- `analysis`: `seqgen compare`, the report; `demo`, `study`: what launched the rest.\n\n"
        f"How to compare (saved views of this experiment, also under **Views**):\n{links}\n"
        f"{latest}\n\nEvery model version: **Model registry**, `seqgen-<strategy>` (with a "
        "preset other than full, `seqgen-<strategy>-<preset>`: `seqgen-mae-demo`)."
    )


def phase_text(settings: PhaseSettings, parent: str) -> str:
    s, origin = settings, parent.removeprefix("models:/") or "nothing (new training)"
    return (
        f"Phase {s.phase} of the `{s.variant_name}` chain, seed {s.seed}, preset `{s.preset}` "
        "(`seqgen train`, or a phase of `seqgen pipeline`, `study` or `demo`): every per-epoch "
        f"metric at the global epochs. Continued from {origin}; its best model is this run's "
        f"logged model, registered as `{s.registered_model}` (alias `{s.alias()}`) when the "
        "phase ends."
    )


def chain_text(variant: str, seed: int, preset: str, launched_by: str) -> str:
    return (
        f"The `{variant}` chain, seed {seed}, preset `{preset}`: its phases are nested under this "
        "run, each continuing from the model version the one before registered. This run carries "
        "the chain's curves stitched at the global epochs (`val_loss`, `val_<term>` for each loss "
        "term of its strategy, `train_loss`, `lr`), delivered as each phase logs them, and the "
        f"chain's evaluations. Made by {launched_by}."
    )


def evaluation_text(model_uri: str, exact_uri: str, part: str, n: int, epoch: int) -> str:
    exact = "" if exact_uri == model_uri else f" (`{exact_uri}` when it ran)"
    return (
        f"`seqgen evaluate` of `{model_uri}`{exact}: {n} {part} sequences generated from their "
        f"parameters alone, measured in the data's original units. The weights are those of "
        f"global epoch {epoch} (tag `epoch`); metrics at step 0. The baselines it must beat on "
        "the same samples share its `split_fingerprint`."
    )


def baseline_text(name: str, seed: int, part: str, n: int) -> str:
    what = {
        "mean": "the per-step mean training sequence, whatever the parameters",
        "knn": "inverse-distance-weighted k nearest neighbours in standardised parameter space",
        "direct": "a small MLP from the parameters to the whole sequence at once",
    }.get(name, "a baseline")
    return (
        f"The `{name}` baseline ({what}), fitted on the training part of seed {seed}'s split and "
        f"scored on its {n} {part} sequences by the same code as a model: what a strategy must "
        "beat. Metrics at step 0."
    )


def baselines_text(seed: int, split_fingerprint: str) -> str:
    return (
        f"The baselines of seed {seed}'s split (`split_fingerprint` {split_fingerprint}): each is "
        "a nested evaluation run, fitted once and found again by every later evaluation of a "
        "model on the same split."
    )


def study_text(chains: list[str], preset: str, batched: bool = False) -> str:
    how = "side by side in one process, as one stacked model" if batched else "as a Ray task"
    return (
        f"`seqgen study`, preset `{preset}`: every chain ({', '.join(chains)}) {how}. "
        "Each chain is a run of its own (tag `kind = chain`) with its phases nested under it."
    )


def demo_text(preset: str) -> str:
    return (
        f"`seqgen demo`, preset `{preset}`: the default strategies' chains (runs of kind `chain`), "
        "their phase-5 evaluations beside the baselines, and the comparison report (nested here)."
    )


def analysis_text(n_phases: int, n_evaluations: int) -> str:
    return (
        f"`seqgen compare` over {n_phases} phase runs and {n_evaluations} evaluations: "
        "`report.html` (open it in the artifact view), `report.md`, the figures and the tables."
    )


def launcher_text(entry_point: str, command: str) -> str:
    return (
        f"The run `mlflow run -e {entry_point}` opened for `{command}`; the runs that command "
        "made are in this experiment (tag `kind`)."
    )
