"""Training's weighted SwiGLU kernels (kernels/swiglu.py) against float64 references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_learn import get_routing_indices
from moe_learn.device import DEVICE, ON_GPU
from moe_learn.kernels import grouped_gemm_hopper as hopper
from moe_learn.kernels import swiglu as swiglu_kernels
from moe_learn.kernels.swiglu import weighted_swiglu, weighted_swiglu_backward
from moe_learn.ops import moe as ref
from moe_learn.ops.grouped_gemm import torch_grouped_gemm
from moe_learn.ops.permutation import permute

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _problem(tokens, top_k, inner, dtype, seed, drop=0):
    """gate_up [M, 2I] (M = T*k rows in a random expert order), weights [T, k], gather (a permutation)."""
    g = torch.Generator().manual_seed(seed)
    M = tokens * top_k
    gate_up = (torch.randn(M, 2 * inner, generator=g) * 3).to(DEVICE, dtype)
    weights = torch.rand(tokens, top_k, generator=g).to(DEVICE)
    gather = torch.randperm(M, generator=g).to(DEVICE, torch.int32)
    d_h = torch.randn(M, inner, generator=g).to(DEVICE, dtype)
    return gate_up, weights, gather, d_h


def _rel(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.isfinite(got).all(), "non-finite values where the reference has none"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _references(gate_up, weights, gather, d_h):
    rows = weights.reshape(-1).double()[gather.long()]
    h = ref.weighted_swiglu(gate_up.double(), rows)
    d_gate_up, d_rows, h_again = ref.weighted_swiglu_backward(gate_up.double(), rows, d_h.double())
    d_w = torch.zeros(weights.numel(), dtype=torch.float64, device=gate_up.device).index_copy_(0, gather.long(), d_rows)
    return h, d_gate_up, d_w.view(weights.shape), h_again


@settings(max_examples=12, deadline=None)
@given(tokens=st.integers(0, 9), top_k=st.integers(1, 4), inner=st.sampled_from([1, 7, 16, 33, 600]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_forward_and_backward_match_float64(tokens, top_k, inner, dtype, seed):
    gate_up, weights, gather, d_h = _problem(tokens, top_k, inner, dtype, seed)
    h_ref, d_gate_up_ref, d_w_ref, _ = _references(gate_up, weights, gather, d_h)
    h = weighted_swiglu(gate_up, weights, gather)
    d_gate_up, d_w, h_again = weighted_swiglu_backward(gate_up, weights, gather, d_h)
    assert h.shape == h_again.shape == (tokens * top_k, inner) and h.dtype == h_again.dtype == dtype
    assert d_gate_up.shape == gate_up.shape and d_gate_up.dtype == dtype
    assert d_w.shape == weights.shape and d_w.dtype == torch.float32
    if tokens == 0:
        return
    tol = TOL[dtype]
    assert _rel(h, h_ref) < tol
    assert _rel(h_again, h_ref) < tol
    assert _rel(d_gate_up, d_gate_up_ref) < tol
    assert _rel(d_w, d_w_ref) < tol


def test_autograd_through_the_op_matches_the_reference():
    gate_up, weights, gather, _ = _problem(5, 2, 20, torch.float32, 1)
    gate_up.requires_grad_(True)
    weights.requires_grad_(True)
    h = weighted_swiglu(gate_up, weights, gather)
    assert h.grad_fn is not None
    d_h = torch.randn_like(h)
    got = torch.autograd.grad(h, (gate_up, weights), d_h)
    g64, w64 = gate_up.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    want = torch.autograd.grad(ref.weighted_swiglu(g64, w64.reshape(-1)[gather.long()]), (g64, w64), d_h.double())
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) < 1e-5


def test_the_backward_refuses_to_drop_a_gradient():
    gate_up, weights, gather, d_h = _problem(2, 2, 8, torch.float32, 7)
    with pytest.raises(ValueError, match="not differentiable"):
        weighted_swiglu_backward(gate_up.requires_grad_(), weights, gather, d_h)
    with torch.no_grad():
        weighted_swiglu_backward(gate_up, weights, gather, d_h)


def test_opcheck():
    gate_up, weights, gather, d_h = _problem(4, 2, 24, torch.float32, 2)
    torch.library.opcheck(torch.ops.moe_learn.weighted_swiglu.default, (gate_up, weights, gather))
    torch.library.opcheck(torch.ops.moe_learn.weighted_swiglu_backward.default, (gate_up, weights, gather, d_h),
                          test_utils=("test_schema", "test_faketensor"))


def test_special_values_stay_in_their_row():
    gate_up, weights, gather, d_h = _problem(3, 2, 40, torch.float32, 3)
    gate_up[1, 5] = float("nan")
    gate_up[2, 50] = float("inf")  # an up value: inf * silu(gate) in that row only
    h_ref, d_gate_up_ref, d_w_ref, _ = _references(gate_up, weights, gather, d_h)
    h = weighted_swiglu(gate_up, weights, gather)
    d_gate_up, d_w, _ = weighted_swiglu_backward(gate_up, weights, gather, d_h)
    torch.testing.assert_close(h.double(), h_ref, equal_nan=True, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_gate_up.double(), d_gate_up_ref, equal_nan=True, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_w.double(), d_w_ref, equal_nan=True, rtol=1e-5, atol=1e-6)
    clean = [r for r in range(6) if r not in (1, 2)]
    assert torch.isfinite(h[clean]).all() and torch.isfinite(d_gate_up[clean]).all()


def test_gather_index_out_of_range_drops_its_row():
    gate_up, weights, gather, d_h = _problem(3, 2, 8, torch.float32, 4)
    dropped = int(gather[0])
    bad = gather.clone()
    bad[0] = 10**6
    h = weighted_swiglu(gate_up, weights, bad)
    d_gate_up, d_w, _ = weighted_swiglu_backward(gate_up, weights, bad, d_h)
    assert (h[0] == 0).all() and (d_gate_up[0] == 0).all()
    assert d_w.reshape(-1)[dropped] == 0  # no row names that slot any more
    h_ok = weighted_swiglu(gate_up, weights, gather)
    torch.testing.assert_close(h[1:], h_ok[1:])


def test_non_contiguous_inputs():
    gate_up, weights, gather, d_h = _problem(4, 3, 12, torch.float32, 5)
    wide = torch.zeros(gate_up.shape[0], gate_up.shape[1] * 2, device=DEVICE)
    wide[:, ::2] = gate_up
    strided_weights = torch.zeros(4, 6, device=DEVICE)[:, ::2].copy_(weights)
    torch.testing.assert_close(weighted_swiglu(wide[:, ::2], strided_weights, gather),
                               weighted_swiglu(gate_up, weights, gather))
    torch.testing.assert_close(weighted_swiglu_backward(gate_up, weights, gather, d_h.t().contiguous().t()),
                               weighted_swiglu_backward(gate_up, weights, gather, d_h))


@pytest.mark.parametrize("call, match", [
    (lambda g, w, i, d: weighted_swiglu(g[:, :-1], w, i), "even number of columns"),
    (lambda g, w, i, d: weighted_swiglu(g, w, i[:-1]), "gather_indices has"),
    (lambda g, w, i, d: weighted_swiglu(g, w, i.float()), "gather_indices"),
    (lambda g, w, i, d: weighted_swiglu_backward(g, w, i, d[:, :-1]), "d_h has shape"),
    (lambda g, w, i, d: weighted_swiglu(g[0], w, i), "gate_up"),
    (lambda g, w, i, d: weighted_swiglu(g.double(), w, i), "gate_up.*float64"),
])
def test_bad_arguments_name_the_argument(call, match):
    gate_up, weights, gather, d_h = _problem(3, 2, 8, torch.float32, 6)
    with pytest.raises((ValueError, TypeError), match=match):
        call(gate_up, weights, gather, d_h)


@pytest.mark.parametrize("call", ["weighted_swiglu", "weighted_swiglu_backward", "route_ids", "fused_routing",
                                  "grouped_gemm"])
def test_cpu_tensors_on_a_gpu_machine_are_refused_by_name(call, monkeypatch):
    """On a machine with CUDA the kernels would get host pointers: each public kernel refuses, naming itself.
    (Without CUDA the interpreter is switched off for the test: the check runs before any launch.)"""
    import moe_learn
    from moe_learn.kernels import swiglu
    from moe_learn.kernels.route_ids import route_ids

    monkeypatch.setattr(moe_learn.device, "INTERPRETER", False)

    gate_up, weights, gather = torch.rand(4, 6), torch.rand(2, 2), torch.arange(4)
    calls = {
        "weighted_swiglu": lambda: swiglu.weighted_swiglu(gate_up, weights, gather),
        "weighted_swiglu_backward": lambda: swiglu.weighted_swiglu_backward(gate_up, weights, gather, torch.rand(4, 3)),
        "route_ids": lambda: route_ids(torch.zeros(2, 2, dtype=torch.long), weights, 4),
        "fused_routing": lambda: moe_learn.fused_routing(torch.rand(4, 8), 2),
        "grouped_gemm": lambda: moe_learn.grouped_gemm(torch.rand(4, 8), torch.rand(2, 3, 8),
                                                       torch.tensor([2, 2]), validate=False),
    }
    with pytest.raises(RuntimeError, match=f"{call} got CPU"):
        calls[call]()


# ---------------------------------------------------------------------------------------
# Fused into the GEMMs' epilogues (the Hopper kernel; under the interpreter on the CPU)
# ---------------------------------------------------------------------------------------

# fp32 on a GPU would run the Hopper kernel's dots in tf32
FUSED_DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float32, torch.float16]
FUSED_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# tiny tiles: ragged row blocks, I not a multiple of BLOCK_N, several K steps, programs taking several tiles
TINY = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2, "NUM_PROGRAMS": 3}


def _moe_problem(tokens, experts, top_k, hidden, inner, dtype, seed, skew=False):
    """Routing, token-order x and d_out, both weights in the forward's [E, N, K] layout (float64 copies too)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=g)
    if skew:  # the low experts take every token, the others stay empty
        scores += 10 * (torch.arange(experts) < top_k)
    counts, gather = get_routing_indices(scores.topk(top_k, dim=1).indices, experts)
    x = torch.randn(tokens, hidden, generator=g)
    d_out = torch.randn(tokens, hidden, generator=g)
    weights = torch.rand(tokens, top_k, generator=g)
    w1 = torch.randn(experts, 2 * inner, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(experts, hidden, inner, generator=g) / inner**0.5
    run = [t.to(DEVICE, dtype) for t in (x, d_out, w1, w2)]
    return counts.to(DEVICE), gather.to(DEVICE), weights.to(DEVICE), run, [t.double() for t in (x, d_out, w1, w2)]


def _fused_references(counts, gather, weights, gate_up, inputs64):
    """GEMM1 from float64 inputs; the backward from the kernel's own gate_up (what the layer keeps), in float64."""
    x, d_out, w1, w2 = inputs64
    top_k = weights.shape[1]
    gate_up_ref = torch_grouped_gemm(permute(x, gather.cpu(), top_k), w1, counts.cpu())
    rows = weights.reshape(-1).double().cpu()[gather.long().cpu()]
    h_ref = ref.weighted_swiglu(gate_up_ref, rows)
    d_h = torch_grouped_gemm(permute(d_out, gather.cpu(), top_k), w2.transpose(1, 2), counts.cpu())
    d_gate_up, d_rows, h_again = ref.weighted_swiglu_backward(gate_up.double().cpu(), rows, d_h)
    d_w = torch.zeros(weights.numel(), dtype=torch.float64).index_copy_(0, gather.long().cpu(), d_rows)
    # d_w[slot] = <d_h_r, s_r> sums I products that can cancel: its rounding error scales with the sum of
    # their magnitudes, not with the result (one token, top-1: a single, possibly tiny, dot product)
    gate, up = gate_up.double().cpu().chunk(2, dim=-1)
    magnitudes = (d_h * torch.nn.functional.silu(gate) * up).abs().sum(-1)
    d_w_scale = torch.zeros(weights.numel(), dtype=torch.float64).index_copy_(0, gather.long().cpu(), magnitudes)
    return gate_up_ref, h_ref, d_gate_up, d_w.view(weights.shape), d_w_scale.view(weights.shape), h_again


def _layouts(w1, w2, transpose):
    """The weights as the layer gets them (transpose=False: Llama 4's [E, H, 2I] / [E, I, H])."""
    return (w1, w2) if transpose else (w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous())


@settings(max_examples=10, deadline=None)
@given(tokens=st.integers(1, 9), experts=st.integers(1, 5), data=st.data(), hidden=st.sampled_from([16, 40]),
       inner=st.sampled_from([8, 24, 40]), transpose=st.booleans(), dtype=st.sampled_from(FUSED_DTYPES),
       skew=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_gemm_swiglu_match_float64(tokens, experts, data, hidden, inner, transpose, dtype, skew, seed):
    """GEMM1 + weighted SwiGLU, and GEMM2's dX + its backward, each one Hopper launch: every output against
    float64, with ragged experts, empty ones (skew), k = E, and I and H that are not multiples of the tiles."""
    top_k = data.draw(st.integers(1, experts))
    counts, gather, weights, (x, d_out, w1, w2), inputs64 = _moe_problem(tokens, experts, top_k, hidden, inner,
                                                                         dtype, seed, skew)
    w1_run, w2_run = _layouts(w1, w2, transpose)
    gate_up, h = swiglu_kernels.gemm_weighted_swiglu(x, w1_run, counts, gather, weights, topk=top_k,
                                                     transpose=transpose, config=TINY, kernel="hopper")
    d_gate_up, d_w, h_again = swiglu_kernels.gemm_swiglu_backward(
        d_out, w2_run, counts, gather, gate_up, weights, topk=top_k, transpose=not transpose, config=TINY,
        kernel="hopper")
    gate_up_ref, h_ref, d_gate_up_ref, d_w_ref, d_w_scale, h_again_ref = _fused_references(
        counts, gather, weights, gate_up, inputs64)
    tol = FUSED_TOL[dtype]
    assert gate_up.dtype == h.dtype == d_gate_up.dtype == h_again.dtype == dtype and d_w.dtype == torch.float32
    assert d_w.shape == weights.shape and h.shape == h_again.shape == (tokens * top_k, inner)
    for name, got, want in (("gate_up", gate_up, gate_up_ref), ("h", h, h_ref), ("d_gate_up", d_gate_up, d_gate_up_ref),
                            ("h (backward)", h_again, h_again_ref)):
        assert _rel(got, want) < tol, name
    assert torch.isfinite(d_w).all()
    d_w_err = (d_w.double().cpu() - d_w_ref).norm().item()
    assert d_w_err < tol * d_w_scale.norm().item(), f"d_topk_weights: error {d_w_err:.2e}"


@pytest.mark.parametrize("transpose", [True, False])
def test_fused_and_unfused_paths_agree(transpose, monkeypatch):
    """The A/B switch (and every path the fused kernel does not take) runs the GEMM, then the kernels above."""
    monkeypatch.setenv("MOE_LEARN_AUTOTUNE", "0")  # untuned: "fused" stays fused on a GPU too
    counts, gather, weights, (x, d_out, w1, w2), _ = _moe_problem(7, 4, 2, 40, 24, FUSED_DTYPES[0], 11)
    w1_run, w2_run = _layouts(w1, w2, transpose)

    def both():
        gate_up, h = swiglu_kernels.gemm_weighted_swiglu(x, w1_run, counts, gather, weights, topk=2,
                                                         transpose=transpose, kernel="hopper")
        return (gate_up, h, *swiglu_kernels.gemm_swiglu_backward(d_out, w2_run, counts, gather, gate_up, weights,
                                                                 topk=2, transpose=not transpose, kernel="hopper"))

    fused = both()
    monkeypatch.setattr(swiglu_kernels, "FUSED", False)
    for a, b in zip(fused, both(), strict=True):
        assert _rel(a, b) < FUSED_TOL[FUSED_DTYPES[0]]


def test_fused_epilogues_write_every_output_element():
    """Outputs poisoned with NaN: the kernel itself must write each row of h, gate_up, d_gate_up and each
    (column block, slot) partial of d_topk_weights, including rows of the ragged last tile."""
    dtype = FUSED_DTYPES[0]
    counts, gather, weights, (x, d_out, w1, w2), _ = _moe_problem(9, 4, 3, 40, 40, dtype, 5)
    M, inner = 27, 40
    nan = float("nan")
    gate_up, h = torch.full((M, 2 * inner), nan, dtype=dtype, device=DEVICE), torch.full((M, inner), nan,
                                                                                          dtype=dtype, device=DEVICE)
    hopper.grouped_gemm_hopper(x, w1, counts, h, gather_indices=gather, topk=3, permute_x=True, topk_weights=weights,
                               config=TINY, swiglu="save", gate_up=gate_up)
    assert gate_up.isfinite().all() and h.isfinite().all()
    d_gate_up, h2 = torch.full_like(gate_up, nan), torch.full_like(h, nan)
    d_w = torch.full((M,), nan, device=DEVICE)
    hopper.grouped_gemm_hopper(d_out, w2, counts, h2, gather_indices=gather, topk=3, permute_x=True,
                               topk_weights=weights, transpose=False, config=TINY, swiglu="backward", gate_up=gate_up,
                               d_gate_up=d_gate_up, d_weights=d_w)
    assert d_gate_up.isfinite().all() and h2.isfinite().all() and d_w.isfinite().all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_fused_special_values_stay_in_their_row_and_expert():
    """NaN in one gate_up row poisons that row's d_gate_up, h and its slot's d_w only; inf in expert 1's
    down_proj poisons only expert 1's rows (no tile reads another expert's weights)."""
    dtype = FUSED_DTYPES[0]
    counts, gather, weights, (x, d_out, w1, w2), _ = _moe_problem(6, 3, 2, 16, 24, dtype, 9)
    gate_up, _ = swiglu_kernels.gemm_weighted_swiglu(x, w1, counts, gather, weights, topk=2, config=TINY,
                                                     kernel="hopper")
    gate_up[4, 3] = float("nan")
    d_gate_up, d_w, h = swiglu_kernels.gemm_swiglu_backward(d_out, w2, counts, gather, gate_up, weights, topk=2,
                                                            transpose=False, config=TINY, kernel="hopper")
    bad_rows = d_gate_up.isnan().any(1)
    assert bad_rows.nonzero().flatten().tolist() == [4] and h.isnan().any(1).nonzero().flatten().tolist() == [4]
    assert d_w.reshape(-1).isnan().nonzero().flatten().tolist() == [int(gather[4])]

    gate_up[4, 3] = 0.0
    w2_bad = w2.clone()
    w2_bad[1, 0, 0] = float("inf")
    d_gate_up, d_w, _ = swiglu_kernels.gemm_swiglu_backward(d_out, w2_bad, counts, gather, gate_up, weights, topk=2,
                                                            transpose=False, config=TINY, kernel="hopper")
    expert_of_row = torch.repeat_interleave(torch.arange(3, device=DEVICE), counts.long())
    assert torch.equal(d_gate_up.isfinite().all(1), expert_of_row != 1)


def test_fused_calls_refuse_what_would_drop_a_gradient_or_misread():
    counts, gather, weights, (x, d_out, w1, w2), _ = _moe_problem(4, 3, 2, 16, 8, torch.float32, 3)
    gate_up, _ = swiglu_kernels.gemm_weighted_swiglu(x, w1, counts, gather, weights, topk=2)
    with pytest.raises(ValueError, match="not differentiable"):
        swiglu_kernels.gemm_weighted_swiglu(x.requires_grad_(), w1, counts, gather, weights, topk=2)
    with pytest.raises(ValueError, match="gate_up"):
        swiglu_kernels.gemm_swiglu_backward(d_out, w2, counts, gather, gate_up[:, :-2], weights, topk=2,
                                            transpose=False)
    with pytest.raises(ValueError, match="d_out has 8 columns"):
        swiglu_kernels.gemm_swiglu_backward(d_out[:, :8], w2, counts, gather, gate_up, weights, topk=2,
                                            transpose=False)
    with pytest.raises(ValueError, match="topk_weights"):
        swiglu_kernels.gemm_swiglu_backward(d_out, w2, counts, gather, gate_up, weights[:, :1], topk=2,
                                            transpose=False)
    with pytest.raises(ValueError, match="even number"):
        swiglu_kernels.gemm_weighted_swiglu(x.detach(), w1[:, :-1], counts, gather, weights, topk=2)


def test_fused_opcheck():
    counts, gather, weights, (x, d_out, w1, w2), _ = _moe_problem(4, 3, 2, 16, 8, torch.float32, 4)
    gate_up, _ = swiglu_kernels.gemm_weighted_swiglu(x, w1, counts, gather, weights, topk=2)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.moe_learn.gemm_weighted_swiglu.default,
                          (x, w1, counts, gather, weights, 2, True, "", "auto"), test_utils=utils)
    torch.library.opcheck(torch.ops.moe_learn.gemm_swiglu_backward.default,
                          (d_out, w2, counts, gather, gate_up, weights, 2, False, "", "auto"), test_utils=utils)


def test_fused_or_separate_is_timed_once_per_bucket_and_remembered(monkeypatch):
    """The first call of a shape bucket times the fused epilogue against the separate pass and keeps the winner
    (here the separate pass, made to look faster); without tuning, an untimed bucket runs fused."""
    from moe_learn.kernels import autotune

    counts, gather, weights, (x, d_out, w1, w2), _ = _moe_problem(5, 3, 2, 16, 8, FUSED_DTYPES[0], 8)
    gate_up, _ = swiglu_kernels.gemm_weighted_swiglu(x, w1, counts, gather, weights, topk=2, kernel="hopper")
    fused_calls = []
    real_launch = swiglu_kernels.grouped_gemm_hopper
    monkeypatch.setattr(swiglu_kernels, "grouped_gemm_hopper",
                        lambda *a, **kw: fused_calls.append(kw.get("swiglu")) or real_launch(*a, **kw))
    monkeypatch.setattr(autotune, "TUNED", {})
    # the GEMMs' own configs untuned (the default of each bucket): this test is about the fused-or-separate choice
    monkeypatch.setattr(hopper, "autotune_enabled", lambda X: False)

    def swiglu_choices():
        return {key: choice for key, choice in autotune.TUNED.items() if key[0] == "swiglu"}

    def backward():
        before = len(fused_calls)
        out = swiglu_kernels.gemm_swiglu_backward(d_out, w2, counts, gather, gate_up, weights, topk=2,
                                                  transpose=False, kernel="hopper")
        return out, len(fused_calls) - before

    monkeypatch.setattr(autotune, "autotune_enabled", lambda X: False)  # as under the interpreter or a graph capture
    _, fused_launches = backward()  # no tuning: fused
    assert fused_launches == 1 and swiglu_choices() == {}

    def timer(fn):  # the separate pass "is faster"
        before = len(fused_calls)
        fn()
        return 2.0 if len(fused_calls) > before else 1.0

    real_choose = autotune.choose_config
    monkeypatch.setattr(autotune, "autotune_enabled", lambda X: True)
    monkeypatch.setattr(autotune, "choose_config", lambda key, configs, launch: real_choose(key, configs, launch,
                                                                                            timer=timer))
    (d_gate_up, d_w, h), _ = backward()
    (key, choice), = swiglu_choices().items()
    assert "backward" in key and choice == {"FUSED": False}
    monkeypatch.setattr(autotune, "autotune_enabled", lambda X: False)  # remembered, even where it can't tune
    (d_gate_up2, d_w2, h2), fused_launches = backward()
    assert fused_launches == 0
    torch.testing.assert_close(d_gate_up2, d_gate_up)
    torch.testing.assert_close(d_w2, d_w)
    torch.testing.assert_close(h2, h)
