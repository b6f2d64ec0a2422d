"""The stacked training step on a CUDA GPU: checks that need one, each an assertion.

    python benchmarks/cuda_stacked_step.py [--json PATH]
    python benchmarks/cuda_stacked_step.py --cpu-dry-run   # the same script on the CPU, no graphs

Needs a CUDA GPU; imports only torch and seqgen's model, loss and step (no MLflow). Three chains
of the `full` shape with different settings each (alpha, max_lag, lr, weight decay, clipping,
noise, dropout, teacher forcing), every member its own seed and batch:

1. a stacked step through CUDA graphs (`StackedStepGraphs`: forward, backward, clipping, AdamW
   and the scalers in one graph, draws made eagerly before each replay) equals the eager stacked
   step: the same losses, norms, weights and optimiser state after several steps and two batch
   sizes, in float32 and under fp16 autocast with a GradScaler per member;
2. a member of an eager stack on CUDA equals its chain trained alone with today's
   `optimizer_step` on CUDA (float32, draws from the chain's seeded CUDA generator); it also
   prints, without asserting, how far today's graphed single-chain step (`StepGraphs`, which draws
   inside its graph) is from the same;
3. fp16 through the graph: member 1's scale so large that its gradients overflow: it skips its
   steps and backs off alone while the others step, until its steps go through;
4. a frozen member is untouched through the graph while the others train.

--cpu-dry-run runs the same checks on the CPU with the eager step in place of the graph (and a
smaller shape), to check the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from seqgen.config import resolve  # noqa: E402
from seqgen.model.generator import ModelConfig, StreamlinedSequenceGenerator  # noqa: E402
from seqgen.model.stacked import StackedGenerators  # noqa: E402
from seqgen.training.losses import Objective, alpha_weights, make_loss  # noqa: E402
from seqgen.training.stacked_step import (  # noqa: E402
    StackedAdamW,
    StackedPrecision,
    StackedStepGraphs,
    stacked_precision,
    stacked_step,
)
from seqgen.training.step import (  # noqa: E402
    StepGraphs,
    choose_precision,
    optimizer_step,
    sampling_generator,
    seed_epoch,
)

K, P = 5, 2
S = resolve("combined", 1, "full")


@dataclasses.dataclass
class Chain:
    seed: int
    alpha: float
    max_lag: int
    lr: float
    weight_decay: float
    clip: float
    noise: float
    dropout: float
    ratio: float


CHAINS = [
    Chain(
        0,
        S.alpha,
        S.max_lag,
        S.start_lr,
        S.weight_decay,
        S.clip_grad_norm,
        S.noise_level,
        S.dropout,
        S.teacher_forcing_start,
    ),
    Chain(1, 1.0, S.max_lag, 3e-3, 0.0, 1e9, 0.0, 0.0, 0.0),
    Chain(2, 0.0, 5, 5e-4, 0.1, 0.1, 0.1, 0.2, 1.0),
]


@dataclasses.dataclass
class Setup:
    dev: torch.device
    graphs: bool  # False: --cpu-dry-run
    hidden: int
    T: int

    def config(self, dropout: float) -> ModelConfig:
        return ModelConfig(K, P, self.hidden, S.num_layers, dropout)


def singles(setup: Setup) -> list[StreamlinedSequenceGenerator]:
    models = []
    for c in CHAINS:
        torch.manual_seed(c.seed)
        models.append(StreamlinedSequenceGenerator(setup.config(c.dropout)).to(setup.dev).train())
    return models


def stack_of(setup: Setup, models, mixed: bool):
    stack = StackedGenerators.from_models([copy.deepcopy(m) for m in models]).train()
    optimizer = StackedAdamW(
        list(stack.parameters()), [c.lr for c in CHAINS], [c.weight_decay for c in CHAINS]
    )
    loss_fn = Objective([alpha_weights(c.alpha) for c in CHAINS], [c.max_lag for c in CHAINS])
    precision = stacked_precision(choose_precision(setup.dev, mixed), len(CHAINS))
    if mixed and setup.dev.type == "cpu":  # the dry run: CPU fp16 with a scaler, as on CUDA
        precision = StackedPrecision(setup.dev, torch.float16, precision.scaler, "fp16")
        precision.scaler.enabled = True
    return stack, optimizer, loss_fn, precision


def batches(setup: Setup, sizes: list[int], seed: int = 10):
    g = torch.Generator().manual_seed(seed)
    M = len(CHAINS)
    return [
        (
            torch.randn(M, b, P, generator=g).to(setup.dev),
            torch.randn(M, b, setup.T, K, generator=g).to(setup.dev),
        )
        for b in sizes
    ]


def run_stack(setup, stack, optimizer, loss_fn, precision, steps, graphed, frozen=None):
    graphs = StackedStepGraphs(stack, loss_fn, optimizer, precision) if graphed else None
    generators = [sampling_generator(c.seed, 0, setup.dev) for c in CHAINS]
    return [
        stacked_step(
            stack,
            loss_fn,
            [batch],
            optimizer,
            precision,
            generators,
            [c.ratio for c in CHAINS],
            [c.noise for c in CHAINS],
            [c.clip for c in CHAINS],
            frozen,
            graphs,
        )
        for batch in steps
    ]


def weight_gap(stack, m: int, state_dict: dict, chain: Chain) -> float:
    """The largest difference between member m's weights and a state dict's. Not head.bias of a
    pure autocorrelation chain: the autocorrelation does not see a constant shift, so that
    gradient is zero up to rounding, and Adam turns rounding noise into steps of +-lr."""
    return max(
        (stack.weight(k)[m] - v).abs().max().item()
        for k, v in state_dict.items()
        if not (k == "head.bias" and chain.alpha == 0.0)
    )


def check_graph_equals_eager(setup: Setup) -> None:
    models = singles(setup)
    # The trainer's order, two epochs of 80 (4,400 at 32 ends the same way): full batches, then
    # the smaller last one. Graphed first, as the trainer runs it: an eager step of batch 16
    # before would compile its kernels and hide a capture that compiles them (issue #26).
    steps = batches(setup, [32, 32, 16] * 2)
    for mixed in (False, True):
        runs = []
        for graphed in (setup.graphs, False):
            stack, optimizer, loss_fn, precision = stack_of(setup, models, mixed)
            results = run_stack(setup, stack, optimizer, loss_fn, precision, steps, graphed)
            runs.append((stack, optimizer, results))
        (graph, graph_opt, graph_r), (eager, eager_opt, eager_r) = runs
        tol = 1e-5 if not mixed else 1e-3
        for a, b in zip(eager_r, graph_r, strict=True):
            for field in ("losses", "grad_norm"):
                torch.testing.assert_close(getattr(b, field), getattr(a, field), atol=tol, rtol=tol)
            assert torch.equal(a.stepped, b.stepped)
            assert mixed or bool(a.stepped.all())  # fp16 may overflow at the first scale
        for m, c in enumerate(CHAINS):
            assert weight_gap(graph, m, eager.member_state_dict(m), c) <= tol, (mixed, m)
        for a, b in zip(eager_opt.exp_avg_sq, graph_opt.exp_avg_sq, strict=True):
            torch.testing.assert_close(b, a, atol=tol, rtol=tol)
        assert torch.equal(eager_opt.steps, graph_opt.steps)
    print(
        "1. a graphed stacked step equals the eager one (batches 32, 32, 16 twice, graphed "
        "first; float32 and fp16 with a GradScaler per member)"
    )


def check_member_equals_single(setup: Setup) -> dict:
    models = singles(setup)
    steps = batches(setup, [32, 32, 32])
    stack, optimizer, loss_fn, precision = stack_of(setup, models, mixed=False)
    results = run_stack(setup, stack, optimizer, loss_fn, precision, steps, graphed=False)
    graphed_gap = {}
    for m, (c, model) in enumerate(zip(CHAINS, models, strict=True)):
        ways = [(False, model)] + ([(True, copy.deepcopy(model))] if setup.graphs else [])
        for graphed, single in ways:
            optimizer_1 = torch.optim.AdamW(
                single.parameters(), lr=c.lr, weight_decay=c.weight_decay
            )
            loss_1 = make_loss(c.alpha, c.max_lag)
            precision_1 = choose_precision(setup.dev, False)
            graphs = StepGraphs(single, loss_1, precision_1, c.noise) if graphed else None
            if graphs:
                graphs.new_epoch(c.ratio)
            seed_epoch(c.seed, 0)
            for step, (params, targets) in enumerate(steps):
                r = optimizer_step(
                    single,
                    loss_1,
                    [(params[m], targets[m])],
                    optimizer_1,
                    precision_1,
                    c.ratio,
                    c.noise,
                    c.clip,
                    graphs,
                )
                if not graphed:
                    ours = results[step].members(loss_fn.names)[m]
                    assert abs(ours.loss - r.loss) <= 1e-4 * abs(r.loss), (m, step, ours, r)
            gap = weight_gap(stack, m, single.state_dict(), c)
            if graphed:
                graphed_gap[f"member {m}"] = gap
            else:
                assert gap < 1e-4, (m, gap)
    print(
        "2. each member of the stack equals its chain trained alone with optimizer_step "
        "(3 steps, weights within 1e-4)"
    )
    if graphed_gap:
        print(f"   today's graphed single step vs the member, largest weight gap: {graphed_gap}")
    return graphed_gap


def check_overflow_skips_one_member(setup: Setup) -> None:
    models = singles(setup)
    stack, optimizer, loss_fn, precision = stack_of(setup, models, mixed=True)
    # members 0 and 2 at a scale well clear of overflow, member 1 far beyond it
    for m, scale in enumerate([2.0**8, 2.0**40, 2.0**8]):
        state = {**precision.scaler.member_state_dict(m), "scale": scale}
        precision.scaler.load_member_state_dict(m, state)
    before = stack.member_state_dict(1)
    steps = batches(setup, [32] * 60)
    graphs = StackedStepGraphs(stack, loss_fn, optimizer, precision) if setup.graphs else None
    generators = [sampling_generator(c.seed, 0, setup.dev) for c in CHAINS]
    skipped = 0
    for i, batch in enumerate(steps):
        r = stacked_step(
            stack,
            loss_fn,
            [batch],
            optimizer,
            precision,
            generators,
            [c.ratio for c in CHAINS],
            [c.noise for c in CHAINS],
            [c.clip for c in CHAINS],
            graphs=graphs,
        )
        stepped = r.stepped.tolist()
        assert stepped[0] and stepped[2], (i, stepped)
        if not stepped[1]:
            skipped += 1
            assert precision.scaler.member_state_dict(1)["scale"] == 2.0 ** (40 - skipped)
            assert all(torch.equal(stack.weight(k)[1], v) for k, v in before.items())
        else:
            break
    moved = not torch.equal(stack.weight("cell.w_in")[1], before["cell.w_in"])
    assert skipped >= 1 and moved, (skipped, moved)
    assert precision.scaler.scale[[0, 2]].tolist() == [2.0**8] * 2
    print(
        f"3. fp16 through the graph: member 1 (scale 2^40) skipped {skipped} overflowing steps "
        "alone and backed off, then stepped; members 0 and 2 stepped every time"
    )


def check_frozen(setup: Setup) -> None:
    models = singles(setup)
    stack, optimizer, loss_fn, precision = stack_of(setup, models, mixed=False)
    before = stack.member_state_dict(2)
    steps = batches(setup, [32, 32, 32])
    results = run_stack(
        setup,
        stack,
        optimizer,
        loss_fn,
        precision,
        steps,
        setup.graphs,
        frozen=[False, False, True],
    )
    assert all(torch.equal(stack.weight(k)[2], v) for k, v in before.items())
    assert all(r.stepped.tolist() == [True, True, False] for r in results)
    assert optimizer.steps.tolist() == [3.0, 3.0, 0.0]
    print("4. a frozen member is untouched through the graph; the others train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the findings here")
    parser.add_argument("--cpu-dry-run", action="store_true", help="CPU, eager, smaller shape")
    args = parser.parse_args()
    if args.cpu_dry_run:
        setup = Setup(torch.device("cpu"), graphs=False, hidden=32, T=40)
    elif not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here: this check needs one (or --cpu-dry-run)")
    else:
        setup = Setup(torch.device("cuda"), graphs=True, hidden=S.hidden_size, T=151)
    where = torch.cuda.get_device_name() if setup.graphs else "CPU dry run"
    print(f"{where}, torch {torch.__version__}, hidden {setup.hidden}, T {setup.T}")
    check_graph_equals_eager(setup)
    gap = check_member_equals_single(setup)
    check_overflow_skips_one_member(setup)
    check_frozen(setup)
    if args.json:
        args.json.write_text(json.dumps({"device": where, "graphed_single_gap": gap}))


if __name__ == "__main__":
    main()
