"""What a learner sees in the notebooks' outputs.

* Every solved cell that draws (a plot helper of ``moe_learn.plots``, pyplot, an image)
  shows its picture in the stored outputs, and the same cell draws when the exercise
  notebook runs (a cell whose figure is assigned and never displayed shows nothing).
* In an exercise notebook run as the build writes it (every answer a stub), a cell that
  uses an exercise's result stops with the stub's error or "finish exercise CH.N first",
  never a number computed from an unfinished kernel ("relative error: nan").
"""

import ast
import functools
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from moe_learn import plots
from moe_learn.course import notebook_build as nb_build
from moe_learn.course import progress

# Calls that put a picture in a cell's output.
DRAWING = (set(plots.__all__) - {"expert_colors", "imbalance_ratio"}) | {"subplots", "figure", "imshow", "Image"}


def draws(source: str) -> bool:
    """Whether a cell's code calls something that draws (found in its syntax tree, so an import
    of a plot helper or a name in a comment does not count)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython magics (%matplotlib inline): drop those lines
        tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith("%")))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in DRAWING:
                return True
    return False


def has_image(cell) -> bool:
    return any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def _solved(name: str) -> dict:
    return json.loads((nb_build.SOLUTIONS / name).read_text(encoding="utf-8"))


def drawing_cells(nb: dict) -> list[int]:
    return [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and draws(nb_build.cell_source(c))]


CHAPTERS = sorted(p.name for p in nb_build.SOLUTIONS.glob("[0-9][0-9]_*.ipynb"))
DRAWING_CHAPTERS = [name for name in CHAPTERS if drawing_cells(_solved(name))]


def test_the_detector_sees_what_draws():
    assert draws("fig = tile_schedule_plot(records)")
    assert draws("plots.routing_heatmap(ids, 4)")
    assert draws("fig, ax = plt.subplots()\nax.plot([1])")
    assert draws('%matplotlib inline\ndisplay(Image(filename="x.png"))')
    assert not draws("from moe_learn.plots import routing_heatmap\nimport matplotlib.pyplot as plt")
    assert not draws("# tile_schedule_plot(records)\nprint(1)")


@pytest.mark.parametrize("name", CHAPTERS)
def test_every_solved_cell_that_draws_shows_its_picture(name):
    nb = _solved(name)
    blank = [i for i in drawing_cells(nb) if not has_image(nb["cells"][i])]
    assert not blank, (
        f"solutions/{name}: cells {blank} draw but their stored outputs hold no image. Make the figure the "
        "cell's last expression (or display(fig)), then re-execute: "
        f"python -m moe_learn.course.notebook_build --execute solutions/{name}"
    )


@functools.cache
def executed_exercise_notebooks() -> dict[str, dict]:
    """Every chapter of notebooks/ run headless, as a learner would before writing any answer.

    Two at a time: most of a run is a kernel starting and importing torch.
    """
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = pool.map(lambda name: progress.execute_notebook(nb_build.NOTEBOOKS / name, timeout=600), CHAPTERS)
        return dict(zip(CHAPTERS, runs, strict=True))


def _text(out) -> str:
    text = out.get("text", "")
    return "".join(text) if isinstance(text, list) else text


def _errors(cell) -> list[tuple[str, str]]:
    return [(o["ename"], o["evalue"]) for o in cell.get("outputs", []) if o["output_type"] == "error"]


def _uses(cell) -> list[str]:
    return [t.split("-", 1)[1] for t in cell["metadata"].get("tags", []) if t.startswith(("uses-", "check-"))]


@pytest.mark.parametrize("name", DRAWING_CHAPTERS)
def test_the_exercise_notebooks_drawing_cells_draw(name):
    nb = executed_exercise_notebooks()[name]
    for i in drawing_cells(nb):
        cell = nb["cells"][i]
        if _uses(cell):  # needs the learner's answer: the stub's error is the right output
            continue
        assert not _errors(cell), f"notebooks/{name} cell {i} raised {_errors(cell)}"
        assert has_image(cell), f"notebooks/{name} cell {i} draws but showed no image"


@pytest.mark.parametrize("name", CHAPTERS)
def test_cells_that_use_an_unfinished_exercise_say_so(name):
    nb = executed_exercise_notebooks()[name]
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        for out in cell.get("outputs", []):
            text = _text(out) if out["output_type"] == "stream" else ""
            assert not re.search(r"\bnan\b", text), f"notebooks/{name} cell {i} printed a NaN: {text!r}"
        needs = _uses(cell)
        if not needs:
            continue
        errors = _errors(cell)
        if not errors and any("needs a CUDA GPU" in _text(out) for out in cell.get("outputs", [])):
            continue  # a timing cell that ran nothing here
        assert errors, f"notebooks/{name} cell {i} needs exercise(s) {needs} but ran without an error on the stubs"
        ename, evalue = errors[0]
        # The stub's "exercise CH.N: replace this line", "finish exercise CH.N first", or a check's "CH.N: ..."
        assert ename in ("NotImplementedError", "ExerciseUnfinished", "CheckFailed"), (name, i, ename, evalue)
        assert any(f"exercise {ex}" in evalue or evalue.startswith(f"{ex}:") for ex in needs), (
            f"notebooks/{name} cell {i} ({ename}) does not name exercise {needs}: {evalue[:200]!r}"
        )
