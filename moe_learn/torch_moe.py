"""The naive PyTorch grouped GEMM and a whole MoE MLP built from the primitives.

These are the references every Triton kernel in the course is checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .permutation import combine, permute, unpermute
from .routing import get_routing_indices
from .validation import check_m_sizes, check_moe_args, check_same_device, check_tensor


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
    check_same_device(X=X, W=W, m_sizes=m_sizes)
    num_experts = W.shape[0]
    check_m_sizes(m_sizes, num_experts, X.shape[0])
    K = W.shape[2] if transpose else W.shape[1]
    N = W.shape[1] if transpose else W.shape[2]
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


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on ``[M, 2I]`` laid out as transformers does: gate first, then up."""
    check_tensor("gate_up", gate_up)
    if gate_up.ndim == 0 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"gate_up must have an even last dimension (gate half, then up half), got shape {tuple(gate_up.shape)}"
        )
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_experts_torch(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """The expert half of an MoE MLP, from the primitives of chapters 02-04.

    hidden_states ``[T, H]``; topk_ids/topk_weights ``[T, k]``;
    gate_up_proj ``[E, 2I, H]``, down_proj ``[E, H, I]`` (transformers 5.x layout).
    route -> permute -> grouped GEMM -> SwiGLU -> grouped GEMM -> unpermute -> weighted sum.
    """
    check_moe_args(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj)
    num_tokens, hidden = hidden_states.shape
    num_experts = gate_up_proj.shape[0]
    top_k = topk_ids.shape[1]
    counts, gather_indices = get_routing_indices(topk_ids, num_experts)
    x = permute(hidden_states, gather_indices, top_k)
    h = swiglu(torch_grouped_gemm(x, gate_up_proj, counts))
    y = torch_grouped_gemm(h, down_proj, counts)
    return combine(unpermute(y, gather_indices), topk_weights)
