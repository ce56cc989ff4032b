"""Property tests: every public op on random shapes, routings, dtypes and memory layouts against float64.

The references below are written from the documented semantics, not from the package's
code: routing by sorting each row in Python, grouped GEMMs as one weight matrix per row,
the MoE as a sum over (token, slot) pairs of a SwiGLU expert. Inputs come in three
layouts besides contiguous (a column-major copy viewed back, every other element of a
wider buffer, every other row), because a kernel that assumes unit strides reads the
wrong elements of a view without failing. Tolerances are the Triton track's:
error norm <= ``TOL[dtype]`` x reference norm, against float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_learn
from moe_learn import (
    MoEBlock,
    calculate_topk,
    combine,
    fused_moe_experts,
    fused_moe_forward,
    get_routing_indices,
    load_balancing_loss,
    moe_experts,
    moe_experts_torch,
    moe_forward_torch,
    permute,
    swiglu,
    torch_grouped_gemm,
    torch_grouped_gemm_dw,
    unpermute,
)
from moe_learn.device import ON_GPU

# Written for CPU tensors through Triton's interpreter; on a GPU the same ops are checked by
# tests/kernels and tests/layers on the device (and perf/sanitize.py under compute-sanitizer).
pytestmark = pytest.mark.skipif(ON_GPU, reason="property tests of the CPU (interpreter) path")

TOL = {torch.float64: 1e-10, torch.float32: 5e-4, torch.float16: 2e-3}
FEW = settings(max_examples=20, deadline=None)
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "NUM_PROGRAMS": 2}
LAYOUTS = ("contiguous", "column_major", "strided", "row_strided")
layouts = st.sampled_from(LAYOUTS)


# --------------------------------------------------------------------------- inputs


def relayout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout (a view, never contiguous unless trivially so)."""
    if how == "contiguous" or t.ndim == 0:
        return t
    if how == "column_major" and t.ndim >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "row_strided" and t.ndim >= 2:
        buf = torch.zeros(*t.shape[:-2], 2 * t.shape[-2], t.shape[-1], dtype=t.dtype)
        buf[..., ::2, :] = t
        return buf[..., ::2, :]
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)  # every other element of a wider buffer
    buf[..., ::2] = t
    return buf[..., ::2]


@st.composite
def routings(draw, max_tokens=7, max_experts=6, min_tokens=0):
    """(topk_ids [T, k] int64, num_experts): distinct experts per token, sometimes only a few experts used."""
    num_tokens = draw(st.integers(min_tokens, max_tokens))
    num_experts = draw(st.integers(1, max_experts))
    top_k = draw(st.integers(1, num_experts))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    if draw(st.booleans()):  # skewed: the low experts take (almost) everything, the others stay empty
        scores += 10 * (torch.arange(num_experts) < top_k)
    return scores.topk(top_k, dim=-1).indices, num_experts


def randn(*shape, seed, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


seeds = st.integers(0, 2**31 - 1)


# ----------------------------------------------------------------------- references


def ref_order(ids: torch.Tensor, num_experts: int):
    """counts, gather, scatter by the definition: flat slots grouped by expert, in flat order inside each."""
    flat = ids.reshape(-1).tolist()
    gather = [f for e in range(num_experts) for f, x in enumerate(flat) if x == e]
    scatter = [0] * len(flat)
    for i, f in enumerate(gather):
        scatter[f] = i
    counts = [flat.count(e) for e in range(num_experts)]
    return torch.tensor(counts), torch.tensor(gather, dtype=torch.long), torch.tensor(scatter, dtype=torch.long)


def ref_topk(logits: torch.Tensor, k, use_sigmoid, renormalize, pre_act):
    """Each row sorted in Python: NaN first, then larger logits, then the lower expert id."""
    rows = logits.double()
    ids = []
    for row in rows.tolist():
        rank = [(not math.isnan(v), 0.0 if math.isnan(v) else -v, e) for e, v in enumerate(row)]
        ids.append([e for *_, e in sorted(rank)][:k])
    ids = torch.tensor(ids, dtype=torch.long).reshape(rows.shape[0], k)
    act = torch.sigmoid if use_sigmoid else (lambda x: torch.softmax(x, dim=-1))
    weights = act(rows).gather(1, ids) if pre_act else act(rows.gather(1, ids))
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def ref_grouped_gemm(X, W, m_sizes, gather=None, topk=1, permute_x=False, permute_y=False, weights=None,
                     transpose=True):
    W_nk = W.double() if transpose else W.double().transpose(1, 2)  # [E, N, K]
    expert_of_row = torch.repeat_interleave(torch.arange(W.shape[0]), m_sizes.long().cpu())
    rows = X.double()[gather.long() // topk] if permute_x else X.double()
    Y = torch.einsum("mk,mnk->mn", rows, W_nk[expert_of_row])
    if weights is not None:
        Y = Y * weights.double().reshape(-1)[gather.long()].unsqueeze(-1)
    if permute_y:
        out = torch.empty_like(Y)
        out[gather.long()] = Y
        return out
    return Y


def ref_moe(x, ids, w, W1, W2, transpose=True):
    """sum_j w_tj * W2_e (silu(gate) * up), e = ids[t, j], in float64 (differentiable)."""
    W1_nk = W1 if transpose else W1.transpose(1, 2)  # [E, 2I, H]
    W2_nk = W2 if transpose else W2.transpose(1, 2)  # [E, H, I]
    g = torch.einsum("th,tjnh->tjn", x, W1_nk[ids])
    gate, up = g.chunk(2, dim=-1)
    y = torch.einsum("tji,tjhi->tjh", F.silu(gate) * up, W2_nk[ids])
    return (w.unsqueeze(-1) * y).sum(1)


def assert_close_to(got, ref, dtype, what=""):
    """Non-finite entries where the reference has them (NaN with NaN, inf with inf); the rest within TOL."""
    got64 = got.detach().double().cpu()
    ref64 = ref.detach().double().cpu()
    assert got64.shape == ref64.shape, f"{what}: shape {tuple(got64.shape)} vs {tuple(ref64.shape)}"
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(got64), finite), f"{what}: non-finite entries differ"
    assert torch.equal(got64[~finite].isnan(), ref64[~finite].isnan()), f"{what}: NaN where inf (or back)"
    assert torch.equal(got64[~finite & ~ref64.isnan()], ref64[~finite & ~ref64.isnan()]), f"{what}: inf signs"
    # relative to the reference, or to entries of size 0.1 where it is (nearly) zero: inputs
    # are O(1), so a gradient that cancels to 0 (top-1 renormalized) is compared absolutely
    got64, ref64 = got64[finite], ref64[finite]
    err = (got64 - ref64).norm().item() / max(ref64.norm().item(), 0.1 * ref64.numel() ** 0.5, 1e-300)
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def assert_close_to_fp16(got, ref, base):
    """An fp16 MoE output: within TOL of the float64 ``ref``, plus twice what ``base`` loses.

    base: PyTorch's own fp16 computation of the same inputs (``moe_experts_torch``). fp16 rounds
    GEMM1's output, the SwiGLU and each slot's weighted output before the k slots are summed; where
    those cancel (routing weights of O(1) that do not sum to 1), any fp16 implementation loses more
    than TOL of a small result, and the reference in the same precision shows by how much.
    """
    assert got.shape == ref.shape and got.dtype == torch.float16
    assert torch.equal(got.isfinite(), ref.isfinite()), "non-finite entries differ"
    scale = max(ref.norm().item(), 0.1 * ref.numel() ** 0.5, 1e-300)  # no tokens: 0 / tiny = 0
    lost = ((base.double() - ref).norm() / scale).item()
    err = ((got.double() - ref).norm() / scale).item()
    assert err <= TOL[torch.float16] + 2 * lost, f"relative error {err:.2e} (the fp16 reference loses {lost:.2e})"


# ------------------------------------------------------------------ routing and permutation


@FEW
@given(routing=routings(max_experts=9), ids_layout=layouts, dtype=st.sampled_from([torch.int64, torch.int32]))
def test_get_routing_indices(routing, ids_layout, dtype):
    ids, E = routing
    counts, gather, scatter = get_routing_indices(relayout(ids.to(dtype), ids_layout), E, return_scatter_indices=True)
    want = ref_order(ids, E)
    for name, got, ref in zip(("counts", "gather", "scatter"), (counts, gather, scatter), want, strict=True):
        assert got.dtype == torch.int32 and torch.equal(got.long(), ref), name


SPECIALS = st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 2.5])


@st.composite
def logits_with_specials(draw, max_tokens=6, max_experts=9):
    T = draw(st.integers(0, max_tokens))
    E = draw(st.integers(1, max_experts))
    logits = randn(T, E, seed=draw(seeds), scale=3.0)
    for _ in range(draw(st.integers(0, 4)) if T else 0):  # a few special values, ties with each other
        logits[draw(st.integers(0, T - 1)), draw(st.integers(0, E - 1))] = draw(SPECIALS)
    if T and draw(st.booleans()):
        logits[draw(st.integers(0, T - 1))] = draw(SPECIALS)  # a constant row
    return logits, draw(st.integers(1, E))


@FEW
@given(case=logits_with_specials(), flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]), layout=layouts)
def test_calculate_topk(case, flags, dtype, layout):
    logits, k = case
    logits = logits.to(dtype)
    use_sigmoid, renormalize, pre_act = flags
    weights, ids = calculate_topk(relayout(logits, layout), k, use_sigmoid, renormalize, pre_act=pre_act,
                                  post_act=not pre_act)
    ref_w, ref_ids = ref_topk(logits, k, use_sigmoid, renormalize, pre_act)
    assert ids.dtype == torch.int64 and torch.equal(ids, ref_ids)
    assert weights.dtype == dtype
    assert_close_to(weights, ref_w, dtype if dtype != torch.float64 else torch.float32, "weights")


@FEW
@given(case=logits_with_specials(), flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
       dtype=st.sampled_from([torch.float32, torch.float16]), layout=layouts)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN and inf
def test_fused_routing(case, flags, dtype, layout):
    logits, k = case
    logits = logits.to(dtype)
    use_sigmoid, renormalize, pre_act = flags
    weights, ids, counts, gather, scatter = moe_learn.fused_routing(
        relayout(logits, layout), k, use_sigmoid=use_sigmoid, renormalize=renormalize, pre_act=pre_act
    )
    ref_w, ref_ids = ref_topk(logits, k, use_sigmoid, renormalize, pre_act)
    assert torch.equal(ids, ref_ids)
    for name, got, ref in zip(("counts", "gather", "scatter"), (counts, gather, scatter),
                              ref_order(ref_ids, logits.shape[1]), strict=True):
        assert torch.equal(got.long(), ref), name
    assert_close_to(weights, ref_w, dtype, "weights")


@FEW
@given(routing=routings(), H=st.integers(1, 5), seed=seeds, dtype=st.sampled_from([torch.float32, torch.float16,
       torch.float64]), x_layout=layouts, g_layout=layouts, w_layout=layouts)
def test_permute_unpermute_combine(routing, H, seed, dtype, x_layout, g_layout, w_layout):
    ids, E = routing
    T, k = ids.shape
    X = randn(T, H, seed=seed, dtype=dtype)
    weights = randn(T, k, seed=seed + 1, dtype=dtype).abs()
    _, gather, _ = ref_order(ids, E)
    gather32 = relayout(gather.to(torch.int32), g_layout)
    Xp = permute(relayout(X, x_layout), gather32, k)
    assert torch.equal(Xp, X[gather // k]), "permute moves rows, it never changes them"
    flat = unpermute(relayout(Xp, x_layout), gather32)
    assert torch.equal(flat, X.repeat_interleave(k, dim=0))
    out = combine(relayout(flat, x_layout), relayout(weights, w_layout))
    ref = (X.double().unsqueeze(1) * weights.double().unsqueeze(-1)).sum(1)
    assert out.dtype == dtype
    assert_close_to(out, ref, dtype, "combine")


# ------------------------------------------------------------------------ grouped GEMMs


@st.composite
def gemm_cases(draw, hopper=False):
    ids, E = draw(routings(max_tokens=6, max_experts=4))
    T, k = ids.shape
    N = draw(st.integers(1, 20))
    K = draw(st.sampled_from([8, 16, 24])) if hopper else draw(st.integers(1, 20))
    counts, gather, _ = ref_order(ids, E)
    return dict(T=T, k=k, E=E, N=N, K=K, counts=counts, gather=gather, seed=draw(seeds))


def _special(t, how, seed):
    """A NaN or an inf at one element: it must reach exactly the outputs that read it."""
    if how and t.numel():
        t = t.clone()
        t.view(-1)[seed % t.numel()] = float(how)
    return t


@FEW
@given(case=gemm_cases(), transpose=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16,
       torch.float64]), m_dtype=st.sampled_from([torch.int32, torch.int64]), x_layout=layouts, w_layout=layouts,
       special=st.sampled_from([None, "nan", "inf"]))
def test_torch_grouped_gemm(case, transpose, dtype, m_dtype, x_layout, w_layout, special):
    M, E, N, K = case["T"] * case["k"], case["E"], case["N"], case["K"]
    X = _special(randn(M, K, seed=case["seed"], dtype=dtype), special, case["seed"])
    W = randn(*((E, N, K) if transpose else (E, K, N)), seed=case["seed"] + 1, dtype=dtype)
    got = torch_grouped_gemm(relayout(X, x_layout), relayout(W, w_layout), case["counts"].to(m_dtype),
                             transpose=transpose)
    assert got.dtype == dtype
    assert_close_to(got, ref_grouped_gemm(X, W, case["counts"], transpose=transpose), dtype)


FLAGS = [  # (permute_x, permute_y, weighted)
    (False, False, False), (True, False, False), (False, True, False), (False, True, True), (True, True, False),
    (True, True, True),
]


@FEW
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN and inf
@given(case=gemm_cases(), flags=st.sampled_from(FLAGS), transpose=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), m_dtype=st.sampled_from([torch.int32, torch.int64]),
       x_layout=layouts, w_layout=layouts, g_layout=layouts, config=st.sampled_from([None, SMALL_TILES]),
       special=st.sampled_from([None, "nan", "inf"]))
def test_grouped_gemm_portable(case, flags, transpose, dtype, m_dtype, x_layout, w_layout, g_layout, config, special):
    _check_grouped_gemm(case, flags, transpose, dtype, m_dtype, x_layout, w_layout, g_layout, config, special,
                        "portable")


HOPPER_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2, "NUM_PROGRAMS": 3}


@settings(max_examples=15, deadline=None)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@given(case=gemm_cases(hopper=True), flags=st.sampled_from(FLAGS), dtype=st.sampled_from([torch.float32,
       torch.float16]), x_layout=st.sampled_from(["contiguous", "row_strided"]), special=st.sampled_from([None, "nan"]))
def test_grouped_gemm_hopper(case, flags, dtype, x_layout, special):
    _check_grouped_gemm(case, flags, True, dtype, torch.int32, x_layout, "contiguous", "contiguous", HOPPER_TILES,
                        special, "hopper")


@pytest.mark.parametrize("flags", [(True, False, False), (False, True, False)])
def test_grouped_gemm_hopper_reads_a_strided_gather(flags):
    ids = torch.tensor([[1, 0], [0, 2], [2, 1]])
    counts, gather, _ = ref_order(ids, 3)
    case = dict(T=3, k=2, E=3, N=16, K=16, counts=counts, gather=gather, seed=3)
    _check_grouped_gemm(case, flags, True, torch.float32, torch.int32, "contiguous", "contiguous", "strided",
                        HOPPER_TILES, None, "hopper")


def _check_grouped_gemm(case, flags, transpose, dtype, m_dtype, x_layout, w_layout, g_layout, config, special,
                        kernel):
    permute_x, permute_y, weighted = flags
    T, k, E, N, K, seed = case["T"], case["k"], case["E"], case["N"], case["K"], case["seed"]
    X = _special(randn(T if permute_x else T * k, K, seed=seed, dtype=dtype), special, seed)
    W = randn(*((E, N, K) if transpose else (E, K, N)), seed=seed + 1, dtype=dtype, scale=K**-0.5)
    weights = randn(T, k, seed=seed + 2, dtype=dtype).abs() if weighted else None
    gather = case["gather"].to(torch.int32)
    got = moe_learn.grouped_gemm(
        relayout(X, x_layout), relayout(W, w_layout), case["counts"].to(m_dtype),
        gather_indices=relayout(gather, g_layout) if (permute_x or permute_y) else None, topk=k,
        permute_x=permute_x, permute_y=permute_y, topk_weights=weights, transpose=transpose, config=config,
        kernel=kernel,
    )
    ref = ref_grouped_gemm(X, W, case["counts"], gather, k, permute_x, permute_y, weights, transpose)
    assert got.dtype == dtype
    assert_close_to(got, ref, dtype, f"{kernel} {flags}")


@FEW
@given(case=gemm_cases(), permute_x=st.booleans(), transpose=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), x_layout=layouts, dy_layout=layouts,
       triton=st.booleans())
def test_grouped_gemm_dw(case, permute_x, transpose, dtype, x_layout, dy_layout, triton):
    T, k, E, N, K, seed = case["T"], case["k"], case["E"], case["N"], case["K"], case["seed"]
    if not triton:
        dtype = torch.float64 if dtype == torch.float16 else dtype  # the torch reference takes any float
    M = T * k
    X = randn(T if permute_x else M, K, seed=seed, dtype=dtype)
    dY = randn(M, N, seed=seed + 1, dtype=dtype)
    gather = case["gather"].to(torch.int32)
    fn = moe_learn.grouped_gemm_dw if triton else torch_grouped_gemm_dw
    got = fn(relayout(X, x_layout), relayout(dY, dy_layout), case["counts"], topk=k, permute_x=permute_x,
             gather_indices=gather if permute_x else None, transpose=transpose)
    rows = X.double()[gather.long() // k] if permute_x else X.double()
    ref = torch.zeros(E, N, K, dtype=torch.float64)
    start = 0
    for e, m in enumerate(case["counts"].tolist()):
        ref[e] = dY.double()[start : start + m].T @ rows[start : start + m]
        start += m
    assert got.dtype == dtype
    assert_close_to(got, ref if transpose else ref.transpose(1, 2), dtype)


# ------------------------------------------------------------------------------ the MoE


@st.composite
def moe_cases(draw, dtypes=(torch.float32,), max_tokens=6):
    ids, E = draw(routings(max_tokens=max_tokens, max_experts=4))
    T, k = ids.shape
    H = draw(st.integers(1, 12))
    inter = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(seeds)
    x = randn(T, H, seed=seed, dtype=dtype)
    w = randn(T, k, seed=seed + 1, dtype=dtype).abs()
    W1 = randn(E, 2 * inter, H, seed=seed + 2, dtype=dtype, scale=H**-0.5)
    W2 = randn(E, H, inter, seed=seed + 3, dtype=dtype, scale=inter**-0.5)
    return ids, x, w, W1, W2, dtype


def _grads(out, inputs, d_out):
    return list(torch.autograd.grad(out, inputs, d_out.to(out.dtype), allow_unused=True))


@FEW
@given(case=moe_cases(dtypes=(torch.float32, torch.float64)), layout=layouts, ids_layout=layouts)
def test_moe_experts_torch(case, layout, ids_layout):
    ids, x, w, W1, W2, dtype = case
    got = moe_experts_torch(relayout(x, layout), relayout(ids, ids_layout), relayout(w, layout), relayout(W1, layout),
                            relayout(W2, layout))
    assert got.dtype == dtype
    assert_close_to(got, ref_moe(x.double(), ids, w.double(), W1.double(), W2.double()), dtype)


@FEW
@given(case=moe_cases(dtypes=(torch.float32, torch.float64)), backend=st.sampled_from(["torch", "triton"]),
       transpose=st.booleans(), layout=layouts)
def test_moe_experts_forward_and_gradients(case, backend, transpose, layout):
    ids, x, w, W1, W2, dtype = case
    if backend == "triton" and dtype == torch.float64:
        dtype = torch.float32  # the kernels take float32/16 and bf16
        x, w, W1, W2 = (t.float() for t in (x, w, W1, W2))
    if not transpose:  # Llama 4's storage: [E, H, 2I] and [E, I, H]
        W1, W2 = W1.transpose(1, 2).contiguous(), W2.transpose(1, 2).contiguous()
    inputs = [t.detach().clone().requires_grad_() for t in (x, w, W1, W2)]
    out = moe_experts(*(relayout(t, layout) for t in inputs[:1]), ids, *(relayout(t, layout) for t in inputs[1:]),
                      transpose=transpose, backend=backend)
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, w, W1, W2)]
    ref = ref_moe(ref_inputs[0], ids, *ref_inputs[1:], transpose=transpose)
    assert out.dtype == dtype
    assert_close_to(out, ref, dtype, "output")
    if ids.shape[0] == 0:
        return  # zero tokens: see test_zero_tokens_still_give_every_input_a_gradient
    d_out = randn(*ref.shape, seed=7, dtype=torch.float64)
    got_grads = _grads(out, inputs, d_out)
    ref_grads = _grads(ref, ref_inputs, d_out)
    for name, g, r in zip(("d_hidden", "d_topk_weights", "d_gate_up", "d_down"), got_grads, ref_grads, strict=True):
        assert g is not None and g.dtype == dtype, name
        assert_close_to(g, r, dtype, name)


@FEW
@given(case=moe_cases(dtypes=(torch.float32, torch.float16)), layout=layouts, config=st.sampled_from([None,
       SMALL_TILES]))
def test_fused_moe_experts(case, layout, config):
    ids, x, w, W1, W2, dtype = case
    got = fused_moe_experts(relayout(x, layout), ids, relayout(w, layout), relayout(W1, layout), relayout(W2, layout),
                            config=config)
    assert got.dtype == dtype
    ref = ref_moe(x.double(), ids, w.double(), W1.double(), W2.double())
    if dtype == torch.float16:
        assert_close_to_fp16(got, ref, moe_experts_torch(x, ids, w, W1, W2))
    else:
        assert_close_to(got, ref, dtype)


@st.composite
def moe_forward_cases(draw, dtypes=(torch.float32,)):
    T = draw(st.integers(0, 6))
    E = draw(st.integers(1, 5))
    k = draw(st.integers(1, E))
    H, inter = draw(st.integers(1, 12)), draw(st.integers(1, 8))
    dtype, seed = draw(st.sampled_from(dtypes)), draw(seeds)
    x = randn(T, H, seed=seed, dtype=dtype)
    router = randn(E, H, seed=seed + 1, dtype=dtype)
    W1 = randn(E, 2 * inter, H, seed=seed + 2, dtype=dtype, scale=H**-0.5)
    W2 = randn(E, H, inter, seed=seed + 3, dtype=dtype, scale=inter**-0.5)
    return x, router, W1, W2, k, dtype


@FEW
@given(case=moe_forward_cases(dtypes=(torch.float32, torch.float16)), flags=st.tuples(st.booleans(), st.booleans(),
       st.booleans()), layout=layouts, batched=st.booleans())
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fused_moe_forward(case, flags, layout, batched):
    x, router, W1, W2, k, dtype = case
    use_sigmoid, renormalize, pre_act = flags
    hidden = relayout(x, layout)
    got = fused_moe_forward(hidden.unsqueeze(0) if batched else hidden, relayout(router, layout), W1, W2, k,
                            renormalize=renormalize, use_sigmoid=use_sigmoid, pre_act=pre_act)
    logits = x @ router.T  # the router matmul, computed as the op computes it
    weights, ids = ref_topk(logits, k, use_sigmoid, renormalize, pre_act)
    ref = ref_moe(x.double(), ids, weights.to(dtype).double(), W1.double(), W2.double())
    assert got.shape == ((1, *x.shape) if batched else x.shape) and got.dtype == dtype
    if dtype == torch.float16:
        assert_close_to_fp16(got.reshape(x.shape), ref, moe_experts_torch(x, ids, weights.to(dtype), W1, W2))
    else:
        assert_close_to(got.reshape(x.shape), ref, dtype)


@FEW
@given(case=moe_forward_cases(dtypes=(torch.float32, torch.float64)), renormalize=st.booleans(), layout=layouts)
def test_moe_forward_torch(case, renormalize, layout):
    x, router, W1, W2, k, dtype = case
    got = moe_forward_torch(relayout(x, layout), relayout(router, layout), W1, W2, k, renormalize=renormalize)
    weights, ids = ref_topk((x @ router.T).float(), k, False, renormalize, True)
    ref = ref_moe(x.double(), ids, weights.float().double(), W1.double(), W2.double())
    assert got.dtype == dtype
    assert_close_to(got, ref, torch.float32)  # routing weights in float32, by design (as transformers)


@FEW
@given(shape=st.tuples(st.integers(0, 4), st.integers(1, 6)), seed=seeds, layout=layouts,
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]))
def test_swiglu(shape, seed, layout, dtype):
    gate_up = randn(shape[0], 2 * shape[1], seed=seed, dtype=dtype)
    got = swiglu(relayout(gate_up, layout))
    g, u = gate_up.double().chunk(2, dim=-1)
    assert_close_to(got, g * torch.sigmoid(g) * u, dtype)


# ------------------------------------------------------------------------------ the blocks


@FEW
@given(T=st.integers(0, 6), E=st.integers(1, 4), data=st.data(), routing=st.sampled_from(["softmax", "sigmoid"]),
       renormalize=st.booleans(), backend=st.sampled_from(["torch", "triton"]), layout=layouts, seed=seeds,
       batched=st.booleans())
def test_blocks_forward_and_gradients(T, E, data, routing, renormalize, backend, layout, seed, batched):
    k = data.draw(st.integers(1, E))
    H, inter = data.draw(st.integers(1, 10)), data.draw(st.integers(1, 6))
    torch.manual_seed(seed)
    block = MoEBlock(H, inter, E, k, routing=routing, renormalize=renormalize, backend=backend)
    x = randn(T, H, seed=seed).requires_grad_()
    out = block(relayout(x, layout).unsqueeze(0) if batched else relayout(x, layout))
    assert out.shape == ((1, T, H) if batched else (T, H)) and out.dtype == torch.float32

    params = [block.router.weight, block.gate_up_proj, block.down_proj]
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref_x = x.detach().double().requires_grad_()
    logits = ref_x @ ref_params[0].T
    # which experts: the block's float32 logits, ranked as documented (float64 would rank near-ties differently)
    _, ids = ref_topk((x.detach() @ block.router.weight.detach().T), k, routing == "sigmoid", False,
                      routing == "softmax")
    if routing == "softmax":
        weights = torch.softmax(logits, -1).gather(1, ids)
        if renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
    else:  # top-k on the logits, a sigmoid of the k: never renormalized
        weights = torch.sigmoid(logits.gather(1, ids))
    ref = ref_moe(ref_x, ids, weights, ref_params[1], ref_params[2])
    assert_close_to(out.reshape(T, H), ref, torch.float32, "output")
    if T:  # zero tokens: see test_zero_tokens_still_give_every_input_a_gradient
        d_out = randn(T, H, seed=seed + 9, dtype=torch.float64)
        got_grads = _grads(out.reshape(T, H), [x, *params], d_out)
        ref_grads = _grads(ref, [ref_x, *ref_params], d_out)
        for name, g, r in zip(("d_hidden", "d_router", "d_gate_up", "d_down"), got_grads, ref_grads, strict=True):
            assert g is not None, name
            assert_close_to(g, r, torch.float32, name)

    loss = load_balancing_loss(block.router_logits, block.topk_ids, E)
    probs = torch.softmax(block.router_logits.detach().double(), -1)
    fraction = torch.bincount(block.topk_ids.reshape(-1), minlength=E).double() / max(T * k, 1)
    assert_close_to(loss.detach(), E * (fraction * probs.mean(0)).sum(), torch.float32, "load_balancing_loss")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_tokens_still_give_every_input_a_gradient(backend):
    block = MoEBlock(8, 4, 4, 2, backend=backend)
    block(torch.randn(0, 8)).sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in block.parameters())


@pytest.mark.parametrize("transpose", [True, False])
def test_float64_on_the_triton_backend_runs_the_reference_gemms(transpose):
    """The Triton kernels take float32/16/bf16: a float64 model gets the PyTorch GEMMs, float64-accurate."""
    ids = torch.tensor([[0, 2], [1, 0], [2, 1]])
    x, w = randn(3, 6, seed=1, dtype=torch.float64), randn(3, 2, seed=2, dtype=torch.float64).abs()
    W1, W2 = randn(3, 8, 6, seed=3, dtype=torch.float64), randn(3, 6, 4, seed=4, dtype=torch.float64)
    if not transpose:
        W1, W2 = W1.transpose(1, 2).contiguous(), W2.transpose(1, 2).contiguous()
    got = moe_experts(x, ids, w, W1, W2, transpose=transpose, backend="triton")
    ref = ref_moe(x, ids, w, W1, W2, transpose=transpose)
    assert got.dtype == torch.float64 and float((got - ref).norm() / ref.norm()) < 1e-12


def test_fused_moe_forward_in_float64():
    x, router = randn(5, 6, seed=1, dtype=torch.float64), randn(3, 6, seed=2, dtype=torch.float64)
    W1, W2 = randn(3, 8, 6, seed=3, dtype=torch.float64), randn(3, 6, 4, seed=4, dtype=torch.float64)
    got = moe_learn.fused_moe_forward(x, router, W1, W2, 2)
    ref = moe_learn.moe_forward_torch(x, router, W1, W2, 2)  # routes in float32, as transformers does
    assert got.dtype == torch.float64 and float((got - ref).norm() / ref.norm()) < 1e-6


@pytest.mark.parametrize("transpose", [True, False])
def test_float64_backward_is_float64_accurate(transpose):
    """Issue 13 item 7: the torch backend's SwiGLU backward and routing-weight gradient ran in float32 (~1e-7)."""
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
    x, w = randn(5, 6, seed=1, dtype=torch.float64), randn(5, 2, seed=2, dtype=torch.float64).abs()
    W1, W2 = randn(3, 8, 6, seed=3, dtype=torch.float64), randn(3, 6, 4, seed=4, dtype=torch.float64)
    if not transpose:
        W1, W2 = W1.transpose(1, 2).contiguous(), W2.transpose(1, 2).contiguous()
    inputs = [t.clone().requires_grad_() for t in (x, w, W1, W2)]
    ref_inputs = [t.clone().requires_grad_() for t in (x, w, W1, W2)]
    out = moe_experts(inputs[0], ids, *inputs[1:], transpose=transpose, backend="torch")
    ref = ref_moe(ref_inputs[0], ids, *ref_inputs[1:], transpose=transpose)
    d_out = randn(5, 6, seed=5, dtype=torch.float64)
    for name, g, r in zip(("d_hidden", "d_topk_weights", "d_gate_up", "d_down"), _grads(out, inputs, d_out),
                          _grads(ref, ref_inputs, d_out), strict=True):
        assert float((g - r).norm() / r.norm()) < 1e-12, name
