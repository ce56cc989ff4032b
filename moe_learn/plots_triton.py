"""Pictures for the Triton chapters: which program covers which block of the output."""

from __future__ import annotations

import math

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .validation import check_positive_int


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
    palette = [colormaps["tab20"](i) for i in range(0, 20, 2)] + [colormaps["tab20"](i) for i in range(1, 20, 2)]
    for pid_m in range(grid_m):
        for pid_n in range(grid_n):
            color = palette[(pid_m * grid_n + pid_n) % len(palette)]
            x0, y0 = pid_n * block_cols, pid_m * block_rows
            inside_w = min(block_cols, cols - x0)
            inside_h = min(block_rows, rows - y0)
            # The part of the tile inside the output: what this program really writes ...
            ax.add_patch(Rectangle((x0, y0), inside_w, inside_h, facecolor=color, edgecolor="black", lw=1.0, alpha=0.6))
            # ... and the lanes past the edge (hatched), which its masks switch off.
            if inside_w < block_cols:
                ax.add_patch(
                    Rectangle(
                        (x0 + inside_w, y0),
                        block_cols - inside_w,
                        block_rows,
                        facecolor="none",
                        edgecolor=color,
                        hatch="//",
                        lw=0.6,
                    )
                )
            if inside_h < block_rows:
                ax.add_patch(
                    Rectangle(
                        (x0, y0 + inside_h),
                        inside_w,
                        block_rows - inside_h,
                        facecolor="none",
                        edgecolor=color,
                        hatch="//",
                        lw=0.6,
                    )
                )
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
