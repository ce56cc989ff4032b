"""Chapter 09 checks: the reference answers pass, plausible wrong answers are rejected with a reason."""

import pytest
import torch

from moe_learn.course.checks._core import CheckFailed
from moe_learn.course.checks.ch09_backward import (
    EXERCISES,
    check_grouped_gemm_dw,
    check_grouped_gemm_dx,
    check_weighted_swiglu_backward,
)
from moe_learn.kernels.backward import grouped_gemm_dw
from moe_learn.kernels.grouped_gemm import grouped_gemm


def _dw_torch(X, dY, m_sizes, *, gather_indices=None, topk=1, permute_x=False, out=None, shift=0, empty=None,
              full_blocks_of=None):
    """A PyTorch dW with switchable mistakes: row blocks shifted by ``shift`` experts, empty experts
    filled with ``empty``, rows past the last full block of ``full_blocks_of`` dropped."""
    if permute_x:
        X = X[gather_indices.long() // topk]
    offsets = [0] + torch.cumsum(m_sizes, 0).tolist()
    E = m_sizes.numel()
    for e in range(E):
        src = e + shift
        if not 0 <= src < E:
            out[e] = 0
            continue
        lo, hi = offsets[src], offsets[src + 1]
        if full_blocks_of:
            hi = lo + (hi - lo) // full_blocks_of * full_blocks_of
        out[e] = (dY[lo:hi].T.float() @ X[lo:hi].float()).to(out.dtype)
        if empty is not None and offsets[e] == offsets[e + 1]:
            out[e] = empty
    return out


def test_exercises_have_progressive_hints():
    assert [ex.id for ex in EXERCISES] == ["09.1", "09.2", "09.3"]
    assert all(2 <= len(ex.hints) <= 3 for ex in EXERCISES)


def test_dw_check_passes_reference_kernel(capsys):
    check_grouped_gemm_dw(grouped_gemm_dw)
    assert "[PASS] 09.1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, message",
    [
        (lambda *a, out=None, **k: out, r"dW\[0\]\[0, 0\] was never written"),
        (lambda *a, **k: _dw_torch(*a, shift=-1, **k), r"dW\[1\] uses expert 0's rows: off-by-one in row offsets"),
        (lambda *a, **k: _dw_torch(*a, shift=1, **k), r"uses expert \d's rows: off-by-one"),
        (lambda *a, **k: _dw_torch(*a, empty=0.5, **k), "dW of expert 3 is not zero though it got no tokens"),
        (lambda *a, **k: _dw_torch(*a, full_blocks_of=16, **k), "the last partial block was dropped"),
        (lambda X, dY, m, **k: grouped_gemm_dw(X, dY, m, **k).transpose(1, 2), r"has shape \(5, 24, 20\)"),
    ],
    ids=["never_writes", "offset_minus_one", "offset_plus_one", "empty_not_zero", "drops_partial_block", "[E,K,N]"],
)
def test_dw_check_rejects(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_grouped_gemm_dw(wrong)


def test_dw_check_lets_stub_error_through():
    def stub(*args, **kwargs):
        raise NotImplementedError

    with pytest.raises(NotImplementedError):
        check_grouped_gemm_dw(stub)


def _dx(dY, W, m_sizes, gather_indices, topk, *, permute_y=True, reduce="sum"):
    d = grouped_gemm(dY, W, m_sizes, gather_indices=gather_indices, permute_y=permute_y, transpose=False)
    if reduce is None:
        return d
    d = d.view(-1, topk, d.shape[1])
    return {"sum": d.sum(1), "mean": d.mean(1), "first": d[:, 0]}[reduce]


def test_dx_check_passes_reference(capsys):
    check_grouped_gemm_dx(_dx)
    assert "[PASS] 09.2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, message",
    [
        (lambda *a: _dx(*a, reduce=None), "dX not summed over top-k"),
        (lambda *a: _dx(*a, reduce="first"), "only the first slot"),
        (lambda *a: _dx(*a, reduce="mean"), "averaged over top-k"),
        (lambda *a: _dx(*a, permute_y=False), "rows left in expert order"),
        (lambda dY, W, m, g, k: _dx(dY, W.transpose(1, 2), m, g, k), "your function raised ValueError"),
    ],
    ids=["no_sum", "first_slot", "mean", "no_scatter", "forward_layout"],
)
def test_dx_check_rejects(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_grouped_gemm_dx(wrong)


# ---------------------------------------------------------------- planted bugs in a real Triton kernel

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _dw_kernel(x_ptr, dy_ptr, dw_ptr, offsets_ptr, gather_ptr, M, N, K,
               stride_xm, stride_xk, stride_dym, stride_dyn, stride_dwe, stride_dwn, stride_dwk,
               TOP_K: tl.constexpr, PERMUTE_X: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BUG_PREVIOUS_EXPERT_ROWS: tl.constexpr = False,  # offsets[e-1] .. offsets[e]
               BUG_MASK_WITH_TOTAL_ROWS: tl.constexpr = False,  # offs_m < M: reads the next expert's rows
               BUG_NO_ROW_MASK: tl.constexpr = False,  # X and dY loads masked on columns only
               BUG_SKIP_EMPTY_EXPERT: tl.constexpr = False,  # "nothing to do", but dW[e] must be zeroed
               BUG_NO_STORE_MASK: tl.constexpr = False):  # fmt: skip
    expert = tl.program_id(0)
    if BUG_PREVIOUS_EXPERT_ROWS:
        # clamped for expert 0, which then reads nothing
        row_start = tl.load(offsets_ptr + tl.maximum(expert - 1, 0))
        row_end = tl.load(offsets_ptr + expert)
        row_end = tl.where(expert == 0, row_start, row_end)
    else:
        row_start = tl.load(offsets_ptr + expert)
        row_end = tl.load(offsets_ptr + expert + 1)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if BUG_MASK_WITH_TOTAL_ROWS:
            mask_m = offs_m < M
        else:
            mask_m = offs_m < row_end
        if PERMUTE_X:
            x_rows = tl.load(gather_ptr + offs_m, mask=mask_m, other=0) // TOP_K
        else:
            x_rows = offs_m
        if BUG_NO_ROW_MASK:
            load_m = offs_m >= 0
        else:
            load_m = mask_m
        x = tl.load(x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=load_m[:, None] & (offs_k < K)[None, :], other=0.0)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=load_m[:, None] & (offs_n < N)[None, :], other=0.0)
        acc += tl.dot(tl.trans(dy), x, input_precision="ieee")
    store_mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    if BUG_SKIP_EMPTY_EXPERT:
        store_mask = store_mask & ((tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32) + row_end) > row_start)
    if BUG_NO_STORE_MASK:
        store_mask = offs_n[:, None] >= 0
    tl.store(dw_ptr + expert * stride_dwe + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
             acc.to(dw_ptr.dtype.element_ty), mask=store_mask)


def _planted(**bugs):
    """A learner's dW function launching ``_dw_kernel`` with the given BUG_* switches on."""
    assert set(bugs) <= set(_dw_kernel.arg_names), "a misspelled switch would plant nothing"

    def launch(X, dY, m_sizes, *, gather_indices=None, topk=1, permute_x=False, out=None):
        E, (M, N), K = m_sizes.numel(), dY.shape, X.shape[1]
        offsets = torch.zeros(E + 1, dtype=torch.int32, device=X.device)
        offsets[1:] = torch.cumsum(m_sizes, 0)
        gather = gather_indices if permute_x else offsets
        grid = (E, triton.cdiv(N, 32), triton.cdiv(K, 32))
        _dw_kernel[grid](X, dY, out, offsets, gather, M, N, K, *X.stride(), *dY.stride(), *out.stride(),
                         TOP_K=topk, PERMUTE_X=permute_x, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, **bugs)
        return out

    return launch


def test_dw_check_passes_planted_kernel_without_bugs(capsys):
    check_grouped_gemm_dw(_planted())
    assert "[PASS] 09.1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bug, message",
    [
        ("BUG_SKIP_EMPTY_EXPERT", r"(?s)dW\[3\]\[0, 0\] was never written.*with no rows still stores its zeros"),
        ("BUG_PREVIOUS_EXPERT_ROWS", r"dW\[1\] uses expert 0's rows: off-by-one in row offsets"),
        ("BUG_MASK_WITH_TOTAL_ROWS", "loaded without its mask"),
        ("BUG_NO_ROW_MASK", r"(?s)dW\[\d\]\[\d+, \d+\] is NaN although X and dY hold none: your kernel read outside "
         r"them.*offs_m < row_end"),
        ("BUG_NO_STORE_MASK", r"(?s)wrote outside dW: \d+ element\(s\), the first past the end of dW.*"
         r"\(offs_n < N\)\[:, None\] & \(offs_k < K\)\[None, :\]"),
    ],
)
def test_dw_check_on_planted_triton_kernels(bug, message):
    with pytest.raises(CheckFailed, match=message):
        check_grouped_gemm_dw(_planted(**{bug: True}))


def _swiglu_bwd(gate_up, row_weights, d_h, *, used_h=False, no_weight=False, sigmoid_only=False, swapped=False):
    """The weighted SwiGLU's backward with switchable mistakes."""
    gate, up = gate_up.chunk(2, dim=-1)
    w = row_weights.unsqueeze(-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    d_w = (d_h * (w * silu * up if used_h else silu * up)).sum(-1)
    d_s = d_h if no_weight else w * d_h
    d_gate = d_s * up * (sig if sigmoid_only else sig * (1 + gate * (1 - sig)))
    d_up = d_s * silu
    return torch.cat([d_up, d_gate] if swapped else [d_gate, d_up], dim=-1), d_w


def test_weighted_swiglu_check_passes_the_reference_and_the_package(capsys):
    from moe_learn.ops.moe import weighted_swiglu_backward

    check_weighted_swiglu_backward(_swiglu_bwd)
    check_weighted_swiglu_backward(lambda g, w, d: weighted_swiglu_backward(g, w, d)[:2])
    assert capsys.readouterr().out.count("[PASS] 09.3") == 2


@pytest.mark.parametrize(
    "mistake, message",
    [
        ("used_h", "router's gradient used h"),
        ("no_weight", "misses the routing weight"),
        ("sigmoid_only", r"sigmoid\(gate\) as silu's derivative"),
        ("swapped", "halves are swapped"),
    ],
)
def test_weighted_swiglu_check_names_the_mistake(mistake, message):
    with pytest.raises(CheckFailed, match=message):
        check_weighted_swiglu_backward(lambda g, w, d: _swiglu_bwd(g, w, d, **{mistake: True}))


def test_weighted_swiglu_check_rejects_a_wrong_return():
    with pytest.raises(CheckFailed, match=r"return \(d_gate_up, d_row_weights\)"):
        check_weighted_swiglu_backward(lambda g, w, d: _swiglu_bwd(g, w, d)[0])
    with pytest.raises(CheckFailed, match="d_row_weights .* has shape"):
        check_weighted_swiglu_backward(lambda g, w, d: (_swiglu_bwd(g, w, d)[0], _swiglu_bwd(g, w, d)[1][:, None]))
