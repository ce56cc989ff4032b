"""The grouped GEMM tuned for Hopper (H100/H200): persistent, TMA loads, per-shape configs.

Same semantics as ``moe_learn.kernels.grouped_gemm.grouped_gemm`` (W in the ``[E, N, K]``
layout, optional gather of X rows, scatter of Y rows and routing weights), with the
choices that matter on an H100:

- A persistent grid (one program per SM). Each program walks the experts in order and
  takes every ``NUM_PROGRAMS``-th tile; the tile -> expert map comes from ``m_sizes`` on
  the device, so nothing waits on the host and empty experts cost nothing.
- Inside an expert, the M tile index runs fastest: programs that run side by side share
  one weight tile, so each weight byte comes from DRAM about once (small-T cases are
  bound by reading the weights).
- The weight tiles (and X when it is not gathered) arrive through the tensor memory
  accelerator (TMA): one descriptor per operand, hardware address generation and
  zero fill past the edges; the K loop is software-pipelined ``num_stages`` deep.
- Rows past an expert's end are loaded (they belong to the next expert, or are zero
  fill) but never stored: the store mask is the only guard, so no padding is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4: host-side tensor descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton has no TMA path
    TensorDescriptor = None


@triton.jit
def _grouped_gemm_tma_kernel(
    x_ptr, x_desc, w_desc, y_ptr, m_sizes_ptr, gather_ptr, weights_ptr,
    N, K, E, num_tiles_upper, stride_xm, stride_ym,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, PERMUTE_X: tl.constexpr, PERMUTE_Y: tl.constexpr, WEIGHTED: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    # where this program stands in the walk over experts (only ever moves forward)
    e = 0
    row_start = 0
    m_e = tl.load(m_sizes_ptr)
    tiles_start = 0
    tiles_end = tl.cdiv(m_e, BLOCK_M) * num_n_tiles

    for tile_id in range(pid, num_tiles_upper, NUM_PROGRAMS):
        while (tile_id >= tiles_end) & (e < E - 1):
            e += 1
            row_start += m_e
            m_e = tl.load(m_sizes_ptr + e)
            tiles_start = tiles_end
            tiles_end += tl.cdiv(m_e, BLOCK_M) * num_n_tiles
        if tile_id < tiles_end:
            local = tile_id - tiles_start
            num_m_tiles = tl.cdiv(m_e, BLOCK_M)
            tile_m = local % num_m_tiles
            tile_n = local // num_m_tiles
            offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
            m_mask = offs_m < m_e
            rows = row_start + offs_m  # rows in expert order
            n0 = tile_n * BLOCK_N

            if PERMUTE_X:  # gather token rows straight from X in token order
                src = tl.load(gather_ptr + rows, mask=m_mask, other=0) // TOPK
                x_ptrs = x_ptr + src.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                if PERMUTE_X:
                    x = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < K - k0), other=0.0)
                    x_ptrs += BLOCK_K
                else:
                    x = x_desc.load([row_start + tile_m * BLOCK_M, k0])
                w = w_desc.load([e * N + n0, k0])
                acc = tl.dot(x, w.T, acc)

            offs_n = n0 + tl.arange(0, BLOCK_N)
            if PERMUTE_Y:  # write each row back to its (token, slot) position
                out_rows = tl.load(gather_ptr + rows, mask=m_mask, other=0)
            else:
                out_rows = rows
            if WEIGHTED:
                acc = acc * tl.load(weights_ptr + out_rows, mask=m_mask, other=0.0).to(tl.float32)[:, None]
            y_ptrs = y_ptr + out_rows.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n[None, :] < N))


@triton.jit
def _grouped_gemm_tma_map_kernel(
    x_ptr, x_desc, w_desc, y_ptr, m_sizes_ptr, gather_ptr, weights_ptr,
    N, K, E, stride_xm, stride_ym,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, NUM_PROGRAMS: tl.constexpr, PERMUTE_X: tl.constexpr, PERMUTE_Y: tl.constexpr,
    WEIGHTED: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # The whole tile map lives in registers: per expert, its rows, first row, first tile.
    offs_e = tl.arange(0, BLOCK_E)
    sizes = tl.load(m_sizes_ptr + offs_e, mask=offs_e < E, other=0)
    m_tiles = tl.cdiv(sizes, BLOCK_M)
    tile_end = tl.cumsum(m_tiles * num_n_tiles, axis=0)
    tile_begin = tile_end - m_tiles * num_n_tiles
    row_begin = tl.cumsum(sizes, axis=0) - sizes
    num_tiles = tl.sum(m_tiles * num_n_tiles)

    # A plain counted loop (no data-dependent while) lets Triton pipeline across tiles:
    # the next tile's loads are issued while this tile's epilogue runs.
    for tile_id in tl.range(pid, num_tiles, NUM_PROGRAMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        e = tl.sum((tile_end <= tile_id).to(tl.int32))  # experts finished before this tile
        this = offs_e == e
        m_e = tl.sum(tl.where(this, sizes, 0))
        num_m_tiles = tl.sum(tl.where(this, m_tiles, 0))
        local = tile_id - tl.sum(tl.where(this, tile_begin, 0))
        row_start = tl.sum(tl.where(this, row_begin, 0))
        tile_m = local % num_m_tiles
        tile_n = local // num_m_tiles
        offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_e
        rows = row_start + offs_m
        n0 = tile_n * BLOCK_N
        if PERMUTE_X:
            src = tl.load(gather_ptr + rows, mask=m_mask, other=0) // TOPK
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if PERMUTE_X:
                x = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_xm + (k0 + offs_k)[None, :],
                            mask=m_mask[:, None] & (offs_k[None, :] < K - k0), other=0.0)
            else:
                x = x_desc.load([row_start + tile_m * BLOCK_M, k0])
            w = w_desc.load([e * N + n0, k0])
            acc = tl.dot(x, w.T, acc)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if PERMUTE_Y:
            out_rows = tl.load(gather_ptr + rows, mask=m_mask, other=0)
        else:
            out_rows = rows
        if WEIGHTED:
            acc = acc * tl.load(weights_ptr + out_rows, mask=m_mask, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + out_rows.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n[None, :] < N))


# (max rows per expert on average, config). Measured on an H100: see perf/NOTES.md.
DEFAULT_CONFIGS = (
    (64, dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4)),
    (256, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)),
    (float("inf"), dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)),
)


def pick_config(rows_per_expert: float) -> dict:
    for limit, config in DEFAULT_CONFIGS:
        if rows_per_expert <= limit:
            return dict(config)
    raise AssertionError("unreachable")


_NUM_SMS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def tma_supported(X: torch.Tensor, W: torch.Tensor) -> bool:
    """TMA needs Hopper or newer, 16-byte aligned rows and base addresses."""
    if TensorDescriptor is None or not X.is_cuda or torch.cuda.get_device_capability(X.device)[0] < 9:
        return False
    elem = W.element_size()
    return (W.shape[2] * elem) % 16 == 0 and W.data_ptr() % 16 == 0 and X.data_ptr() % 16 == 0 and X.stride(1) == 1


def grouped_gemm_hopper(
    X: torch.Tensor,
    W: torch.Tensor,
    m_sizes: torch.Tensor,
    *,
    gather_indices: torch.Tensor | None = None,
    topk: int = 1,
    permute_x: bool = False,
    permute_y: bool = False,
    topk_weights: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    num_programs: int | None = None,
    schedule: str = "walk",
) -> torch.Tensor:
    """``Y_e = X_e @ W_e.T`` for all experts in one persistent launch (W is ``[E, N, K]``).

    Arguments are assumed valid (``grouped_gemm`` checks them before it dispatches here).
    ``m_sizes`` must be int32 on the GPU; ``config`` overrides the block sizes, warps and
    stages chosen from the average rows per expert.
    """
    E, N, K = W.shape
    M = gather_indices.numel() if gather_indices is not None else X.shape[0]
    rows_out = M
    if config is None:
        config = pick_config(M / max(E, 1))
    config = dict(config)
    bm, bn, bk = config.pop("BLOCK_M"), config.pop("BLOCK_N"), config.pop("BLOCK_K")
    if out is None:
        out = torch.empty(rows_out, N, dtype=X.dtype, device=X.device)
    if M == 0:
        return out
    w_desc = TensorDescriptor.from_tensor(W.view(E * N, K), block_shape=[bn, bk])
    x_desc = TensorDescriptor.from_tensor(X, block_shape=[bm, bk])
    num_tiles_upper = (triton.cdiv(M, bm) + E) * triton.cdiv(N, bn)
    programs = min(num_programs or num_sms(X.device), num_tiles_upper)
    dummy = m_sizes  # stands in for pointers a variant does not read
    if schedule != "walk":
        flatten, ws = config.pop("FLATTEN", True), config.pop("WARP_SPECIALIZE", False)
        _grouped_gemm_tma_map_kernel[(programs,)](
            X, x_desc, w_desc, out, m_sizes,
            gather_indices if gather_indices is not None else dummy,
            topk_weights.reshape(-1) if topk_weights is not None else dummy,
            N, K, E, X.stride(0), out.stride(0),
            TOPK=topk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=triton.next_power_of_2(E),
            NUM_PROGRAMS=programs, PERMUTE_X=permute_x, PERMUTE_Y=permute_y,
            WEIGHTED=topk_weights is not None, FLATTEN=flatten, WARP_SPECIALIZE=ws, **config,
        )
        return out
    _grouped_gemm_tma_kernel[(programs,)](
        X, x_desc, w_desc, out, m_sizes,
        gather_indices if gather_indices is not None else dummy,
        topk_weights.reshape(-1) if topk_weights is not None else dummy,
        N, K, E, num_tiles_upper, X.stride(0), out.stride(0),
        TOPK=topk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_PROGRAMS=programs,
        PERMUTE_X=permute_x, PERMUTE_Y=permute_y, WEIGHTED=topk_weights is not None,
        **config,
    )
    return out
