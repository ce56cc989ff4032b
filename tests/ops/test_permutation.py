"""permute / unpermute / combine: properties, bad inputs, the chapter 03 checks (the diagram: test_plots.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_learn import combine, get_routing_indices, permute, unpermute
from moe_learn.device import DEVICE


def routed(T, E, k, H=4, dtype=torch.float32, seed=0):
    """X [T, H], topk_ids [T, k] (distinct experts per token), gather_indices, on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(T, H, generator=gen).to(DEVICE, dtype)
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k].to(DEVICE)
    _, gather = get_routing_indices(ids, E)
    return X, ids, gather


# ------------------------------------------------------------------ unit tests


def test_permute_by_hand():
    X = torch.arange(3.0).repeat_interleave(2).view(3, 2).to(DEVICE)  # token t's row is [t, t]
    ids = torch.tensor([[1, 0], [0, 2], [1, 2]], device=DEVICE)
    counts, gather = get_routing_indices(ids, 3)
    assert counts.tolist() == [2, 2, 2]
    out = permute(X, gather, 2)
    # expert 0: tokens 0, 1; expert 1: tokens 0, 2; expert 2: tokens 1, 2
    assert out[:, 0].tolist() == [0, 1, 0, 2, 1, 2]


def test_permute_groups_rows_by_expert_in_token_order():
    X, ids, gather = routed(9, 5, 3)
    out = permute(X, gather, 3)
    experts_in_order = ids.reshape(-1)[gather.long()]
    assert torch.equal(experts_in_order, experts_in_order.sort(stable=True).values)
    for e in range(5):
        tokens = gather[experts_in_order == e].long() // 3
        assert torch.equal(tokens, tokens.sort().values), f"token order inside expert {e} is not stable"
        assert torch.equal(out[experts_in_order == e], X[tokens])


def test_unpermute_by_hand():
    Y = torch.tensor([[10.0], [11.0], [12.0], [13.0]], device=DEVICE)
    gather = torch.tensor([2, 0, 3, 1], device=DEVICE, dtype=torch.int32)
    assert unpermute(Y, gather)[:, 0].tolist() == [11.0, 13.0, 10.0, 12.0]


def test_combine_by_hand():
    Y = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], device=DEVICE)  # 2 tokens, top-2
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0]], device=DEVICE)
    assert combine(Y, w).tolist() == [[2.5, 3.5], [5.0, 6.0]]


def test_combine_keeps_the_rows_dtype_and_sums_in_float32():
    Y = torch.full((4 * 8, 3), 1.0 / 3, dtype=torch.float16, device=DEVICE)
    w = torch.full((4, 8), 0.125, device=DEVICE)  # float32 weights, as Mixtral's router returns
    out = combine(Y, w)
    assert out.dtype == torch.float16 and out.shape == (4, 3)
    torch.testing.assert_close(out.float(), torch.full((4, 3), 1.0 / 3, device=DEVICE), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_permute_unpermute_keep_dtype_and_values(dtype):
    X, _, gather = routed(6, 4, 2, dtype=dtype)
    P = permute(X, gather, 2)
    assert P.dtype == dtype
    assert torch.equal(unpermute(P, gather), X.repeat_interleave(2, dim=0))


def test_permute_accepts_int64_and_int32_indices():
    X, _, gather = routed(5, 3, 2)
    assert torch.equal(permute(X, gather, 2), permute(X, gather.long(), 2))
    assert torch.equal(unpermute(X.repeat(2, 1), gather), unpermute(X.repeat(2, 1), gather.long()))


# ------------------------------------------------------------------ properties


@st.composite
def routing(draw):
    E = draw(st.integers(1, 6))
    k = draw(st.integers(1, min(E, 3)))
    T = draw(st.integers(0, 12))
    H = draw(st.integers(1, 5))
    return T, E, k, H, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(routing())
def test_unpermute_inverts_permute(case):
    T, E, k, H, seed = case
    X, _, gather = routed(T, E, k, H, seed=seed)
    flat = X.repeat_interleave(k, dim=0)  # flat (token, slot) order
    assert torch.equal(unpermute(permute(X, gather, k), gather), flat)
    # and the other way round: expert order -> flat -> expert order
    P = torch.randn(T * k, H, device=DEVICE)
    assert torch.equal(unpermute(P, gather)[gather.long()], P)


@settings(max_examples=30, deadline=None)
@given(routing())
def test_combine_of_equal_rows_with_normalized_weights_is_the_row(case):
    T, E, k, H, seed = case
    X, _, gather = routed(T, E, k, H, seed=seed)
    w = torch.rand(T, k, device=DEVICE) + 0.1
    w = w / w.sum(dim=1, keepdim=True)
    Y_flat = unpermute(permute(X, gather, k), gather)
    torch.testing.assert_close(combine(Y_flat, w), X, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_topk_1_is_a_direct_gather(T, E, seed):
    X, _, gather = routed(T, E, 1, seed=seed)
    assert torch.equal(permute(X, gather, 1), X[gather.long()])


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(0, 4), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_batched_input_is_flattened(B, S, k, seed):
    X, _, gather = routed(B * S, 4, k, seed=seed)
    assert torch.equal(permute(X.view(B, S, X.shape[1]), gather, k), permute(X, gather, k))


def test_zero_tokens():
    X = torch.empty(0, 4, device=DEVICE)
    gather = torch.empty(0, dtype=torch.int32, device=DEVICE)
    assert permute(X, gather, 2).shape == (0, 4)
    assert unpermute(X, gather).shape == (0, 4)
    assert combine(X, torch.empty(0, 2, device=DEVICE)).shape == (0, 4)


# ------------------------------------------------------------------ bad inputs


def test_gather_indices_wrong_length():
    X, _, gather = routed(4, 3, 2)
    with pytest.raises(ValueError, match="gather_indices has 7 entries, expected 8"):
        permute(X, gather[:-1], 2)
    with pytest.raises(ValueError, match="gather_indices has 8 entries, expected 4"):
        permute(X, gather, 1)
    with pytest.raises(ValueError, match="gather_indices has 8 entries, expected 6"):
        unpermute(X.repeat(2, 1)[:6], gather)


def test_gather_indices_not_integer():
    X, _, gather = routed(4, 3, 2)
    with pytest.raises(TypeError, match=r"gather_indices must hold integer indices.*\.long\(\)"):
        permute(X, gather.float(), 2)
    with pytest.raises(TypeError, match="gather_indices must hold integer"):
        unpermute(X, torch.zeros(4, dtype=torch.bool, device=DEVICE))


def test_gather_indices_out_of_range_or_repeated():
    X, _, gather = routed(4, 3, 2)
    bad = gather.clone()
    bad[3] = 8
    with pytest.raises(ValueError, match=r"holds 8, outside \[0, 8\)"):
        permute(X, bad, 2)
    bad[3] = -1
    with pytest.raises(ValueError, match=r"holds -1"):
        unpermute(X.repeat(2, 1), bad)
    repeated = torch.tensor([0, 1, 1, 3], device=DEVICE)
    with pytest.raises(ValueError, match="not a permutation.*2 never appears"):
        unpermute(X, repeated)


def test_wrong_shapes_and_types():
    X, _, gather = routed(4, 3, 2)
    with pytest.raises(TypeError, match="X must be a torch.Tensor"):
        permute(X.tolist(), gather, 2)
    with pytest.raises(ValueError, match="X must be 2-D or 3-D"):
        permute(X[0], gather, 2)
    with pytest.raises(ValueError, match="gather_indices must be 1-D"):
        permute(X, gather.view(2, 4), 2)
    with pytest.raises(ValueError, match="topk must be a positive int"):
        permute(X, gather, 0)
    with pytest.raises(ValueError, match="X must be 2-D"):
        unpermute(X.view(2, 2, 4), gather[:4])


def test_combine_bad_inputs():
    Y = torch.randn(6, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"Y_flat has 6 rows but topk_weights \(2, 2\) needs T\*k"):
        combine(Y, torch.rand(2, 2, device=DEVICE))
    with pytest.raises(ValueError, match="topk_weights must be 2-D"):
        combine(Y, torch.rand(6, device=DEVICE))
    with pytest.raises(TypeError, match="topk_weights must be a floating-point"):
        combine(Y, torch.ones(3, 2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="Y_flat must be a floating-point"):
        combine(Y.long(), torch.rand(3, 2, device=DEVICE))
