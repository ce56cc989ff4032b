"""Where Triton cannot be installed (macOS, Windows): chapters 00-04 and 10 run, 05-09 say what they need.

Each test runs a child Python in which Triton is missing the way it is on such a machine:
a ``sitecustomize`` on PYTHONPATH makes ``import triton`` raise ModuleNotFoundError and hides
its distribution, and the Jupyter kernels the child starts inherit it. In that child,
``import moe_learn`` works, the checks and solved notebooks of chapters 00-04 and 10 pass, the
``moe-learn`` commands work, and what needs Triton fails with the message that says how to get it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_learn import device
from moe_learn.course import notebook_build as nb_build

REPO = Path(__file__).resolve().parent.parent
CHAPTERS_WITHOUT_TRITON = ("00", "01", "02", "03", "04", "10")  # pure PyTorch

NO_TRITON = '''\
"""Test harness: Triton is not installed (tests/test_without_triton.py)."""
import importlib.abc
import importlib.metadata
import sys


class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTriton())
_version = importlib.metadata.version


def _version_without_triton(name):
    if name.lower() == "triton":
        raise importlib.metadata.PackageNotFoundError(name)
    return _version(name)


importlib.metadata.version = _version_without_triton
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of a child process (and of the kernels it starts) without Triton."""
    blocker = tmp_path_factory.mktemp("no-triton")
    (blocker / "sitecustomize.py").write_text(NO_TRITON)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(blocker), str(REPO), env.get("PYTHONPATH", "")) if p)
    env["COLUMNS"] = "250"  # rich: one line per doctor result
    env["MOE_LEARN_STATE_DIR"] = str(blocker / "state")
    return env


def _python(env, code: str, *args: str, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _cli(env, *argv: str, platform: str | None = None, cwd=REPO) -> subprocess.CompletedProcess:
    """``moe-learn ARGV`` in the child; ``platform`` stands in for sys.platform (macOS: 'darwin')."""
    code = (
        "import sys\nfrom moe_learn.course import cli\n"
        "if sys.argv[1]:\n    sys.platform = sys.argv[1]\n"
        "sys.exit(cli.main(sys.argv[2:]))"
    )
    return _python(env, code, platform or "", *argv, cwd=cwd)


def test_the_harness_really_hides_triton(env):
    result = _python(env, "import importlib.metadata as m\ntry:\n    import triton\nexcept ImportError as e:\n"
                          "    print(type(e).__name__)\ntry:\n    m.version('triton')\nexcept m.PackageNotFoundError:\n"
                          "    print('no distribution')")
    assert result.stdout.split("\n")[:2] == ["ModuleNotFoundError", "no distribution"], result.stderr


def test_moe_learn_imports_and_what_needs_triton_says_how_to_get_it(env):
    code = r"""
import json, sys
import torch
import moe_learn
out = {"has_triton": moe_learn.HAS_TRITON, "triton_loaded": "triton" in sys.modules,
       "describe": moe_learn.device.describe(), "errors": {}}
def attempt(label, fn):
    try:
        fn()
        out["errors"][label] = None
    except ModuleNotFoundError as exc:
        out["errors"][label] = str(exc)
attempt("moe_learn.grouped_gemm", lambda: moe_learn.grouped_gemm)
attempt("moe_learn.fused_routing", lambda: moe_learn.fused_routing)
attempt("import moe_learn.kernels", lambda: __import__("moe_learn.kernels"))
block = moe_learn.MoEBlock(16, 8, num_experts=4, top_k=2, backend="torch")
x = torch.randn(5, 16)
attempt("MoEBlock torch backend", lambda: block(x))
attempt("MoEBlock triton backend", lambda: moe_learn.MoEBlock(16, 8, num_experts=4, top_k=2)(x))
print(json.dumps(out))
"""
    result = _python(env, code)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["has_triton"] is False and out["triton_loaded"] is False
    assert "PyTorch only" in out["describe"]
    errors = out["errors"]
    assert errors["MoEBlock torch backend"] is None, "the PyTorch path must not need Triton"
    for label in ("moe_learn.grouped_gemm", "moe_learn.fused_routing", "import moe_learn.kernels",
                  "MoEBlock triton backend"):  # fmt: skip
        message = errors[label]
        assert message and device.TRITON_MISSING in message, f"{label}: {message}"
        assert "ModuleNotFoundError: No module named 'triton'" in message, "says what happened here"
    assert errors["moe_learn.grouped_gemm"].startswith("moe_learn.grouped_gemm: "), "names what was asked for"
    for way in ("Linux machine or VM", "WSL2", "docker build -t moe-learn ."):
        assert way in device.TRITON_MISSING


def test_doctor_on_linux_fails_with_the_install_command(env):
    result = _cli(env, "doctor", platform="linux")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    triton = next(line for line in lines if " triton:" in line)
    assert triton.startswith("[FAIL] triton: not installed  -> fix: pip install \"triton>=")
    assert any(line.startswith("[FAIL] Triton kernel: triton does not import") for line in lines)
    assert "[OK]   device: CPU, PyTorch only" in result.stdout or "[OK]   device: GPU" in result.stdout


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_doctor_elsewhere_calls_triton_optional_and_says_how_to_get_it(env, platform):
    result = _cli(env, "doctor", platform=platform)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    name = {"darwin": "macOS", "win32": "Windows"}[platform]
    for label in ("triton", "Triton kernel"):
        line = next(line for line in lines if f" {label}:" in line)
        assert line.startswith(f"[WARN] {label}: "), line
        assert f"optional on {name}" in line and "chapters 00-04 run, 05-10 need it" in line
        assert f"-> fix: for chapters 05-10 use {device.TRITON_WAYS}" in line
    assert not any(line.startswith("[FAIL]") for line in lines)
    assert "chapters 00-04 are ready" in result.stdout


def test_hint_reset_and_progress_work(env, tmp_path):
    for ex in ("02.1", "06.1"):  # a chapter that needs Triton still has its hints
        result = _cli(env, "hint", ex)
        assert result.returncode == 0 and "hint 1/" in result.stdout, result.stdout + result.stderr

    course = tmp_path / "course"
    shutil.copytree(nb_build.NOTEBOOKS, course / "notebooks")
    mine = next((course / "notebooks").glob("02_*.ipynb"))
    mine.write_text(mine.read_text().replace("YOUR CODE HERE", "my attempt"))
    result = _cli(env, "reset", "02", cwd=course)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Saved your copy" in result.stdout
    assert mine.read_text() == (nb_build.NOTEBOOKS / mine.name).read_text(), "a fresh copy"

    solved = tmp_path / "solved"  # the learner's notebooks, every exercise of chapter 02 done
    solved.mkdir()
    for nb in nb_build.SOLUTIONS.glob("02_*.ipynb"):
        shutil.copy(nb, solved / nb.name)
    result = _cli(env, "progress", "02", "--notebooks", str(solved))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout


def test_pytorch_chapters_check_and_their_solved_notebooks_run(env):
    """The checks' own tests and nbval over the solved notebooks, in one child pytest."""
    tests, notebooks = [], []
    for chapter in CHAPTERS_WITHOUT_TRITON:
        tests += [str(p.relative_to(REPO)) for p in REPO.glob(f"tests/course/test_ch{chapter}_*.py")]
        notebooks += [str(p.relative_to(REPO)) for p in REPO.glob(f"solutions/{chapter}_*.ipynb")]
    assert len(tests) == len(notebooks) == len(CHAPTERS_WITHOUT_TRITON)
    first = json.loads(next(REPO.glob("solutions/10_*.ipynb")).read_text())["cells"][0]
    assert "**What you need:** PyTorch only" in "".join(first["source"]), "chapter 10 says it needs no Triton"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *tests, *notebooks],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1] and "skipped" not in result.stdout.splitlines()[-1]


def test_chapter_00_says_it_runs_without_triton(env):
    """What a learner reads in chapter 00 without Triton: no kernel, and why; the check demo still passes."""
    code = (
        "import json, sys, nbformat\nfrom nbclient import NotebookClient\n"
        "nb = nbformat.read(sys.argv[1], as_version=4)\n"
        "NotebookClient(nb, timeout=600, kernel_name='python3').execute()\n"
        "print(json.dumps([''.join(o.get('text', '') for o in c.get('outputs', [])) for c in nb.cells"
        " if c.cell_type == 'code']))"
    )
    result = _python(env, code, str(nb_build.NOTEBOOKS / "00_setup_and_tour.ipynb"), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    text = "\n".join(json.loads(result.stdout.splitlines()[-1]))
    assert "PyTorch only" in text and "missing: chapters 05+ need it" in text
    assert "No Triton here, so no kernel: this needs Triton" in text
    assert "[FAIL] triton: not installed" in text, "the environment check names the missing package"
    assert "[PASS] 00.0" in text


@pytest.mark.parametrize("chapter", ["05", "06", "07", "08", "09"])
def test_chapters_needing_triton_stop_at_their_first_code_cell(env, chapter):
    """The first code cell raises the message with the ways to get Triton (Run All stops there)."""
    path = next(nb_build.NOTEBOOKS.glob(f"{chapter}_*.ipynb"))
    cells = json.loads(path.read_text())["cells"]
    assert "**What you need:** Triton" in "".join(cells[0]["source"]), "the first cell says what is needed"
    assert "WSL2" in "".join(cells[0]["source"]) and "docker build" in "".join(cells[0]["source"])
    first_code = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
    result = _python(env, first_code)
    assert result.returncode == 1
    assert f"ModuleNotFoundError: chapter {chapter}: {device.TRITON_MISSING}" in result.stderr
