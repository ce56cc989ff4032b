"""Gating and routing indices: router logits -> top-k experts -> token order by expert."""

from __future__ import annotations

import torch

from moe_learn.validation import check_floating, check_index_range, check_integer, check_positive_int, check_tensor


def _activate(x32: torch.Tensor, use_sigmoid: bool) -> torch.Tensor:
    # Sigmoid scores each expert on its own; softmax makes the experts compete (sum to 1).
    return torch.sigmoid(x32) if use_sigmoid else torch.softmax(x32, dim=-1)


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
    Returns (topk_weights ``[T, k]`` in the input dtype, topk_ids ``[T, k]`` int64),
    each row sorted from the largest weight down.

    Which experts, exactly (``fused_routing`` picks the same ones): experts are ranked by
    their logits (softmax and sigmoid are increasing, so this is the order of the scores,
    and scores that rounding made equal are told apart by their logits); NaN ranks above
    every number, equal logits go to the lower expert id first, and an expert is picked at
    most once per token. NaN and inf reach the weights as the activation makes them: a
    softmax over a row holding NaN or +inf (or only -inf) is NaN everywhere, as in torch.
    """
    check_tensor("gating_output", gating_output, ndim=2)
    check_floating("gating_output", gating_output)
    check_positive_int("top_k", top_k)
    num_experts = gating_output.shape[1]
    if top_k > num_experts:
        raise ValueError(
            f"top_k={top_k} is larger than the number of experts ({num_experts}, the last dim of "
            "gating_output); pass top_k <= num_experts"
        )
    if pre_act == post_act:
        raise ValueError(
            f"pass exactly one of pre_act/post_act as True (got pre_act={pre_act}, post_act={post_act}): "
            "pre_act activates before top-k, post_act after"
        )
    # Everything in (at least) float32, one cast at the end, as transformers does: a bf16
    # softmax over 128 experts loses the small probabilities and turns distinct scores into ties.
    logits32 = gating_output.to(torch.promote_types(gating_output.dtype, torch.float32))
    # A stable descending sort, not torch.topk: topk leaves the winner among equal values
    # unspecified, and the fused kernel must be able to pick the very same experts.
    topk_ids = torch.sort(logits32, dim=-1, descending=True, stable=True).indices[:, :top_k]
    if pre_act:
        topk_weights = _activate(logits32, use_sigmoid).gather(-1, topk_ids)
    else:
        topk_weights = _activate(logits32.gather(-1, topk_ids), use_sigmoid)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights.to(gating_output.dtype), topk_ids


def expert_counts(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert, as int32: one add of 1 per id into its expert's bin.

    Chapter 02 counts with ``torch.histc`` on float ids; that is fine for the course's
    sizes, but histc computes each bin in floating point, and on the CPU float32 ids
    already land in the wrong bin from 4099 experts on. Integer adds are exact for any E,
    need no device->host copy, and are deterministic on a GPU.
    """
    ones = torch.ones_like(flat_ids, dtype=torch.int32)
    return torch.zeros(num_experts, dtype=torch.int32, device=flat_ids.device).index_add_(0, flat_ids.long(), ones)


def gather_indices_by_expert(flat_ids: torch.Tensor) -> torch.Tensor:
    """Flat (token, slot) positions sorted by expert id, ties kept in token order (int32).

    ``stable=True`` matters: a plain argsort may shuffle the tokens of one expert, and then
    the expert's rows no longer come in token order (tests and kernels compare against it).
    """
    return torch.argsort(flat_ids, stable=True).to(torch.int32)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] == i``: one scatter, no second sort."""
    inv = torch.empty_like(perm)
    inv[perm.long()] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


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
    ``scatter_indices[gather_indices[i]] == i``. All three are int32.
    """
    check_tensor("selected_experts", selected_experts)
    check_integer("selected_experts", selected_experts)
    check_positive_int("num_experts", num_experts)
    flat_ids = selected_experts.reshape(-1)
    check_index_range("selected_experts", flat_ids, num_experts, f"expert ids must be below num_experts={num_experts}")
    token_counts_by_expert = expert_counts(flat_ids, num_experts)
    gather_indices = gather_indices_by_expert(flat_ids)
    if not return_scatter_indices:
        return token_counts_by_expert, gather_indices
    return token_counts_by_expert, gather_indices, inverse_permutation(gather_indices)
