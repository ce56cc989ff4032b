"""The expert half of an MoE MLP with the permutations fused into the grouped GEMMs.

Compared with ``moe_experts_torch`` (permute -> GEMM -> SwiGLU -> GEMM -> unpermute ->
weighted sum), the permuted copy of the hidden states and the unpermuted copy of the
output never exist: GEMM1 gathers token rows in its prologue, GEMM2 scatters its rows
back to (token, slot) order and applies the routing weights in its epilogue.
"""

from __future__ import annotations

import torch

from .kernels.fused_routing import fused_routing
from .kernels.grouped_gemm import grouped_gemm
from .routing import get_routing_indices
from .torch_moe import swiglu
from .validation import check_moe_args, check_tensor


def fused_moe_experts(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """Same contract as ``moe_experts_torch``: returns ``[T, H]``.

    hidden_states ``[T, H]``; topk_ids/topk_weights ``[T, k]``;
    gate_up_proj ``[E, 2I, H]``, down_proj ``[E, H, I]`` (transformers 5.x layout).
    config: launch parameters passed to both grouped GEMMs.
    """
    check_moe_args(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj)
    num_experts = gate_up_proj.shape[0]
    # get_routing_indices validates the expert ids; its counts and indices are consistent
    # by construction, so the GEMMs skip their own (syncing) value checks.
    counts, gather_indices = get_routing_indices(topk_ids, num_experts)
    return _experts(hidden_states, counts, gather_indices, topk_weights, gate_up_proj, down_proj, config)


def _experts(hidden_states, counts, gather_indices, topk_weights, gate_up_proj, down_proj, config):
    """GEMM1 (gather) -> SwiGLU -> GEMM2 (scatter, weights) -> sum over the k slots."""
    num_tokens, hidden = hidden_states.shape
    top_k = topk_weights.shape[1]
    # GEMM1: rows gathered from token order in the prologue -> [T*k, 2I] in expert order.
    gate_up = grouped_gemm(
        hidden_states,
        gate_up_proj,
        counts,
        gather_indices=gather_indices,
        topk=top_k,
        permute_x=True,
        config=config,
        validate=False,
    )
    h = swiglu(gate_up)
    # GEMM2: rows scattered to (token, slot) order and scaled by their routing weight.
    y = grouped_gemm(
        h,
        down_proj,
        counts,
        gather_indices=gather_indices,
        permute_y=True,
        topk_weights=topk_weights,
        config=config,
        validate=False,
    )
    return y.view(num_tokens, top_k, hidden).sum(dim=1)


def fused_moe_forward(
    hidden_states: torch.Tensor,
    router_weight: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = True,
    use_sigmoid: bool = False,
    pre_act: bool = True,
    config: dict | None = None,
) -> torch.Tensor:
    """A whole MoE MLP (inference): router -> fused routing -> fused experts.

    hidden_states ``[T, H]`` or ``[B, S, H]``; router_weight ``[E, H]``; experts in the
    transformers 5.x layout. Routing options as in ``calculate_topk`` (the defaults are
    Qwen3-MoE's and Mixtral's: softmax over all experts, top-k, renormalised). Five launches
    after the router matmul: three for routing, two grouped GEMMs (plus SwiGLU and the sum).
    """
    check_tensor("hidden_states", hidden_states, ndim=(2, 3))
    check_tensor("router_weight", router_weight, ndim=2)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    if router_weight.shape[1] != x.shape[1] or router_weight.shape[0] != gate_up_proj.shape[0]:
        raise ValueError(
            f"router_weight {tuple(router_weight.shape)} must be [E, H] = [{gate_up_proj.shape[0]}, {x.shape[1]}]"
        )
    logits = x @ router_weight.T
    weights, _, counts, gather_indices, _ = fused_routing(
        logits, top_k, use_sigmoid=use_sigmoid, renormalize=renormalize, pre_act=pre_act
    )
    out = _experts(x, counts, gather_indices, weights.to(x.dtype), gate_up_proj, down_proj, config)
    return out.reshape(shape)
