"""Ray 2.60 on this machine: how long a local instance and a 2-node cluster take to start, how soon
a task is retried elsewhere when its node is removed, stopped dead or killed, and how fast a driver
learns that a cluster address does not answer.

    python benchmarks/ray_timings.py [--skip-frozen]

"frozen" stops every process of a node with SIGSTOP: nothing closes its connections, as when a
machine drops off the network, so only Ray's health checks notice (the slowest case: by default
every 3 s with a 10 s timeout, 5 misses, so about 65 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from services import RayCluster, local_ray, with_descendants  # noqa: E402


def clock() -> float:
    return time.perf_counter()


def local_instance() -> None:
    started = clock()
    with local_ray(num_cpus=2):
        up = clock() - started

        @ray.remote(num_cpus=1)
        def threads():
            import torch

            return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads(), os.getpid()

        started = clock()
        first = ray.get(threads.remote())
        first_task = clock() - started
        # the same worker process may run a 2-CPU task next: torch keeps the threads it started with
        second = ray.get(threads.options(num_cpus=2).remote())
        array = np.random.default_rng(0).standard_normal((5500, 151, 5)).astype(np.float32)
        started = clock()
        ref = ray.put(array)
        put = clock() - started

        @ray.remote
        def total(a: np.ndarray) -> tuple[float, bool]:
            return float(a.sum(dtype=np.float64)), a.flags.writeable

        started = clock()
        got = ray.get(total.remote(ref))
        read = clock() - started
        assert abs(got[0] - float(array.sum(dtype=np.float64))) < 1e-6
        started = clock()
    down = clock() - started
    print(f"local ray.init(num_cpus=2): {up:.1f} s; first task {first_task:.1f} s; ", end="")
    print(f"shutdown {down:.1f} s")
    print(f"  1-CPU task: OMP_NUM_THREADS={first[0]}, torch threads {first[1]} (pid {first[2]})")
    print(f"  2-CPU task: OMP_NUM_THREADS={second[0]}, torch threads {second[1]} (pid {second[2]})")
    print(
        f"  ray.put of {array.nbytes / 1e6:.1f} MB float32 array: {put * 1000:.0f} ms; a task "
        f"summing it: {read * 1000:.0f} ms; the task's copy is writeable: {got[1]}"
    )


def node_loss(how: str) -> None:
    """Seconds from losing the node that runs a task (max_retries=1) to its retry starting."""
    marks = Path(tempfile.mkdtemp(prefix="seqgen-marks-"))
    started = clock()
    with RayCluster() as cluster:
        a, b = cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)
        cluster.connect()
        up = clock() - started

        @ray.remote(num_cpus=1, max_retries=1)
        def chain(folder: str) -> str:
            node = ray.get_runtime_context().get_node_id()
            Path(folder, f"{node}-{time.time_ns()}").touch()
            time.sleep(2)
            return node

        ref = chain.remote(str(marks))
        while not list(marks.iterdir()):
            time.sleep(0.02)
        first = next(marks.iterdir()).name.split("-")[0]
        lost = a if first == a.node_id else b
        started = clock()
        if how != "frozen":
            cluster.remove_node(lost, graceful=how == "removed")
            while len(list(marks.iterdir())) < 2:
                time.sleep(0.05)
            retry = clock() - started
            assert ray.get(ref, timeout=60) != first
            result = f"the task's retry started on the other node after {retry:.1f} s"
        else:
            frozen = with_descendants(
                i.process.pid for infos in lost.all_processes.values() for i in infos
            )
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            while any(n["NodeID"] == lost.node_id and n["Alive"] for n in ray.nodes()):
                time.sleep(0.5)
            dead = clock() - started
            ready, _ = ray.wait([ref], timeout=30)
            retried = len(list(marks.iterdir())) > 1
            started = clock()
            again = ray.get(chain.remote(str(marks)), timeout=60)
            resubmitted = clock() - started
            assert again != first
            for pid in frozen:
                os.kill(pid, signal.SIGKILL)
            cluster._cluster.worker_nodes.discard(lost)  # its processes are gone already
            result = (
                f"marked dead after {dead:.0f} s; 30 s later the task was "
                f"{'retried' if retried else 'not retried'} and "
                f"{'returned' if ready else 'still waited on'}; "
                f"the same task submitted again ran on the other node in {resubmitted:.1f} s"
            )
    shutil.rmtree(marks)
    print(f"cluster head + 2 nodes, driver connected: {up:.1f} s")
    print(f"  node {how}: {result}")


def unreachable_address() -> None:
    started = clock()
    try:
        socket.create_connection(("127.0.0.1", 1), timeout=3).close()
    except OSError as e:
        refused = clock() - started
        print(f"TCP probe of 127.0.0.1:1: {type(e).__name__} after {refused * 1000:.1f} ms")
    started = clock()
    os.environ["RAY_gcs_server_port_wait_time_s"] = "1"  # Ray's own retries: 20 x ~40 s otherwise
    try:
        ray.init(address="127.0.0.1:1")
    except Exception as e:  # noqa: BLE001  (the type is the finding)
        print(
            f"ray.init(address='127.0.0.1:1') with RAY_gcs_server_port_wait_time_s=1: "
            f"{type(e).__name__} after {clock() - started:.0f} s: {e}"
        )
    finally:
        del os.environ["RAY_gcs_server_port_wait_time_s"]
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-frozen", action="store_true", help="leave out the slow case")
    parser.add_argument("--skip-unreachable", action="store_true", help="leave out the 40 s case")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    local_instance()
    for how in ("removed", "killed") + (() if args.skip_frozen else ("frozen",)):
        node_loss(how)
    if not args.skip_unreachable:
        unreachable_address()
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
