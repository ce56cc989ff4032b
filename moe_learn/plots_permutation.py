"""Pictures for chapter 03: how rows move from token order to expert order."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyArrowPatch, Rectangle

from .routing import get_routing_indices
from .validation import check_integer, check_positive_int, check_tensor

# More rows than this make an unreadable picture.
MAX_ROWS = 64


def _expert_colors(num_experts: int):
    cmap = plt.get_cmap("tab10" if num_experts <= 10 else "tab20")
    return [cmap(e % cmap.N) for e in range(num_experts)]


def permutation_diagram(topk_ids: torch.Tensor, num_experts: int, ax=None):
    """Draw ``permute``: each token (left) fans out to its ``k`` rows in expert order (right).

    topk_ids ``[T, k]`` (the experts each token chose); rows on the right are grouped by
    expert (colored), tokens in their original order inside each group, as the stable
    argsort of ``get_routing_indices`` leaves them. Returns the matplotlib Figure.
    """
    check_tensor("topk_ids", topk_ids, ndim=2)
    check_integer("topk_ids", topk_ids)
    check_positive_int("num_experts", num_experts)
    num_tokens, top_k = topk_ids.shape
    rows = num_tokens * top_k
    if rows == 0:
        raise ValueError("topk_ids has no (token, slot) pairs to draw")
    if rows > MAX_ROWS:
        raise ValueError(f"topk_ids has {rows} (token, slot) pairs; draw at most {MAX_ROWS} (slice a few tokens)")
    counts, gather = get_routing_indices(topk_ids.cpu(), num_experts)
    counts, gather, flat_ids = counts.tolist(), gather.tolist(), topk_ids.reshape(-1).cpu().tolist()
    colors = _expert_colors(num_experts)

    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 0.32 * rows + 1.2))
    else:
        fig = ax.figure
    # Rows are drawn top to bottom: y = -i. Tokens are spread over the same height.
    token_step = rows / max(num_tokens, 1)
    token_y = [-(t + 0.5) * token_step + 0.5 for t in range(num_tokens)]
    left_x, right_x, width = 0.0, 3.0, 1.4

    for t in range(num_tokens):
        ax.add_patch(Rectangle((left_x, token_y[t] - 0.4), width, 0.8, facecolor="0.92", edgecolor="0.3"))
        ax.text(left_x + width / 2, token_y[t], f"token {t}", ha="center", va="center", fontsize=8)

    for i, flat in enumerate(gather):
        token, slot = divmod(flat, top_k)
        expert = flat_ids[flat]
        y = -i
        ax.add_patch(Rectangle((right_x, y - 0.4), width, 0.8, facecolor=colors[expert], alpha=0.85, edgecolor="0.3"))
        ax.text(right_x + width / 2, y, f"row {i}: t{token}·k{slot}", ha="center", va="center", fontsize=7)
        ax.add_patch(
            FancyArrowPatch(
                (left_x + width, token_y[token]),
                (right_x, y),
                arrowstyle="-|>",
                mutation_scale=8,
                color=colors[expert],
                lw=1.0,
                alpha=0.8,
            )
        )

    # A bracket label per expert: how many rows it owns (empty experts say so).
    start = 0
    for e, m in enumerate(counts):
        if m:
            mid = -(start + (m - 1) / 2)
            ax.plot([right_x + width + 0.1] * 2, [-start + 0.4, -(start + m - 1) - 0.4], color=colors[e], lw=3)
            ax.text(right_x + width + 0.2, mid, f"expert {e}: {m} row{'s' if m > 1 else ''}", va="center", fontsize=8)
        start += m
    empty = [e for e, m in enumerate(counts) if m == 0]
    note = f"   (no tokens: expert {', '.join(map(str, empty))})" if empty else ""

    ax.text(left_x + width / 2, 1.0, "token order", ha="center", fontsize=9, weight="bold")
    ax.text(right_x + width / 2, 1.0, "expert order", ha="center", fontsize=9, weight="bold")
    ax.set_title(f"permute: row i of expert order = X[gather_indices[i] // {top_k}]{note}", fontsize=9)
    ax.set_xlim(-0.2, right_x + width + 2.0)
    ax.set_ylim(-rows + 0.2, 1.5)
    ax.axis("off")
    return fig
