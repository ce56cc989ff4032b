"""Training's weighted SwiGLU kernels (kernels/swiglu.py) against float64 references."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_learn.device import DEVICE
from moe_learn.kernels.swiglu import weighted_swiglu, weighted_swiglu_backward
from moe_learn.ops import moe as ref

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
