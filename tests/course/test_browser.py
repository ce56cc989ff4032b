"""A learner's walkthrough in a real browser: JupyterLab, Run All Cells, and what renders.

Starts JupyterLab on a tmp copy of notebooks/ and solutions/, drives Debian's Chromium
through Playwright (no browser download), runs every cell through the Run menu and checks
what a learner sees: chapter 00's figures and its check's [PASS] line, the stub's
NotImplementedError in an exercise notebook, and [PASS] in a solved one. Screenshots go
to test-output/browser/.

Skipped without /usr/bin/chromium (`apt-get install chromium`) or Playwright, unless
MOE_LEARN_REQUIRE_BROWSER=1 (CI), where that is a failure.
"""

import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import nbformat
import pytest
from nbformat import v4

from moe_learn.course import notebook_build as nb_build
from moe_learn.course.exercises import all_exercises

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "test-output" / "browser"
CHEAP_CHAPTERS = ("02", "03", "01")  # an exercise notebook quick to run, if one exists
FIXTURE_NB = "91_browser_fixture.ipynb"
WAIT_MS = 90_000  # generous: kernel start-up and torch import on a busy 2-core machine

# The notebook panel the learner is looking at (JupyterLab hides the others).
PANEL = "#main .jp-NotebookPanel:not(.lm-mod-hidden)"


def _require_browser():
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append('playwright (pip install -e ".[dev]")')
    if missing:
        message = "the browser walkthrough needs " + " and ".join(missing)
        if os.environ.get("MOE_LEARN_REQUIRE_BROWSER") == "1":
            pytest.fail(message + "; MOE_LEARN_REQUIRE_BROWSER=1 makes this a failure")
        pytest.skip(message)


def _fixture_solved_notebook() -> nbformat.NotebookNode:
    """A tiny solved chapter: one exercise and its check (built with the course's own helpers)."""
    check = (
        "from moe_learn.course.checks._core import call_learner, fail, passed\n\n"
        "for x in (0, 3):\n"
        '    if call_learner("91.1", double, x) != 2 * x:\n'
        '        fail("91.1", f"double({x}) is wrong")\n'
        'passed("91.1", "double", 2)'
    )
    nb = v4.new_notebook(
        cells=[
            v4.new_markdown_cell("# 91 · browser fixture"),
            v4.new_code_cell("import moe_learn\n\nprint(moe_learn.device.describe())"),
            v4.new_code_cell(
                "def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION",
                metadata={"tags": ["exercise-91.1"]},
            ),
            v4.new_code_cell(check, metadata={"tags": ["check-91.1"]}),
            v4.new_code_cell('print("after the check")'),
        ]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    return nb


def _exercise_notebook() -> tuple[str, list[str]]:
    """(notebooks/ name, exercise ids) of a cheap real chapter if one is written, else the fixture's."""
    exercises = all_exercises().values()
    for chapter in CHEAP_CHAPTERS:
        names = sorted({ex.notebook for ex in exercises if ex.chapter == chapter})
        if names and (nb_build.NOTEBOOKS / names[0]).is_file():
            return names[0], [ex.id for ex in exercises if ex.notebook == names[0]]
    return FIXTURE_NB, ["91.1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(settings: Path) -> None:
    # Render every cell (no virtual scrolling: outputs below the fold stay in the DOM)
    # and ask nothing about news or updates (no popup, no network).
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    notes = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    for path, value in (
        (tracker, {"windowingMode": "none"}),
        (notes, {"fetchNews": "false", "checkForUpdates": False}),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A running JupyterLab on a tmp copy of the course; yields (base url, token, root)."""
    _require_browser()
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "course"
    for folder in ("notebooks", "solutions"):
        shutil.copytree(REPO / folder, root / folder)
    nbformat.write(_fixture_solved_notebook(), root / "solutions" / FIXTURE_NB)
    built = nb_build.build_notebook(json.loads((root / "solutions" / FIXTURE_NB).read_text()))
    (root / "notebooks" / FIXTURE_NB).write_text(nb_build.dumps(built))
    _write_settings(tmp / "settings")

    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")):
        env[var] = str(tmp / sub)  # isolated from the user's own Jupyter setup
    log = (tmp / "lab.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyter", "lab",
            "--no-browser", "--allow-root",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            f"--LabApp.user_settings_dir={tmp / 'settings'}",
            f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with {server.returncode}:\n{(tmp / 'lab.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer in 60 s:\n{(tmp / 'lab.log').read_text()[-3000:]}")
                time.sleep(0.3)
        # Load the kernel list once now, so the first notebook finds python3 at once.
        urllib.request.urlopen(f"{base}/api/kernelspecs?token={token}", timeout=30).close()
        yield base, token, root
    finally:
        try:  # a clean shutdown also stops the kernels the server started
            request = urllib.request.Request(f"{base}/api/shutdown", method="POST")
            request.add_header("Authorization", f"token {token}")
            urllib.request.urlopen(request, timeout=5).close()
            server.wait(timeout=20)
        except Exception:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-background-networking", "--disable-gpu"]
        )
        yield chromium
        chromium.close()


def _outputs_text(page) -> str:
    return page.evaluate(
        "sel => Array.from(document.querySelectorAll(sel + ' .jp-OutputArea-output'))"
        ".map(e => e.textContent).join('\\n')",
        PANEL,
    )


def _has_kernel(lab, path: str) -> bool:
    base, token, _ = lab
    with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=5) as response:
        sessions = json.load(response)
    return any(s.get("path") == path and s.get("kernel") for s in sessions)


def run_all(browser, lab, path: str, shot: str):
    """Open ``path`` in a fresh workspace, Run > Run All Cells, wait until every cell ran."""
    base, token, root = lab
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    workspace = shot.replace("_", "-")  # a workspace of its own: no tabs restored from another test
    kernelspec = json.loads((root / path).read_text()).get("metadata", {}).get("kernelspec", {})
    assert kernelspec.get("name") == "python3", f"{path} needs a python3 kernelspec, or JupyterLab asks 'Select Kernel'"
    page.goto(f"{base}/lab/workspaces/{workspace}/tree/{path}?token={token}")
    page.wait_for_selector(f"{PANEL} .jp-Cell")
    # Wait until the server runs a kernel for this notebook. Right after start-up JupyterLab
    # may ask for a kernel before it has loaded the kernel list; its choice is the notebook's
    # own kernelspec (checked above), so accept it.
    deadline = time.monotonic() + WAIT_MS / 1000
    while not _has_kernel(lab, path):
        if page.locator(".jp-Dialog .jp-mod-accept").count():
            warnings.warn(f"JupyterLab asked for a kernel for {path} although it has a kernelspec", stacklevel=1)
            page.click(".jp-Dialog .jp-mod-accept")
        if time.monotonic() > deadline:
            page.screenshot(path=str(SCREENSHOTS / f"{shot}-no-kernel.png"))
            pytest.fail(f"no kernel started for {path}; see test-output/browser/{shot}-no-kernel.png")
        page.wait_for_timeout(250)
    indicator = f"{PANEL} .jp-Notebook-ExecutionIndicator"
    page.wait_for_selector(f"{indicator}[data-status='idle']", state="attached")

    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
    try:
        # Every code cell shows [n] once it ran ([*] while queued or running).
        page.wait_for_function(
            """sel => {
                const prompts = Array.from(document.querySelectorAll(sel + ' .jp-CodeCell .jp-InputPrompt'));
                return prompts.length > 0 && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
            }""",
            arg=PANEL,
        )
        page.wait_for_selector(f"{indicator}[data-status='idle']", state="attached")
    except Exception:
        page.screenshot(path=str(SCREENSHOTS / f"{shot}-timeout.png"))
        prompts = page.evaluate(
            "sel => Array.from(document.querySelectorAll(sel + ' .jp-CodeCell .jp-InputPrompt'))"
            ".map(p => p.textContent)",
            PANEL,
        )
        page.close()
        pytest.fail(f"{path}: not every cell ran; prompts {prompts}; see test-output/browser/{shot}-timeout.png")
    return page


def _show(page, locator, shot: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    locator.scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOTS / f"{shot}.png"))


def test_chapter_00_runs_and_shows_figures_and_a_pass(browser, lab):
    page = run_all(browser, lab, "notebooks/00_setup_and_tour.ipynb", "00_setup_and_tour")
    try:
        text = _outputs_text(page)
        assert "Triton interpreter mode" in text or "GPU:" in text, "the device line"
        assert "[OK]   Triton kernel" in text, "the environment check ran a kernel"
        assert "[PASS] 00.0" in text, "the demonstration check passed"
        assert "CheckFailed: 00.0" in text, "the wrong answer's explanation"
        images = page.locator(f"{PANEL} .jp-OutputArea-output img")
        assert images.count() >= 2, "the routing heatmap and the load bars"
        assert (
            page.locator(f"{PANEL} .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
        )
        _show(page, images.first, "00_setup_and_tour-figure")
        _show(page, page.locator(f"{PANEL} .jp-OutputArea-output:has-text('[PASS] 00.0')"), "00_setup_and_tour-pass")
    finally:
        page.close()


def test_an_exercise_notebook_shows_the_stubs_error(browser, lab):
    name, exercise_ids = _exercise_notebook()
    page = run_all(browser, lab, f"notebooks/{name}", "exercise-stub")
    try:
        errors = page.locator(f"{PANEL} .jp-OutputArea-output:has-text('NotImplementedError')")
        assert errors.count() >= 1, f"{name}: a check after an unfinished stub shows NotImplementedError"
        text = _outputs_text(page)
        for ex_id in exercise_ids:
            assert f"[PASS] {ex_id}" not in text, f"a stub must not pass check {ex_id}"
        if name == FIXTURE_NB:  # raises-exception on the check cell: Run All goes on past the error
            assert "after the check" in _outputs_text(page)
        _show(page, errors.first, "exercise-stub")
    finally:
        page.close()


def test_a_solved_notebook_shows_the_checks_pass(browser, lab):
    page = run_all(browser, lab, f"solutions/{FIXTURE_NB}", "exercise-solved")
    try:
        passed = page.locator(f"{PANEL} .jp-OutputArea-output:has-text('[PASS] 91.1')")
        assert passed.count() == 1
        assert "Error" not in _outputs_text(page)
        _show(page, passed, "exercise-solved")
    finally:
        page.close()


OFF_BY_ONE = "        if tile_id <= tiles_before + tiles:  # off by one\n"


def _plant_off_by_one(root: Path) -> str:
    """notebooks/06 with exercise 06.1 answered but for a `<=` (the kernel, 06.2, still a stub)."""
    path = root / "notebooks" / "06_triton_grouped_gemm.ipynb"
    nb = json.loads(path.read_text())
    solved = json.loads((root / "solutions" / path.name).read_text())
    tag = "exercise-06.1"
    answer = next(c for c in solved["cells"] if tag in c["metadata"].get("tags", []))
    lines = [line for line in nb_build.cell_source(answer).splitlines(keepends=True) if "### " not in line]
    source = "".join(lines).replace("        if tile_id < tiles_before + tiles:\n", OFF_BY_ONE)
    assert OFF_BY_ONE in source, "the solved 06.1 changed: update the planted bug"
    next(c for c in nb["cells"] if tag in c["metadata"].get("tags", []))["source"] = source
    path.write_text(json.dumps(nb))
    return f"notebooks/{path.name}"


def test_chapter_06_shows_its_figures_a_short_failure_and_what_is_unfinished(browser, lab):
    """A learner's chapter 06 with a wrong 06.1 and no kernel yet: what each part of the page shows."""
    page = run_all(browser, lab, _plant_off_by_one(lab[2]), "06_triton_grouped_gemm")
    try:
        outputs = page.locator(f"{PANEL} .jp-OutputArea-output")
        # The tile schedule ("Read the picture") and the GROUP_M comparison both draw.
        images = page.locator(f"{PANEL} .jp-OutputArea-output img")
        assert images.count() >= 2, "chapter 06's two schedule figures"
        _show(page, images.first, "06_triton_grouped_gemm-schedule")

        failed = outputs.filter(has_text="CheckFailed: 06.1")
        assert failed.count() == 1
        text = failed.inner_text()
        assert "likely mistake: tile_id == tiles_before + tiles_of_e is already the next expert's first tile" in text
        assert "m_sizes=[4, 4, 4], num_n_tiles=1, BLOCK_M=4 (equal experts)" in text, "the case"
        for leak in ("Traceback", "moe_learn/course/checks", "call_learner", "cdiv(m_sizes[e], BLOCK_M)"):
            assert leak not in text, f"{leak!r} in what the learner sees:\n{text}"
        assert len(text.strip().splitlines()) <= 6, text
        assert "%tb verbose" in text
        _show(page, failed, "06_triton_grouped_gemm-failed-check")

        kernel = outputs.filter(has_text="CheckFailed: 06.2")
        assert kernel.count() == 1 and "your kernel wrote nothing" in kernel.inner_text()
        unfinished = outputs.filter(has_text="ExerciseUnfinished")
        assert unfinished.count() >= 1 and "finish exercise 06.2 first" in unfinished.first.inner_text()
        assert "relative error vs float64: nan" not in _outputs_text(page)
        _show(page, unfinished.first, "06_triton_grouped_gemm-unfinished")

        # The glossary link at "a CUDA graph" opens the glossary at its entry, far down the page.
        # (JupyterLab may drop the #fragment while it first opens a notebook, showing its top,
        # with the same links in its index; from then on a link lands on the entry.)
        link = page.locator(f"{PANEL} .jp-RenderedMarkdown a:text-is('CUDA graph')").first
        link.click()
        page.locator(".lm-TabBar-tab.lm-mod-current:has-text('glossary.ipynb')").wait_for()
        page.locator(".lm-TabBar-tab:has-text('06_triton_grouped_gemm')").click()
        link.click()
        page.wait_for_function(
            """sel => {
                const h = Array.from(document.querySelectorAll(sel + ' h3'))
                    .find(e => e.textContent.startsWith('CUDA graph'));
                const r = h && h.getBoundingClientRect();
                return r && r.top >= 0 && r.top < 300;
            }""",
            arg=PANEL,
        )
        assert page.locator(".lm-TabBar-tab.lm-mod-current:has-text('glossary.ipynb')").count() == 1
        page.screenshot(path=str(SCREENSHOTS / "glossary-CUDA-graph.png"))
    finally:
        page.close()


def test_a_missing_browser_skips_or_fails_as_configured(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("MOE_LEARN_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        _require_browser()
    monkeypatch.setenv("MOE_LEARN_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="MOE_LEARN_REQUIRE_BROWSER=1 makes this a failure"):
        _require_browser()
