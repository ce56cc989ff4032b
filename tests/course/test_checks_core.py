"""What every check shares: how a failure looks in a real notebook, and the guards of cells that
use an exercise's result.

The rendering tests run a notebook through a real kernel (nbclient), so the text they read is
the error output JupyterLab renders.
"""

import re

import nbclient
import pytest
import torch
from nbformat import v4

from moe_learn.course import progress
from moe_learn.course.checks._core import (
    FULL_TRACEBACK_ENV,
    CheckFailed,
    ExerciseUnfinished,
    require_close,
    require_written,
)
from moe_learn.course.checks.ch06_triton_grouped_gemm import LOCATE_MISTAKES

ANSI = re.compile(r"\x1b\[[0-9;]*m")

LOCATE_OFF_BY_ONE = """\
from moe_learn.course.checks.ch06_triton_grouped_gemm import check_locate_tile


def locate_tile(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    before = 0
    for e, m in enumerate(m_sizes):
        tiles = -(-m // BLOCK_M) * num_n_tiles
        if tile_id <= before + tiles:
            local = tile_id - before
            return e, local // num_n_tiles, local % num_n_tiles
        before += tiles
    return None


check_locate_tile(locate_tile)"""

CRASHES = """\
def locate_tile(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    sizes = list(m_sizes)
    return sizes[tile_id + 99], 0, 0


check_locate_tile(locate_tile)"""

STUB = """\
def locate_tile(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    # YOUR CODE HERE (exercise 06.1)
    raise NotImplementedError("exercise 06.1: replace this line with your code")


check_locate_tile(locate_tile)"""


def _run(sources: list[str], env_extra: dict[str, str] | None = None) -> list[str]:
    """The error output of each cell as JupyterLab shows it (ANSI colors removed), '' when none."""
    nb = v4.new_notebook(cells=[v4.new_code_cell(src) for src in sources])
    env = progress.kernel_env()
    env.pop(FULL_TRACEBACK_ENV, None)
    env.update(env_extra or {})
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True).execute(env=env)
    shown = []
    for cell in nb.cells:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        shown.append(ANSI.sub("", "\n".join(errors[0].traceback)) if errors else "")
    return shown


@pytest.fixture(scope="module")
def rendered():
    return _run([LOCATE_OFF_BY_ONE, CRASHES, STUB, "%tb verbose", "%xmode verbose", LOCATE_OFF_BY_ONE])


def test_a_failed_check_shows_its_message_only(rendered):
    shown = rendered[0]
    lines = shown.splitlines()
    assert lines[0].startswith("CheckFailed: 06.1: tile 1 covers rows 0-3 of expert 1"), shown
    assert "m_sizes=[4, 4, 4], num_n_tiles=1, BLOCK_M=4 (equal experts)" in shown, "the case"
    assert "likely mistake: tile_id == tiles_before + tiles_of_e is already the next expert's first tile" in shown
    assert "%tb verbose" in lines[-1], "the way to the full traceback"
    assert len(lines) <= 5, shown
    for leak in ("Traceback", "File ", "moe_learn/course/checks", "call_learner", "---->"):
        assert leak not in shown, f"{leak!r} is part of the traceback, not of the message:\n{shown}"
    others = [cause for flags, cause in LOCATE_MISTAKES if "inclusive" not in flags]
    assert not [cause for cause in others if cause in shown], "another mistake's hint would be a spoiler"
    assert "cdiv(m_sizes[e], BLOCK_M) * num_n_tiles" not in shown


def test_a_crash_in_the_learners_code_shows_where(rendered):
    shown = rendered[1]
    assert shown.startswith("CheckFailed: 06.1: your function raised IndexError: list index out of range"), shown
    assert re.search(r"at cell In\[\d+\], line 3, in locate_tile\n\s+return sizes\[tile_id \+ 99\], 0, 0", shown)
    assert "moe_learn/course/checks" not in shown and "File " not in shown


def test_a_stub_shows_its_line_not_the_check(rendered):
    shown = rendered[2]
    assert shown.startswith("NotImplementedError: exercise 06.1: replace this line with your code"), shown
    assert re.search(r"at cell In\[\d+\], line 3, in locate_tile", shown)
    assert "check_locate_tile" not in shown and "moe_learn/course/checks" not in shown


def test_the_full_traceback_is_one_flag_away(rendered):
    after_tb, after_xmode = rendered[3], rendered[5]
    assert "moe_learn/course/checks/_core.py" in after_tb and "call_learner" in after_tb, after_tb[:2000]
    assert "NotImplementedError" in after_tb, "%tb shows the last error: the stub's"
    assert "moe_learn/course/checks/ch06_triton_grouped_gemm.py" in after_xmode, after_xmode[:2000]
    assert "CheckFailed" in after_xmode and "Traceback" in after_xmode


def test_the_environment_variable_shows_the_full_traceback():
    (shown,) = _run([LOCATE_OFF_BY_ONE], {FULL_TRACEBACK_ENV: "1"})
    assert "moe_learn/course/checks/ch06_triton_grouped_gemm.py" in shown and "Traceback" in shown, shown[:2000]


def test_outside_ipython_a_check_failure_renders_as_python_would():
    failure = CheckFailed("06.1: wrong\n  likely mistake: x")
    assert isinstance(failure, AssertionError)
    assert "".join(failure._render_traceback_()).endswith("CheckFailed: 06.1: wrong\n  likely mistake: x\n")


# ---------------------------------------------------------------- guards of cells that use an exercise


def test_require_written_names_the_unfinished_exercise():
    require_written("06.2", "Y", torch.ones(3, 4))  # every value written: nothing to say
    with pytest.raises(ExerciseUnfinished, match=r"^finish exercise 06.2 first: Y is still NaN everywhere"):
        require_written("06.2", "Y", torch.full((3, 4), float("nan")))
    partly = torch.ones(3, 4)
    partly[1, 2] = float("nan")
    with pytest.raises(ExerciseUnfinished, match=r"^finish exercise 06.2 first: 1 of 12 values of Y were never"):
        require_written("06.2", "Y", partly)
    require_written("07.1", "out", torch.empty(0, 4))  # no rows: nothing to write


def test_require_written_rejects_what_cannot_hold_nan():
    with pytest.raises(TypeError, match="floating-point tensor for Y"):
        require_written("06.2", "Y", torch.zeros(3, dtype=torch.int32))


def test_require_close_names_the_unfinished_exercise_and_the_first_difference():
    want = torch.arange(6.0).reshape(2, 3)
    require_close("05.3", "Y", want + 1e-7, want, rtol=1e-5, atol=1e-5)
    garbage = want.clone()
    garbage[1, 0] = 3.1e35
    with pytest.raises(ExerciseUnfinished, match=r"05.3 first: Y differs .* in 1 of 6 values \(at \(1, 0\): got 3.1e"):
        require_close("05.3", "Y", garbage, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ExerciseUnfinished, match="in 6 of 6 values"):
        require_close("05.3", "Y", torch.full((2, 3), float("nan")), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ExerciseUnfinished, match=r"Y is \(3, 2\), expected \(2, 3\)"):
        require_close("05.3", "Y", want.T, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ExerciseUnfinished, match="Y is NoneType"):
        require_close("05.3", "Y", None, want, rtol=1e-5, atol=1e-5)
