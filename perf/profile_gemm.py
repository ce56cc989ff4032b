"""Launch the grouped GEMM once per case with a fixed config, for Nsight Compute to profile.

    ncu --clock-control none --kernel-name regex:'gemm|nvjet' --launch-skip 10 --launch-count 10 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section LaunchStats --section Occupancy python3 perf/profile_gemm.py

Each case runs ours (its bucket's default config, no tuning) and, for comparison, the dense
cuBLAS matmul of the same total size: first once each to compile and warm up (the launches
``--launch-skip`` passes over, 2 per case), then once each for ncu, marked by a line on stdout.
"""

import os
import sys

os.environ.setdefault("MOE_LEARN_AUTOTUNE", "0")

import torch  # noqa: E402

from moe_learn.bench import cases as C  # noqa: E402
from moe_learn.kernels import grouped_gemm_hopper as H  # noqa: E402

# the weak cases of the stored run (fraction of the roofline under 0.70)
WANTED = sys.argv[1:] or ["qwen3-30b-a3b gate_up T=8192", "qwen3-30b-a3b down T=8192",
                          "llama4-scout down T=8192", "mixtral-8x7b gate_up T=1024",
                          "mixtral-8x7b down T=1024"]


def main():
    runs = []
    for i, case in enumerate(C.cases()):
        if case.name not in WANTED:
            continue
        W = torch.randn(case.E, case.N, case.K, device="cuda", dtype=torch.bfloat16) * 0.02
        m_sizes = C.routing_counts(case.tokens, case.E, C.MODELS[case.model][3], seed=i)
        X = torch.randn(case.M, case.K, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(case.M, case.N, device="cuda", dtype=torch.bfloat16)
        cfg = H.pick_config(case.M, case.E)
        H.grouped_gemm_hopper(X, W, m_sizes, y, config=cfg)  # compile
        X @ W[0].T
        runs.append((case, cfg, X, W, m_sizes, y))
        sizes = m_sizes.tolist()
        bm = cfg["BLOCK_M"]
        padded = sum(-(-m // bm) * bm for m in sizes)
        print(f"{case.name}: rows/expert {min(sizes)}..{max(sizes)}, padding with BLOCK_M={bm}: "
              f"{padded / case.M - 1:.1%}, config {cfg}", flush=True)
    torch.cuda.synchronize()
    for case, cfg, X, W, m_sizes, y in runs:
        print("profiled launch:", case.name, flush=True)
        H.grouped_gemm_hopper(X, W, m_sizes, y, config=cfg)
        X @ W[0].T
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
