"""Draws docs/schedules.png: the learning-rate and teacher-forcing schedules of the full plan, as
the trainer computes them (seqgen.training.schedules on the settings of experiments/phases.toml).

    python benchmarks/schedules_figure.py [--out docs/schedules.png]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from seqgen.config import N_PHASES, resolve  # noqa: E402
from seqgen.training.schedules import learning_rate, teacher_forcing_ratio  # noqa: E402

STYLE = {"mae": ("tab:blue", "-"), "autocorr": ("tab:orange", "--"), "combined": ("tab:green", ":")}


def plan(strategy: str) -> tuple[list[int], list[float], list[float]]:
    """Global epochs, lr and teacher-forcing ratio of the five phases: phase 1 starts a model,
    phases 2-5 continue one (so they take the continued schedule)."""
    epochs, lrs, ratios, first = [], [], [], 1
    for phase in range(1, N_PHASES + 1):
        s = resolve(strategy, phase)
        schedule = s.new_training_schedule if phase == 1 else s.continued_schedule
        for e in range(s.epochs):
            epochs.append(first + e)
            lrs.append(learning_rate(schedule, e, s.epochs, s.start_lr, s.min_lr))
            tf = teacher_forcing_ratio(e, s.epochs, s.teacher_forcing_start, s.teacher_forcing_end)
            ratios.append(tf)
        first += s.epochs
    return epochs, lrs, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/schedules.png")
    args = parser.parse_args()
    fig, (zoom, whole, tf) = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    for strategy, (color, ls) in STYLE.items():
        epochs, lrs, ratios = plan(strategy)
        first = resolve(strategy, 1)
        label = f"{strategy}: phase 1 {first.new_training_schedule}, then linear"
        n = first.epochs
        zoom.plot(epochs[:n], lrs[:n], color=color, ls=ls, lw=1.6, label=label)
        whole.plot(epochs, lrs, color=color, ls=ls, lw=1.4)
        tf.plot(epochs, ratios, color=color, ls=ls, lw=1.4)
    for ax in (whole, tf):
        for boundary in range(100, 500, 100):
            ax.axvline(boundary + 0.5, color="0.8", lw=0.8, zorder=0)
    zoom.set(title="phase 1: new training", xlabel="epoch", ylabel="learning rate")
    zoom.legend(fontsize=7, loc="lower center")
    whole.set(title="all five phases", xlabel="global epoch", ylabel="learning rate", yscale="log")
    tf.set(title="teacher-forcing ratio", xlabel="global epoch", ylabel="ratio")
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
