"""Pictures of a routing decision: who went where, and how uneven the experts' load is."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from .validation import check_integer, check_positive_int, check_tensor


def load_imbalance(counts: torch.Tensor) -> float:
    """max / mean tokens per expert: 1.0 is perfectly balanced, E means one expert got all."""
    counts = counts.detach().double().cpu()
    mean = counts.mean().item() if counts.numel() else 0.0
    return counts.max().item() / mean if mean > 0 else float("nan")


def _new_axes(ax, figsize):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def routing_heatmap(topk_ids: torch.Tensor, num_experts: int, topk_weights: torch.Tensor | None = None, ax=None):
    """Token x expert grid: a cell is coloured where the token was routed to the expert.

    With ``topk_weights`` the colour is the routing weight; without, every chosen cell is 1.
    Returns the matplotlib Figure.
    """
    check_tensor("topk_ids", topk_ids, ndim=2)
    check_integer("topk_ids", topk_ids)
    check_positive_int("num_experts", num_experts)
    ids = topk_ids.detach().long().cpu()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"topk_ids must lie in [0, {num_experts}); got values up to {int(ids.max())}")
    if topk_weights is None:
        values = torch.ones(ids.shape, dtype=torch.float32)
        label = "routed"
    else:
        check_tensor("topk_weights", topk_weights, ndim=2)
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(
                f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} must match"
            )
        values = topk_weights.detach().float().cpu()
        label = "routing weight"
    grid = torch.zeros(ids.shape[0], num_experts).scatter_(1, ids, values)
    num_tokens = ids.shape[0]
    fig, ax = _new_axes(ax, (min(2 + 0.35 * num_experts, 12), min(1.5 + 0.18 * num_tokens, 8)))
    masked = torch.where(grid == 0, torch.full_like(grid, float("nan")), grid)
    image = ax.imshow(masked.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_facecolor("#f0f0f0")
    ax.set_xlabel("expert")
    ax.set_ylabel("token")
    ax.set_title(f"routing: {num_tokens} tokens, top-{ids.shape[1]} of {num_experts} experts")
    if num_experts <= 32:
        ax.set_xticks(range(num_experts))
    fig.colorbar(image, ax=ax, label=label)
    return fig


def expert_load_bars(counts: torch.Tensor, ax=None):
    """Tokens per expert as bars, with the mean and the imbalance ratio (max / mean).

    Returns the matplotlib Figure.
    """
    check_tensor("counts", counts, ndim=1)
    if counts.numel() == 0:
        raise ValueError("counts is empty: pass one count per expert")
    values = counts.detach().double().cpu()
    num_experts = values.numel()
    fig, ax = _new_axes(ax, (min(2 + 0.35 * num_experts, 12), 3))
    mean = values.mean().item()
    colors = ["#d62728" if v == values.max().item() and v > mean else "#1f77b4" for v in values.tolist()]
    ax.bar(range(num_experts), values.numpy(), color=colors)
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.1f}")
    ax.set_xlabel("expert")
    ax.set_ylabel("tokens")
    ratio = load_imbalance(values)
    ax.set_title(f"expert load: imbalance max/mean = {ratio:.2f}")
    if num_experts <= 32:
        ax.set_xticks(range(num_experts))
    ax.legend(loc="upper right")
    return fig
