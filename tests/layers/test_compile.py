"""torch.compile(fullgraph=True) over the ops and over a model using them, with gradients; CUDA graphs."""

import pytest
import torch

from moe_learn import MoEBlock, fused_routing, get_routing_indices, grouped_gemm, moe_experts
from moe_learn.device import DEVICE, ON_GPU


def _fresh():
    torch._dynamo.reset()  # each test compiles from scratch: no graph reused from another test


def test_grouped_gemm_compiles_without_a_graph_break():
    _fresh()
    ids = torch.tensor([[0, 2], [2, 1], [0, 1]], device=DEVICE)
    counts, _ = get_routing_indices(ids, 4)
    X = torch.randn(6, 16, device=DEVICE)
    W = torch.randn(4, 8, 16, device=DEVICE, requires_grad=True)
    compiled = torch.compile(lambda x: grouped_gemm(x, W, counts) * 2, fullgraph=True)
    out = compiled(X)
    with torch.no_grad():
        torch.testing.assert_close(out, grouped_gemm(X, W, counts) * 2)
    (grad,) = torch.autograd.grad(out.sum(), W)
    (want,) = torch.autograd.grad((grouped_gemm(X, W, counts) * 2).sum(), W)
    torch.testing.assert_close(grad, want)


def test_fused_routing_compiles_and_trains_the_router():
    _fresh()
    logits = torch.randn(5, 6, device=DEVICE, requires_grad=True)

    def route(x):
        weights, ids, counts, gather, scatter = fused_routing(x, 2)
        return weights * 2, counts

    weights, counts = torch.compile(route, fullgraph=True)(logits)
    assert int(counts.sum()) == 10
    # (renormalized weights sum to 1 per token: a plain sum would have a zero gradient)
    (grad,) = torch.autograd.grad((weights * torch.arange(10.0, device=DEVICE).view(5, 2)).sum(), logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_experts_compile_forward_and_backward():
    _fresh()
    T, H, I, E, k = 6, 16, 8, 4, 2
    x = torch.randn(T, H, device=DEVICE, requires_grad=True)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(DEVICE)
    w = torch.rand(T, k, device=DEVICE, requires_grad=True)
    w1 = (torch.randn(E, 2 * I, H, device=DEVICE) / H**0.5).requires_grad_()
    w2 = (torch.randn(E, H, I, device=DEVICE) / I**0.5).requires_grad_()
    leaves = [x, w, w1, w2]
    out = torch.compile(moe_experts, fullgraph=True)(x, ids, w, w1, w2)
    got = torch.autograd.grad(out.square().sum(), leaves)
    ref = moe_experts(x, ids, w, w1, w2, backend="torch")
    want = torch.autograd.grad(ref.square().sum(), leaves)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_a_model_using_the_ops_compiles_with_fullgraph():
    """Router, fused routing of the block, both grouped GEMMs and the backward, in one graph."""
    _fresh()
    torch.manual_seed(0)
    block = MoEBlock(16, 8, num_experts=4, top_k=2, device=DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    params = [x, *block.parameters()]
    ref = block(x)
    want = torch.autograd.grad(ref.square().sum(), params)
    out = torch.compile(block, fullgraph=True)(x)
    got = torch.autograd.grad(out.square().sum(), params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_experts_forward_and_backward_capture_in_a_cuda_graph():
    T, H, I, E, k = 64, 64, 32, 8, 2
    dtype = torch.bfloat16
    x = torch.randn(T, H, device="cuda", dtype=dtype, requires_grad=True)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).cuda()
    w = torch.rand(T, k, device="cuda", dtype=dtype)
    w1 = (torch.randn(E, 2 * I, H, device="cuda") / H**0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(E, H, I, device="cuda") / I**0.5).to(dtype).requires_grad_()
    run = lambda: torch.autograd.grad(moe_experts(x, ids, w, w1, w2).float().square().sum(), [x, w1, w2])  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up: compile and autotune outside the capture
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, run(), strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_no_host_sync_in_forward_or_backward():
    """torch.cuda's sync debug mode raises at any device->host copy: forward and backward make none."""
    T, H, I, E, k = 96, 64, 32, 8, 2
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(T, E, device="cuda", requires_grad=True)
    w1 = (torch.randn(E, 2 * I, H, device="cuda") / H**0.5).to(torch.bfloat16).requires_grad_()
    w2 = (torch.randn(E, H, I, device="cuda") / I**0.5).to(torch.bfloat16).requires_grad_()

    def step():
        weights, ids, *_ = fused_routing(logits, k)
        out = moe_experts(x, ids, weights, w1, w2)
        torch.autograd.grad(out.float().square().sum(), [x, logits, w1, w2])

    step()  # the first call compiles and autotunes (which times candidates: that syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
