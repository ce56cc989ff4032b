"""The benchmark command: its cases, its roofline arithmetic, its CPU behaviour, its report."""

import json
from pathlib import Path

import pytest
import torch

from moe_learn.bench import run as bench
from moe_learn.bench import timing

REPO = Path(__file__).resolve().parents[2]


def test_sixteen_cases_with_the_models_shapes():
    cases = bench.cases()
    assert len(cases) == 16
    qwen = {(c.gemm, c.tokens): c for c in cases if c.model == "qwen3-30b-a3b"}
    gate_up = qwen[("gate_up", 1024)]
    assert (gate_up.M, gate_up.N, gate_up.K, gate_up.E) == (8192, 1536, 2048, 128)  # T*k rows, [E, 2I, H]
    down = qwen[("down", 8192)]
    assert (down.M, down.N, down.K) == (65536, 2048, 768)  # [E, H, I]


def test_flops_and_bytes_count_x_all_weights_and_y_once():
    case = bench.Case("m", "gate_up", 4, M=8, N=6, K=5, E=3)
    assert case.flops == 2 * 8 * 6 * 5
    assert case.bytes() == 2 * (8 * 5 + 3 * 6 * 5 + 8 * 6)


def test_geomean():
    assert bench.geomean([2.0, 8.0]) == pytest.approx(4.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU prints")
def test_without_a_gpu_it_says_so_and_exits_cleanly(capsys, tmp_path):
    assert bench.main(["--out", str(tmp_path)]) == 0
    assert "No CUDA GPU here" in capsys.readouterr().out
    assert not any(tmp_path.iterdir()), "nothing is written without a GPU"


def test_report_of_the_stored_h100_run(capsys):
    stored = REPO / "docs" / "bench" / "h100-results.json"
    assert bench.main(["--report", str(stored)]) == 0
    out = capsys.readouterr().out
    result = json.loads(stored.read_text())
    assert result["environment"]["gpu"] in out and result["environment"]["triton"] in out
    for case in bench.cases():
        assert f"| {case.name} |" in out, f"{case.name} missing from the report"
    assert "Routing" in out and "MoE forward" in out


def test_a_negative_rest_is_refused_naming_the_argument(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--rest", "-1"])
    assert "--rest must be 0 or more seconds" in capsys.readouterr().err


def test_every_timing_follows_a_rest(monkeypatch):
    """Ceilings and kernels are timed on a rested GPU alike (a loaded H100 sits at its power cap)."""
    import triton.testing

    events = []
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda: events.append("sync"))
    monkeypatch.setattr(timing.time, "sleep", lambda seconds: events.append(("sleep", seconds)))
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: events.append("time") or 2.0)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kw: events.append("graph") or 3.0)
    monkeypatch.setattr(timing, "REST_S", 0.25)
    assert timing.do_bench(lambda: None) == pytest.approx(2e-3)
    assert timing.do_bench_graph(lambda: None) == pytest.approx(3e-3)
    assert events == ["sync", ("sleep", 0.25), "time", "sync", ("sleep", 0.25), "graph"]
