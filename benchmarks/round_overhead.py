"""The batched study's time outside its epochs, per round of members (issue #26, item 4).

    python benchmarks/round_overhead.py [--preset smoke] [--strategies a,b] [--seeds 0,1,2]
        [--epochs N] [--json PATH]

Runs `seqgen study --batched` (the strategies, default every one, x the seeds, phases 1-5) in this
process on a fresh sqlite store and embedded data (40 samples at `smoke`), and times each round
(the phase of all chains as one stack: `train_phases`) against the epochs inside it (`run_epoch`:
training steps and evaluation). A round's overhead is its wall time outside its epochs: the
checkpoints and records of each epoch, the members' setup before the first epoch and their ends
after the last (final files, model logging and registration). The tail is what the study waits for
after its last round (records still landing) and the head what it does before the first (checks,
the chains' runs). Per round: (wall of the whole study - its epochs) / rounds, which charges head
and tail to the rounds too.

Before item 4 (2026-12-07, AMD EPYC with avx512_bf16, 2 threads, a machine shared at load ~5):
9 chains x 5 phases at `smoke` took 128.9 s, 52.4 s of it in epochs: 15.3 s per round outside
its epochs (9.6-17.4 by round), against a target of 2 s. Under cProfile (9 chains x 2 phases)
most of it was the members' ends, one after another: `RunKeeper.finish` about 1.05 s per member,
of which model registration 0.75 s (`log_phase_model` 0.41 s); then `running` (claim, setup
records) about 0.09 s and `epoch_done` about 0.1 s per member-epoch.

After item 4 (2026-12-07, AMD EPYC with avx512_bf16, 2 threads, a machine shared with other
engineers; main dddbbb4 before, courier fc219b6 after, run back to back twice with
`--strategies mae,autocorr,combined`, 9 chains x 5 phases at `smoke`), per round outside its
epochs, head and tail charged: 13.06 -> 3.94 s (load ~3) and 5.91 -> 2.61 s (load ~2.5); the
rounds themselves 10.9-12.2 -> 1.6-4.2 s and 4.5-5.4 -> 1.5-2.3 s; the study's wall 105.8 ->
32.6 s and 33.4 -> 20.6 s. Some of the saving moves into the epochs (the previous round's
records land beside them: epochs 3.8 -> 7.5 s in the second pair), so compare the walls. All
4 strategies (12 chains, courier 76f41fe): 7.42 -> 3.75 and 9.36 -> 5.04 s per round, walls
52.1 -> 27.4 and 51.7 -> 34.8 s. What is left on the critical path per member and round: its
checkpoints (files and optimiser state), the run's claim (create, rival check), the version's
reservation (two calls) and the next round's setup.

Then (2026-12-07, AMD EPYC (avx2, avx512f, avx512_bf16), 2 threads, shared, `nice -n 19`; main
aa883a4 before, round-overhead 40bf0a6 after, four pairs run back to back, alternating): a run's
LoggedModel is made by its courier with its first records, its checkpoint and model files are
written by one file thread while the next epoch trains (serialised on the training thread), the
members' leases are read in one call before their ends, and the commit is asked of git once per
process. Under a wall-clock sampler on the training thread these had been, per 9-member round, ~0.6
s of fsync'd file writes, 0.4 s of create_logged_model, 0.25 s of get_run before each reservation
and 0.25 s of `git describe`. The rounds outside their epochs, mean (range) by pair: 2.04
(1.62-2.46) -> 1.69 (1.40-2.24), 1.75 (1.45-2.52) -> 1.01 (0.68-1.84), 1.72 (1.47-2.38) -> 1.34
(0.90-1.76), 2.25 (1.97-2.76) -> 1.54 (1.08-1.98) s (load 1.7-3.2); per round with head and tail
charged 2.67 -> 2.56, 2.43 -> 1.74, 2.43 -> 3.02, 3.26 -> 3.17 s; the study's wall 37.5 -> 50.9
(epochs 24.1 -> 38.1 at load 2.6-3.2), 44.2 -> 32.8, 33.8 -> 33.9, 38.4 -> 35.0 s. The tail grew
(head and tail 3.2-5.0 -> 3.6-8.4 s): the landing thread is now the study's bottleneck when epochs
are fast. Sampled in a quiet run (epochs 7.2 s), it was busy 18.7 s of the study's 23.4, 12.5 s of
it in Model.log (file copies, the package's code twice per member among them, 6.2 s; the metrics of
the best step, 1.9 s). Still on the critical path per member and round: the run's claim (create,
rival check: 40-60 ms), the phase's lookups (the variant's records, the run by phase key: ~40 ms)
and the version's reservation (25-55 ms); per study, the first torch optimiser (imports
torch._dynamo, ~1 s) in the first round and, in the head, the fresh store's schema (3-4.5 s; a
store in use has it).

Merged (2026-12-07, same AMD EPYC, 2 threads, nothing else running, `nice -n -10`; main 9cc620a
before, its merge ef4e224 after, two pairs alternating): the rounds outside their epochs 2.32,
1.88, 1.50, 1.86, 1.44 -> 1.70, 0.91, 1.00, 1.01, 0.91 s and 2.55, 1.86, 1.86, 1.96, 2.07 ->
1.78, 1.03, 1.52, 1.71, 1.60 s; head and tail 4.21 -> 7.47 and 7.03 -> 9.67 s; per round with
them charged 2.64 -> 2.60 and 3.47 -> 3.46 s; the study's wall 19.3 -> 20.6 and 23.4 -> 26.5 s
(epochs 6.1 -> 7.6 and 6.1 -> 9.2 s: the landings run beside them on the same 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--strategies", help="comma-separated (default: every strategy)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=40, help="embedded samples to make")
    ap.add_argument("--phases", default="1,2,3,4,5")
    ap.add_argument("--epochs", type=int, help="per phase (default: the preset's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    seeds, phases = (
        [int(s) for s in args.seeds.split(",")],
        [int(p) for p in args.phases.split(",")],
    )
    overrides = {"epochs": args.epochs} if args.epochs else {}
    names = args.strategies.split(",") if args.strategies else None
    result = study_overhead(args.preset, seeds, phases, args.samples, overrides, names)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def study_overhead(
    preset: str,
    seeds: list[int],
    phases: list[int],
    samples: int,
    overrides: dict,
    names: list[str] | None = None,
) -> dict:
    """The batched study (every strategy x seeds x phases) in a fresh folder and sqlite store,
    timed per round against its epochs."""
    work = Path(tempfile.mkdtemp(prefix="round-overhead-"))
    os.chdir(work)
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[key]
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    logging.getLogger("seqgen").setLevel(logging.WARNING)
    try:
        return measure(work, preset, seeds, phases, samples, overrides, names)
    finally:
        os.chdir("/")
        shutil.rmtree(work, ignore_errors=True)


def measure(
    work: Path,
    preset: str,
    seeds: list[int],
    phases: list[int],
    samples: int,
    overrides: dict,
    names: list[str] | None = None,
) -> dict:
    import torch

    from seqgen.bench import cpu_name
    from seqgen.config import strategies
    from seqgen.data.synth import synthesize
    from seqgen.study import batched
    from seqgen.training import train

    synthesize(work / "data", n_samples=samples, seed=0, progress=False)
    epochs: list[float] = []
    rounds: list[dict] = []
    real_epoch, real_phases = train.run_epoch, train.train_phases

    def timed_epoch(*a, **kw):
        started = time.perf_counter()
        try:
            return real_epoch(*a, **kw)
        finally:
            epochs.append(time.perf_counter() - started)

    def timed_round(*a, **kw):
        before, started = len(epochs), time.perf_counter()
        try:
            return real_phases(*a, **kw)
        finally:
            wall = time.perf_counter() - started
            inside = sum(epochs[before:])
            rounds.append({"wall_s": wall, "epochs_s": inside, "outside_s": wall - inside})

    train.run_epoch, batched.train_phases = timed_epoch, timed_round
    names = names or list(strategies())
    overrides = overrides | {"data_dir": str(work / "data")}
    started = time.perf_counter()
    try:
        outcomes = batched.run_batched_study(names, seeds, phases, preset, overrides)
    finally:
        train.run_epoch, batched.train_phases = real_epoch, real_phases
    wall = time.perf_counter() - started
    if any(o.status != "done" for o in outcomes):
        raise RuntimeError(f"the study failed: {[o.status for o in outcomes]}")
    in_rounds = sum(r["wall_s"] for r in rounds)
    outside = wall - sum(epochs)
    result = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "preset": preset,
        "phases": len(phases),
        "chains": len(names) * len(seeds),
        "rounds": len(rounds),
        "study_wall_s": round(wall, 1),
        "epochs_s": round(sum(epochs), 1),
        "outside_epochs_per_round_s": round(outside / len(rounds), 2),
        "round_outside_epochs_s": [round(r["outside_s"], 2) for r in rounds],
        "head_and_tail_s": round(wall - in_rounds, 2),
    }
    return result


if __name__ == "__main__":
    main()
