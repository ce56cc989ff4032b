"""How the benchmark times: medians of CUDA-event timings after a rest, and the two ceilings."""

from __future__ import annotations

import math
import platform
import time

import torch

# Seconds the GPU idles before each timing. Under sustained load an H100 sits at its power cap
# and runs every kernel, the ceiling's matmul included, about 10% slower (perf/thermal.py,
# perf/NOTES.md). A ceiling measured on a rested GPU against kernels timed on a loaded one
# would mix two machines; so every timing here, ceilings and kernels alike, follows a rest.
# A timing itself (25 ms warm-up, 100 ms of runs) is too short to reach the cap.
REST_S = 1.5


def _rest() -> None:
    torch.cuda.synchronize()
    time.sleep(REST_S)


def do_bench(fn) -> float:
    """Median seconds per call (CUDA events via Triton, after warm-up), after ``REST_S`` of idle."""
    import triton.testing

    _rest()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def do_bench_graph(fn) -> float:
    """Median seconds per call replayed from a CUDA graph: device time without launch overhead."""
    import triton.testing

    _rest()
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e-3


def measure_peaks() -> dict:
    """The two ceilings, measured here: bf16 matmul TFLOP/s and copy bandwidth (TB/s)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t_mm = do_bench(lambda: a @ b)
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    t_copy = do_bench(lambda: dst.copy_(src))
    return {"matmul_tflops": 2 * n**3 / t_mm / 1e12, "copy_tbs": 2 * src.numel() * 2 / t_copy / 1e12}


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def environment() -> dict:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
