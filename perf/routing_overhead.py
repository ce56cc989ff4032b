"""Where the host time of one fused_routing call goes (GPU asynchronous, so host time = enqueue cost).

    PYTHONPATH=$PWD python3 perf/routing_overhead.py
"""

import time

import torch
import triton

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


T, E, k = 8192, 128, 8
logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
w, ids, counts, gather, scatter = fr.fused_routing(logits, k)
block_t = 16
nb = triton.cdiv(T, block_t)
bc = torch.empty(nb * E, dtype=torch.int32, device="cuda")
bp = torch.empty_like(bc)
buf = torch.empty(1000, dtype=torch.int32, device="cuda")


def launch_topk():
    fr._topk_histogram[(nb,)](logits, w, ids, bc, T, E, logits.stride(0), TOP_K=k, TOP_K_PAD=8, BLOCK_T=block_t,
                              BLOCK_E=128, USE_SIGMOID=False, RENORMALIZE=True, PRE_ACT=True, num_warps=4)


def launch_scan():
    fr._expert_scan[(E,)](bc, bp, counts, nb, BLOCK_B=512, num_warps=4)


def launch_place():
    fr._place_slots[(nb,)](ids, bp, counts, gather, scatter, T * k, nb, E, SLOTS_PER_BLOCK=128, BLOCK_S=128,
                           BLOCK_E=128, num_warps=4)


def allocate():
    torch.empty(T, k, device="cuda")
    torch.empty(T, k, device="cuda")
    torch.empty(100, device="cuda")


for name, fn in [("whole call", lambda: fr.fused_routing(logits, k)), ("torch.empty x3", allocate),
                 ("torch.split 5", lambda: torch.split(buf, [200] * 5)), ("launch topk", launch_topk),
                 ("launch scan", launch_scan), ("launch place", launch_place),
                 ("calculate_topk", lambda: moe_learn.calculate_topk(logits, k, False, True))]:
    print(f"{name:16s} {host_us(fn):6.1f} us host per call", flush=True)
