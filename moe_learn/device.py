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

# Triton publishes Linux wheels only. Chapters 00-04 and 10 are pure PyTorch and run without it;
# chapters 05-09 need it. Importing it (after TRITON_INTERPRET is set) is the only true test:
# a package can be found on disk and still fail to import.
try:
    import triton

    TRITON_VERSION: str | None = triton.__version__
    TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # not installed (macOS, Windows) or broken: report it, never crash here
    TRITON_VERSION = None
    TRITON_IMPORT_ERROR = exc
HAS_TRITON: bool = TRITON_IMPORT_ERROR is None

TRITON_WAYS = (
    "a Linux machine or VM, WSL2 on Windows, or the course's container "
    "(docker build -t moe-learn . && docker run -p 8888:8888 moe-learn)"
)
TRITON_MISSING = (
    f"this needs Triton, which installs on Linux only (pip install triton). On macOS or Windows use "
    f"{TRITON_WAYS}; chapters 00-04 and 10 run without Triton"
)


def require_triton(what: str) -> None:
    """Raise a clear error naming ``what`` when Triton cannot be imported here."""
    if not HAS_TRITON:
        found = f" (here: {type(TRITON_IMPORT_ERROR).__name__}: {TRITON_IMPORT_ERROR})"
        raise ModuleNotFoundError(f"{what}: {TRITON_MISSING}{found}", name="triton")


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
        if not HAS_TRITON:
            return f"GPU: {name}; Triton is missing: chapters 00-04 and 10 run, 05-09 need it (moe-learn doctor)"
        return f"GPU: {name} (Triton kernels compile for it)"
    if not HAS_TRITON:
        return "CPU, PyTorch only: Triton is missing, so chapters 00-04 and 10 run, 05-09 need it (moe-learn doctor)"
    return "CPU: Triton interpreter mode (TRITON_INTERPRET=1); tiny shapes, no timings"


def require_gpu(what: str) -> bool:
    """Return True on a GPU; otherwise print why ``what`` is skipped and return False."""
    if ON_GPU:
        return True
    print(f"{what} needs a CUDA GPU; this machine runs Triton's interpreter on the CPU.")
    return False


def check_kernel_device(caller: str, tensor: torch.Tensor, what: str = "tensors") -> None:
    """A Triton kernel reads GPU memory, or CPU memory under the interpreter (set when there is no CUDA).

    CPU tensors on a machine with CUDA would reach the compiled kernel as host pointers: refuse
    them by name instead.
    """
    if tensor.is_cpu and not INTERPRETER:
        raise RuntimeError(f"{caller} got CPU {what} but Triton is not in interpreter mode; move them to the "
                           "GPU (or, on a machine without CUDA, import moe_learn before triton: it sets "
                           "TRITON_INTERPRET=1)")
