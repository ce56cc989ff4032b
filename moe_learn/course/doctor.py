"""Environment check: is everything the course needs installed, and does Triton run?

``moe-learn doctor`` prints these results; chapter 00 calls :func:`run_checks` too.
Each requirement gives one :class:`Requirement` line: OK, WARN or FAIL, what was found,
and, unless OK, the command that fixes it. Triton publishes Linux wheels only: elsewhere a
missing Triton is a WARN (chapters 00-04 and 10 run without it), on Linux a FAIL.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import sys
from dataclasses import dataclass

import torch

from moe_learn import device

try:  # a broken or missing Triton must not stop the other checks from reporting
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # any import failure is a finding, not a crash
    triton = None
    TRITON_IMPORT_ERROR = exc

INSTALL = 'pip install -e ".[dev]"  (from the repository root; or `make lab`, which sets up .venv)'

# Minimum versions; tests/test_cli.py checks they agree with pyproject.toml.
MINIMUM_VERSIONS: dict[str, str] = {
    "torch": "2.4",
    "triton": "3.2",
    "jupyterlab": "4.2",
    "nbval": "0.11",
    "matplotlib": "3.8",
}
MINIMUM_PYTHON = (3, 11)  # pyproject.toml: requires-python = ">=3.11" (tomllib)


@dataclass(frozen=True)
class Requirement:
    """One line of the report."""

    name: str
    ok: bool
    found: str
    fix: str = ""
    warn: bool = False  # ok for what runs here, but something is missing (Triton off Linux)

    @property
    def status(self) -> str:
        return "FAIL" if not self.ok else "WARN" if self.warn else "OK"

    def line(self) -> str:
        text = f"[{self.status}]".ljust(7) + f"{self.name}: {self.found}"
        if self.status != "OK" and self.fix:
            text += f"  -> fix: {self.fix}"
        return text


def triton_installs_here() -> bool:
    """Triton publishes wheels for Linux only (pyproject.toml: ``sys_platform == 'linux'``)."""
    return sys.platform.startswith("linux")


def _platform_name() -> str:
    return {"darwin": "macOS", "win32": "Windows", "cygwin": "Windows"}.get(sys.platform, sys.platform)


def triton_optional(name: str, found: str) -> Requirement:
    """Off Linux, a missing Triton: chapters 00-04 and 10 run, 05-09 need a Linux environment."""
    return Requirement(
        name,
        True,
        f"{found}; optional on {_platform_name()}, where Triton does not install: chapters 05-09 need it",
        f"for chapters 05-09 use {device.TRITON_WAYS}",
        warn=True,
    )


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); stops at the first part that is not a plain number."""
    parts: list[int] = []
    for piece in version.split("+")[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:  # '0rc1': keep 0, drop the pre-release tail
            break
    return tuple(parts)


def check_python() -> Requirement:
    found = platform.python_version()
    ok = sys.version_info[:2] >= MINIMUM_PYTHON
    want = ".".join(map(str, MINIMUM_PYTHON))
    return Requirement(
        "Python", ok, f"{found} (need >= {want})", f"install Python {want} or newer (conda: python=3.11)"
    )


def check_package(name: str) -> Requirement:
    """An installed distribution at or above its minimum version."""
    minimum = MINIMUM_VERSIONS[name]
    fix = f'pip install "{name}>={minimum}"  or  {INSTALL}'
    try:
        found = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "triton" and not triton_installs_here():
            return triton_optional(name, "not installed")
        return Requirement(name, False, "not installed", fix)
    ok = version_tuple(found) >= version_tuple(minimum)
    return Requirement(name, ok, f"{found} (need >= {minimum})", fix)


def check_device() -> Requirement:
    """Where kernels run. No GPU is fine: the interpreter runs everything."""
    if device.ON_GPU:
        major, minor = torch.cuda.get_device_capability()
        return Requirement("device", True, f"GPU: {torch.cuda.get_device_name()} (compute capability {major}.{minor})")
    if not device.INTERPRETER:
        return Requirement(
            "device",
            False,
            "CPU, but TRITON_INTERPRET is off: Triton kernels cannot run",
            "unset TRITON_INTERPRET (or set it to 1) and import moe_learn before defining kernels",
        )
    found = "CPU: Triton interpreter mode (TRITON_INTERPRET=1)" if device.HAS_TRITON else "CPU, PyTorch only"
    if shutil.which("nvidia-smi"):
        found += (
            "; an NVIDIA driver is present but this torch has no CUDA: `rm -r .venv && make lab` installs the CUDA "
            "build where `nvidia-smi` works"
        )
    return Requirement("device", True, found)


if triton is not None:

    @triton.jit
    def _scale_shift_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        # Several programs and a ragged last block: exercises program ids and masks.
        pid = tl.program_id(axis=0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, x * 2.0 + 1.0, mask=mask)


def check_triton_kernel() -> Requirement:
    """Compile (or interpret) and run a tiny kernel, and compare with PyTorch."""
    name = "Triton kernel"
    fix = f"reinstall a Triton that matches your torch: {INSTALL}"
    if triton is None:
        if not triton_installs_here():
            return triton_optional(name, f"skipped ({type(TRITON_IMPORT_ERROR).__name__}: {TRITON_IMPORT_ERROR})")
        return Requirement(
            name, False, f"triton does not import: {type(TRITON_IMPORT_ERROR).__name__}: {TRITON_IMPORT_ERROR}", fix
        )
    try:
        n, block = 37, 16
        x = torch.arange(n, dtype=torch.float32, device=device.DEVICE)
        out = torch.full_like(x, float("nan"))
        _scale_shift_kernel[(triton.cdiv(n, block),)](x, out, n, BLOCK=block)
        if device.ON_GPU:
            torch.cuda.synchronize()
    except Exception as exc:  # report any failure with its type
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Requirement(name, False, f"a tiny kernel failed: {type(exc).__name__}: {first}", fix)
    if not torch.equal(out, x * 2.0 + 1.0):
        return Requirement(name, False, "a tiny kernel ran but computed wrong values", fix)
    where = "compiled for the GPU" if device.ON_GPU else "in the interpreter on the CPU"
    return Requirement(name, True, f"a tiny kernel ran {where} and matched PyTorch")


def run_checks() -> list[Requirement]:
    """Every requirement, in the order the report shows them."""
    return [
        check_python(),
        *(check_package(name) for name in MINIMUM_VERSIONS),
        check_device(),
        check_triton_kernel(),
    ]


def all_ok(results: list[Requirement]) -> bool:
    """Nothing failed (WARN lines are fine: what they miss is not needed here)."""
    return all(r.ok for r in results)
