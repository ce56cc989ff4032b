"""Fused routing (one Triton kernel, three phases) equals the eager chain it replaces."""

import pytest
import torch

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
