"""Checks for chapter 05, the Triton primer: a masked vector op, strided rows, a tiled matmul.

Each check takes the learner's ``@triton.jit`` kernel and launches it itself, with the
same grid and arguments as the chapter's wrapper (``moe_learn.kernels.primer.launch_*``),
on fresh random sizes that are mostly NOT multiples of the block, plus size 1 and exact
multiples, and strided layouts. Every tensor is a guarded buffer (``_kernels.Guarded``): a
read outside an input shows as NaN, an element never written stays NaN, a write outside
the output changes its guard cells. That makes mask mistakes fail the same way every time
and lets the message say which elements, rows or tiles went wrong and why.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moe_learn.course.checks._core import fail, passed
from moe_learn.course.checks._kernels import (
    POISON,
    Guarded,
    guarded_input,
    guarded_output,
    launch,
    never_written,
    past_edges,
    require_kernel,
)
from moe_learn.course.exercises import Exercise
from moe_learn.device import DEVICE, ON_GPU

EXERCISES = [
    Exercise(
        id="05.1",
        notebook="05_triton_primer.ipynb",
        title="scale_add_kernel: a masked vector op, out = alpha * x + y",
        hints=(
            "Program pid owns elements pid * BLOCK_SIZE ... pid * BLOCK_SIZE + BLOCK_SIZE - 1: build them with "
            "offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE), where pid = tl.program_id(axis=0).",
            "The last block sticks out past n_elements. mask = offs < n_elements, and pass mask= to both "
            "tl.load calls and to tl.store.",
            "x = tl.load(x_ptr + offs, mask=mask); y = tl.load(y_ptr + offs, mask=mask); "
            "tl.store(out_ptr + offs, alpha * x + y, mask=mask).",
        ),
    ),
    Exercise(
        id="05.2",
        notebook="05_triton_primer.ipynb",
        title="swiglu_kernel: silu(gate) * up over the rows of a strided [M, 2I] tensor",
        hints=(
            "Program (row, pid_i) handles row = tl.program_id(0) and columns offs_i = pid_i * BLOCK_I + "
            "tl.arange(0, BLOCK_I) of the output; mask = offs_i < I.",
            "Element (r, c) of gate_up is at gate_up_ptr + r * stride_gu_row + c * stride_gu_col. The gate is "
            "columns offs_i, the up half is I columns further: columns offs_i + I.",
            "Load both halves with mask=mask, compute in fp32: g = gate.to(tl.float32); out = g * tl.sigmoid(g) * up; "
            "store at out_ptr + row * stride_out_row + offs_i * stride_out_col with mask=mask.",
        ),
    ),
    Exercise(
        id="05.3",
        notebook="05_triton_primer.ipynb",
        title="matmul_kernel: a tiled C = A @ B with a K loop, tl.dot and masks on every edge",
        hints=(
            "Program (pid_m, pid_n) owns rows offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M) and columns offs_n "
            "(likewise) of C. Pointer grids: a_ptrs = a_ptr + offs_m[:, None] * stride_am "
            "+ offs_k[None, :] * stride_ak, "
            "b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn.",
            "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32); loop k over range(0, tl.cdiv(K, BLOCK_K)); in each "
            "step load a and b with masks (rows < M and offs_k < K - k * BLOCK_K; offs_k < K - k * BLOCK_K and "
            "columns < N) and other=0.0, then acc = tl.dot(a, b, acc); advance both pointer grids by BLOCK_K * stride.",
            "After the loop: c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn; "
            "tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N)).",
        ),
    ),
]

# ----------------------------------------------------------------------------- diagnosis helpers


def _ranges(indices: list[int], limit: int = 4) -> str:
    """[0, 1, 2, 7, 9, 10] -> '0..2, 7, 9..10' (the first ``limit`` runs)."""
    runs: list[tuple[int, int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    text = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in runs[:limit])
    return text + (", ..." if len(runs) > limit else "")


def _stride_mistakes(name: str, g: Guarded, row_name: str, col_name: str) -> list[tuple[torch.Tensor, str]]:
    """``name`` as read with swapped strides, or as if it were contiguous, with what to say about it."""
    rows, cols = g.view.shape
    actual = g.strides
    out = []
    swapped = (actual[1], actual[0])
    if swapped != actual:
        seen = g.read_as((rows, cols), swapped)
        if seen is not None:
            out.append(
                (
                    seen,
                    f"{name}'s strides are swapped: the row index goes with {row_name}, the column index "
                    f"with {col_name} ({name} has strides {actual} here)",
                )
            )
    if (cols, 1) != actual:
        seen = g.read_as((rows, cols), (cols, 1))
        if seen is not None:
            out.append(
                (
                    seen,
                    f"{name} is read as if it were contiguous (strides ({cols}, 1)), but here it has strides "
                    f"{actual}: address it with {row_name} and {col_name}, never a hard-coded row width",
                )
            )
    return out


def _same(got: torch.Tensor, alt: torch.Tensor, dtype: torch.dtype) -> bool:
    """Like _matches, but NaN where ``alt`` is NaN counts as agreeing (a misread that hit the guard)."""
    finite = torch.isfinite(alt)
    if not bool((torch.isnan(got) == ~finite).all()):
        return False
    if not finite.any():  # an all-NaN misread explains nothing in particular
        return False
    return bool(_close(got[finite], alt[finite], dtype).all())


def _tolerance(dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        # On a GPU tl.dot multiplies fp32 in tf32 (10-bit mantissa) by default.
        return 1e-2 if ON_GPU else 1e-4
    return 2e-2 if dtype == torch.bfloat16 else 1e-2


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise agreement (NaN never agrees), scaled to the size of the result."""
    tol = _tolerance(dtype)
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return torch.isclose(got, ref, rtol=tol, atol=tol * scale) & torch.isfinite(got)


def _matches(got: torch.Tensor, alt: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool(_close(got, alt, dtype).all())


# ----------------------------------------------------------------------------- diagnosis steps every check takes


def _first_run(run: Callable[[float], Guarded], ref: torch.Tensor, dtype: torch.dtype):
    """Run on an output filled with NaN: (its stray writes, the output in float64, the wrong elements)."""
    out = run(POISON)
    got = out.view.double().cpu()
    return out.stray_writes(), got, ~_close(got, ref, dtype)


def _never_written(ex: str, got, run: Callable[[float], Guarded], name: str, case: str, hint: str) -> torch.Tensor:
    """The mask of output elements the kernel never writes (``got`` came from the first run).

    Fails at once when it writes nothing at all, with ``hint``.
    """
    never = never_written(got, lambda poison: run(poison).view)
    if never.all():
        fail(ex, f"{name} was never written (every element still holds the NaN poison); case {case}.", hint)
    return never


def _fail_if_matches(ex, got, candidates, dtype, message, *, compare=_matches, hint_prefix="") -> None:
    """Fail with ``message`` and the hint of the first ``(value, hint)`` candidate that ``got`` equals."""
    for alt, hint in candidates:
        if compare(got, alt, dtype):
            fail(ex, message, hint_prefix + hint)


def _dtypes() -> tuple[torch.dtype, ...]:
    # The interpreter computes bf16 wrong, so the CPU uses float32 and float16 only.
    return (torch.bfloat16, torch.float16, torch.float32) if ON_GPU else (torch.float32, torch.float16)


def _randint(low: int, high: int, avoid_multiple_of: int | None = None) -> int:
    """A random int in [low, high], not a multiple of ``avoid_multiple_of`` when given."""
    while True:
        value = int(torch.randint(low, high + 1, ()))
        if avoid_multiple_of is None or value % avoid_multiple_of:
            return value


def _random_alpha() -> float:
    """A scale far from 0 and 1, so 'alpha ignored' and 'alpha on both' show."""
    while True:
        alpha = round(float(torch.empty(()).uniform_(-2.5, 2.5)), 3)
        if abs(alpha) > 0.3 and abs(alpha - 1) > 0.3:
            return alpha


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------- 05.1


def check_scale_add(kernel) -> None:
    """Launch the learner's ``scale_add_kernel`` with a 1-D grid; compare with ``alpha * x + y``."""
    from moe_learn.kernels.primer import launch_scale_add  # needs Triton; EXERCISES must load without it

    ex = "05.1"
    require_kernel(kernel, "scale_add_kernel", "check_scale_add")
    dtypes = _dtypes()
    cases = [
        (_randint(2 * 128 + 1, 5 * 128, avoid_multiple_of=128), 128),  # ragged last block
        (1, 64),  # one element, one mostly masked-off block
        (64, 64),  # exactly one block: nothing to mask
        (3 * 64, 64),  # exact multiple
        (_randint(2, 31), 32),  # less than one block
    ]
    for number, (n, block) in enumerate(cases):
        dtype = dtypes[number % len(dtypes)]
        alpha = _random_alpha()
        guard = 2 * block + 64
        x = guarded_input(torch.randn(n, device=DEVICE).to(dtype), guard=guard)
        y = guarded_input(torch.randn(n, device=DEVICE).to(dtype), guard=guard)
        x64, y64 = x.view.double().cpu(), y.view.double().cpu()
        ref = alpha * x64 + y64
        case = f"n_elements={n}, BLOCK_SIZE={block}, {_dtype_name(dtype)}, alpha={alpha}"

        def run(poison: float, x=x, y=y, n=n, dtype=dtype, guard=guard, alpha=alpha, block=block, case=case) -> Guarded:
            out = guarded_output((n,), dtype, guard=guard, poison=poison)
            launch(ex, case, lambda: launch_scale_add(kernel, x.view, y.view, out.view, alpha, block))
            return out

        stray, got, bad = _first_run(run, ref, dtype)
        if stray:
            after = [i for (i,) in stray if i >= n]
            where = (
                f"{len(after)} element(s) past the end (out[{n}..{max(after)}], out has n_elements={n})"
                if after
                else f"{len(stray)} element(s) before the start (out[{_ranges([i for (i,) in stray])}])"
            )
            if bad.any():  # the inside is wrong too: the addresses, not just the mask
                fail(
                    ex,
                    f"your kernel wrote outside out: {where}, and {int(bad.sum())} of the {n} elements inside are "
                    f"wrong; case {case}.",
                    "the offsets are off: program pid covers offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE), "
                    "and loads and store use the same offs and mask=offs < n_elements",
                )
            fail(
                ex,
                f"your kernel wrote outside out: {where}; case {case}.",
                "the last block's lanes past n_elements must be masked off: "
                "tl.store(out_ptr + offs, ..., mask=offs < n_elements)",
            )
        if not bad.any():
            continue
        _explain_scale_add(ex, case, n, block, alpha, x64, y64, got, ref, bad, run, dtype)
    passed(ex, "scale_add_kernel (masked alpha * x + y)", len(cases))


def _explain_scale_add(ex, case, n, block, alpha, x64, y64, got, ref, bad, run, dtype) -> None:
    if torch.isnan(got[bad]).any():  # never written, or NaN read from outside x or y
        nothing_stored = (
            "the kernel stores nothing (is the body still `pass`?), or its mask switches every lane off: "
            "tl.store(out_ptr + offs, alpha * x + y, mask=offs < n_elements)"
        )
        # As element indices, for the messages below.
        never = _never_written(ex, got, run, "out", case, nothing_stored).nonzero().flatten().tolist()
        if never:
            programs = sorted({i // block for i in never})
            never_set = set(never)
            empty = [p for p in programs if all(i in never_set for i in range(p * block, min(n, (p + 1) * block)))]
            last = (n - 1) // block
            if programs == [last] and never == list(range(never[0], n)):
                hint = (
                    "the last block's mask? it must keep exactly the lanes with offs < n_elements "
                    f"(program {last} covers {last * block}..{n - 1})"
                )
            elif empty:
                hint = (
                    f"program(s) {_ranges(empty)} wrote nothing to their own block: program pid must cover "
                    "offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)"
                )
            else:
                hint = (
                    "each program must cover offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE), "
                    "masked with offs < n_elements"
                )
            fail(
                ex,
                f"{'element' if len(never) == 1 else 'elements'} {_ranges(never)} of out were never written "
                f"(n_elements={n}, BLOCK_SIZE={block}); case {case}.",
                hint,
            )
        nan_at = torch.isnan(got).nonzero().flatten().tolist()
        fail(
            ex,
            f"out[{_ranges(nan_at)}] is NaN although x and y hold no NaN: your kernel read outside x or y; "
            f"case {case}.",
            "load with the same offsets and mask as the store: tl.load(x_ptr + offs, mask=offs < n_elements)",
        )
    alternatives = [
        (x64 + alpha * y64, "you computed x + alpha * y: alpha scales x, then y is added"),
        (x64 + y64, "alpha is ignored: out = alpha * x + y"),
        (alpha * (x64 + y64), "alpha scales y too: only x is scaled, out = alpha * x + y"),
    ]
    message = f"out differs from alpha * x + y in {int(bad.sum())} of {n} elements; case {case}."
    _fail_if_matches(ex, got, alternatives, dtype, message)
    i = int(bad.nonzero()[0])
    if i + 1 < n and _matches(got[i : i + 1], ref[i + 1 : i + 2], dtype):
        fail(
            ex,
            f"out[{i}] holds the value of element {i + 1}; case {case}.",
            "off by one: the offsets are shifted; load and store at the same "
            "offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)",
        )
    fail(
        ex,
        f"out[{i}] = {got[i].item():.5g}, expected alpha * x[{i}] + y[{i}] = {alpha} * {x64[i].item():.5g} + "
        f"{y64[i].item():.5g} = {ref[i].item():.5g} ({int(bad.sum())} of {n} elements wrong); case {case}.",
    )


# ----------------------------------------------------------------------------- 05.2


def _layout_2d(rows: int, cols: int, kind: str) -> tuple[tuple[int, int], str]:
    """Strides of a [rows, cols] tensor laid out as ``kind``, and how to say it."""
    if kind == "contiguous":
        return (cols, 1), f"contiguous (strides ({cols}, 1))"
    if kind == "padded":
        pad = _randint(3, 9)
        return (
            cols + pad,
            1,
        ), f"rows padded to {cols + pad} (strides ({cols + pad}, 1), a column slice of a wider tensor)"
    if kind == "transposed":
        return (1, rows), f"transposed (strides (1, {rows}), the .T of a contiguous [{cols}, {rows}])"
    raise ValueError(f"unknown layout {kind!r}")


def check_swiglu_rows(kernel) -> None:
    """Launch the learner's ``swiglu_kernel`` on a (rows, column blocks) grid over strided inputs."""
    from moe_learn.kernels.primer import launch_swiglu  # needs Triton; EXERCISES must load without it

    ex = "05.2"
    require_kernel(kernel, "swiglu_kernel", "check_swiglu_rows")
    dtypes = _dtypes()
    # (M, I, layout of gate_up, layout of out, BLOCK_I)
    cases = [
        (_randint(5, 9), _randint(33, 63, avoid_multiple_of=16), "contiguous", "padded", 16),  # ragged column blocks
        (1, 1, "contiguous", "padded", 16),  # one row, one column
        (4, 64, "contiguous", "contiguous", 32),  # exact multiple of the block
        (_randint(5, 9), _randint(33, 63, avoid_multiple_of=16), "padded", "padded", 16),  # padded input rows
        (_randint(4, 7), _randint(17, 31, avoid_multiple_of=16), "transposed", "contiguous", 16),  # column-major input
        (_randint(2, 6), _randint(2, 15), "contiguous", "padded", 16),  # less than one block per row
    ]
    passed_layouts: list[str] = []
    for number, (M, I, in_kind, out_kind, block) in enumerate(cases):
        dtype = dtypes[number % len(dtypes)]
        in_strides, in_text = _layout_2d(M, 2 * I, in_kind)
        out_strides, out_text = _layout_2d(M, I, out_kind)
        # Wide enough that even swapped strides or a missing mask stay inside the buffer.
        guard = 2 * (max(M, 2 * I) + 2 * block) * (max(in_strides + out_strides) + 1) + 64
        gate_up = guarded_input(torch.randn(M, 2 * I, device=DEVICE).to(dtype), strides=in_strides, guard=guard)
        gu64 = gate_up.view.double().cpu()
        ref = F.silu(gu64[:, :I]) * gu64[:, I:]
        case = f"M={M}, I={I}, BLOCK_I={block}, {_dtype_name(dtype)}, gate_up {in_text}, out {out_text}"

        def run(
            poison: float,
            gate_up=gate_up,
            M=M,
            I=I,
            out_strides=out_strides,
            dtype=dtype,
            guard=guard,
            block=block,
            case=case,
        ) -> Guarded:
            out = guarded_output((M, I), dtype, strides=out_strides, guard=guard, poison=poison)
            launch(ex, case, lambda: launch_swiglu(kernel, gate_up.view, out.view, block))
            return out

        stray, got, bad = _first_run(run, ref, dtype)
        if stray:
            past_rows, past_cols = past_edges(stray, M, I)
            if past_cols:
                r, c = past_cols[0]
                where = f"row {r}, column {c}, but out has only I={I} columns"
            elif past_rows:
                where = f"row {past_rows[0][0]}, but out has only M={M} rows"
            else:
                where = "before the start of out"
            message = f"your kernel wrote outside out: {where} ({len(stray)} stray writes); case {case}."
            if bad.any():
                fail(
                    ex,
                    message.removesuffix(f"; case {case}.")
                    + f", and {int(bad.sum())} elements inside are wrong; case {case}.",
                    "the output address is off: out_ptr + row * stride_out_row + offs_i * stride_out_col, "
                    f"with out's own strides ({out_strides} here, not a hard-coded I)",
                )
            if past_cols:
                fail(ex, message, "the last column block sticks out past I: store with mask=offs_i < I")
            fail(
                ex,
                message,
                "program (row, pid_i) must write row = tl.program_id(0) at out_ptr + row * stride_out_row "
                "+ offs_i * stride_out_col",
            )
        if not bad.any():
            passed_layouts.append(in_text.split(" (")[0])
            continue
        _explain_swiglu(ex, case, M, I, block, in_kind, gate_up, got, ref, bad, run, dtype, passed_layouts)
    passed(ex, "swiglu_kernel (strided rows, silu(gate) * up)", len(cases))


def _explain_swiglu(ex, case, M, I, block, in_kind, gate_up, got, ref, bad, run, dtype, passed_layouts) -> None:
    gu64 = gate_up.view.double().cpu()
    # gate_up read with swapped strides, or as if contiguous: what such a kernel computes.
    misreads = [
        (F.silu(seen[:, :I]) * seen[:, I:], why)
        for seen, why in _stride_mistakes("gate_up", gate_up, "stride_gu_row", "stride_gu_col")
    ]
    if torch.isnan(got[bad]).any():
        nothing_stored = (
            "the kernel stores nothing: is the body still `pass`? it needs tl.store(out_ptrs, out, mask=mask)"
        )
        never = _never_written(ex, got, run, "out", case, nothing_stored)
        if never.any():
            rows = never.any(dim=1).nonzero().flatten().tolist()
            cols = never.any(dim=0).nonzero().flatten().tolist()
            whole_rows = never.all(dim=1).nonzero().flatten().tolist()
            last_block_start = (I - 1) // block * block
            if whole_rows and whole_rows == rows:
                fail(
                    ex,
                    f"rows {_ranges(whole_rows)} of out were never written (M={M}); case {case}.",
                    "program (row, pid_i) writes row = tl.program_id(axis=0): "
                    "add row * stride_out_row to the output pointer",
                )
            if len(rows) == M and bool((never == never[0]).all()):
                where = f"columns {_ranges(cols)} of every row were never written (I={I}, BLOCK_I={block})"
                if cols[0] >= last_block_start and cols == list(range(cols[0], I)):
                    hint = (
                        "the last column block's mask? it must keep exactly the lanes with offs_i < I "
                        f"(block pid_i={(I - 1) // block} covers columns {last_block_start}..{I - 1})"
                    )
                else:
                    hint = "program (row, pid_i) covers columns offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)"
                fail(ex, f"{where}; case {case}.", hint)
            r = rows[0]
            fail(
                ex,
                f"out[{r}, {_ranges(never[r].nonzero().flatten().tolist())}] (and {int(never.sum())} elements in all) "
                f"were never written; case {case}.",
                "each program writes row tl.program_id(0), columns pid_i * BLOCK_I + tl.arange(0, BLOCK_I), "
                "masked by offs_i < I",
            )
        # NaN came from reading outside gate_up. Rerun with finite garbage around it to see what was read.
        gate_up.scramble_guard()
        seen = run(POISON).view.double().cpu()
        misread = _stride_mistakes("gate_up", gate_up, "stride_gu_row", "stride_gu_col")
        _fail_if_matches(
            ex,
            seen,
            ((F.silu(wrong[:, :I]) * wrong[:, I:], why) for wrong, why in misread),
            dtype,
            f"out is wrong (NaN read from outside gate_up); case {case}.",
            hint_prefix="wrong strides: ",
        )
        r, c = (int(v) for v in torch.isnan(got).nonzero()[0])
        fail(
            ex,
            f"out[{r}, {c}] is NaN although gate_up holds no NaN: your kernel read outside gate_up; case {case}.",
            "gate is columns offs_i and up is columns offs_i + I of the same row: "
            "gate_up_ptr + row * stride_gu_row + (offs_i + I) * stride_gu_col, loads masked by offs_i < I",
        )
    differs = f"out differs from silu(gate) * up in {int(bad.sum())} of {M * I} elements; case {case}."
    _fail_if_matches(ex, got, misreads, dtype, differs, compare=_same, hint_prefix="wrong strides: ")
    gate, up = gu64[:, :I], gu64[:, I:]
    alternatives = [
        (F.silu(up) * gate, "gate and up are swapped: gate is the FIRST I columns, up the last I"),
        (torch.sigmoid(gate) * up, "silu(g) is g * sigmoid(g), not sigmoid(g)"),
        (gate * up, "the activation is missing: out = silu(gate) * up with silu(g) = g * sigmoid(g)"),
        (F.silu(gate), "up is missing: out = silu(gate) * up"),
    ]
    _fail_if_matches(ex, got, alternatives, dtype, differs)
    r = int(bad.any(dim=1).nonzero()[0])
    for s in range(M):
        if s != r and _matches(got[r], ref[s], dtype):
            fail(
                ex,
                f"wrong stride: row {r} of out holds row {s}'s values; case {case}.",
                "the row offset must use the strides: gate_up_ptr + row * stride_gu_row and "
                "out_ptr + row * stride_out_row "
                "with row = tl.program_id(0)",
            )
    c = int(bad[r].nonzero()[0])
    message = (
        f"out[{r}, {c}] = {got[r, c].item():.5g}, expected silu(gate) * up = silu({gate[r, c].item():.5g}) * "
        f"{up[r, c].item():.5g} = {ref[r, c].item():.5g} ({int(bad.sum())} of {M * I} wrong); case {case}."
    )
    if in_kind != "contiguous" and passed_layouts:
        fail(
            ex,
            message,
            f"the {', '.join(sorted(set(passed_layouts)))} case(s) passed but this layout fails: "
            "address element (r, c) as gate_up_ptr + r * stride_gu_row + c * stride_gu_col (strides not swapped, "
            "no hard-coded 2 * I row width, up at + I * stride_gu_col)",
        )
    fail(
        ex, message, "check the strides (row * stride_gu_row + column * stride_gu_col) and the formula silu(gate) * up"
    )


# ----------------------------------------------------------------------------- 05.3


def _matmul_layout(rows: int, cols: int, kind: str, name: str) -> tuple[tuple[int, int], str]:
    strides, text = _layout_2d(rows, cols, kind)
    if kind == "transposed" and name == "B":
        return strides, f"B = W.T for an nn.Linear weight W [{cols}, {rows}] (strides (1, {rows}))"
    return strides, f"{name} {text}"


def check_matmul(kernel) -> None:
    """Launch the learner's ``matmul_kernel`` on a (M tiles, N tiles) grid; compare with A @ B."""
    from moe_learn.kernels.primer import launch_matmul  # needs Triton; EXERCISES must load without it

    ex = "05.3"
    require_kernel(kernel, "matmul_kernel", "check_matmul")
    dtypes = _dtypes()
    # (M, N, K, layout of A, B, C, (BLOCK_M, BLOCK_N, BLOCK_K))
    cases = [
        (
            _randint(33, 47),
            _randint(17, 31),
            _randint(33, 47, avoid_multiple_of=16),
            "contiguous",
            "contiguous",
            "padded",
            (32, 16, 16),
        ),  # ragged M, N and K
        (1, 1, 1, "contiguous", "contiguous", "padded", (16, 16, 16)),  # one element, K shorter than a block
        (32, 32, 32, "contiguous", "contiguous", "contiguous", (16, 16, 16)),  # exact multiples, 2 K steps
        (
            _randint(5, 15),
            _randint(33, 47),
            _randint(17, 31, avoid_multiple_of=16),
            "contiguous",
            "transposed",
            "contiguous",
            (16, 32, 16),
        ),  # X @ W.T, as in an MoE layer
        (
            _randint(17, 31),
            _randint(5, 15),
            _randint(33, 47, avoid_multiple_of=16),
            "transposed",
            "padded",
            "padded",
            (16, 16, 16),
        ),  # column-major A, padded B rows
    ]
    passed_layouts: list[str] = []
    for number, (M, N, K, a_kind, b_kind, c_kind, blocks) in enumerate(cases):
        dtype = dtypes[number % len(dtypes)]
        bm, bn, bk = blocks
        a_strides, a_text = _matmul_layout(M, K, a_kind, "A")
        b_strides, b_text = _matmul_layout(K, N, b_kind, "B")
        c_strides, c_text = _matmul_layout(M, N, c_kind, "C")
        guard = (max(M, N, K) + 2 * max(blocks) + 2) * (max(a_strides + b_strides + c_strides) + 1)
        a = guarded_input(torch.randn(M, K, device=DEVICE).to(dtype), strides=a_strides, guard=guard)
        b = guarded_input(torch.randn(K, N, device=DEVICE).to(dtype), strides=b_strides, guard=guard)
        a64, b64 = a.view.double().cpu(), b.view.double().cpu()
        ref = a64 @ b64
        case = (
            f"M={M}, N={N}, K={K}, BLOCK_M={bm}, BLOCK_N={bn}, BLOCK_K={bk}, {_dtype_name(dtype)}; "
            f"{a_text}; {b_text}; {c_text}"
        )

        def run(
            poison: float, a=a, b=b, M=M, N=N, c_strides=c_strides, dtype=dtype, guard=guard, blocks=blocks, case=case
        ) -> Guarded:
            c = guarded_output((M, N), dtype, strides=c_strides, guard=guard, poison=poison)
            launch(ex, case, lambda: launch_matmul(kernel, a.view, b.view, c.view, *blocks))
            return c

        stray, got, bad = _first_run(run, ref, dtype)
        if stray:
            past_rows, past_cols = past_edges(stray, M, N)
            if past_rows:
                where = f"row {past_rows[0][0]}, but C has only M={M} rows"
                hint = "the last row of tiles sticks out past M: the store mask needs offs_m[:, None] < M"
            elif past_cols:
                r, col = past_cols[0]
                where = f"row {r}, column {col}, but C has only N={N} columns"
                hint = "the last column of tiles sticks out past N: the store mask needs offs_n[None, :] < N"
            else:
                where = "before the start of C"
                hint = "C's tile starts at c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn"
            if bad.any():
                fail(
                    ex,
                    f"your kernel wrote outside C: {where} ({len(stray)} stray writes), and {int(bad.sum())} "
                    f"elements inside are wrong; case {case}.",
                    "the output address is off: c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn "
                    f"with C's own strides ({c_strides} here), masked by (offs_m[:, None] < M) & (offs_n[None, :] < N)",
                )
            fail(ex, f"your kernel wrote outside C: {where} ({len(stray)} stray writes); case {case}.", hint)
        if not bad.any():
            passed_layouts.append(case)
            continue
        _explain_matmul(ex, case, M, N, K, blocks, (a_kind, b_kind), a, b, got, ref, bad, run, dtype, passed_layouts)
    passed(ex, "matmul_kernel (tiled, masked on M, N and K)", len(cases))


def _explain_matmul(ex, case, M, N, K, blocks, kinds, a, b, got, ref, bad, run, dtype, passed_layouts) -> None:
    a64, b64 = a.view.double().cpu(), b.view.double().cpu()
    # A or B read with swapped strides, or as if contiguous: the result such a kernel computes.
    misreads = [(seen @ b64, why) for seen, why in _stride_mistakes("A", a, "stride_am", "stride_ak")]
    misreads += [(a64 @ seen, why) for seen, why in _stride_mistakes("B", b, "stride_bk", "stride_bn")]
    bm, bn, bk = blocks
    tail = K % bk
    if torch.isnan(got[bad]).any():
        nothing_stored = (
            "the kernel stores nothing: is the body still `pass`? it ends with tl.store(c_ptrs, acc, mask=c_mask)"
        )
        never = _never_written(ex, got, run, "C", case, nothing_stored)
        if never.any():
            tiles = sorted({(r // bm, col // bn) for r, col in never.nonzero().tolist()})
            empty = [
                (tm, tn) for tm, tn in tiles if bool(never[tm * bm : (tm + 1) * bm, tn * bn : (tn + 1) * bn].all())
            ]
            rows = never.any(dim=1).nonzero().flatten().tolist()
            cols = never.any(dim=0).nonzero().flatten().tolist()
            if empty:
                listing = ", ".join(f"({tm}, {tn})" for tm, tn in empty[:6]) + (", ..." if len(empty) > 6 else "")
                fail(
                    ex,
                    f"the tiles of programs (pid_m, pid_n) = {listing} were never written; case {case}.",
                    "program (pid_m, pid_n) covers offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M) and "
                    "offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N), "
                    "with pid_m = tl.program_id(0), pid_n = tl.program_id(1)",
                )
            if rows[0] >= (M - 1) // bm * bm and rows == list(range(rows[0], M)):
                fail(
                    ex,
                    f"rows {_ranges(rows)} of C (the ragged last row of tiles) were never written; case {case}.",
                    "the store mask cuts too early: keep exactly offs_m[:, None] < M",
                )
            if cols[0] >= (N - 1) // bn * bn and cols == list(range(cols[0], N)):
                fail(
                    ex,
                    f"columns {_ranges(cols)} of C (the ragged last column of tiles) were never written; case {case}.",
                    "the store mask cuts too early: keep exactly offs_n[None, :] < N",
                )
            r, col = never.nonzero()[0].tolist()
            fail(
                ex,
                f"C[{r}, {col}] (and {int(never.sum())} elements in all) were never written; case {case}.",
                "store the whole tile: c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, "
                "mask (offs_m[:, None] < M) & (offs_n[None, :] < N)",
            )
        # NaN came from reading outside A or B. Rerun with finite garbage around both to see what was read.
        nan = torch.isnan(got)
        a.scramble_guard()
        b.scramble_guard()
        seen = run(POISON).view.double().cpu()
        if tail:
            kp = K + bk - tail
            a_ext, b_ext = a.read_as((M, kp), a.strides), b.read_as((kp, N), b.strides)
            # Both loads unmasked in K, or one of them (then the garbage meets zeros and the result looks right).
            read_past_k = (a_ext is not None and b_ext is not None and _matches(seen, a_ext @ b_ext, dtype)) or (
                _matches(seen, ref, dtype)
            )
            if read_past_k:
                fail(
                    ex,
                    f"{'every element' if nan.all() else f'{int(nan.sum())} elements'} of C came out NaN although A "
                    f"and B hold no NaN: the K loop read past column K-1 of A or row K-1 of B; case {case}.",
                    f"column tail K % BLOCK_K = {tail} ignored by the masks: in the last K block only {tail} of the "
                    f"{bk} lanes are real; mask BOTH loads with offs_k < K - k * BLOCK_K and other=0.0",
                )
        a_seen, b_seen = a.view.double().cpu(), b.view.double().cpu()
        _fail_if_matches(
            ex,
            seen,
            [(m @ b_seen, why) for m, why in _stride_mistakes("A", a, "stride_am", "stride_ak")]
            + [(a_seen @ m, why) for m, why in _stride_mistakes("B", b, "stride_bk", "stride_bn")],
            dtype,
            f"C is wrong ({int(nan.sum())} NaN read from outside A or B); case {case}.",
            hint_prefix="wrong strides: ",
        )
        r, col = nan.nonzero()[0].tolist()
        fail(
            ex,
            f"C[{r}, {col}] (and {int(nan.sum())} elements in all) is NaN although A and B hold no NaN: "
            f"your kernel read outside A or B; case {case}.",
            "mask every load: A with (offs_m[:, None] < M) & (offs_k[None, :] < K - k * BLOCK_K), B with "
            "(offs_k[:, None] < K - k * BLOCK_K) & (offs_n[None, :] < N), other=0.0; and check the strides",
        )
    differs = f"C differs from A @ B in {int(bad.sum())} of {M * N} elements; case {case}."
    _fail_if_matches(ex, got, misreads, dtype, differs, compare=_same, hint_prefix="wrong strides: ")
    full = K - tail
    alternatives = []
    if tail:
        alternatives.append(
            (
                a64[:, :full] @ b64[:full],
                f"column tail K % BLOCK_K = {tail} ignored: C equals "
                f"A[:, :{full}] @ B[:{full}, :]; loop over tl.cdiv(K, BLOCK_K) blocks and mask the last one",
            )
        )
    if K > bk:
        alternatives.append(
            (
                a64[:, :bk] @ b64[:bk],
                "only the first K block counts: advance a_ptrs += BLOCK_K * stride_ak "
                "and b_ptrs += BLOCK_K * stride_bk inside the loop",
            )
        )
        last = (K - 1) // bk * bk
        alternatives.append(
            (
                a64[:, last:] @ b64[last:],
                "only the last K block counts: accumulate, acc = tl.dot(a, b, acc) "
                "(or acc += tl.dot(a, b)), with acc = tl.zeros(...) before the loop",
            )
        )
    _fail_if_matches(ex, got, alternatives, dtype, differs)
    r, col = bad.nonzero()[0].tolist()
    message = (
        f"C[{r}, {col}] = {got[r, col].item():.5g}, expected (A @ B)[{r}, {col}] = {ref[r, col].item():.5g} "
        f"({int(bad.sum())} of {M * N} elements wrong); case {case}."
    )
    if any(kind != "contiguous" for kind in kinds) and passed_layouts:
        fail(
            ex,
            message,
            "earlier cases passed but this layout fails: use the strides as given, "
            "a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak (not swapped, no hard-coded K or N), "
            "and advance by BLOCK_K * stride_ak / BLOCK_K * stride_bk",
        )
    fail(
        ex,
        message,
        "check the pointer grids (offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak; "
        "offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn), the K loop and the accumulation",
    )
