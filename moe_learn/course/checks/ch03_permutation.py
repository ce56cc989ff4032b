"""Checks for chapter 03: permute, unpermute and the weighted combine.

Every case feeds the learner's function random rows (each row of X is distinct, so a
wrong row can be traced back to where it came from) and routing from the reference
``get_routing_indices``. Messages name the row, the token and the slot.
"""

from __future__ import annotations

import torch

from moe_learn.course.checks._core import (
    call_learner,
    call_with_hint,
    expect_tensor,
    fail,
    first_mismatch,
    matching_mistake,
    passed,
)
from moe_learn.course.exercises import Exercise
from moe_learn.ops.routing import get_routing_indices

NOTEBOOK = "03_permutation.ipynb"

EXERCISES = [
    Exercise(
        id="03.1",
        notebook=NOTEBOOK,
        title="permute: token order -> expert order",
        hints=(
            "Row i of the result comes from one row of X: a gather, X[some index tensor].",
            "gather_indices[i] is a flat (token, slot) position in 0..T*topk-1, not a token id. "
            "Which token owns flat position p when every token has topk slots?",
            "return X[gather_indices.long() // topk]",
        ),
    ),
    Exercise(
        id="03.2",
        notebook=NOTEBOOK,
        title="unpermute: expert order -> flat (token, slot) order",
        hints=(
            "This is the inverse of a gather, so it is a scatter: row i of X goes TO position gather_indices[i].",
            "Allocate out = torch.empty_like(X) and write every row once; "
            "out.index_copy_(0, index, X) does out[index[i]] = X[i].",
            "index_copy_ wants int64 indices: out.index_copy_(0, gather_indices.long(), X)",
        ),
    ),
    Exercise(
        id="03.3",
        notebook=NOTEBOOK,
        title="combine: weighted sum of each token's top-k rows",
        hints=(
            "Y_flat is in flat (token, slot) order: token t owns rows t*k .. t*k+k-1, so view it as [T, k, H].",
            "Multiply by topk_weights[:, :, None] (broadcast over H) and sum over the k axis.",
            "Do the math in float32 and cast back: "
            "(Y_flat.view(T, k, H).float() * w.float()[..., None]).sum(1).to(Y_flat.dtype)",
        ),
    ),
]


# ---------------------------------------------------------------- shared helpers


def random_topk_ids(num_tokens: int, num_experts: int, top_k: int, experts: list[int] | None = None) -> torch.Tensor:
    """``[T, k]`` distinct experts per token, drawn from ``experts`` (all by default)."""
    pool = torch.tensor(experts if experts is not None else list(range(num_experts)))
    if num_tokens == 0:
        return torch.empty(0, top_k, dtype=torch.int64)
    choice = torch.rand(num_tokens, len(pool)).argsort(dim=1)[:, :top_k]
    return pool[choice]


def routing_cases(hidden: int = 6) -> list[tuple[str, torch.Tensor, int]]:
    """(description, topk_ids [T, k], num_experts): a readable case first, then the edges."""
    T = int(torch.randint(9, 20, ()))
    k = int(torch.randint(1, 5, ()))
    return [
        ("5 tokens, 4 experts, top-2", random_topk_ids(5, 4, 2), 4),
        ("top-1 routing", random_topk_ids(6, 3, 1), 3),
        ("one token", random_topk_ids(1, 4, 2), 4),
        ("experts 0, 2, 3 get no tokens", random_topk_ids(7, 6, 2, experts=[1, 4, 5]), 6),
        ("all tokens to expert 2 (top-1)", torch.full((5, 1), 2, dtype=torch.int64), 4),
        ("every token picks experts 3 and 0", torch.tensor([[3, 0]] * 4), 5),
        (f"{T} tokens, 8 experts, top-{k}", random_topk_ids(T, 8, k), 8),
        ("zero tokens", random_topk_ids(0, 4, 2), 4),
    ]


def _which_row(row: torch.Tensor, table: torch.Tensor) -> int | None:
    """Index of the row of ``table`` equal to ``row`` (rows are random, so at most one)."""
    if table.shape[0] == 0:
        return None
    hits = (table == row).all(dim=1).nonzero()
    return int(hits[0]) if hits.numel() else None


def _first_misplaced_row(
    got: torch.Tensor, table: torch.Tensor, expected: list[int], held_row: str
) -> tuple[int, int | None, str] | None:
    """The first output row ``r`` that is not ``table[expected[r]]``, or None when all are right.

    Returns ``(r, source, held)``: ``source`` is the row of ``table`` that ``got[r]`` holds
    instead (None if none), ``held`` says what it holds (``held_row`` names a table row).
    """
    for r, src in enumerate(expected):
        if not torch.equal(got[r], table[src]):
            source = _which_row(got[r], table)
            return r, source, held_row.format(source) if source is not None else _describe(got[r])
    return None


def _describe(row: torch.Tensor) -> str:
    if torch.isnan(row).all():
        return "NaN (never written?)"
    if (row == 0).all():
        return "all zeros (never written?)"
    vals = ", ".join(f"{v:.3f}" for v in row[:3].tolist())
    return f"[{vals}{', ...' if row.numel() > 3 else ''}]"


# ---------------------------------------------------------------- 03.1 permute


def check_permute(fn) -> None:
    """``fn(X, gather_indices, topk)`` must return ``X[gather_indices // topk]``."""
    ex = "03.1"
    cases = routing_cases()
    crash_hints = [
        ("out of bounds", "gather_indices holds flat (token, slot) positions up to T*topk-1; divide by topk"),
        ("out of range", "gather_indices holds flat (token, slot) positions up to T*topk-1; divide by topk"),
        ("tensors used as indices", "index with an integer tensor: gather_indices.long() // topk"),
    ]
    for what, topk_ids, num_experts in cases:
        T, k = topk_ids.shape
        X = torch.randn(T, 6)
        _, gather = get_routing_indices(topk_ids, num_experts)
        got = call_with_hint(ex, fn, crash_hints, X, gather, k)
        expect_tensor(ex, f"permute output ({what})", got, (T * k, X.shape[1]), X.dtype)
        flats = gather.tolist()
        wrong = _first_misplaced_row(got, X, [flat // k for flat in flats], "token {}'s row")
        if wrong is not None:
            i, source, held = wrong
            flat = flats[i]
            token = flat // k
            msg = (
                f"on {what}: row {i} of your output holds {held}, expected token {token} "
                f"(gather_indices[{i}] = {flat}, and {flat} // topk = {token}, slot {flat % k})"
            )
            hint = None
            if source == flat and k > 1:
                hint = "you used gather_indices directly; it counts (token, slot) pairs, so divide by topk"
            else:
                scattered = torch.empty_like(got)
                scattered[gather.long()] = X.repeat_interleave(k, dim=0)
                if torch.equal(got, scattered):
                    hint = "you scattered (out[gather_indices] = X rows); permute gathers: X[gather_indices // topk]"
            fail(ex, msg, hint)
    passed(ex, "permute", len(cases))


# ---------------------------------------------------------------- 03.2 unpermute


def check_unpermute(fn) -> None:
    """``fn(Y, gather_indices)`` must return ``out`` with ``out[gather_indices[i]] = Y[i]``."""
    ex = "03.2"
    cases = routing_cases()
    crash_hints = [
        ("long", "index_copy_ needs int64 indices: pass gather_indices.long()"),
        ("out of bounds", "unpermute has no topk argument: gather_indices already indexes the T*k output rows"),
    ]
    for what, topk_ids, num_experts in cases:
        T, k = topk_ids.shape
        Y = torch.randn(T * k, 6)  # rows in expert order
        _, gather, scatter = get_routing_indices(topk_ids, num_experts, return_scatter_indices=True)
        got = call_with_hint(ex, fn, crash_hints, Y, gather)
        expect_tensor(ex, f"unpermute output ({what})", got, tuple(Y.shape), Y.dtype)
        sources = scatter.tolist()
        wrong = _first_misplaced_row(got, Y, sources, "row {} of the expert-ordered input")
        if wrong is not None:
            r, source, held = wrong
            src = sources[r]
            msg = (
                f"on {what}: output row {r} (token {r // k}, slot {r % k}) holds {held}, expected input row {src} "
                f"(gather_indices[{src}] = {r}, so input row {src} must land at row {r})"
            )
            hint = None
            if torch.equal(got, Y[gather.long()]):
                hint = "you gathered (Y[gather_indices]); unpermute scatters: out[gather_indices[i]] = Y[i]"
            elif source is None:
                hint = "some output rows were never written: every input row i must be copied to gather_indices[i]"
            fail(ex, msg, hint)
    passed(ex, "unpermute", len(cases))


# ---------------------------------------------------------------- 03.3 combine


def _combine_variants(Y: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The right answer and the wrong ones learners write, in float64."""
    (T, k), H = w.shape, Y.shape[1]
    Y3, w64 = Y.double().reshape(T, k, H), w.double()
    slot_major = Y.double().reshape(k, T, H).transpose(0, 1)
    return {
        "right": (Y3 * w64[..., None]).sum(1),
        "you summed the k rows without multiplying by topk_weights": Y3.sum(1),
        "you averaged the k rows instead of weighting them by topk_weights": Y3.mean(1),
        "you reshaped Y_flat as [k, T, H]; flat order is token-major, so view it as [T, k, H]": (
            slot_major * w64[..., None]
        ).sum(1),
        "you multiplied by the weights of slot 0 only; each slot j has its own weight topk_weights[:, j]": (
            Y3 * w64[:, :1, None]
        ).sum(1),
    }


def check_combine(fn) -> None:
    """``fn(Y_flat [T*k, H], topk_weights [T, k])`` -> ``[T, H]``, weighted sum per token."""
    ex = "03.3"
    cases = []
    for what, topk_ids, _ in routing_cases():
        T, k = topk_ids.shape
        w = torch.rand(T, k) + 0.05
        cases.append((what, torch.randn(T * k, 6), w / w.sum(dim=1, keepdim=True)))
    cases.insert(4, ("float16 rows with float32 weights (as Mixtral's router returns)", torch.randn(8, 5).half(),
                     torch.rand(4, 2)))
    cases.insert(5, ("a weight of exactly 0 and unnormalized weights", torch.randn(9, 4),
                     torch.tensor([[0.0, 0.7, 0.9], [1.5, 0.0, 0.2], [0.3, 0.3, 0.3]])))
    for what, Y, w in cases:
        T, k = w.shape
        got = call_learner(ex, fn, Y, w)
        expect_tensor(ex, f"combine output ({what})", got, (T, Y.shape[1]), Y.dtype)
        variants = _combine_variants(Y, w)
        ref = variants.pop("right")
        rtol, atol = (2e-3, 2e-3) if Y.dtype == torch.float16 else (1e-5, 1e-6)
        mismatch = first_mismatch(got, ref, rtol, atol)
        if mismatch is None:
            continue
        t, c = mismatch
        msg = (
            f"on {what}: token {t}, column {c}: expected {ref[t, c]:.5f}, got {float(got[t, c]):.5f} "
            f"(= sum over j of topk_weights[{t}, j] * Y_flat[{t}*{k} + j, {c}], weights {w[t].tolist()})"
        )
        hint = matching_mistake(got, variants.items(), rtol, atol)
        fail(ex, msg, hint)
    passed(ex, "combine", len(cases))
