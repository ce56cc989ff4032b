"""Every public function refuses bad input with a ValueError/TypeError that names the caller's argument.

One table, one child process for all of it: a segfault or an abort fails the case it
happened in (the child restarts after it) instead of killing pytest, and a deep
internal error (IndexError, RuntimeError, an error naming an argument the caller never
passed) fails like a wrong answer does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from moe_learn.device import ON_GPU
from tests.child_cases import outcomes_in_children, report_cases

# The table builds CPU tensors (run through Triton's interpreter): a CPU machine's test.
pytestmark = pytest.mark.skipif(ON_GPU, reason="the bad-input table is built from CPU tensors")



@dataclass(frozen=True)
class Bad:
    function: str
    argument: str  # the caller's argument the message must name (a regex)
    what: str
    call: Callable[[], object]
    xfail: str | None = None  # why it still fails, and whose file

    @property
    def id(self) -> str:
        return f"{self.function}-{self.what}"


def _x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _ids(T=4, k=2, E=4):
    return torch.rand(T, E).topk(k, dim=-1).indices


def _routing(T=4, k=2, E=4):
    from moe_learn import get_routing_indices

    return get_routing_indices(_ids(T, k, E), E)


def _moe(T=4, H=8, inter=3, E=4, k=2):
    """Valid experts arguments: hidden, ids, weights, gate_up_proj, down_proj."""
    return [_x(T, H), _ids(T, k, E), torch.rand(T, k), _x(E, 2 * inter, H), _x(E, H, inter)]


def _with(args, i, value):
    args = list(args)
    args[i] = value
    return args


def _cases() -> list[Bad]:
    import moe_learn as m
    from moe_learn.kernels import swiglu
    from moe_learn.kernels.route_ids import route_ids
    from moe_learn.layers.hf import fuse_moe_block
    from moe_learn.ops import routers

    T, H, E, k = 4, 8, 4, 2
    counts, gather = _routing(T, k, E)
    X, W = _x(T * k, H), _x(E, 6, H)
    ok_moe = _moe()
    topk = m.calculate_topk
    cases = [
        # calculate_topk
        Bad("calculate_topk", "gating_output", "a list", lambda: topk([[0.1, 0.2]], 1, False, False)),
        Bad("calculate_topk", "gating_output", "1-D", lambda: topk(_x(8), 2, False, False)),
        Bad("calculate_topk", "gating_output", "integers", lambda: topk(torch.ones(2, 4, dtype=torch.long), 2, False,
                                                                          False)),
        Bad("calculate_topk", "top_k", "zero", lambda: topk(_x(2, 4), 0, False, False)),
        Bad("calculate_topk", "top_k", "a float", lambda: topk(_x(2, 4), 1.5, False, False)),
        Bad("calculate_topk", "top_k", "True", lambda: topk(_x(2, 4), True, False, False)),
        Bad("calculate_topk", "top_k", "above E", lambda: topk(_x(2, 4), 5, False, False)),
        Bad("calculate_topk", "pre_act", "both flags", lambda: topk(_x(2, 4), 2, False, False, True, True)),
        # get_routing_indices
        Bad("get_routing_indices", "selected_experts", "floats", lambda: m.get_routing_indices(_x(4, 2), 4)),
        Bad("get_routing_indices", "selected_experts", "bools",
            lambda: m.get_routing_indices(torch.ones(4, 2, dtype=torch.bool), 4)),
        Bad("get_routing_indices", "selected_experts", "a list", lambda: m.get_routing_indices([[0, 1]], 4)),
        Bad("get_routing_indices", "selected_experts", "id = E", lambda: m.get_routing_indices(torch.tensor([[4]]), 4)),
        Bad("get_routing_indices", "selected_experts", "negative id",
            lambda: m.get_routing_indices(torch.tensor([[-1]]), 4)),
        Bad("get_routing_indices", "num_experts", "zero", lambda: m.get_routing_indices(_ids(), 0)),
        Bad("get_routing_indices", "num_experts", "a float", lambda: m.get_routing_indices(_ids(), 4.0)),
        # permute / unpermute / combine
        Bad("permute", "X", "a list", lambda: m.permute([[1.0]], gather, k)),
        Bad("permute", "topk", "zero", lambda: m.permute(_x(T, H), gather, 0)),
        Bad("permute", "gather_indices", "floats", lambda: m.permute(_x(T, H), gather.float(), k)),
        Bad("permute", "gather_indices", "too short", lambda: m.permute(_x(T, H), gather[:-1], k)),
        Bad("permute", "gather_indices", "not a permutation",
            lambda: m.permute(_x(T, H), torch.zeros_like(gather), k)),
        Bad("permute", "gather_indices", "out of range", lambda: m.permute(_x(T, H), gather + 1, k)),
        Bad("permute", "X.*gather_indices|gather_indices.*X", "two devices",
            lambda: m.permute(_x(T, H, device="meta"), gather, k)),
        Bad("unpermute", "gather_indices", "not a permutation",
            lambda: m.unpermute(_x(T * k, H), torch.zeros_like(gather))),
        Bad("unpermute", "X", "1-D", lambda: m.unpermute(_x(T * k), gather)),
        Bad("unpermute", "gather_indices", "2-D", lambda: m.unpermute(_x(T * k, H), gather.view(T, k))),
        Bad("combine", "Y_flat", "rows not T*k", lambda: m.combine(_x(T * k + 1, H), torch.rand(T, k))),
        Bad("combine", "topk_weights", "integers", lambda: m.combine(_x(T * k, H), torch.ones(T, k, dtype=torch.long))),
        Bad("combine", "topk_weights", "1-D", lambda: m.combine(_x(T * k, H), torch.rand(T * k))),
        # torch_grouped_gemm / torch_grouped_gemm_dw / swiglu
        Bad("torch_grouped_gemm", "X", "bools", lambda: m.torch_grouped_gemm(X.bool(), W.bool(), counts)),
        Bad("torch_grouped_gemm", "X", "integers", lambda: m.torch_grouped_gemm(X.long(), W, counts)),
        Bad("torch_grouped_gemm", "W", "2-D", lambda: m.torch_grouped_gemm(X, W[0], counts)),
        Bad("torch_grouped_gemm", "m_sizes", "floats", lambda: m.torch_grouped_gemm(X, W, counts.float())),
        Bad("torch_grouped_gemm", "m_sizes", "negative",
            lambda: m.torch_grouped_gemm(X, W, torch.tensor([-1, 9, 0, 0]))),
        Bad("torch_grouped_gemm", "m_sizes", "wrong sum", lambda: m.torch_grouped_gemm(X, W, counts + 1)),
        Bad("torch_grouped_gemm", "m_sizes", "wrong length", lambda: m.torch_grouped_gemm(X, W, counts[:-1])),
        Bad("torch_grouped_gemm", "X", "K mismatch", lambda: m.torch_grouped_gemm(_x(T * k, H + 1), W, counts)),
        Bad("torch_grouped_gemm", "X.*W", "dtype mismatch", lambda: m.torch_grouped_gemm(X.double(), W, counts)),
        Bad("torch_grouped_gemm_dw", "m_sizes", "a list", lambda: m.torch_grouped_gemm_dw(X, _x(T * k, 6), [2] * 4)),
        Bad("torch_grouped_gemm_dw", "gather_indices", "missing with permute_x",
            lambda: m.torch_grouped_gemm_dw(_x(T, H), _x(T * k, 6), counts, topk=k, permute_x=True)),
        Bad("torch_grouped_gemm_dw", "X", "rows", lambda: m.torch_grouped_gemm_dw(_x(3, H), _x(T * k, 6), counts)),
        Bad("swiglu", "gate_up", "odd last dim", lambda: m.swiglu(_x(3, 5))),
        Bad("swiglu", "gate_up", "a list", lambda: m.swiglu([1.0, 2.0])),
        # the expert layers
        Bad("moe_experts_torch", "topk_ids", "floats", lambda: m.moe_experts_torch(*_with(ok_moe, 1, _x(T, k)))),
        Bad("moe_experts_torch", "topk_ids", "id = E",
            lambda: m.moe_experts_torch(*_with(ok_moe, 1, torch.full((T, k), E)))),
        Bad("moe_experts_torch", "topk_weights", "shape",
            lambda: m.moe_experts_torch(*_with(ok_moe, 2, torch.rand(T, 3)))),
        Bad("moe_experts_torch", "gate_up_proj", "layout", lambda: m.moe_experts_torch(
            *_with(ok_moe, 3, ok_moe[3].transpose(1, 2)))),
        Bad("moe_experts_torch", "down_proj", "dtype",
            lambda: m.moe_experts_torch(*_with(ok_moe, 4, ok_moe[4].double()))),
        Bad("moe_experts", "backend", "unknown", lambda: m.moe_experts(*ok_moe, backend="cuda")),
        Bad("moe_experts", "topk_ids", "id = E", lambda: m.moe_experts(*_with(ok_moe, 1, torch.full((T, k), E)))),
        Bad("moe_experts", "topk_ids", "negative", lambda: m.moe_experts(*_with(ok_moe, 1, torch.full((T, k), -1)))),
        Bad("fused_moe_experts", "topk_ids", "floats", lambda: m.fused_moe_experts(*_with(ok_moe, 1, _x(T, k)))),
        Bad("fused_moe_experts", "topk_ids", "id = E",
            lambda: m.fused_moe_experts(*_with(ok_moe, 1, torch.full((T, k), E)))),
        Bad("fused_moe_forward", "router_weight", "shape",
            lambda: m.fused_moe_forward(ok_moe[0], _x(E, H + 1), ok_moe[3], ok_moe[4], k)),
        Bad("fused_moe_forward", "top_k", "above E",
            lambda: m.fused_moe_forward(ok_moe[0], _x(E, H), ok_moe[3], ok_moe[4], E + 1)),
        Bad("fused_moe_forward", "top_k", "zero", lambda: m.fused_moe_forward(ok_moe[0], _x(E, H), ok_moe[3], ok_moe[4],
                                                                              0)),
        Bad("fused_moe_forward", "hidden_states", "1-D",
            lambda: m.fused_moe_forward(_x(H), _x(E, H), ok_moe[3], ok_moe[4], k)),
        Bad("moe_forward_torch", "router_weight", "shape",
            lambda: m.moe_forward_torch(ok_moe[0], _x(E + 1, H), ok_moe[3], ok_moe[4], k)),
        Bad("moe_forward_torch", "top_k", "zero", lambda: m.moe_forward_torch(ok_moe[0], _x(E, H), ok_moe[3], ok_moe[4],
                                                                              0)),
        # grouped_gemm (validate on: CPU tensors)
        Bad("grouped_gemm", "kernel", "'bogus' at M = 0",
            lambda: m.grouped_gemm(_x(0, H), W, torch.zeros(E, dtype=torch.long), kernel="bogus")),
        Bad("grouped_gemm", "X", "float64", lambda: m.grouped_gemm(X.double(), W.double(), counts)),
        Bad("grouped_gemm", "gather_indices", "not a permutation (permute_y)",
            lambda: m.grouped_gemm(X, W, counts, gather_indices=torch.zeros_like(gather), permute_y=True)),
        Bad("grouped_gemm", "gather_indices", "repeated (permute_x)", lambda: m.grouped_gemm(
            _x(T, H), W, counts, gather_indices=torch.zeros_like(gather), topk=k, permute_x=True)),
        Bad("grouped_gemm", "gather_indices", "missing with permute_x",
            lambda: m.grouped_gemm(_x(T, H), W, counts, topk=k, permute_x=True)),
        Bad("grouped_gemm", "topk_weights", "without permute_y",
            lambda: m.grouped_gemm(X, W, counts, topk_weights=torch.rand(T, k))),
        Bad("grouped_gemm", "m_sizes", "negative", lambda: m.grouped_gemm(X, W, torch.tensor([-1, 9, 0, 0]))),
        Bad("grouped_gemm", "m_sizes", "wrong sum", lambda: m.grouped_gemm(X, W, counts + 1)),
        Bad("grouped_gemm", "m_sizes", "floats", lambda: m.grouped_gemm(X, W, counts.float())),
        Bad("grouped_gemm", "config", "BLOCK_M = 10", lambda: m.grouped_gemm(X, W, counts, config={"BLOCK_M": 10})),
        Bad("grouped_gemm", "config", "unknown key", lambda: m.grouped_gemm(X, W, counts, config={"BLOK_M": 16})),
        Bad("grouped_gemm", "out", "shape", lambda: m.grouped_gemm(X, W, counts, out=_x(T * k, 7))),
        Bad("grouped_gemm", "topk", "zero", lambda: m.grouped_gemm(X, W, counts, topk=0)),
        Bad("grouped_gemm_dw", "m_sizes", "a list", lambda: m.grouped_gemm_dw(X, _x(T * k, 6), [2] * 4)),
        Bad("grouped_gemm_dw", "m_sizes", "floats", lambda: m.grouped_gemm_dw(X, _x(T * k, 6), counts.float())),
        Bad("grouped_gemm_dw", "m_sizes", "wrong sum", lambda: m.grouped_gemm_dw(X, _x(T * k, 6), counts + 1)),
        Bad("grouped_gemm_dw", "gather_indices", "not a permutation", lambda: m.grouped_gemm_dw(
            _x(T, H), _x(T * k, 6), counts, gather_indices=torch.zeros_like(gather), topk=k, permute_x=True)),
        Bad("grouped_gemm_dw", "dY", "dtype", lambda: m.grouped_gemm_dw(X, _x(T * k, 6).double(), counts)),
        Bad("grouped_gemm_dw", "config", "BLOCK_K = 8", lambda: m.grouped_gemm_dw(X, _x(T * k, 6), counts,
                                                                                   config={"BLOCK_K": 8})),
        # the weighted SwiGLU of training (kernels/swiglu.py)
        Bad("weighted_swiglu", "gate_up", "odd columns",
            lambda: swiglu.weighted_swiglu(_x(T * k, 5), _x(T, k), gather)),
        Bad("weighted_swiglu", "gate_up", "integers",
            lambda: swiglu.weighted_swiglu(torch.ones(T * k, 6, dtype=torch.long), _x(T, k), gather)),
        Bad("weighted_swiglu", "topk_weights", "integers",
            lambda: swiglu.weighted_swiglu(_x(T * k, 6), torch.ones(T, k, dtype=torch.long), gather)),
        Bad("weighted_swiglu", "gather_indices", "floats",
            lambda: swiglu.weighted_swiglu(_x(T * k, 6), _x(T, k), gather.float())),
        Bad("weighted_swiglu", "gather_indices", "too short",
            lambda: swiglu.weighted_swiglu(_x(T * k, 6), _x(T, k), gather[:-1])),
        Bad("weighted_swiglu", "gate_up", "a list", lambda: swiglu.weighted_swiglu([[1.0, 2.0]], _x(T, k), gather)),
        Bad("weighted_swiglu", "device", "two devices",
            lambda: swiglu.weighted_swiglu(_x(T * k, 6, device="meta"), _x(T, k), gather)),
        Bad("weighted_swiglu_backward", "d_h", "wrong shape",
            lambda: swiglu.weighted_swiglu_backward(_x(T * k, 6), _x(T, k), gather, _x(T * k, 2))),
        Bad("weighted_swiglu_backward", "d_h", "integers", lambda: swiglu.weighted_swiglu_backward(
            _x(T * k, 6), _x(T, k), gather, torch.ones(T * k, 3, dtype=torch.long))),
        # training's GEMMs with the SwiGLU in their epilogues (kernels/swiglu.py)
        Bad("gemm_weighted_swiglu", "W", "odd outputs", lambda: swiglu.gemm_weighted_swiglu(
            _x(T, H), _x(E, 5, H), counts, gather, _x(T, k), topk=k)),
        Bad("gemm_weighted_swiglu", "topk_weights", "too few", lambda: swiglu.gemm_weighted_swiglu(
            _x(T, H), _x(E, 6, H), counts, gather, _x(T, 1), topk=k)),
        Bad("gemm_weighted_swiglu", "X", "float64", lambda: swiglu.gemm_weighted_swiglu(
            _x(T, H).double(), _x(E, 6, H).double(), counts, gather, _x(T, k), topk=k)),
        Bad("gemm_weighted_swiglu", "gather_indices", "too short", lambda: swiglu.gemm_weighted_swiglu(
            _x(T, H), _x(E, 6, H), counts, gather[:-1], _x(T, k), topk=k)),
        Bad("gemm_weighted_swiglu", "not differentiable", "requires grad", lambda: swiglu.gemm_weighted_swiglu(
            _x(T, H).requires_grad_(), _x(E, 6, H), counts, gather, _x(T, k), topk=k)),
        Bad("gemm_swiglu_backward", "d_out", "wrong width", lambda: swiglu.gemm_swiglu_backward(
            _x(T, 3), _x(E, H, 3), counts, gather, _x(T * k, 6), _x(T, k), topk=k, transpose=False)),
        Bad("gemm_swiglu_backward", "gate_up", "wrong shape", lambda: swiglu.gemm_swiglu_backward(
            _x(T, H), _x(E, H, 3), counts, gather, _x(T * k, 8), _x(T, k), topk=k, transpose=False)),
        Bad("gemm_swiglu_backward", "gate_up", "a list", lambda: swiglu.gemm_swiglu_backward(
            _x(T, H), _x(E, H, 3), counts, gather, [[1.0]], _x(T, k), topk=k, transpose=False)),
        Bad("gemm_swiglu_backward", "topk_weights", "integers", lambda: swiglu.gemm_swiglu_backward(
            _x(T, H), _x(E, H, 3), counts, gather, _x(T * k, 6), torch.ones(T, k, dtype=torch.long), topk=k,
            transpose=False)),
        Bad("gemm_swiglu_backward", "m_sizes", "floats", lambda: swiglu.gemm_swiglu_backward(
            _x(T, H), _x(E, H, 3), counts.float(), gather, _x(T * k, 6), _x(T, k), topk=k, transpose=False)),
        # route_ids: the layers' one-launch routing of given ids
        Bad("route_ids", "topk_ids", "floats", lambda: route_ids(_x(T, k), torch.rand(T, k), E)),
        Bad("route_ids", "topk_weights", "integers", lambda: route_ids(_ids(), torch.ones(T, k, dtype=torch.long), E)),
        Bad("route_ids", "topk_ids.*topk_weights", "shapes differ", lambda: route_ids(_ids(), torch.rand(T, 1), E)),
        Bad("route_ids", "num_experts", "zero", lambda: route_ids(_ids(), torch.rand(T, k), 0)),
        Bad("route_ids", "topk_ids", "a list", lambda: route_ids([[0, 1]], torch.rand(1, 2), E)),
        Bad("route_ids", "MAX_SLOTS", "too many ids", lambda: route_ids(torch.zeros(4097, 1, dtype=torch.long),
                                                                        torch.rand(4097, 1), E)),
        # fused_routing
        Bad("fused_routing", "router_logits", "float64", lambda: m.fused_routing(_x(4, 8).double(), 2)),
        Bad("fused_routing", "router_logits", "integers",
            lambda: m.fused_routing(torch.ones(4, 8, dtype=torch.long), 2)),
        Bad("fused_routing", "router_logits", "3-D", lambda: m.fused_routing(_x(2, 4, 8), 2)),
        Bad("fused_routing", "top_k", "above E", lambda: m.fused_routing(_x(4, 8), 9)),
        Bad("fused_routing", "top_k", "a float", lambda: m.fused_routing(_x(4, 8), 1.5)),
        Bad("fused_routing", "cooperative", "True on the CPU", lambda: m.fused_routing(_x(4, 8), 2, cooperative=True)),
        # the routers
        Bad("dense_router_scores", "topk_ids", "id = E",
            lambda: routers.dense_router_scores(torch.rand(T, k), torch.full((T, k), E), E)),
        Bad("dense_router_scores", "topk_ids", "floats",
            lambda: routers.dense_router_scores(torch.rand(T, k), _x(T, k), E)),
        Bad("qwen3_moe_router", "weight", "[H, E] layout", lambda: routers.qwen3_moe_router(_x(T, H), _x(H, E), k)),
        Bad("qwen3_moe_router", "top_k", "above E", lambda: routers.qwen3_moe_router(_x(T, H), _x(E, H), E + 1)),
        Bad("llama4_router", "hidden_states", "integers",
            lambda: routers.llama4_router(torch.ones(T, H, dtype=torch.long), _x(E, H), 1)),
        Bad("gpt_oss_router", "bias", "length", lambda: routers.gpt_oss_router(_x(T, H), _x(E, H), _x(E + 1), k)),
        Bad("deepseek_v3_router", "n_group", "not dividing E", lambda: routers.deepseek_v3_router(
            _x(T, H), _x(E, H), _x(E), k, n_group=3, topk_group=1)),
        Bad("deepseek_v3_router", "e_score_correction_bias", "length", lambda: routers.deepseek_v3_router(
            _x(T, H), _x(E, H), _x(E + 1), k, n_group=2, topk_group=1)),
        # the blocks
        Bad("FusedMoEBlock", "top_k", "1.5", lambda: m.FusedMoEBlock(H, 4, E, 1.5)),
        Bad("MoEBlock", "top_k", "above num_experts", lambda: m.MoEBlock(H, 4, E, E + 1)),
        Bad("MoEBlock", "hidden_size", "zero", lambda: m.MoEBlock(0, 4, E, k)),
        Bad("MoEBlock", "routing", "unknown", lambda: m.MoEBlock(H, 4, E, k, routing="relu")),
        Bad("MoEBlock", "renormalize", "a string", lambda: m.MoEBlock(H, 4, E, k, renormalize="yes")),
        Bad("TorchMoEBlock", "backend", "unknown", lambda: m.TorchMoEBlock(H, 4, E, k, backend="cuda")),
        Bad("MoEBlock.forward", "hidden_states", "wrong hidden size", lambda: m.MoEBlock(H, 4, E, k)(_x(T, H + 1))),
        Bad("MoEBlock.forward", "hidden_states", "1-D", lambda: m.MoEBlock(H, 4, E, k)(_x(H))),
        Bad("MoEBlock.from_hf", "Linear", "an nn.Linear", lambda: m.MoEBlock.from_hf(torch.nn.Linear(4, 4))),
        Bad("load_balancing_loss", "router_logits", "1-D", lambda: m.load_balancing_loss(_x(E), _ids(), E)),
        Bad("load_balancing_loss", "num_experts", "zero", lambda: m.load_balancing_loss(_x(T, E), _ids(), 0)),
        Bad("load_balancing_loss", "topk_ids", "floats", lambda: m.load_balancing_loss(_x(T, E), _x(T, k), E)),
        Bad("load_balancing_loss", "topk_ids", "id = E",
            lambda: m.load_balancing_loss(_x(T, E), torch.full((T, k), E), E)),
        # transformers integration
        Bad("patch_model", "model", "not a module", lambda: m.patch_model("qwen3")),
        Bad("patch_model", "MoE block", "no MoE block",
            lambda: m.patch_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))),
        Bad("patch_model", "backend", "unknown", lambda: m.patch_model(torch.nn.Linear(2, 2), backend="cuda")),
        Bad("fuse_moe_block", "Linear", "an nn.Linear", lambda: fuse_moe_block(torch.nn.Linear(2, 2))),
    ]
    return cases


def run_child(start: int) -> None:
    """The child's side: from case ``start`` on, one JSON line per case."""
    import moe_learn  # noqa: F401  (the interpreter on CPU)

    torch.manual_seed(0)
    report_cases([case.call for case in _cases()], start)


@pytest.fixture(scope="module")
def outcomes() -> dict[int, dict]:
    """Run the table in a child; after a crash, note it and go on from the next case."""
    return outcomes_in_children("from tests.test_bad_inputs import run_child; run_child({start})", len(_cases()))


CASES = _cases()


@pytest.mark.parametrize(
    "index",
    [pytest.param(i, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
     for i, c in enumerate(CASES)],
)
def test_bad_input_is_refused_by_name(index, outcomes):
    case = CASES[index]
    outcome = outcomes.get(index, {"type": "missing", "message": "no outcome recorded"})
    assert outcome["type"] in ("ValueError", "TypeError"), (
        f"{case.function} with {case.argument} {case.what}: {outcome['type']}: {outcome['message']}"
    )
    assert re.search(case.argument, outcome["message"]), (
        f"{case.function} with {case.argument} {case.what}: the message does not name {case.argument!r}: "
        f"{outcome['message']}"
    )
