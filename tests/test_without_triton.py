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
import torch

from moe_learn import device
from moe_learn.course import notebook_build as nb_build

# Where Triton cannot install (macOS, Windows) torch is a CPU build; a CUDA build of torch needs
# Triton itself (its CUDA init imports it), so hiding Triton from one says nothing about learners.
pytestmark = pytest.mark.skipif(torch.version.cuda is not None,
                                reason="simulates a machine without Triton, which has a CPU build of torch")

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


CLI_RUNNER = """
import contextlib, io, json, sys
from moe_learn.course import cli
real_platform, results = sys.platform, []
for platform, argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.platform = platform or real_platform  # doctor reads it; restored before anything else runs
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    finally:
        sys.platform = real_platform
    results.append([code, out.getvalue(), err.getvalue()])
with open(sys.argv[2], "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def cli(env, tmp_path_factory):
    """``moe-learn`` commands run in one child without Triton: name -> (exit code, stdout, stderr)."""
    tmp = tmp_path_factory.mktemp("cli")
    shutil.copytree(nb_build.NOTEBOOKS, tmp / "mine")
    mine = next((tmp / "mine").glob("02_*.ipynb"))
    mine.write_text(mine.read_text().replace("YOUR CODE HERE", "my attempt"))
    (tmp / "solved").mkdir()  # the learner's notebooks, every exercise of chapter 02 done
    for nb in nb_build.SOLUTIONS.glob("02_*.ipynb"):
        shutil.copy(nb, tmp / "solved" / nb.name)
    runs = {
        "doctor linux": ("linux", ["doctor"]),
        "doctor darwin": ("darwin", ["doctor"]),  # sys.platform on macOS
        "doctor win32": ("win32", ["doctor"]),
        "hint 02.1": ("", ["hint", "02.1"]),
        "hint 06.1": ("", ["hint", "06.1"]),  # a chapter that needs Triton still has its hints
        "reset 02": ("", ["reset", "02", "--notebooks", str(tmp / "mine")]),
        "progress 02": ("", ["progress", "02", "--notebooks", str(tmp / "solved")]),
    }
    result = _python(env, CLI_RUNNER, json.dumps(list(runs.values())), str(tmp / "results.json"))
    assert result.returncode == 0, result.stderr[-4000:]
    outcomes = dict(zip(runs, json.loads((tmp / "results.json").read_text()), strict=True))
    outcomes["mine"] = mine
    return outcomes


def test_moe_learn_imports_and_what_needs_triton_says_how_to_get_it(env):
    code = r"""
import importlib.metadata, json, sys
import torch
import moe_learn
out = {"has_triton": moe_learn.HAS_TRITON, "triton_loaded": "triton" in sys.modules,
       "describe": moe_learn.device.describe(), "errors": {}}
def attempt(label, fn):
    try:
        fn()
        out["errors"][label] = None
    except (ModuleNotFoundError, importlib.metadata.PackageNotFoundError) as exc:
        out["errors"][label] = f"{type(exc).__name__}: {exc}"
attempt("import triton", lambda: __import__("triton"))  # the harness: as if never installed
attempt("triton's distribution", lambda: importlib.metadata.version("triton"))
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
    errors = out["errors"]
    assert errors["import triton"] == "ModuleNotFoundError: No module named 'triton'"
    assert errors["triton's distribution"].startswith("PackageNotFoundError: ")
    assert out["has_triton"] is False and out["triton_loaded"] is False
    assert "PyTorch only" in out["describe"]
    assert errors["MoEBlock torch backend"] is None, "the PyTorch path must not need Triton"
    for label in ("moe_learn.grouped_gemm", "moe_learn.fused_routing", "import moe_learn.kernels",
                  "MoEBlock triton backend"):  # fmt: skip
        message = errors[label]
        assert message and device.TRITON_MISSING in message, f"{label}: {message}"
        assert "(here: ModuleNotFoundError: No module named 'triton')" in message, "says what happened here"
    assert errors["moe_learn.grouped_gemm"].startswith("ModuleNotFoundError: moe_learn.grouped_gemm: "), "names it"
    for way in ("Linux machine or VM", "WSL2", "docker build -t moe-learn ."):
        assert way in device.TRITON_MISSING


def test_doctor_on_linux_fails_with_the_install_command(cli):
    code, out, err = cli["doctor linux"]
    assert code == 1, out + err
    lines = out.splitlines()
    triton = next(line for line in lines if " triton:" in line)
    assert triton.startswith('[FAIL] triton: not installed  -> fix: pip install "triton>=')
    assert any(line.startswith("[FAIL] Triton kernel: triton does not import") for line in lines)
    assert "[OK]   device: CPU, PyTorch only" in out or "[OK]   device: GPU" in out


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_doctor_elsewhere_calls_triton_optional_and_says_how_to_get_it(cli, platform):
    code, out, err = cli[f"doctor {platform}"]
    assert code == 0, out + err
    lines = out.splitlines()
    name = {"darwin": "macOS", "win32": "Windows"}[platform]
    for label in ("triton", "Triton kernel"):
        line = next(line for line in lines if f" {label}:" in line)
        assert line.startswith(f"[WARN] {label}: "), line
        assert f"optional on {name}" in line and "chapters 05-09 need it" in line
        assert f"-> fix: for chapters 05-09 use {device.TRITON_WAYS}" in line
    assert not any(line.startswith("[FAIL]") for line in lines)
    assert "chapters 00-04 and 10 are ready" in out


def test_hint_reset_and_progress_work(cli):
    for ex in ("02.1", "06.1"):
        code, out, err = cli[f"hint {ex}"]
        assert code == 0 and "hint 1/" in out, out + err
    code, out, err = cli["reset 02"]
    assert code == 0 and "Saved your copy" in out, out + err
    assert cli["mine"].read_text() == (nb_build.NOTEBOOKS / cli["mine"].name).read_text(), "a fresh copy"
    code, out, err = cli["progress 02"]
    assert code == 0 and "passed" in out, out + err


def test_pytorch_chapters_check_and_their_solved_notebooks_run(env):
    """The checks' own tests and nbval over the solved notebooks, in one child pytest. (Chapter 00 has
    no exercises: the next test runs it and reads what it prints.)"""
    tests, notebooks = [], []
    for chapter in CHAPTERS_WITHOUT_TRITON:
        tests += [str(p.relative_to(REPO)) for p in REPO.glob(f"tests/course/test_ch{chapter}_*.py")]
        if chapter != "00":
            notebooks += [str(p.relative_to(REPO)) for p in REPO.glob(f"solutions/{chapter}_*.ipynb")]
    assert len(tests) == len(notebooks) + 1 == len(CHAPTERS_WITHOUT_TRITON)
    first = json.loads(next(REPO.glob("solutions/10_*.ipynb")).read_text())["cells"][0]
    assert "**What you need:** PyTorch only" in "".join(first["source"]), "chapter 10 says it needs no Triton"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *tests, *notebooks],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1] and "skipped" not in result.stdout.splitlines()[-1]


def test_chapter_00_says_it_runs_without_triton(env):
    """Chapter 00 runs without Triton (any error raises here) and says why it shows no kernel."""
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
    assert "PyTorch only" in text and "missing: chapters 05-09 need it" in text
    assert "No Triton here, so no kernel: this needs Triton" in text
    assert "[FAIL] triton: not installed" in text, "the environment check names the missing package"
    assert "[PASS] 00.0" in text


CHAPTERS_NEEDING_TRITON = ("05", "06", "07", "08", "09")

FIRST_CELLS_RUNNER = """
import json, sys
errors = []
for source in json.loads(sys.argv[1]):
    try:
        exec(source, {})
        errors.append(None)
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
print(json.dumps(errors))
"""


def test_chapters_needing_triton_say_so_and_stop_at_their_first_code_cell(env):
    """The first cell says what is needed; the first code cell raises the message with the ways
    to get Triton (in JupyterLab, Run All stops there)."""
    first_code = []
    for chapter in CHAPTERS_NEEDING_TRITON:
        cells = json.loads(next(nb_build.NOTEBOOKS.glob(f"{chapter}_*.ipynb")).read_text())["cells"]
        intro = "".join(cells[0]["source"])
        assert "**What you need:** Triton" in intro and "WSL2" in intro and "docker build" in intro, chapter
        first_code.append("".join(next(c for c in cells if c["cell_type"] == "code")["source"]))
    result = _python(env, FIRST_CELLS_RUNNER, json.dumps(first_code))
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.splitlines()[-1])
    for chapter, error in zip(CHAPTERS_NEEDING_TRITON, errors, strict=True):
        assert error and error.startswith(f"ModuleNotFoundError: chapter {chapter}: {device.TRITON_MISSING}"), error
