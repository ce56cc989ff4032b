"""Where a learner stands: run their notebooks headless and read what each check said.

``moe-learn progress`` uses this. Only the learner's own notebooks (``notebooks/``) are
run; their check cells call the learner's functions, so a pass means the learner's code
passed. The solved notebooks serve only to tell an untouched stub from an attempt.

An exercise is
  * ``passed``       its check cell printed ``[PASS] CH.N`` and raised nothing;
  * ``failed``       its exercise or check cell raised (the first line of the message is kept),
                     ran past the time limit (the cell is named), or the check printed no pass line;
  * ``not started``  its exercise cell still equals the stub the build writes, or the stub's
                     ``NotImplementedError`` reached the check;
  * ``not checked``  the run stopped at an earlier cell (past the time limit, or the kernel died);
  * ``missing``      its notebook is not in ``notebooks/``.

Each cell may run ``DEFAULT_TIMEOUT`` seconds (a check on a CPU takes a few); a cell that runs
longer is stopped, so an endless loop costs two minutes, not ten per cell.
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

PASSED, FAILED, NOT_STARTED, NOT_CHECKED, MISSING = "passed", "failed", "not started", "not checked", "missing"
DEFAULT_TIMEOUT = 120  # seconds per cell


@dataclass(frozen=True)
class ExerciseStatus:
    exercise: Exercise
    state: str  # one of PASSED, FAILED, NOT_STARTED, NOT_CHECKED, MISSING
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


def cell_label(nb: dict, index: int) -> str:
    """How a learner finds a cell: its place as JupyterLab's status bar counts it, markdown
    included, what it is (from its tags) and its first line: cell 8 of 23 (exercise 06.1: `def f(x):`)."""
    cells = nb.get("cells", [])
    cell = cells[index]
    kinds = []
    for tag in cell.get("metadata", {}).get("tags", []):
        kind, _, ex = tag.partition("-")
        if kind == "exercise":
            kinds.append(f"exercise {ex}")
        elif kind == "check":
            kinds.append(f"the check of {ex}")
    first = _first_line(nb_build.cell_source(cell))
    first = f"`{first if len(first) <= 50 else first[:47] + '...'}`"
    return f"cell {index + 1} of {len(cells)} ({': '.join([*kinds, first])})"


class NotebookStopped(Exception):
    """The run stopped at one cell (past the time limit, or the kernel died); ``notebook`` holds
    the outputs of the cells before it."""

    def __init__(self, label: str, why: str, index: int, notebook: dict):
        super().__init__(f"{label} {why}")
        self.label, self.index, self.notebook = label, index, notebook


def execute_notebook(path: Path, timeout: int, on_cell=None) -> dict:
    """Run a copy of the notebook at ``path`` (the file is not modified); errors are kept as outputs.

    ``on_cell(index, label)`` is called as each code cell starts. A cell that runs longer than
    ``timeout`` seconds, or a kernel that dies, raises :class:`NotebookStopped` naming the cell.
    """
    import nbclient
    import nbformat
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(path.parent)}},
    )
    plain = json.loads(nbformat.writes(nb))
    current = [0]

    def started(cell, cell_index, **_):
        current[0] = cell_index
        if on_cell is not None:
            on_cell(cell_index, cell_label(plain, cell_index))

    client.on_cell_execute = started
    try:
        # The kernel's own stderr holds only start-up chatter; cell output comes over its channels.
        client.execute(env=kernel_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (CellTimeoutError, DeadKernelError) as exc:
        why = (
            f"ran longer than {timeout} s and was stopped (an endless loop? `--timeout S` allows more)"
            if isinstance(exc, CellTimeoutError)
            else "killed the kernel (out of memory, or a crash in native code)"
        )
        raise NotebookStopped(cell_label(plain, current[0]), why, current[0], json.loads(nbformat.writes(nb))) from None
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


def _cell_indices(nb: dict, exercise: Exercise) -> list[int]:
    tags = (f"exercise-{exercise.id}", f"check-{exercise.id}")
    return [i for i, c in enumerate(nb.get("cells", [])) if set(tags) & set(c.get("metadata", {}).get("tags", []))]


def _judge_stopped(nb: dict, exercise: Exercise, stubs, stop: NotebookStopped) -> ExerciseStatus:
    """An exercise of a notebook whose run stopped at cell ``stop.index``."""
    if is_untouched(nb, exercise, stubs):
        return judge(nb, exercise, stubs, executed=False)
    cells = _cell_indices(nb, exercise)
    if stop.index in cells:
        return ExerciseStatus(exercise, FAILED, str(stop))
    if not cells or max(cells) < stop.index:  # ran before the stop (or has no cells: judge says so)
        return judge(stop.notebook, exercise, stubs, executed=True)
    return ExerciseStatus(exercise, NOT_CHECKED, f"the run stopped before it, at {stop.label}")


def notebook_progress(
    path: Path,
    exercises: list[Exercise],
    solutions: Path,
    timeout: int = DEFAULT_TIMEOUT,
    on_run=None,
    on_cell=None,
) -> list[ExerciseStatus]:
    """Statuses of ``exercises`` (all in the notebook at ``path``).

    The notebook is run only when some exercise differs from its stub: a notebook the
    learner has not touched yet needs no kernel. ``on_run(path)`` is called before a run,
    ``on_cell(path, index, label)`` as each of its code cells starts.
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
    cell_hook = None if on_cell is None else (lambda index, label: on_cell(path, index, label))
    try:
        executed = execute_notebook(path, timeout, cell_hook)
    except NotebookStopped as stop:
        return [_judge_stopped(nb, ex, stubs, stop) for ex in exercises]
    except Exception as exc:  # the kernel would not start: say so for each exercise
        why = f"could not run {path.name}: {type(exc).__name__}: {_first_line(str(exc))}"
        return [ExerciseStatus(ex, FAILED, why) for ex in exercises]
    return [judge(executed, ex, stubs, executed=True) for ex in exercises]


def course_order(exercise: Exercise) -> tuple[int, ...]:
    return tuple(int(p) for p in exercise.id.split("."))


def course_progress(
    exercises: Iterable[Exercise],
    notebooks: Path,
    solutions: Path,
    timeout: int = DEFAULT_TIMEOUT,
    on_run=None,
    on_cell=None,
) -> list[ExerciseStatus]:
    """Statuses of all ``exercises``, one notebook run per chapter notebook, in course order."""
    by_notebook: dict[str, list[Exercise]] = {}
    for ex in sorted(exercises, key=course_order):
        by_notebook.setdefault(ex.notebook, []).append(ex)
    statuses: list[ExerciseStatus] = []
    for name, group in by_notebook.items():
        statuses += notebook_progress(notebooks / name, group, solutions, timeout, on_run, on_cell)
    return sorted(statuses, key=lambda s: course_order(s.exercise))


def next_exercise(statuses: list[ExerciseStatus]) -> ExerciseStatus | None:
    """Where to work next: the first exercise, in course order, that failed or is not started
    (a failure before an untouched exercise comes first); else the first one not passed."""
    ordered = sorted(statuses, key=lambda s: course_order(s.exercise))
    return next((s for s in ordered if s.state in (FAILED, NOT_STARTED)), None) or next(
        (s for s in ordered if not s.passed), None
    )
