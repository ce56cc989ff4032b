"""The dispatch picture of chapter 10: which rows go to which rank."""

from __future__ import annotations

import torch

from .expert_parallel import dispatch_plan, experts_per_rank


def plot_dispatch(topk_ids_per_rank: list[torch.Tensor], num_experts: int):
    """Left: every (token, slot) of every rank, coloured by the rank that owns its expert.
    Right: the all-to-all as a matrix, rows sent from each rank (row) to each rank (column).
    Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    world_size = len(topk_ids_per_rank)
    per_rank = experts_per_rank(num_experts, world_size)
    colors = plt.get_cmap("tab10").colors[:world_size]
    cmap = ListedColormap(colors)
    top_k = topk_ids_per_rank[0].shape[1]
    most = max(max(ids.shape[0] for ids in topk_ids_per_rank), 1)

    fig, axes = plt.subplots(1, world_size + 1, figsize=(2.2 * world_size + 3.6, 0.32 * most + 1.8))
    for rank, (ax, ids) in enumerate(zip(axes[:-1], topk_ids_per_rank, strict=True)):
        if ids.numel():
            ax.imshow((ids // per_rank).float(), cmap=cmap, vmin=-0.5, vmax=world_size - 0.5, aspect="auto")
        else:
            ax.text(0.5, 0.5, "no tokens", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        for t in range(ids.shape[0]):
            for j in range(top_k):
                ax.text(j, t, f"e{int(ids[t, j])}", ha="center", va="center", fontsize=8, color="white")
        ax.set_title(f"rank {rank}'s tokens", fontsize=10)
        ax.set_xlim(-0.5, top_k - 0.5)
        ax.set_xticks(range(top_k), [f"slot {j}" for j in range(top_k)], fontsize=8)
        ax.set_yticks(range(ids.shape[0]), [f"t{t}" for t in range(ids.shape[0])], fontsize=7)
        ax.set_ylim(most - 0.5, -0.5)

    sends = torch.stack([dispatch_plan(ids, num_experts, world_size).send_counts for ids in topk_ids_per_rank])
    ax = axes[-1]
    ax.imshow(sends.float(), cmap="Greys", vmin=0, vmax=max(int(sends.max()), 1) * 1.6)
    for s in range(world_size):
        for d in range(world_size):
            ax.text(d, s, str(int(sends[s, d])), ha="center", va="center", fontsize=11)
    ax.set_title("rows sent (all-to-all)", fontsize=10)
    ax.set_xlabel("to rank")
    ax.set_ylabel("from rank")
    ax.set_xticks(range(world_size))
    ax.set_yticks(range(world_size))
    for d, color in enumerate(colors):
        ax.get_xticklabels()[d].set_color(color)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors]
    labels = [f"experts {r * per_rank}..{(r + 1) * per_rank - 1} on rank {r}" for r in range(world_size)]
    fig.legend(handles, labels, loc="lower center", ncol=world_size, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig
