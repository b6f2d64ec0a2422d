"""What a study shows while it runs and when it ends, whether its chains run as Ray tasks
(seqgen/study/cluster.py) or side by side in one stacked model (seqgen/study/batched.py): one
live line per chain, then a table; the checks every study makes before it starts; and the
study's own run, which both kinds of study find again, take up and never leave RUNNING."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

from seqgen.config import PhaseSettings, resolve
from seqgen.data.sequences import SequenceData, load_sequences
from seqgen.errors import SeqgenError, TrackingError, first_line
from seqgen.runs import descriptions, tracking
from seqgen.runs.outputs import format_eta
from seqgen.training.start import load_phase_data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chain:
    """One chain of a study: a strategy at one grid point of a sweep (the settings it varies;
    none without --vary) and one seed. `variant` names it (plan_chains sets it)."""

    strategy: str
    seed: int
    point: tuple[tuple[str, Any], ...] = ()
    variant: str = ""  # the name its runs go by
    named: str | None = None  # a name given or from the store (seqgen/runs/variants.py)

    @property
    def name(self) -> str:
        return f"{self.variant or self.strategy}-s{self.seed}"

    def overrides(self, base: dict) -> dict:
        """The study's overrides with this chain's grid point (and name, where it has one)."""
        return base | dict(self.point) | ({"variant": self.named} if self.named else {})

    def settings(self, phase: int, preset: str, base: dict) -> PhaseSettings:
        return resolve(self.strategy, phase, preset, **(self.overrides(base) | {"seed": self.seed}))


def plan_chains(
    strategies: list[str], seeds: list[int], points: list[dict], phases: list[int], preset: str,
    overrides: dict,
) -> list[Chain]:  # fmt: skip
    """Every (strategy, grid point, seed) of a study, each phase's settings checked, named by
    the variant its first phase trains."""
    chains = []
    for strategy in strategies:
        for point in points:
            for seed in seeds:
                chain = Chain(strategy, seed, tuple(point.items()))
                for phase in phases:
                    chain.settings(phase, preset, overrides)  # every phase checked up front
                variant = chain.settings(phases[0], preset, overrides).variant_name
                chains.append(dataclasses.replace(chain, variant=variant))
    return chains


@dataclass
class ChainOutcome:
    """One line of the final table."""

    chain: str
    phases_done: int
    phases: int
    model: str  # the last registered models:/name/version
    seconds: float
    status: str  # done, or failed: <one-line reason>


def name_chains(
    chains: list[Chain], phase: int, preset: str, overrides: dict, data: dict
) -> list[Chain]:
    """The chains named as their runs go in this store (seqgen/study/chain.py: first_phase):
    on data its name's runs were not trained on, the data joins the name."""
    from seqgen.study.chain import first_phase

    named = []
    for c in chains:
        data_dir = c.settings(phase, preset, overrides).data_dir
        first = first_phase(
            c.strategy, c.seed, phase, preset, c.overrides(overrides), data[data_dir]
        )
        named.append(dataclasses.replace(c, variant=first.variant_name, named=first.variant))
    return named


def study_view(points: list[dict] | None) -> str:
    """The saved view a study's last lines link: a sweep's opens its runs grouped by variant."""
    from seqgen.runs import tracking

    return tracking.VARIANTS_VIEW if points not in (None, [{}]) else tracking.CURVES_VIEW


def load_study_data(
    chains: list[Chain], phases: list[int], preset: str, overrides: dict
) -> dict[str, SequenceData]:
    """The data of every data folder the chains train on, read and validated once, on the
    driver, checked against every phase's settings: {data_dir: data}."""
    data: dict[str, SequenceData] = {}
    for chain in chains:
        for phase in phases:
            s = chain.settings(phase, preset, overrides)
            if s.data_dir not in data:
                data[s.data_dir] = load_sequences(s.data_dir, s.n_components, s.n_params)
            load_phase_data(s, data[s.data_dir])  # max_lag against the sequence length, ...
    return data


def registered_models(chains: list[Chain], phases: list[int], preset: str, overrides: dict):
    """The registered models a study's phases add versions to (sorted): what a user must be
    allowed to edit (tracking.check_can_log)."""
    return sorted(
        {c.settings(p, preset, overrides).registered_model for c in chains for p in phases}
    )


# ---- the study's run ----------------------------------------------------------------------------


def open_study_run(
    exp_id: str, chains: list[Chain], phases: list[int], preset: str, overrides: dict,
    batched: bool = False,
) -> str:  # fmt: skip
    """The study's own run, parent of its phase runs: the one an earlier driver of the same
    study left RUNNING (it died), taken up, else a new one."""
    study = {"chains": [c.name for c in chains], "phases": phases, "preset": preset}
    study |= {"batched": True} if batched else {}  # the Ray study's key as it always was
    identity = json.dumps(study | {"overrides": overrides}, sort_keys=True, default=str)
    key = hashlib.sha256(identity.encode()).hexdigest()[:20]
    if left := tracking.running_run(exp_id, {"kind": "study", tracking.STUDY_KEY: key}):
        log.info(f"going on in study run {left}, left RUNNING by an earlier driver of this study")
        return left
    names = [c.name for c in chains]
    tags = {
        "kind": "study",
        "preset": preset,
        "phases": f"{phases[0]}-{phases[-1]}",
        "chains": ",".join(names),
        tracking.STUDY_KEY: key,
        tracking.NOTE: descriptions.study_text(names, preset, batched=batched),
    }
    tags |= {"batched": "true"} if batched else {}
    return tracking.create_run(exp_id, f"study-{preset}", tags, None)


@contextlib.contextmanager
def study_run_open(run_id: str) -> Iterator[None]:
    """The study's run ends KILLED on Ctrl-C or SIGTERM and FAILED on any other error, never
    left RUNNING (only a process killed outright leaves it so, and the next driver takes it up)."""
    try:
        yield
    except BaseException as e:
        with contextlib.suppress(TrackingError):
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            tracking.set_run_status(run_id, status)
        raise


def end_study_run(run_id: str, outcomes: list[ChainOutcome]) -> None:
    """FINISHED when every chain is done, else FAILED naming the chains that are not."""
    failed = [o.chain for o in outcomes if o.status != "done"]
    tracking.set_run_tags(run_id, {"failed_chains": ",".join(failed)})
    tracking.set_run_status(run_id, "FAILED" if failed else "FINISHED")


# ---- the chain: one Ray task ---------------------------------------------------------------------


def reason(e: BaseException) -> str:
    """One line for a chain that failed: the task's own error, or what happened to its node."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, SeqgenError):
        return str(cause)
    return f"{type(cause).__name__}: {first_line(cause)}"


class Screen:
    """One live line per chain (redrawn in place on a terminal by rich, printed on change
    otherwise), then the final table."""

    def __init__(self, out, chains: list[str], n_phases: int, echo: bool = True) -> None:
        """echo: off a terminal, print each line that changed (off when the log says it all)."""
        self.console = Console(file=out, highlight=False)
        self.chains, self.n_phases = chains, n_phases
        self.live = (
            Live(console=self.console, auto_refresh=False) if self.console.is_terminal else None
        )
        self.shown: dict[str, str] = {}
        self.echo = echo

    def line(self, chain: str, state: dict, outcome: ChainOutcome | None) -> str:
        if outcome is not None:
            return f"{chain:<24} {outcome.status[:70]}"
        if not state:
            return f"{chain:<24} waiting for a worker"
        phase, epoch = state.get("phase"), state.get("epoch")
        where = f"phase {phase}/{self.n_phases}" if phase else "starting"
        if epoch is not None:
            where += f"  epoch {epoch}/{state['last_epoch']}  ETA {format_eta(state['eta'])}"
        return f"{chain:<24} {where}  on {state.get('host', '?')}"

    def draw(self, board: dict, outcomes: dict) -> None:
        lines = {c: self.line(c, board.get(c, {}), outcomes.get(c)) for c in self.chains}
        if self.live is not None:
            if not self.live.is_started:
                self.live.start()
            self.live.update(Text("\n".join(lines[c] for c in self.chains)), refresh=True)
        elif self.echo:
            for c in self.chains:
                if self.shown.get(c) != lines[c]:
                    self.console.out(lines[c])
        self.shown = lines

    def table(self, outcomes: list[ChainOutcome]) -> None:
        if self.live is not None and self.live.is_started:
            self.live.stop()
        rows = [("chain", "phases", "model", "time", "status")]
        rows += [
            (
                o.chain,
                f"{o.phases_done}/{o.phases}",
                o.model.removeprefix("models:/"),
                format_eta(o.seconds),
                o.status,
            )
            for o in outcomes
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        self.console.out("")
        for r in rows:
            cells = "  ".join(v.ljust(w) for v, w in zip(r[:4], widths, strict=True))
            self.console.out(f"{cells}  {r[4]}")
