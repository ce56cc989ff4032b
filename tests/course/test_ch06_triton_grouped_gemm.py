"""Chapter 06 checks accept the right answers and reject plausible wrong ones with pointed messages."""

import pytest
import triton
import triton.language as tl

from moe_learn.course.checks._core import CheckFailed
from moe_learn.course.checks.ch06_triton_grouped_gemm import (
    LOCATE_MISTAKES,
    check_grouped_gemm_kernel,
    check_locate_tile,
)

# ------------------------------------------------------------------ 06.1


def locate_tile(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    before = 0
    for e, m in enumerate(m_sizes):
        tiles = -(-m // BLOCK_M) * num_n_tiles
        if tile_id < before + tiles:
            local = tile_id - before
            return e, local // num_n_tiles, local % num_n_tiles
        before += tiles
    return None


def locate_floor(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    before = 0
    for e, m in enumerate(m_sizes):
        tiles = (m // BLOCK_M) * num_n_tiles  # forgets the partial last row block
        if tile_id < before + tiles:
            local = tile_id - before
            return e, local // num_n_tiles, local % num_n_tiles
        before += tiles
    return None


def locate_column_major(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    before = 0
    for e, m in enumerate(m_sizes):
        num_m = -(-m // BLOCK_M)
        if tile_id < before + num_m * num_n_tiles:
            local = tile_id - before
            return e, local % num_m, local // num_m  # column-major inside the expert
        before += num_m * num_n_tiles
    return None


def locate_empty_has_a_tile(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    before = 0
    for e, m in enumerate(m_sizes):
        tiles = max(1, -(-m // BLOCK_M)) * num_n_tiles  # an empty expert still gets a row block
        if tile_id < before + tiles:
            local = tile_id - before
            return e, local // num_n_tiles, local % num_n_tiles
        before += tiles
    return None


def locate_inclusive(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    before = 0
    for e, m in enumerate(m_sizes):
        tiles = -(-m // BLOCK_M) * num_n_tiles
        if tile_id <= before + tiles:  # off by one: the next expert's first tile lands here
            local = tile_id - before
            return e, local // num_n_tiles, local % num_n_tiles
        before += tiles
    return None


def locate_forgets_column_blocks(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    before = 0
    for e, m in enumerate(m_sizes):
        tiles = -(-m // BLOCK_M)  # row blocks only: no known mistake, so the general cause
        if tile_id < before + tiles:
            local = tile_id - before
            return e, local // num_n_tiles, local % num_n_tiles
        before += tiles
    return None


def test_locate_tile_reference_passes(capsys):
    check_locate_tile(locate_tile)
    assert "[PASS] 06.1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "fn,match",
    [
        (locate_floor, r"(?s)but you said expert .*m // BLOCK_M forgets the partial last one$"),
        (locate_column_major, r"(?s)row block 0, column block 1 .*row block by row block"),
        (locate_empty_has_a_tile, r"(?s)but you said expert .*an empty expert has no row blocks, hence no tiles"),
        (locate_inclusive, r"(?s)tile 1 covers .*but you said expert 0.*not <= \(an off-by-one\)"),
        (locate_forgets_column_blocks, r"(?s)but you said expert .*tiles of the experts before this one"),
    ],
)
def test_locate_tile_rejects(fn, match):
    with pytest.raises(CheckFailed, match=match) as info:
        check_locate_tile(fn)
    causes = [cause for _, cause in LOCATE_MISTAKES if cause in str(info.value)]
    assert len(causes) <= 1, f"one cause named, not several: {causes}"


def test_locate_tile_names_only_the_mistake_that_was_made():
    """Each known mistake gets its own cause, never another one's (the <= bug used to get 'cdiv')."""
    for fn, flags in ((locate_inclusive, "inclusive"), (locate_floor, "floor"), (locate_empty_has_a_tile, "min_one")):
        with pytest.raises(CheckFailed) as info:
            check_locate_tile(fn)
        named = [cause for mistake, cause in LOCATE_MISTAKES if cause in str(info.value)]
        expected = [cause for mistake, cause in LOCATE_MISTAKES if flags in mistake]
        assert named == expected, (fn.__name__, str(info.value))


def test_locate_tile_stub_propagates():
    def stub(*args):
        raise NotImplementedError("exercise 06.1")

    with pytest.raises(NotImplementedError):
        check_locate_tile(stub)


# ------------------------------------------------------------------ 06.2


@triton.jit
def learner_kernel(
    x_ptr, w_ptr, y_ptr, m_sizes_ptr,
    N, K, NUM_EXPERTS,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    BUG_NO_K_MASK: tl.constexpr = False,
    BUG_FLOOR_TILES: tl.constexpr = False,
    BUG_BUSY_EXPERT_INDEX: tl.constexpr = False,
    BUG_NO_N_STORE_MASK: tl.constexpr = False,
    BUG_NO_M_STORE_MASK: tl.constexpr = False,
):  # fmt: skip
    """A learner's kernel, with switches that plant one mistake each."""
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    next_tile = pid
    tiles_before = 0
    row_start = 0
    busy = 0
    for e in range(NUM_EXPERTS):
        m_size = tl.load(m_sizes_ptr + e)
        if BUG_FLOOR_TILES:
            num_m_tiles = m_size // BLOCK_M
        else:
            num_m_tiles = tl.cdiv(m_size, BLOCK_M)
        tiles_end = tiles_before + num_m_tiles * num_n_tiles
        if BUG_BUSY_EXPERT_INDEX:
            w_e = busy  # counts only experts that have tokens
        else:
            w_e = e
        while next_tile < tiles_end:
            local = next_tile - tiles_before
            offs_m = (local // num_n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = (local % num_n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_k = tl.arange(0, BLOCK_K)
            mask_m = offs_m < m_size
            mask_n = offs_n < N
            x_ptrs = x_ptr + (row_start + offs_m)[:, None] * stride_xm + offs_k[None, :] * stride_xk
            w_ptrs = w_ptr + w_e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                if BUG_NO_K_MASK:
                    a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
                    b = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
                else:
                    mask_k = offs_k < K - k0
                    a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                    b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = tl.dot(a, b, acc)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk
            y_ptrs = y_ptr + (row_start + offs_m)[:, None] * stride_ym + offs_n[None, :] * stride_yn
            if BUG_NO_N_STORE_MASK:
                tl.store(y_ptrs, acc, mask=mask_m[:, None])
            elif BUG_NO_M_STORE_MASK:
                tl.store(y_ptrs, acc, mask=mask_n[None, :])
            else:
                tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
            next_tile += NUM_PROGRAMS
        tiles_before = tiles_end
        row_start += m_size
        busy += (m_size > 0).to(tl.int32)


class WithBug:
    """``kernel[grid](...)`` with one BUG_* switch on: looks like a kernel to the check."""

    def __init__(self, kernel, **bugs):
        self.kernel, self.bugs = kernel, bugs

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel[grid](*args, **kwargs, **self.bugs)


def test_kernel_reference_passes(capsys):
    check_grouped_gemm_kernel(learner_kernel)
    assert "[PASS] 06.2" in capsys.readouterr().out


@triton.jit
def pass_kernel(
    x_ptr, w_ptr, y_ptr, m_sizes_ptr,
    N, K, NUM_EXPERTS,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):  # fmt: skip
    pass


@pytest.mark.parametrize(
    "bug,match",
    [
        ("BUG_NO_K_MASK", r"(?s)rows 0-15 of expert 0 .* hold wrong values.*K tail.*mask the loads of the last K step"),
        ("BUG_FLOOR_TILES", r"(?s)rows 0-4 of expert 0 .*never written.*partly full row block"),
        ("BUG_BUSY_EXPERT_INDEX", r"(?s)rows 0-15 of expert 1 .* hold expert 0's product.*tile -> expert mapping"),
        ("BUG_NO_N_STORE_MASK", r"(?s)wrote column 4\d of row .*only 40 columns.*offs_n < N"),
        ("BUG_NO_M_STORE_MASK", r"(?s)wrote past the last output row.*mask the store with the rows that exist"),
    ],
)
def test_kernel_rejects(bug, match):
    with pytest.raises(CheckFailed, match=match):
        check_grouped_gemm_kernel(WithBug(learner_kernel, **{bug: True}))


def test_kernel_stub_wrote_nothing():
    with pytest.raises(CheckFailed, match="(?s)wrote nothing.*still `pass`"):
        check_grouped_gemm_kernel(pass_kernel)
