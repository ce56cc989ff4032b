"""Where the time of one fused_routing call goes: host enqueue cost and GPU time, per piece.

    PYTHONPATH=$PWD python3 perf/routing_overhead.py

The GPU runs asynchronously, so an eager call costs max(host enqueue time, GPU time);
a CUDA graph replay shows the GPU time alone.
"""

import time

import torch
import triton
import triton.testing

import moe_learn  # noqa: F401
from moe_learn.kernels import fused_routing as fr
from moe_learn.kernels import grid_sync


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def graph_us(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


T, E, k = 8192, 128, 8
logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
w, ids, counts, gather, scatter = fr.fused_routing(logits, k)
block_t = 16
nb = triton.cdiv(T, block_t)
buf = torch.empty(2 * nb * E, dtype=torch.int32, device="cuda")
bc, bp = buf[: nb * E], buf[nb * E:]
programs = min(nb, fr.num_sms(logits.device))
stream = torch._C._cuda_getCurrentRawStream(0)
counters = grid_sync.counters(logits.device, stream)
consts = dict(TOP_K=k, TOP_K_PAD=8, BLOCK_T=block_t, BLOCK_E=128, BLOCK_B=512, USE_SIGMOID=False,
              RENORMALIZE=True, PRE_ACT=True, RANK_CHUNK=32, COOPERATIVE=True)
args = (logits, w, ids, bc, bp, counts, gather, scatter, counters, T, E, logits.stride(0), nb)


def launch():  # Triton's own launch path
    fr._route[(programs,)](*args, **consts, num_warps=4, launch_cooperative_grid=True)


def launch_direct():  # what fused_routing does after the first call
    fr._launch(("probe", *consts.values()), nb, args, consts, logits.device, stream)


def allocate():
    torch.empty(T, k, device="cuda", dtype=torch.bfloat16)
    torch.empty(T, k, device="cuda", dtype=torch.int64)
    b = torch.empty(2 * nb * E + E + 2 * T * k, device="cuda", dtype=torch.int32)
    torch.split(b, [nb * E, nb * E, E, T * k, T * k])


for name, fn in [("whole call", lambda: fr.fused_routing(logits, k)),
                 ("whole call, cooperative=False", lambda: fr.fused_routing(logits, k, cooperative=False)),
                 ("Triton launch", launch), ("direct launch (cached kernel)", launch_direct),
                 ("allocations + split", allocate),
                 ("counters lookup", lambda: grid_sync.counters(logits.device, stream)),
                 ("calculate_topk (PyTorch)", lambda: moe_learn.calculate_topk(logits, k, False, True))]:
    print(f"{name:32s} {host_us(fn):6.1f} us host per call", flush=True)
for per_sm in (1, 2, 3):
    fr.MAX_PROGRAMS_PER_SM = per_sm
    fr._COMPILED.clear()
    print(f"at most {per_sm} programs per SM: {graph_us(lambda: fr.fused_routing(logits, k)):6.1f} us GPU "
          f"(graph), {triton.testing.do_bench(lambda: fr.fused_routing(logits, k), return_mode='median') * 1e3:6.1f}"
          " us eager", flush=True)
fr.MAX_PROGRAMS_PER_SM = 2
fr._COMPILED.clear()
for name, fn in [("cooperative", lambda: fr.fused_routing(logits, k)),
                 ("last program finishes", lambda: fr.fused_routing(logits, k, cooperative=False))]:
    print(f"{name:32s} {graph_us(fn):6.1f} us GPU (CUDA graph replay)", flush=True)
    print(f"{name:32s} {triton.testing.do_bench(fn, return_mode='median') * 1e3:6.1f} us eager (do_bench)",
          flush=True)
for key, (kern, most, _, direct) in fr._COMPILED.items():
    print("compiled _route", key[1:4], "regs", kern.n_regs, "spills", kern.n_spills, "shared", kern.metadata.shared,
          "programs at most", most, "direct launch", direct and fr._DIRECT_LAUNCH[0])

# Does the cooperative launch attribute (the driver checks that the grid fits) cost host time?
for coop_attr in (True, False):
    kern = fr._route.warmup(*args, **consts, num_warps=4, launch_cooperative_grid=coop_attr, grid=(1,))
    kern._init_handles()

    def direct(kern=kern):  # the current stream each call: a graph capture runs on its own stream
        kern.run(programs, 1, 1, torch._C._cuda_getCurrentRawStream(0), kern.function, kern.packed_metadata,
                 None, None, None, *args, *consts.values())

    print(f"direct launch, launch_cooperative_grid={coop_attr}: {host_us(direct):6.1f} us host, "
          f"{graph_us(direct):6.1f} us GPU (graph)", flush=True)

# Where the host time of a whole call goes (cProfile adds its own cost: compare shares, not totals)
import cProfile  # noqa: E402
import pstats  # noqa: E402

profile = cProfile.Profile()
profile.enable()
for _ in range(500):
    fr.fused_routing(logits, k)
profile.disable()
torch.cuda.synchronize()
pstats.Stats(profile).sort_stats("tottime").print_stats(14)
