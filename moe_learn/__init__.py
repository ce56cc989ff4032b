"""moe-learn: the reference package of the course.

Layers, each importing only from the ones above it in this list:

    device, validation   where kernels run (GPU or Triton's interpreter); argument checks
    ops/                 routing, routers, permutation, the PyTorch grouped GEMMs and MoE (the references)
    kernels/             Triton kernels: grouped GEMM (portable, Hopper), backward, fused routing, autotuning
    layers/              the MoE experts and blocks, transformers integration, expert parallelism
    bench/               the benchmark command
    course/              exercise checks, notebook build, the moe-learn command

Importing ``moe_learn`` first decides where Triton kernels run (``moe_learn.device``). It
needs no Triton: the names that do (``grouped_gemm``, the fused experts and routing) load
on first use, so chapters 00-04 and 10 run where Triton cannot be installed (macOS, Windows).
"""

import importlib

from moe_learn import (
    _aliases,
    device,  # noqa: F401  (must come first: sets TRITON_INTERPRET)
)
from moe_learn.device import DEVICE, HAS_TRITON, ON_GPU
from moe_learn.layers import hf
from moe_learn.layers.blocks import FusedMoEBlock, MoEBlock, TorchMoEBlock, load_balancing_loss
from moe_learn.layers.experts import fused_moe_experts, fused_moe_forward, moe_experts
from moe_learn.ops.grouped_gemm import torch_grouped_gemm, torch_grouped_gemm_dw
from moe_learn.ops.moe import moe_experts_torch, moe_forward_torch, swiglu
from moe_learn.ops.permutation import combine, permute, unpermute
from moe_learn.ops.routing import calculate_topk, get_routing_indices

__version__ = "0.1.0"
_aliases.install()  # import paths from before the layered layout keep working
hf.install()  # experts_implementation="moe_learn" in transformers, once transformers is imported

# name -> module that defines it; imported on first access (these need Triton or transformers)
_LAZY = {
    "grouped_gemm": "moe_learn.kernels.grouped_gemm",
    "grouped_gemm_dw": "moe_learn.kernels.backward",
    "fused_routing": "moe_learn.kernels.fused_routing",
    "patch_model": "moe_learn.layers.hf",
    "unpatch_model": "moe_learn.layers.hf",
    "fuse_moe_block": "moe_learn.layers.hf",
}


def __getattr__(name: str):
    if name in _LAZY:
        if _LAZY[name].startswith("moe_learn.kernels."):
            device.require_triton(f"moe_learn.{name}")  # names what was asked for, not the module
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'moe_learn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DEVICE",
    "HAS_TRITON",
    "ON_GPU",
    "FusedMoEBlock",
    "MoEBlock",
    "TorchMoEBlock",
    "calculate_topk",
    "combine",
    "fuse_moe_block",
    "fused_moe_experts",
    "fused_moe_forward",
    "fused_routing",
    "get_routing_indices",
    "grouped_gemm",
    "grouped_gemm_dw",
    "load_balancing_loss",
    "moe_experts",
    "moe_experts_torch",
    "moe_forward_torch",
    "patch_model",
    "permute",
    "swiglu",
    "torch_grouped_gemm",
    "torch_grouped_gemm_dw",
    "unpatch_model",
    "unpermute",
]
