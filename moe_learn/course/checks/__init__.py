"""Exercise checks: each takes the learner's function, never the reference one.

A check draws fresh random cases plus the edge cases that matter, and on the first
mismatch raises :class:`CheckFailed` with a message in the learner's terms.
"""

from moe_learn.course.checks._core import CheckFailed, ExerciseUnfinished, passed, require_close, require_written

__all__ = ["CheckFailed", "ExerciseUnfinished", "passed", "require_close", "require_written"]
