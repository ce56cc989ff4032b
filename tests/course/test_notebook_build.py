"""The exercise notebooks are exactly what the build writes from the solved ones."""

import json

import pytest

from moe_learn.course import notebook_build as nb_build


def test_committed_notebooks_match_the_build():
    built = nb_build.built_files()
    assert built, "solutions/ holds no notebook"
    committed = {p.name for p in nb_build.NOTEBOOKS.glob("*.ipynb")}
    assert committed == set(built), "notebooks/ and solutions/ hold different files: run `make notebooks`"
    for name, text in built.items():
        on_disk = (nb_build.NOTEBOOKS / name).read_text(encoding="utf-8")
        assert on_disk == text, f"notebooks/{name} differs from its build: run `make notebooks` and commit"


def _cell(source, tags=()):
    return {
        "cell_type": "code",
        "metadata": {"tags": list(tags)},
        "source": source,
        "outputs": [1],
        "execution_count": 3,
    }


def test_stub_replaces_only_the_answer_and_keeps_indentation():
    src = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n"
    out = nb_build.stub_source(src, "02.1")
    assert "return x + y" not in out
    assert "    y = 1\n" in out
    assert '    raise NotImplementedError("exercise 02.1' in out


def test_pass_stub_for_kernels():
    src = "@triton.jit\ndef k(x):\n    ### BEGIN SOLUTION: pass\n    tl.store(x, 1)\n    ### END SOLUTION\n"
    out = nb_build.stub_source(src, "05.1")
    assert "tl.store" not in out and "    pass\n" in out and "NotImplementedError" not in out


def test_unclosed_marker_is_an_error():
    with pytest.raises(ValueError, match="END SOLUTION"):
        nb_build.stub_source("### BEGIN SOLUTION\nx = 1\n", "01.1")


def test_build_clears_outputs_and_tags_dependent_cells():
    solved = {
        "cells": [
            _cell("x = 1\n### BEGIN SOLUTION\nx = 2\n### END SOLUTION\n", ["exercise-01.1"]),
            _cell("check(x)\n", ["check-01.1"]),
            _cell("plot(x)\n", ["uses-01.1"]),
            _cell("print(1)\n"),
        ],
        "metadata": {"kernelspec": {"name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    built = nb_build.build_notebook(solved)
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in built["cells"])
    tags = [c["metadata"]["tags"] for c in built["cells"]]
    assert "raises-exception" in tags[1] and "raises-exception" in tags[2]
    assert "raises-exception" not in tags[0] + tags[3]
    assert solved["cells"][0]["outputs"] == [1], "the build must not modify its input"
    assert json.loads(nb_build.dumps(built)) == built


def test_every_notebook_has_a_kernelspec():
    for path in sorted(nb_build.SOLUTIONS.glob("*.ipynb")):
        meta = json.loads(path.read_text())["metadata"]
        assert meta.get("kernelspec", {}).get("name") == "python3", f"{path.name} needs a python3 kernelspec"
