"""Every exercise of the course: its id, chapter notebook, title and hints.

Each chapter's check module lists its own exercises in ``EXERCISES``; this module
collects them so the command line (progress, hint) knows the whole course.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Exercise:
    id: str  # "CH.N", as in the notebook's exercise-CH.N / check-CH.N cell tags
    notebook: str  # file name in notebooks/
    title: str
    hints: tuple[str, ...] = field(default=())

    @property
    def chapter(self) -> str:
        return self.id.split(".")[0]


# Chapter check modules, in course order; each defines EXERCISES: list[Exercise].
CHECK_MODULES = (
    "moe_learn.course.checks.ch01_gating",
    "moe_learn.course.checks.ch02_routing",
    "moe_learn.course.checks.ch03_permutation",
    "moe_learn.course.checks.ch04_grouped_gemm",
    "moe_learn.course.checks.ch05_triton_primer",
    "moe_learn.course.checks.ch06_triton_grouped_gemm",
    "moe_learn.course.checks.ch07_fusion",
    "moe_learn.course.checks.ch08_performance",
    "moe_learn.course.checks.ch09_backward",
    "moe_learn.course.checks.ch10_expert_parallel",
)


def all_exercises() -> dict[str, Exercise]:
    """Exercise id -> Exercise, for every chapter of the course (a missing check module is an error)."""
    found: dict[str, Exercise] = {}
    for name in CHECK_MODULES:
        module = importlib.import_module(name)
        for ex in module.EXERCISES:
            if ex.id in found:
                raise RuntimeError(f"exercise id {ex.id} is defined twice")
            found[ex.id] = ex
    return found
