"""Where a learner stands: run their notebooks headless and read what each check said.

``moe-learn progress`` uses this. Only the learner's own notebooks (``notebooks/``) are
run; their check cells call the learner's functions, so a pass means the learner's code
passed. The solved notebooks serve only to tell an untouched stub from an attempt.

An exercise is
  * ``passed``       its check cell printed ``[PASS] CH.N`` and raised nothing;
  * ``failed``       its exercise or check cell raised (the first line of the message is kept),
                     or the check printed no pass line;
  * ``not started``  its exercise cell still equals the stub the build writes, or the stub's
                     ``NotImplementedError`` reached the check;
  * ``missing``      its notebook is not in ``notebooks/``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from moe_learn.course import notebook_build as nb_build
from moe_learn.course.exercises import Exercise

PASSED, FAILED, NOT_STARTED, MISSING = "passed", "failed", "not started", "missing"


@dataclass(frozen=True)
class ExerciseStatus:
    exercise: Exercise
    state: str  # one of PASSED, FAILED, NOT_STARTED, MISSING
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.state == PASSED


def _normalized(source: str) -> str:
    # Saving in JupyterLab may drop or add trailing blanks; those are not an attempt.
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


def tagged_cells(nb: dict, tag: str) -> list[dict]:
    return [c for c in nb.get("cells", []) if tag in c.get("metadata", {}).get("tags", [])]


def stub_sources(solutions: Path, notebook: str) -> dict[str, list[str]] | None:
    """Exercise id -> the stubs the build writes for its cells (in order); None without the solved notebook."""
    path = solutions / notebook
    if not path.is_file():
        return None
    built = nb_build.build_notebook(json.loads(path.read_text(encoding="utf-8")))
    stubs: dict[str, list[str]] = {}
    for cell in built["cells"]:
        ex = nb_build.exercise_id(cell)
        if ex is not None:
            stubs.setdefault(ex, []).append(_normalized(nb_build.cell_source(cell)))
    return stubs


def is_untouched(nb: dict, exercise: Exercise, stubs: dict[str, list[str]] | None) -> bool:
    if not stubs or exercise.id not in stubs:
        return False
    cells = tagged_cells(nb, f"exercise-{exercise.id}")
    return [_normalized(nb_build.cell_source(c)) for c in cells] == stubs[exercise.id]


def kernel_env() -> dict[str, str]:
    """The caller's environment (PYTHONPATH kept), plus the folder this moe_learn came from,
    so the kernel's checks are the same package as this command's."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the folder that holds moe_learn/
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        parts.append(root)
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def execute_notebook(path: Path, timeout: int) -> dict:
    """Run a copy of the notebook at ``path`` (the file is not modified); errors are kept as outputs."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(path.parent)}},
    )
    # The kernel's own stderr holds only start-up chatter; cell output comes over its channels.
    client.execute(env=kernel_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(nbformat.writes(nb))


def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _error(cells: list[dict]) -> tuple[str, str] | None:
    """(exception name, first line of its message) of the first error the cells show."""
    for cell in cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return out.get("ename", "Error"), _first_line(out.get("evalue", ""))
    return None


def _stdout(cells: list[dict]) -> str:
    text = []
    for cell in cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                src = out.get("text", "")
                text.append("".join(src) if isinstance(src, list) else src)
    return "".join(text)


def _describe_error(ename: str, message: str) -> str:
    # A check's own failure already reads "CH.N: what is wrong"; other errors need their type.
    return message if ename == "CheckFailed" and message else f"{ename}: {message}".rstrip(": ")


def _raised(exercise: Exercise, cells: list[dict], prefix: str) -> ExerciseStatus | None:
    """The status when one of ``cells`` raised: a stub's NotImplementedError means not started."""
    error = _error(cells)
    if error is None:
        return None
    ename, message = error
    if ename == "NotImplementedError":
        return ExerciseStatus(exercise, NOT_STARTED, f"the stub still raises: {message}")
    return ExerciseStatus(exercise, FAILED, prefix + _describe_error(ename, message))


def judge(nb: dict, exercise: Exercise, stubs: dict[str, list[str]] | None, executed: bool) -> ExerciseStatus:
    """The status of one exercise in a notebook (executed, unless every exercise was untouched)."""
    ex_cells = tagged_cells(nb, f"exercise-{exercise.id}")
    chapter = exercise.chapter
    if not ex_cells:
        return ExerciseStatus(
            exercise,
            FAILED,
            f"no cell tagged exercise-{exercise.id} in {exercise.notebook}; "
            f"`moe-learn reset {chapter}` restores the notebook (your copy is kept)",
        )
    if is_untouched(nb, exercise, stubs):
        return ExerciseStatus(exercise, NOT_STARTED, "the exercise cell still holds the stub")
    if not executed:
        return ExerciseStatus(exercise, NOT_STARTED, "the notebook was not run")
    raised = _raised(exercise, ex_cells, "your exercise cell raised ")
    if raised is not None:
        return raised
    check_cells = tagged_cells(nb, f"check-{exercise.id}")
    if not check_cells:
        return ExerciseStatus(
            exercise,
            FAILED,
            f"no check cell (tag check-{exercise.id}) in {exercise.notebook}; `moe-learn reset {chapter}` restores it",
        )
    raised = _raised(exercise, check_cells, "")
    if raised is not None:
        return raised
    if f"[PASS] {exercise.id}" in _stdout(check_cells):
        return ExerciseStatus(exercise, PASSED)
    return ExerciseStatus(exercise, FAILED, f"the check cell printed no [PASS] {exercise.id} line")


def notebook_progress(
    path: Path,
    exercises: list[Exercise],
    solutions: Path,
    timeout: int = 600,
    on_run=None,
) -> list[ExerciseStatus]:
    """Statuses of ``exercises`` (all in the notebook at ``path``).

    The notebook is run only when some exercise differs from its stub: a notebook the
    learner has not touched yet needs no kernel. ``on_run(path)`` is called before a run.
    """
    if not path.is_file():
        return [
            ExerciseStatus(ex, MISSING, f"{path} not found: `moe-learn reset {ex.chapter}` writes it")
            for ex in exercises
        ]
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        why = f"{path.name} is not a readable notebook ({exc}); `moe-learn reset` writes a fresh one, keeping yours"
        return [ExerciseStatus(ex, FAILED, why) for ex in exercises]
    stubs = stub_sources(solutions, path.name)
    if all(is_untouched(nb, ex, stubs) for ex in exercises):
        return [judge(nb, ex, stubs, executed=False) for ex in exercises]
    if on_run is not None:
        on_run(path)
    try:
        executed = execute_notebook(path, timeout)
    except Exception as exc:  # kernel died, timed out or would not start: say so for each exercise
        why = f"could not run {path.name}: {type(exc).__name__}: {_first_line(str(exc))}"
        return [ExerciseStatus(ex, FAILED, why) for ex in exercises]
    return [judge(executed, ex, stubs, executed=True) for ex in exercises]


def course_progress(
    exercises: Iterable[Exercise],
    notebooks: Path,
    solutions: Path,
    timeout: int = 600,
    on_run=None,
) -> list[ExerciseStatus]:
    """Statuses of all ``exercises``, one notebook run per chapter notebook, in id order."""
    by_notebook: dict[str, list[Exercise]] = {}
    for ex in sorted(exercises, key=lambda e: tuple(int(p) for p in e.id.split("."))):
        by_notebook.setdefault(ex.notebook, []).append(ex)
    statuses: list[ExerciseStatus] = []
    for name, group in by_notebook.items():
        statuses += notebook_progress(notebooks / name, group, solutions, timeout, on_run)
    return statuses
