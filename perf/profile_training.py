"""Where the experts' forward+backward spends its GPU time: a kernel table per implementation.

    PYTHONPATH=$PWD python3 perf/profile_training.py [--only ours,liger] [model T ...] > $OUT/profile.txt  # GPU

For each case (default: qwen3-30b-a3b 8192) ours, transformers' default (grouped_mm) and
Liger-Kernel (when installed) run forward+backward on one problem (bench/experts.py's
``make_problem``) under ``torch.profiler``: each kernel's total CUDA time per iteration,
the sum, and the host's wall time per eager call (synchronized), so GPU time and host time
can be told apart. Nothing here is a benchmark result: the bench command is.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from moe_learn.bench import experts as B
from moe_learn.bench.cases import MODELS, ExpertsCase

ITERS = 5


def kernel_table(fn) -> list[tuple[str, int, float]]:
    """(kernel name, launches per iteration, microseconds per iteration), largest first."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            fn()
        torch.cuda.synchronize()
    totals, counts = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / ITERS
            counts[event.name] += 1
    return sorted(((name[:90], counts[name] // ITERS, us) for name, us in totals.items()), key=lambda r: -r[2])


def wall_ms(fn, calls=10) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def main():
    args = sys.argv[1:]
    only = None
    if args[:1] == ["--only"]:
        only, args = set(args[1].split(",")), args[2:]
    args = args or ["qwen3-30b-a3b", "8192"]
    for model, tokens in zip(args[::2], args[1::2], strict=True):
        case = ExpertsCase(model, int(tokens), *MODELS[model])
        p = B.make_problem(case, seed=0)
        params = (p["hidden"], p["weights"], p["gate_up"], p["down"])
        for impl in B.implementations(with_eager=False):
            if only and impl.name not in only:
                continue
            if impl.missing:
                print(f"\n== {case.name} {impl.name}: {impl.missing}")
                continue
            fn = impl.build(case, p["gate_up"], p["down"])
            ids = p["ids"].to(impl.ids_dtype)

            def forward(fn=fn, ids=ids, p=p):
                with torch.no_grad():
                    return fn(p["hidden"], ids, p["weights"])

            def training(fn=fn, ids=ids, p=p, params=params):
                return torch.autograd.grad(fn(p["hidden"], ids, p["weights"]), params, p["d_out"])

            for mode, call in (("forward", forward), ("forward+backward", training)):
                for _ in range(3):
                    call()  # compile, tune, warm up
                rows = kernel_table(call)
                total = sum(us for _, _, us in rows)
                print(f"\n== {case.name} {impl.name} {mode}: GPU {total / 1e3:.3f} ms/iter in "
                      f"{sum(n for _, n, _ in rows)} launches; eager wall {wall_ms(call):.3f} ms/call")
                for name, n, us in rows[:25]:
                    print(f"  {us:9.1f} us  x{n:<3d} {name}")
            del fn
        del p


if __name__ == "__main__":
    main()
