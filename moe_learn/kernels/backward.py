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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_learn.kernels.grouped_gemm import encode_config, needs_autograd
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


def _block(size: int, cap: int) -> int:
    """Smallest power of two >= size, at least 16 (tl.dot's minimum) and at most cap."""
    return max(16, min(cap, triton.next_power_of_2(max(size, 1))))


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
) -> torch.Tensor:
    """Weight gradient of ``grouped_gemm``: ``dW_e = dY_e.T @ X_e`` for every expert e.

    X ``[M, K]`` in expert order, or ``[T, K]`` in token order with ``permute_x=True`` (rows
    then read as ``X[gather_indices[i] // topk]``, exactly as the forward gathered them).
    dY ``[M, N]``: the gradient of the forward output, in expert order.
    transpose=True returns ``[E, N, K]`` (the nn.Linear layout of W in the forward);
    transpose=False returns ``[E, K, N]``. Experts with no rows get zeros.
    Accumulates in float32; the result has X's dtype (or ``out``'s).
    config: tile sizes ``{"BLOCK_M", "BLOCK_N", "BLOCK_K"}`` (powers of two >= 16); by default
    they follow the shape (at most 64).
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
                                                  encode_config(config))
    if compiling:
        result = torch.ops.moe_learn.grouped_gemm_dw(X, dY, m_sizes, gather_indices, topk, permute_x, transpose,
                                                    encode_config(config))
        return out.copy_(result) if out is not None else result
    return run_grouped_gemm_dw(X, dY, m_sizes, gather_indices, topk, permute_x, transpose, config, out=out,
                               use_int64=use_int64)


def run_grouped_gemm_dw(X, dY, m_sizes, gather_indices, topk, permute_x, transpose, config, *, out=None,
                        use_int64=None) -> torch.Tensor:
    """Launch the dW kernel (arguments already checked): the op's implementation."""
    if X.device.type == "cpu" and X.dtype == torch.bfloat16:  # the interpreter computes bf16 wrong
        result = run_grouped_gemm_dw(X.float(), dY.float(), m_sizes, gather_indices, topk, permute_x, transpose,
                                     config, use_int64=use_int64)
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
    grid = (num_experts, triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K))
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
