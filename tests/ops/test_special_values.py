"""The reference ops on special values: NaN, +-inf, ties, -0.0, empty, k = E, meta tensors, huge E.

The routing semantics these pin down (``calculate_topk``'s docstring; ``fused_routing``
must agree, see tests/kernels/test_fused_routing.py): experts are ranked by their logits,
NaN above every number, equal logits to the lower expert id, each expert once per token;
NaN and inf reach the weights exactly as torch's softmax and sigmoid make them.
"""

import math

import pytest
import torch

from moe_learn import calculate_topk, combine, get_routing_indices, permute, unpermute
from moe_learn.ops.moe import swiglu, swiglu_backward
from moe_learn.ops.routers import dense_router_scores

NAN, INF = float("nan"), float("inf")
MODES = {  # name -> (use_sigmoid, renormalize, pre_act)
    "softmax pre": (False, False, True),
    "softmax pre renorm": (False, True, True),
    "softmax post": (False, False, False),
    "sigmoid pre": (True, False, True),
    "sigmoid post renorm": (True, True, False),
}


def _topk(row, k, mode):
    use_sigmoid, renormalize, pre_act = MODES[mode]
    weights, ids = calculate_topk(torch.tensor([row]), k, use_sigmoid, renormalize, pre_act=pre_act,
                                  post_act=not pre_act)
    return weights[0], ids[0].tolist()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "row, k, ids",
    [
        ([1.0, NAN, 3.0, NAN], 3, [1, 3, 2]),  # NaN above every number, lower id first among NaN
        ([NAN] * 5, 2, [0, 1]),
        ([0.0, INF, 2.0, INF], 3, [1, 3, 2]),
        ([-INF] * 4, 2, [0, 1]),  # the case that repeated ids in the old kernel
        ([2.0, 5.0, 5.0, 2.0], 3, [1, 2, 0]),  # ties: the lower expert id first
        ([7.0] * 6, 6, [0, 1, 2, 3, 4, 5]),  # constant row, k = E
        ([-0.0, 0.0], 1, [0]),  # -0.0 equals 0.0
        ([-INF, NAN, INF, 1.0], 4, [1, 2, 3, 0]),
        ([17.0, 20.0], 2, [1, 0]),  # sigmoid rounds both to 1.0: the larger logit still wins
    ],
)
def test_which_experts_on_special_values(row, k, ids, mode):
    _, got = _topk(row, k, mode)
    assert got == ids


def test_nan_and_inf_reach_the_weights_as_the_activation_makes_them():
    w, _ = _topk([1.0, NAN, 3.0, 0.0], 2, "softmax pre")
    assert w.isnan().all(), "softmax over a row holding NaN is NaN everywhere"
    w, _ = _topk([1.0, INF, 3.0, 0.0], 2, "softmax pre")
    assert w.isnan().all(), "softmax over a row holding +inf is NaN (inf - inf), as torch.softmax"
    w, _ = _topk([1.0, NAN, 3.0, 0.0], 2, "sigmoid pre")
    assert math.isnan(w[0]) and w[1] == torch.sigmoid(torch.tensor(3.0))
    w, _ = _topk([1.0, NAN, 3.0, 0.0], 2, "sigmoid post renorm")
    assert w.isnan().all(), "renormalizing by a NaN sum"
    w, _ = _topk([-INF, -INF, 0.0], 2, "softmax post")
    assert w.tolist() == [1.0, 0.0]
    w, _ = _topk([-INF] * 3, 2, "softmax post")
    assert w.isnan().all()
    w, _ = _topk([-INF] * 3, 2, "sigmoid pre")
    assert w.tolist() == [0.0, 0.0]
    w, _ = _topk([-INF] * 3, 2, "sigmoid post renorm")
    assert w.isnan().all(), "0 / 0"


def test_rows_do_not_leak_into_each_other():
    logits = torch.randn(5, 8)
    logits[2] = NAN
    logits[3, 4] = INF
    w, ids = calculate_topk(logits, 3, False, True)
    clean = [0, 1, 4]
    ref_w, ref_ids = calculate_topk(logits[clean], 3, False, True)
    assert torch.equal(w[clean], ref_w) and torch.equal(ids[clean], ref_ids)
    assert w[2].isnan().all() and w[3].isnan().all()


def test_a_learner_using_torch_topk_still_passes_the_chapter_01_check():
    """The reference now sorts stably; the check must not demand that of a learner."""
    from moe_learn.course.checks.ch01_gating import check_calculate_topk

    def with_torch_topk(gating_output, top_k, use_sigmoid, renormalize, pre_act=True, post_act=False):
        if pre_act == post_act:
            raise ValueError("pass exactly one of pre_act/post_act")
        logits = gating_output.float()
        act = torch.sigmoid if use_sigmoid else (lambda x: torch.softmax(x, dim=-1))
        if pre_act:
            weights, ids = torch.topk(act(logits), top_k, dim=-1)
        else:
            values, ids = torch.topk(logits, top_k, dim=-1)
            weights = act(values)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(gating_output.dtype), ids

    check_calculate_topk(with_torch_topk)


# ------------------------------------------------------------------------ routing indices


@pytest.mark.parametrize("num_experts", [4099, 5000, 2**24 + 3])
def test_counts_are_exact_for_any_number_of_experts(num_experts):
    """histc in float32 misplaces ids from 4099 experts on (CPU), and id 2**24 + 1 beyond 2**24."""
    ids = torch.tensor([[num_experts - 1, 4095, 2**12 + 2], [num_experts - 2, 0, num_experts - 1]])
    if num_experts > 2**24:
        ids[0, 1] = 2**24 + 1
    counts, gather, scatter = get_routing_indices(ids, num_experts, return_scatter_indices=True)
    assert torch.equal(counts.long(), torch.bincount(ids.reshape(-1), minlength=num_experts))
    assert torch.equal(gather.long(), torch.argsort(ids.reshape(-1), stable=True))
    assert torch.equal(scatter[gather.long()], torch.arange(6, dtype=torch.int32))


@pytest.mark.parametrize("num_experts", [4099, 5611])
def test_every_id_in_its_own_bin(num_experts):
    counts, _ = get_routing_indices(torch.arange(num_experts).reshape(-1, 1), num_experts)
    assert bool((counts == 1).all())


def test_meta_ids_give_meta_results():
    ids = torch.empty(5, 2, dtype=torch.long, device="meta")
    out = get_routing_indices(ids, 8, return_scatter_indices=True)
    assert [(t.device.type, t.dtype, tuple(t.shape)) for t in out] == [
        ("meta", torch.int32, (8,)), ("meta", torch.int32, (10,)), ("meta", torch.int32, (10,)),
    ]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16, torch.uint8])
def test_any_integer_id_dtype(dtype):
    ids = torch.tensor([[2, 0], [1, 2], [2, 1]], dtype=dtype)
    counts, gather = get_routing_indices(ids, 4)
    assert counts.tolist() == [1, 2, 3, 0] and gather.tolist() == [1, 2, 5, 0, 3, 4]


def test_zero_tokens():
    counts, gather, scatter = get_routing_indices(torch.empty(0, 3, dtype=torch.long), 5, return_scatter_indices=True)
    assert counts.tolist() == [0] * 5 and gather.numel() == scatter.numel() == 0


@pytest.mark.parametrize("bad", [4, -1, 100])
def test_dense_router_scores_names_an_out_of_range_id(bad):
    ids = torch.tensor([[0, 1], [2, bad]])
    with pytest.raises(ValueError, match=rf"topk_ids holds {bad}, outside \[0, 4\)"):
        dense_router_scores(torch.rand(2, 2), ids, 4)


# ------------------------------------------------------------------ permutation and combine


def _routing(T=5, k=2, E=4):
    ids = torch.rand(T, E).topk(k, dim=-1).indices
    return get_routing_indices(ids, E)[1]


def test_nan_rows_stay_in_their_rows_through_permute_unpermute_combine():
    T, k, H = 5, 2, 3
    gather = _routing(T, k)
    X = torch.randn(T, H)
    X[1] = NAN
    X[3, 0] = INF
    Xp = permute(X, gather, k)
    token = gather.long() // k
    assert torch.equal(Xp[token != 1].isnan().any(-1), torch.zeros(int((token != 1).sum()), dtype=torch.bool))
    assert Xp[token == 1].isnan().all()
    flat = unpermute(Xp, gather)
    torch.testing.assert_close(flat.view(T, k, H), X[:, None].expand(T, k, H), equal_nan=True)
    weights = torch.rand(T, k)
    out = combine(flat, weights)
    torch.testing.assert_close(out, X * weights.sum(-1, keepdim=True), equal_nan=True)


def test_a_zero_weight_does_not_hide_a_nan():
    """0 * NaN is NaN: a slot whose weight is 0 still poisons its token if the expert returned NaN."""
    flat = torch.tensor([[1.0], [NAN]])
    assert combine(flat, torch.tensor([[1.0, 0.0]])).isnan().all()


# ------------------------------------------------------------------------- float64 SwiGLU


def test_swiglu_backward_is_float64_accurate():
    gate_up = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    d_h = torch.randn(7, 5, dtype=torch.float64)
    (want,) = torch.autograd.grad(swiglu(gate_up), gate_up, d_h)
    got = swiglu_backward(gate_up.detach(), d_h)
    assert got.dtype == torch.float64
    assert float((got - want).abs().max() / want.abs().max()) < 1e-14  # float32 math would give ~1e-8
