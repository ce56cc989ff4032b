"""The ``moe-learn`` command (also ``python -m moe_learn``).

    moe-learn doctor              is everything installed, and does a Triton kernel run?
    moe-learn progress [CH]       run your notebooks/ and list every exercise: passed, failed, not started
    moe-learn hint CH.N           the next hint for an exercise (one more each time)
    moe-learn reset CH            a fresh exercise notebook for a chapter (yours is kept in notebooks/backups/)
    moe-learn bench [...]         benchmarks (on a GPU)

Exit codes: 0 success (doctor: all OK; progress: every exercise passed), 1 not yet
(a failed requirement or an unfinished exercise), 2 a usage error (the message says the fix).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from moe_learn.course import notebook_build as nb_build
from moe_learn.course import progress

STATE_DIR_ENV = "MOE_LEARN_STATE_DIR"


class UsageError(Exception):
    """A mistake in how the command was called; the message says how to fix it."""


def _console(stderr: bool = False) -> Console:
    # Created per call so tests (and COLUMNS) see the current sys.stdout/stderr.
    # soft_wrap: a message stays one line (terminals wrap it; pipes and logs keep it whole).
    return Console(file=sys.stderr if stderr else sys.stdout, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- names and places


def normalize_chapter(text: str) -> str:
    """'2', '02', 'ch02' -> '02'."""
    match = re.fullmatch(r"(?:ch)?(\d{1,2})", text.strip().lower())
    if not match:
        raise UsageError(f"'{text}' is not a chapter number; write it like 02")
    return f"{int(match.group(1)):02d}"


def normalize_exercise(text: str) -> str:
    """'2.1', '02.1' -> '02.1'."""
    match = re.fullmatch(r"(\d{1,2})\.(\d+)", text.strip())
    if not match:
        raise UsageError(f"'{text}' is not an exercise id; write it like 02.1 (chapter.number)")
    return f"{int(match.group(1)):02d}.{int(match.group(2))}"


def default_notebooks_dir() -> Path:
    """./notebooks when run from the course's root folder, else the notebooks/ of the checkout
    this moe_learn was installed from (``pip install -e .``, what ``make lab`` does)."""
    here = Path.cwd() / "notebooks"
    return here if here.is_dir() else nb_build.NOTEBOOKS


def _existing_dir(path: Path, what: str, option: str) -> Path:
    if not path.is_dir():
        raise UsageError(f"{what} folder {path} does not exist; run from the course's root folder or pass {option} DIR")
    return path


def _chapters_in(folder: Path) -> set[str]:
    return {p.name[:2] for p in folder.glob("[0-9][0-9]_*.ipynb")} if folder.is_dir() else set()


def _load_exercises() -> dict:
    from moe_learn.course.exercises import all_exercises

    return all_exercises()


def _chapter_list(chapters: set[str]) -> str:
    return ", ".join(sorted(chapters)) or "none yet"


# ---------------------------------------------------------------- doctor


def cmd_doctor(args: argparse.Namespace) -> int:
    from moe_learn.course import doctor

    out = _console()
    results = doctor.run_checks()
    for r in results:
        line = Text(r.line())  # the same words as chapter 00 prints, in color
        line.stylize({"OK": "bold green", "WARN": "bold yellow", "FAIL": "bold red"}[r.status], 0, 6)
        fix_at = line.plain.find("  -> fix: ")
        if fix_at >= 0:
            line.stylize("yellow", fix_at)
        out.print(line)
    failed = [r for r in results if not r.ok]
    if failed:
        out.print(f"{len(failed)} of {len(results)} checks failed; fix them and run `moe-learn doctor` again.")
        return 1
    warned = [r for r in results if r.warn]
    if warned:
        out.print(
            f"{len(warned)} of {len(results)} checks warn: chapters 00-04 and 10 are ready; the [WARN] lines say "
            "how to get chapters 05-09. Start with notebooks/00_setup_and_tour.ipynb (`make lab`)."
        )
        return 0
    out.print(f"All {len(results)} checks passed: open notebooks/00_setup_and_tour.ipynb (`make lab`).")
    return 0


# ---------------------------------------------------------------- progress


STATE_STYLE = {"passed": "green", "failed": "red", "not started": "yellow", "not checked": "cyan", "missing": "magenta"}


class _CellProgress:
    """Shows which cell of which notebook runs: on a terminal one live line with a spinner and the
    seconds it has run (so an endless loop shows at once), elsewhere (logs, CI) a line per cell."""

    def __init__(self, console: Console, timeout: int):
        self.console, self.timeout = console, timeout
        self.status = None
        self.text, self.started = "", time.monotonic()

    def __rich__(self) -> Text:  # re-rendered by the spinner several times a second
        seconds = time.monotonic() - self.started
        return Text(f"{self.text}  {seconds:.0f} s (limit {self.timeout} s)", style="dim")

    def notebook(self, path: Path) -> None:
        self.console.print(f"running {path.name} ...", style="dim")

    def cell(self, path: Path, index: int, label: str) -> None:
        self.text, self.started = f"{path.name}: {label}", time.monotonic()
        if not self.console.is_terminal:
            self.console.print(f"  {label}", style="dim", highlight=False, markup=False)
        elif self.status is None:
            self.status = self.console.status(self)
            self.status.start()

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


def cmd_progress(args: argparse.Namespace) -> int:
    notebooks = _existing_dir(
        Path(args.notebooks) if args.notebooks else default_notebooks_dir(), "notebooks", "--notebooks"
    )
    solutions = Path(args.solutions) if args.solutions else nb_build.SOLUTIONS
    exercises = list(_load_exercises().values())
    if args.chapter is not None:
        chapter = normalize_chapter(args.chapter)
        known = {ex.chapter for ex in exercises} | _chapters_in(notebooks) | _chapters_in(solutions)
        if chapter not in known:
            raise UsageError(f"there is no chapter {chapter}; chapters: {_chapter_list(known)}")
        exercises = [ex for ex in exercises if ex.chapter == chapter]
        if not exercises:
            _console().print(f"Chapter {chapter} has no exercises: nothing to check.")
            return 0
    if not exercises:
        _console().print("No exercises are defined yet: nothing to check.")
        return 0

    if args.timeout < 1:
        raise UsageError(f"--timeout must be at least 1 second, got {args.timeout}")
    out = _console()
    shown = _CellProgress(_console(stderr=True), args.timeout)
    try:
        statuses = progress.course_progress(
            exercises, notebooks, solutions, timeout=args.timeout, on_run=shown.notebook, on_cell=shown.cell
        )
    finally:
        shown.stop()
    table = Table(title=f"Your progress ({notebooks})", title_justify="left")
    table.add_column("exercise", no_wrap=True)
    table.add_column("title")
    table.add_column("status", no_wrap=True)
    table.add_column("details")
    for s in statuses:
        table.add_row(s.exercise.id, s.exercise.title, Text(s.state, style=STATE_STYLE[s.state]), s.detail)
    out.print(table)
    counts = {state: sum(s.state == state for s in statuses) for state in STATE_STYLE}
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    out.print(f"{counts['passed']}/{len(statuses)} passed ({summary}).")
    if counts["passed"] == len(statuses):
        return 0
    ex = progress.next_exercise(statuses).exercise
    out.print(f"Next: exercise {ex.id} in notebooks/{ex.notebook}; stuck? `moe-learn hint {ex.id}`", soft_wrap=True)
    return 1


# ---------------------------------------------------------------- hint


def state_dir() -> Path:
    """Where the command keeps its state: $MOE_LEARN_STATE_DIR, else ~/.moe_learn."""
    override = os.environ.get(STATE_DIR_ENV)
    return Path(override) if override else Path.home() / ".moe_learn"


def _read_hint_state(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, int) and v >= 0}


def cmd_hint(args: argparse.Namespace) -> int:
    ex_id = normalize_exercise(args.exercise)
    exercises = _load_exercises()
    if ex_id not in exercises:
        known = ", ".join(sorted(exercises)) or "none yet"
        raise UsageError(f"there is no exercise {ex_id}; exercises: {known}")
    ex = exercises[ex_id]
    path = state_dir() / "hints.json"
    state = _read_hint_state(path)
    out = _console()
    if args.reset:
        state.pop(ex_id, None)
        _write_state(path, state)
        out.print(f"Hints for {ex_id} start again from the first.")
        return 0
    if not ex.hints:
        out.print(f"Exercise {ex_id} ({ex.title}) has no hints; the solved notebook is solutions/{ex.notebook}.")
        return 0
    shown_before = min(state.get(ex_id, 0), len(ex.hints))
    shown = min(shown_before + 1, len(ex.hints))
    out.print(Text(f"{ex_id} {ex.title}", style="bold"))
    for i, hint in enumerate(ex.hints[:shown], start=1):
        out.print(Text(f"  hint {i}/{len(ex.hints)}: {hint}", style="" if i == shown > shown_before else "dim"))
    if shown == shown_before:
        out.print(
            f"No more hints for {ex_id}: all {len(ex.hints)} are above. The answer is in solutions/{ex.notebook}."
        )
    elif shown < len(ex.hints):
        out.print(f"Run `moe-learn hint {ex_id}` again for the next hint.")
    else:
        out.print(f"That was the last hint for {ex_id}.")
    state[ex_id] = shown
    _write_state(path, state)
    return 0


def _write_state(path: Path, state: dict[str, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: an interrupted write never leaves half a file


# ---------------------------------------------------------------- reset


BACKUPS = "backups"  # under notebooks/, git-ignored


def backup_path(target: Path, now: datetime.datetime | None = None) -> Path:
    """``notebooks/02_routing_indices.ipynb`` -> ``notebooks/backups/02-2026-11-27-1042-routing_indices.ipynb``.

    Chapter and date come first: JupyterLab's file browser cuts names after about 14
    characters, and the backups must differ there (from each other, and from the notebook).
    A second backup in the same minute gets ``-2``.
    """
    stamp = (now or datetime.datetime.now()).strftime("%Y-%m-%d-%H%M")
    chapter, _, rest = target.name.partition("_")
    folder = target.parent / BACKUPS
    candidate = folder / f"{chapter}-{stamp}-{rest}"
    n = 1
    while candidate.exists():
        n += 1
        candidate = folder / f"{chapter}-{stamp}-{n}-{rest}"
    return candidate


def cmd_reset(args: argparse.Namespace) -> int:
    chapter = normalize_chapter(args.chapter)
    solutions = _existing_dir(
        Path(args.solutions) if args.solutions else nb_build.SOLUTIONS, "solutions", "--solutions"
    )
    notebooks = Path(args.notebooks) if args.notebooks else default_notebooks_dir()
    sources = sorted(solutions.glob(f"{chapter}_*.ipynb"))
    if not sources:
        raise UsageError(
            f"there is no chapter {chapter} in {solutions}; chapters: {_chapter_list(_chapters_in(solutions))}"
        )
    notebooks.mkdir(parents=True, exist_ok=True)
    out = _console()
    for source in sources:
        fresh = nb_build.dumps(nb_build.build_notebook(json.loads(source.read_text(encoding="utf-8"))))
        target = notebooks / source.name
        if target.exists():
            if target.read_text(encoding="utf-8") == fresh:
                out.print(f"{target} is already fresh; nothing to do.")
                continue
            saved = backup_path(target)
            saved.parent.mkdir(exist_ok=True)
            target.replace(saved)
            out.print(f"Saved your copy as {saved}")
        target.write_text(fresh, encoding="utf-8")
        out.print(f"Wrote a fresh {target}")
    return 0


# ---------------------------------------------------------------- bench


def cmd_bench(argv: list[str]) -> int:
    from moe_learn.bench.run import main as bench_main

    result = bench_main(argv)
    return 0 if result is None else int(result)


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-learn",
        description="Companion command of the moe-learn course.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 done, 1 not yet (a failed check or exercise), 2 usage error.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("doctor", help="check Python, packages, device, and that a Triton kernel runs")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("progress", help="run your notebooks/ and list every exercise's status")
    p.add_argument("chapter", nargs="?", help="only this chapter, e.g. 02")
    p.add_argument("--notebooks", metavar="DIR", help="your exercise notebooks (default: ./notebooks)")
    p.add_argument("--solutions", metavar="DIR", help=argparse.SUPPRESS)  # where the stubs come from (tests)
    p.add_argument(
        "--timeout",
        type=int,
        default=progress.DEFAULT_TIMEOUT,
        metavar="S",
        help=f"seconds a cell may run before it is stopped (default {progress.DEFAULT_TIMEOUT})",
    )
    p.set_defaults(func=cmd_progress)

    p = sub.add_parser("hint", help="show the next hint for an exercise, e.g. `moe-learn hint 02.1`")
    p.add_argument("exercise", help="exercise id, e.g. 02.1")
    p.add_argument("--reset", action="store_true", help="start this exercise's hints again from the first")
    p.set_defaults(func=cmd_hint)

    p = sub.add_parser(
        "reset", help="write a fresh exercise notebook for a chapter (yours is kept in notebooks/backups/)"
    )
    p.add_argument("chapter", help="chapter number, e.g. 02")
    p.add_argument("--notebooks", metavar="DIR", help="your exercise notebooks (default: ./notebooks)")
    p.add_argument("--solutions", metavar="DIR", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_reset)

    sub.add_parser("bench", help="run the benchmarks (arguments go to moe_learn.bench.run; try `bench --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after `bench` belongs to the benchmark's own parser
        return cmd_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UsageError as exc:
        _console(stderr=True).print(Text(f"error: {exc}", style="red"))
        return 2


if __name__ == "__main__":
    sys.exit(main())
