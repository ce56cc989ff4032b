"""Pictures the chapters share: routing, expert load, permutation, roofline, tile schedule.

Every function returns a ``matplotlib.figure.Figure`` (or draws into ``ax`` when one is
given and returns its figure). Figures made here are closed in pyplot right away so a
notebook shows each one once: make the call the cell's last expression, or ``display(fig)``.

    routing_heatmap(selected_experts, num_experts, weights=None)   token x expert
    expert_load_bars(counts)                                        tokens per expert, imbalance
    permutation_diagram(selected_experts, num_experts)              token order → expert order
    roofline_plot(points, peak_tflops, bandwidth_tbs)              achieved vs attainable TFLOP/s
    tile_schedule_plot(records)                                     which program wrote which tile
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .validation import check_index_range, check_integer, check_positive_int, check_tensor

__all__ = [
    "expert_colors",
    "expert_load_bars",
    "imbalance_ratio",
    "permutation_diagram",
    "roofline_plot",
    "routing_heatmap",
    "tile_schedule_plot",
]


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    plt.close(fig)  # shown once, by the notebook's display of the return value
    return fig, ax


def expert_colors(num_experts: int) -> list:
    """One stable color per expert, the same in every plot of the course."""
    cmap = matplotlib.colormaps["tab10" if num_experts <= 10 else "tab20"]
    return [cmap(e % cmap.N) for e in range(num_experts)]


def _as_numpy(name: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    raise TypeError(f"{name} must be a torch.Tensor, numpy array or list, got {type(value).__name__}")


def _check_selected(selected_experts, num_experts: int) -> torch.Tensor:
    check_tensor("selected_experts", selected_experts, ndim=2)
    check_integer("selected_experts", selected_experts)
    check_positive_int("num_experts", num_experts)
    check_index_range("selected_experts", selected_experts, num_experts, "an expert id, below num_experts")
    return selected_experts.detach().cpu().long()


def routing_heatmap(
    selected_experts: torch.Tensor,
    num_experts: int,
    weights: torch.Tensor | None = None,
    *,
    ax: Axes | None = None,
    title: str = "Which experts each token is routed to",
) -> Figure:
    """A token x expert grid: the routing weight where a token chose an expert, else empty.

    ``selected_experts``: ``[num_tokens, top_k]`` expert ids; ``weights``: the matching
    ``[num_tokens, top_k]`` routing weights (without them, a chosen cell is 1).
    """
    selected = _check_selected(selected_experts, num_experts)
    if weights is not None:
        check_tensor("weights", weights, ndim=2)
        if tuple(weights.shape) != tuple(selected.shape):
            raise ValueError(
                f"weights has shape {tuple(weights.shape)} but selected_experts has {tuple(selected.shape)}; "
                "pass the routing weights that calculate_topk returned with these experts"
            )
        values = weights.detach().float().cpu()
    else:
        values = torch.ones(selected.shape)
    grid = torch.full((selected.shape[0], num_experts), float("nan"))
    rows = torch.arange(selected.shape[0]).unsqueeze(1).expand_as(selected)
    grid[rows.reshape(-1), selected.reshape(-1)] = values.reshape(-1)

    num_tokens = selected.shape[0]
    fig, ax = _new_axes(ax, (min(2.0 + 0.45 * num_experts, 12), min(1.5 + 0.25 * max(num_tokens, 1), 9)))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(num_experts))
    if num_tokens <= 32:
        ax.set_yticks(range(num_tokens))
    ax.set_xlabel("expert")
    ax.set_ylabel("token")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="routing weight" if weights is not None else "chosen")
    return fig


def imbalance_ratio(counts) -> float:
    """max / mean of the per-expert token counts: 1.0 is perfectly balanced; nan if no tokens."""
    values = _as_numpy("counts", counts).astype(float).reshape(-1)
    if values.size == 0 or values.mean() == 0:
        return float("nan")
    return float(values.max() / values.mean())


def expert_load_bars(
    counts,
    *,
    ax: Axes | None = None,
    title: str = "Tokens per expert",
) -> Figure:
    """Bars of tokens per expert, the mean as a line, and the imbalance max/mean in the title.

    ``counts``: ``token_counts_by_expert`` from ``get_routing_indices`` (tensor, array or list).
    """
    values = _as_numpy("counts", counts).reshape(-1)
    if values.size == 0:
        raise ValueError("counts is empty; pass one token count per expert")
    if (values < 0).any():
        raise ValueError(f"counts must be non-negative, got {values.tolist()}")
    ratio = imbalance_ratio(values)
    fig, ax = _new_axes(ax, (min(3.0 + 0.4 * values.size, 12), 3.2))
    ax.bar(range(values.size), values, color=expert_colors(values.size))
    mean = float(values.mean())
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.1f}")
    ax.set_xticks(range(values.size))
    ax.set_ylim(0, max(float(values.max()), 1.0) * 1.25)  # headroom for the legend
    ax.set_xlabel("expert")
    ax.set_ylabel("tokens")
    shown = f"{ratio:.2f}" if np.isfinite(ratio) else "n/a (no tokens)"
    ax.set_title(f"{title} (imbalance max/mean = {shown})")
    ax.legend(loc="upper right")
    return fig


def permutation_diagram(
    selected_experts: torch.Tensor,
    num_experts: int,
    *,
    ax: Axes | None = None,
    title: str = "Token order → expert order",
) -> Figure:
    """Each (token, slot) row on the left joined to its place in expert order on the right.

    The right column is what ``permute`` produces: rows grouped by expert, tokens in their
    original order inside each expert (a stable sort). Lines take their expert's color.
    """
    selected = _check_selected(selected_experts, num_experts)
    num_tokens, topk = selected.shape
    flat = selected.reshape(-1)
    # gather_indices: position in expert order -> flat (token, slot) index; stable keeps token order.
    gather = torch.sort(flat, stable=True).indices
    colors = expert_colors(num_experts)
    rows = flat.numel()

    fig, ax = _new_axes(ax, (6.5, min(1.5 + 0.32 * max(rows, 1), 12)))
    for dest, src in enumerate(gather.tolist()):
        expert = int(flat[src])
        ax.plot([0, 1], [src, dest], color=colors[expert], linewidth=1.5, alpha=0.8)
    for i in range(rows):
        t, k = divmod(i, topk)
        ax.text(-0.03, i, f"t{t}" + (f"·k{k}" if topk > 1 else ""), ha="right", va="center", fontsize=8)
        e = int(flat[gather[i]])
        ax.text(1.03, i, f"e{e} <- t{int(gather[i]) // topk}", ha="left", va="center", fontsize=8, color=colors[e])
    ax.scatter([0] * rows, range(rows), color="black", s=10, zorder=3)
    ax.scatter([1] * rows, range(rows), c=[colors[int(flat[g])] for g in gather.tolist()], s=10, zorder=3)
    ax.set_xlim(-0.45, 1.5)
    ax.set_ylim(rows - 0.5 if rows else 0.5, -0.5)
    ax.set_xticks([0, 1], ["token order", "expert order"])
    ax.set_yticks([])
    ax.set_xlabel(f"{num_tokens} tokens x top-{topk} = {rows} rows")
    ax.set_ylabel("row")
    ax.set_title(title)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return fig


ROOFLINE_KEYS = ("label", "flops", "bytes", "seconds")


def roofline_plot(
    points: Sequence[Mapping],
    peak_tflops: float,
    bandwidth_tbs: float,
    *,
    ax: Axes | None = None,
    title: str = "Roofline",
) -> Figure:
    """Measured kernels against the machine's limits, log-log.

    ``points``: dicts ``{label, flops, bytes, seconds}``, one per measured kernel (flops and
    bytes moved per call, seconds per call). ``peak_tflops``: the compute roof in TFLOP/s;
    ``bandwidth_tbs``: memory bandwidth in TB/s. A kernel with arithmetic intensity I
    (FLOP/byte) can reach at most ``min(peak_tflops, I * bandwidth_tbs)`` TFLOP/s.
    """
    for name, value in (("peak_tflops", peak_tflops), ("bandwidth_tbs", bandwidth_tbs)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not isinstance(points, Sequence) or isinstance(points, (str, bytes)):
        raise TypeError(f"points must be a list of dicts with keys {ROOFLINE_KEYS}, got {type(points).__name__}")
    intensities, achieved, labels = [], [], []
    for i, point in enumerate(points):
        if not isinstance(point, Mapping):
            raise TypeError(f"points[{i}] must be a dict with keys {ROOFLINE_KEYS}, got {type(point).__name__}")
        missing = [k for k in ROOFLINE_KEYS if k not in point]
        if missing:
            raise ValueError(f"points[{i}] lacks {missing}; each point needs {ROOFLINE_KEYS}")
        for key in ("flops", "bytes", "seconds"):
            if not float(point[key]) > 0:
                raise ValueError(f"points[{i}]['{key}'] must be positive, got {point[key]!r}")
        intensities.append(float(point["flops"]) / float(point["bytes"]))
        achieved.append(float(point["flops"]) / float(point["seconds"]) / 1e12)
        labels.append(str(point["label"]))

    ridge = peak_tflops / bandwidth_tbs  # FLOP/byte where the two roofs meet
    lo = min([ridge / 100, *(x / 3 for x in intensities)])
    hi = max([ridge * 100, *(x * 3 for x in intensities)])
    xs = np.geomspace(lo, hi, 200)
    roof = np.minimum(peak_tflops, xs * bandwidth_tbs)

    fig, ax = _new_axes(ax, (6.5, 4.2))
    ax.loglog(xs, roof, color="black", linewidth=2, label=f"roof: {peak_tflops:g} TFLOP/s, {bandwidth_tbs:g} TB/s")
    ax.axvline(ridge, color="gray", linestyle=":", linewidth=1)
    ax.annotate(
        f"ridge {ridge:.0f} FLOP/B", (ridge, peak_tflops), textcoords="offset points", xytext=(5, -14), fontsize=8
    )
    colors = matplotlib.colormaps["tab10"]
    for i, (x, y, label) in enumerate(zip(intensities, achieved, labels, strict=True)):
        attainable = min(peak_tflops, x * bandwidth_tbs)
        ax.scatter([x], [y], color=colors(i % 10), zorder=3, label=f"{label}: {100 * y / attainable:.0f}% of roof")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="major", alpha=0.3)
    return fig


TILE_FIELDS = ("program", "expert", "row_start", "row_end", "col_start", "col_end")


def _tile_field(record, i: int, field: str) -> int:
    if isinstance(record, Mapping):
        if field not in record:
            raise ValueError(f"records[{i}] lacks '{field}'; each record needs {TILE_FIELDS}")
        value = record[field]
    elif hasattr(record, field):
        value = getattr(record, field)
    else:
        raise ValueError(
            f"records[{i}] ({type(record).__name__}) has no field '{field}'; each record needs {TILE_FIELDS}"
        )
    return int(value)


def tile_schedule_plot(
    records: Iterable,
    *,
    color_by: str = "expert",
    ax: Axes | None = None,
    title: str = "Tile schedule: which program computes which output tile",
) -> Figure:
    """The output matrix (rows in expert order x columns) cut into the tiles programs wrote.

    ``records``: one per tile, a dict or object with ``program, expert, row_start, row_end,
    col_start, col_end`` (ends exclusive). Each tile is filled with its expert's color
    (``color_by="program"`` colors by program instead) and labelled with its program id;
    dashed lines mark where one expert's rows end.
    """
    if color_by not in ("expert", "program"):
        raise ValueError(f"color_by must be 'expert' or 'program', got {color_by!r}")
    tiles = []
    for i, record in enumerate(records):
        tile = {f: _tile_field(record, i, f) for f in TILE_FIELDS}
        if tile["row_end"] < tile["row_start"] or tile["col_end"] < tile["col_start"]:
            raise ValueError(f"records[{i}] has an end before its start: {tile}")
        tiles.append(tile)
    if not tiles:
        raise ValueError("records is empty; pass one record per tile a program computed")

    rows = max(t["row_end"] for t in tiles)
    cols = max(t["col_end"] for t in tiles)
    key = color_by
    palette = expert_colors(max(t[key] for t in tiles) + 1)
    longest = max(rows, cols, 1)
    fig, ax = _new_axes(ax, (3.5 + 4.5 * cols / longest, 2.0 + 3.5 * rows / longest))
    for t in tiles:
        width, height = t["col_end"] - t["col_start"], t["row_end"] - t["row_start"]
        ax.add_patch(
            Rectangle(
                (t["col_start"], t["row_start"]),
                width,
                height,
                facecolor=palette[t[key]],
                edgecolor="white",
                alpha=0.85,
            )
        )
        if len(tiles) <= 200:
            ax.text(
                t["col_start"] + width / 2,
                t["row_start"] + height / 2,
                f"p{t['program']}",
                ha="center",
                va="center",
                fontsize=7,
            )
    # Expert boundaries: where the last row of each expert lies (a tile never spans two experts).
    expert_ends = {}
    for t in tiles:
        expert_ends[t["expert"]] = max(expert_ends.get(t["expert"], 0), t["row_end"])
    for end in sorted(set(expert_ends.values()) - {rows}):
        ax.axhline(end, color="black", linestyle="--", linewidth=1)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)  # row 0 at the top, like a matrix
    ax.set_xlabel("output column (N)")
    ax.set_ylabel("output row (tokens in expert order, M)")
    ax.set_title(title)
    legend_ids = sorted({t[key] for t in tiles})
    if len(legend_ids) <= 16:
        handles = [Rectangle((0, 0), 1, 1, color=palette[k]) for k in legend_ids]
        ax.legend(handles, [f"{key} {k}" for k in legend_ids], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig
