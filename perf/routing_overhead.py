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
counters = fr._counters(logits.device)


def launch():
    fr._route[(programs,)](logits, w, ids, bc, bp, counts, gather, scatter, counters, T, E, logits.stride(0), nb,
                           TOP_K=k, TOP_K_PAD=8, BLOCK_T=block_t, BLOCK_E=128, BLOCK_B=512, USE_SIGMOID=False,
                           RENORMALIZE=True, PRE_ACT=True, COOPERATIVE=True, num_warps=4)


def allocate():
    torch.empty(T, k, device="cuda", dtype=torch.bfloat16)
    torch.empty(T, k, device="cuda", dtype=torch.int64)
    b = torch.empty(2 * nb * E + E + 2 * T * k, device="cuda", dtype=torch.int32)
    torch.split(b, [nb * E, nb * E, E, T * k, T * k])


for name, fn in [("whole call", lambda: fr.fused_routing(logits, k)),
                 ("whole call, cooperative=False", lambda: fr.fused_routing(logits, k, cooperative=False)),
                 ("the launch alone", launch), ("allocations + split", allocate),
                 ("counters lookup", lambda: fr._counters(logits.device)),
                 ("calculate_topk (PyTorch)", lambda: moe_learn.calculate_topk(logits, k, False, True))]:
    print(f"{name:32s} {host_us(fn):6.1f} us host per call", flush=True)
for name, fn in [("cooperative", lambda: fr.fused_routing(logits, k)),
                 ("last program finishes", lambda: fr.fused_routing(logits, k, cooperative=False))]:
    print(f"{name:32s} {graph_us(fn):6.1f} us GPU (CUDA graph replay)", flush=True)
    print(f"{name:32s} {triton.testing.do_bench(fn, return_mode='median') * 1e3:6.1f} us eager (do_bench)",
          flush=True)
kern = list(fr._route.device_caches[0][0].values())[0]
print("compiled _route: regs", getattr(kern, "n_regs", "?"), "spills", getattr(kern, "n_spills", "?"),
      "shared", kern.metadata.shared)
