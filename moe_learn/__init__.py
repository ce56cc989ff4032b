"""moe-learn: the reference package of the course.

Importing it first decides where Triton kernels run (``moe_learn.device``): on a CUDA
GPU, or on the CPU through Triton's interpreter.
"""

from . import device  # noqa: F401  (must come first: sets TRITON_INTERPRET)
from .device import DEVICE, ON_GPU
from .fused_moe import fused_moe_experts
from .kernels.grouped_gemm import grouped_gemm
from .moe_block import TorchMoEBlock, moe_forward_torch
from .permutation import combine, permute, unpermute
from .routing import calculate_topk, get_routing_indices
from .torch_moe import moe_experts_torch, swiglu, torch_grouped_gemm

__version__ = "0.1.0"

__all__ = [
    "DEVICE",
    "ON_GPU",
    "TorchMoEBlock",
    "calculate_topk",
    "combine",
    "fused_moe_experts",
    "get_routing_indices",
    "grouped_gemm",
    "moe_experts_torch",
    "moe_forward_torch",
    "permute",
    "swiglu",
    "torch_grouped_gemm",
    "unpermute",
]
