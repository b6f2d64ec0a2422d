"""Graph capture without a GPU (issue #26, item 1): every new signature (member count, batch
shape, dtype) runs eagerly before a graph of it is captured, the epoch's smaller last batch too.
EagerCapture stands in for CUDA: it refuses what a GPU refuses while a stream captures."""

import pytest
import torch
from test_batched import histories, settings
from test_stacked import CHAINS, CPU, batches, make_stack, single_model

from seqgen.training import train
from seqgen.training.graphs import CaptureError, EagerCapture, GraphSet
from seqgen.training.losses import make_loss
from seqgen.training.stacked_step import StackedStepGraphs, stacked_precision, stacked_step
from seqgen.training.step import (
    StepGraphs,
    choose_precision,
    graph_capture,
    optimizer_step,
    sampling_generator,
)
from seqgen.training.train import train_phases


def matmul_body(x: torch.Tensor, w: torch.Tensor):
    return lambda: (x @ w,)


def test_eager_capture_refuses_what_a_capturing_stream_refuses():
    capture = EagerCapture()
    w = torch.randn(3, 4)
    capture.warm(matmul_body(torch.randn(8, 3), w))
    capture.capture(matmul_body(torch.randn(8, 3), w))  # warmed: fine
    with pytest.raises(CaptureError, match=r"\[\(4, 3\), \(3, 4\)\] first ran while"):
        capture.capture(matmul_body(torch.randn(4, 3), w))  # the last batch, never run eagerly
    with pytest.raises(CaptureError, match="first ran while capturing"):
        capture.capture(matmul_body(torch.randn(8, 3).double(), w.double()))  # a new dtype
    with pytest.raises(CaptureError, match="on the host"):
        one = torch.ones(1)
        capture.capture(lambda: float(one))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(CaptureError, match="cache"):
        capture.capture(matmul_body(torch.randn(8, 3), w))
    assert capture.captures == 1


def test_graph_set_warms_each_new_key_once_before_its_capture():
    capture, events = EagerCapture(), []
    warm, capture_graph = capture.warm, capture.capture
    capture.warm = lambda body: (events.append("warm"), warm(body))[1]
    capture.capture = lambda body: (events.append("capture"), capture_graph(body))[1]
    graphs, w = GraphSet(capture), torch.randn(3, 4)

    def make(rows):
        x = torch.randn(rows, 3)
        return x, matmul_body(x, w)

    for rows in (8, 8, 4, 8, 4):  # an epoch's batches: the last one smaller
        x, graph = graphs.get(rows, lambda rows=rows: make(rows))
        x.copy_(torch.ones(rows, 3))
        graph.replay()
        torch.testing.assert_close(graph.outputs[0], torch.ones(rows, 3) @ w)
    graphs.clear()  # StepGraphs' next epoch: captured again, not warmed again
    graphs.get(8, lambda: make(8))
    assert events == ["warm", "capture", "warm", "capture", "capture"]


def epoch_of_batches(sizes, members):
    """The trainer's order: full batches, then the smaller rest (4,400 at 32: ..., 32, 16)."""
    g = torch.Generator().manual_seed(3)
    return [
        [(torch.randn(members, b, 2, generator=g), torch.randn(members, b, 12, 3, generator=g))]
        for b in sizes
    ]


def test_stacked_step_graphs_in_the_trainers_order_equal_the_eager_step():
    """Batches of 4, the last of 2, then 4 again (the next epoch): each shape captured only
    after it ran eagerly, and every replay equals the eager step to the bit."""
    steps = epoch_of_batches([4, 2, 4], members=3)
    eager, eager_opt, loss_fn = make_stack(CHAINS)
    graphed, graphed_opt, _ = make_stack(CHAINS)
    capture = EagerCapture()
    precision = [stacked_precision(choose_precision(CPU, False), 3) for _ in range(2)]
    graphs = StackedStepGraphs(graphed, loss_fn, graphed_opt, precision[1], capture)
    generators = [[sampling_generator(c.seed, 0, CPU) for c in CHAINS] for _ in range(2)]
    settings_ = [[c.ratio for c in CHAINS], [c.noise for c in CHAINS], [c.clip for c in CHAINS]]
    for micro in steps:
        want = stacked_step(
            eager, loss_fn, micro, eager_opt, precision[0], generators[0], *settings_
        )
        got = stacked_step(
            graphed, loss_fn, micro, graphed_opt, precision[1], generators[1], *settings_,
            graphs=graphs,
        )  # fmt: skip
        assert torch.equal(got.loss, want.loss) and torch.equal(got.stepped, want.stepped)
    assert capture.captures == 2  # batch 4 and batch 2
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_step_graphs_capture_the_last_batch_after_warming_it():
    chain = CHAINS[0]  # no noise, dropout or teacher forcing: nothing random in the step
    eager, graphed = single_model(chain), single_model(chain)
    loss_fn = make_loss(chain.alpha, chain.max_lag)
    capture = EagerCapture()
    graphs = StepGraphs(graphed, loss_fn, choose_precision(CPU, False), 0.0, capture)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=chain.lr) for m in (eager, graphed)]
    for epoch in range(2):
        graphs.new_epoch(chain.ratio)
        steps = [
            [(p[0], y[0]) for p, y in micro]
            for micro in batches(3, seed=epoch, members=1, accumulate_at=())
        ]
        steps[-1] = [(p[:1], y[:1]) for p, y in steps[-1]]  # the epoch's last batch: 1 row
        for micro in steps:
            args = (chain.ratio, 0.0, chain.clip)
            want = optimizer_step(eager, loss_fn, micro, optimizers[0], graphs.precision, *args)
            got = optimizer_step(
                graphed, loss_fn, micro, optimizers[1], graphs.precision, *args, graphs
            )
            assert got == want
    assert capture.captures == 4  # two shapes per epoch, warmed once each


def test_the_trainer_captures_every_shape_after_running_it(store, smoke_data, monkeypatch):
    """Two members trained by the real trainer through the graphed path (32 training samples
    in batches of 12: the last batch has 8): the same metrics as the eager path."""
    monkeypatch.setenv("SEQGEN_CPU_PRECISION", "float32")
    made = []  # the captures the trainer used
    monkeypatch.setattr(
        train, "graph_capture", lambda *a: made.append(graph_capture(*a)) or made[-1]
    )
    runs = {}
    for mode in ("0", "emulate"):
        monkeypatch.setenv("SEQGEN_CUDA_GRAPHS", mode)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"graphs-{mode}")
        assert (graph_capture(CPU, 1) is None) == (mode == "0")
        phases = [
            settings(s, 1, smoke_data, seed=1, batch_size=12, outputs_root=mode)
            for s in ("mae", "combined")
        ]
        runs[mode] = [histories(r.run_id) for r in train_phases(phases)]
    assert made[0] is None and made[1].captures == 2  # batches of 12 and the last one of 8
    assert runs["emulate"] == runs["0"]
