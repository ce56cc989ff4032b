"""moe_learn.plots draws labelled figures from the course's tensors, and rejects bad input clearly."""

import matplotlib

matplotlib.use("Agg")  # before pyplot: tests never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from moe_learn import get_routing_indices, plots  # noqa: E402


def _routing(tokens=7, experts=5, topk=2):
    picks = torch.stack([torch.randperm(experts)[:topk] for _ in range(tokens)])
    return picks, torch.rand(tokens, topk)


def _labelled(fig, title_part):
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert title_part in ax.get_title()
    assert ax.get_xlabel() and ax.get_ylabel()
    fig.canvas.draw()  # renders without error under Agg
    return ax


def test_routing_heatmap_shows_each_choice_with_its_weight():
    selected, weights = _routing()
    fig = plots.routing_heatmap(selected, 5, weights)
    ax = _labelled(fig, "routed")
    grid = np.ma.getdata(ax.images[0].get_array())
    assert grid.shape == (7, 5)
    for t in range(7):
        chosen = set(selected[t].tolist())
        for e in range(5):
            if e in chosen:
                k = selected[t].tolist().index(e)
                assert grid[t, e] == pytest.approx(float(weights[t, k]))
            else:
                assert np.isnan(grid[t, e])
    assert not plt.get_fignums(), "figures are closed in pyplot so notebooks show them once"


def test_routing_heatmap_without_weights_and_into_given_axes():
    selected, _ = _routing(tokens=3, experts=4, topk=1)
    fig, ax = plt.subplots()
    assert plots.routing_heatmap(selected, 4, ax=ax) is fig
    grid = np.ma.getdata(ax.images[0].get_array())
    assert np.nansum(grid) == 3
    plt.close(fig)


def test_routing_heatmap_scale_grows_for_weights_above_one():
    selected = torch.tensor([[0, 1], [2, 3]])
    assert plots.routing_heatmap(selected, 4, torch.full((2, 2), 0.5)).axes[0].images[0].get_clim() == (0.0, 1.0)
    scaled = torch.tensor([[2.5, 0.1], [1.2, 0.3]])  # e.g. DeepSeek-V3's routed_scaling_factor
    assert plots.routing_heatmap(selected, 4, scaled).axes[0].images[0].get_clim() == pytest.approx((0.0, 2.5))


def test_routing_heatmap_rejects_bad_input():
    selected, weights = _routing()
    with pytest.raises(ValueError, match=r"selected_experts holds 4, outside \[0, 4\)"):
        plots.routing_heatmap(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="weights has shape"):
        plots.routing_heatmap(selected, 5, weights[:, :1])
    with pytest.raises(TypeError, match="selected_experts must hold integer"):
        plots.routing_heatmap(selected.float(), 5)


def test_routing_heatmap_marks_each_chosen_cell_and_masks_the_rest():
    ids = torch.tensor([[0, 2], [1, 2], [3, 0]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    fig = plots.routing_heatmap(ids, 4, weights)
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (3, 4)
    assert grid[0, 0] == pytest.approx(0.7) and grid[2, 3] == pytest.approx(0.9)
    assert bool(grid.mask[0, 1]) and bool(grid.mask[1, 0]), "unrouted cells stay blank"


def test_expert_load_bars_title_has_the_imbalance():
    counts = torch.tensor([1, 3, 5, 3], dtype=torch.int32)
    fig = plots.expert_load_bars(counts)
    ax = _labelled(fig, "imbalance max/mean = 1.67")
    heights = [p.get_height() for p in ax.patches]
    assert heights == [1, 3, 5, 3]
    assert plots.imbalance_ratio([2, 2, 2]) == 1.0


def test_expert_load_bars_with_no_tokens_and_bad_counts():
    fig = plots.expert_load_bars([0, 0, 0])
    _labelled(fig, "n/a (no tokens)")
    with pytest.raises(ValueError, match="non-negative"):
        plots.expert_load_bars([1, -1])
    with pytest.raises(ValueError, match="counts is empty"):
        plots.expert_load_bars([])
    with pytest.raises(TypeError, match="counts must be"):
        plots.expert_load_bars("3 4")


def test_permutation_diagram_joins_each_row_to_its_place_in_expert_order():
    selected = torch.tensor([[2, 0], [0, 1], [2, 1]])
    fig = plots.permutation_diagram(selected, 3)
    ax = _labelled(fig, "expert order")
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == 6, "one arrow per (token, slot) row"
    # Stable sort of [2, 0, 0, 1, 2, 1]: expert 0 gets rows 1, 2; expert 1 rows 3, 5; expert 2 rows 0, 4.
    # As (flat row t*k+j -> place in expert order): (0, 4), (1, 0), (2, 1), (3, 2), (4, 5), (5, 3).
    rows = sorted(t.get_text() for t in ax.texts if t.get_text().startswith("row "))
    assert rows == ["row 0: t0·k1", "row 1: t1·k0", "row 2: t1·k1", "row 3: t2·k1", "row 4: t0·k0", "row 5: t2·k0"]
    assert not plt.get_fignums(), "figures are closed in pyplot so notebooks show them once"


def test_permutation_diagram_counts_rows_per_expert_and_names_empty_ones():
    ids = torch.tensor([[2, 0], [1, 2], [0, 2]])
    fig = plots.permutation_diagram(ids, 4)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sum(t.startswith("row ") for t in texts) == 6
    assert "expert 2: 3 rows" in texts and "expert 1: 1 row" in texts
    assert "expert 3" in fig.axes[0].get_title()  # the empty expert is named
    with pytest.raises(ValueError, match="at most 64"):
        plots.permutation_diagram(torch.zeros(40, 2, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="selected_experts must hold integer"):
        plots.permutation_diagram(ids.float(), 4)


def test_roofline_plot_places_points_under_the_roof():
    points = [
        {"label": "loop", "flops": 2e9, "bytes": 4e8, "seconds": 1e-3},
        {"label": "fused", "flops": 2e9, "bytes": 2e7, "seconds": 1e-4},
    ]
    fig = plots.roofline_plot(points, peak_tflops=100.0, bandwidth_tbs=2.0)
    ax = _labelled(fig, "Roofline")
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    offsets = np.concatenate([np.asarray(c.get_offsets()) for c in ax.collections])
    assert offsets[:, 0].tolist() == pytest.approx([5.0, 100.0])  # FLOP per byte
    assert offsets[:, 1].tolist() == pytest.approx([2.0, 20.0])  # TFLOP/s
    roof = ax.get_lines()[0].get_ydata()
    assert roof.max() == pytest.approx(100.0)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "loop: 20% of roof" in legend  # 2 TFLOP/s where 5 FLOP/B x 2 TB/s = 10 is attainable


def test_roofline_plot_rejects_bad_points():
    with pytest.raises(ValueError, match=r"points\[0\] lacks \['seconds'\]"):
        plots.roofline_plot([{"label": "x", "flops": 1, "bytes": 1}], 10, 1)
    with pytest.raises(ValueError, match="seconds'\\] must be positive"):
        plots.roofline_plot([{"label": "x", "flops": 1, "bytes": 1, "seconds": 0}], 10, 1)
    with pytest.raises(ValueError, match="bandwidth_tbs must be a positive number"):
        plots.roofline_plot([], 10, 0)


def test_tile_schedule_plot_draws_every_tile():
    records = [
        {"program": 0, "expert": 0, "row_start": 0, "row_end": 4, "col_start": 0, "col_end": 8},
        {"program": 1, "expert": 0, "row_start": 4, "row_end": 5, "col_start": 0, "col_end": 8},
        {"program": 2, "expert": 2, "row_start": 5, "row_end": 9, "col_start": 0, "col_end": 8},
    ]
    fig = plots.tile_schedule_plot(records)
    ax = _labelled(fig, "Tile schedule")
    rects = [p for p in ax.patches]
    assert [(r.get_y(), r.get_height()) for r in rects] == [(0, 4), (4, 1), (5, 4)]
    assert {t.get_text() for t in ax.texts} == {"p0", "p1", "p2"}
    assert [line.get_ydata()[0] for line in ax.get_lines()] == [5]  # the boundary between experts 0 and 2


def test_tile_schedule_plot_names_the_experts_and_the_empty_ones():
    from moe_learn.kernels import tile_schedule

    records = tile_schedule(torch.tensor([5, 0, 37, 1, 0, 18]), 72, 16, 32, num_programs=4)
    fig = plots.tile_schedule_plot(records, color_by="program")
    ax = _labelled(fig, "Tile schedule")
    (names,) = [child for child in ax.child_axes]  # the expert names beside the rows
    assert [t.get_text() for t in names.get_yticklabels()] == ["expert 0", "expert 2", "expert 3", "expert 5"]
    assert list(names.get_yticks()) == [2.5, 23.5, 42.5, 52.0]  # the middle of each expert's rows
    assert ax.get_xlabel().endswith("no rows, so no tiles: experts 1, 4")
    # Expert 3's one-row tiles are too thin for a label; every other tile has its own.
    labelled = {t.get_text() for t in ax.texts}
    label = {r: f"p{r.program}.{r.step}" for r in records}
    thin = {label[r] for r in records if r.expert == 3}
    assert thin and not thin & labelled
    assert labelled == set(label.values()) - thin
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["program 0", "program 1", "program 2", "program 3"]


def test_tile_schedule_plot_accepts_objects_and_names_a_missing_field():
    from collections import namedtuple

    Tile = namedtuple("Tile", "program expert row_start row_end col_start col_end")
    fig = plots.tile_schedule_plot([Tile(0, 1, 0, 2, 0, 2)], color_by="program")
    _labelled(fig, "Tile schedule")
    with pytest.raises(ValueError, match="records\\[0\\] lacks 'col_end'"):
        plots.tile_schedule_plot([{"program": 0, "expert": 0, "row_start": 0, "row_end": 1, "col_start": 0}])
    with pytest.raises(ValueError, match="records is empty"):
        plots.tile_schedule_plot([])
    with pytest.raises(ValueError, match="color_by"):
        plots.tile_schedule_plot([Tile(0, 1, 0, 2, 0, 2)], color_by="tile")


def test_expert_load_bars_from_routing_counts():
    counts, _ = get_routing_indices(torch.tensor([[0], [0], [0], [1]]), 4)
    fig = plots.expert_load_bars(counts)
    ax = fig.axes[0]
    assert [p.get_height() for p in ax.patches] == [3, 1, 0, 0]
    assert "imbalance max/mean = 3.00" in ax.get_title()
    assert plots.imbalance_ratio(counts) == pytest.approx(3.0)
    assert plots.imbalance_ratio(torch.tensor([2, 2, 2])) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: plots.routing_heatmap(torch.tensor([[0, 5]]), 4), r"selected_experts holds 5, outside \[0, 4\)"),
        (lambda: plots.routing_heatmap(torch.tensor([[0.0, 1.0]]), 4), "integer indices"),
        (lambda: plots.routing_heatmap(torch.tensor([[0, 1]]), 4, torch.ones(1, 3)), "weights has shape"),
        (lambda: plots.expert_load_bars(torch.tensor([])), "counts is empty"),
        (lambda: plots.expert_load_bars(torch.ones(2, 2)), "counts must be 1-D"),
    ],
)
def test_routing_plots_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_program_grid_figure_labels_one_tile_per_program():
    fig = plots.program_grid_figure(100, 70, 32, 32)
    assert isinstance(fig, Figure)
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert labels == {f"({m}, {n})" for m in range(4) for n in range(3)}
    assert "grid = (4, 3)" in fig.axes[0].get_title()
    assert fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel()


def test_program_grid_figure_one_d_and_bad_input():
    fig = plots.program_grid_figure(1, 1100, 1, 256)
    assert {t.get_text() for t in fig.axes[0].texts} == {f"pid {p}" for p in range(5)}
    with pytest.raises(ValueError, match="block_cols"):
        plots.program_grid_figure(4, 4, 2, 0)


def test_dispatch_plot_colors_rows_by_rank_and_counts_the_all_to_all():
    # 4 experts on 2 ranks: experts 0, 1 on rank 0; experts 2, 3 on rank 1.
    ids = [torch.tensor([[0, 2], [3, 1], [2, 3]]), torch.tensor([[1, 0]])]
    fig = plots.dispatch_plot(ids, num_experts=4)
    assert not plt.get_fignums(), "figures are closed in pyplot so notebooks show them once"
    *rank_axes, sends_ax = fig.axes
    assert [ax.get_title() for ax in rank_axes] == ["rank 0's tokens", "rank 1's tokens"]
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
    owner = np.ma.getdata(rank_axes[0].images[0].get_array())
    assert owner.tolist() == [[0, 1], [1, 0], [1, 1]]
    sends = np.ma.getdata(sends_ax.images[0].get_array())
    assert sends.tolist() == [[2, 4], [2, 0]]  # rank 0 keeps 2 rows and sends 4; rank 1 sends both to rank 0
    fig.canvas.draw()
