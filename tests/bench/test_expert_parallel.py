"""The expert-parallel benchmark: says so and exits 0 without 2 GPUs; its CPU smoke mode
runs the whole measurement path (2 gloo processes) and writes the JSON."""

import json

import pytest
import torch

from moe_learn.bench import expert_parallel as bench_expert_parallel


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine can run the real benchmark")
def test_without_two_gpus_it_says_so_and_exits_0(tmp_path, capsys):
    out = tmp_path / "ep.json"
    assert bench_expert_parallel.main(["--json", str(out)]) == 0
    assert "needs 2 CUDA GPUs" in capsys.readouterr().out
    assert "needs 2 CUDA GPUs" in json.loads(out.read_text())["skipped"]


@pytest.mark.timeout(150)
def test_cpu_smoke_measures_every_phase_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "ep.json"
    assert bench_expert_parallel.main(["--cpu-smoke", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for phase in ("dispatch", "experts", "combine", "total", "speed-up of a step"):
        assert phase in table
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["config"]["backend"] == "gloo"
    for key in ("single_device_ms", "expert_parallel_slowest_rank_ms"):
        assert set(result[key]) == {"dispatch", "experts", "combine", "total"}
        assert all(v > 0 for v in result[key].values())
    ranks = result["ranks"]
    # every row sent is received somewhere; the output equals the one-device layer
    assert sum(sum(r["rows_sent"]) for r in ranks) == sum(r["rows_received"] for r in ranks) == 16 * 2
    assert all(r["max_rel_error"] < 1e-5 for r in ranks)


def test_rejects_sizes_that_do_not_split(capsys):
    with pytest.raises(SystemExit):
        bench_expert_parallel.main(["--tokens", "7"])
    assert "--tokens and --experts must be divisible by 2" in capsys.readouterr().err
