"""The weight-gradient kernel's configs side by side on training's two dW problems, against torch._grouped_mm.

    PYTHONPATH=$PWD python3 perf/ab_dw.py [model T ...] > $OUT/ab_dw.txt      # on a GPU (default: qwen3 8192)

Problems (the experts' backward, layers/experts.py): dW1 = dg_e.T @ x_e with x's token rows
gathered (topk), and dW2 in its swapped form h_e.T @ D_e with d_out's token rows gathered.
Rows: our tuned choice (kernel="auto", as the layers call it), then each candidate config
(kernel="hopper") two ways: X gathered in the kernel (``backward.PRE_GATHER_MAX_BYTES = 0``) and
X copied into expert order first by ``gather_rows`` (X then through TMA; the copy's time included),
and torch._grouped_mm on X gathered beforehand (CUTLASS, ragged contraction: the reference; the
gather's own time listed apart).
Median of triton.testing.do_bench (L2 flushed), TFLOP/s = 2 M N K / t.
"""

from __future__ import annotations

import sys

import torch
import triton.testing

import moe_learn  # noqa: F401
from moe_learn.bench.cases import MODELS, route
from moe_learn.kernels import backward
from moe_learn.kernels.backward import grouped_gemm_dw
from moe_learn.layers.experts import route_rows

CONFIGS = [  # (BLOCK_N, BLOCK_K, BLOCK_M, warps, stages, programs per SM)
    (128, 128, 64, 4, 3, 2), (128, 128, 64, 8, 4, 1), (128, 256, 64, 8, 3, 1), (128, 256, 64, 8, 4, 1),
    (256, 128, 64, 8, 3, 1), (128, 128, 128, 8, 3, 1), (128, 256, 32, 8, 5, 1), (128, 128, 32, 4, 5, 2),
    (256, 128, 32, 8, 5, 1), (128, 256, 128, 8, 2, 1),
]


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def one_problem(label: str, X, dY, transpose: bool, counts, gather, k: int) -> None:
    M, N, K, E = dY.shape[0], dY.shape[1], X.shape[1], counts.numel()
    flops = 2 * M * N * K
    print(f"\n== {label}: M={M} N={N} K={K} E={E} ({M // E} rows/expert)")

    def row(ms, what):
        print(f"  {ms * 1e3:8.1f} us {flops / ms / 1e9:6.0f} TFLOP/s  {what}")

    def ours(cfg=None, pre_gather=True):
        backward.PRE_GATHER_MAX_BYTES = limit if pre_gather else 0
        return grouped_gemm_dw(X, dY, counts, gather_indices=gather, topk=k, permute_x=True, transpose=transpose,
                               validate=False, kernel="hopper" if cfg else "auto", config=cfg)

    limit = backward.PRE_GATHER_MAX_BYTES
    Xs = X[gather.long() // k]
    row(bench_ms(ours), "ours, tuned (kernel=auto, as the layers call it)")
    print(f"  {bench_ms(lambda: X[gather.long() // k]) * 1e3:8.1f} us            the gather X[gather // k] alone")
    print(f"  {bench_ms(lambda: backward.gather_rows(X, gather, k)) * 1e3:8.1f} us            gather_rows alone")
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    row(bench_ms(lambda: torch._grouped_mm(dY.t(), Xs, offs=offs)), "torch._grouped_mm(dY.T, X gathered, offs)")
    for bn, bk, bm, warps, stages, per_sm in CONFIGS:
        cfg = dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm, num_warps=warps, num_stages=stages, PROGRAMS_PER_SM=per_sm)
        for pre_gather in (False, True):
            what = f"{'copy X first   ' if pre_gather else 'gather in kernel'} {cfg}"
            try:
                row(bench_ms(lambda cfg=cfg, pre=pre_gather: ours(cfg, pre)), what)
            except Exception as exc:  # noqa: BLE001
                print(f"  failed: {what}: {type(exc).__name__}: {str(exc).splitlines()[-1][:120]}")
    backward.PRE_GATHER_MAX_BYTES = limit


def main():
    args = sys.argv[1:] or ["qwen3-30b-a3b", "8192"]
    for model, tokens in zip(args[::2], args[1::2], strict=True):
        T = int(tokens)
        H, I, E, k = MODELS[model]  # noqa: E741
        _, ids = route(T, E, k, seed=0)
        counts, gather = route_rows(ids, E)
        rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
        one_problem(f"{model} T={T} dW1", rnd(T, H), rnd(T * k, 2 * I), True, counts, gather, k)
        one_problem(f"{model} T={T} dW2 (swapped)", rnd(T, H), rnd(T * k, I), False, counts, gather, k)


if __name__ == "__main__":
    main()
