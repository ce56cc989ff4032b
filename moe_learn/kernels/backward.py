"""The weight gradient of a grouped GEMM, as a Triton kernel.

Forward (transpose=True): ``Y_e = X_e @ W_e.T`` with ``W [E, N, K]``, where ``X_e`` is the
block of ``m_sizes[e]`` rows that belong to expert e. Differentiating gives

    dX_e = dY_e @ W_e            (a grouped GEMM again, with the other W layout)
    dW_e = dY_e.T @ X_e          ([N, K]: a reduction over expert e's rows)

dX reuses the forward kernel (``grouped_gemm(dY, W, m_sizes, transpose=False)``). dW has a
different shape of work: each output tile ``dW[e, n:n+BN, k:k+BK]`` sums over ALL rows of
expert e, so one program owns one (expert, n-tile, k-tile) and walks down the expert's
rows in steps of BLOCK_M. An expert with no rows runs zero loop steps and stores zeros,
which is the right gradient: a weight that saw no tokens did not change the loss.

When the forward gathered X from token order (``permute_x``), the backward reads the same
rows the same way, ``X[gather_indices[i] // topk]``, instead of materialising the gathered X.

Two kernels compute it. ``_grouped_gemm_dw_kernel`` is the one chapter 09 builds: a grid of
(expert, n-tile, k-tile) programs, small tiles, everything through masked loads. On a Hopper
GPU ``_grouped_gemm_dw_tma_kernel`` takes bf16/fp16 work (``kernel="auto"``): a persistent
grid over the same tiles (expert-major, so programs running side by side read the same
expert's rows from L2), the expert's row range from prefix sums of ``m_sizes`` computed in
registers (no host-side cumsum, no sync), larger output tiles (128 x 128 or 128 x 256,
steps of 64 rows), the dY tiles (and X's when not gathered) through TMA, and configs tuned
per shape bucket. Its rows come in whole BLOCK_M steps that lie inside the expert, then one
masked step for the ragged tail, so no tile ever mixes two experts' rows (exact even when a
neighbouring expert's rows hold inf or NaN).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moe_learn.kernels import autotune
from moe_learn.kernels.autotune import autotune_enabled, choose_config, num_sms
from moe_learn.kernels.grouped_gemm import encode_config, needs_autograd
from moe_learn.kernels.grouped_gemm_hopper import TensorDescriptor, capability, tensor_descriptor
from moe_learn.kernels.launcher import FastLauncher, cdiv, next_power_of_2
from moe_learn.validation import (
    check_gather_indices,
    check_integer,
    check_m_sizes,
    check_positive_int,
    check_same_device,
    check_tensor,
)

_INT32_MAX = 2**31 - 1


@triton.jit
def _grouped_gemm_dw_kernel(
    x_ptr,  # [M_x, K]: expert-ordered rows, or token-ordered rows when PERMUTE_X
    dy_ptr,  # [M, N]: expert-ordered rows
    dw_ptr,  # output, element (e, n, k) at e*stride_dwe + n*stride_dwn + k*stride_dwk
    expert_offsets_ptr,  # [E + 1] int32/int64: rows of expert e are [offsets[e], offsets[e+1])
    gather_ptr,  # [M] gather indices (read only when PERMUTE_X)
    M,  # rows of dY; bounds every row and index the kernel forms
    N,
    K,
    stride_xm,
    stride_xk,
    stride_dym,
    stride_dyn,
    stride_dwe,
    stride_dwn,
    stride_dwk,
    TOP_K: tl.constexpr,
    PERMUTE_X: tl.constexpr,
    USE_INT64: tl.constexpr,  # offsets past 2**31 elements overflow int32 pointer math
    FP32_IEEE: tl.constexpr,  # fp32 inputs: full-precision dot, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    # Clamped into [0, M] whatever m_sizes held (validate=False skips the check): a negative
    # size gives an empty range and no range reaches past dY's last row.
    row_start = tl.minimum(tl.maximum(tl.load(expert_offsets_ptr + expert), 0), M)
    row_end = tl.minimum(tl.maximum(tl.load(expert_offsets_ptr + expert + 1), row_start), M)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if USE_INT64:
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
        row_start = row_start.to(tl.int64)
        row_end = row_end.to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # Walk down this expert's rows; an empty expert (row_start == row_end) never enters.
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        if PERMUTE_X:
            # The forward read X[gather_indices[i] // topk]; so does its gradient.
            flat = tl.load(gather_ptr + offs_m, mask=mask_m, other=0)
            mask_m = mask_m & (flat >= 0) & (flat < M)  # an index outside [0, M) drops its row
            x_rows = flat // TOP_K
            if USE_INT64:
                x_rows = x_rows.to(tl.int64)
        else:
            x_rows = offs_m
        x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
        # Masked rows load 0, so rows past the expert's end add nothing to the sum.
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if FP32_IEEE:
            acc += tl.dot(tl.trans(dy), x, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(dy), x)

    dw_ptrs = dw_ptr + expert * stride_dwe + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])


@triton.jit
def _grouped_gemm_dw_tma_kernel(
    x_ptr, x_desc, dy_ptr, dy_desc, dw_ptr, m_sizes_ptr, gather_ptr,
    M,  # rows of dY (the expert-ordered problem); bounds every row and index
    N, K, E, stride_xm, stride_dym, stride_dwe, stride_dwn, stride_dwk,
    TOP_K: tl.constexpr, PERMUTE_X: tl.constexpr,
    X_TMA: tl.constexpr,  # X tiles through TMA (not gathered, 16-byte aligned rows)
    DY_TMA: tl.constexpr,  # dY tiles through TMA (16-byte aligned rows)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands (exact), "tf32" (unused) for bf16/fp16
):
    pid = tl.program_id(0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_expert = tl.cdiv(N, BLOCK_N) * k_tiles
    # Each expert's rows [row_begin, row_end): prefix sums of m_sizes, clamped into [0, M]
    # whatever m_sizes holds (validate=False skips the check), summed in int64.
    offs_e = tl.arange(0, BLOCK_E)
    sizes = tl.maximum(tl.load(m_sizes_ptr + offs_e, mask=offs_e < E, other=0).to(tl.int64), 0)
    rows_through = tl.cumsum(sizes, axis=0)
    row_begin = tl.minimum(rows_through - sizes, M).to(tl.int32)
    row_end = tl.minimum(rows_through, M).to(tl.int32)

    # Tiles expert-major, k fastest: programs side by side share the expert's rows and dY's
    # column block. Every expert owns its tiles, an empty one too (it stores zeros).
    for tile_id in tl.range(pid, E * tiles_per_expert, NUM_PROGRAMS):
        e = tile_id // tiles_per_expert
        local = tile_id - e * tiles_per_expert
        n0 = (local // k_tiles) * BLOCK_N
        k0 = (local % k_tiles) * BLOCK_K
        this = offs_e == e
        start = tl.sum(tl.where(this, row_begin, 0))
        end = tl.sum(tl.where(this, row_end, 0))
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        # Whole steps: every row lies inside expert e, so the TMA boxes need no row mask
        # (past N or K they are zero-filled).
        full_end = start + (end - start) // BLOCK_M * BLOCK_M
        for m0 in range(start, full_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            if PERMUTE_X:  # the forward read X[gather_indices[i] // topk]; so does its gradient
                flat = tl.load(gather_ptr + offs_m)
                valid = (flat >= 0) & (flat < M)  # an index outside [0, M) drops its row
                x = tl.load(x_ptr + (flat // TOP_K).to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                            mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)
            elif X_TMA:
                x = x_desc.load([m0, k0])
            else:
                x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                            mask=offs_k[None, :] < K, other=0.0)
            if DY_TMA:
                dy = dy_desc.load([m0, n0])
            else:
                dy = tl.load(dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + offs_n[None, :],
                             mask=offs_n[None, :] < N, other=0.0)
            acc = tl.dot(dy.T, x, acc, input_precision=INPUT_PRECISION)
        if full_end < end:  # the ragged last step: masked loads stop exactly at the expert's end
            offs_m = full_end + tl.arange(0, BLOCK_M)
            mask_m = offs_m < end
            if PERMUTE_X:
                flat = tl.load(gather_ptr + offs_m, mask=mask_m, other=0)
                mask_m = mask_m & (flat >= 0) & (flat < M)
                x_rows = flat // TOP_K
            else:
                x_rows = offs_m
            x = tl.load(x_ptr + x_rows.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
            dy = tl.load(dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + offs_n[None, :],
                         mask=mask_m[:, None] & (offs_n[None, :] < N), other=0.0)
            acc = tl.dot(dy.T, x, acc, input_precision=INPUT_PRECISION)
        dw_ptrs = (dw_ptr + e.to(tl.int64) * stride_dwe + offs_n.to(tl.int64)[:, None] * stride_dwn
                   + offs_k.to(tl.int64)[None, :] * stride_dwk)
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


@triton.jit
def _gather_rows_kernel(x_ptr, gather_ptr, out_ptr, M, K, stride_xm, TOP_K: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """out[i] = X[gather[i] // TOP_K]; a zero row where gather[i] is outside [0, M) (as the dW kernel drops it)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < M
    flat = tl.load(gather_ptr + rows, mask=mask_r, other=0)
    valid = mask_r & (flat >= 0) & (flat < M)
    src = x_ptr + (flat // TOP_K).to(tl.int64)[:, None] * stride_xm
    dst = out_ptr + rows.to(tl.int64)[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)[None, :]
        tl.store(dst + cols, tl.load(src + cols, mask=valid[:, None] & (cols < K), other=0.0),
                 mask=mask_r[:, None] & (cols < K))


def gather_rows(X: torch.Tensor, gather_indices: torch.Tensor, topk: int) -> torch.Tensor:
    """``X[gather_indices // topk]`` ``[M, K]`` in expert order, zero rows for indices outside [0, M).

    The Hopper dW kernel reads X through TMA only when its rows come in expert order: gathered in
    the kernel, the X tiles are pointer loads, and dW runs at ~350 TFLOP/s against ~480 with X
    gathered first (Qwen3-30B-A3B T=8192 on an H200, perf/NOTES.md item 14), which pays for the copy.
    """
    M, K = gather_indices.shape[0], X.shape[1]
    out = X.new_empty(M, K)
    if M and K:
        _gather_rows_kernel[(cdiv(M, 16),)](X, gather_indices, out, M, K, X.stride(0), TOP_K=topk, BLOCK_R=16,
                                            BLOCK_K=min(256, next_power_of_2(K)))
    return out


def _block(size: int, cap: int) -> int:
    """Smallest power of two >= size, at least 16 (tl.dot's minimum) and at most cap."""
    return max(16, min(cap, next_power_of_2(max(size, 1))))


def grouped_gemm_dw(
    X: torch.Tensor,
    dY: torch.Tensor,
    m_sizes: torch.Tensor,
    *,
    gather_indices: torch.Tensor | None = None,
    topk: int = 1,
    permute_x: bool = False,
    transpose: bool = True,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    use_int64: bool | None = None,
    validate: bool | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Weight gradient of ``grouped_gemm``: ``dW_e = dY_e.T @ X_e`` for every expert e.

    X ``[M, K]`` in expert order, or ``[T, K]`` in token order with ``permute_x=True`` (rows
    then read as ``X[gather_indices[i] // topk]``, exactly as the forward gathered them).
    dY ``[M, N]``: the gradient of the forward output, in expert order.
    transpose=True returns ``[E, N, K]`` (the nn.Linear layout of W in the forward);
    transpose=False returns ``[E, K, N]``. Experts with no rows get zeros.
    Accumulates in float32; the result has X's dtype (or ``out``'s).
    config: tile sizes ``{"BLOCK_M", "BLOCK_N", "BLOCK_K"}`` (powers of two >= 16); by default
    they follow the shape (at most 64). With ``kernel="hopper"`` also ``num_warps``,
    ``num_stages`` and ``PROGRAMS_PER_SM`` (``DW_CONFIG_KEYS``).
    kernel: "portable" (the grid of small tiles), "hopper" (the persistent TMA kernel, tuned per
    shape bucket) or "auto": hopper for bf16/fp16 on an sm90+ GPU when no ``config`` is given.
    use_int64: None picks 64-bit pointer offsets only when a tensor has 2**31 elements
    or more; True forces them (tests use it to run that path on small tensors).
    validate: check m_sizes and gather_indices values (a device->host copy); default: on CPU
    tensors only, so the GPU path never syncs.
    Differentiable (op ``moe_learn::grouped_gemm_dw``): it is bilinear in X and dY.
    """
    check_tensor("X", X, ndim=2)
    check_tensor("dY", dY, ndim=2)
    check_tensor("m_sizes", m_sizes, ndim=1)
    check_integer("m_sizes", m_sizes)
    check_same_device(X=X, dY=dY, m_sizes=m_sizes)
    check_positive_int("topk", topk)
    if kernel not in DW_KERNELS:
        raise ValueError(f"kernel must be one of {DW_KERNELS}, got {kernel!r}")
    if X.dtype != dY.dtype:
        raise TypeError(f"X is {X.dtype} but dY is {dY.dtype}; cast one so they match")
    if X.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"X must be float32, float16 or bfloat16, got {X.dtype}; cast X and dY (e.g. X.float())")
    M, N = dY.shape
    K = X.shape[1]
    num_experts = m_sizes.numel()
    compiling = torch.compiler.is_compiling()
    if validate is None:
        validate = X.device.type == "cpu" and not compiling
    if permute_x:
        if gather_indices is None:
            raise ValueError("permute_x=True needs gather_indices (from get_routing_indices)")
        check_tensor("gather_indices", gather_indices, ndim=1)
        check_integer("gather_indices", gather_indices)
        if gather_indices.numel() != M:
            raise ValueError(f"gather_indices has {gather_indices.numel()} entries but dY has {M} rows")
        if X.shape[0] * topk != M:
            raise ValueError(
                f"with permute_x X holds tokens: expected X.shape[0] * topk == {M}, got {X.shape[0]} * {topk}"
            )
    elif X.shape[0] != M:
        raise ValueError(f"X has {X.shape[0]} rows but dY has {M}; both must be in expert order")
    if validate:
        check_m_sizes(m_sizes, num_experts, M)
        if permute_x:
            check_gather_indices(gather_indices, M)
    if not permute_x:
        gather_indices = None  # never read
    shape = (num_experts, N, K) if transpose else (num_experts, K, N)
    if out is not None and tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
    if needs_autograd(X, dY):
        if out is not None:
            raise ValueError("out= does not record autograd, and X or dY requires grad; drop out= or call under "
                             "torch.no_grad()")
        return torch.ops.moe_learn.grouped_gemm_dw(X, dY, m_sizes, gather_indices, topk, permute_x, transpose,
                                                  encode_config(config), kernel)
    if compiling:
        result = torch.ops.moe_learn.grouped_gemm_dw(X, dY, m_sizes, gather_indices, topk, permute_x, transpose,
                                                    encode_config(config), kernel)
        return out.copy_(result) if out is not None else result
    return run_grouped_gemm_dw(X, dY, m_sizes, gather_indices, topk, permute_x, transpose, config, out=out,
                               use_int64=use_int64, kernel=kernel)


def run_grouped_gemm_dw(X, dY, m_sizes, gather_indices, topk, permute_x, transpose, config, *, out=None,
                        use_int64=None, kernel="auto") -> torch.Tensor:
    """Launch the dW kernel (arguments already checked): the op's implementation."""
    if X.device.type == "cpu" and X.dtype == torch.bfloat16:  # the interpreter computes bf16 wrong
        result = run_grouped_gemm_dw(X.float(), dY.float(), m_sizes, gather_indices, topk, permute_x, transpose,
                                     config, use_int64=use_int64, kernel=kernel)
        return out.copy_(result) if out is not None else result.to(X.dtype)
    M, N = dY.shape
    K = X.shape[1]
    num_experts = m_sizes.numel()
    shape = (num_experts, N, K) if transpose else (num_experts, K, N)
    if out is None:
        out = X.new_empty(shape)
    if out.numel() == 0:
        return out
    if M == 0:  # no rows at all: every expert's gradient is zero
        return out.zero_()
    # Element (e, n, k) of the result lives at these strides, whichever layout was asked for.
    stride_e, stride_n, stride_k = (
        out.stride() if transpose else (out.stride(0), out.stride(2), out.stride(1))
    )
    if choose_dw_kernel(kernel, config, X) == "hopper":
        grouped_gemm_dw_hopper(X, dY, m_sizes, gather_indices if permute_x else None, topk, permute_x, out,
                               (stride_e, stride_n, stride_k), config, transpose)
        return out

    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=X.device)
    torch.cumsum(m_sizes.to(torch.int64), 0, out=offsets[1:])
    largest = max(X.numel(), dY.numel(), out.numel(), M + 1)
    use_int64 = largest > _INT32_MAX if use_int64 is None else bool(use_int64)
    offsets = offsets if use_int64 else offsets.to(torch.int32)
    gather = gather_indices if permute_x else offsets  # any valid pointer when unused

    cfg = {"BLOCK_M": _block(M // max(num_experts, 1), 64), "BLOCK_N": _block(N, 64), "BLOCK_K": _block(K, 64)}
    if config:
        unknown = sorted(set(config) - set(cfg))
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}; allowed: {sorted(cfg)}")
        cfg.update(config)
    for key, value in cfg.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"config[{key!r}] must be a power of two >= 16 (tl.dot needs it), got {value!r}")
    BLOCK_M, BLOCK_N, BLOCK_K = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (num_experts, cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))
    _grouped_gemm_dw_kernel[grid](
        X,
        dY,
        out,
        offsets,
        gather,
        M,
        N,
        K,
        X.stride(0),
        X.stride(1),
        dY.stride(0),
        dY.stride(1),
        stride_e,
        stride_n,
        stride_k,
        TOP_K=topk,
        PERMUTE_X=permute_x,
        USE_INT64=use_int64,
        FP32_IEEE=X.dtype == torch.float32,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    return out


# ---------------------------------------------------------------------------------------
# The Hopper dW: configs, tuning, launch
# ---------------------------------------------------------------------------------------

DW_KERNELS = ("auto", "portable", "hopper")
DW_KERNEL = "auto"  # A/B switch (perf/ab_kernels.py): "portable" makes kernel="auto" take the old kernel
# The Hopper kernel copies gathered X rows into expert order first (``gather_rows``) when the copy is at most
# this many bytes; beyond (or with the switch off) it gathers them in the kernel. A/B: perf/ab_dw.py.
PRE_GATHER_MAX_BYTES = 4 << 30
DW_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "PROGRAMS_PER_SM")


def _dw_config(n, k, m, warps, stages, per_sm=1):
    return dict(BLOCK_N=n, BLOCK_K=k, BLOCK_M=m, num_warps=warps, num_stages=stages, PROGRAMS_PER_SM=per_sm)


# Output tiles BLOCK_N x BLOCK_K, reduction steps of BLOCK_M rows, by average rows per expert.
# Measured on an H200 (perf/ab_dw.py, Qwen3-30B-A3B T=8192, 512 rows per expert, X gathered in
# the kernel; perf/NOTES.md item 14): 32-row steps with 5 stages beat 64-row steps by 13-15%
# (dW1 1178 us against 1350 us): an expert's reduction is only 512 rows long, and the deeper
# pipeline of thinner steps keeps the gathered loads ahead of the MMAs. Few rows: two programs
# per SM (one's stores overlap the other's loads). The first of each bucket is the default
# without tuning.
DW_CANDIDATES_BY_ROWS_PER_EXPERT = (
    (64, (_dw_config(128, 128, 32, 4, 5, 2), _dw_config(128, 128, 32, 4, 3, 2), _dw_config(128, 128, 64, 4, 3, 2),
          _dw_config(64, 128, 64, 4, 4, 2))),
    (512, (_dw_config(128, 128, 32, 4, 5, 2), _dw_config(256, 128, 32, 8, 5), _dw_config(128, 128, 64, 4, 3, 2),
           _dw_config(128, 256, 32, 8, 5))),
    (float("inf"), (_dw_config(128, 256, 64, 8, 3), _dw_config(128, 128, 32, 4, 5, 2), _dw_config(256, 128, 32, 8, 5),
                    _dw_config(128, 256, 64, 8, 4), _dw_config(256, 128, 64, 8, 3))),
)


def dw_candidates(rows: int, num_experts: int) -> tuple[dict, ...]:
    per_expert = rows / max(num_experts, 1)
    return next(configs for limit, configs in DW_CANDIDATES_BY_ROWS_PER_EXPERT if per_expert <= limit)


def dw_tuning_key(rows, N, K, E, dtype, permute_x, transpose, x_tma, dy_tma) -> tuple:
    return ("dw", N, K, E, autotune.rows_bucket(rows, E), str(dtype), permute_x, transpose, x_tma, dy_tma)


def choose_dw_kernel(kernel: str, config: dict | None, X: torch.Tensor) -> str:
    """"hopper" or "portable": what ``kernel`` asks for, and what this machine allows."""
    if kernel == "hopper":
        if TensorDescriptor is None:
            raise ValueError("kernel='hopper' needs Triton's tensor descriptors (Triton 3.4 or newer); "
                             "use kernel='portable'")
        return "hopper"
    if kernel == "portable" or config or DW_KERNEL != "auto":
        return "portable"
    auto = (X.is_cuda and X.dtype in (torch.bfloat16, torch.float16) and TensorDescriptor is not None
            and capability(X.device.index)[0] >= 9)
    return "hopper" if auto else "portable"


def _tma_ok(t: torch.Tensor) -> bool:
    """Whether TMA can read ``t`` (2-D, unit inner stride): 16-byte aligned base and row stride."""
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def grouped_gemm_dw_hopper(X, dY, m_sizes, gather_indices, topk, permute_x, out, strides, config=None,
                           transpose=True) -> torch.Tensor:
    """Fill ``out`` (element (e, n, k) at ``strides``) with ``dY_e.T @ X_e``: the tuned persistent kernel."""
    if X.stride(-1) != 1:  # the kernel reads rows at unit stride
        X = X.contiguous()
    if dY.stride(-1) != 1:
        dY = dY.contiguous()
    m_sizes = m_sizes.contiguous()
    gather_indices = gather_indices.contiguous() if gather_indices is not None else None
    M, N = dY.shape
    E, K = m_sizes.shape[0], X.shape[1]
    if permute_x and M * K * X.element_size() <= PRE_GATHER_MAX_BYTES:
        X, gather_indices, permute_x = gather_rows(X, gather_indices, topk), None, False
    x_tma, dy_tma = not permute_x and _tma_ok(X), _tma_ok(dY)
    run = functools.partial(_launch_dw, X=X, dY=dY, m_sizes=m_sizes, gather_indices=gather_indices, topk=topk,
                            permute_x=permute_x, out=out, strides=strides, x_tma=x_tma, dy_tma=dy_tma)
    if config:
        unknown = sorted(set(config) - set(DW_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}; allowed: {list(DW_CONFIG_KEYS)}")
        return run({**dw_candidates(M, E)[0], **config})
    key = dw_tuning_key(M, N, K, E, X.dtype, permute_x, transpose, x_tma, dy_tma)
    cfg = autotune.TUNED.get(key)
    if cfg is None:
        cfg = choose_config(key, dw_candidates(M, E), run) if autotune_enabled(X) else dw_candidates(M, E)[0]
    return run(cfg)


_DW_LAUNCH = FastLauncher(_grouped_gemm_dw_tma_kernel)


def _launch_dw(cfg, *, X, dY, m_sizes, gather_indices, topk, permute_x, out, strides, x_tma, dy_tma):
    M, N = dY.shape
    E, K = m_sizes.shape[0], X.shape[1]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    x_desc = tensor_descriptor(X, (X.shape[0], K), (X.stride(0), 1), [bm, bk]) if x_tma else None
    dy_desc = tensor_descriptor(dY, (M, N), (dY.stride(0), 1), [bm, bn]) if dy_tma else None
    tiles = E * cdiv(N, bn) * cdiv(K, bk)
    programs = min(cfg["PROGRAMS_PER_SM"] * num_sms(X.device), tiles)
    args = (X, x_desc, dY, dy_desc, out, m_sizes, gather_indices if gather_indices is not None else m_sizes,
            M, N, K, E, X.stride(0), dY.stride(0), *strides)
    constexprs = dict(TOP_K=topk, PERMUTE_X=permute_x, X_TMA=x_tma, DY_TMA=dy_tma, BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_K=bk, BLOCK_E=1 << (E - 1).bit_length(), NUM_PROGRAMS=programs,
                      INPUT_PRECISION="ieee" if X.dtype == torch.float32 else "tf32")
    _DW_LAUNCH((programs,), args, constexprs, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return out
