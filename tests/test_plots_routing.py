"""Routing pictures: they draw what they are given and refuse what they cannot draw."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moe_learn import get_routing_indices  # noqa: E402
from moe_learn.plots_routing import expert_load_bars, load_imbalance, routing_heatmap  # noqa: E402


def test_heatmap_marks_each_chosen_cell():
    ids = torch.tensor([[0, 2], [1, 2], [3, 0]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    fig = routing_heatmap(ids, 4, weights)
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (3, 4)
    assert grid[0, 0] == pytest.approx(0.7) and grid[2, 3] == pytest.approx(0.9)
    assert bool(grid.mask[0, 1]) and bool(grid.mask[1, 0]), "unrouted cells stay blank"
    plt.close(fig)
    fig, ax = plt.subplots()
    assert routing_heatmap(ids, 4, ax=ax) is fig
    plt.close(fig)


def test_load_bars_show_counts_and_imbalance():
    counts, _ = get_routing_indices(torch.tensor([[0], [0], [0], [1]]), 4)
    fig = expert_load_bars(counts)
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches] == [3, 1, 0, 0]
    assert "imbalance max/mean = 3.00" in ax.get_title()
    assert load_imbalance(counts) == pytest.approx(3.0)
    assert load_imbalance(torch.tensor([2, 2, 2])) == pytest.approx(1.0)
    plt.close(fig)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: routing_heatmap(torch.tensor([[0, 5]]), 4), r"topk_ids must lie in \[0, 4\)"),
        (lambda: routing_heatmap(torch.tensor([[0.0, 1.0]]), 4), "integer indices"),
        (lambda: routing_heatmap(torch.tensor([[0, 1]]), 4, torch.ones(1, 3)), "must match"),
        (lambda: expert_load_bars(torch.tensor([])), "counts is empty"),
        (lambda: expert_load_bars(torch.ones(2, 2)), "counts must be 1-D"),
    ],
)
def test_plots_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
