"""CUDA graphs of the training and evaluation steps, and the rule that makes capturing them safe:
a graph is captured only after its signature (member count, batch shape, dtype) ran eagerly.

Why the rule: the first run of a kernel for a new shape or dtype may compile it (Triton
specialises its kernels on the batch size), load a module or create a library handle (cuBLAS),
and CUDA refuses all of these while a stream captures ("operation not permitted when stream is
capturing"). An epoch's last batch is smaller than the others (4,400 sequences in batches of 32
leave 16), a round of a study may stack fewer members than the last, and evaluation has batch
sizes of its own: each new signature is warmed up eagerly before its graph is captured
(`GraphSet`).

Two ways to capture behind one interface (warm, capture). `CudaCapture`: warm-ups on a side
stream, then torch.cuda.graph. `EagerCapture`, a stand-in on any device: it runs a graph's body
again at each replay and refuses what a GPU would refuse while capturing: an operation whose
shapes and dtypes never ran in a warm-up (what would compile, load or initialise during capture),
a read of a tensor's value on the host, and autocast with its weight cache on (a cast cached
during capture would be stale at replay). Tests and `benchmarks/gpu_check.py --cpu` run the
trainer's graphed path through it on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

Body = Callable[[], Any]  # a graph's work; returns its outputs (tensors in tuples and lists)


@dataclass
class Graph:
    """A captured graph: replay() reruns its work on the static inputs and rewrites `outputs`."""

    replay: Callable[[], None]
    outputs: Any
    keep: Any = None  # what must live as long as the graph (the CUDAGraph itself)


class CaptureError(RuntimeError):
    """What a GPU refuses while a stream captures, found by EagerCapture."""


class CudaCapture:
    """torch.cuda.graph, with warm-ups on a side stream as torch's CUDA-graph notes ask."""

    def warm(self, body: Body) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # the second run finds every lazy initialisation done
                body()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, body: Body) -> Graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = body()
        return Graph(graph.replay, outputs, keep=graph)


# Operations that read a tensor's value on the host: a sync on a GPU, refused while capturing
# (on a CPU tensor .cpu(), .tolist() and .numpy() dispatch nothing, so only these are seen).
HOST_READS = ("_local_scalar_dense", "nonzero", "equal", "is_nonzero", "item")


def _signature(func, args, kwargs) -> tuple:
    """An operation and the shapes and dtypes of its tensors: what a kernel specialises on."""
    leaves, _ = tree_flatten((args, kwargs))
    tensors = tuple(
        (tuple(x.shape), x.dtype, x.device.type) for x in leaves if isinstance(x, torch.Tensor)
    )
    return (str(func), tensors)


def _reads_host(func) -> bool:
    return func.overloadpacket.__name__ in HOST_READS


class HostReads(TorchDispatchMode):
    """Counts the operations of a block that read a tensor's value on the host (HOST_READS)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += _reads_host(func)
        return func(*args, **(kwargs or {}))


class _Record(TorchDispatchMode):
    def __init__(self, seen: set) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen.add(_signature(func, args, kwargs))
        return func(*args, **kwargs)


class _Refuse(TorchDispatchMode):
    """Inside a capture: refuse an operation never warmed up, and any host read."""

    def __init__(self, seen: set) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_host(func):
            raise CaptureError(f"{func} reads a tensor's value on the host inside a graph")
        if _signature(func, args, kwargs) not in self.seen:
            shapes = [s for s, _, _ in _signature(func, args, kwargs)[1]]
            raise CaptureError(
                f"{func} with shapes {shapes} first ran while capturing: a GPU would compile or "
                "initialise it there (operation not permitted when stream is capturing); warm "
                "this signature up eagerly first"
            )
        return func(*args, **kwargs)


class _NoAutocastCache(TorchFunctionMode):
    """Inside a capture: refuse autocast with its weight cache on (torch's CUDA-graph notes)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        on = any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))
        if on and torch.is_autocast_cache_enabled():
            raise CaptureError("autocast with cache_enabled=True inside a graph")
        return func(*args, **(kwargs or {}))


class EagerCapture:
    """A stand-in for CudaCapture on any device: each replay runs the body again and copies its
    outputs into the captured ones. `captures` counts the graphs made."""

    def __init__(self) -> None:
        self.seen: set = set()  # operation signatures that ran in warm-ups
        self.captures = 0

    def warm(self, body: Body) -> None:
        with _Record(self.seen):
            body()

    def capture(self, body: Body) -> Graph:
        with _NoAutocastCache(), _Refuse(self.seen):
            outputs = body()
        self.captures += 1

        def replay() -> None:
            fresh, _ = tree_flatten(body())
            for static, new in zip(tree_flatten(outputs)[0], fresh, strict=True):
                if isinstance(static, torch.Tensor):
                    static.copy_(new)

        return Graph(replay, outputs)


Capture = CudaCapture | EagerCapture


class GraphSet:
    """Graphs by signature, each captured after its signature ran eagerly: a new batch size,
    member count or dtype is warmed up first, once (its kernels stay compiled), even when a graph
    of it is captured again (StepGraphs captures anew each epoch)."""

    def __init__(self, capture: Capture | None = None) -> None:
        self.capture = capture if capture is not None else CudaCapture()
        self.graphs: dict[Hashable, tuple[Any, Graph]] = {}
        self.warmed: set[Hashable] = set()

    def get(
        self,
        key: Hashable,
        make: Callable[[], tuple[Any, Body]],
        warm_guard: Callable[[], AbstractContextManager] = nullcontext,
    ) -> tuple[Any, Graph]:
        """The graph of `key` and its static inputs; made on first use by make() -> (static
        inputs, body over them), after a warm-up of the body (inside warm_guard) when `key`
        never ran eagerly."""
        if key not in self.graphs:
            static, body = make()
            if key not in self.warmed:
                with warm_guard():
                    self.capture.warm(body)
                self.warmed.add(key)
            self.graphs[key] = (static, self.capture.capture(body))
        return self.graphs[key]

    def clear(self) -> None:
        """Drop the graphs (not what was warmed up)."""
        self.graphs = {}
