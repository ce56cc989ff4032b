"""Import paths from before the layered layout keep working: ``moe_learn.autograd`` and friends.

The package was once ~20 modules side by side. Code written against those paths
(``from moe_learn.hf_patch import patch_model``, ``moe_learn.checks.ch01_gating``) still
imports: each old name resolves, on first import, to the module(s) that now hold its
contents. Nothing is loaded before it is asked for, so Triton stays optional.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

# old module -> the modules that now hold its names, searched in order
OLD_MODULES: dict[str, tuple[str, ...]] = {
    "moe_learn.routing": ("moe_learn.ops.routing",),
    "moe_learn.routers": ("moe_learn.ops.routers",),
    "moe_learn.permutation": ("moe_learn.ops.permutation",),
    "moe_learn.torch_moe": ("moe_learn.ops.grouped_gemm", "moe_learn.ops.moe"),
    "moe_learn.moe_block": ("moe_learn.layers.blocks", "moe_learn.ops.moe"),
    "moe_learn.autograd": ("moe_learn.layers.experts", "moe_learn.layers.blocks", "moe_learn.ops.moe"),
    "moe_learn.fused_moe": ("moe_learn.layers.experts",),
    "moe_learn.hf_patch": ("moe_learn.layers.hf",),
    "moe_learn.expert_parallel": ("moe_learn.layers.expert_parallel",),
    "moe_learn.launch": ("moe_learn.layers.launch",),
    "moe_learn.kernels.grouped_gemm_backward": ("moe_learn.kernels.backward", "moe_learn.ops.grouped_gemm"),
    "moe_learn.bench_expert_parallel": ("moe_learn.bench.expert_parallel",),
    "moe_learn.cli": ("moe_learn.course.cli",),
    "moe_learn.doctor": ("moe_learn.course.doctor",),
    "moe_learn.progress": ("moe_learn.course.progress",),
    "moe_learn.exercises": ("moe_learn.course.exercises",),
    "moe_learn.notebook_build": ("moe_learn.course.notebook_build",),
}
OLD_PACKAGES = {"moe_learn.checks": "moe_learn.course.checks"}  # and every module inside


def _target(fullname: str) -> tuple[str, ...] | None:
    if fullname in OLD_MODULES:
        return OLD_MODULES[fullname]
    for old, new in OLD_PACKAGES.items():
        if fullname == old or fullname.startswith(old + "."):
            return (new + fullname[len(old):],)
    return None


class _Loader(importlib.abc.Loader):
    def __init__(self, targets: tuple[str, ...]):
        self.targets = targets

    def create_module(self, spec):
        if len(self.targets) == 1:  # the very module under its old name
            return importlib.import_module(self.targets[0])
        module = types.ModuleType(spec.name, f"Old import path; the names now live in {', '.join(self.targets)}.")
        modules = [importlib.import_module(t) for t in self.targets]

        def __getattr__(name, modules=modules):
            for m in modules:
                if hasattr(m, name):
                    return getattr(m, name)
            raise AttributeError(f"module {spec.name!r} has no attribute {name!r}")

        module.__getattr__ = __getattr__
        return module

    def exec_module(self, module) -> None:
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        targets = _target(fullname)
        if targets is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(targets), is_package=fullname in OLD_PACKAGES)


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
