"""Learners' kernels with planted bugs, for the tests of the kernel checks.

A planted-bug kernel is the right kernel with ``BUG_*: tl.constexpr`` switches, each of which
plants one mistake; ``WithBug`` turns switches on and hands the check something it launches
like a kernel. ``grouped_gemm_kernel`` serves chapters 06 and 07 (chapter 07's kernel is
chapter 06's with a gather prologue and a scatter epilogue): ``Chapter06`` launches it with
chapter 06's arguments.
"""

import triton
import triton.language as tl


class WithBug:
    """``kernel[grid](...)`` with the given BUG_* switches on: looks like a kernel to the check."""

    def __init__(self, kernel, **bugs):
        unknown = set(bugs) - set(kernel.arg_names)
        if unknown:  # Triton ignores unknown keywords: a misspelled switch would plant nothing
            raise TypeError(f"{kernel.__name__} has no switch {sorted(unknown)}")
        self.kernel, self.bugs = kernel, bugs

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel[grid](*args, **kwargs, **self.bugs)


@triton.jit
def grouped_gemm_kernel(
    x_ptr, w_ptr, y_ptr, m_sizes_ptr, gather_ptr, topk_weights_ptr,
    N, K, NUM_EXPERTS,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_ym, stride_yn,
    TOP_K: tl.constexpr, PERMUTE_X: tl.constexpr, PERMUTE_Y: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    # chapter 06: the walk over the experts' tiles and the masks
    BUG_NO_STORE: tl.constexpr = False,  # the body is still `pass` (or the store is missing)
    BUG_NO_K_MASK: tl.constexpr = False,
    BUG_FLOOR_TILES: tl.constexpr = False,  # m_size // BLOCK_M row blocks: the partial last one is lost
    BUG_BUSY_EXPERT_INDEX: tl.constexpr = False,  # W of the busy-expert count, not of expert e
    BUG_NO_N_STORE_MASK: tl.constexpr = False,
    BUG_NO_M_STORE_MASK: tl.constexpr = False,
    # chapter 07: the gather prologue and the scatter epilogue
    BUG_NO_TOPK_DIV: tl.constexpr = False,  # X[flat] instead of X[flat // TOP_K]
    BUG_NO_WEIGHTS: tl.constexpr = False,
    BUG_WEIGHT_BY_ROW: tl.constexpr = False,  # topk_weights[i] instead of topk_weights[flat]
    BUG_UNPERMUTED_STORE: tl.constexpr = False,  # PERMUTE_Y ignored
    BUG_SCATTER_TO_TOKEN: tl.constexpr = False,  # stores at flat // TOP_K instead of flat
):  # fmt: skip
    """Y = X @ W[e].T per expert, walked by a persistent grid; optionally fused with the permutations."""
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
            rows = row_start + offs_m
            if PERMUTE_X or PERMUTE_Y or HAS_WEIGHTS:
                flat = tl.load(gather_ptr + rows, mask=mask_m, other=0)
            x_rows = rows
            if PERMUTE_X:
                if BUG_NO_TOPK_DIV:
                    x_rows = flat
                else:
                    x_rows = flat // TOP_K
            x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
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
            if BUG_NO_STORE:
                pass
            elif BUG_NO_N_STORE_MASK:
                tl.store(y_ptrs, acc, mask=mask_m[:, None])
            elif BUG_NO_M_STORE_MASK:
                tl.store(y_ptrs, acc, mask=mask_n[None, :])
            else:
                tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
            next_tile += NUM_PROGRAMS
        tiles_before = tiles_end
        row_start += m_size
        busy += (m_size > 0).to(tl.int32)


class Chapter06(WithBug):
    """``grouped_gemm_kernel`` launched with chapter 06's arguments: no gather, no weights, no fusion."""

    def __init__(self, **bugs):
        super().__init__(grouped_gemm_kernel, **bugs)

    def __getitem__(self, grid):
        launch = super().__getitem__(grid)

        def run(x, w, y, m_sizes, *sizes_and_strides, **constexprs):
            # m_sizes stands in for the gather and weight pointers, which these flags never read
            off = {"TOP_K": 1, "PERMUTE_X": False, "PERMUTE_Y": False, "HAS_WEIGHTS": False}
            return launch(x, w, y, m_sizes, m_sizes, m_sizes, *sizes_and_strides, **constexprs, **off)

        return run
