"""The benchmark command: its sections and plan, its time budget, its arithmetic, its CPU behaviour."""

import pytest
import torch

from moe_learn.bench import run as bench
from moe_learn.bench.cases import Case
from moe_learn.bench.experts import Implementation


def impls(liger=True, eager=True):
    out = [Implementation("ours", "ours", None), Implementation("default", "default", None),
           Implementation("liger", "liger", None, missing=None if liger else "Liger-Kernel not installed")]
    return out + ([Implementation("eager", "eager", None, training=False)] if eager else [])


def test_the_default_plan_is_issue_15s_cases():
    plan = bench.make_plan(bench.SECTIONS)
    assert (len(plan["experts"]), len(plan["decode"]), len(plan["gemm"]), plan["routing"]) == (7, 32, 16, True)


@pytest.mark.parametrize("argv,expected", [
    ({"sections": ["decode"]}, (0, 32, 0, False)),
    ({"sections": bench.SECTIONS, "models": ["deepseek-v3"]}, (1, 8, 0, True)),  # not a prefill model
    ({"sections": bench.SECTIONS, "tokens": [8192]}, (3, 0, 8, True)),
    ({"sections": ["experts", "prefill"], "models": ["mixtral-8x7b"], "tokens": [1024]}, (1, 0, 2, False)),
])
def test_only_models_and_tokens_pick_cases(argv, expected):
    plan = bench.make_plan(argv["sections"], argv.get("models"), argv.get("tokens"))
    assert (len(plan["experts"]), len(plan["decode"]), len(plan["gemm"]), plan["routing"]) == expected


def test_the_whole_default_run_is_estimated_with_each_implementations_setup():
    plan = bench.make_plan(bench.SECTIONS)
    estimate = bench.estimate_seconds(plan, impls(), rest=1.5)
    # experts: 4 forward + 3 fwd+bwd timings x 7; prefill 4 x 16; routing 3; ceilings 2 x 2; decode: one rest a case
    assert estimate["rests"] == 7 * 7 + 16 * 4 + 3 + 4 + 32
    # the seven experts cases' setup dominates: ours ~45 s and Liger-Kernel's autotuning ~270 s each
    # (~530 s at DeepSeek-V3's shape)
    assert 44 * 60 < estimate["seconds"] < 50 * 60
    without_liger = bench.estimate_seconds(plan, impls(liger=False), rest=1.5)["seconds"]
    assert estimate["seconds"] - without_liger > 6 * bench.EXPERTS_SETUP_S["liger"] + 530
    deepseek = bench.make_plan(["experts"], ["deepseek-v3"], [4096])
    qwen = bench.make_plan(["experts"], ["qwen3-30b-a3b"], [8192])
    assert (bench.estimate_seconds(deepseek, impls(), rest=0.5)["seconds"]
            - bench.estimate_seconds(qwen, impls(), rest=0.5)["seconds"]) == pytest.approx(530 - 270)
    # each rest is counted once: the estimate moves by exactly rests x the rest
    assert bench.estimate_seconds(plan, impls(), rest=0.0)["seconds"] == pytest.approx(
        estimate["seconds"] - 1.5 * estimate["rests"])
    # a missing baseline is not timed, so costs nothing; --no-loop drops the loops' timings
    fewer = bench.estimate_seconds(bench.make_plan(bench.SECTIONS, with_loop=False), impls(liger=False, eager=False),
                                   rest=1.5)
    assert fewer["rests"] == estimate["rests"] - 7 * 3 - 16


def test_decode_floor_reads_only_the_experts_that_got_tokens():
    case = Case("deepseek-v3", "gate_up", 1, M=8, N=4096, K=7168, E=256)
    row = {**vars(case), "name": case.name, "experts_hit": 8}
    got = bench.with_decode_floor(row, {"copy_tbs": 2.0, "matmul_tflops": 800.0})
    moved = 2 * (8 * 7168 + 8 * 4096 * 7168 + 8 * 4096)
    assert got["bytes"] == moved and got["floor_us"] == pytest.approx(moved / 2e12 * 1e6)
    assert bench.with_decode_floor({"error": "out of memory"}, {"copy_tbs": 2.0}) == {"error": "out of memory"}


def test_roofline_floor_is_the_higher_of_compute_and_memory():
    case = Case("m", "down", 4, M=1000, N=2000, K=3000, E=4)
    row = bench.with_roofline({"ms": {"ours": 1.0}}, case, {"matmul_tflops": 100.0, "copy_tbs": 1.0})
    floor = max(case.flops / 100e12, case.bytes() / 1e12)
    assert row["floor_ms"] == pytest.approx(floor * 1e3) and row["frac_roofline"]["ours"] == pytest.approx(floor / 1e-3)
    assert bench.best_peaks([{"a": 1.0, "b": 5.0}, {"a": 2.0, "b": 4.0}]) == {"a": 2.0, "b": 5.0}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU prints")
def test_without_a_gpu_it_says_so_and_exits_cleanly(capsys, tmp_path):
    assert bench.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "No CUDA GPU here" in out and len(out.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir()), "nothing is written without a GPU"


def test_a_negative_rest_is_refused_naming_the_argument(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--rest", "-1"])
    assert "--rest must be 0 or more seconds" in capsys.readouterr().err


def test_only_names_the_sections(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--only", "moe"])
    assert "invalid choice: 'moe'" in capsys.readouterr().err


def test_a_whole_run_with_fake_measurements_writes_every_section_and_survives_failures(monkeypatch, tmp_path, capsys):
    """main's orchestration on CPU: the measurements are faked, the failures real exceptions."""
    import json
    from dataclasses import asdict

    def experts_case(case, impls, seed, progress=False):
        if case.model == "deepseek-v3":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 15.00 GiB")
        ms = {"ours": {"ms": 1.0, "tflops": 400.0}, "default": {"ms": 1.2, "tflops": 300.0}}
        return {**asdict(case), "name": case.name, "forward": ms, "training": ms, "rel_err": {}}

    def decode_case(case, W, seed):
        if case.tokens == 64:
            raise RuntimeError("CUDA graph capture failed")
        us = {"loop": 10.0, "single": 20.0, "graph": 5.0}
        return {**asdict(case), "name": case.name, "experts_hit": min(case.M, case.E), "rel_err_vs_grouped_mm": 0.0,
                "rel_err_vs_fp32": 1e-3, "us": {"ours": us, "grouped_mm": {k: 0.9 * v for k, v in us.items()}}}

    def weights(case):
        if case.model == "mixtral-8x7b":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.75 GiB")
        return torch.zeros(1)

    def gemm_case(case, W, seed, with_loop):
        ms = {"ours": 1.0, "grouped_mm": 1.1, "dense": 0.9}
        return {**asdict(case), "name": case.name, "rel_err_vs_grouped_mm": 0.0, "rel_err_vs_fp32": 1e-3, "ms": ms,
                "tflops": {k: case.flops / v / 1e9 for k, v in ms.items()}}

    def routing():
        raise RuntimeError("no fused routing here")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(bench.timing.time, "sleep", lambda s: None)
    monkeypatch.setattr(bench, "environment", lambda: {"gpu": "Fake GPU", "torch": "t", "triton": "t", "cuda": "c",
                                                       "python": "p", "date": "d", "transformers": "5",
                                                       "liger_kernel": "not installed"})
    monkeypatch.setattr(bench, "implementations", lambda with_eager: impls(liger=False, eager=with_eager))
    monkeypatch.setattr(bench, "measure_peaks", lambda: {"matmul_tflops": 800.0, "copy_tbs": 3.0})
    monkeypatch.setattr(bench, "bench_experts_case", experts_case)
    monkeypatch.setattr(bench, "bench_decode_case", decode_case)
    monkeypatch.setattr(bench, "gemm_weights", weights)
    monkeypatch.setattr(bench, "bench_gemm_case", gemm_case)
    monkeypatch.setattr(bench, "bench_routing", routing)
    assert bench.main(["--out", str(tmp_path), "--rest", "0"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["command"] == "python -m moe_learn bench --out " + str(tmp_path) + " --rest 0"
    assert result["experts"][-1]["error"] == "out of memory: CUDA out of memory. Tried to allocate 15.00 GiB"
    assert len(result["decode"]) == 32 and len(result["gemm"]) == 16
    decode = {r["name"]: r for r in result["decode"]}
    assert decode["qwen3-30b-a3b down T=64"]["error"] == "RuntimeError: CUDA graph capture failed"
    assert decode["mixtral-8x7b gate_up T=1"]["error"].startswith("out of memory")
    assert decode["qwen3-30b-a3b down T=8"]["floor_us"] > 0
    assert [r["name"] for r in result["gemm"] if "error" in r] == [f"mixtral-8x7b {g} T={t}" for t in (1024, 8192)
                                                                   for g in ("gate_up", "down")]
    assert result["routing"] == {"error": "RuntimeError: no fused routing here"}
    assert len(result["targets"]) == 13 and result["elapsed_s"] > 0 and result["estimate_s"] > 0
    assert {"experts_summary", "decode_summary", "gemm_summary", "peaks"} <= set(result)
    assert (tmp_path / "results.md").read_text() in capsys.readouterr().out
    assert (tmp_path / "roofline.png").stat().st_size > 0
