"""Chapter 07 checks accept the right answers and reject plausible wrong ones with pointed messages."""

import pytest
import torch
import triton
import triton.language as tl

from moe_learn import get_routing_indices, grouped_gemm, swiglu
from moe_learn.course.checks._core import CheckFailed
from moe_learn.course.checks.ch07_fusion import check_fused_kernel, check_fused_moe


@triton.jit
def fused_kernel(
    x_ptr, w_ptr, y_ptr, m_sizes_ptr, gather_ptr, topk_weights_ptr,
    N, K, NUM_EXPERTS,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_ym, stride_yn,
    TOP_K: tl.constexpr, PERMUTE_X: tl.constexpr, PERMUTE_Y: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    BUG_NO_TOPK_DIV: tl.constexpr = False,
    BUG_NO_WEIGHTS: tl.constexpr = False,
    BUG_WEIGHT_BY_ROW: tl.constexpr = False,
    BUG_UNPERMUTED_STORE: tl.constexpr = False,
    BUG_SCATTER_TO_TOKEN: tl.constexpr = False,
):  # fmt: skip
    """A learner's fused kernel, with switches that plant one mistake each."""
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    next_tile = pid
    tiles_before = 0
    row_start = 0
    for e in range(NUM_EXPERTS):
        m_size = tl.load(m_sizes_ptr + e)
        tiles_end = tiles_before + tl.cdiv(m_size, BLOCK_M) * num_n_tiles
        while next_tile < tiles_end:
            local = next_tile - tiles_before
            offs_m = (local // num_n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = (local % num_n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_k = tl.arange(0, BLOCK_K)
            mask_m = offs_m < m_size
            mask_n = offs_n < N
            rows = row_start + offs_m
            flat = tl.load(gather_ptr + rows, mask=mask_m, other=0)
            x_rows = rows
            if PERMUTE_X:
                if BUG_NO_TOPK_DIV:
                    x_rows = flat
                else:
                    x_rows = flat // TOP_K
            x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
            w_ptrs = w_ptr + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask_k = offs_k < K - k0
                a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = tl.dot(a, b, acc)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk
            if HAS_WEIGHTS and not BUG_NO_WEIGHTS:
                if BUG_WEIGHT_BY_ROW:
                    weight = tl.load(topk_weights_ptr + rows, mask=mask_m, other=0.0)
                else:
                    weight = tl.load(topk_weights_ptr + flat, mask=mask_m, other=0.0)
                acc = acc * weight[:, None]
            y_rows = rows
            if PERMUTE_Y and not BUG_UNPERMUTED_STORE:
                if BUG_SCATTER_TO_TOKEN:
                    y_rows = flat // TOP_K
                else:
                    y_rows = flat
            y_ptrs = y_ptr + y_rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
            tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
            next_tile += NUM_PROGRAMS
        tiles_before = tiles_end
        row_start += m_size


class WithBug:
    def __init__(self, kernel, **bugs):
        self.kernel, self.bugs = kernel, bugs

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel[grid](*args, **kwargs, **self.bugs)


def test_fused_kernel_reference_passes(capsys):
    check_fused_kernel(fused_kernel)
    assert "[PASS] 07.1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bug,match",
    [
        ("BUG_NO_TOPK_DIV", r"(?s)multiplied token row gather_indices\[i\] instead of .*// TOP_K.*TOP_K=2"),
        ("BUG_NO_WEIGHTS", r"(?s)lacks? the routing weight.*multiply the accumulator by topk_weights"),
        ("BUG_WEIGHT_BY_ROW", r"(?s)scaled by another \(token, slot\)'s weight.*index it with gather_indices"),
        ("BUG_UNPERMUTED_STORE", r"(?s)results in expert order.*store row i of the tile at out\[gather_indices\[i\]\]"),
        (
            "BUG_SCATTER_TO_TOKEN",
            r"(?s)row \d+ \(token \d+, slot \d\) (was never written|holds the result that belongs in row)"
            r".*out\[gather_indices\[i\]\]",
        ),
    ],
)
def test_fused_kernel_rejects(bug, match):
    with pytest.raises(CheckFailed, match=match):
        check_fused_kernel(WithBug(fused_kernel, **{bug: True}))


# ------------------------------------------------------------------ 07.2


def _fused(x, ids, w, gu, dp, *, weights=True, reduce="sum", swap=False):
    T, H = x.shape
    k, E = ids.shape[1], gu.shape[0]
    counts, gather = get_routing_indices(ids, E)
    h = grouped_gemm(x, gu, counts, gather_indices=gather, topk=k, permute_x=True)
    if swap:
        h = torch.cat(h.chunk(2, dim=-1)[::-1], dim=-1)
    h = swiglu(h)
    y = grouped_gemm(h, dp, counts, gather_indices=gather, permute_y=True, topk_weights=w if weights else None)
    y = y.view(T, k, H)
    return y.sum(1) if reduce == "sum" else y.mean(1)


def test_fused_moe_reference_passes(capsys):
    check_fused_moe(_fused)
    assert "[PASS] 07.2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weights": False}, r"(?s)plain sum over the k experts: the routing weights are missing"),
        ({"reduce": "mean"}, r"(?s)average over the k slots.*not \.mean"),
        ({"swap": True}, r"(?s)gate and up are swapped"),
    ],
)
def test_fused_moe_rejects(kwargs, match):
    with pytest.raises(CheckFailed, match=match):
        check_fused_moe(lambda *a: _fused(*a, **kwargs))


def test_fused_moe_wrong_shape_and_stub():
    with pytest.raises(CheckFailed, match=r"shape \(18, 32\), expected \(9, 32\)"):
        check_fused_moe(lambda x, ids, w, gu, dp: _fused(x, ids, w, gu, dp).repeat(2, 1))

    def stub(*args):
        raise NotImplementedError("exercise 07.2")

    with pytest.raises(NotImplementedError):
        check_fused_moe(stub)
