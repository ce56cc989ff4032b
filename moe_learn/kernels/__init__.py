"""Triton kernels of the course (import ``moe_learn`` first: it decides GPU vs interpreter).

    grouped_gemm.py         the portable grouped GEMM (chapters 06-07) and the public ``grouped_gemm``
    grouped_gemm_hopper.py  the same, tuned for Hopper: TMA loads, tile map in registers (chapter 08)
    autotune.py             the SM count and the shape-bucket autotuner
    launcher.py             compiled kernels launched with little host work per call
    ops.py                  the kernels as torch.library custom ops (torch.compile, autograd)
    backward.py             the weight gradient ``grouped_gemm_dw`` (chapter 09)
    swiglu.py               training's SwiGLU with the routing weight folded in, and its backward, alone
                            or in the Hopper GEMM's epilogues (timed against each other per shape)
    fused_routing.py        top-k, counts, gather and scatter indices in one launch
    route_ids.py            counts, gather indices and weights from given ids, in one launch (decode)
    decode_experts.py       a decode step's experts in two launches, one (token, slot) per row (decode)
    primer.py               chapter 05's small kernels
    schedule.py             the grouped GEMM's tile walk in plain Python (chapter 06's picture)
"""

from moe_learn import device

device.require_triton("moe_learn.kernels")

from moe_learn.kernels import ops  # noqa: E402, F401  (registers the custom ops and their autograd)
from moe_learn.kernels.grouped_gemm import default_config, grouped_gemm  # noqa: E402 (after the Triton check)
from moe_learn.kernels.schedule import TileRecord, tile_schedule  # noqa: E402

__all__ = ["TileRecord", "default_config", "grouped_gemm", "tile_schedule"]
