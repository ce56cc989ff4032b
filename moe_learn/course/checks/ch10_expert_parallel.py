"""Checks for chapter 10: the pure steps of expert parallelism (no processes needed).

10.1 ``dispatch_plan``: rows sorted by expert, counted per expert and per destination rank.
10.2 ``local_expert_sizes`` / ``local_expert_order``: regroup received rows by local expert.
10.3 ``unpermute_combine``: expert outputs back to token order, weighted by the routing weights.
"""

from __future__ import annotations

import torch

from moe_learn.course.checks._core import CheckFailed, call_learner, expect_tensor, fail, first_mismatch_row, passed
from moe_learn.course.exercises import Exercise

NOTEBOOK = "10_expert_parallel.ipynb"

EXERCISES = [
    Exercise(
        id="10.1",
        notebook=NOTEBOOK,
        title="dispatch plan: which rows go to which rank",
        hints=(
            "Rank r owns experts r*E/W ... (r+1)*E/W - 1, so the owner of expert e is e // (E/W), not e % W.",
            "get_routing_indices(topk_ids, num_experts) gives the per-expert counts and the stable expert order; "
            "every (token, slot) pair is one row, so the counts add up to T*k.",
            "send_counts = expert_counts.view(world_size, num_experts // world_size).sum(dim=1): "
            "consecutive experts belong to the same rank.",
        ),
    ),
    Exercise(
        id="10.2",
        notebook=NOTEBOOK,
        title="regroup the received rows by local expert",
        hints=(
            "recv_counts[s, e] = rows rank s sent for local expert e. The rows arrive source by source: "
            "all of rank 0's (expert 0, then 1, ...), then all of rank 1's, ...",
            "Sizes per local expert: sum over the source ranks, recv_counts.sum(dim=0).",
            "Label every received row with its local expert: torch.repeat_interleave(labels, recv_counts.flatten()) "
            "with labels = torch.arange(E_local).repeat(W); then a STABLE argsort of the labels is the order.",
        ),
    ),
    Exercise(
        id="10.3",
        notebook=NOTEBOOK,
        title="unpermute_combine: back to token order, weighted",
        hints=(
            "Row i of y_sorted belongs to flat (token, slot) id gather_indices[i]: write it back with "
            "out[gather_indices[i]] = y_sorted[i] (unpermute, chapter 03).",
            "View the flat result as [T, k, H]; token t's k expert outputs are out[t, 0..k-1].",
            "Multiply by topk_weights[..., None] and sum over the k axis.",
        ),
    ),
]


# ------------------------------------ 10.1 ----------------------------------------


def _fresh_generator() -> torch.Generator:
    """New random cases on every call (reproducible when the caller seeds torch)."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


def _reference_plan(topk_ids: torch.Tensor, num_experts: int, world_size: int):
    flat = topk_ids.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    order = torch.argsort(flat, stable=True)
    return order, counts, counts.view(world_size, -1).sum(dim=1)


def _plan_cases(gen: torch.Generator):
    """(description, topk_ids, num_experts, world_size): random ones, then the edge cases."""
    cases = []
    for num_tokens, top_k, num_experts, world_size in [(9, 2, 8, 2), (13, 3, 12, 4), (7, 2, 6, 3), (11, 4, 16, 4)]:
        scores = torch.rand(num_tokens, num_experts, generator=gen)
        cases.append(("random routing", scores.topk(top_k, dim=1).indices, num_experts, world_size))
    cases += [
        ("top-1 routing", torch.randint(0, 4, (10, 1), generator=gen), 4, 2),
        ("every token to experts 4 and 5 (ranks 0 and 1 get nothing)", torch.tensor([[4, 5], [5, 4], [4, 5]]), 6, 3),
        ("experts 1 and 6 never chosen", torch.tensor([[0, 2], [3, 7], [5, 4], [2, 0]]), 8, 4),
        ("one token", torch.tensor([[3, 0]]), 4, 2),
        ("one rank holds every expert (world_size=1)", torch.tensor([[1, 0], [0, 2]]), 3, 1),
        ("one expert per rank", torch.tensor([[2, 0], [1, 2], [0, 1]]), 3, 3),
        ("no tokens on this rank (T=0)", torch.empty(0, 2, dtype=torch.int64), 4, 2),
    ]
    return cases


def _unpack(exercise: str, got, names: tuple[str, ...]):
    if not isinstance(got, (tuple, list)) or len(got) != len(names):
        fail(exercise, f"return a tuple ({', '.join(names)}), got {type(got).__name__}")
    return got


def check_dispatch_plan(dispatch_plan_fn) -> None:
    """Check ``dispatch_plan(topk_ids, num_experts, world_size) -> (gather_indices, expert_counts, send_counts)``."""
    ex = "10.1"
    gen = _fresh_generator()
    cases = _plan_cases(gen)
    for what, topk_ids, num_experts, world_size in cases:
        num_tokens, top_k = topk_ids.shape
        rows = num_tokens * top_k
        where = f"[{what}: T={num_tokens}, k={top_k}, E={num_experts}, W={world_size}]"
        got = call_learner(ex, dispatch_plan_fn, topk_ids.clone(), num_experts, world_size)
        gather, counts, send = _unpack(ex, got, ("gather_indices", "expert_counts", "send_counts"))
        want_order, want_counts, want_send = _reference_plan(topk_ids, num_experts, world_size)

        # send_counts first: it decides who talks to whom.
        if isinstance(send, torch.Tensor) and send.shape == (num_experts,) and num_experts != world_size:
            fail(
                ex,
                f"{where} send_counts has one entry per expert ({num_experts}); it needs one per rank ({world_size})",
            )
        expect_tensor(ex, "send_counts", send, (world_size,))
        got_send, ref_send = send.long().tolist(), want_send.tolist()
        if got_send != ref_send:
            d = next(d for d in range(world_size) if got_send[d] != ref_send[d])
            per_rank = num_experts // world_size
            owners = [f"experts {d * per_rank}..{(d + 1) * per_rank - 1}" for d in range(world_size)]
            message = (
                f"{where} rank {d} ({owners[d]}) should receive {ref_send[d]} rows from this rank, "
                f"your plan sends {got_send[d]} (all: expected {ref_send}, got {got_send})"
            )
            round_robin = torch.bincount(topk_ids.reshape(-1) % world_size, minlength=world_size).tolist()
            if got_send == round_robin:
                hint = "you gave expert e to rank e % world_size; here each rank owns a contiguous block, e // (E/W)"
            elif sum(got_send) == num_tokens and top_k > 1:
                hint = "you counted tokens; count rows: a token goes once to every expert it picked (k rows)"
            else:
                hint = "sum expert_counts over each rank's block of E/W consecutive experts"
            fail(ex, message, hint)

        expect_tensor(ex, "expert_counts", counts, (num_experts,))
        got_counts = counts.long().tolist()
        if got_counts != want_counts.tolist():
            e = next(e for e in range(num_experts) if got_counts[e] != int(want_counts[e]))
            fail(
                ex,
                f"{where} expert {e} has {int(want_counts[e])} rows, your expert_counts say {got_counts[e]}",
                "one bin per expert id 0..E-1 (torch.bincount(..., minlength=E) or the counts of get_routing_indices)",
            )

        expect_tensor(ex, "gather_indices", gather, (rows,))
        if rows == 0:
            continue
        if gather.dtype.is_floating_point or gather.dtype == torch.bool:
            fail(ex, f"gather_indices must hold integer row ids, got {gather.dtype}")
        g = gather.long()
        if int(g.min()) < 0 or int(g.max()) >= rows or torch.unique(g).numel() != rows:
            if int(g.max()) < num_tokens and top_k > 1:
                hint = "gather_indices holds flat (token, slot) ids t*k + j in [0, T*k), not token ids"
            else:
                hint = "sort the flattened topk_ids: every (token, slot) row must appear exactly once"
            fail(ex, f"{where} gather_indices is not a permutation of 0..{rows - 1}: got {g.tolist()}", hint)
        experts = topk_ids.reshape(-1)[g]
        drop = (experts[1:] < experts[:-1]).nonzero()
        if drop.numel():
            p = int(drop[0]) + 1
            fail(
                ex,
                f"{where} rows are not sorted by expert: position {p - 1} is expert {int(experts[p - 1])}, "
                f"position {p} is expert {int(experts[p])}",
                "argsort the flattened expert ids so each rank's rows form one consecutive block",
            )
        if g.tolist() != want_order.tolist():
            p = next(p for p in range(rows) if int(g[p]) != int(want_order[p]))
            e = int(experts[p])
            fail(
                ex,
                f"{where} inside expert {e}, position {p} holds row {int(g[p])} but row {int(want_order[p])} "
                "comes first in the original order",
                "use a stable sort (torch.argsort(..., stable=True)) so rows keep their order inside an expert",
            )
    passed(ex, "dispatch_plan", len(cases))


# ------------------------------------ 10.2 ----------------------------------------


def _received_layout(recv_counts: torch.Tensor):
    """For each received row (source-major): its source rank and local expert."""
    world_size, per_rank = recv_counts.shape
    flat = recv_counts.reshape(-1)
    source = torch.repeat_interleave(torch.arange(world_size).repeat_interleave(per_rank), flat)
    expert = torch.repeat_interleave(torch.arange(per_rank).repeat(world_size), flat)
    return source, expert


def _recv_cases(gen: torch.Generator):
    cases = []
    for world_size, per_rank in [(2, 3), (4, 2), (3, 4)]:
        cases.append(("random counts", torch.randint(0, 4, (world_size, per_rank), generator=gen)))
    cases += [
        ("some local experts get nothing", torch.tensor([[0, 3, 0], [2, 1, 0]])),
        ("only rank 1 sends anything", torch.tensor([[0, 0], [2, 3], [0, 0]])),
        ("one local expert", torch.tensor([[2], [0], [3]])),
        ("world_size=1", torch.tensor([[1, 0, 2]])),
        ("this rank receives nothing", torch.zeros(2, 3, dtype=torch.int64)),
    ]
    return cases


def check_local_experts(local_expert_sizes_fn, local_expert_order_fn) -> None:
    """Check ``local_expert_sizes(recv_counts) -> [E_local]`` and ``local_expert_order(recv_counts) -> [N]``."""
    ex = "10.2"
    gen = _fresh_generator()
    cases = _recv_cases(gen)
    for what, recv_counts in cases:
        world_size, per_rank = recv_counts.shape
        total = int(recv_counts.sum())
        where = f"[{what}: recv_counts={recv_counts.tolist()}]"
        sizes = call_learner(ex, local_expert_sizes_fn, recv_counts.clone())
        expect_tensor(ex, "local_expert_sizes", sizes, (per_rank,))
        want_sizes = recv_counts.sum(dim=0).tolist()
        if sizes.long().tolist() != want_sizes:
            e = next(e for e in range(per_rank) if int(sizes[e]) != want_sizes[e])
            hint = "sum over the source ranks (dim 0): local expert e gets recv_counts[:, e].sum() rows"
            fail(
                ex, f"{where} local expert {e} gets {want_sizes[e]} rows in total, your sizes say {int(sizes[e])}", hint
            )

        order = call_learner(ex, local_expert_order_fn, recv_counts.clone())
        expect_tensor(ex, "local_expert_order", order, (total,))
        if total == 0:
            continue
        o = order.long()
        if int(o.min()) < 0 or int(o.max()) >= total or torch.unique(o).numel() != total:
            fail(ex, f"{where} the order is not a permutation of the {total} received rows: got {o.tolist()}")
        source, expert = _received_layout(recv_counts)
        want_expert = torch.repeat_interleave(torch.arange(per_rank), torch.tensor(want_sizes))
        got_expert = expert[o]
        bad = (got_expert != want_expert).nonzero()
        if bad.numel():
            p = int(bad[0])
            r = int(o[p])
            hint = None
            if o.tolist() == list(range(total)):
                hint = "the rows arrive grouped by source rank, not by expert: they need reordering"
            fail(
                ex,
                f"{where} position {p} of x_local should hold a row of local expert {int(want_expert[p])}, "
                f"your order puts received row {r} there "
                f"(local expert {int(expert[r])}, sent by rank {int(source[r])})",
                hint or "x_local = x_recv[order] must list all rows of local expert 0, then expert 1, ...",
            )
        want_order = torch.argsort(expert, stable=True)
        if o.tolist() != want_order.tolist():
            p = next(p for p in range(total) if int(o[p]) != int(want_order[p]))
            fail(
                ex,
                f"{where} inside local expert {int(want_expert[p])}, position {p} should take received row "
                f"{int(want_order[p])} (rank {int(source[want_order[p]])}) but takes row {int(o[p])} "
                f"(rank {int(source[o[p]])})",
                "keep the received order inside each expert (rank 0's rows first): use a stable argsort",
            )
    passed(ex, "local_expert_sizes and local_expert_order", len(cases))


# ------------------------------------ 10.3 ----------------------------------------


def _combine_cases(gen: torch.Generator):
    cases = []
    for num_tokens, top_k, num_experts, hidden in [(6, 2, 4, 5), (9, 3, 8, 4), (5, 1, 3, 6), (1, 2, 4, 3)]:
        ids = torch.rand(num_tokens, num_experts, generator=gen).topk(top_k, dim=1).indices
        cases.append((f"T={num_tokens}, k={top_k}", ids, hidden))
    cases.append(("every token to experts 0 and 1", torch.tensor([[1, 0], [0, 1], [1, 0]]), 4))
    cases.append(("no tokens (T=0)", torch.empty(0, 2, dtype=torch.int64), 4))
    return cases


def check_unpermute_combine(combine_fn) -> None:
    """Check ``unpermute_combine(y_sorted, gather_indices, topk_weights) -> [T, H]``."""
    ex = "10.3"
    gen = _fresh_generator()
    cases = _combine_cases(gen)
    for what, topk_ids, hidden in cases:
        num_tokens, top_k = topk_ids.shape
        gather = torch.argsort(topk_ids.reshape(-1), stable=True).to(torch.int32)
        y_sorted = torch.randn(num_tokens * top_k, hidden, generator=gen, dtype=torch.float64)
        weights = torch.rand(num_tokens, top_k, generator=gen, dtype=torch.float64) + 0.1
        flat = torch.empty_like(y_sorted)
        flat[gather.long()] = y_sorted
        per_slot = flat.view(num_tokens, top_k, hidden)
        want = (per_slot * weights[..., None]).sum(dim=1)
        try:
            got = call_learner(ex, combine_fn, y_sorted.clone(), gather.clone(), weights.clone())
        except CheckFailed as exc:
            if num_tokens:
                raise
            fail(
                ex,
                f"{str(exc).removeprefix(f'{ex}: ')}\n  (a rank with no tokens: T=0, y_sorted is [0, {hidden}])",
                "view(T, k, -1) cannot infer -1 from 0 elements; use the hidden size y_sorted.shape[1]",
            )
        expect_tensor(ex, "unpermute_combine output", got, (num_tokens, hidden))
        if num_tokens == 0:
            continue
        t = first_mismatch_row(got, want, rtol=1e-6, atol=1e-9)
        if t is None:
            continue
        slots = ", ".join(
            f"slot {j}: expert {int(topk_ids[t, j])}, weight {float(weights[t, j]):.3f}" for j in range(top_k)
        )

        def head(row):
            return [round(v, 4) for v in row[:3].double().tolist()]

        message = f"[{what}] token {t} ({slots}): expected {head(want[t])}..., got {head(got[t])}..."
        if torch.allclose(got.double(), per_slot.sum(dim=1)):
            hint = "you summed the expert outputs without the routing weights: multiply by topk_weights first"
        elif torch.allclose(got.double(), (y_sorted[gather.long()].view_as(per_slot) * weights[..., None]).sum(1)):
            hint = "y_sorted[gather_indices] reads in the wrong direction; write back: out[gather_indices] = y_sorted"
        else:
            hint = "row i of y_sorted is flat (token, slot) id gather_indices[i] = t*k + j"
        fail(ex, message, hint)
    passed(ex, "unpermute_combine", len(cases))
