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
