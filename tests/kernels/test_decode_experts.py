"""decode_experts (kernels/decode_experts.py): the experts of a few tokens in two launches, against a float64 loop.

What can go wrong in a kernel that reads each (token, slot)'s expert weights itself: a wrong stride or mask
(reads outside a view: every input here can sit in memory poisoned with NaN), an invalid id clamped to a
real expert (0 * inf = NaN leaking in), the rounding of h, the dispatch from the layers, and bad arguments.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_learn.device import DEVICE, ON_GPU
from moe_learn.kernels import decode_experts as D
from moe_learn.kernels.decode_experts import MAX_SLOTS, decode_experts, run_decode_experts
from moe_learn.layers import experts as X
from tests.child_cases import outcomes_in_children, report_cases

NAN = float("nan")
INF = float("inf")

# Error bound per element: TOL * (what the terms' magnitudes allow, see _reference). fp32 on a GPU may run its
# products in tf32; everywhere else fp32 accumulates exactly enough for 1e-5.
TOL = {torch.float32: 1e-3 if ON_GPU else 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


# ---------------------------------------------------------------------------------------
# The reference and the inputs
# ---------------------------------------------------------------------------------------


def _reference(x, ids, w, gate_up_proj, down_proj, transpose=True):
    """float64 loop over tokens and slots: ``(out, bound)``, both [T, H] float64 on the CPU.

    h is rounded to the hidden dtype, as the kernel's contract says. ``bound`` is the sum of the magnitudes
    of every term (including how far the gate/up accumulations' rounding can move h), so
    ``|got - out| <= TOL * bound`` holds for a correct kernel even where terms cancel, and demands exact
    zeros where no slot contributes.
    """
    dtype = x.dtype
    x, ids, w = x.double().cpu(), ids.cpu(), w.double().cpu()
    w1 = gate_up_proj.double().cpu()
    w2 = down_proj.double().cpu()
    if not transpose:
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)  # as [E, 2I, H] and [E, H, I]
    E, inner = w1.shape[0], w1.shape[1] // 2
    T, H = x.shape
    out = torch.zeros(T, H, dtype=torch.float64)
    bound = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < E:
                continue  # contributes nothing, whatever its weight
            gate, up = w1[e, :inner] @ x[t], w1[e, inner:] @ x[t]
            h = F.silu(gate) * up
            h_run = h.to(dtype).double()
            out[t] += w[t, j] * (w2[e] @ h_run)
            reach_gate, reach_up = w1[e, :inner].abs() @ x[t].abs(), w1[e, inner:].abs() @ x[t].abs()
            h_size = h.abs() + 1.1 * up.abs() * reach_gate + gate.abs() * reach_up
            bound[t] += w[t, j].abs() * (w2[e].abs() @ h_size)
    return out, bound


def _assert_matches(got, x, ids, w, w1, w2, transpose=True):
    assert got.dtype == x.dtype and got.shape == x.shape and got.device == x.device
    ref, bound = _reference(x, ids, w, w1, w2, transpose)
    err = (got.double().cpu() - ref).abs()
    ok = err <= TOL[x.dtype] * bound  # NaN compares False
    if not bool(ok.all()):
        t, col = (~ok).nonzero()[0].tolist()
        raise AssertionError(f"{(~ok).sum().item()} of {ok.numel()} elements off; first at [{t}, {col}]: got "
                             f"{got[t, col].item()}, want {ref[t, col].item()} (bound {TOL[x.dtype]} * "
                             f"{bound[t, col].item():.3g}); ids[{t}] = {ids[t].tolist()}")


LAYOUTS = ("tight", "offset", "rows", "cols", "swap")


def _placed(t: torch.Tensor, layout: str, fill) -> torch.Tensor:
    """``t``'s values in a view whose surrounding (or interleaved) memory holds ``fill``.

    tight: a contiguous tensor of its own; offset: contiguous, inside a larger buffer (fill before and after);
    rows: the last dim padded (a row stride wider than the row); cols: every other element of the last dim;
    swap: the last two dims stored transposed (a ``.transpose`` view of a padded contiguous tensor).
    """
    if layout == "tight":
        return t.contiguous()
    shape = tuple(t.shape)
    if layout == "offset":
        buf = torch.full((t.numel() + 7,), fill, dtype=t.dtype, device=t.device)
        view = buf[3:3 + t.numel()].view(shape)
    elif layout == "rows":
        buf = torch.full((*shape[:-1], shape[-1] + 3), fill, dtype=t.dtype, device=t.device)
        view = buf[..., 1:1 + shape[-1]]
    elif layout == "cols":
        buf = torch.full((*shape[:-1], 2 * shape[-1] + 1), fill, dtype=t.dtype, device=t.device)
        view = buf[..., 1::2]
    elif layout == "swap":
        buf = torch.full((*shape[:-2], shape[-1], shape[-2] + 2), fill, dtype=t.dtype, device=t.device)
        view = buf[..., 1:1 + shape[-2]].transpose(-1, -2)
    else:
        raise ValueError(layout)
    return view.copy_(t)


def _problem(T, k, E, H, inner, dtype, transpose=True, seed=0, w_dtype=torch.float32, ids_dtype=torch.int64):
    """Valid inputs: hidden [T, H], ids [T, k] in [0, E), weights [T, k], the expert weights in the layout."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = torch.randint(0, E, (T, k), generator=g)
    w = torch.rand(T, k, generator=g) + 0.1
    w1 = torch.randn(E, 2 * inner, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, inner, generator=g) / inner**0.5
    if not transpose:
        w1, w2 = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    return (x.to(DEVICE, dtype), ids.to(DEVICE, ids_dtype), w.to(DEVICE, w_dtype), w1.to(DEVICE, dtype),
            w2.to(DEVICE, dtype))


# ---------------------------------------------------------------------------------------
# 1. Properties against the float64 loop
# ---------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(tokens=st.integers(0, 6), experts=st.integers(1, 6), data=st.data(), hidden=st.integers(1, 40),
       inner=st.integers(1, 40), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       transpose=st.booleans(), ids_mode=st.sampled_from(["valid", "invalid", "permutation"]),
       nan_on_invalid=st.booleans(), ids_dtype=st.sampled_from([torch.int64, torch.int32]),
       w_kind=st.sampled_from(["float32", "hidden", "float64"]),
       layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 5), seed=st.integers(0, 2**16))
def test_matches_a_float64_loop(tokens, experts, data, hidden, inner, dtype, transpose, ids_mode, nan_on_invalid,
                                ids_dtype, w_kind, layouts, seed):
    """Random shapes (H, I not multiples of any block), k up to 4 or k = E, duplicate and invalid ids (negative
    and >= E, with NaN weights), three dtypes, both layouts, every input in NaN-poisoned memory."""
    top_k = experts if ids_mode == "permutation" else data.draw(st.integers(1, 4), label="top_k")
    w_dtype = {"float32": torch.float32, "hidden": dtype, "float64": torch.float64}[w_kind]
    x, ids, w, w1, w2 = _problem(tokens, top_k, experts, hidden, inner, dtype, transpose, seed, w_dtype, ids_dtype)
    g = torch.Generator().manual_seed(seed + 1)
    if ids_mode == "permutation":
        ids = torch.stack([torch.randperm(experts, generator=g) for _ in range(tokens)] or [ids.cpu()[:0].view(-1)])
        ids = ids.reshape(tokens, experts)
    elif ids_mode == "invalid":
        ids = torch.randint(-3, experts + 3, (tokens, top_k), generator=g)
    ids = ids.to(DEVICE, ids_dtype)
    invalid = (ids < 0) | (ids >= experts)
    if nan_on_invalid:
        w = w.masked_fill(invalid, NAN)
    x, ids, w, w1, w2 = (_placed(t, layout, fill) for t, layout, fill in
                         zip((x, ids, w, w1, w2), layouts, (NAN, 0, NAN, NAN, NAN), strict=True))
    with torch.no_grad():
        got = decode_experts(x, ids, w, w1, w2, transpose=transpose)
    _assert_matches(got, x, ids, w, w1, w2, transpose)


@pytest.mark.parametrize("transpose", [True, False])
def test_duplicates_count_each_time_and_invalid_slots_count_not_at_all(transpose):
    x, _, _, w1, w2 = _problem(3, 3, 4, 20, 12, torch.float32, transpose, seed=1)
    w = torch.tensor([[0.5, 0.25, 2.0]] * 3, device=DEVICE)
    dup = decode_experts(x, torch.tensor([[2, 2, 2]] * 3, device=DEVICE), w, w1, w2, transpose=transpose)
    once = decode_experts(x, torch.tensor([[2]] * 3, device=DEVICE), w.sum(1, keepdim=True), w1, w2,
                          transpose=transpose)
    torch.testing.assert_close(dup, once, rtol=1e-5, atol=1e-6)
    mixed = decode_experts(x, torch.tensor([[2, -1, 4]] * 3, device=DEVICE), w, w1, w2, transpose=transpose)
    alone = decode_experts(x, torch.tensor([[2]] * 3, device=DEVICE), w[:, :1], w1, w2, transpose=transpose)
    torch.testing.assert_close(mixed, alone, rtol=1e-6, atol=0)
    nothing = decode_experts(x, torch.tensor([[-1, 4, 5]] * 3, device=DEVICE), w, w1, w2, transpose=transpose)
    assert torch.equal(nothing, torch.zeros_like(x))


# ---------------------------------------------------------------------------------------
# 2. Special values
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_experts_only_invalid_slots_name_may_hold_inf_and_nan(transpose, ids_dtype):
    """A kernel that clamps an invalid id to 0 or E-1 and multiplies by a zero weight gets 0 * inf = NaN."""
    T, k, E, H, inner = 4, 3, 4, 24, 10
    x, _, w, w1, w2 = _problem(T, k, E, H, inner, torch.float32, transpose, seed=2)
    big = torch.iinfo(ids_dtype)
    ids = torch.tensor([[1, -1, E], [2, big.max, 1], [big.min, 2, -5], [E + 7, 1, 1]], device=DEVICE,
                       dtype=ids_dtype)
    for e, value in ((0, INF), (E - 1, NAN)):  # the experts a clamp would reach
        w1[e, 0, 0], w1[e, -1, -1], w2[e, 0, 0], w2[e, -1, -1] = value, -value, value, value
    invalid = (ids < 0) | (ids >= E)
    for weight in (0.0, 1.0, NAN, INF):
        ws = w.masked_fill(invalid, weight)
        got = decode_experts(x, ids, ws, w1, w2, transpose=transpose)
        assert got.isfinite().all(), f"invalid slots with weight {weight} leaked a non-finite value"
        _assert_matches(got, x, ids, ws, w1, w2, transpose)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_nan_or_inf_hidden_row_stays_in_its_row(transpose, dtype):
    T, k, E, H, inner = 5, 2, 3, 16, 9
    x, _, w, w1, w2 = _problem(T, k, E, H, inner, dtype, transpose, seed=3)
    ids = torch.tensor([[0, 1], [2, 2], [1, 0], [-1, 3], [2, 0]], device=DEVICE)
    x[1, 3] = NAN
    x[3, 0] = NAN  # token 3 has no valid slot: nothing reads its row
    x[4, 5] = INF
    got = decode_experts(x, ids, w, w1, w2, transpose=transpose)
    assert got[1].isnan().all() and not got[4].isfinite().any()
    assert torch.equal(got[3], torch.zeros_like(got[3]))
    clean = [0, 2]
    assert got[clean].isfinite().all()
    _assert_matches(got[clean], x[clean], ids[clean], w[clean], w1, w2, transpose)


@pytest.mark.parametrize("transpose", [True, False])
def test_k_equals_e_every_expert_once_per_token(transpose):
    T, E, H, inner = 5, 5, 18, 7
    x, _, w, w1, w2 = _problem(T, E, E, H, inner, torch.float32, transpose, seed=4)
    ids = torch.stack([torch.randperm(E) for _ in range(T)]).to(DEVICE)
    _assert_matches(decode_experts(x, ids, w, w1, w2, transpose=transpose), x, ids, w, w1, w2, transpose)


def test_empty_batch():
    for transpose in (True, False):
        for k in (1, 3):
            x, ids, w, w1, w2 = _problem(0, k, 3, 12, 5, torch.float32, transpose)
            out = decode_experts(x, ids, w, w1, w2, transpose=transpose)
            assert out.shape == (0, 12) and out.dtype == torch.float32 and out.device == x.device
        x, ids, w, w1, w2 = _problem(3, 0, 3, 12, 5, torch.float16, transpose)  # k = 0: an empty sum
        assert torch.equal(decode_experts(x, ids, w, w1, w2, transpose=transpose), torch.zeros_like(x))


def test_cpu_tensors_on_a_gpu_machine_are_refused_by_name(monkeypatch):
    """With CUDA the kernels would get host pointers (here the interpreter is switched off to see the check)."""
    import moe_learn

    monkeypatch.setattr(moe_learn.device, "INTERPRETER", False)
    x, ids, w, w1, w2 = (t.cpu() for t in _problem(2, 2, 3, 8, 4, torch.float32))
    with pytest.raises(RuntimeError, match="decode_experts got CPU"):
        decode_experts(x, ids, w, w1, w2)


# ---------------------------------------------------------------------------------------
# 3. Non-contiguous inputs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_views_give_the_contiguous_result(dtype):
    T, k, E, H, inner = 4, 2, 3, 20, 6
    x, ids, w, w1, w2 = _problem(T, k, E, H, inner, dtype, True, seed=5)
    want = decode_experts(x, ids, w, w1, w2)
    _assert_matches(want, x, ids, w, w1, w2)

    x_rows = torch.full((2 * T, H), NAN, dtype=dtype, device=DEVICE)[::2].copy_(x)  # every other row
    ids_col = torch.full((T, 3), 0, dtype=ids.dtype, device=DEVICE)
    ids_col[:, 1:] = ids
    w_col = torch.full((T, 3), NAN, dtype=w.dtype, device=DEVICE)
    w_col[:, 1:] = w
    # transpose=True weights that are .transpose(1, 2) views of contiguous [E, H, 2I] / [E, I, H]
    w1_view, w2_view = w1.transpose(1, 2).contiguous().transpose(1, 2), w2.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (x_rows, ids_col[:, 1:], w_col[:, 1:], w1_view, w2_view))
    got = decode_experts(x_rows, ids_col[:, 1:], w_col[:, 1:], w1_view, w2_view)
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-6)

    # transpose=False with contiguous [E, H, 2I] / [E, I, H] ...
    w1_t, w2_t = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    torch.testing.assert_close(decode_experts(x, ids, w, w1_t, w2_t, transpose=False), want,
                               rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-6)
    # ... and with views of the [E, 2I, H] storage (hidden, ids and weights transposed from [H, T] / [k, T])
    got = decode_experts(x.t().contiguous().t(), ids.t().contiguous().t(), w.t().contiguous().t(),
                         w1.transpose(1, 2), w2.transpose(1, 2), transpose=False)
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-6)


def test_stride_zero_inputs():
    """Broadcast views (stride 0): one hidden row for every token, one weight per slot, tied experts."""
    T, k, E, H, inner = 3, 2, 3, 10, 5
    x, ids, w, w1, w2 = _problem(T, k, E, H, inner, torch.float32, True, seed=6)
    x0, w0 = x[:1].expand(T, H), w[:1].expand(T, k)
    w1_tied, w2_tied = w1[:1].expand(E, -1, -1), w2[:1].expand(E, -1, -1)
    got = decode_experts(x0, ids, w0, w1_tied, w2_tied)
    _assert_matches(got, x0, ids, w0, w1_tied, w2_tied)


# ---------------------------------------------------------------------------------------
# 4. The layers: the same answer as moe_experts, and the dispatch to this path
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_agrees_with_moe_experts_torch_backend(transpose, dtype):
    x, ids, w, w1, w2 = _problem(5, 3, 4, 36, 20, dtype, transpose, seed=7)
    with torch.no_grad():
        got = decode_experts(x, ids, w, w1, w2, transpose=transpose)
        want = X.moe_experts(x, ids, w, w1, w2, transpose=transpose, backend="torch")
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts the layers' calls of the decode path (they import it from its module at call time): through
    run_decode_experts, or, on a GPU, from a launch plan of an earlier call (``planned``)."""
    calls = []
    planned = D.planned

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return run_decode_experts(*args, **kwargs)

    def counting_planned(*args, **kwargs):
        out = planned(*args, **kwargs)
        if out is not None:
            calls.append(args[1].shape)
        return out

    monkeypatch.setattr(D, "run_decode_experts", counting)
    monkeypatch.setattr(D, "planned", counting_planned)
    return calls


SMALL_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "NUM_PROGRAMS": 3, "GROUP_M": 2}


@pytest.mark.parametrize("transpose", [True, False])
def test_moe_experts_takes_the_decode_path_for_inference_only(transpose, decode_calls, monkeypatch):
    assert isinstance(MAX_SLOTS, int) and MAX_SLOTS >= 1
    T, k = 4, 2
    x, ids, w, w1, w2 = _problem(T, k, 4, 24, 10, torch.float32, transpose, seed=8)
    with torch.no_grad():
        want = decode_experts(x, ids, w, w1, w2, transpose=transpose)
        ref = X.moe_experts(x, ids, w, w1, w2, transpose=transpose, backend="torch")
    assert decode_calls == [] or decode_calls == [(T, k)]  # decode_experts may go through run_decode_experts
    decode_calls.clear()

    def run(expect_decode, *, grad=False, **kwargs):
        with torch.set_grad_enabled(grad):
            out = X.moe_experts(x, ids, w, w1, w2, transpose=transpose, **kwargs)
        took = len(decode_calls) > 0
        decode_calls.clear()
        assert took == expect_decode, kwargs
        torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-5)
        return out

    out = run(True)
    assert torch.equal(out, want)
    run(True, grad=True)  # grad enabled but nothing requires it
    if transpose:  # fused_moe_experts: moe_experts with the transformers layout
        assert torch.equal(X.fused_moe_experts(x, ids, w, w1, w2), want) and len(decode_calls) == 1
        decode_calls.clear()
    run(False, backend="torch")
    run(False, config=SMALL_CONFIG)
    monkeypatch.setattr(D, "MAX_SLOTS", T * k)
    run(True)  # T*k = MAX_SLOTS: still decode
    monkeypatch.setattr(D, "MAX_SLOTS", T * k - 1)
    run(False)
    monkeypatch.setattr(D, "MAX_SLOTS", MAX_SLOTS)
    monkeypatch.setattr(X, "DECODE_EXPERTS", False)
    run(False)
    monkeypatch.setattr(X, "DECODE_EXPERTS", True)
    for name in ("x", "w", "w1", "w2"):  # any input needing a gradient: the differentiable path
        inputs = {"x": x, "w": w, "w1": w1, "w2": w2}
        inputs[name] = inputs[name].detach().clone().requires_grad_()
        with torch.enable_grad():
            out = X.moe_experts(inputs["x"], ids, inputs["w"], inputs["w1"], inputs["w2"], transpose=transpose)
        assert decode_calls == [] and out.grad_fn is not None, name
        torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-5)
        out.sum().backward()
        assert inputs[name].grad is not None, name
        with torch.no_grad():  # the same tensors, no gradient recorded: decode again
            X.moe_experts(inputs["x"], ids, inputs["w"], inputs["w1"], inputs["w2"], transpose=transpose)
        assert len(decode_calls) == 1, name
        decode_calls.clear()


def test_the_layers_rule_reads_fewer_bytes_while_a_graph_is_captured(decode_calls, monkeypatch):
    """``layers_take``: up to MAX_WEIGHT_BYTES of weights read in eager calls, MAX_WEIGHT_BYTES_IN_GRAPH while a
    CUDA graph is captured (host time is free there); moe_experts follows it either way, with the same answer."""
    x, ids, w, w1, w2 = _problem(2, 2, 4, 24, 10, torch.float32, seed=11)
    read = ids.numel() * (w1.numel() + w2.numel()) // w1.shape[0] * w1.element_size()
    with torch.no_grad():
        ref = X.moe_experts(x, ids, w, w1, w2, backend="torch")
        cases = [(False, read, read - 1, True), (False, read - 1, read, False), (True, read - 1, read, True),
                 (True, read, read - 1, False)]
        for capturing, eager_limit, graph_limit, takes in cases:
            monkeypatch.setattr(D, "_capturing", lambda capturing=capturing: capturing)
            monkeypatch.setattr(D, "MAX_WEIGHT_BYTES", eager_limit)
            monkeypatch.setattr(D, "MAX_WEIGHT_BYTES_IN_GRAPH", graph_limit)
            assert D.layers_take(ids, w1, w2) == takes
            decode_calls.clear()
            out = X.moe_experts(x, ids, w, w1, w2)
            assert (len(decode_calls) > 0) == takes, (capturing, eager_limit, graph_limit)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def _capture_and_replay(call, static, inputs, w1, w2):
    """Capture ``call(*static, w1, w2)`` in a CUDA graph, then for each of ``inputs`` copy it into ``static``,
    replay and check the captured output against the float64 loop on those inputs."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(*static, w1, w2)
    for args in inputs:
        for dst, src in zip(static, args, strict=True):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        _assert_matches(captured, *args, w1, w2)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_moe_experts_in_a_captured_graph_takes_the_decode_path_and_replays_new_inputs(decode_calls):
    """A decode step captured in a CUDA graph (after eager warm-up calls, as servers capture): within the graph
    limit the layers take the decode path there too, and each replay reads the inputs copied in."""
    x, ids, w, w1, w2 = _problem(2, 8, 16, 1024, 256, torch.bfloat16, seed=12)
    x2, ids2, w_2, _, _ = _problem(2, 8, 16, 1024, 256, torch.bfloat16, seed=13)
    static = [t.clone() for t in (x, ids, w)]
    with torch.no_grad():
        for _ in range(2):
            X.moe_experts(*static, w1, w2)
        torch.cuda.synchronize()
        decode_calls.clear()
        _capture_and_replay(X.moe_experts, static, [(x2, ids2, w_2), (x, ids, w)], w1, w2)
        assert len(decode_calls) == 1


def test_float64_moe_experts_does_not_take_the_triton_decode_path(decode_calls):
    x, ids, w, w1, w2 = _problem(3, 2, 3, 8, 4, torch.float64, seed=9, w_dtype=torch.float64)
    with torch.no_grad():
        out = X.moe_experts(x, ids, w, w1, w2)
    assert decode_calls == [] and out.dtype == torch.float64
    ref, bound = _reference(x, ids, w, w1, w2)
    assert ((out.cpu() - ref).abs() <= 1e-12 * bound + 1e-15).all()


def test_transformers_experts_take_the_decode_path_and_drop_sentinels(decode_calls):
    """transformers' experts interface (layers/hf.py): no range check there, so expert-parallel sentinels
    (ids >= E) reach the kernel, and must contribute nothing."""
    pytest.importorskip("transformers")
    from moe_learn.layers.hf import experts_forward

    T, k, E, H, inner = 3, 2, 4, 16, 8
    x, ids, w, w1, w2 = _problem(T, k, E, H, inner, torch.float32, seed=10)
    ids[0, 1] = E
    ids[2, 0] = E + 3

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(w1.clone())
            self.down_proj = torch.nn.Parameter(w2.clone())
            self.act_fn = torch.nn.SiLU()

    with torch.no_grad():
        got = experts_forward(Experts(), x, ids, w)
    assert decode_calls == [(T, k)]
    _assert_matches(got, x, ids, w, w1, w2)


# ---------------------------------------------------------------------------------------
# 5. Bad arguments: refused by name, in a child process (a crash fails its case, not pytest)
# ---------------------------------------------------------------------------------------

T_, K_, E_, H_, I_ = 3, 2, 3, 8, 4


def _ok(dtype=torch.float32):
    return [torch.randn(T_, H_, dtype=dtype), torch.randint(0, E_, (T_, K_)), torch.rand(T_, K_),
            torch.randn(E_, 2 * I_, H_, dtype=dtype), torch.randn(E_, H_, I_, dtype=dtype)]


def _with(i, value, dtype=torch.float32):
    args = _ok(dtype)
    args[i] = value(args[i]) if callable(value) else value
    return args


def _bad_cases():
    """(id, exception type, regex the message must match, call)."""
    f = decode_experts
    bf16 = torch.bfloat16
    grad_msg = r"no_grad"
    return [
        ("hidden-1d", ValueError, "hidden_states", lambda: f(*_with(0, lambda a: a[0]))),
        ("hidden-3d", ValueError, "hidden_states", lambda: f(*_with(0, lambda a: a[None]))),
        ("hidden-list", TypeError, "hidden_states", lambda: f(*_with(0, [[1.0] * H_] * T_))),
        ("ids-1d", ValueError, "topk_ids", lambda: f(*_with(1, lambda a: a[:, 0]))),
        ("ids-float", TypeError, "topk_ids", lambda: f(*_with(1, lambda a: a.float()))),
        ("ids-bool", TypeError, "topk_ids", lambda: f(*_with(1, lambda a: a > 0))),
        ("ids-rows", ValueError, "topk_ids", lambda: f(*_with(1, lambda a: torch.cat([a, a[:1]])))),
        ("weights-int", TypeError, "topk_weights", lambda: f(*_with(2, lambda a: a.long()))),
        ("weights-shape", ValueError, "topk_weights", lambda: f(*_with(2, lambda a: torch.cat([a, a], 1)))),
        ("weights-3d", ValueError, "topk_weights", lambda: f(*_with(2, lambda a: a[None]))),
        ("gate_up-2d", ValueError, "gate_up_proj", lambda: f(*_with(3, lambda a: a[0]))),
        ("down-2d", ValueError, "down_proj", lambda: f(*_with(4, lambda a: a[0]))),
        ("gate_up-H", ValueError, "gate_up_proj", lambda: f(*_with(3, lambda a: a[..., 1:]))),
        ("down-H", ValueError, "down_proj", lambda: f(*_with(4, lambda a: a[:, 1:]))),
        ("gate_up-E", ValueError, "gate_up_proj", lambda: f(*_with(3, lambda a: a[1:]))),
        ("down-I", ValueError, "down_proj", lambda: f(*_with(4, lambda a: a[..., 1:]))),
        ("gate_up-odd", ValueError, "gate_up_proj", lambda: f(*_with(3, lambda a: a[:, 1:]))),
        ("layout-flipped", ValueError, "gate_up_proj", lambda: f(*_ok(), transpose=False)),
        ("float64", TypeError, r"(?s)hidden_states.*moe_experts|moe_experts.*hidden_states",
         lambda: f(*[t.double() if t.is_floating_point() else t for t in _ok()])),
        ("int-hidden", TypeError, "hidden_states", lambda: f(*[t.long() if t.is_floating_point() else t
                                                               for t in _ok()])),
        ("bf16-hidden-fp32-weights", TypeError, "gate_up_proj", lambda: f(*_with(0, lambda a: a.to(bf16)))),
        ("fp32-hidden-bf16-down", TypeError, "down_proj", lambda: f(*_with(4, lambda a: a.to(bf16)))),
        ("int-gate_up", TypeError, "gate_up_proj", lambda: f(*_with(3, lambda a: a.long()))),
        ("two-devices", ValueError, "hidden_states", lambda: f(*_with(0, lambda a: a.to("meta")))),
        ("grad-hidden", ValueError, grad_msg, lambda: f(*_with(0, lambda a: a.requires_grad_()))),
        ("grad-weights", ValueError, grad_msg, lambda: f(*_with(2, lambda a: a.requires_grad_()))),
        ("grad-gate_up", ValueError, grad_msg, lambda: f(*_with(3, lambda a: a.requires_grad_()))),
        ("grad-down", ValueError, grad_msg, lambda: f(*_with(4, lambda a: a.requires_grad_()))),
    ]


def _with_grad(call):
    def run():
        with torch.enable_grad():
            call()
    return run


def _run_child(start: int) -> None:
    """The child's side: from case ``start`` on, one JSON line per case."""
    torch.manual_seed(0)
    report_cases([_with_grad(call) for _, _, _, call in _bad_cases()], start)


@pytest.fixture(scope="module")
def bad_outcomes() -> dict[int, dict]:
    return outcomes_in_children(
        "import moe_learn; from tests.kernels.test_decode_experts import _run_child; _run_child({start})",
        len(_bad_cases()), timeout=600)


@pytest.mark.skipif(ON_GPU, reason="the bad-input table is built from CPU tensors")
@pytest.mark.parametrize("index", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_arguments_are_refused_by_name(index, bad_outcomes):
    what, error, match, _ = _bad_cases()[index]
    outcome = bad_outcomes.get(index, {"type": "missing", "message": "no outcome recorded"})
    assert outcome["type"] == error.__name__, f"{what}: {outcome['type']}: {outcome['message']}"
    assert re.search(match, outcome["message"]), f"{what}: the message does not match {match!r}: {outcome['message']}"


def test_what_is_allowed_is_not_refused():
    """No gradient recorded: inputs that require grad are fine; any floating topk_weights dtype; int32 ids."""
    x, ids, w, w1, w2 = _problem(3, 2, 3, 8, 4, torch.float32, seed=11)
    want = decode_experts(x, ids, w, w1, w2)
    with torch.no_grad():
        got = decode_experts(x.requires_grad_(), ids, w.requires_grad_(), w1.requires_grad_(), w2.requires_grad_())
    torch.testing.assert_close(got, want)
    for w_other in (w.detach().half(), w.detach().double(), w.detach().bfloat16()):
        with torch.no_grad():
            _assert_matches(decode_experts(x, ids.int(), w_other, w1, w2), x, ids, w_other, w1, w2)


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], None, 3.0])
def test_moe_experts_names_a_hidden_states_that_is_no_tensor(bad):
    """The decode path's look-up runs before moe_experts' checks: it must leave a non-tensor to them."""
    ids, w = torch.zeros(1, 1, dtype=torch.long, device=DEVICE), torch.ones(1, 1, device=DEVICE)
    w1, w2 = torch.zeros(1, 2, 2, device=DEVICE), torch.zeros(1, 2, 1, device=DEVICE)
    with torch.no_grad(), pytest.raises(TypeError, match="hidden_states must be a torch.Tensor"):
        X.moe_experts(bad, ids, w, w1, w2)


# ---------------------------------------------------------------------------------------
# 6. One launch (ONE_LAUNCH): both phases with a grid barrier between them; two where it cannot be used
# ---------------------------------------------------------------------------------------


def _counters_at_rest():
    """Every barrier's counters are back at zero (each launch leaves them so for the next on its stream)."""
    from moe_learn.kernels import grid_sync
    if ON_GPU:
        torch.cuda.synchronize()
    return all(int(pair.abs().sum()) == 0 for pair in grid_sync._COUNTERS.values())


# (the interpreter runs one program, which walks every item anyway: the large shapes only on a GPU)
@pytest.mark.parametrize("T, k, E, H, inner", [(1, 1, 1, 8, 4), (3, 2, 5, 40, 24)]
                         + ([(8, 8, 16, 520, 136), (16, 4, 9, 1040, 72)] if ON_GPU else []))
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("per_sm", [1, 8])
def test_one_launch_and_two_launches_give_the_same_bits(T, k, E, H, inner, transpose, per_sm, monkeypatch):
    """The one launch computes what the two do, in the same order: equal bits, and the float64 answer. With one
    program per SM the larger shapes have more (slot, block) items than programs, so each program walks several
    on each side of the barrier (a missing or leaky barrier reads h before it is written)."""
    x, ids, w, w1, w2 = _problem(T, k, E, H, inner, torch.bfloat16, transpose, seed=T + H)
    monkeypatch.setattr(D, "MAX_PROGRAMS_PER_SM", per_sm)
    monkeypatch.setattr(D, "_MOST_PROGRAMS", {})
    monkeypatch.setattr(D, "_PLANS", {})  # (a plan keeps its grid)
    with torch.no_grad():
        monkeypatch.setattr(D, "ONE_LAUNCH", False)
        two = decode_experts(x, ids, w, w1, w2, transpose=transpose)
        monkeypatch.setattr(D, "ONE_LAUNCH", True)
        for _ in range(3):  # the first call, then (on a GPU) its plan with the scratch kept per stream
            one = decode_experts(x, ids, w, w1, w2, transpose=transpose)
            assert torch.equal(one, two)
    _assert_matches(one, x, ids, w, w1, w2, transpose)
    assert _counters_at_rest()


# (K steps: H and I past one block of 128 / 256 and not multiples of it, so the prefetch's last, masked step and
# a partial block are both run; k from 1 to 6 with SLOTS padded past k)
@pytest.mark.parametrize("T, k, E, H, inner", [(1, 1, 2, 8, 4), (2, 3, 5, 300, 520), (3, 6, 7, 130, 260)])
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("one", [False, True])
def test_the_prefetch_gives_the_same_bits(T, k, E, H, inner, transpose, one, monkeypatch):
    """Loading the next K step's tiles ahead (PREFETCH) changes when bytes arrive, not what is summed in which
    order: equal bits with it and without, in two launches and in one, invalid and duplicate ids included."""
    x, ids, w, w1, w2 = _problem(T, k, E, H, inner, torch.bfloat16, transpose, seed=T * k + H)
    ids[0, 0] = -2  # an invalid slot: nothing read for it, on either side of the step
    if k > 1:
        ids[-1, 1] = ids[-1, 0] = E - 1  # a duplicate
    monkeypatch.setattr(D, "ONE_LAUNCH", one)
    outs = []
    with torch.no_grad():
        for prefetch in (False, True, False, True):  # (the second pair from the plans)
            monkeypatch.setattr(D, "PREFETCH", prefetch)
            outs.append(decode_experts(x, ids, w, w1, w2, transpose=transpose))
    assert all(torch.equal(out, outs[0]) for out in outs[1:])
    _assert_matches(outs[1], x, ids, w, w1, w2, transpose)


@pytest.fixture
def one_launch(monkeypatch):
    monkeypatch.setattr(D, "ONE_LAUNCH", True)
    monkeypatch.setattr(D, "_ONE_LAUNCH_OK", [True])


def test_repeated_one_launch_calls_read_only_their_own_inputs(one_launch):
    """A decode loop: one layout, new inputs each step (a plan's kept scratch must not leak a step's h into the
    next), some steps with invalid ids (their rows of h are not written in that step)."""
    for step in range(6):
        x, ids, w, w1, w2 = _problem(2, 4, 6, 72, 40, torch.float16, seed=100 + step)
        if step % 2:
            ids[0, 1:] = -1
        with torch.no_grad():
            got = decode_experts(x, ids, w, w1, w2)
        _assert_matches(got, x, ids, w, w1, w2)
    assert _counters_at_rest()


def test_a_refused_cooperative_launch_falls_back_to_two_launches(one_launch, monkeypatch):
    """A GPU that cannot hold the grid at once (MPS limits, a smaller partition) refuses the cooperative launch:
    warned once, then two launches with the same answer; any other launch error is not swallowed."""
    x, ids, w, w1, w2 = _problem(3, 2, 4, 24, 16, torch.float32, seed=5)
    want = decode_experts(x, ids, w, w1, w2)
    monkeypatch.setattr(D, "_PLANS", {})  # (on a GPU that call kept a one-launch plan)

    def refusing(*args):
        raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")

    monkeypatch.setattr(D, "_launch_cooperative", refusing)
    monkeypatch.setattr(D, "_PLANS", {})
    with pytest.warns(UserWarning, match="cooperative launch was refused"):
        got = decode_experts(x, ids, w, w1, w2)
    assert torch.equal(got, want) and D._ONE_LAUNCH_OK == [False]
    assert torch.equal(decode_experts(x, ids, w, w1, w2), want)  # no second warning needed: two launches now

    def failing(*args):
        raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")

    monkeypatch.setattr(D, "_launch_cooperative", failing)
    monkeypatch.setattr(D, "_ONE_LAUNCH_OK", [True])
    monkeypatch.setattr(D, "_PLANS", {})
    with pytest.raises(RuntimeError, match="illegal memory access"):
        decode_experts(x, ids, w, w1, w2)


@pytest.mark.skipif(not ON_GPU, reason="streams and CUDA graphs need a GPU")
def test_two_streams_and_a_cuda_graph(one_launch):
    """Each stream has its own counters and scratch: calls of one layout on two streams at once stay right; a
    captured call takes two launches (a graph may be replayed on any stream) and its replays read new inputs."""
    x, ids, w, w1, w2 = _problem(2, 8, 16, 1024, 256, torch.bfloat16, seed=3)
    x2, ids2, w_2, _, _ = _problem(2, 8, 16, 1024, 256, torch.bfloat16, seed=4)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    outs = []
    with torch.no_grad():
        for _ in range(4):
            for stream, args in zip(streams, ((x, ids, w), (x2, ids2, w_2)), strict=True):
                with torch.cuda.stream(stream):
                    outs.append((decode_experts(*args, w1, w2), args))
        torch.cuda.synchronize()
        for got, args in outs:
            _assert_matches(got, *args, w1, w2)
        static = [t.clone() for t in (x, ids, w)]
        decode_experts(*static, w1, w2)  # (compiled and planned before the capture)
        _capture_and_replay(decode_experts, static, [(x2, ids2, w_2), (x, ids, w)], w1, w2)
    assert _counters_at_rest()
