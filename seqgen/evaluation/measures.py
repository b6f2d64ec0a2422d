"""The registry of what is measured and how it is shown: one entry per quantity, read by the
evaluation, analysis/tables.py, analysis/report.py and analysis/query.py instead of lists of
their own.

- `MEASURES`: what an evaluation logs as `{split}_{key}` (test_mae), in the order every table
  shows them: its label, which way is better, whether the baselines have it, whether it is shown
  beside the baselines, paired between strategies, and summarised.
- `per_epoch(terms)`: what a phase run logs at every epoch (step = global epoch) for the loss
  terms its strategy names, and which of them the analysis draws (`PER_EPOCH`: the seed's
  strategies'); `PHASE_END`: what it logs once at its end. The analysis reads a run's terms
  from what it logged (`terms_in`), never from a fixed list.
- `run_columns(terms)`: the per-phase-run numbers of per_run.csv and summary.csv.

A new measure is one entry here and its computation in `seqgen.evaluation.evaluate.measure`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

LOWER, HIGHER = "lower", "higher"
NOMINAL = "nominal"  # best at a value (a calibration), never paired


@dataclass(frozen=True)
class Measure:
    """One quantity of an evaluation run, logged as `{split}_{key}`."""

    key: str  # as logged, without the split prefix
    label: str  # column header in the report's tables
    name: str  # in sentences and figure titles
    better: str = LOWER  # which way is better
    per_sample: bool = True  # one value per sequence in per_sample.csv, so it pairs by sample
    baselines: bool = True  # the baselines are scored on it (the teacher-forced ones they are not)
    beside: bool = True  # a column of the table of strategies beside the baselines
    need: str = ""  # the need it answers when strategies are paired on it; "" = not paired
    summary: bool = True  # a column of the report's summary table (summary.csv holds them all)
    # the true data's own value is logged beside it as `{split}_true_{key}`, its reference
    reference: bool = False
    physics: bool = False  # needs the embedded Burgers data's fields (else skipped)
    ensemble: bool = False  # an ensemble's only: spread over members against error
    nominal: float | None = None  # with better=NOMINAL: the value a calibrated model has

    def __post_init__(self) -> None:
        if self.better not in (LOWER, HIGHER, NOMINAL):
            raise ValueError(f"measure {self.key}: better must be {LOWER!r} or {HIGHER!r}")
        if (self.better == NOMINAL) != (self.nominal is not None):
            raise ValueError(f"measure {self.key}: a nominal value goes with better={NOMINAL!r}")
        if self.better == NOMINAL and (self.need or self.baselines):
            raise ValueError(f"measure {self.key}: a calibration is not paired")

    @property
    def versus(self) -> bool:
        """Each strategy is paired against the best baseline on it (and `seqgen evaluate` prints
        it beside the baselines): the baselines have it, sample by sample."""
        return self.baselines and self.per_sample

    def improves(self, diff: float) -> bool:
        """Whether a difference a - b says a is better."""
        if self.better == NOMINAL:
            raise ValueError(f"measure {self.key}: a calibration has no better direction")
        return diff < 0 if self.better == LOWER else diff > 0

    def best(self, values: pd.Series):
        """The index of the best of `values`."""
        if self.better == NOMINAL:
            return (values - self.nominal).abs().idxmin()
        return values.idxmin() if self.better == LOWER else values.idxmax()


MEASURES: tuple[Measure, ...] = (
    Measure("mae", "test MAE", "MAE", need="pointwise accuracy (MAE)"),
    Measure("rmse", "test RMSE", "RMSE (per sequence)"),
    Measure("acf_error", "ACF err", "ACF error", need="temporal structure (ACF error)"),
    # Pooled over the split: one number per evaluation, nothing to pair.
    Measure("acf_error_pooled", "ACF err pooled", "pooled ACF error", per_sample=False),
    Measure(
        "spectral_error",
        "spectral dist",
        "spectral distance",
        need="frequency content (log-spectral distance)",
    ),
    Measure(
        "field_rel_l2",
        "field rel L2",
        "field relative L2",
        need="reconstructed fields (relative L2)",
    ),
    Measure(
        "valid_horizon",
        "valid steps",
        "valid horizon (steps)",
        better=HIGHER,
        need="rollout (valid horizon)",
    ),
    # One value per evaluation (the last window's MAE over the first's); the windows' own MAEs
    # are logged as `{split}_window_<i>_mae`.
    Measure("error_growth", "err growth", "error growth", per_sample=False),
    # Zero by construction through the embedded data's basis, whose components have zero domain
    # mean; computed, so that a basis or data without that property shows it.
    Measure(
        "mean_violations",
        "mean viol",
        "mean-conservation violations (steps)",
        reference=True,
        physics=True,
        beside=False,
    ),
    Measure(
        "energy_violations",
        "energy rises",
        "energy rises (steps)",
        reference=True,
        physics=True,
    ),
    Measure(
        "mae_teacher_forced",
        "TF MAE",
        "teacher-forced MAE",
        baselines=False,
        beside=False,
        summary=False,
    ),
    Measure(
        "tf_gap",
        "TF gap",
        "free-running minus teacher-forced MAE",
        per_sample=False,
        baselines=False,
        beside=False,
    ),
    # an ensemble's spread (std over members) against the error of its mean
    *(
        Measure(
            f"coverage_{k}sd",
            f"cover {k}sd",
            f"coverage of mean ± {k} std",
            better=NOMINAL,
            nominal=nominal,
            baselines=False,
            beside=False,
            summary=False,
            ensemble=True,
        )
        for k, nominal in ((1, 0.683), (2, 0.954))  # a Gaussian's mass within k std
    ),
    Measure(
        "spread_error_corr",
        "spread-error r",
        "spread-error correlation",
        better=HIGHER,
        per_sample=False,
        baselines=False,
        beside=False,
        summary=False,
        ensemble=True,
    ),
    # sharpness: at equal calibration, the narrower spread tells the user more
    Measure(
        "spread",
        "spread",
        "ensemble spread (std over members)",
        baselines=False,
        beside=False,
        summary=False,
        ensemble=True,
    ),
)
BY_KEY = {m.key: m for m in MEASURES}
QUANTILES = (10, 50, 90)  # a per-sample distribution is also logged as `{key}_p<q>`
DISTRIBUTIONS = ("valid_horizon",)  # the measures logged with their quantiles
# The measure a model is judged by first: its per-component values are shown beside the
# baselines, it is drawn over the parameter plane and along the sequence, and the fields figure
# shows the baseline that is best on it.
HEADLINE = "mae"
# Logged on a baseline's evaluation run beside its measures.
FIT_METRICS = ("fit_seconds", "predict_seconds")


def logged(split: str = "test", **flags: bool) -> list[str]:
    """Metric keys `{split}_{key}` of the measures whose flags all have the given values:
    logged(beside=True) -> ['test_mae', 'test_rmse', ...]."""
    return [f"{split}_{m.key}" for m in select(**flags)]


def select(**flags: bool) -> list[Measure]:
    """The measures, in table order, whose attributes have the given values."""
    return [m for m in MEASURES if all(getattr(m, k) == v for k, v in flags.items())]


def paired() -> dict[str, str]:
    """Measures compared between strategies sample by sample: {key: the need it answers}."""
    return {m.key: m.need for m in MEASURES if m.need}


def component_columns(columns: Iterable[str], key: str = HEADLINE, split: str = "test") -> list:
    """The per-component columns of measure `key` among `columns` ('test_mae_pc1', ...), sorted:
    those named `{split}_{key}_*` that are not another measure's."""
    start = f"{split}_{key}_"
    return sorted({c for c in columns if c.startswith(start) and c[len(split) + 1 :] not in BY_KEY})


# ---- training runs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EpochMetric:
    """A number a phase run logs at every epoch, at step = global epoch."""

    key: str
    drawn: bool = False  # the analysis pulls its history for the comparison's curves


# Labels in figures of the loss terms seqgen/training/losses.py registers; a term not here (a
# researcher's own) is labelled by its name. Every term a strategy names is logged per split
# ({split}_{term}), weighted or not, so strategies compare on the same axes.
TERM_LABELS = {
    "mae": "MAE (standardised)",
    "autocorr": "autocorrelation loss",
    "spectral": "spectral loss (|FFT| L1)",
}
SEED_TERMS = ("mae", "autocorr")  # the terms of the seed's strategies (alpha weighs them)
LOSS_TERMS = {t: TERM_LABELS[t] for t in SEED_TERMS}
# Schedules drawn against the epoch, with their labels.
SCHEDULES = {"lr": "learning rate", "teacher_forcing_ratio": "teacher-forcing ratio"}


def term_label(term: str) -> str:
    return TERM_LABELS.get(term, f"{term} loss")


def order_terms(terms: Iterable[str]) -> list[str]:
    """Terms in a stable order: the built-in ones as TERM_LABELS lists them, then by name."""
    known = list(TERM_LABELS)
    return sorted(set(terms), key=lambda t: (known.index(t) if t in known else len(known), t))


def terms_in(keys: Iterable[str]) -> list[str]:
    """The loss terms among logged metric keys: {split}_{term} of a phase run (not loss)."""
    metrics = {m.key for m in per_epoch(())}
    return order_terms(
        k.removeprefix("train_") for k in keys if k.startswith("train_") and k not in metrics
    )


def per_epoch(terms: Iterable[str]) -> tuple[EpochMetric, ...]:
    """What a phase run whose strategy names `terms` logs at every epoch, in the order
    seqgen.training.epochs.EpochRecord.metrics() logs them."""
    return (
        *(
            EpochMetric(f"{split}_{q}", drawn=split != "test")
            for split in ("train", "val", "test")
            for q in ("loss", *terms)
        ),
        EpochMetric("val_loss_teacher_forced"),
        *(EpochMetric(k, drawn=True) for k in SCHEDULES),
        EpochMetric("grad_norm"),
        EpochMetric("epoch_seconds"),
        EpochMetric("nonfinite_steps"),
    )


def drawn(terms: Iterable[str]) -> tuple[str, ...]:
    """The histories the analysis pulls for runs whose strategies name `terms`."""
    return tuple(m.key for m in per_epoch(terms) if m.drawn)


PER_EPOCH = per_epoch(SEED_TERMS)  # a phase run of the seed's strategies
DRAWN = drawn(SEED_TERMS)
# Logged once when a phase ends.
PHASE_END = ("best_val_loss", "best_epoch", "phase_seconds", "peak_memory_mb")


@dataclass(frozen=True)
class RunColumn:
    """A number per phase run: a column of per_run.csv, and of summary.csv as mean and std over
    seeds."""

    key: str
    label: str  # column header in the report's summary table
    at_best: str = ""  # read from this per-epoch metric at the run's best epoch; "" = PHASE_END
    cost: bool = False  # what training cost, shown after the test measures (else how it trained)
    per: float = 1.0  # the report shows the value divided by this (60: seconds as minutes)


def run_columns(terms: Iterable[str]) -> tuple[RunColumn, ...]:
    """The per-run columns of runs whose strategies name `terms`: each term at the best epoch."""
    label = {"mae": "MAE"}
    return (
        RunColumn("best_val_loss", "best val loss"),
        *(
            RunColumn(f"val_{t}_at_best", f"val {label.get(t, t)}@best", at_best=f"val_{t}")
            for t in terms
        ),
        RunColumn("phase_seconds", "train time (min)", cost=True, per=60.0),
        RunColumn("peak_memory_mb", "peak MB", cost=True),
    )


RUN_COLUMNS = run_columns(SEED_TERMS)


def run_columns_in(columns: Iterable[str]) -> tuple[RunColumn, ...]:
    """run_columns of the terms whose `val_<term>_at_best` (or its _mean) is among `columns`."""
    terms = set()
    for c in columns:
        c = c.removesuffix("_mean")
        if c.startswith("val_") and c.endswith("_at_best"):
            terms.add(c.removeprefix("val_").removesuffix("_at_best"))
    return run_columns(order_terms(terms))
