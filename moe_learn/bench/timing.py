"""How the benchmark times: medians of CUDA-event timings after a rest, and the two ceilings.

Four ways to time a call, each a median:

* ``do_bench``: Triton's ``do_bench``: device time per call, L2 flushed before each (the
  experts and prefill sections);
* ``do_bench_loop``: CUDA events around a loop of back-to-back eager calls, no L2 flush: per
  call, the longer of the host's work and the device's, what a decode loop sees;
* ``time_single_call``: one call issued to an idle GPU: host work + launch + device time;
* ``do_bench_graph``: the calls replayed from a CUDA graph: device time without the host.
"""

from __future__ import annotations

import math
import platform
import statistics
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


def do_bench_graph(fn, *, rep: int = 100, rest: bool = True) -> float:
    """Median seconds per call replayed from a CUDA graph: device time without launch overhead.

    rep: milliseconds of calls captured in the graph, replayed 10 times. rest=False: the caller
    rested before a group of short timings (the decode section: see ``run.bench_decode_case``).
    """
    import triton.testing

    if rest:
        _rest()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e-3


def do_bench_loop(fn, *, rest: bool = True, samples: int = 10, sample_ms: float = 10.0, max_calls: int = 100) -> float:
    """Median seconds per call of ``fn`` called back to back, eagerly: CUDA events around a loop.

    No L2 flush: a decode step calls the same layer's GEMMs one after another. Each of the
    ``samples`` loops runs about ``sample_ms`` of calls (at most ``max_calls``); the events
    bracket the host's launches too, so a call whose host work outlasts its kernel is timed
    by its host work.
    """
    if rest:
        _rest()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):  # warm-up: caches, allocator, autotuning already done by the caller's first call
        fn()
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    calls = max(1, min(max_calls, int(sample_ms / max(start.elapsed_time(end), 1e-3))))
    per_call = []
    for _ in range(samples):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        per_call.append(start.elapsed_time(end) / calls)
    return statistics.median(per_call) * 1e-3


def time_single_call(fn, *, rest: bool = True, samples: int = 20) -> float:
    """Median seconds of one call issued to an idle GPU: the host's work, the launch and the kernel."""
    if rest:
        _rest()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()  # warm-up
    times = []
    for _ in range(samples):
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) * 1e-3


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


def package_version(distribution: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": package_version("transformers"),
        "liger_kernel": package_version("liger-kernel"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
