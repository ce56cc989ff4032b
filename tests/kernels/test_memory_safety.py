"""``validate=False`` is memory-safe: no m_sizes or gather_indices make a kernel touch memory outside its tensors.

Without validation the values are unchecked, so the answer may be wrong, but the kernels
mask by construction: sizes are clamped to [0, M - rows before], gather indices outside
[0, M) drop their row. Each kernel runs every bad input in one child process (a crash
fails the test instead of killing pytest) on tensors that sit inside guard regions: NaN
around the inputs (a read there turns an output NaN) and a sentinel around the output
(a write there changes it). Under the interpreter a wild pointer is a real host address,
which is how the old kernels aborted with ``free(): invalid pointer``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GUARD = 3  # rows (or experts) of guard on each side
SENTINEL = 1234.5
T, TOPK, E, K, N = 6, 2, 3, 16, 24  # M = T * TOPK = 12 expert-ordered rows
M = T * TOPK

BAD_SIZES = {
    "negative size": [-5, 15, 2],
    "sum above M": [M, M, M],
    "sum below M": [1, 0, 2],
    "int32 overflow": torch.tensor([2**31 - 1, 2**31 - 1, 5], dtype=torch.int32),
    "huge int64": [2**40, -(2**40), 2**62],
}
GOOD_SIZES = [4, 5, 3]


def _bad_gathers() -> dict[str, list[int]]:
    perm = list(range(M))
    high, low, repeated, extreme = list(perm), list(perm), list(perm), list(perm)
    high[3] = 10**7
    low[0] = -3
    repeated[5] = repeated[6]
    extreme[2], extreme[7] = 2**31 - 1, -(2**31)
    return {"index above M": high, "negative index": low, "repeated index": repeated, "int32 extremes": extreme}


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU, the interpreter on a CPU


def _guarded(shape, fill, dtype=torch.float32):
    """(buffer, view): the view is the tensor a kernel gets, the rest of the buffer is guard."""
    buf = torch.full((shape[0] + 2 * GUARD, *shape[1:]), fill, dtype=dtype, device=_device())
    return buf, buf[GUARD : GUARD + shape[0]]


def _fill_inputs(*views):
    for view in views:
        view.copy_(torch.randn(view.shape, device=view.device))


def _check(name, outputs, inputs) -> str | None:
    """Why this run broke memory safety, or None."""
    for label, (buf, view) in outputs.items():
        guard = torch.cat([buf[:GUARD].reshape(-1), buf[GUARD + view.shape[0] :].reshape(-1)])
        if not bool((guard == SENTINEL).all()):
            return f"{label}: a write landed outside the tensor"
        if bool(view.isnan().any()):
            return f"{label}: a read reached the NaN guard around an input"
    for label, (buf, view) in inputs.items():
        if not bool(buf[:GUARD].isnan().all() and buf[GUARD + view.shape[0] :].isnan().all()):
            return f"{label}: the guard around an input was written"
    return None


def _cases_grouped_gemm(kernel: str):
    from moe_learn.kernels.grouped_gemm import grouped_gemm

    transposes = (True, False)
    flags = [  # (permute_x, permute_y, weighted)
        (False, False, False), (True, False, False), (False, True, False), (False, True, True), (True, True, False),
    ]
    runs = []
    for sizes_name, sizes in BAD_SIZES.items():
        for flag in flags:
            runs.append((f"m_sizes {sizes_name}", sizes, list(range(M)), flag))
    for gather_name, gather in _bad_gathers().items():
        for flag in flags[1:]:
            runs.append((f"gather {gather_name}", GOOD_SIZES, gather, flag))
    runs.append(("both bad", BAD_SIZES["negative size"], _bad_gathers()["index above M"], flags[-1]))
    for transpose in transposes:
        for label, sizes, gather, (permute_x, permute_y, weighted) in runs:
            name = f"{kernel} transpose={transpose} {label} permute_x={permute_x} permute_y={permute_y} w={weighted}"
            x_buf, X = _guarded((T if permute_x else M, K), float("nan"))
            w_shape = (E, N, K) if transpose else (E, K, N)
            w_buf, W = _guarded(w_shape, float("nan"))
            tw_buf, weights = _guarded((T, TOPK), float("nan"))
            _fill_inputs(X, W, weights)
            out_buf, out = _guarded((M, N), SENTINEL)
            out.zero_()
            m_sizes = (sizes if isinstance(sizes, torch.Tensor) else torch.tensor(sizes)).to(_device())
            yield name, partial(
                grouped_gemm, X, W, m_sizes, topk=TOPK,
                gather_indices=torch.tensor(gather, device=_device()) if (permute_x or permute_y) else None,
                permute_x=permute_x, permute_y=permute_y, topk_weights=weights if weighted else None,
                transpose=transpose, out=out, validate=False, kernel=kernel,
                config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "NUM_PROGRAMS": 2},
            ), {"out": (out_buf, out)}, {"X": (x_buf, X), "W": (w_buf, W), "topk_weights": (tw_buf, weights)}


def _cases_grouped_gemm_dw(kernel: str = "portable"):
    from moe_learn.kernels.backward import grouped_gemm_dw

    runs = [(f"m_sizes {n}", s, list(range(M)), px) for n, s in BAD_SIZES.items() for px in (False, True)]
    runs += [(f"gather {n}", GOOD_SIZES, g, True) for n, g in _bad_gathers().items()]
    runs.append(("both bad", BAD_SIZES["negative size"], _bad_gathers()["negative index"], True))
    for transpose in (True, False):
        for label, sizes, gather, permute_x in runs:
            name = f"dw {kernel} transpose={transpose} {label} permute_x={permute_x}"
            x_buf, X = _guarded((T if permute_x else M, K), float("nan"))
            dy_buf, dY = _guarded((M, N), float("nan"))
            _fill_inputs(X, dY)
            out_buf, out = _guarded((E, N, K) if transpose else (E, K, N), SENTINEL)
            out.zero_()
            m_sizes = (sizes if isinstance(sizes, torch.Tensor) else torch.tensor(sizes)).to(_device())
            yield name, partial(
                grouped_gemm_dw, X, dY, m_sizes, topk=TOPK,
                gather_indices=torch.tensor(gather, device=_device()) if permute_x else None,
                permute_x=permute_x, transpose=transpose, out=out, validate=False, kernel=kernel,
            ), {"dW": (out_buf, out)}, {"X": (x_buf, X), "dY": (dy_buf, dY)}


def run_cases(which: str) -> None:
    """The child's side: every case, one line each; START before it so a crash names the case."""
    import moe_learn  # noqa: F401  (the interpreter on CPU)

    torch.manual_seed(0)
    if which.startswith("dw"):  # "dw" (the portable kernel) or "dw-hopper"
        cases = _cases_grouped_gemm_dw("hopper" if which == "dw-hopper" else "portable")
    else:
        cases = _cases_grouped_gemm(which)
    for name, call, outputs, inputs in cases:
        print(f"START {name}", flush=True)
        try:
            call()
        except (ValueError, TypeError) as exc:  # a clear refusal is safe too
            print(f"OK {name} (refused: {exc})", flush=True)
            continue
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # an illegal address surfaces here, while this case is the last STARTed
        problem = _check(name, outputs, inputs)
        print(f"FAIL {name}: {problem}" if problem else f"OK {name}", flush=True)
    print("DONE", flush=True)


@pytest.mark.parametrize("which", ["portable", "hopper", "dw", "dw-hopper"])
def test_unvalidated_bad_values_stay_inside_the_tensors(which):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = f"from tests.kernels.test_memory_safety import run_cases; run_cases({which!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = proc.stdout.splitlines()
    started = [line[6:] for line in lines if line.startswith("START ")]
    assert proc.returncode == 0 and lines and lines[-1] == "DONE", (
        f"the child died (exit code {proc.returncode}) during: {started[-1] if started else '(before any case)'}\n"
        f"{proc.stderr[-3000:]}"
    )
    failures = [line for line in lines if line.startswith("FAIL ")]
    assert not failures, "\n".join(failures)
    assert len(started) > 20
