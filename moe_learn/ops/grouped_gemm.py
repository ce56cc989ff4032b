"""The naive grouped GEMM in PyTorch, forward and weight gradient: one matmul per expert.

These are the references every Triton grouped GEMM of the course is checked against
(chapters 04, 06 and 09).
"""

from __future__ import annotations

import torch

from moe_learn.validation import check_floating, check_gather_indices, check_m_sizes, check_same_device, check_tensor


def _n_k(W: torch.Tensor, transpose: bool) -> tuple[int, int]:
    """(N, K) of a weight stored ``[E, N, K]`` (transpose=True) or ``[E, K, N]``."""
    return (W.shape[1], W.shape[2]) if transpose else (W.shape[2], W.shape[1])


def expert_of_rows(m_sizes: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """The expert of every expert-order row: ``e`` repeated ``m_sizes[e]`` times (negative sizes count 0).

    ``rows``, the total when the caller knows it, spares the device->host copy that sizing
    the result would otherwise need.
    """
    experts = torch.arange(m_sizes.numel(), device=m_sizes.device)
    return torch.repeat_interleave(experts, m_sizes.long().clamp_min(0), output_size=rows)


def torch_grouped_gemm(X: torch.Tensor, W: torch.Tensor, m_sizes: torch.Tensor, transpose: bool = True) -> torch.Tensor:
    """One matmul per expert over consecutive row blocks of X.

    X ``[M, K]`` holds the rows of expert 0, then expert 1, ... (``m_sizes[e]`` rows each).
    transpose=True:  W is ``[E, N, K]`` (nn.Linear layout), ``Y_e = X_e @ W_e.T``.
    transpose=False: W is ``[E, K, N]``, ``Y_e = X_e @ W_e``.
    Returns Y ``[M, N]``; experts with no rows cost nothing.
    """
    check_tensor("X", X, ndim=2)
    check_tensor("W", W, ndim=3)
    check_tensor("m_sizes", m_sizes)
    check_floating("X", X)
    check_floating("W", W)
    check_same_device(X=X, W=W, m_sizes=m_sizes)
    num_experts = W.shape[0]
    check_m_sizes(m_sizes, num_experts, X.shape[0])
    N, K = _n_k(W, transpose)
    if X.shape[1] != K:
        layout = "[E, N, K]" if transpose else "[E, K, N]"
        raise ValueError(
            f"X has {X.shape[1]} columns but W {tuple(W.shape)} (layout {layout}, transpose={transpose}) "
            f"expects K={K}; check the layout or the transpose flag"
        )
    if X.dtype != W.dtype:
        raise TypeError(f"X is {X.dtype} but W is {W.dtype}; cast one so they match")
    Y = X.new_empty(X.shape[0], N)
    start = 0
    # One host-side loop step (and one matmul launch) per non-empty expert: the cost
    # the Triton kernels of chapters 06-08 remove. .tolist() syncs once, not per expert.
    for e, m in enumerate(m_sizes.tolist()):
        if m == 0:
            continue
        W_e = W[e].T if transpose else W[e]
        Y[start : start + m] = X[start : start + m] @ W_e
        start += m
    return Y


def torch_grouped_gemm_dw(
    X: torch.Tensor,
    dY: torch.Tensor,
    m_sizes: torch.Tensor,
    *,
    gather_indices: torch.Tensor | None = None,
    topk: int = 1,
    permute_x: bool = False,
    transpose: bool = True,
) -> torch.Tensor:
    """The weight gradient of a grouped GEMM, ``dW_e = dY_e.T @ X_e``, one matmul per expert.

    X ``[M, K]`` in expert order, or ``[T, K]`` in token order with ``permute_x`` (rows read
    as ``X[gather_indices[i] // topk]``, as the forward gathered them); dY ``[M, N]``.
    Returns ``[E, N, K]`` (transpose=True, the layout of W) or ``[E, K, N]``; experts with
    no rows get zeros.
    """
    check_tensor("X", X, ndim=2)
    check_tensor("dY", dY, ndim=2)
    check_same_device(X=X, dY=dY, m_sizes=m_sizes)
    if permute_x:
        if gather_indices is None:
            raise ValueError("permute_x=True needs gather_indices (from get_routing_indices)")
        check_gather_indices(gather_indices, dY.shape[0])
        X = X[gather_indices.long() // topk]
    num_experts = m_sizes.numel()
    check_m_sizes(m_sizes, num_experts, dY.shape[0])
    if X.shape[0] != dY.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but dY has {dY.shape[0]}; both must be in expert order")
    N, K = dY.shape[1], X.shape[1]
    dW = X.new_zeros((num_experts, N, K) if transpose else (num_experts, K, N))
    start = 0
    for e, m in enumerate(m_sizes.tolist()):
        if m:
            block = dY[start : start + m].T @ X[start : start + m]
            dW[e] = block if transpose else block.T
        start += m
    return dW
