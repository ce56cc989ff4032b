"""Fused routing vs the eager PyTorch chain at T=8192, E=128, top-8 (and a few more shapes).

    PYTHONUNBUFFERED=1 python perf/routing_bench.py
"""

import torch
import triton.testing

import moe_learn
from moe_learn.kernels.fused_routing import fused_routing


def eager(logits, k):
    w, ids = moe_learn.calculate_topk(logits, k, use_sigmoid=False, renormalize=True)
    return (w, ids, *moe_learn.get_routing_indices(ids, logits.shape[1], return_scatter_indices=True))


for T, E, k in [(8192, 128, 8), (1024, 128, 8), (8192, 8, 2), (8192, 32, 4), (65536, 128, 8)]:
    logits32 = torch.randn(T, E, device="cuda")  # fp32: no ties, so the top-k sets are unique
    a, b = eager(logits32, k), fused_routing(logits32, k)
    same = all(torch.equal(x, y) for x, y in zip(a[1:], b[1:])) and torch.allclose(a[0], b[0])
    logits = logits32.to(torch.bfloat16)
    t_e = triton.testing.do_bench(lambda: eager(logits, k), warmup=25, rep=100, return_mode="median")
    t_f = triton.testing.do_bench(lambda: fused_routing(logits, k), warmup=25, rep=100, return_mode="median")
    t_g = triton.testing.do_bench_cudagraph(lambda: fused_routing(logits, k), rep=100, return_mode="median")
    print(f"T={T:6d} E={E:4d} k={k}: eager {t_e * 1e3:7.1f} us | fused {t_f * 1e3:6.1f} us | fused in a CUDA graph "
          f"{t_g * 1e3:6.1f} us | same as eager (fp32): {same}", flush=True)
