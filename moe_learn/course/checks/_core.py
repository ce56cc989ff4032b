"""What every check shares: the failure type, the pass line, comparisons that explain.

A failed check shows the learner its message only, not IPython's traceback through this
package (20-40 lines whose source excerpts would give other hints away). The full
traceback is one flag away: ``%tb verbose`` after the failure, ``%xmode verbose`` for
every failure, or the environment variable ``MOE_LEARN_FULL_TRACEBACK=1``.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Iterable

import torch

FULL_TRACEBACK_ENV = "MOE_LEARN_FULL_TRACEBACK"
FULL_TRACEBACK_HOW = "full traceback: run %tb verbose in a new cell"
_RED, _BOLD_RED, _DIM, _RESET = "\x1b[31m", "\x1b[1;31m", "\x1b[2m", "\x1b[0m"


def _shell():
    """The running IPython shell, or None (plain Python never asks for a rendering)."""
    ipython = sys.modules.get("IPython")
    return ipython.get_ipython() if ipython is not None else None


def _learner_frames(shell, exc: BaseException | None, limit: int = 3) -> list[str]:
    """Where in the learner's own cells ``exc`` was raised: 'cell In[7], line 4, in f' and the line."""
    if exc is None or shell is None:
        return []
    lines = []
    for frame in traceback.extract_tb(exc.__traceback__):
        name = shell.compile.format_code_name(frame.filename) if hasattr(shell, "compile") else None
        if name is None:  # not a notebook cell: this package, torch, Triton
            continue
        lines.append(f"  {_DIM}at{_RESET} cell {name[1]}, line {frame.lineno}, in {frame.name}")
        if frame.line:
            lines.append(f"      {frame.line.strip()}")
    return lines[-2 * limit :]


def render_short(exc: BaseException, learner_error: BaseException | None = None, frames: int = 3) -> list[str]:
    """IPython's ``_render_traceback_`` for the course's errors: the message (and where in the
    learner's cells it came from) instead of the traceback; the full one on request."""
    shell = _shell()
    if shell is None:  # a renderer is only ever called by IPython; be safe anyway
        return traceback.format_exception(exc)
    if os.environ.get(FULL_TRACEBACK_ENV, "") not in ("", "0") or shell.InteractiveTB.mode == "Verbose":
        return shell.InteractiveTB.structured_traceback(type(exc), exc, exc.__traceback__)
    head, _, rest = str(exc).partition("\n")
    lines = [f"{_BOLD_RED}{type(exc).__name__}{_RESET}: {_RED}{head}{_RESET}"]
    lines += rest.splitlines()
    lines += _learner_frames(shell, learner_error, frames)
    lines.append(f"{_DIM}({FULL_TRACEBACK_HOW}){_RESET}")
    return lines


class CheckFailed(AssertionError):
    """The learner's answer is wrong; the message says where and the likely mistake.

    In a notebook only the message shows (see the module docstring for the full traceback).
    """

    def _render_traceback_(self) -> list[str]:
        return render_short(self, self.__cause__)


class ExerciseUnfinished(RuntimeError):
    """A cell needs the result of an exercise the learner has not finished yet."""

    def _render_traceback_(self) -> list[str]:
        return render_short(self)


def require_written(exercise: str, name: str, out: torch.Tensor) -> None:
    """Stop a cell that uses exercise ``exercise``'s kernel when ``out`` (filled with NaN before
    the launch) still holds NaN: an unfinished kernel, not a number worth printing."""
    if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
        raise TypeError(f"require_written needs a floating-point tensor for {name}, got {type(out).__name__}")
    unwritten = torch.isnan(out.detach())
    if not unwritten.any():  # also an empty output: nothing to write
        return
    if unwritten.all():
        raise ExerciseUnfinished(
            f"finish exercise {exercise} first: {name} is still NaN everywhere, so your kernel wrote nothing yet. "
            "Its check cell above says what is missing."
        )
    raise ExerciseUnfinished(
        f"finish exercise {exercise} first: {int(unwritten.sum())} of {out.numel()} values of {name} were never "
        "written (still NaN). Its check cell above says which ones and why."
    )


def require_close(exercise: str, name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    """Stop a cell that uses exercise ``exercise``'s result when ``got`` is not ``want``: the
    exercise is unfinished (its check says why), and a later number computed from it means nothing."""
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise ExerciseUnfinished(f"finish exercise {exercise} first: {name} is {shape}, expected {tuple(want.shape)}")
    got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
    bad = ~(torch.isclose(got64, want64, rtol=rtol, atol=atol) & torch.isfinite(got64))
    if not bad.any():
        return
    where = tuple(int(v) for v in bad.nonzero()[0])
    raise ExerciseUnfinished(
        f"finish exercise {exercise} first: {name} differs from the reference in {int(bad.sum())} of {bad.numel()} "
        f"values (at {where}: got {got64[where].item():.4g}, expected {want64[where].item():.4g}); a kernel that "
        "writes nothing leaves whatever the memory held. Its check cell above says what is wrong."
    )


def passed(exercise: str, what: str, cases: int) -> None:
    """Print the one line that marks a passed check (``moe-learn progress`` reads it)."""
    print(f"[PASS] {exercise} {what}: {cases} cases")


def fail(exercise: str, message: str, hint: str | None = None) -> None:
    text = f"{exercise}: {message}"
    if hint:
        text += f"\n  likely mistake: {hint}"
    raise CheckFailed(text)


def call_learner(exercise: str, fn, *args, **kwargs):
    """Call the learner's function; let NotImplementedError through, explain anything else."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as exc:  # the stub: its message and line, not the path through the check
        exc._render_traceback_ = functools.partial(render_short, exc, exc, frames=1)
        raise
    except CheckFailed:
        raise
    except Exception as exc:  # the learner's code crashed: say on which input
        shapes = ", ".join(
            f"{tuple(a.shape)} {str(a.dtype).removeprefix('torch.')}" if isinstance(a, torch.Tensor) else repr(a)
            for a in args
        )
        message = f"{exercise}: your function raised {type(exc).__name__}: {exc}\n  on inputs: {shapes}"
        raise CheckFailed(message) from exc


def call_with_hint(exercise: str, fn, hints: list[tuple[str, str]], *args):
    """``call_learner`` plus a likely mistake when the crash message contains a known phrase."""
    try:
        return call_learner(exercise, fn, *args)
    except CheckFailed as exc:
        text = str(exc)
        for phrase, hint in hints:
            if phrase.lower() in text.lower():
                raise CheckFailed(f"{text}\n  likely mistake: {hint}") from exc.__cause__
        raise


def expect_tensor(exercise: str, name: str, got, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    if not isinstance(got, torch.Tensor):
        fail(exercise, f"{name} should be a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(shape):
        fail(exercise, f"{name} has shape {tuple(got.shape)}, expected {tuple(shape)}")
    if dtype is not None and got.dtype != dtype:
        fail(exercise, f"{name} has dtype {got.dtype}, expected {dtype}")


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ in float64; inf when got holds NaN or inf."""
    got64, ref64 = got.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(got64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (got64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def first_mismatch_row(got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> int | None:
    """Index of the first row of ``got`` that differs from ``ref`` (NaN counts as different)."""
    got2 = got.detach().double().cpu().reshape(got.shape[0], -1)
    ref2 = ref.detach().double().cpu().reshape(ref.shape[0], -1)
    close = torch.isclose(got2, ref2, rtol=rtol, atol=atol) & torch.isfinite(got2)
    bad = (~close.all(dim=1)).nonzero()
    return int(bad[0]) if bad.numel() else None


def first_mismatch(got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> tuple[int, ...] | None:
    """Index of the first element of ``got`` that differs from ``ref`` (NaN and inf count as different)."""
    close = torch.isclose(got.double(), ref.double(), rtol=rtol, atol=atol) & torch.isfinite(got)
    if close.all():
        return None
    return tuple(int(v) for v in (~close).nonzero()[0])


def matching_mistake(got: torch.Tensor, mistakes: Iterable[tuple[str, torch.Tensor]], rtol: float, atol: float):
    """The name of the first known wrong answer that ``got`` equals (within tolerance), else None.

    ``mistakes`` yields ``(name, what that mistake computes)``; a generator keeps costly
    candidates from being computed once one has matched.
    """
    return next((name for name, wrong in mistakes if torch.allclose(got.double(), wrong, rtol=rtol, atol=atol)), None)
