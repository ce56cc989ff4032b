"""Where the course runs: a CUDA GPU, or the CPU through Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, so this
module must run before any kernel is defined. ``import moe_learn`` imports it first.
"""

from __future__ import annotations

import os

import torch

ON_GPU: bool = torch.cuda.is_available()

if not ON_GPU:
    # No CUDA: kernels run as Python on CPU tensors. Must be set before @triton.jit.
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETER: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

DEVICE = torch.device("cuda") if ON_GPU else torch.device("cpu")

# Triton's interpreter computes bf16 silently wrong on CPU, so CPU paths use these.
CPU_SAFE_DTYPES = (torch.float32, torch.float16)


def default_dtype() -> torch.dtype:
    """The dtype exercises use by default: bf16 on a GPU, float32 on the CPU."""
    return torch.bfloat16 if ON_GPU else torch.float32


def describe() -> str:
    """One line saying where kernels run, for the top of every notebook."""
    if ON_GPU:
        name = torch.cuda.get_device_name()
        return f"GPU: {name} (Triton kernels compile for it)"
    return "CPU: Triton interpreter mode (TRITON_INTERPRET=1); tiny shapes, no timings"


def require_gpu(what: str) -> bool:
    """Return True on a GPU; otherwise print why ``what`` is skipped and return False."""
    if ON_GPU:
        return True
    print(f"{what} needs a CUDA GPU; this machine runs Triton's interpreter on the CPU.")
    return False
