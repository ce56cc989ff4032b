"""Build the exercise notebooks (``notebooks/``) from the solved ones (``solutions/``).

In a solved notebook each answer sits between ``### BEGIN SOLUTION`` and
``### END SOLUTION`` (nbgrader's markers). The build replaces it with a stub that
raises ``NotImplementedError``, or with ``pass`` when the marker says
``### BEGIN SOLUTION: pass`` (inside a ``@triton.jit`` kernel, where ``raise`` does
not compile), clears every output, and tags each check cell ``raises-exception`` so
nbval accepts the failure a stub causes.

Cell tags the authors use:
  ``exercise-CH.N``  the cell the learner edits (holds the markers)
  ``check-CH.N``     the cell that runs the check on the learner's answer; any other
                     cell that needs the answer is tagged ``uses-CH.N``

    python -m moe_learn.course.notebook_build            # write notebooks/ from solutions/
    python -m moe_learn.course.notebook_build --execute  # run solutions/ in place first
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # moe_learn/course/notebook_build.py -> the checkout
SOLUTIONS = REPO / "solutions"
NOTEBOOKS = REPO / "notebooks"

BEGIN = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION(?P<mode>: pass)?[ \t]*$")
END = re.compile(r"^[ \t]*### END SOLUTION[ \t]*$")
EXERCISE_TAG = re.compile(r"^exercise-(\d\d\.\d+)$")
DEPENDENT_TAG = re.compile(r"^(check|uses)-(\d\d\.\d+)$")


def cell_source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def exercise_id(cell: dict) -> str | None:
    for tag in cell.get("metadata", {}).get("tags", []):
        match = EXERCISE_TAG.match(tag)
        if match:
            return match.group(1)
    return None


def stub_source(source: str, exercise: str | None) -> str:
    """Replace every marked answer region in ``source`` with its stub."""
    out: list[str] = []
    inside = None
    for line in source.splitlines(keepends=True):
        if inside is None:
            match = BEGIN.match(line.rstrip("\n"))
            if match:
                inside = match
                continue
            out.append(line)
        elif END.match(line.rstrip("\n")):
            indent = inside.group("indent")
            label = f"exercise {exercise}" if exercise else "this exercise"
            out.append(f"{indent}# YOUR CODE HERE ({label})\n")
            if inside.group("mode"):
                out.append(f"{indent}pass\n")
            else:
                out.append(f'{indent}raise NotImplementedError("{label}: replace this line with your code")\n')
            inside = None
    if inside is not None:
        raise ValueError(f"### BEGIN SOLUTION without ### END SOLUTION in {label_of(exercise)}")
    return "".join(out)


def label_of(exercise: str | None) -> str:
    return f"exercise {exercise}" if exercise else "a cell"


def strip_cell(cell: dict) -> dict:
    """A copy of ``cell`` with outputs, counts and run-time metadata removed."""
    cell = copy.deepcopy(cell)
    cell.pop("id", None)
    meta = cell.get("metadata", {})
    for key in ("execution", "collapsed", "scrolled", "ExecuteTime"):
        meta.pop(key, None)
    if cell["cell_type"] == "code":
        cell["outputs"] = []
        cell["execution_count"] = None
    cell["source"] = cell_source(cell).splitlines(keepends=True)  # Jupyter's own layout
    return cell


def build_notebook(solved: dict) -> dict:
    """The exercise notebook for one solved notebook (a pure function of its JSON)."""
    nb = copy.deepcopy(solved)
    cells = []
    for cell in nb["cells"]:
        cell = strip_cell(cell)
        if cell["cell_type"] == "code":
            source = cell_source(cell)
            if "### BEGIN SOLUTION" in source:
                cell["source"] = stub_source(source, exercise_id(cell)).splitlines(keepends=True)
            tags = cell.get("metadata", {}).get("tags", [])
            if any(DEPENDENT_TAG.match(t) for t in tags) and "raises-exception" not in tags:
                cell["metadata"]["tags"] = [*tags, "raises-exception"]
        cells.append(cell)
    nb["cells"] = cells
    nb["metadata"].pop("widgets", None)
    nb["nbformat_minor"] = 4  # no random cell ids: a rebuild is byte-for-byte stable
    return nb


def dumps(nb: dict) -> str:
    """Notebook JSON as Jupyter writes it, so saving in JupyterLab leaves no diff."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def built_files(solutions: Path = SOLUTIONS) -> dict[str, str]:
    """Exercise notebook name -> the text the build writes for it."""
    return {
        path.name: dumps(build_notebook(json.loads(path.read_text(encoding="utf-8"))))
        for path in sorted(solutions.glob("*.ipynb"))
    }


def write_notebooks(solutions: Path = SOLUTIONS, notebooks: Path = NOTEBOOKS) -> list[Path]:
    notebooks.mkdir(exist_ok=True)
    written = []
    for name, text in built_files(solutions).items():
        target = notebooks / name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            written.append(target)
    return written


def execute_solutions(paths: list[Path], timeout: int = 1200) -> None:
    """Run solved notebooks in place so their saved outputs are fresh."""
    import nbclient
    import nbformat

    for path in paths:
        print(f"executing {path.name} ...", flush=True)
        nb = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        )
        client.execute()
        nb.nbformat_minor = 4
        for cell in nb.cells:
            cell.metadata.pop("execution", None)
            cell.pop("id", None)
        path.write_text(dumps(json.loads(nbformat.writes(nb))), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--execute", nargs="*", metavar="NOTEBOOK", help="run these solved notebooks first (all if none named)"
    )
    args = parser.parse_args(argv)
    if args.execute is not None:
        # a path, or a name in solutions/ ("09_backward.ipynb")
        paths = [Path(p) if Path(p).exists() else SOLUTIONS / p for p in args.execute] or sorted(
            SOLUTIONS.glob("*.ipynb"))
        execute_solutions(paths)
    for path in write_notebooks():
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
