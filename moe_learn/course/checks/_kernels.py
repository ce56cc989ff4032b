"""What the kernel checks share (chapters 05, 06, 07, 09): guarded buffers, the launch, row-level diagnosis.

A learner's kernel reads and writes through raw pointers, so a wrong mask or stride can touch
memory anywhere. Every kernel check therefore hands it views into larger buffers (``Guarded``):

* the guard cells around an input (``guarded_input``) hold INPUT_GUARD, NaN: a value read from
  outside the input turns the result NaN, even where a masked-off zero multiplies it;
* an output (``guarded_output``) is filled with POISON, NaN, so an element the kernel never
  writes stays NaN; its guard cells hold OUTPUT_GUARD, so a write outside it changes them
  (``Guarded.stray_writes``);
* NaN in an output was then either never written or read from outside an input:
  ``never_written`` runs the kernel again on an output filled with FINITE_POISON to tell which.

A mistake thus fails the same way on every run, also in Triton's interpreter, where a stray
access would otherwise read whatever memory lies there. Wrong rows are explained by matching
them against the results that plausible mistakes would produce (``explain_rows``).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_learn.course.checks._core import CheckFailed, fail
from moe_learn.device import DEVICE, ON_GPU

INPUT_GUARD = float("nan")  # around every input: what a read from outside it returns
OUTPUT_GUARD = -512.0  # around every output: exact in fp32, fp16 and bf16, and never a plausible result
POISON = float("nan")  # what an output holds before the kernel runs
FINITE_POISON = 320.0  # the poison of the rerun that tells "never written" from "NaN read from outside"
GUARD_CELLS = 64  # guard cells before and after a buffer unless the check asks for more

# The blocks the grouped GEMM checks (chapters 06 and 07) launch the learner's kernel with.
GEMM_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}


# ----------------------------------------------------------------------------- guarded buffers


@dataclass
class Guarded:
    """A strided ``view`` inside a flat ``buffer`` whose other cells (the guard cells) hold ``guard``."""

    buffer: torch.Tensor
    view: torch.Tensor
    front: int  # the buffer offset of the view's first element
    guard: float

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(self.view.stride())

    def guard_cells(self) -> torch.Tensor:
        """A bool mask over the buffer (on the CPU): True for every cell that is not in the view."""
        inside = torch.zeros(self.buffer.numel(), dtype=torch.bool)
        inside.as_strided(tuple(self.view.shape), self.strides, self.front).fill_(True)
        return ~inside

    def stray_writes(self) -> list[tuple[int, ...]]:
        """The guard cells the kernel wrote, each as the index it has in the view continued past its edges.

        An index past a size was written past that edge; a negative one, before the view's start.
        """
        cells = self.buffer.detach().cpu()
        changed = (cells != self.guard) & self.guard_cells()  # NaN != guard counts as changed
        return [self._locate(int(p) - self.front) for p in changed.nonzero().flatten()]

    def _locate(self, offset: int) -> tuple[int, ...]:
        """The index whose address is ``offset`` under the view's (positive) strides."""
        index = [0] * self.view.dim()
        rest = offset
        for d in sorted(range(self.view.dim()), key=lambda d: -self.strides[d]):
            index[d], rest = divmod(rest, self.strides[d])
        return tuple(index)

    def read_as(self, shape: tuple[int, ...], strides: tuple[int, ...]) -> torch.Tensor | None:
        """What a kernel reads from the view's start with other ``strides`` (float64, CPU); None past the buffer."""
        reach = 1 + sum((size - 1) * stride for size, stride in zip(shape, strides, strict=True))
        if self.front + reach > self.buffer.numel():
            return None
        return self.buffer.as_strided(shape, strides, self.front).double().cpu()

    def scramble_guard(self) -> None:
        """Replace the guard cells with finite random values: a rerun then shows what a misread computes."""
        cells = self.guard_cells().to(self.buffer.device)
        noise = torch.randn(int(cells.sum()), device=self.buffer.device).to(self.buffer.dtype)
        self.buffer[cells] = noise


def _guarded(shape, dtype, device, strides, pad, guard: int, fill: float) -> Guarded:
    shape = tuple(int(s) for s in shape)
    pad = tuple(pad) if pad is not None else (0,) * len(shape)
    if strides is None:  # contiguous over shape + pad: pad[d] guard cells follow the view along dim d
        strides, step = [], 1
        for size in reversed([s + p for s, p in zip(shape, pad, strict=True)]):
            strides.insert(0, step)
            step *= max(size, 1)
    reach = 1 + sum(max(s + p - 1, 0) * st for s, p, st in zip(shape, pad, strides, strict=True))
    buffer = torch.full((guard + reach + guard,), fill, dtype=dtype, device=device)
    return Guarded(buffer, buffer.as_strided(shape, tuple(strides), guard), guard, fill)


def guarded_input(values: torch.Tensor, *, strides=None, pad=None, guard: int = GUARD_CELLS) -> Guarded:
    """``values`` in a view whose guard cells hold INPUT_GUARD (NaN).

    ``strides`` lays the view out (default: contiguous over ``shape + pad``, so ``pad[d]`` guard
    cells follow it along dim d); ``guard`` guard cells come before and after it all.
    """
    g = _guarded(values.shape, values.dtype, values.device, strides, pad, guard, INPUT_GUARD)
    g.view.copy_(values)
    return g


def guarded_output(
    shape, dtype=torch.float32, *, strides=None, pad=None, guard: int = GUARD_CELLS, poison: float = POISON,
    device=DEVICE,
) -> Guarded:  # fmt: skip
    """An output view filled with ``poison`` whose guard cells hold OUTPUT_GUARD (layout: see guarded_input)."""
    g = _guarded(shape, dtype, device, strides, pad, guard, OUTPUT_GUARD)
    g.view.fill_(poison)
    return g


def never_written(got: torch.Tensor, rerun: Callable[[float], torch.Tensor]) -> torch.Tensor:
    """The elements of ``got`` (an output filled with POISON) that the kernel never wrote: a bool mask on the CPU.

    NaN in ``got`` is either never written or read from outside an input. ``rerun(poison)`` runs
    the kernel again on a fresh output filled with ``poison`` and returns it: what still holds
    FINITE_POISON there was never written.
    """
    nan = torch.isnan(got.detach().cpu())
    if not nan.any():
        return nan
    return nan & (rerun(FINITE_POISON).detach().cpu() == FINITE_POISON)


def past_edges(stray: list[tuple[int, ...]], rows: int, cols: int):
    """Stray writes of a ``[rows, cols]`` output: (those past the last row, those past the last column).

    The others lie before the output's start.
    """
    after = [s for s in stray if min(s) >= 0]
    return [s for s in after if s[0] >= rows], [s for s in after if s[0] < rows]


def check_no_stray_writes(exercise: str, out: Guarded, case: str) -> None:
    """Fail if the kernel wrote outside the grouped GEMM output ``out`` (2-D, rows in expert order)."""
    stray = out.stray_writes()
    if not stray:
        return
    rows, cols = out.view.shape
    past_rows, past_cols = past_edges(stray, rows, cols)
    if past_rows:
        r, c = past_rows[0]
        fail(
            exercise,
            f"your kernel wrote past the last output row: row {r}, column {c}, but the output has {rows} rows ({case})",
            "mask the store with the rows that exist (offs_m < m_size inside the expert): "
            "the last row block of an expert is usually only partly full",
        )
    if past_cols:
        r, c = past_cols[0]
        fail(
            exercise,
            f"your kernel wrote column {c} of row {r}, but the output has only {cols} columns ({case})",
            "mask the store with offs_n < N: N is not a multiple of BLOCK_N here",
        )
    fail(
        exercise,
        f"your kernel wrote {len(stray)} element(s) before the first output row ({case})",
        "a store's row index went negative: output rows are row_start + offs_m (gather_indices[...] with PERMUTE_Y)",
    )


# ----------------------------------------------------------------------------- the learner's kernel


def require_kernel(kernel, name: str, check: str) -> None:
    """TypeError unless ``kernel`` can be launched as ``kernel[grid](...)`` (a ``@triton.jit`` function)."""
    if not hasattr(kernel, "__getitem__") or isinstance(kernel, (torch.Tensor, list, tuple, dict, str)):
        got = getattr(kernel, "__name__", type(kernel).__name__)
        raise TypeError(
            f"{check} expects the @triton.jit kernel ({name}), got {got!r}: pass the kernel itself, "
            f"not its wrapper (the check launches it with its own grid)"
        )


def launch(exercise: str, case: str, run: Callable[[], None]) -> None:
    """Run the learner's kernel; a crash becomes a CheckFailed that names the case."""
    try:
        run()
        if ON_GPU:
            torch.cuda.synchronize()
    except (NotImplementedError, CheckFailed):
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        text = "\n    ".join(lines[:12] + (["..."] if len(lines) > 12 else []))
        raise CheckFailed(f"{exercise}: your kernel raised {type(exc).__name__} on {case}:\n    {text}") from exc


def grouped_gemm_args(X: torch.Tensor, W: torch.Tensor, out: torch.Tensor) -> tuple[int, ...]:
    """The sizes and strides a grouped GEMM kernel takes after its pointers: N, K, NUM_EXPERTS, then the strides."""
    num_experts, N, K = W.shape
    return (N, K, num_experts, *X.stride(), *W.stride(), *out.stride())


# ----------------------------------------------------------------------------- row-level diagnosis


class ExpertRows:
    """The rows of an output in expert order (``m_sizes[e]`` rows per expert), named as the learner counts them."""

    def __init__(self, m_sizes: list[int]):
        self.m_sizes = list(m_sizes)
        self.starts = [sum(self.m_sizes[:e]) for e in range(len(self.m_sizes))]

    def expert(self, r: int) -> int:
        """The expert row ``r`` belongs to (empty experts own no rows)."""
        return bisect.bisect_right(self.starts, r) - 1 if r < sum(self.m_sizes) else len(self.m_sizes)

    def describe(self, r0: int, r1: int) -> str:
        """Rows r0..r1 (of one expert) as 'rows 3-5 of expert 2 (expert-order rows 10-12)'."""
        start = self.starts[self.expert(r0)]
        local = f"row {r0 - start}" if r0 == r1 else f"rows {r0 - start}-{r1 - start}"
        glob = f"row {r0}" if r0 == r1 else f"rows {r0}-{r1}"
        return f"{local} of expert {self.expert(r0)} (expert-order {glob})"


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
    never: torch.Tensor | None = None,
    inputs: str = "the inputs",
    read_outside_hint: str = "mask every load (other=0.0 where it is masked off)",
    other_row_hint: str = "the row is computed right but stored to the wrong place: check the store's row index",
    rtol: float = 2e-2,
    atol: float = 2e-2,
) -> None:
    """Fail with a row-level explanation if ``got`` differs from ``want``.

    describe(r0, r1) names rows r0..r1 in the learner's terms; group(r) keeps a run of rows
    inside one expert (or one token); unwritten_hint(r) explains never-written rows. ``never``
    marks the elements the kernel never wrote (``never_written``); NaN elsewhere was read from
    outside ``inputs``. Without it (a tensor the learner's own code allocated) NaN counts as never
    written.
    """
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    never = torch.isnan(got) if never is None else never.cpu()
    read_nan = torch.isnan(got) & ~never
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0

    def close(a, b):
        return torch.isclose(a, b, rtol=rtol, atol=atol * scale) & torch.isfinite(a)

    row_ok = close(got, want).all(dim=1)
    if bool(row_ok.all()):
        return
    if bool(never.all()):
        fail(
            exercise,
            f"your kernel wrote nothing: all {got.shape[0]} output rows are still NaN ({case})",
            "is the body still `pass`? each program must loop over its tiles and tl.store each one",
        )

    def kind(r: int):
        if bool(never[r].all()):
            return ("unwritten", None)
        if bool(never[r].any()):
            cols = never[r].nonzero().flatten()
            return ("some columns unwritten", (int(cols[0]), int(cols[-1])))
        if bool(read_nan[r].any()):
            return ("read outside", None)
        for i, m in enumerate(mistakes):
            if bool(close(got[r], m.output[r]).all()):
                return ("mistake", i)
        others = close(got[r].expand_as(want), want).all(dim=1).nonzero().flatten().tolist()
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
        and (what[0] in ("unwritten", "read outside", "wrong") or kind(last + 1) == what)
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
    if label == "read outside":
        say(exercise, f"{rows} hold(s) NaN read from outside {inputs} (which hold no NaN) ({case})", read_outside_hint)
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
