"""The moe-learn command: doctor, progress, hint, reset, bench, and its usage errors.

progress runs real notebooks through a kernel, so most tests use a two-exercise fixture
chapter (90) built in a tmp folder, with a fixture exercise registry: they do not depend
on which chapters exist. The tests at the end run over the repository's own notebooks.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
import time
import tomllib
import types
from pathlib import Path

import nbformat
import pytest
from nbformat import v4

from moe_learn.course import cli, doctor, progress
from moe_learn.course import notebook_build as nb_build
from moe_learn.course.exercises import Exercise, all_exercises

REPO = Path(__file__).resolve().parents[2]
FIXTURE_NB = "90_fixture.ipynb"
FIXTURE_EXERCISES = {
    "90.1": Exercise(id="90.1", notebook=FIXTURE_NB, title="double a number", hints=("use *", "2 * x")),
    "90.2": Exercise(id="90.2", notebook=FIXTURE_NB, title="square a number", hints=("x times x",)),
}

CHECK_TEMPLATE = """from moe_learn.course.checks._core import call_learner, fail, passed


def check_{name}(fn):
    for x in (0, 1, 5):
        got = call_learner("{ex}", fn, x)
        if got != {expr}:
            fail("{ex}", f"{name}({{x}}) returned {{got}}, expected {{{expr}}}", "{mistake}")
    passed("{ex}", "{name}", 3)


check_{name}({name})
"""


def _solved_notebook() -> nbformat.NotebookNode:
    cells = [
        v4.new_markdown_cell("# 90 · a fixture chapter"),
        v4.new_code_cell("import moe_learn\n\nprint(moe_learn.device.describe())"),
        v4.new_code_cell(
            "def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION",
            metadata={"tags": ["exercise-90.1"]},
        ),
        v4.new_code_cell(
            CHECK_TEMPLATE.format(name="double", ex="90.1", expr="2 * x", mistake="multiply by 2, do not add 2"),
            metadata={"tags": ["check-90.1"]},
        ),
        v4.new_code_cell(
            "def square(x):\n    ### BEGIN SOLUTION\n    return x * x\n    ### END SOLUTION",
            metadata={"tags": ["exercise-90.2"]},
        ),
        v4.new_code_cell(
            CHECK_TEMPLATE.format(name="square", ex="90.2", expr="x * x", mistake="x ** 2"),
            metadata={"tags": ["check-90.2"]},
        ),
    ]
    nb = v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    return nb


@pytest.fixture
def course(tmp_path, monkeypatch):
    """A tmp course: solutions/ with the solved fixture, notebooks/ with its build; fixture registry."""
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    solutions.mkdir()
    nbformat.write(_solved_notebook(), solutions / FIXTURE_NB)
    nb_build.write_notebooks(solutions, notebooks)
    monkeypatch.setattr(cli, "_load_exercises", lambda: dict(FIXTURE_EXERCISES))
    monkeypatch.setenv("COLUMNS", "250")  # one table row per line in the captured output
    monkeypatch.setenv("MOE_LEARN_STATE_DIR", str(tmp_path / "state"))
    return types.SimpleNamespace(root=tmp_path, solutions=solutions, notebooks=notebooks)


def _progress(course, *extra):
    return cli.main(["progress", *extra, "--notebooks", str(course.notebooks), "--solutions", str(course.solutions)])


def _row(out: str, ex_id: str) -> str:
    lines = [line for line in out.splitlines() if f" {ex_id} " in f" {line} "]
    assert lines, f"no table row for {ex_id} in:\n{out}"
    return lines[0]


def _edit_exercise(path: Path, ex_id: str, old: str, new: str) -> None:
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if f"exercise-{ex_id}" in c["metadata"].get("tags", []))
    source = "".join(cell["source"])
    assert old in source
    cell["source"] = source.replace(old, new)
    path.write_text(json.dumps(nb))


# ---------------------------------------------------------------- progress


def test_progress_on_fresh_notebooks_says_not_started_without_running_them(course, capsys):
    assert _progress(course) == 1
    captured = capsys.readouterr()
    for ex in ("90.1", "90.2"):
        assert "not started" in _row(captured.out, ex)
    assert "0/2 passed (2 not started)" in captured.out
    assert "Next: exercise 90.1" in captured.out and "moe-learn hint 90.1" in captured.out
    assert "running" not in captured.err, "an untouched notebook needs no kernel"


def test_progress_on_solved_notebooks_passes_everything(course, capsys):
    shutil.copy(course.solutions / FIXTURE_NB, course.notebooks / FIXTURE_NB)
    assert _progress(course, "90") == 0
    captured = capsys.readouterr()
    assert "running 90_fixture.ipynb" in captured.err
    for ex in ("90.1", "90.2"):
        assert "passed" in _row(captured.out, ex)
    assert "2/2 passed" in captured.out


def test_progress_reports_a_wrong_answer_with_the_checks_first_line(course, capsys):
    learner = course.notebooks / FIXTURE_NB
    _edit_exercise(learner, "90.1", "raise NotImplementedError", "return x + 2  #")
    # 90.2 edited (a comment) but still raising: running it shows the stub's error, i.e. not started.
    _edit_exercise(learner, "90.2", "# YOUR CODE HERE", "# thinking about it")
    assert _progress(course) == 1
    out = capsys.readouterr().out
    row = _row(out, "90.1")
    assert "failed" in row
    assert "90.1: double(0) returned 2, expected 0" in row
    assert "likely mistake" not in row, "only the first line of the check's message"
    row = _row(out, "90.2")
    assert "not started" in row and "the stub still raises" in row
    assert "0/2 passed (1 failed, 1 not started)" in out


def test_progress_stops_an_endless_loop_and_names_its_cell(course, capsys):
    learner = course.notebooks / FIXTURE_NB
    _edit_exercise(learner, "90.1", "raise NotImplementedError", "return 2 * x  #")
    _edit_exercise(learner, "90.2", "raise NotImplementedError", "while True:\n        pass  #")
    limit = 20  # seconds: far above a fixture cell (importing torch on a busy machine), far below 600
    started = time.monotonic()
    assert _progress(course, "--timeout", str(limit)) == 1
    assert time.monotonic() - started < 4 * limit, "one cell's time limit, not one per cell"
    captured = capsys.readouterr()
    assert "passed" in _row(captured.out, "90.1"), "the exercise before the endless loop is judged"
    row = _row(captured.out, "90.2")
    assert "failed" in row
    assert "cell 6 of 6 (the check of 90.2: `from moe_learn.course.checks._core import call_...`) ran longer" in row
    assert f"ran longer than {limit} s and was stopped (an endless loop? `--timeout S` allows more)" in row
    assert "Next: exercise 90.2" in captured.out
    # A sign of life for every cell as it starts (stderr is not a terminal here: one line each).
    assert "running 90_fixture.ipynb" in captured.err
    for label in ("cell 2 of 6 (`import moe_learn`)", "cell 3 of 6 (exercise 90.1: `def double(x):`)", "cell 6 of 6"):
        assert label in captured.err


def test_exercises_after_a_stopped_cell_are_not_checked():
    """Where the run stopped decides: before it judged, at it failed (the cell named), after it not checked."""
    nb = json.loads(nbformat.writes(_solved_notebook()))
    ex1, ex2 = FIXTURE_EXERCISES["90.1"], FIXTURE_EXERCISES["90.2"]
    pass_line = v4.new_output("stream", name="stdout", text="[PASS] 90.1 double: 3 cases\n")
    ran = json.loads(nbformat.writes(_solved_notebook()))
    ran["cells"][3]["outputs"] = [json.loads(json.dumps(pass_line))]
    where = {3: ("failed", "not checked"), 4: ("passed", "failed"), 1: ("not checked", "not checked")}
    for index, (first, second) in where.items():
        label = progress.cell_label(nb, index)
        stop = progress.NotebookStopped(label, "ran longer than 9 s", index, ran)
        got = [progress._judge_stopped(nb, ex, None, stop) for ex in (ex1, ex2)]
        assert [s.state for s in got] == [first, second], (index, got)
        for status in got:
            if status.state == "failed" and "ran longer" in status.detail:
                assert status.detail == f"{label} ran longer than 9 s"
            if status.state == "not checked":
                assert status.detail == f"the run stopped before it, at {label}"
    assert progress.cell_label(nb, 3).startswith("cell 4 of 6 (the check of 90.1: `from moe_learn.course")
    assert progress.cell_label(nb, 0) == "cell 1 of 6 (`# 90 · a fixture chapter`)"


def test_progress_timeout_must_be_positive(course, capsys):
    assert _progress(course, "--timeout", "0") == 2
    assert "--timeout must be at least 1 second" in capsys.readouterr().err


def test_the_default_time_limit_is_short():
    assert progress.DEFAULT_TIMEOUT <= 180
    assert cli.build_parser().parse_args(["progress"]).timeout == progress.DEFAULT_TIMEOUT


def test_next_is_the_first_failed_or_unstarted_exercise_in_course_order():
    ex = {i: Exercise(id=f"90.{i}", notebook=FIXTURE_NB, title="t") for i in range(1, 12)}

    def nxt(*states):
        statuses = [progress.ExerciseStatus(ex[i], state) for i, state in states]
        return progress.next_exercise(statuses).exercise.id

    assert nxt((1, "passed"), (2, "failed"), (3, "not started")) == "90.2"
    assert nxt((1, "passed"), (2, "not started"), (3, "failed")) == "90.2"
    assert nxt((3, "not started"), (2, "failed"), (1, "passed")) == "90.2", "course order, not list order"
    assert nxt((10, "not started"), (2, "failed")) == "90.2", "90.10 comes after 90.2"
    assert nxt((1, "missing"), (2, "not checked"), (3, "failed")) == "90.3"
    assert nxt((1, "passed"), (2, "missing")) == "90.2", "else the first one not passed"
    assert progress.next_exercise([progress.ExerciseStatus(ex[1], "passed")]) is None


def test_a_terminal_sees_one_live_line_with_the_seconds(monkeypatch):
    import io

    from rich.console import Console

    screen = io.StringIO()
    shown = cli._CellProgress(Console(file=screen, force_terminal=True, width=200), timeout=120)
    shown.cell(Path("06_x.ipynb"), 3, "cell 4 of 9 (exercise 06.1: `def f(x):`)")
    time.sleep(0.3)
    shown.cell(Path("06_x.ipynb"), 4, "cell 5 of 9 (the check of 06.1: `check(f)`)")
    time.sleep(0.3)
    shown.stop()
    text = screen.getvalue()
    assert "06_x.ipynb: cell 5 of 9 (the check of 06.1: `check(f)`)  0 s (limit 120 s)" in text
    assert "\n  cell 4 of 9" not in text, "a terminal gets the live line, not a line per cell"


def test_progress_says_which_notebook_is_missing(course, capsys):
    (course.notebooks / FIXTURE_NB).unlink()
    assert _progress(course) == 1
    out = capsys.readouterr().out
    assert "missing" in _row(out, "90.1") and "moe-learn reset 90" in _row(out, "90.1")


def test_progress_on_a_broken_notebook_file(course, capsys):
    (course.notebooks / FIXTURE_NB).write_text('{"cells": [')
    assert _progress(course) == 1
    assert "not a readable notebook" in _row(capsys.readouterr().out, "90.1")


def test_progress_usage_errors(course, capsys):
    assert _progress(course, "13") == 2
    assert "there is no chapter 13; chapters: 90" in capsys.readouterr().err
    assert _progress(course, "x2") == 2
    assert "not a chapter number" in capsys.readouterr().err
    assert cli.main(["progress", "--notebooks", str(course.root / "nowhere")]) == 2
    assert "pass --notebooks DIR" in capsys.readouterr().err


def _executed(ex_source, ex_outputs, check_outputs, check=True):
    cells = [v4.new_code_cell(ex_source, metadata={"tags": ["exercise-90.1"]}, outputs=ex_outputs)]
    if check:
        cells.append(v4.new_code_cell("check(double)", metadata={"tags": ["check-90.1"]}, outputs=check_outputs))
    return json.loads(nbformat.writes(v4.new_notebook(cells=cells)))


def _error(ename, evalue):
    return v4.new_output("error", ename=ename, evalue=evalue, traceback=[])


def test_judge_reads_every_kind_of_outcome():
    ex = FIXTURE_EXERCISES["90.1"]
    stubs = {"90.1": ["def double(x):\n    raise NotImplementedError"]}
    stream = v4.new_output("stream", name="stdout", text="[PASS] 90.1 double: 3 cases\n")
    cases = [
        (_executed("def double(x):\n    raise NotImplementedError  \n", [], []), "not started", "still holds the stub"),
        (
            _executed("def double(x) return", [_error("SyntaxError", "invalid syntax (x.py, line 1)")], []),
            "failed",
            "your exercise cell raised SyntaxError: invalid syntax",
        ),
        (_executed("def double(x): return 2*x", [], [], check=False), "failed", "no check cell (tag check-90.1)"),
        (_executed("def double(x): return 2*x", [], []), "failed", "printed no [PASS] 90.1 line"),
        (
            _executed("def double(x): return 2*x", [], [_error("NameError", "name 'check' is not defined")]),
            "failed",
            "NameError: name 'check' is not defined",
        ),
        (
            _executed("def double(x): return 2*x", [], [_error("CheckFailed", "90.1: wrong\n  likely mistake: x")]),
            "failed",
            "90.1: wrong",
        ),
        (_executed("def double(x): return 2*x", [], [stream]), "passed", ""),
    ]
    for nb, state, detail in cases:
        status = progress.judge(nb, ex, stubs, executed=True)
        assert status.state == state, (status, detail)
        assert detail in status.detail and "likely mistake" not in status.detail
    untagged = {"cells": [v4.new_code_cell("def double(x): return 2*x")]}
    status = progress.judge(untagged, ex, stubs, executed=True)
    assert status.state == "failed" and "no cell tagged exercise-90.1" in status.detail


# ---------------------------------------------------------------- hint


def test_hint_reveals_one_more_each_call_and_remembers(course, capsys):
    assert cli.main(["hint", "90.1"]) == 0
    out = capsys.readouterr().out
    assert "hint 1/2: use *" in out and "2 * x" not in out and "again for the next hint" in out
    assert cli.main(["hint", "90.1"]) == 0
    out = capsys.readouterr().out
    assert "hint 1/2: use *" in out and "hint 2/2: 2 * x" in out and "last hint" in out
    assert cli.main(["hint", "90.1"]) == 0
    assert "No more hints for 90.1" in capsys.readouterr().out
    state = json.loads((course.root / "state" / "hints.json").read_text())
    assert state == {"90.1": 2}
    assert cli.main(["hint", "90.1", "--reset"]) == 0
    capsys.readouterr()
    assert cli.main(["hint", "90.1"]) == 0
    assert "2 * x" not in capsys.readouterr().out


def test_hint_survives_a_corrupt_state_file_and_rejects_unknown_ids(course, capsys):
    state = course.root / "state"
    state.mkdir()
    (state / "hints.json").write_text("{not json")
    assert cli.main(["hint", "90.2"]) == 0
    assert "hint 1/1: x times x" in capsys.readouterr().out
    assert cli.main(["hint", "90.9"]) == 2
    assert "there is no exercise 90.9; exercises: 90.1, 90.2" in capsys.readouterr().err
    assert cli.main(["hint", "nine"]) == 2
    assert "write it like 02.1" in capsys.readouterr().err


# ---------------------------------------------------------------- reset


def test_reset_restores_the_build_and_keeps_the_learners_copy(course, capsys):
    learner = course.notebooks / FIXTURE_NB
    _edit_exercise(learner, "90.1", "raise NotImplementedError", "return 3  #")
    mine = learner.read_text()
    args = ["reset", "90", "--notebooks", str(course.notebooks), "--solutions", str(course.solutions)]
    assert cli.main(args) == 0
    assert "Saved your copy as" in capsys.readouterr().out
    assert learner.read_text() == nb_build.built_files(course.solutions)[FIXTURE_NB]
    backups = list((course.notebooks / "backups").glob("90-*-fixture.ipynb"))
    assert len(backups) == 1 and backups[0].read_text() == mine
    assert cli.main(args) == 0
    assert "already fresh" in capsys.readouterr().out
    assert [p.name for p in course.notebooks.glob("*.ipynb")] == [FIXTURE_NB], "backups stay out of the way"
    # progress reads only the chapter notebooks, never a backup
    assert cli.main(["progress", "--notebooks", str(course.notebooks), "--solutions", str(course.solutions)]) == 1
    assert "not started" in _row(capsys.readouterr().out, "90.1")
    learner.unlink()
    assert cli.main(args) == 0 and learner.exists()


def test_backup_names_start_with_chapter_and_date_and_never_collide(tmp_path):
    import datetime

    target = tmp_path / "02_routing_indices.ipynb"
    now = datetime.datetime(2026, 11, 27, 10, 42, 5)
    first = cli.backup_path(target, now)
    assert first == tmp_path / "backups" / "02-2026-11-27-1042-routing_indices.ipynb"
    first.parent.mkdir()
    first.write_text("{}")
    assert cli.backup_path(target, now).name == "02-2026-11-27-1042-2-routing_indices.ipynb"
    # JupyterLab's file browser shows about 14 characters of a name: enough to tell them apart.
    next_day = cli.backup_path(target, now + datetime.timedelta(days=1))
    other = cli.backup_path(tmp_path / "03_permutation.ipynb", now)
    shown = {path.name[:14] for path in (target, first, next_day, other)}
    assert len(shown) == 4, shown


def test_backups_are_git_ignored():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    name = "notebooks/backups/02-2026-11-27-1042-routing_indices.ipynb"
    result = subprocess.run(["git", "check-ignore", "-q", name], cwd=REPO, capture_output=True, timeout=30)
    assert result.returncode == 0, f"{name} is not git-ignored"
    result = subprocess.run(["git", "check-ignore", "-q", "notebooks/02_routing_indices.ipynb"], cwd=REPO, timeout=30)
    assert result.returncode == 1, "the chapter notebooks themselves are tracked"


def test_reset_unknown_chapter(course, capsys):
    assert cli.main(["reset", "13", "--solutions", str(course.solutions)]) == 2
    assert "there is no chapter 13" in capsys.readouterr().err


# ---------------------------------------------------------------- bench


def test_bench_delegates_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("moe_learn.bench.run")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "moe_learn.bench.run", fake)
    assert cli.main(["bench", "--quick", "--help"]) == 0
    assert seen == [["--quick", "--help"]]


# ---------------------------------------------------------------- doctor


NEEDS_DEV_ENV = pytest.mark.skipif(
    importlib.util.find_spec("jupyterlab") is None,
    reason="doctor reports the course's whole environment; jupyterlab is not installed here (pip install -e .[dev])",
)


@NEEDS_DEV_ENV
def test_doctor_all_ok_here(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("Python", "torch", "triton", "jupyterlab", "nbval", "matplotlib", "device", "Triton kernel"):
        assert f"[OK]   {name}:" in out
    assert "GPU:" in out or "CPU: Triton interpreter mode" in out


@NEEDS_DEV_ENV
def test_doctor_reports_failures_with_their_fix(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setitem(doctor.MINIMUM_VERSIONS, "surely-not-installed-pkg", "1.0")
    monkeypatch.setitem(doctor.MINIMUM_VERSIONS, "torch", "999.0")

    class BrokenKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no compiler found\nsecond line")

            return launch

    monkeypatch.setattr(doctor, "_scale_shift_kernel", BrokenKernel())
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] surely-not-installed-pkg: not installed  -> fix: pip install" in out
    assert "[FAIL] torch:" in out and "need >= 999.0" in out
    assert "[FAIL] Triton kernel: a tiny kernel failed: RuntimeError: no compiler found  -> fix:" in out
    assert "3 of 9 checks failed" in out


def test_version_parsing_and_minimums_match_pyproject():
    assert doctor.version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert doctor.version_tuple("3.0.0rc1") == (3, 0, 0)
    assert doctor.version_tuple("0.11") < doctor.version_tuple("0.11.1")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {}
    for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name, _, minimum = req.split(";")[0].partition(">=")  # drop an environment marker (triton: Linux only)
        declared[name.strip()] = minimum.strip()
    for name, minimum in doctor.MINIMUM_VERSIONS.items():
        assert declared.get(name) == minimum, f"doctor wants {name}>={minimum}, pyproject says {declared.get(name)}"
    python = ".".join(map(str, doctor.MINIMUM_PYTHON))
    assert project["requires-python"] == f">={python}", "doctor and pyproject must want the same Python"


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "moe_learn", "hint", "nine"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "write it like 02.1" in result.stderr


def test_no_command_prints_the_commands(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in ("doctor", "progress", "hint", "reset", "bench"))


# ---------------------------------------------------------------- the real course


def test_progress_over_the_repositorys_fresh_notebooks(monkeypatch, capsys):
    """Every registered exercise has its cells in the built notebooks, and reads as not started."""
    monkeypatch.setenv("COLUMNS", "250")
    exercises = all_exercises()
    code = cli.main(["progress", "--notebooks", str(nb_build.NOTEBOOKS)])
    captured = capsys.readouterr()
    assert cli.main(["progress", "00", "--notebooks", str(nb_build.NOTEBOOKS)]) == 0
    assert "Chapter 00 has no exercises" in capsys.readouterr().out
    if not exercises:
        assert code == 0 and "No exercises" in captured.out
        return
    assert code == 1
    assert "running" not in captured.err, "fresh notebooks need no kernel"
    for ex_id in exercises:
        assert "not started" in _row(captured.out, ex_id), f"exercise {ex_id}"


CHEAP_CHAPTERS = ("02", "03", "01")  # quick to run on a CPU; the first one present is used


def test_progress_passes_the_repositorys_solved_chapter(tmp_path, monkeypatch, capsys):
    """The solved notebook of one cheap chapter, run as if it were the learner's, passes every check."""
    monkeypatch.setenv("COLUMNS", "250")
    exercises = all_exercises()
    chapter = next((c for c in CHEAP_CHAPTERS if any(ex.chapter == c for ex in exercises.values())), None)
    if chapter is None:
        pytest.skip(f"none of chapters {CHEAP_CHAPTERS} is written yet")
    for ex in {ex.notebook for ex in exercises.values() if ex.chapter == chapter}:
        shutil.copy(nb_build.SOLUTIONS / ex, tmp_path / ex)
    assert cli.main(["progress", chapter, "--notebooks", str(tmp_path)]) == 0, capsys.readouterr().out
