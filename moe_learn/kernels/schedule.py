"""The grouped GEMM's tile walk in plain Python, and a picture of it.

``tile_schedule`` visits tiles exactly as ``_grouped_gemm_kernel`` does: tiles are
numbered over all experts (expert 0's first), tile ``t`` belongs to program
``t % num_programs``, and inside an expert tiles go in GROUP_M-row-block groups, column
by column. Tests compare the two; chapter 06 draws it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TileRecord(NamedTuple):
    program: int  # which program computes the tile
    expert: int
    tile_m: int  # row block inside the expert
    tile_n: int  # column block
    row_start: int  # expert-order rows [row_start, row_end)
    row_end: int
    col_start: int  # output columns [col_start, col_end)
    col_end: int
    tile_id: int = -1  # global tile number (experts in order)
    step: int = -1  # how many tiles this program computed before this one


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_coords(local: int, num_m_tiles: int, num_n_tiles: int, group_m: int) -> tuple[int, int]:
    """(tile_m, tile_n) of the ``local``-th tile of one expert, in the kernel's L2 order."""
    tiles_per_group = group_m * num_n_tiles
    first_m = (local // tiles_per_group) * group_m
    group_rows = min(num_m_tiles - first_m, group_m)
    tile_m = first_m + (local % tiles_per_group) % group_rows
    tile_n = (local % tiles_per_group) // group_rows
    return tile_m, tile_n


def tile_schedule(m_sizes, N: int, BLOCK_M: int, BLOCK_N: int, num_programs: int, GROUP_M: int = 1) -> list[TileRecord]:
    """Every output tile of a grouped GEMM, in tile-id order, with the program that computes it.

    m_sizes: rows per expert (tensor or list). GROUP_M=1 is plain row-major order inside
    each expert; pass the kernel's GROUP_M to mirror a launch exactly.
    """
    sizes = m_sizes.tolist() if isinstance(m_sizes, torch.Tensor) else list(m_sizes)
    for name, value in (
        ("N", N),
        ("BLOCK_M", BLOCK_M),
        ("BLOCK_N", BLOCK_N),
        ("num_programs", num_programs),
        ("GROUP_M", GROUP_M),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "N" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'N' else 'positive'} int, got {value!r}")
    if any(int(m) < 0 for m in sizes):
        raise ValueError(f"m_sizes must be non-negative, got {sizes}")
    num_n_tiles = _cdiv(N, BLOCK_N)
    records: list[TileRecord] = []
    tile_id, row_start = 0, 0
    for expert, m in enumerate(int(m) for m in sizes):
        num_m_tiles = _cdiv(m, BLOCK_M)
        for local in range(num_m_tiles * num_n_tiles):
            tile_m, tile_n = tile_coords(local, num_m_tiles, num_n_tiles, GROUP_M)
            records.append(
                TileRecord(
                    program=tile_id % num_programs,
                    expert=expert,
                    tile_m=tile_m,
                    tile_n=tile_n,
                    row_start=row_start + tile_m * BLOCK_M,
                    row_end=row_start + min((tile_m + 1) * BLOCK_M, m),
                    col_start=tile_n * BLOCK_N,
                    col_end=min((tile_n + 1) * BLOCK_N, N),
                    tile_id=tile_id,
                    step=tile_id // num_programs,
                )
            )
            tile_id += 1
        row_start += m
    return records


def plot_tile_schedule(schedule: list[TileRecord], ax=None, *, title: str | None = None):
    """Draw the output matrix (expert-order rows x columns) cut into tiles.

    Each tile is coloured by the program that computes it and labelled with its step in
    that program (p1.0 = program 1's first tile); thick lines separate experts, whose
    names sit on the left. Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 5))
    else:
        fig = ax.figure
    if not schedule:
        ax.text(0.5, 0.5, "no tiles: every expert is empty", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    num_programs = max(r.program for r in schedule) + 1
    cmap = plt.get_cmap("tab10" if num_programs <= 10 else "tab20")
    total_rows = max(r.row_end for r in schedule)
    total_cols = max(r.col_end for r in schedule)
    for r in schedule:
        colour = cmap(r.program % cmap.N)
        ax.add_patch(
            Rectangle(
                (r.col_start, r.row_start),
                r.col_end - r.col_start,
                r.row_end - r.row_start,
                facecolor=colour,
                edgecolor="white",
                linewidth=1.0,
                alpha=0.85,
            )
        )
        if len(schedule) <= 80:
            ax.text(
                (r.col_start + r.col_end) / 2,
                (r.row_start + r.row_end) / 2,
                f"p{r.program}.{r.step}",
                ha="center",
                va="center",
                fontsize=7,
            )
    # expert boundaries and labels
    experts: dict[int, tuple[int, int]] = {}
    for r in schedule:
        lo, hi = experts.get(r.expert, (r.row_start, r.row_end))
        experts[r.expert] = (min(lo, r.row_start), max(hi, r.row_end))
    for expert, (lo, hi) in sorted(experts.items()):
        ax.axhline(lo, color="black", linewidth=2)
        ax.text(-0.01 * total_cols, (lo + hi) / 2, f"expert {expert}", ha="right", va="center", fontsize=8)
    ax.axhline(total_rows, color="black", linewidth=2)
    ax.set_xlim(0, total_cols)
    ax.set_ylim(total_rows, 0)  # row 0 at the top, like a matrix
    ax.set_xlabel("output column (N)")
    ax.set_ylabel("expert-order row (M)", labelpad=45)
    ax.set_yticks([])
    handles = [Patch(color=cmap(p % cmap.N), label=f"program {p}") for p in range(num_programs)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="computed by")
    missing = sorted(set(range(len(experts) and max(experts) + 1)) - set(experts))
    ax.set_title(
        title
        or f"{len(schedule)} tiles over {len(experts)} non-empty experts"
        + (f" (experts {missing} are empty: no tiles)" if missing else ""),
        fontsize=10,
    )
    fig.tight_layout()
    return fig
