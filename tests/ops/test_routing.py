"""calculate_topk and get_routing_indices: unit, property and bad-input tests."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_learn import calculate_topk, get_routing_indices
from moe_learn.device import DEVICE
from moe_learn.ops.routing import expert_counts, gather_indices_by_expert, inverse_permutation

# ----------------------------------------------------------------------------- calculate_topk


def test_pre_act_softmax_is_softmax_then_topk():
    logits = torch.randn(6, 8, device=DEVICE)
    weights, ids = calculate_topk(logits, 3, use_sigmoid=False, renormalize=False)
    probs = torch.softmax(logits, dim=-1)
    expect_w, expect_ids = probs.topk(3, dim=-1)
    torch.testing.assert_close(weights, expect_w)
    assert torch.equal(ids, expect_ids)
    assert bool((weights.sum(-1) < 1).all()), "without renormalization k of E probabilities sum below 1"


def test_post_act_softmax_is_topk_then_softmax_over_k():
    logits = torch.randn(6, 8, device=DEVICE)
    weights, ids = calculate_topk(logits, 3, use_sigmoid=False, renormalize=False, pre_act=False, post_act=True)
    top = logits.topk(3, dim=-1)
    torch.testing.assert_close(weights, torch.softmax(top.values, dim=-1))
    assert torch.equal(ids, top.indices)


def test_softmax_post_act_equals_pre_act_renormalized():
    # softmax over the k chosen == their share of the full softmax: the same weights twice.
    logits = torch.randn(10, 16, device=DEVICE)
    post = calculate_topk(logits, 4, False, renormalize=False, pre_act=False, post_act=True)
    pre = calculate_topk(logits, 4, False, renormalize=True)
    torch.testing.assert_close(post[0], pre[0])
    assert torch.equal(post[1], pre[1])


def test_sigmoid_pre_and_post_act_agree_and_renormalize_sums_to_one():
    logits = torch.randn(10, 16, device=DEVICE)
    pre_w, pre_ids = calculate_topk(logits, 4, True, False)
    post_w, post_ids = calculate_topk(logits, 4, True, False, pre_act=False, post_act=True)
    torch.testing.assert_close(pre_w, post_w)
    assert torch.equal(pre_ids, post_ids)
    torch.testing.assert_close(pre_w, torch.sigmoid(logits).gather(1, pre_ids))
    norm_w, _ = calculate_topk(logits, 4, True, True)
    torch.testing.assert_close(norm_w.sum(-1), torch.ones(10, device=DEVICE))
    torch.testing.assert_close(norm_w, pre_w / pre_w.sum(-1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_weights_keep_the_logits_dtype(dtype):
    logits = torch.randn(5, 8, device=DEVICE).to(dtype)
    weights, ids = calculate_topk(logits, 2, False, True)
    assert weights.dtype == dtype and ids.dtype == torch.int64
    expect = torch.softmax(logits.double(), -1).topk(2).values
    expect = (expect / expect.sum(-1, keepdim=True)).to(dtype)  # exact but for the final rounding
    torch.testing.assert_close(weights, expect, rtol=1e-2 if dtype.itemsize == 2 else 1e-6, atol=1e-7)


def test_top_k_equal_to_num_experts_and_zero_tokens():
    weights, ids = calculate_topk(torch.randn(3, 4, device=DEVICE), 4, False, False)
    assert sorted(ids[0].tolist()) == [0, 1, 2, 3]
    weights, ids = calculate_topk(torch.randn(0, 4, device=DEVICE), 2, True, True)
    assert weights.shape == (0, 2) and ids.shape == (0, 2)


@pytest.mark.parametrize(("pre_act", "post_act"), [(True, True), (False, False)])
def test_exactly_one_of_pre_act_post_act(pre_act, post_act):
    with pytest.raises(ValueError, match="exactly one of pre_act/post_act"):
        calculate_topk(torch.randn(2, 4), 2, False, False, pre_act=pre_act, post_act=post_act)


@pytest.mark.parametrize(
    ("logits", "top_k", "error", "match"),
    [
        (torch.randn(2, 4), 5, ValueError, "top_k=5 is larger than the number of experts"),
        (torch.randn(2, 4), 0, ValueError, "top_k must be a positive int"),
        (torch.randn(2, 4), 2.0, ValueError, "top_k must be a positive int"),
        (torch.randn(8), 2, ValueError, "gating_output must be 2-D"),
        (torch.randint(0, 5, (2, 4)), 2, TypeError, "gating_output must be a floating-point"),
        ([[0.1, 0.2]], 1, TypeError, "gating_output must be a torch.Tensor"),
    ],
)
def test_calculate_topk_bad_input(logits, top_k, error, match):
    with pytest.raises(error, match=match):
        calculate_topk(logits, top_k, False, False)


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(0, 9),
    num_experts=st.integers(1, 12),
    data=st.data(),
    use_sigmoid=st.booleans(),
    renormalize=st.booleans(),
    pre_act=st.booleans(),
)
def test_calculate_topk_properties(num_tokens, num_experts, data, use_sigmoid, renormalize, pre_act):
    top_k = data.draw(st.integers(1, num_experts))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen) * 3
    weights, ids = calculate_topk(logits, top_k, use_sigmoid, renormalize, pre_act=pre_act, post_act=not pre_act)
    assert weights.shape == ids.shape == (num_tokens, top_k)
    assert weights.dtype == logits.dtype and ids.dtype == torch.int64
    for t in range(num_tokens):
        chosen = ids[t].tolist()
        assert len(set(chosen)) == top_k
        # Every chosen expert scores at least as high as every expert left out.
        rest = [e for e in range(num_experts) if e not in chosen]
        if rest:
            assert logits[t, chosen].min() >= logits[t, rest].max()
    assert bool((weights[:, :-1] >= weights[:, 1:]).all()), "weights come sorted, largest first"
    assert bool((weights >= 0).all())
    if renormalize or (not use_sigmoid and not pre_act):
        torch.testing.assert_close(weights.sum(-1), torch.ones(num_tokens))


# ------------------------------------------------------------------------ get_routing_indices


def _routed(num_tokens, top_k, num_experts, gen=None):
    return torch.rand(num_tokens, num_experts, generator=gen).topk(top_k, dim=-1).indices


def _assert_routing_indices(ids, num_experts, counts, gather, scatter=None):
    flat = ids.reshape(-1).long().cpu()
    n = flat.numel()
    assert counts.dtype == torch.int32 and gather.dtype == torch.int32
    assert torch.equal(counts.long().cpu(), torch.bincount(flat, minlength=num_experts))
    g = gather.long().cpu()
    assert sorted(g.tolist()) == list(range(n)), "gather_indices is a permutation"
    assert torch.equal(flat[g], flat.sort().values), "expert order"
    key = flat * max(n, 1) + torch.arange(n)  # expert first, then flat position: the stable order
    assert torch.equal(g, key.argsort()), "ties in token order"
    if scatter is not None:
        s = scatter.long().cpu()
        assert scatter.dtype == torch.int32
        assert torch.equal(s[g], torch.arange(n)) and torch.equal(g[s], torch.arange(n))


def test_routing_indices_small_example():
    ids = torch.tensor([[2, 0], [0, 1], [2, 0]], device=DEVICE)
    counts, gather, scatter = get_routing_indices(ids, 4, return_scatter_indices=True)
    assert counts.tolist() == [3, 1, 2, 0]
    assert gather.tolist() == [1, 2, 5, 3, 0, 4]  # expert 0: slots 1, 2, 5 in that order
    assert scatter.tolist() == [4, 0, 1, 3, 5, 2]
    assert counts.device.type == gather.device.type == DEVICE.type


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_routing_indices_on_integer_ids(dtype):
    ids = _routed(300, 2, 8).to(dtype).to(DEVICE)  # 600 pairs: an unstable sort would show
    out = get_routing_indices(ids, 8, return_scatter_indices=True)
    _assert_routing_indices(ids, 8, *out)
    assert len(get_routing_indices(ids, 8)) == 2


def test_cpu_int_ids_work_although_histc_refuses_them():
    ids = torch.randint(0, 5, (20, 1), dtype=torch.int32)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.histc(ids, bins=5, min=0, max=5)
    counts = expert_counts(ids.reshape(-1), 5)
    assert torch.equal(counts.long(), torch.bincount(ids.reshape(-1).long(), minlength=5))


def test_routing_indices_edge_cases():
    zero = get_routing_indices(torch.empty(0, 2, dtype=torch.long), 4, return_scatter_indices=True)
    assert zero[0].tolist() == [0, 0, 0, 0] and zero[1].numel() == 0 and zero[2].numel() == 0
    counts, gather = get_routing_indices(torch.full((5, 1), 3), 4)
    assert counts.tolist() == [0, 0, 0, 5] and gather.tolist() == [0, 1, 2, 3, 4]
    counts, gather = get_routing_indices(torch.zeros(3, 1, dtype=torch.long), 1)
    assert counts.tolist() == [3]


def test_helpers_agree_with_get_routing_indices():
    perm = torch.randperm(50).to(torch.int32)
    inv = inverse_permutation(perm)
    assert torch.equal(inv.long(), perm.long().argsort()) and inv.dtype == torch.int32
    flat = torch.randint(0, 6, (40,))
    assert torch.equal(gather_indices_by_expert(flat), get_routing_indices(flat, 6)[1])


@pytest.mark.parametrize(
    ("ids", "num_experts", "error", "match"),
    [
        (torch.tensor([[0, 4]]), 4, ValueError, r"selected_experts holds 4, outside \[0, 4\)"),
        (torch.tensor([[-1, 2]]), 4, ValueError, r"selected_experts holds -1"),
        (torch.tensor([[0.0, 1.0]]), 4, TypeError, r"integer indices.*\.long\(\)"),
        (torch.tensor([[True]]), 4, TypeError, "integer indices"),
        ([[0, 1]], 4, TypeError, "must be a torch.Tensor"),
        (torch.tensor([[0, 1]]), 0, ValueError, "num_experts must be a positive int"),
    ],
)
def test_routing_indices_bad_input(ids, num_experts, error, match):
    with pytest.raises(error, match=match):
        get_routing_indices(ids, num_experts)


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(0, 40),
    num_experts=st.integers(1, 10),
    data=st.data(),
    with_scatter=st.booleans(),
)
def test_routing_indices_properties(num_tokens, num_experts, data, with_scatter):
    top_k = data.draw(st.integers(1, num_experts))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    ids = _routed(num_tokens, top_k, num_experts, gen)
    out = get_routing_indices(ids, num_experts, return_scatter_indices=with_scatter)
    assert len(out) == (3 if with_scatter else 2)
    _assert_routing_indices(ids, num_experts, *out)
