"""Fused routing (one Triton kernel, three phases) equals the eager chain it replaces."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_learn import calculate_topk, get_routing_indices
from moe_learn.device import DEVICE, ON_GPU
from moe_learn.kernels.fused_routing import fused_routing


@pytest.mark.parametrize("T,E,k", [(37, 8, 2), (100, 16, 3), (130, 128, 8), (5, 6, 6), (1, 4, 1), (0, 8, 2)])
@pytest.mark.parametrize("use_sigmoid,renormalize,pre_act", [
    (False, True, True),  # Qwen3 / Mixtral
    (True, False, False),  # Llama 4
    (False, False, False),  # gpt-oss: softmax over the chosen k
    (True, True, True),  # DeepSeek-style sigmoid scores, renormalised
])
def test_matches_eager_chain(T, E, k, use_sigmoid, renormalize, pre_act):
    logits = torch.randn(T, E, device=DEVICE)  # float32: no ties, so the chosen sets are unique
    weights, ids, counts, gather, scatter = fused_routing(
        logits, k, use_sigmoid=use_sigmoid, renormalize=renormalize, pre_act=pre_act
    )
    ref_w, ref_ids = calculate_topk(logits, k, use_sigmoid, renormalize, pre_act=pre_act, post_act=not pre_act)
    ref_counts, ref_gather, ref_scatter = get_routing_indices(ref_ids, E, return_scatter_indices=True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w)
    assert torch.equal(counts, ref_counts) and counts.dtype == torch.int32
    assert torch.equal(gather, ref_gather), "gather indices must be the stable argsort of the flat ids"
    assert torch.equal(scatter, ref_scatter)


def test_ties_go_to_the_lower_expert():
    logits = torch.zeros(3, 5, device=DEVICE)
    logits[:, 2] = 1.0
    _, ids, counts, gather, _ = fused_routing(logits, 3)
    assert ids.tolist() == [[2, 0, 1]] * 3
    assert counts.tolist() == [3, 3, 3, 0, 0]
    assert gather.tolist() == [1, 4, 7, 2, 5, 8, 0, 3, 6]


def test_bad_input():
    with pytest.raises(ValueError, match="top_k=9 is larger"):
        fused_routing(torch.randn(4, 8, device=DEVICE), 9)
    with pytest.raises(TypeError, match="router_logits must be a floating-point"):
        fused_routing(torch.ones(4, 8, dtype=torch.int64, device=DEVICE), 2)
    with pytest.raises(ValueError, match="router_logits must be 2-D"):
        fused_routing(torch.randn(2, 4, 8, device=DEVICE), 2)


def _eager(logits, k):
    ref_w, ref_ids = calculate_topk(logits, k, False, True)
    return (ref_w, ref_ids, *get_routing_indices(ref_ids, logits.shape[1], return_scatter_indices=True))


def _assert_same(got, want):
    torch.testing.assert_close(got[0], want[0])
    for name, a, b in zip(("ids", "counts", "gather", "scatter"), got[1:], want[1:], strict=True):
        assert torch.equal(a.long(), b.long()), name


def test_back_to_back_calls_of_different_sizes():
    """Each launch must leave its barrier counters at zero for the next, whatever its program count."""
    for T in (300, 37, 1, 0, 129, 300):
        logits = torch.randn(T, 64, device=DEVICE)
        _assert_same(fused_routing(logits, 4), _eager(logits, 4))


def test_cooperative_needs_a_gpu_or_matches_the_other_schedule():
    logits = torch.randn(500, 32, device=DEVICE)
    if not ON_GPU:
        with pytest.raises(ValueError, match="cooperative=True needs a GPU"):
            fused_routing(logits, 2, cooperative=True)
        return
    for _ in range(3):
        _assert_same(fused_routing(logits, 2, cooperative=True), fused_routing(logits, 2, cooperative=False))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_replays_from_a_cuda_graph():
    T, E, k = 4096, 128, 8
    logits = torch.randn(T, E, device=DEVICE)
    fused_routing(logits, k)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_routing(logits, k)  # this stream's counters exist before the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        outputs = fused_routing(logits, k)
    for _ in range(3):
        logits.copy_(torch.randn(T, E, device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        _assert_same(outputs, _eager(logits, k))


# ------------------------------------------------------------ special values: the same semantics as the eager chain

SPECIAL = (float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 88.0, -88.0)
MODES = [(s, r, p) for s in (False, True) for r in (False, True) for p in (False, True)]


@st.composite
def special_logits(draw, max_tokens=9, max_experts=20):
    """[T, E] logits full of ties, NaN, +-inf and constant rows, and the top_k to route them with."""
    num_tokens = draw(st.integers(0, max_tokens))
    num_experts = draw(st.integers(1, max_experts))
    finite = st.floats(-30, 30, width=32)
    # a few values per example, reused everywhere: ties in almost every row
    pool = draw(st.lists(st.one_of(st.sampled_from(SPECIAL), finite), min_size=1, max_size=4))
    value = st.one_of(st.sampled_from(pool), finite)
    rows = []
    for _ in range(num_tokens):
        if draw(st.booleans()):
            rows.append([draw(st.sampled_from(pool))] * num_experts)  # a constant row (all NaN, all -inf, ...)
        else:
            rows.append(draw(st.lists(value, min_size=num_experts, max_size=num_experts)))
    logits = torch.tensor(rows, dtype=torch.float32).reshape(num_tokens, num_experts)
    return logits, draw(st.integers(1, num_experts))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN and inf: expected here
@settings(max_examples=30, deadline=None)
@given(case=special_logits(), mode=st.sampled_from(MODES), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_agrees_with_the_eager_chain_on_nan_inf_and_ties(case, mode, dtype):
    logits, k = case
    logits = logits.to(dtype).to(DEVICE)
    use_sigmoid, renormalize, pre_act = mode
    T, E = logits.shape
    weights, ids, counts, gather, scatter = fused_routing(
        logits, k, use_sigmoid=use_sigmoid, renormalize=renormalize, pre_act=pre_act
    )
    ref_w, ref_ids = calculate_topk(logits, k, use_sigmoid, renormalize, pre_act=pre_act, post_act=not pre_act)
    ref_counts, ref_gather, ref_scatter = get_routing_indices(ref_ids, E, return_scatter_indices=True)
    assert torch.equal(ids, ref_ids), f"ids {ids.tolist()} vs eager {ref_ids.tolist()} for {logits.tolist()}"
    assert bool(((ids >= 0) & (ids < E)).all()), "ids in range"
    for t in range(T):
        assert len(set(ids[t].tolist())) == k, "an expert is picked at most once per token"
    assert torch.equal(counts, ref_counts) and int(counts.sum()) == T * k
    assert torch.equal(gather, ref_gather) and torch.equal(scatter, ref_scatter)
    assert weights.dtype == dtype
    torch.testing.assert_close(weights, ref_w, equal_nan=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_the_issue_cases():
    """Issue 13's reproductions: a NaN row, a -inf row with pre_act=False, and NaN into fused_moe_forward."""
    logits = torch.randn(3, 6, device=DEVICE)
    logits[1] = float("nan")
    weights, ids, counts, gather, scatter = fused_routing(logits, 2)
    assert ids[1].tolist() == [0, 1] and bool(weights[1].isnan().all())
    assert counts.sum() == 6 and sorted(gather.tolist()) == list(range(6))
    logits[1] = float("-inf")
    _, ids, *_ = fused_routing(logits, 2, pre_act=False)
    assert ids[1].tolist() == [0, 1]
    assert torch.equal(ids, calculate_topk(logits, 2, False, True, pre_act=False, post_act=True)[1])


def test_float64_logits_are_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"router_logits must be float32, float16 or bfloat16.*calculate_topk"):
        fused_routing(torch.randn(4, 8, dtype=torch.float64, device=DEVICE), 2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fused_moe_forward_on_a_nan_token():
    """Issue 13: a NaN token made fused_moe_forward fail deep in the interpreter (E=4): now NaN stays in its row."""
    from moe_learn import fused_moe_forward

    T, H, inter, E = 5, 8, 4, 4
    x = torch.randn(T, H, device=DEVICE)
    x[2, 3] = float("nan")
    router = torch.randn(E, H, device=DEVICE)
    W1 = torch.randn(E, 2 * inter, H, device=DEVICE) / H**0.5
    W2 = torch.randn(E, H, inter, device=DEVICE) / inter**0.5
    out = fused_moe_forward(x, router, W1, W2, 2)
    assert out[2].isnan().all()
    clean = [0, 1, 3, 4]
    torch.testing.assert_close(out[clean], fused_moe_forward(x[clean], router, W1, W2, 2))
