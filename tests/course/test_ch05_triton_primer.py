"""Chapter 05: the reference primer kernels, their wrappers and the checks (the figure: test_plots.py).

Every check must pass the reference kernel and reject plausible wrong kernels (a missing
or off-by-one mask, offsets without the block, a K loop without its tail, swapped or
ignored strides, ...) with a message that points at the mistake.
"""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moe_learn import DEVICE, ON_GPU, swiglu
from moe_learn.course.checks import ch05_triton_primer as checks
from moe_learn.course.checks._core import CheckFailed
from moe_learn.kernels import primer

DTYPES = (torch.bfloat16, torch.float16, torch.float32) if ON_GPU else (torch.float32, torch.float16)
TOL = {torch.float32: 1e-2 if ON_GPU else 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _rel(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------- wrappers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 64, 1000])
def test_scale_add_matches_torch(n, dtype):
    x = torch.randn(n, device=DEVICE, dtype=dtype)
    y = torch.randn(n, device=DEVICE, dtype=dtype)
    got = primer.scale_add(x, y, -1.5, block_size=64)
    assert got.shape == x.shape and got.dtype == dtype
    assert _rel(got, -1.5 * x.double() + y.double()) < TOL[dtype]


def test_scale_add_keeps_shape_of_non_contiguous_input():
    x = torch.randn(6, 5, device=DEVICE).T
    y = torch.randn(5, 6, device=DEVICE)
    got = primer.scale_add(x, y, 2.0, block_size=16)
    assert got.shape == (5, 6)
    torch.testing.assert_close(got, 2.0 * x + y)


@pytest.mark.parametrize("layout", ["contiguous", "padded", "transposed"])
def test_swiglu_rows_matches_torch_for_any_layout(layout):
    M, I = 5, 37
    base = torch.randn(M, 2 * I, device=DEVICE)
    if layout == "padded":
        gate_up = torch.randn(M, 2 * I + 7, device=DEVICE)[:, 3 : 3 + 2 * I]
        gate_up.copy_(base)
    elif layout == "transposed":
        gate_up = base.T.contiguous().T
    else:
        gate_up = base
    got = primer.swiglu_rows(gate_up, block_i=16)
    torch.testing.assert_close(got, swiglu(base), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_rows_keeps_dtype(dtype):
    gate_up = torch.randn(3, 2 * 20, device=DEVICE, dtype=dtype)
    got = primer.swiglu_rows(gate_up, block_i=16)
    assert got.dtype == dtype
    assert _rel(got, F.silu(gate_up[:, :20].double()) * gate_up[:, 20:].double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (32, 32, 32), (37, 21, 45)])
def test_matmul_matches_torch(shape, dtype):
    M, N, K = shape
    a = torch.randn(M, K, device=DEVICE, dtype=dtype)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype)  # nn.Linear layout: B = W.T is strided
    got = primer.matmul(a, w.T, block_m=32, block_n=16, block_k=16)
    assert got.shape == (M, N) and got.dtype == dtype
    assert _rel(got, a.double() @ w.double().T) < TOL[dtype]


def test_matmul_with_k_zero_is_zeros():
    a = torch.randn(3, 0, device=DEVICE)
    b = torch.randn(0, 4, device=DEVICE)
    assert torch.equal(primer.matmul(a, b), torch.zeros(3, 4, device=DEVICE))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: primer.scale_add(torch.ones(3), torch.ones(4), 1.0), ValueError, "one shape and dtype"),
        (
            lambda: primer.scale_add(torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long), 1.0),
            TypeError,
            "x must",
        ),
        (lambda: primer.scale_add(torch.ones(3), torch.ones(3), 1.0, block_size=100), ValueError, "block_size"),
        (lambda: primer.swiglu_rows(torch.ones(2, 5)), ValueError, "even number of columns"),
        (lambda: primer.swiglu_rows(torch.ones(4)), ValueError, "gate_up must be 2-D"),
        (lambda: primer.matmul(torch.ones(2, 3), torch.ones(4, 2)), ValueError, "do not chain"),
        (lambda: primer.matmul(torch.ones(2, 3), torch.ones(3, 2, dtype=torch.float16)), TypeError, "cast"),
        (lambda: primer.matmul(torch.ones(2, 3), torch.ones(3, 2), block_k=8), ValueError, "block_k"),
    ],
)
def test_wrappers_reject_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------- checks: references pass


def test_exercises_have_progressive_hints():
    assert [ex.id for ex in checks.EXERCISES] == ["05.1", "05.2", "05.3"]
    for ex in checks.EXERCISES:
        assert 2 <= len(ex.hints) <= 3 and ex.notebook == "05_triton_primer.ipynb"


@pytest.mark.parametrize(
    ("check", "kernel", "line"),
    [
        (checks.check_scale_add, primer.scale_add_kernel, "[PASS] 05.1"),
        (checks.check_swiglu_rows, primer.swiglu_kernel, "[PASS] 05.2"),
        (checks.check_matmul, primer.matmul_kernel, "[PASS] 05.3"),
    ],
)
def test_reference_kernels_pass(check, kernel, line, capsys):
    check(kernel)
    assert line in capsys.readouterr().out


@pytest.mark.parametrize("check", [checks.check_scale_add, checks.check_swiglu_rows, checks.check_matmul])
def test_checks_want_the_kernel_not_the_wrapper(check):
    with pytest.raises(TypeError, match="not its wrapper"):
        check(primer.scale_add)


# ----------------------------------------------------------------------------- 05.1 wrong kernels


@triton.jit
def _scale_add_stub(x_ptr, y_ptr, out_ptr, alpha, n_elements, BLOCK_SIZE: tl.constexpr):
    pass


@triton.jit
def _scale_add_no_store_mask(x_ptr, y_ptr, out_ptr, alpha, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, alpha * x + y)


@triton.jit
def _scale_add_mask_off_by_one(x_ptr, y_ptr, out_ptr, alpha, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs <= n_elements
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, alpha * x + y, mask=mask)


@triton.jit
def _scale_add_mask_too_short(x_ptr, y_ptr, out_ptr, alpha, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements - 1
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, alpha * x + y, mask=mask)


@triton.jit
def _scale_add_offsets_without_block(x_ptr, y_ptr, out_ptr, alpha, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, alpha * x + y, mask=mask)


@triton.jit
def _scale_add_alpha_ignored(x_ptr, y_ptr, out_ptr, alpha, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _scale_add_shifted_load(x_ptr, y_ptr, out_ptr, alpha, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs + 1 < n_elements
    x = tl.load(x_ptr + offs + 1, mask=mask, other=0.0)
    y = tl.load(y_ptr + offs + 1, mask=mask, other=0.0)
    tl.store(out_ptr + offs, alpha * x + y, mask=offs < n_elements)


@pytest.mark.parametrize(
    ("kernel", "match"),
    [
        (_scale_add_stub, r"out was never written.*\n.*still `pass`"),
        (_scale_add_no_store_mask, r"wrote outside out: .* past the end.*\n.*mask=offs < n_elements"),
        (_scale_add_mask_off_by_one, r"wrote outside out: 1 element\(s\) past the end"),
        (_scale_add_mask_too_short, r"elements? \d+ of out were never written.*\n.*the last block's mask"),
        (_scale_add_offsets_without_block, r"never written.*\n.*program\(s\) .* wrote nothing .* pid \* BLOCK_SIZE"),
        (_scale_add_alpha_ignored, r"alpha is ignored"),
        (_scale_add_shifted_load, r"holds the value of element \d+.*\n.*off by one"),
    ],
)
def test_check_scale_add_rejects_wrong_kernels(kernel, match):
    with pytest.raises(CheckFailed, match=match):
        checks.check_scale_add(kernel)


# ----------------------------------------------------------------------------- 05.2 wrong kernels


@triton.jit
def _swiglu_stub(
    gate_up_ptr, out_ptr, I, stride_gu_row, stride_gu_col, stride_out_row, stride_out_col, BLOCK_I: tl.constexpr
):
    pass


@triton.jit
def _swiglu_swapped_strides(
    gate_up_ptr, out_ptr, I, stride_gu_row, stride_gu_col, stride_out_row, stride_out_col, BLOCK_I: tl.constexpr
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = offs < I
    gate = tl.load(gate_up_ptr + row * stride_gu_col + offs * stride_gu_row, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_gu_col + (offs + I) * stride_gu_row, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + offs * stride_out_col, gate * tl.sigmoid(gate) * up, mask=mask)


@triton.jit
def _swiglu_no_row_offset(
    gate_up_ptr, out_ptr, I, stride_gu_row, stride_gu_col, stride_out_row, stride_out_col, BLOCK_I: tl.constexpr
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = offs < I
    gate = tl.load(gate_up_ptr + offs * stride_gu_col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + (offs + I) * stride_gu_col, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + offs * stride_out_col, gate * tl.sigmoid(gate) * up, mask=mask)


@triton.jit
def _swiglu_hardcoded_row_width(
    gate_up_ptr, out_ptr, I, stride_gu_row, stride_gu_col, stride_out_row, stride_out_col, BLOCK_I: tl.constexpr
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = offs < I
    gate = tl.load(gate_up_ptr + row * 2 * I + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * I + offs + I, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * I + offs, gate * tl.sigmoid(gate) * up, mask=mask)


@triton.jit
def _swiglu_no_store_mask(
    gate_up_ptr, out_ptr, I, stride_gu_row, stride_gu_col, stride_out_row, stride_out_col, BLOCK_I: tl.constexpr
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = offs < I
    gate = tl.load(gate_up_ptr + row * stride_gu_row + offs * stride_gu_col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_gu_row + (offs + I) * stride_gu_col, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + offs * stride_out_col, gate * tl.sigmoid(gate) * up)


@triton.jit
def _swiglu_gate_up_swapped(
    gate_up_ptr, out_ptr, I, stride_gu_row, stride_gu_col, stride_out_row, stride_out_col, BLOCK_I: tl.constexpr
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = offs < I
    up = tl.load(gate_up_ptr + row * stride_gu_row + offs * stride_gu_col, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_up_ptr + row * stride_gu_row + (offs + I) * stride_gu_col, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + offs * stride_out_col, gate * tl.sigmoid(gate) * up, mask=mask)


@triton.jit
def _swiglu_first_block_only(
    gate_up_ptr, out_ptr, I, stride_gu_row, stride_gu_col, stride_out_row, stride_out_col, BLOCK_I: tl.constexpr
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_I)  # forgot program_id(1): every column block redoes block 0
    mask = offs < I
    gate = tl.load(gate_up_ptr + row * stride_gu_row + offs * stride_gu_col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_gu_row + (offs + I) * stride_gu_col, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + offs * stride_out_col, gate * tl.sigmoid(gate) * up, mask=mask)


@triton.jit
def _swiglu_sigmoid_only(
    gate_up_ptr, out_ptr, I, stride_gu_row, stride_gu_col, stride_out_row, stride_out_col, BLOCK_I: tl.constexpr
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = offs < I
    gate = tl.load(gate_up_ptr + row * stride_gu_row + offs * stride_gu_col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_gu_row + (offs + I) * stride_gu_col, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + offs * stride_out_col, tl.sigmoid(gate) * up, mask=mask)


@pytest.mark.parametrize(
    ("kernel", "match"),
    [
        (_swiglu_stub, r"out was never written.*\n.*still `pass`"),
        (_swiglu_swapped_strides, r"wrong strides: gate_up's strides are swapped"),
        (_swiglu_no_row_offset, r"wrong stride: row \d+ of out holds row 0's values.*\n.*row \* stride_gu_row"),
        (_swiglu_hardcoded_row_width, r"wrote outside out.*elements inside are wrong.*\n.*not a hard-coded I"),
        (
            _swiglu_no_store_mask,
            r"wrote outside out: row 0, column \d+, but out has only I=\d+ columns.*\n.*mask=offs_i < I",
        ),
        (_swiglu_gate_up_swapped, r"gate and up are swapped"),
        (_swiglu_first_block_only, r"columns \d+\.\.\d+ of every row were never written.*\n.*pid_i \* BLOCK_I"),
        (_swiglu_sigmoid_only, r"silu\(g\) is g \* sigmoid\(g\)"),
    ],
)
def test_check_swiglu_rows_rejects_wrong_kernels(kernel, match):
    with pytest.raises(CheckFailed, match=match):
        checks.check_swiglu_rows(kernel)


# ----------------------------------------------------------------------------- 05.3 wrong kernels


@triton.jit
def _matmul_stub(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pass


@triton.jit
def _matmul_no_k_mask(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=offs_m[:, None] < M, other=0.0)  # masks M and N, forgets the K tail
        b = tl.load(b_ptrs, mask=offs_n[None, :] < N, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
        acc,
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


@triton.jit
def _matmul_k_mask_on_a_only(
    a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K - k * BLOCK_K), other=0.0)
        b = tl.load(b_ptrs, mask=offs_n[None, :] < N, other=0.0)  # B's K tail unmasked: 0 * garbage
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc, mask=c_mask)


@triton.jit
def _matmul_skips_k_tail(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):  # whole blocks only: the tail is never added
        a = tl.load(a_ptrs, mask=offs_m[:, None] < M, other=0.0)
        b = tl.load(b_ptrs, mask=offs_n[None, :] < N, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
        acc,
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


@triton.jit
def _matmul_no_store_mask(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K - k * BLOCK_K), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k * BLOCK_K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc)


@triton.jit
def _matmul_swapped_a_strides(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_ak + offs_k[None, :] * stride_am
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K - k * BLOCK_K), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k * BLOCK_K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_am
        b_ptrs += BLOCK_K * stride_bk
    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
        acc,
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


@triton.jit
def _matmul_assumes_contiguous(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * K + offs_k[None, :]  # row-major A assumed
    b_ptrs = b_ptr + offs_k[:, None] * N + offs_n[None, :]  # row-major B assumed
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K - k * BLOCK_K), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k * BLOCK_K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * N
    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
        acc,
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


@triton.jit
def _matmul_overwrites_acc(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K - k * BLOCK_K), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k * BLOCK_K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b)  # overwrites instead of accumulating
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
        acc,
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


@triton.jit
def _matmul_pids_swapped_store(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Only program_id(0) is used: every pid_n writes the tile of column block 0.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K - k * BLOCK_K), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < K - k * BLOCK_K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
        acc,
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


@pytest.mark.parametrize(
    ("kernel", "match"),
    [
        (_matmul_stub, r"C was never written.*\n.*still `pass`"),
        (_matmul_no_k_mask, r"every element of C came out NaN.*\n.*column tail K % BLOCK_K = \d+ ignored"),
        (_matmul_k_mask_on_a_only, r"C came out NaN.*\n.*column tail K % BLOCK_K = \d+ ignored.*mask BOTH loads"),
        (_matmul_skips_k_tail, r"column tail K % BLOCK_K = \d+ ignored"),
        (_matmul_no_store_mask, r"wrote outside C: row \d+, but C has only M=\d+ rows.*\n.*offs_m\[:, None\] < M"),
        (_matmul_swapped_a_strides, r"wrong strides: A's strides are swapped"),
        (_matmul_assumes_contiguous, r"wrong strides: B is read as if it were contiguous"),
        (_matmul_overwrites_acc, r"only the last K block counts.*acc = tl.dot\(a, b, acc\)"),
        (
            _matmul_pids_swapped_store,
            r"tiles of programs \(pid_m, pid_n\) = \(\d, 1\).* never written.*\n.*tl.program_id\(1\)",
        ),
    ],
)
def test_check_matmul_rejects_wrong_kernels(kernel, match):
    with pytest.raises(CheckFailed, match=match):
        checks.check_matmul(kernel)


@triton.jit
def _scale_add_bad_block(x_ptr, y_ptr, out_ptr, alpha, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, 3)  # not a power of two: does not compile
    tl.store(out_ptr + offs, tl.load(x_ptr + offs), mask=offs < n_elements)


def test_a_kernel_that_crashes_is_reported_with_its_case():
    with pytest.raises(CheckFailed, match=r"your kernel raised \w+ on n_elements=\d+, BLOCK_SIZE=\d+"):
        checks.check_scale_add(_scale_add_bad_block)


def test_every_exercise_is_listed_for_the_course():
    from moe_learn.course.exercises import all_exercises

    assert {"05.1", "05.2", "05.3"} <= set(all_exercises())
