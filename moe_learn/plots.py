"""Every picture of the course: routing, expert load, permutation, roofline, tiles, dispatch.

Every function returns a ``matplotlib.figure.Figure`` (or draws into ``ax`` when one is
given and returns its figure). Figures made here are closed in pyplot right away so a
notebook shows each one once: make the call the cell's last expression, or ``display(fig)``.

    routing_heatmap(selected_experts, num_experts, weights=None)   token x expert
    expert_load_bars(counts)                                        tokens per expert, imbalance
    permutation_diagram(selected_experts, num_experts)              token order → expert order
    roofline_plot(points, peak_tflops, bandwidth_tbs)              achieved vs attainable TFLOP/s
    tile_schedule_plot(records)                                     which program wrote which tile
    program_grid_figure(rows, cols, block_rows, block_cols)         one Triton program per output block
    dispatch_plot(topk_ids_per_rank, num_experts)                   expert parallelism: rows sent per rank
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle
from matplotlib.transforms import ScaledTranslation

from moe_learn.ops.routing import get_routing_indices
from moe_learn.validation import check_index_range, check_integer, check_positive_int, check_tensor

__all__ = [
    "dispatch_plot",
    "expert_colors",
    "expert_load_bars",
    "imbalance_ratio",
    "permutation_diagram",
    "program_grid_figure",
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
    # 0..1 for normalized routers; scaled weights (DeepSeek-V3's routed_scaling_factor, Llama 4's
    # sigmoids) can exceed 1, so the scale grows rather than clipping them.
    vmax = max(1.0, float(values.max())) if values.numel() else 1.0
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
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
    values = _as_numpy("counts", counts)
    if values.ndim != 1:
        raise ValueError(f"counts must be 1-D (one token count per expert), got shape {tuple(values.shape)}")
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


# More (token, slot) rows than this make an unreadable permutation picture.
MAX_PERMUTATION_ROWS = 64


def permutation_diagram(
    selected_experts: torch.Tensor,
    num_experts: int,
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Draw ``permute``: each token (left) fans out to its ``k`` rows in expert order (right).

    ``selected_experts``: ``[num_tokens, top_k]`` expert ids. Rows on the right are grouped
    by expert (its color, with a bracket that counts its rows), tokens in their original
    order inside each group, as the stable argsort of ``get_routing_indices`` leaves them.
    The default title names the experts that got no rows.
    """
    selected = _check_selected(selected_experts, num_experts)
    num_tokens, top_k = selected.shape
    rows = num_tokens * top_k
    if rows == 0:
        raise ValueError("selected_experts has no (token, slot) pairs to draw")
    if rows > MAX_PERMUTATION_ROWS:
        raise ValueError(
            f"selected_experts has {rows} (token, slot) pairs; draw at most {MAX_PERMUTATION_ROWS} (slice a few tokens)"
        )
    counts, gather = get_routing_indices(selected, num_experts)
    counts, gather, flat_ids = counts.tolist(), gather.tolist(), selected.reshape(-1).tolist()
    colors = expert_colors(num_experts)

    fig, ax = _new_axes(ax, (7.0, 0.32 * rows + 1.6))
    # Rows are drawn top to bottom: y = -i. Tokens are spread over the same height.
    token_step = rows / num_tokens
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

    # A bracket label per expert: how many rows it owns (empty experts are named in the title).
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
    if title is None:
        title = f"permute: row i of expert order = X[gather_indices[i] // {top_k}]{note}"
    ax.set_title(title, fontsize=9)
    ax.set_xlim(-0.2, right_x + width + 2.0)
    ax.set_ylim(-rows + 0.2, 1.5)
    # No ticks (positions mean nothing), but the axes keep labels that say what is drawn.
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{num_tokens} tokens x top-{top_k} = {rows} rows", fontsize=9)
    ax.set_ylabel("rows, top to bottom", fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)
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
    col_start, col_end`` (ends exclusive), e.g. ``moe_learn.kernels.tile_schedule``'s. Each
    tile is filled with its expert's color (``color_by="program"`` colors by program
    instead) and labelled with its program id, ``p1.2`` (program 1's third tile) when the
    record also has a ``step``; dashed lines mark where one expert's rows end.
    """
    if color_by not in ("expert", "program"):
        raise ValueError(f"color_by must be 'expert' or 'program', got {color_by!r}")
    tiles = []
    for i, record in enumerate(records):
        tile = {f: _tile_field(record, i, f) for f in TILE_FIELDS}
        step = record.get("step", -1) if isinstance(record, Mapping) else getattr(record, "step", -1)
        tile["label"] = f"p{tile['program']}" + (f".{int(step)}" if int(step) >= 0 else "")
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
    # A label needs about 9 points of height: thinner tiles (an expert with a row or two) get none.
    axes_points = 72 * fig.get_size_inches()[1] * ax.get_position().height
    min_rows = 9 * max(rows, 1) / max(axes_points, 1)
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
        if len(tiles) <= 200 and height >= min_rows:
            ax.text(
                t["col_start"] + width / 2,
                t["row_start"] + height / 2,
                t["label"],
                ha="center",
                va="center",
                fontsize=7,
            )
    # Expert boundaries: where the last row of each expert lies (a tile never spans two experts).
    spans: dict[int, tuple[int, int]] = {}
    for t in tiles:
        first, end = spans.get(t["expert"], (t["row_start"], t["row_end"]))
        spans[t["expert"]] = (min(first, t["row_start"]), max(end, t["row_end"]))
    for end in sorted({end for _, end in spans.values()} - {rows}):
        ax.axhline(end, color="black", linestyle="--", linewidth=1)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)  # row 0 at the top, like a matrix
    # Each expert's name beside its rows; an expert with no rows has no tile, so no record:
    # its id is missing between the others, and the x label names it.
    if len(spans) <= 32:
        names = ax.secondary_yaxis("right")
        names.set_yticks([(a + b) / 2 for a, b in spans.values()], [f"expert {e}" for e in spans], fontsize=7)
        names.tick_params(length=0)
    empty = sorted(set(range(max(spans) + 1)) - set(spans))
    listed = ", ".join(map(str, empty[:12])) + (", ..." if len(empty) > 12 else "")
    no_rows = f"\nno rows, so no tiles: expert{'s' if len(empty) > 1 else ''} {listed}" if empty else ""
    ax.set_xlabel("output column (N)" + no_rows)
    ax.set_ylabel("output row (tokens in expert order, M)")
    ax.set_title(title)
    legend_ids = sorted({t[key] for t in tiles})
    if len(legend_ids) <= 16 and key == "program":  # by expert, the names beside the rows say it
        handles = [Rectangle((0, 0), 1, 1, color=palette[k]) for k in legend_ids]
        beside_names = ax.transAxes + ScaledTranslation(0.65, 0, fig.dpi_scale_trans)  # right of the expert names
        ax.legend(
            handles,
            [f"{key} {k}" for k in legend_ids],
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1, 1),
            bbox_transform=beside_names,
        )
    return fig


def program_grid_figure(rows: int, cols: int, block_rows: int, block_cols: int, *, title: str | None = None) -> Figure:
    """The output ``[rows, cols]`` cut into ``block_rows x block_cols`` tiles, one per program.

    Each tile is labelled with the program ids that own it, ``(pid_m, pid_n)`` (just ``pid``
    for a one-row output). The grid is ``cdiv(rows, block_rows) x cdiv(cols, block_cols)``,
    so the last tiles stick out past the edge: that hatched part is what the masks switch off.
    """
    for name, value in (("rows", rows), ("cols", cols), ("block_rows", block_rows), ("block_cols", block_cols)):
        check_positive_int(name, value)
    grid_m, grid_n = math.ceil(rows / block_rows), math.ceil(cols / block_cols)
    one_d = rows == 1 and block_rows == 1
    total_h, total_w = grid_m * block_rows, grid_n * block_cols
    if one_d:
        figsize = (9.0, 2.2)
    else:
        height = 5.0
        figsize = (min(10.0, max(4.5, height * total_w / total_h + 1.5)), height + 0.6)
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    tab20 = matplotlib.colormaps["tab20"]
    palette = [tab20(i) for i in range(0, 20, 2)] + [tab20(i) for i in range(1, 20, 2)]
    for pid_m in range(grid_m):
        for pid_n in range(grid_n):
            color = palette[(pid_m * grid_n + pid_n) % len(palette)]
            x0, y0 = pid_n * block_cols, pid_m * block_rows
            inside_w = min(block_cols, cols - x0)
            inside_h = min(block_rows, rows - y0)
            # The part of the tile inside the output: what this program really writes ...
            ax.add_patch(Rectangle((x0, y0), inside_w, inside_h, facecolor=color, edgecolor="black", lw=1.0, alpha=0.6))
            # ... and the lanes past the edge (hatched), which its masks switch off: right, then below.
            past_edge = (
                ((x0 + inside_w, y0), block_cols - inside_w, block_rows),
                ((x0, y0 + inside_h), inside_w, block_rows - inside_h),
            )
            for corner, width, height in past_edge:
                if width > 0 and height > 0:
                    ax.add_patch(Rectangle(corner, width, height, fill=False, edgecolor=color, hatch="//", lw=0.6))
            label = f"pid {pid_n}" if one_d else f"({pid_m}, {pid_n})"
            ax.text(x0 + block_cols / 2, y0 + block_rows / 2, label, ha="center", va="center", fontsize=9)
    ax.add_patch(Rectangle((0, 0), cols, rows, fill=False, edgecolor="black", lw=2.5))
    ax.set_xlim(-0.5, total_w + 0.5)
    ax.set_ylim(total_h + 0.5, -0.5)  # row 0 on top, as a matrix is printed
    ax.set_aspect("auto" if one_d else "equal")
    ax.set_xlabel(
        f"column (N = {cols}, BLOCK = {block_cols})"
        if not one_d
        else f"element (n = {cols}, BLOCK_SIZE = {block_cols})"
    )
    if one_d:
        ax.set_yticks([])
    else:
        ax.set_ylabel(f"row (M = {rows}, BLOCK = {block_rows})")
    grid_text = f"grid = ({grid_n},)" if one_d else f"grid = ({grid_m}, {grid_n})"
    ax.set_title(title or f"{grid_text}: one program per block\nhatched = lanes past the edge, masked off", fontsize=10)
    return fig


def dispatch_plot(topk_ids_per_rank: Sequence[torch.Tensor], num_experts: int) -> Figure:
    """Expert parallelism's dispatch: which (token, slot) rows go to which rank.

    ``topk_ids_per_rank``: one ``[num_tokens_r, top_k]`` tensor of expert ids per rank (the
    experts lie on the ranks in contiguous blocks, as in ``moe_learn.layers.expert_parallel``).
    Left: every (token, slot) of every rank, colored by the rank that owns its expert.
    Right: the all-to-all as a matrix, rows sent from each rank (row) to each rank (column).
    """
    # Imported here: expert_parallel pulls in torch.distributed, which the other plots never need.
    from moe_learn.layers.expert_parallel import dispatch_plan, experts_per_rank

    world_size = len(topk_ids_per_rank)
    per_rank = experts_per_rank(num_experts, world_size)
    colors = plt.get_cmap("tab10").colors[:world_size]
    cmap = ListedColormap(colors)
    top_k = topk_ids_per_rank[0].shape[1]
    most = max(max(ids.shape[0] for ids in topk_ids_per_rank), 1)

    fig, axes = plt.subplots(1, world_size + 1, figsize=(2.2 * world_size + 3.6, 0.32 * most + 1.8))
    plt.close(fig)  # shown once, by the notebook's display of the return value
    for rank, (ax, ids) in enumerate(zip(axes[:-1], topk_ids_per_rank, strict=True)):
        if ids.numel():
            ax.imshow((ids // per_rank).float().numpy(), cmap=cmap, vmin=-0.5, vmax=world_size - 0.5, aspect="auto")
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
        ax.set_xlabel("top-k slot", fontsize=8)
        ax.set_ylabel("token", fontsize=8)

    sends = torch.stack([dispatch_plan(ids, num_experts, world_size).send_counts for ids in topk_ids_per_rank])
    ax = axes[-1]
    ax.imshow(sends.float().numpy(), cmap="Greys", vmin=0, vmax=max(int(sends.max()), 1) * 1.6)
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
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colors]
    labels = [f"experts {r * per_rank}..{(r + 1) * per_rank - 1} on rank {r}" for r in range(world_size)]
    fig.legend(handles, labels, loc="lower center", ncol=world_size, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig
