"""Where the course runs: a CUDA GPU, or the CPU through Triton's interpreter.

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, so this
module must run before any kernel is defined. ``import moe_learn`` imports it first.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

ON_GPU: bool = torch.cuda.is_available()

if not ON_GPU:
    # No CUDA: kernels run as Python on CPU tensors. Must be set before @triton.jit.
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETER: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Triton publishes Linux wheels only. Chapters 00-04 are pure PyTorch and run without it;
# chapters 05+ need it (a Linux machine or VM, WSL2 on Windows, or the course's container).
HAS_TRITON: bool = ("triton" in sys.modules and sys.modules["triton"] is not None) or (
    "triton" not in sys.modules and importlib.util.find_spec("triton") is not None
)
TRITON_MISSING = (
    "this needs Triton, which installs on Linux only (pip install triton). On macOS or Windows use "
    "a Linux machine or VM, WSL2 on Windows, or the course's container (Dockerfile: docker build -t "
    "moe-learn . && docker run -p 8888:8888 moe-learn); chapters 00-04 run without Triton"
)


def require_triton(what: str) -> None:
    """Raise a clear error naming ``what`` when Triton cannot be imported here."""
    if not HAS_TRITON:
        raise ModuleNotFoundError(f"{what}: {TRITON_MISSING}", name="triton")

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
