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
from tests.course.planted import WithBug

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


# ----------------------------------------------------------------------------- planted bugs
#
# One kernel per exercise, the reference with BUG_* switches: each switch plants one mistake.


@triton.jit
def scale_add_kernel(
    x_ptr, y_ptr, out_ptr, alpha, n_elements, BLOCK_SIZE: tl.constexpr,
    BUG_NO_STORE: tl.constexpr = False,  # the body is still `pass` (or the store is missing)
    BUG_NO_STORE_MASK: tl.constexpr = False,
    BUG_MASK_OFF_BY_ONE: tl.constexpr = False,  # offs <= n_elements
    BUG_MASK_TOO_SHORT: tl.constexpr = False,  # offs < n_elements - 1
    BUG_OFFSETS_WITHOUT_BLOCK: tl.constexpr = False,  # pid + arange, not pid * BLOCK_SIZE + arange
    BUG_ALPHA_IGNORED: tl.constexpr = False,
    BUG_SHIFTED_LOAD: tl.constexpr = False,  # loads at offs + 1, store at offs
    BUG_ARANGE_OF_3: tl.constexpr = False,  # tl.arange(0, 3): not a power of two, does not compile
):  # fmt: skip
    pid = tl.program_id(0)
    if BUG_OFFSETS_WITHOUT_BLOCK:
        offs = pid + tl.arange(0, BLOCK_SIZE)
    elif BUG_ARANGE_OF_3:
        offs = pid * BLOCK_SIZE + tl.arange(0, 3)
    else:
        offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    if BUG_MASK_OFF_BY_ONE:
        mask = offs <= n_elements
    elif BUG_MASK_TOO_SHORT:
        mask = offs < n_elements - 1
    else:
        mask = offs < n_elements
    if BUG_SHIFTED_LOAD:
        x = tl.load(x_ptr + offs + 1, mask=offs + 1 < n_elements, other=0.0)
        y = tl.load(y_ptr + offs + 1, mask=offs + 1 < n_elements, other=0.0)
    else:
        x = tl.load(x_ptr + offs, mask=mask)
        y = tl.load(y_ptr + offs, mask=mask)
    if BUG_ALPHA_IGNORED:
        out = x + y
    else:
        out = alpha * x + y
    if BUG_NO_STORE:
        pass
    elif BUG_NO_STORE_MASK:
        tl.store(out_ptr + offs, out)
    else:
        tl.store(out_ptr + offs, out, mask=mask)


def test_scale_add_kernel_without_bugs_passes(capsys):
    checks.check_scale_add(scale_add_kernel)
    assert "[PASS] 05.1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("bug", "match"),
    [
        ("BUG_NO_STORE", r"out was never written.*\n.*still `pass`"),
        ("BUG_NO_STORE_MASK", r"wrote outside out: .* past the end.*\n.*mask=offs < n_elements"),
        ("BUG_MASK_OFF_BY_ONE", r"wrote outside out: 1 element\(s\) past the end"),
        ("BUG_MASK_TOO_SHORT", r"elements? \d+ of out were never written.*\n.*the last block's mask"),
        ("BUG_OFFSETS_WITHOUT_BLOCK", r"never written.*\n.*program\(s\) .* wrote nothing .* pid \* BLOCK_SIZE"),
        ("BUG_ALPHA_IGNORED", r"alpha is ignored"),
        ("BUG_SHIFTED_LOAD", r"holds the value of element \d+.*\n.*off by one"),
        ("BUG_ARANGE_OF_3", r"your kernel raised \w+ on n_elements=\d+, BLOCK_SIZE=\d+"),
    ],
)
def test_check_scale_add_rejects_planted_bugs(bug, match):
    with pytest.raises(CheckFailed, match=match):
        checks.check_scale_add(WithBug(scale_add_kernel, **{bug: True}))


@triton.jit
def swiglu_kernel(
    gate_up_ptr, out_ptr, I, stride_gu_row, stride_gu_col, stride_out_row, stride_out_col, BLOCK_I: tl.constexpr,
    BUG_NO_STORE: tl.constexpr = False,
    BUG_SWAPPED_STRIDES: tl.constexpr = False,  # row * stride_gu_col + column * stride_gu_row
    BUG_NO_ROW_OFFSET: tl.constexpr = False,  # every row reads row 0
    BUG_HARDCODED_ROW_WIDTH: tl.constexpr = False,  # row * 2 * I (and row * I for out): strides ignored
    BUG_NO_STORE_MASK: tl.constexpr = False,
    BUG_GATE_UP_SWAPPED: tl.constexpr = False,
    BUG_FIRST_BLOCK_ONLY: tl.constexpr = False,  # forgot program_id(1): every column block redoes block 0
    BUG_SIGMOID_ONLY: tl.constexpr = False,  # sigmoid(g) * up instead of g * sigmoid(g) * up
):  # fmt: skip
    row = tl.program_id(0)
    if BUG_FIRST_BLOCK_ONLY:
        offs = tl.arange(0, BLOCK_I)
    else:
        offs = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = offs < I
    row_step = stride_gu_row
    col_step = stride_gu_col
    out_row_step = stride_out_row
    out_col_step = stride_out_col
    if BUG_SWAPPED_STRIDES:
        row_step = stride_gu_col
        col_step = stride_gu_row
    if BUG_NO_ROW_OFFSET:
        row_step = 0
    if BUG_HARDCODED_ROW_WIDTH:
        row_step = 2 * I
        col_step = 1
        out_row_step = I
        out_col_step = 1
    gate_ptrs = gate_up_ptr + row * row_step + offs * col_step
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + I * col_step, mask=mask, other=0.0).to(tl.float32)
    if BUG_GATE_UP_SWAPPED:
        swapped = gate
        gate = up
        up = swapped
    if BUG_SIGMOID_ONLY:
        out = tl.sigmoid(gate) * up
    else:
        out = gate * tl.sigmoid(gate) * up
    out_ptrs = out_ptr + row * out_row_step + offs * out_col_step
    if BUG_NO_STORE:
        pass
    elif BUG_NO_STORE_MASK:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def test_swiglu_kernel_without_bugs_passes(capsys):
    checks.check_swiglu_rows(swiglu_kernel)
    assert "[PASS] 05.2" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("bug", "match"),
    [
        ("BUG_NO_STORE", r"out was never written.*\n.*still `pass`"),
        ("BUG_SWAPPED_STRIDES", r"wrong strides: gate_up's strides are swapped"),
        ("BUG_NO_ROW_OFFSET", r"wrong stride: row \d+ of out holds row 0's values.*\n.*row \* stride_gu_row"),
        ("BUG_HARDCODED_ROW_WIDTH", r"wrote outside out.*elements inside are wrong.*\n.*not a hard-coded I"),
        (
            "BUG_NO_STORE_MASK",
            r"wrote outside out: row 0, column \d+, but out has only I=\d+ columns.*\n.*mask=offs_i < I",
        ),
        ("BUG_GATE_UP_SWAPPED", r"gate and up are swapped"),
        ("BUG_FIRST_BLOCK_ONLY", r"columns \d+\.\.\d+ of every row were never written.*\n.*pid_i \* BLOCK_I"),
        ("BUG_SIGMOID_ONLY", r"silu\(g\) is g \* sigmoid\(g\)"),
    ],
)
def test_check_swiglu_rows_rejects_planted_bugs(bug, match):
    with pytest.raises(CheckFailed, match=match):
        checks.check_swiglu_rows(WithBug(swiglu_kernel, **{bug: True}))


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BUG_NO_STORE: tl.constexpr = False,
    BUG_NO_K_MASK: tl.constexpr = False,  # loads masked on M and N only
    BUG_K_MASK_ON_A_ONLY: tl.constexpr = False,  # B's K tail unmasked: 0 * whatever lies there
    BUG_SKIPS_K_TAIL: tl.constexpr = False,  # K // BLOCK_K steps: the tail is never added
    BUG_NO_STORE_MASK: tl.constexpr = False,
    BUG_SWAPPED_A_STRIDES: tl.constexpr = False,
    BUG_ASSUMES_CONTIGUOUS: tl.constexpr = False,  # row-major A and B assumed: K and N as row widths
    BUG_OVERWRITES_ACC: tl.constexpr = False,  # acc = tl.dot(a, b): only the last K block counts
    BUG_ONLY_PROGRAM_ID_0: tl.constexpr = False,  # every pid_n writes the tile of column block 0
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if BUG_ONLY_PROGRAM_ID_0:
        offs_n = tl.arange(0, BLOCK_N)
    else:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    step_am = stride_am
    step_ak = stride_ak
    step_bk = stride_bk
    step_bn = stride_bn
    if BUG_SWAPPED_A_STRIDES:
        step_am = stride_ak
        step_ak = stride_am
    if BUG_ASSUMES_CONTIGUOUS:
        step_am = K
        step_ak = 1
        step_bk = N
        step_bn = 1
    a_ptrs = a_ptr + offs_m[:, None] * step_am + offs_k[None, :] * step_ak
    b_ptrs = b_ptr + offs_k[:, None] * step_bk + offs_n[None, :] * step_bn
    if BUG_SKIPS_K_TAIL:
        k_steps = K // BLOCK_K
    else:
        k_steps = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_steps):
        k_left = K - k * BLOCK_K
        if BUG_NO_K_MASK:
            a_mask = offs_m[:, None] < M
        else:
            a_mask = (offs_m[:, None] < M) & (offs_k[None, :] < k_left)
        if BUG_NO_K_MASK or BUG_K_MASK_ON_A_ONLY:
            b_mask = offs_n[None, :] < N
        else:
            b_mask = (offs_k[:, None] < k_left) & (offs_n[None, :] < N)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if BUG_OVERWRITES_ACC:
            acc = tl.dot(a, b)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * step_ak
        b_ptrs += BLOCK_K * step_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if BUG_NO_STORE:
        pass
    elif BUG_NO_STORE_MASK:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty))
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def test_matmul_kernel_without_bugs_passes(capsys):
    checks.check_matmul(matmul_kernel)
    assert "[PASS] 05.3" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("bug", "match"),
    [
        ("BUG_NO_STORE", r"C was never written.*\n.*still `pass`"),
        ("BUG_NO_K_MASK", r"every element of C came out NaN.*\n.*column tail K % BLOCK_K = \d+ ignored"),
        ("BUG_K_MASK_ON_A_ONLY", r"C came out NaN.*\n.*column tail K % BLOCK_K = \d+ ignored.*mask BOTH loads"),
        ("BUG_SKIPS_K_TAIL", r"column tail K % BLOCK_K = \d+ ignored"),
        ("BUG_NO_STORE_MASK", r"wrote outside C: row \d+, but C has only M=\d+ rows.*\n.*offs_m\[:, None\] < M"),
        ("BUG_SWAPPED_A_STRIDES", r"wrong strides: A's strides are swapped"),
        ("BUG_ASSUMES_CONTIGUOUS", r"wrong strides: B is read as if it were contiguous"),
        ("BUG_OVERWRITES_ACC", r"only the last K block counts.*acc = tl.dot\(a, b, acc\)"),
        (
            "BUG_ONLY_PROGRAM_ID_0",
            r"tiles of programs \(pid_m, pid_n\) = \(\d, 1\).* never written.*\n.*tl.program_id\(1\)",
        ),
    ],
)
def test_check_matmul_rejects_planted_bugs(bug, match):
    with pytest.raises(CheckFailed, match=match):
        checks.check_matmul(WithBug(matmul_kernel, **{bug: True}))


def test_every_exercise_is_listed_for_the_course():
    from moe_learn.course.exercises import all_exercises

    assert {"05.1", "05.2", "05.3"} <= set(all_exercises())
