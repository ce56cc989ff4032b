"""Every transformers MoE family on experts_implementation="moe_learn": same outputs and gradients as "eager".

One child process builds a tiny random model of every family that uses transformers'
experts interface (``hf_families.families()``; no download) and runs it forward and
backward with "eager" and with "moe_learn" (the course's Triton kernels; the interpreter
on a CPU). A family whose tiny model does not run with "eager" itself is left out.
"""

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

HERE = Path(__file__).resolve().parent
OUTPUT_TOL, GRAD_TOL = 1e-4, 1e-3  # relative to each tensor's largest entry; float32 throughout


def _limit_memory():  # a family whose tiny config is not tiny must fail, not take the machine down
    if not torch.cuda.is_available():  # CUDA reserves huge virtual address ranges: no limit there
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("families") / "results.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "hf_families.py"), str(path)], env=env, capture_output=True,
                          text=True, timeout=1500, preexec_fn=_limit_memory)
    assert path.exists(), f"the sweep wrote nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    found = json.loads(path.read_text())
    assert proc.returncode == 0, f"the sweep stopped after {list(found)[-1:]} (exit {proc.returncode}):\n" \
                                 f"{proc.stderr[-3000:]}"
    return found


def _matches(r):
    return (r["status"] == "compared" and r["output"] <= OUTPUT_TOL and r["grad"] <= GRAD_TOL
            and r["same_grad_names"])


def test_every_family_matches_eager_or_is_refused_clearly(results):
    wrong = {name: r for name, r in results.items() if r["status"] == "error"
             or (r["status"] == "compared" and not _matches(r))}
    listing = "\n".join(f"  {n}: {r}" for n, r in wrong.items())
    assert not wrong, f"families that ran but did not match eager:\n{listing}"
    for name, r in results.items():
        if r["status"] == "refused":
            assert name.split("_")[0] in r["why"] or "(" in r["why"], f"{name}: the refusal must name the family"


def test_at_least_90_percent_of_the_families_that_build_run_on_moe_learn(results):
    built = [n for n, r in results.items() if r["status"] not in ("eager fails", "same model")]
    matched = [n for n in built if _matches(results[n])]
    assert len(built) >= 40, f"only {len(built)} families built tiny: the tiny configs broke ({results})"
    assert len(matched) >= 0.9 * len(built), f"{len(matched)}/{len(built)} families match"
