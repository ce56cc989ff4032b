"""Triton kernels of the course (import ``moe_learn`` first: it decides GPU vs interpreter)."""

from .. import device  # noqa: F401  (sets TRITON_INTERPRET before any @triton.jit below)
from .grouped_gemm import default_config, grouped_gemm
from .schedule import TileRecord, tile_schedule

__all__ = ["TileRecord", "default_config", "grouped_gemm", "tile_schedule"]
