"""Chapter 05, the Triton primer: reference kernels and the wrappers that launch them.

Three kernels, each a step up from the last:

* ``scale_add_kernel``  1-D: one program per block of ``BLOCK_SIZE`` elements, a mask for
  the ragged last block (``out = alpha * x + y``).
* ``swiglu_kernel``     2-D grid over (row, column block) of a strided ``[M, 2I]`` tensor:
  ``out = silu(gate) * up``, the activation between the two grouped GEMMs of an MoE MLP.
* ``matmul_kernel``     a tiled ``C = A @ B``: one program per ``BLOCK_M x BLOCK_N`` tile of C,
  a loop over K in steps of ``BLOCK_K``, ``tl.dot`` into an fp32 accumulator, masks on
  the M, N and K edges. Chapter 06 grows it into the grouped GEMM.

Each kernel has a ``launch_*`` function that takes the kernel as an argument: the public
wrapper launches the reference kernel with it, and the chapter's checks launch the
learner's kernel with exactly the same grid and arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_learn.validation import check_floating, check_positive_int, check_same_device, check_tensor

# ----------------------------------------------------------------------------- 05.1


@triton.jit
def scale_add_kernel(x_ptr, y_ptr, out_ptr, alpha, n_elements, BLOCK_SIZE: tl.constexpr):
    """out[i] = alpha * x[i] + y[i] for i < n_elements; program p covers [p*BLOCK_SIZE, (p+1)*BLOCK_SIZE)."""
    pid = tl.program_id(axis=0)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    # The last block usually sticks out past n_elements: its extra lanes must neither
    # read nor write memory that is not ours.
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, alpha * x + y, mask=mask)


def launch_scale_add(kernel, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, alpha: float, block_size: int) -> None:
    """One program per ``block_size`` elements of the flat, contiguous x, y and out."""
    n_elements = out.numel()
    grid = (triton.cdiv(n_elements, block_size),)
    kernel[grid](x, y, out, alpha, n_elements, BLOCK_SIZE=block_size)


def scale_add(x: torch.Tensor, y: torch.Tensor, alpha: float, *, block_size: int = 1024) -> torch.Tensor:
    """``alpha * x + y`` by ``scale_add_kernel`` (any shape; x and y must match)."""
    check_tensor("x", x)
    check_tensor("y", y)
    check_floating("x", x)
    check_same_device(x=x, y=y)
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(
            f"x {tuple(x.shape)} {x.dtype} and y {tuple(y.shape)} {y.dtype} must have one shape and dtype; "
            "broadcast or cast before calling scale_add"
        )
    _check_block("block_size", block_size)
    # The kernel walks memory with unit stride, so hand it contiguous copies if needed.
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    if out.numel():
        launch_scale_add(scale_add_kernel, x, y, out, float(alpha), block_size)
    return out


# ----------------------------------------------------------------------------- 05.2


@triton.jit
def swiglu_kernel(
    gate_up_ptr, out_ptr, I,
    stride_gu_row, stride_gu_col, stride_out_row, stride_out_col,
    BLOCK_I: tl.constexpr,
):
    """out[r, j] = silu(gate_up[r, j]) * gate_up[r, I + j]; program (r, p) covers row r, columns p*BLOCK_I..."""
    row = tl.program_id(axis=0)
    pid_i = tl.program_id(axis=1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = offs_i < I
    # Element (r, c) lives at base + r * stride_row + c * stride_col, whatever the layout.
    gate_ptrs = gate_up_ptr + row * stride_gu_row + offs_i * stride_gu_col
    up_ptrs = gate_ptrs + I * stride_gu_col  # the up half starts I columns to the right
    # Compute in fp32 (sigmoid of a half is imprecise), store in the output's dtype.
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptrs, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    out_ptrs = out_ptr + row * stride_out_row + offs_i * stride_out_col
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def launch_swiglu(kernel, gate_up: torch.Tensor, out: torch.Tensor, block_i: int) -> None:
    """Grid (rows, column blocks): program (r, p) writes out[r, p*block_i : (p+1)*block_i]."""
    M, I = out.shape
    grid = (M, triton.cdiv(I, block_i))
    kernel[grid](gate_up, out, I, gate_up.stride(0), gate_up.stride(1), out.stride(0), out.stride(1), BLOCK_I=block_i)


def swiglu_rows(gate_up: torch.Tensor, *, block_i: int = 128) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` ``[M, 2I]`` (gate first, as transformers lays it out).

    Any strides work: the kernel reads through ``gate_up.stride()``, no copy is made.
    """
    check_tensor("gate_up", gate_up, ndim=2)
    check_floating("gate_up", gate_up)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must have an even number of columns [M, 2I], got shape {tuple(gate_up.shape)}")
    _check_block("block_i", block_i)
    M, two_i = gate_up.shape
    out = gate_up.new_empty(M, two_i // 2)
    if out.numel():
        launch_swiglu(swiglu_kernel, gate_up, out, block_i)
    return out


# ----------------------------------------------------------------------------- 05.3


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C = A @ B; program (pid_m, pid_n) computes the tile C[pid_m*BLOCK_M:..., pid_n*BLOCK_N:...]."""
    pid_m = tl.program_id(axis=0)
    pid_n = tl.program_id(axis=1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # [BLOCK_M, BLOCK_K] and [BLOCK_K, BLOCK_N] grids of pointers, by broadcasting.
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    # Sum in fp32 whatever the input dtype: K products of halves lose too much otherwise.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # The last K block may be ragged: lanes past K load 0, which adds nothing to the dot.
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def launch_matmul(
    kernel, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
    block_m: int, block_n: int, block_k: int, num_warps: int = 4, num_stages: int = 3,
) -> None:
    """Grid (cdiv(M, block_m), cdiv(N, block_n)): one program per tile of C."""
    M, K = a.shape
    N = b.shape[1]
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    kernel[grid](
        a, b, c, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )


def matmul(
    a: torch.Tensor, b: torch.Tensor, *,
    block_m: int = 64, block_n: int = 64, block_k: int = 32, num_warps: int = 4, num_stages: int = 3,
) -> torch.Tensor:
    """``a @ b`` for 2-D ``a [M, K]`` and ``b [K, N]`` of one floating dtype, any strides.

    Blocks must be powers of two and at least 16 (``tl.dot``'s smallest tile).
    """
    check_tensor("a", a, ndim=2)
    check_tensor("b", b, ndim=2)
    check_floating("a", a)
    check_same_device(a=a, b=b)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} do not chain: a has K={a.shape[1]} columns, b has {b.shape[0]} rows")
    if a.dtype != b.dtype:
        raise TypeError(f"a is {a.dtype} but b is {b.dtype}; cast one so they match")
    for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        _check_block(name, value, minimum=16)
    M, K = a.shape
    N = b.shape[1]
    if K == 0:  # an empty sum: the kernel's loop would not run and C would stay unwritten
        return a.new_zeros(M, N)
    c = a.new_empty(M, N)
    if c.numel():
        launch_matmul(matmul_kernel, a, b, c, block_m, block_n, block_k, num_warps, num_stages)
    return c


def _check_block(name: str, value, minimum: int = 1) -> None:
    """Block sizes are constexpr lengths of tl.arange: powers of two."""
    check_positive_int(name, value)
    if value & (value - 1) or value < minimum:
        raise ValueError(f"{name} must be a power of two >= {minimum} (tl.arange needs one), got {value}")
