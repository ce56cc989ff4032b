"""A grid-wide barrier for kernels whose phases need every program's results: one launch, not one per phase.

A kernel launch costs 7-10 us of host time on the benchmark VMs (perf/NOTES.md), more than a small
phase's GPU time. Where phase 2 reads what every program of phase 1 wrote, the programs can instead
wait for each other inside one launch (``grid_sync``): each arrives on an atomic counter and spins
until all have. That is safe only when every program of the grid runs at once, which the launch
makes sure of: the grid is at most what the GPU holds at once (``most_programs``, from the compiled
kernel's registers, threads and shared memory) and the launch is cooperative
(``launch_cooperative_grid=True``), so the driver refuses a grid that would not fit instead of
running part of it while the rest waits forever.

The counters live in GPU memory, one pair per (device, stream) (``counters``): launches on one
stream run one after another and each leaves its pair at zero; two streams never share a pair.
Triton's CPU interpreter runs programs one after another, where a program waiting for a later
one would wait forever: there the callers run a grid of one program (or no barrier at all).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_learn.kernels.autotune import num_sms


@triton.jit
def grid_sync(counter_ptr, target):
    """Wait until ``counter_ptr`` holds ``target`` arrivals: every program's earlier stores are then visible
    to all (read them with ``cache_modifier=".cg"``: past the SM's own L1)."""
    tl.debug_barrier()  # all threads of this program have issued their stores
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")  # publish them, and arrive
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()  # no thread reads before the wait is over


@triton.jit
def grid_sync_done(counter_ptr, programs):
    """The last program past every wait resets the pair (``counter_ptr[0]`` counts arrivals, ``[1]`` departures)
    for the stream's next launch: call once per program, after its last ``grid_sync``."""
    if tl.atomic_add(counter_ptr + 1, 1, sem="acq_rel", scope="gpu") == programs - 1:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(counter_ptr + 1, 0, sem="relaxed", scope="gpu")


_COUNTERS: dict[tuple, torch.Tensor] = {}


def counters(device: torch.device | int, stream: int) -> torch.Tensor:
    """The (arrivals, departures) pair of int32 zeros for launches on ``stream`` of ``device``."""
    key = (device, stream)
    pair = _COUNTERS.get(key)
    if pair is None:
        pair = _COUNTERS[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return pair


def most_programs(kernel, device: torch.device, per_sm: int) -> int:
    """How many programs of the compiled ``kernel`` the GPU holds at once (registers, threads, shared memory),
    at most ``per_sm`` per SM."""
    props = torch.cuda.get_device_properties(device)
    warps = kernel.metadata.num_warps
    regs_per_warp = -(-kernel.n_regs * 32 // 256) * 256  # registers are handed out per warp, 256 at a time
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // max(regs_per_warp, 1) // warps
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
    by_smem = getattr(props, "shared_memory_per_multiprocessor", 233472) // (kernel.metadata.shared + 1024)
    return max(1, min(by_regs, by_threads, by_smem, per_sm)) * num_sms(device)
