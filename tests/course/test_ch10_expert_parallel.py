"""Chapter 10 checks: the reference answers pass, plausible wrong answers are rejected
with a message that points at the mistake."""

import pytest
import torch

from moe_learn.course.checks import CheckFailed
from moe_learn.course.checks.ch10_expert_parallel import (
    EXERCISES,
    check_dispatch_plan,
    check_local_experts,
    check_unpermute_combine,
)
from moe_learn.course.exercises import all_exercises
from moe_learn.layers.expert_parallel import dispatch_plan, local_expert_order, local_expert_sizes, unpermute_combine


def test_exercises_are_registered_with_hints():
    ids = [ex.id for ex in EXERCISES]
    assert ids == ["10.1", "10.2", "10.3"]
    assert all(2 <= len(ex.hints) <= 3 and ex.notebook == "10_expert_parallel.ipynb" for ex in EXERCISES)
    assert set(ids) <= set(all_exercises())


def test_reference_answers_pass(capsys):
    check_dispatch_plan(dispatch_plan)
    check_local_experts(local_expert_sizes, local_expert_order)
    check_unpermute_combine(unpermute_combine)
    out = capsys.readouterr().out
    assert "[PASS] 10.1" in out and "[PASS] 10.2" in out and "[PASS] 10.3" in out


def test_stubs_raise_not_implemented_unchanged():
    def stub(*args):
        raise NotImplementedError("exercise 10.1: replace this line with your code")

    checks = [(check_dispatch_plan, (stub,)), (check_local_experts, (stub, stub)), (check_unpermute_combine, (stub,))]
    for check, fns in checks:
        with pytest.raises(NotImplementedError):
            check(*fns)


# ------------------------------- 10.1 wrong answers --------------------------------


def _counts_and_order(topk_ids, num_experts):
    flat = topk_ids.reshape(-1)
    return torch.bincount(flat, minlength=num_experts), torch.argsort(flat, stable=True)


def plan_round_robin(topk_ids, num_experts, world_size):
    counts, order = _counts_and_order(topk_ids, num_experts)
    return order, counts, counts.view(-1, world_size).sum(dim=0)  # expert e -> rank e % W


def plan_counts_tokens(topk_ids, num_experts, world_size):
    counts, order = _counts_and_order(topk_ids, num_experts)
    owner = topk_ids[:, 0] // (num_experts // world_size)  # one row per token: forgets the other k-1
    return order, counts, torch.bincount(owner, minlength=world_size)


def plan_unstable(topk_ids, num_experts, world_size):
    counts, _ = _counts_and_order(topk_ids, num_experts)
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat * flat.numel() - torch.arange(flat.numel()))  # ties in reverse order
    return order, counts, counts.view(world_size, -1).sum(dim=1)


def plan_token_ids(topk_ids, num_experts, world_size):
    counts, order = _counts_and_order(topk_ids, num_experts)
    return order // topk_ids.shape[1], counts, counts.view(world_size, -1).sum(dim=1)


def plan_per_expert_sends(topk_ids, num_experts, world_size):
    counts, order = _counts_and_order(topk_ids, num_experts)
    return order, counts, counts


def plan_histc_off_by_one(topk_ids, num_experts, world_size):
    _, order = _counts_and_order(topk_ids, num_experts)
    # ids read as 1-based: expert 0 falls outside the bins and is lost
    counts = torch.histc(topk_ids.reshape(-1).float(), bins=num_experts, min=1, max=num_experts).long()
    return order, counts, torch.bincount(topk_ids.reshape(-1), minlength=num_experts).view(world_size, -1).sum(1)


@pytest.mark.parametrize(
    "wrong, match",
    [
        (
            plan_round_robin,
            r"rank \d .* should receive \d+ rows from this rank, your plan sends \d+(.|\n)*e % world_size",
        ),
        (plan_counts_tokens, r"should receive \d+ rows from this rank(.|\n)*you counted tokens"),
        (plan_unstable, r"inside expert \d+, position \d+ holds row \d+(.|\n)*stable sort"),
        (plan_token_ids, r"not a permutation(.|\n)*not token ids"),
        (plan_per_expert_sends, r"one entry per expert \(\d+\); it needs one per rank"),
        (plan_histc_off_by_one, r"expert \d+ has \d+ rows, your expert_counts say \d+"),
    ],
)
def test_dispatch_plan_check_rejects(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        check_dispatch_plan(wrong)


# ------------------------------- 10.2 wrong answers --------------------------------


def sizes_per_source(recv_counts):
    return recv_counts.sum(dim=1)  # W entries, and the wrong sum


def sizes_per_source_square(recv_counts):
    # W == E_local would pass the shape test; the values must still be caught
    return recv_counts.sum(dim=1)[: recv_counts.shape[1]].clone().resize_(recv_counts.shape[1]).zero_() + recv_counts[0]


def order_identity(recv_counts):
    return torch.arange(int(recv_counts.sum()))


def order_transposed(recv_counts):
    world_size, per_rank = recv_counts.shape
    labels = torch.arange(per_rank).repeat_interleave(world_size)  # reads counts as [E_local, W]
    return torch.argsort(torch.repeat_interleave(labels, recv_counts.reshape(-1)), stable=True)


def order_sources_reversed(recv_counts):
    order = local_expert_order(recv_counts)
    world_size, per_rank = recv_counts.shape
    source = torch.repeat_interleave(torch.arange(world_size).repeat_interleave(per_rank), recv_counts.reshape(-1))
    labels = torch.repeat_interleave(torch.arange(per_rank).repeat(world_size), recv_counts.reshape(-1))
    return torch.argsort(labels * world_size + (world_size - 1 - source), stable=True) if order.numel() else order


@pytest.mark.parametrize(
    "sizes, order, match",
    [
        (sizes_per_source, local_expert_order, r"local_expert_sizes has shape|local expert \d+ gets \d+ rows in total"),
        (sizes_per_source_square, local_expert_order, r"local expert \d+ gets \d+ rows in total, your sizes say"),
        (local_expert_sizes, order_identity, r"should hold a row of local expert(.|\n)*grouped by source rank"),
        (local_expert_sizes, order_transposed, r"should hold a row of local expert \d+, your order puts received row"),
        (local_expert_sizes, order_sources_reversed, r"inside local expert \d+, .* \(rank \d\)(.|\n)*stable argsort"),
    ],
)
def test_local_experts_check_rejects(sizes, order, match):
    with pytest.raises(CheckFailed, match=match):
        check_local_experts(sizes, order)


# ------------------------------- 10.3 wrong answers --------------------------------


def combine_unweighted(y_sorted, gather_indices, topk_weights):
    num_tokens, top_k = topk_weights.shape
    out = torch.empty_like(y_sorted).index_copy_(0, gather_indices.long(), y_sorted)
    return out.view(num_tokens, top_k, -1).sum(dim=1)


def combine_gather_direction(y_sorted, gather_indices, topk_weights):
    num_tokens, top_k = topk_weights.shape
    out = y_sorted[gather_indices.long()]
    return (out.view(num_tokens, top_k, -1) * topk_weights[..., None]).sum(dim=1)


def combine_weights_in_expert_order(y_sorted, gather_indices, topk_weights):
    num_tokens, top_k = topk_weights.shape
    weighted = y_sorted * topk_weights.reshape(-1, 1)  # weights are in token order, rows in expert order
    out = torch.empty_like(weighted).index_copy_(0, gather_indices.long(), weighted)
    return out.view(num_tokens, top_k, -1).sum(dim=1)


def combine_view_minus_one(y_sorted, gather_indices, topk_weights):
    num_tokens, top_k = topk_weights.shape
    y = torch.empty_like(y_sorted).index_copy_(0, gather_indices.long(), y_sorted).view(num_tokens, top_k, -1)
    return (y * topk_weights[..., None]).sum(dim=1)


@pytest.mark.parametrize(
    "wrong, match",
    [
        (combine_view_minus_one, r"a rank with no tokens: T=0(.|\n)*use the hidden size y_sorted.shape\[1\]"),
        (combine_unweighted, r"token \d+ \(slot 0: expert \d+, weight (.|\n)*without the routing weights"),
        (combine_gather_direction, r"token \d+(.|\n)*wrong direction"),
        (combine_weights_in_expert_order, r"token \d+(.|\n)*flat \(token, slot\) id"),
    ],
)
def test_combine_check_rejects(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        check_unpermute_combine(wrong)
