"""Start a few worker processes with a real ``torch.distributed`` process group.

The course runs expert parallelism on one machine: gloo over loopback on the CPU, NCCL
on GPUs. Workers are started with the ``spawn`` start method, which works from a
script, from pytest and from a Jupyter kernel alike, as long as the worker function
lives in an importable module (not in the notebook itself: spawn pickles functions by
their module and name).

Every worker writes what it returns (or the error it raised) to a file; the parent
waits with a deadline and kills what is still running after it, so a bug that
deadlocks a collective fails loudly instead of hanging the notebook or CI.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# NVLink SHARP (multicast) needs fabric support that shared machines often lack; the
# course never needs it, and leaving it on can make NCCL hang at the first collective.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0"}


class WorkerError(RuntimeError):
    """A worker process raised; the message carries its rank and traceback."""


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nobody is listening on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_entry(rank, fn, world_size, backend, port, collective_timeout_s, result_dir, args):
    result_path = Path(result_dir) / f"rank{rank}.pt"
    try:
        if backend == "nccl":
            for key, value in NCCL_ENV.items():
                os.environ[key] = value  # forced: the course never wants NVLink multicast
            torch.cuda.set_device(rank)  # one GPU per rank; all_gather_object needs it set
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            # A collective that waits longer than this raises instead of hanging.
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
        try:
            outcome = {"result": fn(rank, world_size, *args)}
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # report every failure to the parent, then exit
        outcome = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    torch.save(outcome, result_path)


def launch(fn, world_size: int, *, backend: str = "gloo", args: tuple = (), timeout_s: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return their results.

    ``fn`` must be a module-level function of an importable module. Each process joins
    one process group (``backend`` "gloo" on the CPU, "nccl" with one GPU per rank).
    Raises :class:`WorkerError` if a worker raised, ``TimeoutError`` if the workers are
    not all done after ``timeout_s`` seconds (they are killed).
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (GPUs), got {backend!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"backend='nccl' with world_size={world_size} needs {world_size} GPUs, "
            f"this machine has {torch.cuda.device_count()}; use backend='gloo' on the CPU"
        )
    ctx = mp.get_context("spawn")
    port = free_loopback_port()
    # Collectives give up a little before the parent does, so a hang becomes an error message.
    collective_timeout_s = max(5.0, 0.75 * timeout_s)
    with tempfile.TemporaryDirectory(prefix="moe_learn_launch_") as result_dir:
        procs = []
        for rank in range(world_size):
            proc = ctx.Process(
                target=_worker_entry,
                args=(rank, fn, world_size, backend, port, collective_timeout_s, result_dir, args),
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        if stuck:
            raise TimeoutError(f"ranks {stuck} were still running after {timeout_s:.0f} s and were killed")
        results = []
        for rank, proc in enumerate(procs):
            path = Path(result_dir) / f"rank{rank}.pt"
            if not path.exists():
                raise WorkerError(f"rank {rank} exited with code {proc.exitcode} without reporting a result")
            outcome = torch.load(path, weights_only=False)
            if "error" in outcome:
                raise WorkerError(f"rank {rank} raised {outcome['error']}\n{outcome['traceback']}")
            results.append(outcome["result"])
        return results
