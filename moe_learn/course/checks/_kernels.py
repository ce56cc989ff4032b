"""What the kernel checks of chapters 06-07 share: guarded buffers and row-level diagnosis.

A learner's kernel writes through raw pointers, so a wrong mask can read or write
anywhere. The checks therefore hand it views into larger buffers: the padding around X
and W holds large values (an unmasked load shows up in the result instead of crashing),
and the padding around the output holds NaN (an unmasked store shows up as a write
outside the output). Wrong rows are then explained by matching them against the results
that plausible mistakes would produce.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_learn.course.checks._core import fail

PAD_VALUE = 1000.0  # what a load past the end of X or W reads: wildly wrong, never NaN


def guarded_input(shape: tuple[int, ...], pad: tuple[int, ...], device, dtype=torch.float32):
    """(storage, view): random data in ``view``; the padding around it holds PAD_VALUE."""
    store = torch.full(tuple(s + p for s, p in zip(shape, pad, strict=True)), PAD_VALUE, dtype=dtype, device=device)
    view = store[tuple(slice(0, s) for s in shape)]
    view.copy_(torch.randn(shape, dtype=torch.float32).to(device=device, dtype=dtype))
    return store, view


def guarded_output(rows: int, cols: int, pad_rows: int, pad_cols: int, device, dtype=torch.float32):
    """(storage, view): everything NaN, so unwritten and out-of-bounds writes both show."""
    store = torch.full((rows + pad_rows, cols + pad_cols), float("nan"), dtype=dtype, device=device)
    return store, store[:rows, :cols]


def check_no_stray_writes(exercise: str, store: torch.Tensor, rows: int, cols: int, case: str) -> None:
    """Fail if anything outside ``store[:rows, :cols]`` was written."""
    written = ~torch.isnan(store.detach().float().cpu())
    below = written[rows:].nonzero()
    if below.numel():
        r, c = int(below[0][0]) + rows, int(below[0][1])
        fail(
            exercise,
            f"your kernel wrote past the last output row: row {r}, column {c}, but the output has {rows} rows ({case})",
            "mask the store with the rows that exist (offs_m < m_size inside the expert): "
            "the last row block of an expert is usually only partly full",
        )
    right = written[:rows, cols:].nonzero()
    if right.numel():
        r, c = int(right[0][0]), int(right[0][1]) + cols
        fail(
            exercise,
            f"your kernel wrote column {c} of row {r}, but the output has only {cols} columns ({case})",
            "mask the store with offs_n < N: N is not a multiple of BLOCK_N here",
        )


@dataclass
class Mistake:
    """The output a plausible mistake would produce, and how to explain it."""

    output: torch.Tensor  # float64, same shape as the expected output
    says: str  # completes "row 7 ..." e.g. "holds expert 1's product"
    hint: str


def explain_rows(
    exercise: str,
    got: torch.Tensor,
    want: torch.Tensor,
    *,
    case: str,
    describe: Callable[[int, int], str],
    group: Callable[[int], object],
    mistakes: list[Mistake],
    unwritten_hint: Callable[[int], str],
    wrong_hint: str,
    other_row_hint: str = "the row is computed right but stored to the wrong place: check the store's row index",
    rtol: float = 2e-2,
    atol: float = 2e-2,
) -> None:
    """Fail with a row-level explanation if ``got`` differs from ``want``.

    describe(r0, r1) names rows r0..r1 in the learner's terms; group(r) keeps a run of
    rows inside one expert (or one token); unwritten_hint(r) explains never-written rows.
    """
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0

    def close(a, b):
        return torch.isclose(a, b, rtol=rtol, atol=atol * scale) & torch.isfinite(a)

    row_ok = close(got, want).all(dim=1)
    if bool(row_ok.all()):
        return
    if bool(torch.isnan(got).all()):
        fail(
            exercise,
            f"your kernel wrote nothing: all {got.shape[0]} output rows are still NaN ({case})",
            "is the body still `pass`? each program must loop over its tiles and tl.store each one",
        )

    def kind(r: int):
        row = got[r]
        nan = torch.isnan(row)
        if bool(nan.all()):
            return ("unwritten", None)
        if bool(nan.any()):
            cols = nan.nonzero().flatten()
            return ("some columns unwritten", (int(cols[0]), int(cols[-1])))
        for i, m in enumerate(mistakes):
            if bool(close(row, m.output[r]).all()):
                return ("mistake", i)
        others = close(row.expand_as(want), want).all(dim=1).nonzero().flatten().tolist()
        others = [o for o in others if o != r]
        if others:
            return ("other row", others[0])
        return ("wrong", None)

    first = int((~row_ok).nonzero()[0])
    what = kind(first)
    last = first
    while (
        last + 1 < got.shape[0]
        and not bool(row_ok[last + 1])
        and group(last + 1) == group(first)
        and kind(last + 1)[0] == what[0]
        and (what[0] in ("unwritten", "wrong") or kind(last + 1) == what)
    ):
        last += 1
    rows = describe(first, last)
    label, extra = what

    def say(exercise, message, hint=None, single=first == last):
        # "hold(s)" -> "holds" for one row, "hold" for several
        message = re.sub(r"(\w+)\(s\)", (lambda m: m.group(1) + "s") if single else (lambda m: m.group(1)), message)
        fail(exercise, message, hint)

    if label == "unwritten":
        say(
            exercise,
            f"{rows} {'was' if first == last else 'were'} never written (still NaN) ({case})",
            unwritten_hint(first),
        )
    if label == "some columns unwritten":
        say(
            exercise,
            f"{rows}: columns {extra[0]}-{extra[1]} never written ({case})",
            "every column block must be computed: use cdiv(N, BLOCK_N) column tiles per expert",
        )
    if label == "mistake":
        m = mistakes[extra]
        say(exercise, f"{rows} {m.says} ({case})", m.hint)
    if label == "other row":
        say(
            exercise,
            f"{rows} hold(s) the result that belongs in {describe(extra, extra)} ({case})",
            other_row_hint,
        )
    col = int((~close(got[first], want[first])).nonzero()[0])
    say(
        exercise,
        f"{rows} hold(s) wrong values: column {col} is {got[first, col].item():.4g}, "
        f"expected {want[first, col].item():.4g} ({case})",
        wrong_hint,
    )
