"""route_ids (kernels/route_ids.py): one launch equal to drop_invalid + route_rows, and the layers' use of it."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_learn.device import DEVICE
from moe_learn.kernels.route_ids import MAX_SLOTS, route_ids
from moe_learn.layers import experts as X


def _reference(ids, weights, E):
    kept, w = X.drop_invalid(ids, weights, E)
    counts, gather = X.route_rows(kept, E)
    return counts, gather, w


def _assert_same(got, want):
    for name, a, b in zip(("counts", "gather_indices", "weights"), got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), name


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(0, 200), top_k=st.integers(1, 8), experts=st.integers(1, 300),
       invalid=st.booleans(), ids_dtype=st.sampled_from([torch.int64, torch.int32]),
       w_dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_equals_drop_invalid_then_route_rows(tokens, top_k, experts, invalid, ids_dtype, w_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    low, high = (-3, experts + 3) if invalid else (0, experts)
    ids = torch.randint(low, high, (tokens, top_k), generator=g).to(DEVICE, ids_dtype)
    weights = torch.rand(tokens, top_k, generator=g).to(DEVICE, w_dtype)
    _assert_same(route_ids(ids, weights, experts), _reference(ids, weights, experts))


def test_k_equals_e_ties_nan_weights_and_a_strided_input():
    E = 6
    ids = torch.stack([torch.randperm(E) for _ in range(9)]).to(DEVICE)  # k = E: every expert once per token
    weights = torch.rand(9, E, device=DEVICE)
    weights[2, 3] = float("nan")
    _assert_same(route_ids(ids, weights, E), _reference(ids, weights, E))
    same = torch.full((5, 2), 1, device=DEVICE)  # every slot on one expert: token order kept
    counts, gather, _ = route_ids(same, torch.rand(5, 2, device=DEVICE), 3)
    assert counts.tolist() == [0, 10, 0] and gather.tolist() == list(range(10))
    wide = torch.randint(0, E, (7, 8), device=DEVICE)[:, ::2]  # not contiguous
    w = torch.rand(7, 8, device=DEVICE)[:, ::2]
    _assert_same(route_ids(wide, w, E), _reference(wide, w, E))


def test_sentinels_contribute_nothing_through_the_layer():
    """transformers' expert-parallel sentinels (ids >= E) through the one-launch path: zero weight, in range."""
    T, k, E, H, I = 5, 2, 4, 16, 8  # noqa: E741
    ids = torch.randint(0, E, (T, k), device=DEVICE)
    ids[1, 0] = E  # a sentinel
    weights = torch.rand(T, k, device=DEVICE)
    counts, gather, w = X.drop_and_route(ids, weights, E)
    assert int(counts.sum()) == T * k and w[1, 0] == 0 and torch.equal(w[0], weights[0])
    x, w1, w2 = torch.randn(T, H, device=DEVICE), torch.randn(E, 2 * I, H, device=DEVICE), torch.randn(E, H, I,
                                                                                                      device=DEVICE)
    with torch.no_grad():
        out = X.run_experts(x, counts, gather, w, w1, w2)
        ref = X.run_experts(x, *_reference(ids, weights, E)[:2], X.drop_invalid(ids, weights, E)[1], w1, w2,
                            backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_the_layers_take_the_kernel_only_without_autograd_and_for_decode_sizes(monkeypatch):
    ids = torch.randint(0, 4, (3, 2), device=DEVICE)
    weights = torch.rand(3, 2, device=DEVICE, requires_grad=True)
    calls = []
    real = X._one_launch_routing
    monkeypatch.setattr(X, "_one_launch_routing", lambda *a: calls.append(real(*a)) or calls[-1])
    _, _, w = X.drop_and_route(ids, weights, 4)
    assert calls[-1] is False and w.grad_fn is not None  # the weights' gradient is kept
    with torch.no_grad():
        X.drop_and_route(ids, weights, 4)
    assert calls[-1] is True
    X.drop_and_route(ids, weights.detach(), 4, backend="torch")
    assert calls[-1] is False  # the reference backend stays PyTorch
    big = torch.zeros(5000, 1, dtype=torch.long, device=DEVICE)
    X.drop_and_route(big, torch.rand(5000, 1, device=DEVICE), 4)
    assert calls[-1] is False  # beyond MAX_SLOTS: the sort


@pytest.mark.parametrize("kernel", [True, False])
def test_moe_experts_inference_is_the_same_either_way(kernel, monkeypatch):
    monkeypatch.setattr(X, "ROUTE_IDS_KERNEL", kernel)
    torch.manual_seed(0)
    T, k, E, H, I = 6, 2, 5, 16, 8  # noqa: E741
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(DEVICE)
    x, w = torch.randn(T, H, device=DEVICE), torch.rand(T, k, device=DEVICE)
    w1, w2 = torch.randn(E, 2 * I, H, device=DEVICE) / 4, torch.randn(E, H, I, device=DEVICE) / 3
    with torch.no_grad():
        out = X.moe_experts(x, ids, w, w1, w2)
        ref = X.moe_experts(x.double(), ids, w.double(), w1.double(), w2.double(), backend="torch")
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call, match", [
    (lambda ids, w: route_ids(ids.float(), w, 4), "topk_ids"),
    (lambda ids, w: route_ids(ids, w.long(), 4), "topk_weights"),
    (lambda ids, w: route_ids(ids, w[:, :1], 4), "one shape"),
    (lambda ids, w: route_ids(ids, w, 0), "num_experts"),
    (lambda ids, w: route_ids([[0, 1]], w, 4), "topk_ids"),
    (lambda ids, w: route_ids(ids, w.requires_grad_(), 4), "requires grad"),
    (lambda ids, w: route_ids(ids.new_zeros(MAX_SLOTS + 1, 1), w.new_ones(MAX_SLOTS + 1, 1), 4), "MAX_SLOTS"),
])
def test_bad_arguments_name_the_argument(call, match):
    ids, weights = torch.randint(0, 4, (3, 2), device=DEVICE), torch.rand(3, 2, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        call(ids, weights)


def test_the_largest_input_it_takes_is_still_exact():
    """T*k = MAX_SLOTS: every program compares against all 4096 slots (ties among 3 experts)."""
    ids = torch.randint(-1, 4, (MAX_SLOTS // 4, 4), device=DEVICE)
    weights = torch.rand(MAX_SLOTS // 4, 4, device=DEVICE)
    _assert_same(route_ids(ids, weights, 3), _reference(ids, weights, 3))
