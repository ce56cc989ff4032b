"""The naive grouped GEMM, SwiGLU, the MoE experts, TorchMoEBlock against transformers, ch04 checks."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_learn import (
    calculate_topk,
    combine,
    get_routing_indices,
    moe_experts_torch,
    moe_forward_torch,
    permute,
    swiglu,
    torch_grouped_gemm,
    unpermute,
)
from moe_learn.device import DEVICE


def per_row_reference(X, W, m_sizes, transpose):
    """Row by row: each row times the weight of the expert that owns it (no blocks, no offsets)."""
    owner = torch.repeat_interleave(torch.arange(len(m_sizes)), torch.as_tensor(m_sizes).long().cpu())
    rows = [X[r] @ (W[e].T if transpose else W[e]) for r, e in enumerate(owner.tolist())]
    N = W.shape[1] if transpose else W.shape[2]
    return torch.stack(rows) if rows else X.new_empty(0, N)


# ------------------------------------------------------------------ grouped GEMM


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=6),
    st.integers(1, 6),
    st.integers(1, 6),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_grouped_gemm_matches_row_by_row(sizes, K, N, transpose, seed):
    gen = torch.Generator().manual_seed(seed)
    E, M = len(sizes), sum(sizes)
    X = torch.randn(M, K, generator=gen).to(DEVICE)
    W = torch.randn(E, N, K, generator=gen) if transpose else torch.randn(E, K, N, generator=gen)
    W = W.to(DEVICE)
    m_sizes = torch.tensor(sizes, dtype=torch.int32, device=DEVICE)
    Y = torch_grouped_gemm(X, W, m_sizes, transpose=transpose)
    assert Y.shape == (M, N)
    torch.testing.assert_close(Y, per_row_reference(X, W, sizes, transpose), rtol=1e-5, atol=1e-5)


def test_transpose_false_with_non_square_W():
    X = torch.randn(5, 3, device=DEVICE)
    W = torch.randn(2, 3, 7, device=DEVICE)  # [E, K, N]
    m_sizes = torch.tensor([2, 3], device=DEVICE)
    Y = torch_grouped_gemm(X, W, m_sizes, transpose=False)
    assert Y.shape == (5, 7)
    torch.testing.assert_close(Y[:2], X[:2] @ W[0])
    torch.testing.assert_close(Y[2:], X[2:] @ W[1])
    # the same product with W in nn.Linear layout and transpose=True
    torch.testing.assert_close(torch_grouped_gemm(X, W.transpose(1, 2).contiguous(), m_sizes), Y)


def test_empty_experts_cost_nothing_and_leave_no_gap():
    X = torch.randn(4, 3, device=DEVICE)
    W = torch.randn(5, 2, 3, device=DEVICE)
    Y = torch_grouped_gemm(X, W, torch.tensor([0, 3, 0, 0, 1], device=DEVICE))
    torch.testing.assert_close(Y[:3], X[:3] @ W[1].T)
    torch.testing.assert_close(Y[3:], X[3:] @ W[4].T)
    assert torch_grouped_gemm(X[:0], W, torch.zeros(5, dtype=torch.int64, device=DEVICE)).shape == (0, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grouped_gemm_keeps_dtype(dtype):
    X = torch.randn(6, 8, device=DEVICE, dtype=dtype)
    W = torch.randn(3, 4, 8, device=DEVICE, dtype=dtype)
    sizes = [1, 2, 3]
    Y = torch_grouped_gemm(X, W, torch.tensor(sizes, device=DEVICE))
    assert Y.dtype == dtype
    torch.testing.assert_close(Y.float(), per_row_reference(X.float(), W.float(), sizes, True), rtol=2e-2, atol=2e-2)


def test_grouped_gemm_bad_inputs():
    X = torch.randn(5, 4, device=DEVICE)
    W = torch.randn(3, 6, 4, device=DEVICE)
    ok = torch.tensor([1, 2, 2], device=DEVICE)
    with pytest.raises(ValueError, match="m_sizes sums to 4 but X has 5 rows"):
        torch_grouped_gemm(X, W, torch.tensor([1, 2, 1], device=DEVICE))
    with pytest.raises(ValueError, match="m_sizes must be non-negative"):
        torch_grouped_gemm(X, W, torch.tensor([3, -1, 3], device=DEVICE))
    with pytest.raises(ValueError, match="m_sizes has 2 entries but W has 3 experts"):
        torch_grouped_gemm(X, W, torch.tensor([2, 3], device=DEVICE))
    with pytest.raises(TypeError, match="m_sizes must hold integer"):
        torch_grouped_gemm(X, W, ok.float())
    with pytest.raises(ValueError, match=r"X has 4 columns but W \(3, 6, 4\) \(layout \[E, K, N\], transpose=False\)"):
        torch_grouped_gemm(X, W, ok, transpose=False)
    with pytest.raises(ValueError, match="W must be 3-D"):
        torch_grouped_gemm(X, W[0], ok)
    with pytest.raises(ValueError, match="X must be 2-D"):
        torch_grouped_gemm(X[None], W, ok)
    with pytest.raises(TypeError, match="X is torch.float32 but W is torch.float16"):
        torch_grouped_gemm(X, W.half(), ok)
    with pytest.raises(TypeError, match="m_sizes must be a torch.Tensor"):
        torch_grouped_gemm(X, W, [1, 2, 2])


def test_swiglu_is_gate_first():
    gate, up = torch.randn(3, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    torch.testing.assert_close(swiglu(torch.cat([gate, up], dim=1)), F.silu(gate) * up)
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu(torch.randn(3, 5, device=DEVICE))


# ------------------------------------------------------------------ MoE experts and block


def random_moe(T=10, H=8, inter=6, E=5, k=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen)
    router = torch.randn(E, H, generator=gen)
    gate_up = torch.randn(E, 2 * inter, H, generator=gen) / H**0.5
    down = torch.randn(E, H, inter, generator=gen) / inter**0.5
    return (t.to(DEVICE, dtype) for t in (hidden, router, gate_up, down))


def experts_token_by_token(hidden, ids, weights, gate_up, down):
    """The definition, one token and one expert at a time."""
    out = torch.zeros_like(hidden, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            h = swiglu(hidden[t].double() @ gate_up[e].double().T)
            out[t] += weights[t, j].double() * (h @ down[e].double().T)
    return out


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 9), st.integers(1, 5), st.data())
def test_moe_experts_match_the_definition(T, E, data):
    k = data.draw(st.integers(1, E))
    hidden, router, gate_up, down = random_moe(T=T, E=E, k=k, seed=data.draw(st.integers(0, 2**31 - 1)))
    weights, ids = calculate_topk(hidden @ router.T, k, use_sigmoid=False, renormalize=True)
    got = moe_experts_torch(hidden, ids, weights, gate_up, down)
    torch.testing.assert_close(
        got.double(), experts_token_by_token(hidden, ids, weights, gate_up, down), rtol=1e-5, atol=1e-6
    )


def test_moe_experts_is_the_chapter_pipeline():
    hidden, router, gate_up, down = random_moe()
    weights, ids = calculate_topk(hidden @ router.T, 2, use_sigmoid=False, renormalize=False)
    counts, gather = get_routing_indices(ids, 5)
    y = torch_grouped_gemm(swiglu(torch_grouped_gemm(permute(hidden, gather, 2), gate_up, counts)), down, counts)
    expected = combine(unpermute(y, gather), weights)
    torch.testing.assert_close(moe_experts_torch(hidden, ids, weights, gate_up, down), expected)


def test_moe_experts_bad_inputs():
    hidden, router, gate_up, down = random_moe()
    weights, ids = calculate_topk(hidden @ router.T, 2, use_sigmoid=False, renormalize=True)
    with pytest.raises(ValueError, match=r"topk_ids \(10, 2\) and topk_weights \(10, 1\)"):
        moe_experts_torch(hidden, ids, weights[:, :1], gate_up, down)
    with pytest.raises(TypeError, match="topk_ids must hold integer"):
        moe_experts_torch(hidden, ids.float(), weights, gate_up, down)
    with pytest.raises(ValueError, match=r"gate_up_proj .* must be \[E, 2I, H\]"):
        moe_experts_torch(hidden, ids, weights, gate_up.transpose(1, 2), down)
    with pytest.raises(ValueError, match="disagree"):
        moe_experts_torch(hidden, ids, weights, gate_up[:, :-2], down)
    with pytest.raises(TypeError, match="hidden_states is torch.float32 but down_proj is torch.float16"):
        moe_experts_torch(hidden, ids, weights, gate_up, down.half())
    with pytest.raises(ValueError, match=r"topk_ids holds \d+, outside \[0, 5\)"):
        moe_experts_torch(hidden, ids + 5, weights, gate_up, down)


def test_functional_forward_bad_inputs():
    hidden, router, gate_up, down = random_moe()
    with pytest.raises(ValueError, match="router_weight has 4 experts but gate_up_proj"):
        moe_forward_torch(hidden, router[:4], gate_up, down, 2)
    with pytest.raises(TypeError, match="hidden_states must be a floating-point"):
        moe_forward_torch(hidden.long(), router, gate_up, down, 2)
