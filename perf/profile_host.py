"""Where the host time of one eager decode-sized call goes (cProfile), on a GPU.

    PYTHONPATH=$PWD python3 perf/profile_host.py > $OUT/profile_host.txt

Cases: the qwen3-30b-a3b gate_up GEMM at T=1 (gathered, what the decode bench's weakest
case calls) and the fused experts at T=1 (the decode path in two launches, and in one; the grouped path with the
one-launch routing of given ids, and with PyTorch's). For each: host microseconds per call in a
back-to-back loop and the cProfile table of 2000 calls; then the bare pieces timed alone (the
compiled kernel's own launcher with our last launch's arguments, given tensors and given their addresses,
our launch key, torch.empty, one PyTorch launch, and
torch._grouped_mm of the same GEMM) so the Python of ours can be told from the floor.
"""

from __future__ import annotations

import cProfile
import importlib
import pstats
import time

import torch

import moe_learn  # noqa: F401
from moe_learn.bench.cases import route
from moe_learn.kernels import decode_experts as dec
from moe_learn.kernels import launcher

gg = importlib.import_module("moe_learn.kernels.grouped_gemm")
hopper = importlib.import_module("moe_learn.kernels.grouped_gemm_hopper")
experts = importlib.import_module("moe_learn.layers.experts")


def per_call_us(fn, calls=2000, loops=40) -> float:
    """Best over ``loops`` of the mean host time per call; each loop starts on an idle GPU (a sync, not timed)
    and queues 50 calls, fewer launches than the GPU's queue holds, so no call waits for the GPU."""
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(loops):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls // loops):
            fn()
        best = min(best, (time.perf_counter() - start) / (calls // loops) * 1e6)
    torch.cuda.synchronize()
    return best


def profile(name, fn, calls=2000):
    print(f"\n=== {name}: {per_call_us(fn):.1f} us/call host (best of 40 loops of 50 calls)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def main():
    E, H, I, k, T = 128, 2048, 768, 8, 1  # noqa: E741  qwen3-30b-a3b decode
    dev, dt = "cuda", torch.bfloat16
    weights, ids = route(T, E, k, seed=0, device=dev)
    counts, gather = experts.route_rows(ids, E)
    x = torch.randn(T, H, device=dev, dtype=dt)
    w1 = torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02
    w2 = torch.randn(E, H, I, device=dev, dtype=dt) * 0.02
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xg = x[gather.long() // k]
    with torch.no_grad():
        gate_up = lambda: gg.grouped_gemm(x, w1, counts, gather_indices=gather, topk=k, permute_x=True)  # noqa: E731
        trusted = lambda: gg.grouped_gemm_trusted(x, w1, counts, gather, topk=k, permute_x=True)  # noqa: E731
        fused = lambda: experts.moe_experts(x, ids, weights, w1, w2)  # noqa: E731
        routed = lambda: experts.run_experts(x, counts, gather, weights, w1, w2)  # noqa: E731
        gmm = lambda: torch._grouped_mm(xg, w1.transpose(1, 2), offs=offs)  # noqa: E731
        for name, fn in (("grouped_gemm gate_up gather", gate_up), ("grouped_gemm_trusted gate_up gather", trusted),
                         ("run_experts (routing given)", routed), ("moe_experts (ids in): the decode path", fused)):
            profile(name, fn)
        dec.ONE_LAUNCH = True  # the decode path in one launch, with its grid barrier
        profile("moe_experts (ids in): the decode path in one launch", fused)
        dec.ONE_LAUNCH = False
        experts.DECODE_EXPERTS = False  # the grouped path: routing in one launch, two grouped GEMMs, the sum
        profile("moe_experts (ids in), grouped path", fused)
        experts.ROUTE_IDS_KERNEL = False  # the A/B: the routing of given ids as eight PyTorch ops
        profile("moe_experts (ids in), grouped path, PyTorch routing", fused)
        experts.ROUTE_IDS_KERNEL = True
        experts.DECODE_EXPERTS = True
        add = lambda: x.add_(0.0)  # noqa: E731
        print(f"\nx.add_(0.0), one PyTorch kernel launch: {per_call_us(add):.1f} us/call")
        print(f"\ntorch._grouped_mm gate_up (pre-gathered): {per_call_us(gmm):.1f} us/call")
        print(f"torch.empty(8, 1536): {per_call_us(lambda: torch.empty(8, 1536, device=dev, dtype=dt)):.1f} us/call")
        print(f"x.new_empty(8, 1536): {per_call_us(lambda: x.new_empty(8, 1536)):.1f} us/call")
        # the compiled kernel's own launcher, called as FastLauncher calls it, with the last launch's arguments
        seen = {}
        real_launch = launcher.FastLauncher.launch

        def recording(self, entry, grid, args, device, stream=None):
            seen["launch"] = (self, entry, grid, args)
            return real_launch(self, entry, grid, args, device, stream)

        launcher.FastLauncher.launch = recording
        gg.PLANS = False  # a planned call skips FastLauncher.launch: record one through the full path
        trusted()
        gg.PLANS = True
        launcher.FastLauncher.launch = real_launch
        torch.cuda.synchronize()
        fast, entry, grid, args = seen["launch"]
        kernel, ordered, raw = entry.kernel, entry.ordered, entry.raw
        stream = torch.cuda.current_stream().cuda_stream
        g = (*grid, 1, 1)

        def bare():
            kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, None, None, None, *args,
                       *ordered)

        print(f"compiled launcher alone (kernel.run, same args, 2 TMA descriptors): {per_call_us(bare):.1f} us/call")
        if raw is None:
            print("raw launch with cached tensor maps: not available with this Triton (launcher.RawLaunch.of)")
        else:
            every = (*args, *ordered)
            print(f"raw launch alone (cached tensor maps, same args): {per_call_us(lambda: raw(g, stream, every)):.1f}"
                  " us/call")
            ints = (*entry.addresses(args), *ordered)  # what a plan passes (launcher.POINTER_INTS)
            print(f"raw launch alone, the {len(entry.pointers)} tensors as addresses: "
                  f"{per_call_us(lambda: raw(g, stream, ints)):.1f} us/call")
        key = lambda: fast.key(args, entry.constexprs, entry.options, 0)  # noqa: E731
        print(f"our launch key alone: {per_call_us(key):.1f} us/call")
        launcher.DIRECT = False
        print(f"grouped_gemm_trusted through Triton's own launch: {per_call_us(trusted):.1f} us/call")
        launcher.DIRECT = True


if __name__ == "__main__":
    main()
