"""A decode step's experts: the decode path (one launch, or two) against the grouped path and transformers' default.

    PYTHONPATH=$PWD python3 perf/decode_experts.py [$OUT/decode_experts.json] [--sweep]     # on a GPU
        [--models qwen3-30b-a3b,gpt-oss-120b] [--tokens 1,2,4]      # a part of the table (default: all)

For each decode model (bench.cases.DECODE_MODELS) and T = 1..64 tokens, inference (no grad), bf16:
- ``decode``: ``kernels.decode_experts.decode_experts`` as the layers call it (checked once, then from its
  launch plan): two launches; also past ``MAX_SLOTS``, to see where the grouped path starts to win;
- ``decode1``: the same with ``ONE_LAUNCH = True``: one launch, a grid barrier between its two phases;
- ``decodeP``: two launches with ``PREFETCH = False`` (no K step's tiles loaded ahead: the kernels before it);
- ``grouped``: ``moe_experts`` with ``DECODE_EXPERTS = False`` (routing of the ids in one launch, the two
  grouped GEMMs with the SwiGLU in GEMM1's epilogue, the sum over the k slots);
- ``default``: transformers 5.x's default experts module (``experts_implementation="grouped_mm"``).
Four times per call, microseconds: ``eager`` = back-to-back eager calls, wall time per call with one
sync at the end (what an eager decode loop gets: max(host, GPU) per call); ``alone`` = one call timed
with a sync before and after (median); ``bench`` = ``triton.testing.do_bench`` (median, L2 flushed
between calls: GPU time, host hidden); ``graph`` = a CUDA-graph replay (``do_bench_cudagraph``; the decode
path captures two launches, so ``decode`` and ``decode1`` share it). Outputs are compared with the
default's (largest difference relative to its largest value). --sweep first times the decode kernels'
launch parameters (``SWEEP`` on ``SWEEP_CASES``, ``do_bench``).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import torch
import triton
import triton.testing
from host_overhead import graph_us, grouped_path, switched  # (perf/, this script's folder)

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


# (session 10 swept K blocks 64/128 and 128/256, column blocks 8/16 and 1/2/4 programs per SM: 128/256, 8, 2-4 won;
# this sweeps the prefetch against wider K blocks, which also put more bytes in flight per program)
SWEEP = [dict(BLOCK_K_GATE_UP=bk1, BLOCK_K_DOWN=bk2, BLOCK_K_DOWN_NARROW=bk2, MIN_BLOCK_N=8, PROGRAMS_PER_SM=p,
              PREFETCH=prefetch)
         for prefetch in (False, True) for bk1 in (128, 256) for bk2 in (256, 512) for p in (2, 4)]
SWEEP_CASES = (("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 8), ("gpt-oss-120b", 1), ("mixtral-8x7b", 1))


def bench_us(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median") * 1e3


def sweep(dev, dt) -> list[dict]:
    """do_bench times of the decode path's launch parameters (module constants) on SWEEP_CASES (the plans are
    dropped at each change: they keep the block choice)."""
    out = []
    defaults = {name: getattr(dec, name) for name in SWEEP[0]}
    for model in dict.fromkeys(model for model, _ in SWEEP_CASES):
        H, I, E, k = MODELS[model]  # noqa: E741
        w1 = torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02
        w2 = torch.randn(E, H, I, device=dev, dtype=dt) * 0.02
        for T in [T for name, T in SWEEP_CASES if name == model]:
            weights, ids = route(T, E, k, seed=T, device=dev)
            x = torch.randn(T, H, device=dev, dtype=dt)
            for params in [defaults, *SWEEP]:
                for name, value in params.items():
                    setattr(dec, name, value)
                dec._PLANS.clear()
                us = bench_us(lambda: dec.decode_experts(x, ids, weights, w1, w2))  # noqa: B023
                out.append({"model": model, "T": T, **params, "bench_us": us})
                print(f"sweep {model:<14} T={T} {params} do_bench {us:6.1f} us", flush=True)
    for name, value in defaults.items():
        setattr(dec, name, value)
    dec._PLANS.clear()
    return out


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The decode experts against the grouped path and transformers' "
                                                 "default (perf/decode_experts.py's doc).")
    parser.add_argument("path", nargs="?", help="where to write the results as JSON")
    parser.add_argument("--sweep", action="store_true", help="time the launch parameters (SWEEP) first")
    parser.add_argument("--models", type=lambda text: text.split(","), default=list(DECODE_MODELS),
                        help="comma-separated, e.g. qwen3-30b-a3b,gpt-oss-120b (default: the decode models)")
    parser.add_argument("--tokens", type=lambda text: [int(item) for item in text.split(",")], default=list(TOKENS),
                        help=f"comma-separated token counts (default: {','.join(map(str, TOKENS))})")
    args = parser.parse_args()
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; known: {', '.join(sorted(MODELS))}")
    return args


def main():
    args = _arguments()
    dev, dt = "cuda", torch.bfloat16
    rows = []
    with torch.no_grad():
        swept = sweep(dev, dt) if args.sweep else []
        for model in args.models:
            H, I, E, k = MODELS[model]  # noqa: E741
            gen = torch.Generator(device=dev).manual_seed(0)
            w1 = torch.randn(E, 2 * I, H, device=dev, dtype=dt, generator=gen) * 0.02
            w2 = torch.randn(E, H, I, device=dev, dtype=dt, generator=gen) * 0.02
            default = _transformers_module(ExpertsCase(model, 1, H, I, E, k), "grouped_mm",
                                           torch.nn.Parameter(w1, requires_grad=False),
                                           torch.nn.Parameter(w2, requires_grad=False))
            for T in args.tokens:
                weights, ids = route(T, E, k, seed=T, device=dev)
                x = torch.randn(T, H, device=dev, dtype=dt, generator=gen)
                decode = functools.partial(dec.decode_experts, x, ids, weights, w1, w2)
                impls = {
                    "decode": decode,
                    "decode1": functools.partial(switched, dec, "ONE_LAUNCH", True, decode),
                    "decodeP": functools.partial(switched, dec, "PREFETCH", False, decode),
                    "grouped": lambda: grouped_path(experts.moe_experts, x, ids, weights, w1, w2),  # noqa: B023
                    "default": lambda: default(x, ids, weights),  # noqa: B023
                }
                want = impls["default"]().float()
                scale = want.abs().max().item() or 1.0
                for name, fn in impls.items():
                    got = fn().float()  # compiles and tunes
                    row = {"model": model, "T": T, "slots": T * k, "impl": name,
                           "rel_diff_vs_default": (got - want).abs().max().item() / scale,
                           "eager_us": eager_us(fn), "alone_us": alone_us(fn), "bench_us": bench_us(fn),
                           "graph_us": graph_us(fn)}
                    rows.append(row)
                    print(f"{model:<14} T={T:<3} slots={T * k:<4} {name:<8} eager {row['eager_us']:7.1f} "
                          f"alone {row['alone_us']:7.1f} do_bench {row['bench_us']:7.1f} "
                          f"graph {row['graph_us']:7.1f} us   "
                          f"diff {row['rel_diff_vs_default']:.1e}", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "moe_learn_max_slots": dec.MAX_SLOTS, "command": "python3 perf/decode_experts.py " + " ".join(sys.argv[1:]),
            "rows": rows, "sweep": swept}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(f"moe_learn {getattr(moe_learn, '__version__', '?')}, MAX_SLOTS={dec.MAX_SLOTS}")
    if args.path:
        with open(args.path, "w") as f:
            json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
