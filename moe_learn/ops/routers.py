"""The routers of five real MoE models, built on :func:`calculate_topk`.

Every router maps hidden states ``[T, H]`` (or ``[B, S, H]``, flattened) and a router
weight ``[E, H]`` (``nn.Linear`` layout, as in Hugging Face transformers) to

    (router_logits [T, E], topk_weights [T, k], topk_ids [T, k] int64)

and matches the transformers 5.x module of its model value for value. They differ in
four choices, which :data:`ROUTERS` records for each model:

- activation: softmax (experts compete, weights sum to 1) or sigmoid (each expert scored
  on its own);
- what top-k ranks: the activated scores (``pre_act``), the raw logits (``post_act``),
  or DeepSeek-V3's bias-corrected, group-limited scores;
- whether the k weights are renormalized to sum to 1 (and DeepSeek's extra scale);
- where the weight is applied: to each expert's OUTPUT (everyone but Llama 4) or to its
  INPUT (Llama 4 multiplies the token by its score before the expert runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_learn.ops.routing import calculate_topk
from moe_learn.validation import (
    check_floating,
    check_index_range,
    check_integer,
    check_positive_int,
    check_same_device,
    check_tensor,
)

RouterOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def router_logits(hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden_states @ weight.T (+ bias)`` as ``[T, E]``: one score per (token, expert)."""
    check_tensor("hidden_states", hidden_states)
    check_floating("hidden_states", hidden_states)
    if hidden_states.ndim < 1:
        raise ValueError("hidden_states must be [T, H] or [B, S, H], got a 0-D tensor")
    check_tensor("weight", weight, ndim=2)
    hidden = hidden_states.shape[-1]
    if weight.shape[1] != hidden:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but hidden_states has hidden size {hidden}; "
            f"the router weight is [num_experts, hidden] = [E, {hidden}] (nn.Linear layout), "
            "transpose it if you stored [hidden, E]"
        )
    if weight.dtype != hidden_states.dtype:
        raise TypeError(f"weight is {weight.dtype} but hidden_states is {hidden_states.dtype}; cast one so they match")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has {weight.shape[0]} experts (rows)")
    return F.linear(hidden_states.reshape(-1, hidden), weight, bias)


def _check_top_k(top_k: int, num_experts: int) -> None:
    check_positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is larger than the number of experts ({num_experts} rows of weight)")


def qwen3_moe_router(
    hidden_states: torch.Tensor, weight: torch.Tensor, top_k: int, norm_topk_prob: bool = True
) -> RouterOutput:
    """Qwen3-MoE: softmax over all experts, top-k, renormalize iff ``norm_topk_prob``.

    Weights come back in the dtype of the logits (softmax itself runs in float32).
    """
    logits = router_logits(hidden_states, weight)
    _check_top_k(top_k, logits.shape[1])
    topk_weights, topk_ids = calculate_topk(logits, top_k, use_sigmoid=False, renormalize=norm_topk_prob)
    return logits, topk_weights, topk_ids


def mixtral_router(hidden_states: torch.Tensor, weight: torch.Tensor, top_k: int) -> RouterOutput:
    """Mixtral: softmax over all experts, top-k, always renormalize.

    Unlike Qwen3, Mixtral keeps the k weights in float32 (it never casts them back).
    """
    logits = router_logits(hidden_states, weight)
    _check_top_k(top_k, logits.shape[1])
    topk_weights, topk_ids = calculate_topk(logits.float(), top_k, use_sigmoid=False, renormalize=True)
    return logits, topk_weights, topk_ids


def llama4_router(hidden_states: torch.Tensor, weight: torch.Tensor, top_k: int) -> RouterOutput:
    """Llama 4: top-k on the raw logits, then a sigmoid of those k; no renormalization.

    The caller must multiply each expert's INPUT by its weight,
    ``y = sum_j expert_{ids[j]}(x * w[j])``, not the output: the SwiGLU experts are not
    linear, so the two differ. transformers keeps the weights as a dense ``[T, E]`` score
    matrix with zeros for unselected experts: :func:`dense_router_scores` builds it.
    """
    logits = router_logits(hidden_states, weight)
    _check_top_k(top_k, logits.shape[1])
    topk_weights, topk_ids = calculate_topk(
        logits, top_k, use_sigmoid=True, renormalize=False, pre_act=False, post_act=True
    )
    return logits, topk_weights, topk_ids


def gpt_oss_router(hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int) -> RouterOutput:
    """gpt-oss: logits with a bias, top-k on the logits, softmax over only those k.

    A softmax over the k chosen logits already sums to 1, so there is nothing to renormalize.
    """
    check_tensor("bias", bias, ndim=1)
    logits = router_logits(hidden_states, weight, bias)
    _check_top_k(top_k, logits.shape[1])
    topk_weights, topk_ids = calculate_topk(
        logits, top_k, use_sigmoid=False, renormalize=False, pre_act=False, post_act=True
    )
    return logits, topk_weights, topk_ids


def group_limited_mask(scores: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """DeepSeek-V3's group limit: ``[T, E]`` bool, True for experts in the chosen groups.

    The E experts form ``n_group`` consecutive groups (one per GPU node in DeepSeek's
    deployment); each group is rated by the sum of its two best scores and each token may
    only use experts of its ``topk_group`` best groups, which bounds cross-node traffic.
    """
    num_tokens, num_experts = scores.shape
    group_size = num_experts // n_group
    grouped = scores.view(num_tokens, n_group, group_size)
    # DeepSeek rates a group by its top-2 sum; a group of one expert has only one score.
    group_scores = grouped.topk(min(2, group_size), dim=-1).values.sum(dim=-1)
    best_groups = torch.topk(group_scores, topk_group, dim=-1).indices
    group_mask = torch.zeros(num_tokens, n_group, dtype=torch.bool, device=scores.device)
    group_mask.scatter_(1, best_groups, True)
    return group_mask.unsqueeze(-1).expand(num_tokens, n_group, group_size).reshape(num_tokens, num_experts)


def deepseek_v3_router(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    e_score_correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> RouterOutput:
    """DeepSeek-V3: sigmoid scores; selection on bias-corrected scores within the best groups.

    1. ``scores = sigmoid(logits)`` (in float32).
    2. Choose with ``scores + e_score_correction_bias``: the bias is DeepSeek's
       auxiliary-loss-free load balancing (raised for idle experts, lowered for busy ones).
       It only decides WHO is picked; the weights are the unbiased ``scores`` of the picked.
    3. Only experts in the ``topk_group`` best of ``n_group`` groups may be picked.
    4. Optionally renormalize the k weights, then multiply by ``routed_scaling_factor``.

    Here calculate_topk does not fit: what ranks the experts (biased, masked) is not what
    weights them (the plain sigmoid). Weights and logits come back in float32; ids are
    sorted by the biased score, best first.
    """
    logits = router_logits(hidden_states.float(), weight.float())
    num_experts = logits.shape[1]
    check_tensor("e_score_correction_bias", e_score_correction_bias, ndim=1)
    if e_score_correction_bias.shape[0] != num_experts:
        raise ValueError(
            f"e_score_correction_bias has {e_score_correction_bias.shape[0]} entries but there are "
            f"{num_experts} experts; pass one bias per expert"
        )
    check_positive_int("n_group", n_group)
    check_positive_int("topk_group", topk_group)
    if num_experts % n_group:
        raise ValueError(
            f"n_group={n_group} does not divide the {num_experts} experts; the experts must split into equal groups"
        )
    if topk_group > n_group:
        raise ValueError(f"topk_group={topk_group} is larger than n_group={n_group}")
    _check_top_k(top_k, num_experts)
    allowed = topk_group * (num_experts // n_group)
    if top_k > allowed:
        raise ValueError(
            f"top_k={top_k} but the {topk_group} chosen groups hold only {allowed} experts; "
            "raise topk_group or lower top_k"
        )
    scores = torch.sigmoid(logits)
    scores_for_choice = scores + e_score_correction_bias.float()
    in_best_groups = group_limited_mask(scores_for_choice, n_group, topk_group)
    scores_for_choice = scores_for_choice.masked_fill(~in_best_groups, float("-inf"))
    topk_ids = torch.topk(scores_for_choice, top_k, dim=-1).indices
    topk_weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return logits, topk_weights * routed_scaling_factor, topk_ids


def dense_router_scores(topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T, E]`` with ``topk_weights`` at ``topk_ids`` and 0 elsewhere (Llama 4's ``router_scores``)."""
    check_tensor("topk_weights", topk_weights, ndim=2)
    check_tensor("topk_ids", topk_ids, ndim=2)
    check_integer("topk_ids", topk_ids)
    check_positive_int("num_experts", num_experts)
    if topk_ids.shape != topk_weights.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must match")
    check_same_device(topk_weights=topk_weights, topk_ids=topk_ids)
    check_index_range("topk_ids", topk_ids, num_experts, f"expert ids must be below num_experts={num_experts}")
    dense = topk_weights.new_zeros(topk_weights.shape[0], num_experts)
    return dense.scatter_(1, topk_ids.long(), topk_weights)


@dataclass(frozen=True)
class RouterInfo:
    """How one model routes: the four choices that tell the routers apart."""

    model: str
    fn: Callable[..., RouterOutput]
    activation: str  # "softmax" or "sigmoid"
    selects_on: str  # what torch.topk ranks
    renormalize: str
    weight_scales: str  # "expert output" or "expert input"


ROUTERS: dict[str, RouterInfo] = {
    info.model: info
    for info in (
        RouterInfo(
            "Qwen3-MoE", qwen3_moe_router, "softmax", "probabilities (pre-act)", "if norm_topk_prob", "expert output"
        ),
        RouterInfo("Mixtral", mixtral_router, "softmax", "probabilities (pre-act)", "yes", "expert output"),
        RouterInfo("Llama 4", llama4_router, "sigmoid", "logits (post-act)", "no", "expert input"),
        RouterInfo(
            "gpt-oss",
            gpt_oss_router,
            "softmax over k",
            "logits + bias (post-act)",
            "implicit (softmax over k)",
            "expert output",
        ),
        RouterInfo(
            "DeepSeek-V3",
            deepseek_v3_router,
            "sigmoid",
            "sigmoid + correction bias, best groups only",
            "if norm_topk_prob, then x routed_scaling_factor",
            "expert output",
        ),
    )
}
