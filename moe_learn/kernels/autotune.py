"""Launch-time helpers shared by the kernels: the SM count and a small autotuner.

The autotuner follows ``triton.autotune``'s idea (time candidate configs on the first
call for a key, cache the winner) with two changes that matter for MoE: the key is a
shape *bucket* (rows per expert rounded to a power of two), because the routing changes
every call while the best tile does not; and the two best candidates are re-timed in
turns, because a single short measurement can be off by the ~5% that separates them.

Tuning takes seconds per key (compiling each candidate, then timing it), and a training run
meets a dozen keys. ``MOE_LEARN_TUNING_CACHE=/path/file.json`` keeps the winners across
processes, like ``triton.autotune(cache_results=True)``: entries are read on the first
tuning miss and written after each tuning, and a file made on another GPU, another torch or
Triton, or another version of the kernels (a digest of their source) is ignored.
``MOE_LEARN_TUNING_LOG=1`` prints a line per tuning: the key, the seconds it took, the winner.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Programs of a persistent grid: one per SM (2 under the CPU interpreter, where fewer is faster)."""
    if device.type != "cuda":
        return 2
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def rows_bucket(rows: int, num_experts: int) -> int:
    """Rows per expert, rounded up to a power of two (at least 1): routings differ call to call, this does not,
    so the tuning keys hold it instead of the rows."""
    per_expert = -(-rows // max(num_experts, 1))  # the power of two above rows / E is the one above its ceiling
    return 1 << max(per_expert - 1, 0).bit_length()


TUNED: dict[tuple, dict] = {}  # tuning key -> the config that won


def median_seconds(fn: Callable[[], None]) -> float:
    """Median of at least ~20 runs (a 5 ms kernel gets 100 ms, not 4 runs in a 25 ms window)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one_ms = start.elapsed_time(end)
    rep = min(max(25.0, 20 * one_ms), 400.0)
    return triton.testing.do_bench(fn, warmup=max(10.0, 3 * one_ms), rep=rep, return_mode="median") * 1e-3


CACHE_ENV = "MOE_LEARN_TUNING_CACHE"
LOG_ENV = "MOE_LEARN_TUNING_LOG"  # =1: one line on stderr per tuned key (which, how long, the winner)
_LOADED: set[str] = set()  # cache files already merged into TUNED


@functools.cache
def cache_stamp() -> dict:
    """What a cached winner depends on besides its key: the GPU, torch, Triton and the kernels' source."""
    import triton

    here = Path(__file__).resolve().parent
    digest = hashlib.sha1()
    for name in ("grouped_gemm_hopper.py", "backward.py", "swiglu.py", "autotune.py"):
        digest.update((here / name).read_bytes())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "kernels": digest.hexdigest()[:16]}


def _read_cache(path: str) -> dict[tuple, dict]:
    """The file's entries when its stamp matches this process, else none (a missing or broken file: none)."""
    try:
        data = json.loads(Path(path).expanduser().read_text())
        if data.get("stamp") != cache_stamp():
            return {}
        return {tuple(key): dict(config) for key, config in data["entries"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_cache(path: str, key: tuple, config: dict) -> None:
    """Add one winner to the file (merged with what other processes wrote; replaced atomically)."""
    entries = _read_cache(path)
    entries[key] = config
    data = {"stamp": cache_stamp(), "entries": [[list(k), c] for k, c in entries.items()]}
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(data, indent=1))
    os.replace(scratch, target)


def choose_config(key: tuple, configs, launch: Callable[[dict], None], timer=median_seconds) -> dict:
    """Time ``launch(config)`` for each candidate, cache and return the fastest.

    A quick pass times every candidate; the best two are then timed again, longer and
    in turns. A candidate that fails to compile (shared memory, a compiler limit) is skipped.
    With ``MOE_LEARN_TUNING_CACHE`` set, a winner found by an earlier process is used as is.
    """
    if key in TUNED:
        return TUNED[key]
    path = os.environ.get(CACHE_ENV)
    if path and path not in _LOADED:
        _LOADED.add(path)
        for cached_key, config in _read_cache(path).items():
            TUNED.setdefault(cached_key, config)
        if key in TUNED:
            return TUNED[key]
    started = time.perf_counter()
    timings, errors = [], []
    for config in configs:
        try:
            launch(config)  # compiles, and warms up
            timings.append((timer(lambda config=config: launch(config)), config))
        except Exception as exc:  # noqa: BLE001 - an unbuildable candidate is just not a candidate
            errors.append(f"{config}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
    if not timings:
        raise RuntimeError(f"no candidate config could run for {key}:\n  " + "\n  ".join(errors))
    finalists = [config for _, config in sorted(timings, key=lambda t: t[0])[:2]]
    totals = [0.0] * len(finalists)
    for _ in range(3):
        for i, config in enumerate(finalists):
            totals[i] += timer(lambda config=config: launch(config))
    TUNED[key] = finalists[min(range(len(finalists)), key=totals.__getitem__)]
    if path:
        _write_cache(path, key, TUNED[key])
    if os.environ.get(LOG_ENV, "0") not in ("", "0"):
        print(f"moe_learn: tuned {key} over {len(timings)} configs in {time.perf_counter() - started:.1f} s "
              f"(compile and time): {TUNED[key]}", file=sys.stderr, flush=True)
    return TUNED[key]


def autotune_enabled(X: torch.Tensor) -> bool:
    """Tune on a GPU, outside CUDA-graph capture and torch.compile tracing, unless MOE_LEARN_AUTOTUNE=0."""
    return (X.is_cuda and os.environ.get("MOE_LEARN_AUTOTUNE", "1") != "0"
            and not torch.cuda.is_current_stream_capturing())
