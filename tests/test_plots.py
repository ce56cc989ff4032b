"""moe_learn.plots draws labelled figures from the course's tensors, and rejects bad input clearly."""

import matplotlib

matplotlib.use("Agg")  # before pyplot: tests never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moe_learn import plots  # noqa: E402


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


def test_routing_heatmap_rejects_bad_input():
    selected, weights = _routing()
    with pytest.raises(ValueError, match=r"selected_experts holds 4, outside \[0, 4\)"):
        plots.routing_heatmap(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="weights has shape"):
        plots.routing_heatmap(selected, 5, weights[:, :1])
    with pytest.raises(TypeError, match="selected_experts must hold integer"):
        plots.routing_heatmap(selected.float(), 5)


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
    lines = [line.get_ydata() for line in ax.get_lines()]
    assert len(lines) == 6
    # Stable sort of [2, 0, 0, 1, 2, 1]: expert 0 gets rows 1, 2; expert 1 rows 3, 5; expert 2 rows 0, 4.
    assert sorted((int(src), int(dst)) for src, dst in lines) == [(0, 4), (1, 0), (2, 1), (3, 2), (4, 5), (5, 3)]


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
