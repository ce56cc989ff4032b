"""How the course installs: pyproject.toml and environment.yml agree, the README opens with the two
commands, the Makefile picks the right torch build and falls back cleanly, the Dockerfile runs `make lab`."""

import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from moe_learn.course import doctor

REPO = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="needs GNU make (the README's commands)")


def _pyproject_requirements():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {str(Requirement(r)) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}


def _environment_pip_requirements():
    lines = (REPO / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    reqs = set()
    for line in lines[start + 1 :]:
        match = re.match(r"^\s{6,}- (\S.*)$", line)
        if not match:
            break
        reqs.add(str(Requirement(match.group(1).strip())))  # normalized: quotes and spaces of markers
    return reqs


def test_environment_yml_matches_pyproject():
    py, env = _pyproject_requirements(), _environment_pip_requirements()
    assert py == env, f"only in pyproject: {sorted(py - env)}; only in environment.yml: {sorted(env - py)}"


def test_environment_yml_pins_python_311():
    assert "- python=3.11" in (REPO / "environment.yml").read_text()


@pytest.mark.parametrize("source", ["pyproject.toml", "environment.yml"])
def test_triton_is_a_linux_only_dependency(source):
    reqs = _pyproject_requirements() if source == "pyproject.toml" else _environment_pip_requirements()
    triton = [Requirement(r) for r in reqs if Requirement(r).name == "triton"]
    assert len(triton) == 1 and triton[0].marker is not None, f"{source}: triton needs an environment marker"
    for platform, wanted in (("linux", True), ("darwin", False), ("win32", False)):
        assert triton[0].marker.evaluate({"sys_platform": platform}) is wanted, f"{source} on {platform}"
    others = [r for r in reqs if Requirement(r).name != "triton" and Requirement(r).marker is not None]
    assert not others, f"only Triton is platform-specific: {others}"


def test_license_is_an_spdx_expression():
    """A TOML table makes setuptools warn on every install (PEP 639)."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert isinstance(data["project"]["license"], str)
    assert any(r.startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77
               for r in data["build-system"]["requires"])  # fmt: skip


def test_readme_starts_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block and text.index("```bash") < text.index("## "), "the README must open with the commands"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["make lab", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci, ".ci/run must call the README's test command"


# ---------------------------------------------------------------- the Makefile's torch


def _make_value(variable: str, path: str, **overrides) -> str:
    """The value `make` gives ``variable`` with PATH=``path`` and command-line ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k != variable}
    env["PATH"] = path
    args = [f"{k}={v}" for k, v in overrides.items()]
    result = subprocess.run(
        [MAKE, "-s", "-C", str(REPO), *args, "--eval", f"show-value: ; @echo '[$({variable})]'", "show-value"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()[1:-1]


def _fake_nvidia_smi(folder: Path, works: bool) -> str:
    folder.mkdir()
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\nexit {0 if works else 9}\n")
    (folder / "nvidia-smi").chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


@needs_make
def test_torch_index_is_the_cpu_index_unless_nvidia_smi_works(tmp_path):
    cpu = "https://download.pytorch.org/whl/cpu"
    no_driver = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not Path(p, "nvidia-smi").exists())
    if not any(Path(p, "echo").exists() for p in no_driver.split(os.pathsep)):
        no_driver = str(_fake_nvidia_smi(tmp_path / "none", works=False))  # nvidia-smi sits beside echo here
    assert _make_value("TORCH_INDEX", no_driver) == cpu
    assert _make_value("TORCH_INDEX", _fake_nvidia_smi(tmp_path / "broken", works=False)) == cpu
    assert _make_value("TORCH_INDEX", _fake_nvidia_smi(tmp_path / "gpu", works=True)) == "", "PyPI's CUDA build"
    assert _make_value("TORCH_INDEX", no_driver, TORCH_INDEX="https://example.org/whl") == "https://example.org/whl"


class _Index(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def fake_venv(tmp_path):
    """A .venv whose python logs every call and runs only the index probe (`-c` with urllib)."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        f'#!/bin/sh\necho "$*" >> {shlex.quote(str(log))}\n'
        f'case "$1 $2" in "-c "*urllib*) exec {shlex.quote(sys.executable)} "$@";; esac\n'
    )
    python.chmod(0o755)
    return venv, log


def _install(venv: Path, torch_index: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = dict(os.environ, no_proxy="127.0.0.1", NO_PROXY="127.0.0.1")  # the probe must reach the test's index
    result = subprocess.run(
        [MAKE, "-C", str(REPO), f"VENV={venv}", f"PYTHON={venv}/bin/python", f"TORCH_INDEX={torch_index}",
         f"{venv}/.installed"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    pip = [line for line in (venv.parent / "calls.log").read_text().splitlines() if line.startswith("-m pip install")]
    return result, pip


@needs_make
def test_install_uses_a_reachable_torch_index(fake_venv, tmp_path):
    venv, _ = fake_venv
    (tmp_path / "index" / "torch").mkdir(parents=True)
    (tmp_path / "index" / "torch" / "index.html").write_text("<a href='torch-2.13.0+cpu.whl'>torch</a>")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Index(*a, directory=str(tmp_path / "index")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    index = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        result, pip = _install(venv, index)
    finally:
        server.shutdown()
    assert f"Installing torch==2.13.0 from {index}" in result.stdout
    assert pip[1] == f"-m pip install --quiet --index-url {index} torch==2.13.0", pip
    assert pip[2] == "-m pip install --quiet -e .[dev]"
    assert (venv / ".installed").exists()


@needs_make
def test_install_falls_back_when_the_torch_index_cannot_be_reached(fake_venv):
    venv, _ = fake_venv
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{s.getsockname()[1]}"
    result, pip = _install(venv, unreachable)
    assert f"{unreachable} cannot be reached: installing torch==2.13.0 from pip's default index" in result.stdout
    assert "PyPI's CUDA build: several GB" in result.stdout, "says what the fallback may cost"
    assert pip[1] == "-m pip install --quiet torch==2.13.0", pip
    assert (venv / ".installed").exists()


@needs_make
def test_install_with_an_empty_index_uses_pips_default(fake_venv):
    venv, _ = fake_venv
    result, pip = _install(venv, "")
    assert "Installing torch==2.13.0 from pip's default index" in result.stdout
    assert pip[1] == "-m pip install --quiet torch==2.13.0", pip


# ---------------------------------------------------------------- the Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.M)]


def dockerfile_lab_args() -> list[str]:
    """The LAB_ARGS the container's CMD passes to `make lab` (tests/test_lab.py runs them)."""
    cmd = json.loads(dict(_dockerfile())["CMD"])
    assert cmd[:2] == ["make", "lab"], f"the container must run the README's `make lab`, not {cmd}"
    extra = [a for a in cmd[2:] if a.startswith("LAB_ARGS=")]
    assert len(cmd) == 2 + len(extra) <= 3, cmd
    return shlex.split(extra[0].removeprefix("LAB_ARGS=")) if extra else []


def test_dockerfile_builds_the_course_and_runs_make_lab():
    steps = _dockerfile()
    instructions = [name for name, _ in steps]
    assert instructions[0] == "FROM"
    image = steps[0][1]
    match = re.fullmatch(r"python:(\d+)\.(\d+)(-[\w.-]+)?", image)
    assert match and (int(match[1]), int(match[2])) >= doctor.MINIMUM_PYTHON, f"a Python the course supports: {image}"
    runs = " ".join(args for name, args in steps if name == "RUN")
    assert "install" in runs and " make" in runs, "the slim image has no make"
    assert "make .venv/.installed" in runs, "installs while building, so the container starts at once"
    install = next(i for i, (name, args) in enumerate(steps) if name == "RUN" and "make .venv/.installed" in args)
    assert instructions.index("COPY") < install, "the course is copied in before it is installed"
    exposed = dict(steps)["EXPOSE"].split()
    lab_args = dockerfile_lab_args()
    assert "--ip=0.0.0.0" in lab_args, "inside a container JupyterLab must listen beyond localhost"
    assert "--no-browser" in lab_args
    port = next(a.split("=")[1] for a in lab_args if a.startswith("--port="))
    assert exposed == [port], f"EXPOSE {exposed} must be the port JupyterLab listens on ({port})"
    header = (REPO / "Dockerfile").read_text()
    assert f"-p {port}:{port}" in header and "docker build -t moe-learn ." in header, "the comment says how to run it"


def test_dockerignore_keeps_the_hosts_venv_out():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    assert ".venv/" in patterns or ".venv" in patterns, "a host .venv (another OS, other paths) must not be copied"
