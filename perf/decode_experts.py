"""The experts of a decode step: the two-launch decode path against the grouped path and transformers' default.

    PYTHONPATH=$PWD python3 perf/decode_experts.py [$OUT/decode_experts.json]     # on a GPU

For each decode model (bench.cases.DECODE_MODELS) and T = 1..64 tokens, inference (no grad), bf16:
- ``decode``: ``kernels.decode_experts.run_decode_experts`` (two launches, no routing pass), also past
  ``MAX_SLOTS``, to see where the grouped path starts to win;
- ``grouped``: ``moe_experts`` with ``DECODE_EXPERTS = False`` (routing of the ids in one launch, the two
  grouped GEMMs with the SwiGLU in GEMM1's epilogue, the sum over the k slots);
- ``default``: transformers 5.x's default experts module (``experts_implementation="grouped_mm"``).
Three times per call, microseconds: ``eager`` = back-to-back eager calls, wall time per call with one
sync at the end (what an eager decode loop gets: max(host, GPU) per call); ``alone`` = one call timed
with a sync before and after (median); ``graph`` = a CUDA-graph replay (``do_bench_cudagraph``: GPU
time only). Outputs are compared with the default's (largest difference relative to its largest
value).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import triton
import triton.testing

import moe_learn
from moe_learn.bench.cases import DECODE_MODELS, MODELS, ExpertsCase, route
from moe_learn.bench.experts import _transformers_module
from moe_learn.kernels import decode_experts as dec
from moe_learn.layers import experts

TOKENS = (1, 2, 4, 8, 16, 32, 64)


def eager_us(fn, calls=400) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        torch.cuda.synchronize()
        per_call.append((time.perf_counter() - start) / (calls // 5) * 1e6)
    return statistics.median(per_call)


def alone_us(fn, calls=200) -> float:
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def graph_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def grouped(fn):
    def call():
        experts.DECODE_EXPERTS = False
        try:
            return fn()
        finally:
            experts.DECODE_EXPERTS = True
    return call


def main():
    path = next((a for a in sys.argv[1:] if not a.startswith("--")), None)
    dev, dt = "cuda", torch.bfloat16
    rows = []
    with torch.no_grad():
        for model in DECODE_MODELS:
            H, I, E, k = MODELS[model]  # noqa: E741
            gen = torch.Generator(device=dev).manual_seed(0)
            w1 = torch.randn(E, 2 * I, H, device=dev, dtype=dt, generator=gen) * 0.02
            w2 = torch.randn(E, H, I, device=dev, dtype=dt, generator=gen) * 0.02
            default = _transformers_module(ExpertsCase(model, 1, H, I, E, k), "grouped_mm", w1, w2)
            for T in TOKENS:
                weights, ids = route(T, E, k, seed=T, device=dev)
                x = torch.randn(T, H, device=dev, dtype=dt, generator=gen)
                impls = {
                    "decode": lambda: dec.run_decode_experts(x, ids, weights, w1, w2),  # noqa: B023
                    "grouped": grouped(lambda: experts.moe_experts(x, ids, weights, w1, w2)),  # noqa: B023
                    "default": lambda: default(x, ids, weights),  # noqa: B023
                }
                want = impls["default"]().float()
                scale = want.abs().max().item() or 1.0
                for name, fn in impls.items():
                    got = fn().float()  # compiles and tunes
                    row = {"model": model, "T": T, "slots": T * k, "impl": name,
                           "rel_diff_vs_default": (got - want).abs().max().item() / scale,
                           "eager_us": eager_us(fn), "alone_us": alone_us(fn), "graph_us": graph_us(fn)}
                    rows.append(row)
                    print(f"{model:<14} T={T:<3} slots={T * k:<4} {name:<8} eager {row['eager_us']:7.1f} "
                          f"alone {row['alone_us']:7.1f} graph {row['graph_us']:7.1f} us   "
                          f"diff {row['rel_diff_vs_default']:.1e}", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "moe_learn_max_slots": dec.MAX_SLOTS, "command": "python3 perf/decode_experts.py", "rows": rows}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(f"moe_learn {getattr(moe_learn, '__version__', '?')}, MAX_SLOTS={dec.MAX_SLOTS}")
    if path:
        with open(path, "w") as f:
            json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
