"""Kill points for fault-injection tests: SEQGEN_KILL_AT=<point> makes this process signal itself
when its bookkeeping reaches that point, as a machine lost (KILL, the default) or a job stopped
(SEQGEN_KILL_AT=<point>:TERM) at that exact moment. Unset, a point costs one dictionary lookup."""

from __future__ import annotations

import os
import signal

# A phase's end, in the order its bookkeeping passes them (keeper.py, delivery.py, tracking.py).
POINTS = (
    "run-created",  # the new run exists, its rival check not done yet
    "rival-checked",  # the claim stands
    "epoch-delivered",  # an epoch's metrics are in the store
    "model-logged",  # the LoggedModel exists, no version yet
    "version-created",  # the registry's version exists, no alias yet
    "aliases-set",  # aliases set, version tags not yet
    "tagged-registered",  # phase_state registered, the run still RUNNING
    "ended",  # the run FINISHED
)
REPORT_POINTS = ("report-set-aside",)  # compare: the old report moved aside, the new not yet in


def kill_point(name: str) -> None:
    """Signal this process when SEQGEN_KILL_AT names this point."""
    point, _, sig = os.environ.get("SEQGEN_KILL_AT", "").partition(":")
    if point == name:
        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))
