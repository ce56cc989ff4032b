"""How the GPU's state moves a timing: the same kernel cool, under sustained load, and after rests.

    PYTHONPATH=$PWD python3 perf/thermal.py

One case (Qwen3 gate_up, T = 8192, the bench's routing) and the 8192^3 bf16 matmul that sets
the roofline's compute ceiling. Prints TFLOP/s with the SM clock, temperature and power
that nvidia-smi reads right after each measurement.
"""

import subprocess
import time

import torch
import triton.testing

from moe_learn.bench import cases as C
from moe_learn.kernels import grouped_gemm_hopper as H


def gpu_state() -> str:
    fields = "clocks.sm,temperature.gpu,power.draw"
    return subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()


def main():
    case = next(c for c in C.cases() if c.name == "qwen3-30b-a3b gate_up T=8192")
    W = torch.randn(case.E, case.N, case.K, device="cuda", dtype=torch.bfloat16) * 0.02
    m_sizes = C.routing_counts(case.tokens, case.E, C.MODELS[case.model][3], seed=2)
    X = torch.randn(case.M, case.K, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(case.M, case.N, device="cuda", dtype=torch.bfloat16)
    cfg = dict(H.CANDIDATES_BY_ROWS_PER_EXPERT[-1][1][1])  # 128x256x64, 4 stages
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def ours():
        H.grouped_gemm_hopper(X, W, m_sizes, y, config=cfg)

    def timed(fn):  # triton's do_bench itself: bench.do_bench would rest first, which is what this measures
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3

    def measure(label):
        t = timed(ours)
        state = gpu_state()
        p = timed(lambda: a @ b)
        print(f"{label:22s} ours {case.flops / t / 1e12:5.0f} TFLOP/s [{state}]  matmul "
              f"{2 * 8192**3 / p / 1e12:5.0f} TFLOP/s [{gpu_state()}]", flush=True)

    ours(), a @ b
    torch.cuda.synchronize()
    time.sleep(10)
    measure("after 10 s idle")
    measure("again")
    start = time.time()
    while time.time() - start < 30:  # sustained load, like a benchmark's long middle
        for _ in range(200):
            ours()
        torch.cuda.synchronize()
        if time.time() - start > 8:
            measure(f"loaded {time.time() - start:4.1f} s")
    for rest in (0.5, 1, 2, 5, 10):
        for _ in range(2000):  # load again for ~1.5 s, then rest
            ours()
        torch.cuda.synchronize()
        time.sleep(rest)
        measure(f"rest {rest:4.1f} s")


if __name__ == "__main__":
    main()
