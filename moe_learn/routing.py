"""Gating and routing indices: router logits -> top-k experts -> token order by expert."""

from __future__ import annotations

import torch

from .validation import check_floating, check_index_range, check_integer, check_positive_int, check_tensor


def _activate(x: torch.Tensor, use_sigmoid: bool) -> torch.Tensor:
    # Activations in float32: bf16 softmax over 128 experts loses the small probabilities.
    x32 = x.to(torch.float32)
    out = torch.sigmoid(x32) if use_sigmoid else torch.softmax(x32, dim=-1)
    return out.to(x.dtype)


def calculate_topk(
    gating_output: torch.Tensor,
    top_k: int,
    use_sigmoid: bool,
    renormalize: bool,
    pre_act: bool = True,
    post_act: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token from router logits ``[T, E]``.

    pre_act:  activate all E scores, then take the top k (Qwen3, Mixtral, DeepSeek).
    post_act: take the top k raw logits, then activate only those k (Llama 4, gpt-oss).
    renormalize: divide the k weights by their sum so they add up to 1.
    Returns (topk_weights ``[T, k]`` in the input dtype, topk_ids ``[T, k]`` int64).
    """
    check_tensor("gating_output", gating_output, ndim=2)
    check_floating("gating_output", gating_output)
    check_positive_int("top_k", top_k)
    num_experts = gating_output.shape[1]
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is larger than the number of experts ({num_experts})")
    if pre_act == post_act:
        raise ValueError(
            f"pass exactly one of pre_act/post_act as True (got pre_act={pre_act}, post_act={post_act}): "
            "pre_act activates before top-k, post_act after"
        )
    if pre_act:
        scores = _activate(gating_output, use_sigmoid)
        topk_weights, topk_ids = torch.topk(scores, top_k, dim=-1)
    else:
        topk_logits, topk_ids = torch.topk(gating_output, top_k, dim=-1)
        topk_weights = _activate(topk_logits, use_sigmoid)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def expert_counts(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert with ``torch.histc`` (bins of width 1 over [0, E)), as int32.

    ``histc`` refuses integer tensors on the CPU, so the ids go through float32, which
    holds every integer below 2**24 exactly.
    """
    counts = torch.histc(flat_ids.to(torch.float32), bins=num_experts, min=0, max=num_experts)
    return counts.to(torch.int32)


@torch.no_grad()
def get_routing_indices(
    selected_experts: torch.Tensor,
    num_experts: int,
    return_scatter_indices: bool = False,
):
    """Group the (token, slot) pairs of ``selected_experts [T, k]`` by expert.

    Returns ``token_counts_by_expert [E]`` and ``gather_indices [T*k]``: a stable argsort
    of the flattened ids, so row i of the expert-ordered input is flat slot
    ``gather_indices[i]`` (token ``gather_indices[i] // k``), tokens in their original
    order inside each expert. With ``return_scatter_indices`` also its inverse,
    ``scatter_indices[gather_indices[i]] == i``.
    """
    check_tensor("selected_experts", selected_experts)
    check_integer("selected_experts", selected_experts)
    check_positive_int("num_experts", num_experts)
    flat_ids = selected_experts.reshape(-1)
    check_index_range("selected_experts", flat_ids, num_experts, f"expert ids must be below num_experts={num_experts}")
    token_counts_by_expert = expert_counts(flat_ids, num_experts)
    gather_indices = torch.argsort(flat_ids, stable=True).to(torch.int32)
    if not return_scatter_indices:
        return token_counts_by_expert, gather_indices
    scatter_indices = torch.argsort(gather_indices).to(torch.int32)
    return token_counts_by_expert, gather_indices, scatter_indices
