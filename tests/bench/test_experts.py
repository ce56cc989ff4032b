"""The experts section on CPU: every implementation checked against the float32/float64 reference on
tiny shapes, the reference catching planted bugs, a missing package or an out-of-memory implementation
reported in the row while the others still run, and the Liger-Kernel adapter's call contract."""

import sys
import types

import pytest
import torch

from moe_learn.bench import experts as X
from moe_learn.bench import run as R
from moe_learn.bench.cases import ExpertsCase
from moe_learn.ops.moe import moe_experts_torch

TINY = ExpertsCase("tiny", tokens=12, H=32, I=16, E=4, k=2)
ERRS = ("out", "out_train", "d_hidden", "d_weights", "d_gate_up", "d_down")


def torch_impl(name, fn=moe_experts_torch, **kw):
    return X.Implementation(name, name, lambda case, w1, w2: lambda h, ids, w: fn(h, ids, w, w1, w2), **kw)


def run(impls, case=TINY, seed=0):
    return X.bench_experts_case(case, impls, seed=seed, device="cpu", dtype=torch.float32, timed=False)


@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.is_available(), reason="runs ours through the CPU interpreter")
def test_cpu_smoke_every_available_implementation_agrees_with_the_reference():
    impls = X.implementations()
    assert [i.name for i in impls] == ["ours", "default", "liger", "eager"]
    row = run(impls)
    for name in ("ours", "default"):  # ours through Triton's interpreter, transformers' grouped_mm on CPU
        errs = row["rel_err"][name]
        assert set(errs) == set(ERRS), name
        assert max(errs.values()) < 1e-5, (name, errs)
    assert set(row["rel_err"]["eager"]) == {"out"}  # context, forward only
    assert max(row["rel_err"]["eager"].values()) < 1e-5
    assert "eager" not in row["training"]
    liger = next(i for i in impls if i.name == "liger")
    if liger.missing:
        assert row["forward"]["liger"] == row["training"]["liger"] == {"error": X.LIGER_MISSING}
        assert "not installed" in X.LIGER_MISSING
    assert row["flops_forward"] == 6 * 12 * 2 * 32 * 16 and row["name"] == "tiny T=12"
    assert {"ours", "default"} <= set(row["setup_s"]) and all(s >= 0 for s in row["setup_s"].values())
    line = R._experts_line({**row, "forward": {"ours": {"ms": 1.0, "peak_mib": 12.5}},
                            "training": {"ours": {"error": "x"}}})
    assert "forward ms: ours 1.000" in line and "training ms: ours -" in line and "first calls" in line
    assert "forward peak MiB: ours 12.5" in line and "training peak" not in line


def swapped_swiglu(h, ids, w, w1, w2):  # silu on the up half: the classic gate/up mix-up
    return moe_experts_torch(h, ids, w, torch.cat(w1.chunk(2, dim=1)[::-1], dim=1), w2)


def detached_weights(h, ids, w, w1, w2):  # no gradient reaches the router
    return moe_experts_torch(h, ids, w.detach(), w1, w2)


def test_the_reference_rejects_planted_bugs():
    row = run([torch_impl("right"), torch_impl("swapped", swapped_swiglu), torch_impl("no_router", detached_weights)])
    assert max(row["rel_err"]["right"].values()) < 1e-5
    assert min(row["rel_err"]["swapped"].values()) > 0.1
    # autograd refuses a gradient that never reaches the routing weights: reported, not crashed, not timed
    assert "not have been used in the graph" in row["rel_err"]["no_router"]["error"]
    assert "error" in row["forward"]["no_router"] and "error" in row["training"]["no_router"]


def test_a_wrong_gradient_shows_in_its_own_column():
    class HalfDown(torch.autograd.Function):  # forward right, down_proj's gradient halved
        @staticmethod
        def forward(ctx, w2):
            return w2.view_as(w2)

        @staticmethod
        def backward(ctx, g):
            return g * 0.5

    row = run([torch_impl("half", lambda h, ids, w, w1, w2: moe_experts_torch(h, ids, w, w1, HalfDown.apply(w2)))])
    errs = row["rel_err"]["half"]
    assert errs["d_down"] == pytest.approx(0.5, rel=1e-6)
    assert max(errs[k] for k in ERRS if k != "d_down") < 1e-5


def test_out_of_memory_and_crashes_are_reported_per_implementation_and_the_rest_still_runs():
    def oom(case, w1, w2):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 22.00 GiB")

    def broken(h, ids, w, w1, w2):
        raise RuntimeError("triton compilation failed\nlong trace")

    impls = [X.Implementation("oom", "oom", oom), torch_impl("broken", broken), torch_impl("fine"),
             X.Implementation("absent", "absent", None, missing="absent not installed")]
    row = run(impls)
    assert row["forward"]["oom"] == row["training"]["oom"] == {"error": "out of memory: CUDA out of memory. Tried to "
                                                               "allocate 22.00 GiB"}
    assert row["rel_err"]["broken"] == {"error": "RuntimeError: triton compilation failed"}
    assert row["forward"]["absent"] == {"error": "absent not installed"}
    assert max(row["rel_err"]["fine"].values()) < 1e-5


def test_a_case_whose_weights_do_not_fit_is_one_row_with_its_error(monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(X, "make_problem", no_memory)
    row = run([torch_impl("fine")])
    assert row["error"] == "out of memory: CUDA out of memory" and row["forward"] == {}


@pytest.mark.parametrize("model,cls", [("qwen3-30b-a3b", "Qwen3MoeExperts"), ("mixtral-8x7b", "MixtralExperts"),
                                       ("deepseek-v3", "DeepseekV3Experts"), ("gpt-oss-20b", "Qwen3MoeExperts")])
def test_transformers_default_is_the_models_own_module_holding_the_same_weights(model, cls):
    case = ExpertsCase(model, 4, H=8, I=4, E=3, k=2)
    w1, w2 = torch.nn.Parameter(torch.randn(3, 8, 8)), torch.nn.Parameter(torch.randn(3, 8, 4))
    module = X._transformers_module(case, "grouped_mm", w1, w2)
    assert type(module).__name__ == cls
    assert module.config._experts_implementation == "grouped_mm"
    assert module.gate_up_proj is w1 and module.down_proj is w2  # no copy: one weight set per case
    assert not any(p.is_meta for p in module.parameters())


def test_liger_adapter_follows_liger_kernels_contract(monkeypatch):
    """LigerFusedMoEFunction.apply(x, gate_up_proj, down_proj, top_k_index int32, top_k_weights) -> [T, H]."""
    calls = []

    class FakeLiger:
        @staticmethod
        def apply(x, gate_up_proj, down_proj, top_k_index, top_k_weights):
            assert top_k_index.dtype == torch.int32, "Liger takes int32 expert ids"
            assert gate_up_proj.shape[1] == 2 * down_proj.shape[2] and gate_up_proj.shape[2] == x.shape[1]
            calls.append(top_k_index.shape)
            return moe_experts_torch(x, top_k_index.long(), top_k_weights, gate_up_proj, down_proj)

    package, ops, module = (types.ModuleType(n) for n in ("liger_kernel", "liger_kernel.ops",
                                                          "liger_kernel.ops.fused_moe"))
    module.LigerFusedMoEFunction = FakeLiger
    package.ops, ops.fused_moe = ops, module
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.ops", ops)
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.fused_moe", module)
    liger = next(i for i in X.implementations(with_eager=False) if i.name == "liger")
    assert liger.missing is None and liger.ids_dtype == torch.int32
    row = run([liger])
    assert calls and max(row["rel_err"]["liger"].values()) < 1e-5


def test_a_package_that_fails_to_import_is_reported_not_raised(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake_import(name, *args):
        if name.startswith("liger_kernel"):
            raise RuntimeError("no NVIDIA driver\ntrace")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    liger = next(i for i in X.implementations() if i.name == "liger")
    assert liger.missing == "Liger-Kernel failed to import: no NVIDIA driver"


def test_the_reference_runs_in_full_float32_and_restores_the_callers_setting(monkeypatch):
    seen = []
    silu = X.F.silu
    monkeypatch.setattr(X.F, "silu", lambda t: seen.append(torch.get_float32_matmul_precision()) or silu(t))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 on a GPU
    try:
        row = run([torch_impl("right")], case=ExpertsCase("tiny", 6, H=8, I=4, E=3, k=2))
        # the implementation ran under the caller's setting, the reference (one silu per expert, last) in full
        assert seen[:-3] == ["high", "high"] and seen[-3:] == ["highest"] * 3
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    assert max(row["rel_err"]["right"].values()) < 1e-5
