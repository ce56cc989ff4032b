"""Checks for chapter 02 (routing indices): counts per expert, gather and scatter indices."""

from __future__ import annotations

import torch

from moe_learn.course.checks._core import call_learner, expect_tensor, fail, passed
from moe_learn.course.exercises import Exercise

NOTEBOOK = "02_routing_indices.ipynb"

EXERCISES = [
    Exercise(
        id="02.1",
        notebook=NOTEBOOK,
        title="expert_counts: tokens per expert with torch.histc",
        hints=(
            "torch.histc(values, bins, min, max) splits [min, max] into `bins` equal bins. With bins=num_experts, "
            "min=0, max=num_experts each bin is [e, e+1), so expert id e falls in bin e.",
            "On the CPU histc refuses integer tensors: convert the ids with .float() first (exact below 2**24).",
            "histc returns floats; the counts are row counts, so return them as integers: .to(torch.int32).",
        ),
    ),
    Exercise(
        id="02.2",
        notebook=NOTEBOOK,
        title="gather_indices_by_expert: a stable argsort",
        hints=(
            "torch.argsort(flat_ids) lists the flat (token, slot) positions in expert order.",
            "Pass stable=True: then the positions of one expert keep their original (token) order.",
        ),
    ),
    Exercise(
        id="02.3",
        notebook=NOTEBOOK,
        title="get_routing_indices: counts, gather and (inverse) scatter indices",
        hints=(
            "Flatten selected_experts [T, k] with .reshape(-1) and reuse expert_counts and gather_indices_by_expert.",
            "scatter_indices is the inverse permutation of gather_indices: scatter[gather[i]] = i. Build it with "
            "one indexed assignment of torch.arange, or with a second argsort of gather_indices.",
            "Return (counts, gather) or, when return_scatter_indices=True, (counts, gather, scatter).",
        ),
    ),
]


def _call(exercise: str, fn, *args):
    """The learner's function; a CPU histc on ints becomes a pointed message, not a stub."""
    try:
        return call_learner(exercise, fn, *args)
    except NotImplementedError as exc:
        if "histogram" in str(exc) or "histc" in str(exc):
            fail(
                exercise,
                f"torch.histc raised NotImplementedError: {exc}",
                "on the CPU histc only takes floating-point tensors: pass flat_ids.float() (and convert the "
                "counts back to int)",
            )
        raise


def _routed_ids(num_tokens: int, top_k: int, num_experts: int, skew: float = 0.0) -> torch.Tensor:
    """[T, k] distinct experts per token, as a router picks them; ``skew`` favours low ids."""
    scores = torch.rand(num_tokens, num_experts) - skew * torch.arange(num_experts) / max(num_experts, 1)
    return scores.topk(top_k, dim=-1).indices


def _id_cases() -> list[tuple[str, torch.Tensor, int]]:
    """(label, selected_experts [T, k], num_experts): random ones plus the edge cases."""
    cases = [
        ("random, T=16 k=2 E=8", _routed_ids(16, 2, 8), 8),
        ("random int32, T=33 k=4 E=16", _routed_ids(33, 4, 16).to(torch.int32), 16),
        ("skewed, T=40 k=2 E=8", _routed_ids(40, 2, 8, skew=3.0), 8),
        # Large enough that a non-stable sort really does shuffle ties.
        ("large, T=256 k=2 E=4", _routed_ids(256, 2, 4), 4),
        ("one token, k=1", _routed_ids(1, 1, 4), 4),
        ("all tokens to expert 2", torch.full((12, 1), 2), 5),
        ("last experts empty", torch.randint(0, 3, (10, 1)), 6),
        ("first experts empty", torch.randint(3, 6, (10, 1)), 6),
        ("one expert", torch.zeros(7, 1, dtype=torch.long), 1),
        ("zero tokens", torch.empty(0, 2, dtype=torch.long), 4),
    ]
    return cases


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


# ---------------------------------------------------------------------------------------
# 02.1 counts
# ---------------------------------------------------------------------------------------


def _verify_counts(ex: str, label: str, counts, flat_ids: torch.Tensor, num_experts: int) -> None:
    expected = torch.bincount(flat_ids.long().cpu(), minlength=num_experts)
    if isinstance(counts, torch.Tensor) and counts.ndim == 1 and counts.numel() != num_experts:
        hint = "histc needs bins=num_experts (one bin per expert)"
        if flat_ids.numel() and counts.numel() == int(flat_ids.max()) + 1:
            hint = "torch.bincount without minlength=num_experts drops the empty experts at the end"
        fail(ex, f"[{label}] counts has {counts.numel()} entries, expected one per expert ({num_experts})", hint)
    expect_tensor(ex, "counts", counts, (num_experts,))
    if counts.dtype.is_floating_point:
        fail(ex, f"[{label}] counts has dtype {counts.dtype}", "histc returns floats: return .to(torch.int32)")
    got = counts.detach().long().cpu()
    if torch.equal(got, expected):
        return
    e = int((got != expected).nonzero()[0])
    if flat_ids.numel() and torch.equal(got, torch.histc(flat_ids.float().cpu(), bins=num_experts).long()):
        hint = (
            "histc without min/max uses the smallest and largest id present as its range; pass min=0, max=num_experts"
        )
    elif torch.equal(got[:-1], expected[1:]) or torch.equal(got[1:], expected[:-1]):
        hint = "the counts are shifted by one expert: bin e must cover [e, e+1), i.e. min=0, max=num_experts"
    elif int(got.sum()) != flat_ids.numel():
        hint = (
            f"your counts add up to {int(got.sum())} but there are {flat_ids.numel()} (token, slot) pairs: "
            "every id must land in some bin (histc drops values outside [min, max])"
        )
    else:
        hint = None
    fail(ex, f"[{label}] expert {e} got {_tokens(int(got[e]))}, expected {int(expected[e])}", hint)


def check_expert_counts(fn) -> None:
    """``fn(flat_ids [N] int, num_experts) -> counts [E]`` (integers)."""
    ex = "02.1"
    cases = _id_cases()
    for label, ids, num_experts in cases:
        flat = ids.reshape(-1)
        counts = _call(ex, fn, flat, num_experts)
        _verify_counts(ex, label, counts, flat, num_experts)
    passed(ex, "expert_counts", len(cases))


# ---------------------------------------------------------------------------------------
# 02.2 gather indices
# ---------------------------------------------------------------------------------------


def _verify_gather(ex: str, label: str, gather, flat_ids: torch.Tensor, top_k: int) -> None:
    n = flat_ids.numel()
    expect_tensor(ex, "gather_indices", gather, (n,))
    if gather.dtype.is_floating_point or gather.dtype == torch.bool:
        fail(ex, f"[{label}] gather_indices has dtype {gather.dtype}; indices must be integers")
    g = gather.detach().long().cpu()
    ids = flat_ids.long().cpu()
    if n and torch.equal(g, ids.sort().values) and not torch.equal(g, torch.argsort(ids, stable=True)):
        fail(
            ex,
            f"[{label}] gather_indices holds the sorted expert ids",
            "return the POSITIONS that sort the ids (argsort), not the sorted ids (sort().values)",
        )
    if n and (int(g.min()) < 0 or int(g.max()) >= n):
        bad = int(g[(g < 0) | (g >= n)][0])
        fail(ex, f"[{label}] gather_indices holds {bad}, outside the {n} flat positions [0, {n})")
    seen = torch.bincount(g, minlength=n)
    if bool((seen != 1).any()):
        p = int((seen != 1).nonzero()[0])
        fail(
            ex,
            f"[{label}] gather_indices is not a permutation of 0..{n - 1}: flat position {p} appears "
            f"{int(seen[p])} time(s)",
            "every (token, slot) position must appear exactly once",
        )
    experts_in_order = ids[g]
    steps = experts_in_order[1:] - experts_in_order[:-1]
    if bool((steps < 0).any()):
        i = int((steps < 0).nonzero()[0]) + 1
        hint = "sort ascending (descending=False)" if bool((steps <= 0).all()) else "sort by the expert id"
        fail(
            ex,
            f"[{label}] expert-order row {i} belongs to expert {int(experts_in_order[i])} but comes after a row "
            f"of expert {int(experts_in_order[i - 1])}",
            hint,
        )
    for e in experts_in_order.unique().tolist():
        rows = g[experts_in_order == e]
        if bool((rows[1:] < rows[:-1]).any()):
            shown = rows[:8].tolist()
            fail(
                ex,
                f"[{label}] token order inside expert {e} is not stable: its flat positions come as {shown}"
                f"{'...' if rows.numel() > 8 else ''} (tokens {[p // top_k for p in shown]}), expected increasing",
                "torch.argsort(..., stable=True): without it, equal ids may come out in any order",
            )


def check_gather_indices_by_expert(fn) -> None:
    """``fn(flat_ids [N] int) -> gather_indices [N]``: stable argsort of the ids."""
    ex = "02.2"
    cases = _id_cases()
    for label, ids, _num_experts in cases:
        flat = ids.reshape(-1)
        gather = _call(ex, fn, flat)
        _verify_gather(ex, label, gather, flat, ids.shape[1])
    passed(ex, "gather_indices_by_expert", len(cases))


# ---------------------------------------------------------------------------------------
# 02.3 get_routing_indices
# ---------------------------------------------------------------------------------------


def _verify_scatter(ex: str, label: str, scatter, gather) -> None:
    n = gather.numel()
    expect_tensor(ex, "scatter_indices", scatter, (n,))
    s = scatter.detach().long().cpu()
    g = gather.detach().long().cpu()
    if n and (int(s.min()) < 0 or int(s.max()) >= n):
        fail(ex, f"[{label}] scatter_indices holds values outside [0, {n})")
    round_trip = s[g]
    wrong = (round_trip != torch.arange(n)).nonzero()
    if wrong.numel():
        i = int(wrong[0])
        hint = "scatter_indices must be the inverse permutation: scatter[gather[i]] = i"
        if torch.equal(s, g):
            hint = (
                "scatter_indices equals gather_indices; the inverse is a different permutation: "
                "scatter[gather[i]] = i (e.g. torch.argsort(gather_indices))"
            )
        fail(ex, f"[{label}] scatter_indices[gather_indices[{i}]] is {int(round_trip[i])}, expected {i}", hint)


def check_get_routing_indices(fn) -> None:
    """``fn(selected_experts [T, k], num_experts, return_scatter_indices) -> counts, gather[, scatter]``."""
    ex = "02.3"
    cases = _id_cases()
    for label, ids, num_experts in cases:
        for with_scatter in (False, True):
            out = _call(ex, fn, ids, num_experts, with_scatter)
            want = 3 if with_scatter else 2
            if not isinstance(out, tuple | list) or len(out) != want:
                got = len(out) if isinstance(out, tuple | list) else type(out).__name__
                fail(
                    ex,
                    f"[{label}] with return_scatter_indices={with_scatter} you returned {got} values, expected {want}",
                    "(counts, gather) or (counts, gather, scatter)",
                )
            flat = ids.reshape(-1)
            gather = out[1]
            if isinstance(gather, torch.Tensor) and gather.shape == ids.shape and ids.shape[1] > 1:
                fail(
                    ex,
                    f"[{label}] gather_indices has shape {tuple(gather.shape)}, expected ({flat.numel()},)",
                    "flatten selected_experts first (.reshape(-1)): sort all (token, slot) pairs together",
                )
            case = f"{label}, return_scatter_indices={with_scatter}"
            _verify_counts(ex, case, out[0], flat, num_experts)
            _verify_gather(ex, case, gather, flat, ids.shape[1])
            if with_scatter:
                _verify_scatter(ex, case, out[2], gather)
    passed(ex, "get_routing_indices", 2 * len(cases))
