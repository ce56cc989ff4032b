"""Bad-input tables run in child processes, so that a crash (a segfault, an abort) is a failed case.

The child calls ``report_cases(calls, start)``: from case ``start`` on, one JSON line per case (its
exception type and message, or that it returned). The parent, ``outcomes_in_children``, starts a
child, reads its lines, and after a crash records it against the case that was running and goes on
from the next one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def report_cases(calls, start: int) -> None:
    """The child's side: ``calls`` are zero-argument callables; from ``start`` on, one JSON line each."""
    for i, call in enumerate(calls):
        if i < start:
            continue
        print(json.dumps({"start": i}), flush=True)
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - every outcome is reported, the parent judges
            print(json.dumps({"i": i, "type": type(exc).__name__, "message": str(exc)}), flush=True)
        else:
            print(json.dumps({"i": i, "type": None, "message": "returned without an error"}), flush=True)


def outcomes_in_children(child_code: str, total: int, timeout: int = 900) -> dict[int, dict]:
    """Run ``child_code`` (Python with ``{start}`` for the first case) until all ``total`` cases reported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    results: dict[int, dict] = {}
    start = 0
    while start < total:
        proc = subprocess.run([sys.executable, "-c", child_code.format(start=start)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        last = start
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                last = record["start"]
            else:
                results[record["i"]] = record
        if last in results:  # the child got through to the end
            break
        results[last] = {"type": "crash", "message": f"the process died (exit code {proc.returncode}): "
                                                      f"{proc.stderr[-1500:]}"}
        start = last + 1
    return results
