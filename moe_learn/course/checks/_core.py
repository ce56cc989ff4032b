"""What every check shares: the failure type, the pass line, comparisons that explain."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class CheckFailed(AssertionError):
    """The learner's answer is wrong; the message says where and the likely mistake."""


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
    except NotImplementedError:
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


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN (or -1 for ints) so unwritten entries show up."""
    return t.fill_(float("nan") if t.dtype.is_floating_point else -1)
