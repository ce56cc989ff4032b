"""Expert parallelism: the pure planning steps in one process, the real layer in 2 and 4
gloo processes (outputs and gradients vs the single-process layer, ragged routing, bad
input that must make every rank raise instead of hanging)."""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.distributed as dist

from moe_learn import calculate_topk, moe_experts_torch
from moe_learn.device import DEVICE
from moe_learn.layers.expert_parallel import (
    ExpertParallelMoE,
    dispatch_plan,
    expert_parallel_moe,
    experts_per_rank,
    local_expert_order,
    local_expert_sizes,
    local_expert_slice,
    make_local_experts_fn,
    simulate_expert_parallel,
    torch_local_experts,
    unpermute_combine,
)
from moe_learn.layers.launch import WorkerError, launch
from moe_learn.ops.grouped_gemm import torch_grouped_gemm

# ------------------------------- pure steps ---------------------------------------


def test_experts_per_rank_and_slices():
    assert experts_per_rank(8, 4) == 2
    assert [local_expert_slice(8, r, 4) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    with pytest.raises(ValueError, match="num_experts=6 does not divide evenly over world_size=4"):
        experts_per_rank(6, 4)
    with pytest.raises(ValueError, match="rank must be an int in"):
        local_expert_slice(8, 4, 4)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        experts_per_rank(8, 0)


def test_dispatch_plan_counts_rows_per_rank_in_expert_order():
    # 4 experts on 2 ranks: experts 0,1 live on rank 0, experts 2,3 on rank 1.
    topk_ids = torch.tensor([[3, 0], [1, 3], [2, 1]])
    plan = dispatch_plan(topk_ids, num_experts=4, world_size=2)
    assert plan.expert_counts.tolist() == [1, 2, 1, 2]
    assert plan.send_counts.tolist() == [3, 3]
    # flat (token, slot) ids: expert 0 <- 1; expert 1 <- 2, 5; expert 2 <- 4; expert 3 <- 0, 3 (stable)
    assert plan.gather_indices.tolist() == [1, 2, 5, 4, 0, 3]


def test_dispatch_plan_all_rows_to_one_rank_and_no_tokens():
    plan = dispatch_plan(torch.tensor([[5, 4], [4, 5]]), num_experts=6, world_size=3)
    assert plan.send_counts.tolist() == [0, 0, 4]
    empty = dispatch_plan(torch.empty(0, 2, dtype=torch.int64), num_experts=6, world_size=3)
    assert empty.send_counts.tolist() == [0, 0, 0] and empty.gather_indices.numel() == 0


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(topk_ids=torch.tensor([[0.0, 1.0]])), "topk_ids must hold integer indices"),
        (dict(topk_ids=torch.tensor([0, 1])), "topk_ids must be 2-D"),
        (dict(num_experts=5), "num_experts=5 does not divide evenly"),
        (dict(topk_ids=torch.tensor([[0, 4]])), "selected_experts holds 4, outside"),
    ],
)
def test_dispatch_plan_rejects_bad_input(bad, match):
    args = dict(topk_ids=torch.tensor([[0, 1]]), num_experts=4, world_size=2) | bad
    with pytest.raises((ValueError, TypeError), match=match):
        dispatch_plan(**args)


def test_local_expert_sizes_and_order():
    # rank 0 sent 2 rows to local expert 0 and 1 to expert 1; rank 1 sent 0 and 2.
    recv_counts = torch.tensor([[2, 1], [0, 2]])
    assert local_expert_sizes(recv_counts).tolist() == [2, 3]
    # received rows: [r0e0, r0e0, r0e1, r1e1, r1e1] -> expert 0 first, source order kept
    assert local_expert_order(recv_counts).tolist() == [0, 1, 2, 3, 4]
    recv_counts = torch.tensor([[0, 2], [3, 0], [1, 1]])
    # received: r0e1 r0e1 | r1e0 r1e0 r1e0 | r2e0 r2e1
    assert local_expert_order(recv_counts).tolist() == [2, 3, 4, 5, 0, 1, 6]
    assert local_expert_order(torch.zeros(2, 3, dtype=torch.int64)).numel() == 0
    with pytest.raises(ValueError, match="recv_counts must be non-negative"):
        local_expert_order(torch.tensor([[1, -1]]))
    with pytest.raises(TypeError, match="recv_counts must hold integer"):
        local_expert_sizes(torch.ones(2, 2))


def test_combine_weights_and_restores_token_order():
    topk_ids = torch.tensor([[1, 0], [0, 1]])
    plan = dispatch_plan(topk_ids, num_experts=2, world_size=1)
    y_sorted = torch.tensor([[10.0], [20.0], [30.0], [40.0]])  # rows of flat slots 1, 2, 0, 3
    weights = torch.tensor([[0.5, 0.25], [1.0, 2.0]])
    out = unpermute_combine(y_sorted, plan.gather_indices, weights)
    assert out.tolist() == [[0.5 * 30 + 0.25 * 10], [1.0 * 20 + 2.0 * 40]]
    with pytest.raises(ValueError, match="y_sorted has 3 rows but"):
        unpermute_combine(y_sorted[:3], plan.gather_indices, weights)


@pytest.mark.parametrize("world_size, num_experts, top_k", [(1, 4, 2), (2, 4, 1), (3, 6, 2), (4, 8, 3)])
def test_simulated_expert_parallel_matches_single_process(world_size, num_experts, top_k):
    tokens = [3, 0, 7, 1][:world_size]  # ragged, rank 1 without tokens
    xs = [torch.randn(t, 6, dtype=torch.float64, requires_grad=True) for t in tokens]
    routing = [calculate_topk(torch.randn(t, num_experts, dtype=torch.float64), top_k, False, True) for t in tokens]
    ws = [w.requires_grad_() for w, _ in routing]
    ids = [i for _, i in routing]
    gate_up = torch.randn(num_experts, 8, 6, dtype=torch.float64, requires_grad=True)
    down = torch.randn(num_experts, 6, 4, dtype=torch.float64, requires_grad=True)
    outs = simulate_expert_parallel(xs, ids, ws, gate_up, down)
    ref = moe_experts_torch(torch.cat(xs), torch.cat(ids), torch.cat(ws), gate_up, down)
    torch.testing.assert_close(torch.cat(outs), ref)
    leaves = [*xs, *ws, gate_up, down]
    grads = torch.autograd.grad(torch.cat(outs).square().sum(), leaves, allow_unused=True, materialize_grads=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_local_experts_fn_hook_takes_any_grouped_gemm():
    calls = []

    def counting_gemm(X, W, m_sizes):
        calls.append(tuple(W.shape))
        return torch_grouped_gemm(X, W, m_sizes)

    x, sizes = torch.randn(5, 6), torch.tensor([2, 3])
    gate_up, down = torch.randn(2, 8, 6), torch.randn(2, 6, 4)
    got = make_local_experts_fn(counting_gemm)(x, gate_up, down, sizes)
    torch.testing.assert_close(got, torch_local_experts(x, gate_up, down, sizes))
    assert calls == [(2, 8, 6), (2, 6, 4)]


def test_triton_local_experts_train():
    """With the Triton grouped GEMM as the local experts, every gradient still flows (and is right)."""
    from moe_learn import grouped_gemm

    tokens, num_experts, top_k = [4, 0, 5], 6, 2
    xs = [torch.randn(t, 16, device=DEVICE, requires_grad=True) for t in tokens]
    routing = [calculate_topk(torch.randn(t, num_experts, device=DEVICE), top_k, False, True) for t in tokens]
    ws = [w.requires_grad_() for w, _ in routing]
    ids = [i for _, i in routing]
    gate_up = (torch.randn(num_experts, 16, 16, device=DEVICE) / 4).requires_grad_()
    down = (torch.randn(num_experts, 16, 8, device=DEVICE) / 3).requires_grad_()
    outs = simulate_expert_parallel(xs, ids, ws, gate_up, down, local_experts_fn=make_local_experts_fn(grouped_gemm))
    leaves = [*xs, *ws, gate_up, down]
    grads = torch.autograd.grad(torch.cat(outs).square().sum(), leaves, allow_unused=True)
    assert all(g is not None for g, t in zip(grads, leaves, strict=True) if t.numel()), "a gradient was dropped"
    ref = moe_experts_torch(torch.cat(xs), torch.cat(ids), torch.cat(ws), gate_up, down)
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves, allow_unused=True, materialize_grads=True)
    for got, want in zip(grads, ref_grads, strict=True):
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_layer_refuses_to_run_without_a_process_group():
    assert not dist.is_initialized()
    x = torch.randn(2, 4)
    ids, w = torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1)
    with pytest.raises(ValueError, match="call torch.distributed.init_process_group first"):
        expert_parallel_moe(x, ids, w, torch.randn(2, 4, 4), torch.randn(2, 4, 2), num_experts=2)


# ------------------------- real processes (gloo, CPU) -------------------------------
# The workers run every scenario in one process group per world size (starting
# processes is the slow part) and report numbers; the tests below judge them.

H, I = 8, 4


def _problem(world_size, tokens, num_experts, top_k, dtype, seed, only_experts=None):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(t, H, generator=gen, dtype=dtype) for t in tokens]
    if only_experts is None:
        routing = [
            calculate_topk(torch.randn(t, num_experts, generator=gen, dtype=dtype), top_k, False, True) for t in tokens
        ]
    else:  # every token picks top_k distinct experts among only_experts
        routing = []
        for t in tokens:
            picks = [torch.randperm(len(only_experts), generator=gen)[:top_k] for _ in range(t)]
            ids = torch.tensor(only_experts)[torch.stack(picks)] if t else torch.empty(0, top_k, dtype=torch.int64)
            routing.append((torch.rand(t, top_k, generator=gen, dtype=dtype) + 0.1, ids))
    gate_up = torch.randn(num_experts, 2 * I, H, generator=gen, dtype=dtype) / H**0.5
    down = torch.randn(num_experts, H, I, generator=gen, dtype=dtype) / I**0.5
    upstream = torch.randn(sum(tokens), H, generator=gen, dtype=dtype)  # d loss / d out
    dev = _device()
    xs, ws, ids = ([t.to(dev) for t in ts] for ts in (xs, [w for w, _ in routing], [i for _, i in routing]))
    return xs, ws, ids, gate_up.to(dev), down.to(dev), upstream.to(dev)


def _device():
    """This rank's GPU under NCCL, else the CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", dist.get_rank())
    return torch.device("cpu")


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _max_err(got, want):
    got = torch.zeros_like(want) if got is None else got  # unused parameter: no grad == zero grad
    return (got.detach() - want.detach()).abs().max().item() if want.numel() else 0.0


def _compare_with_single_process(rank, world_size, tokens, num_experts, top_k, dtype, seed, only_experts=None):
    xs, ws, ids, gate_up, down, upstream = _problem(world_size, tokens, num_experts, top_k, dtype, seed, only_experts)
    own = local_expert_slice(num_experts, rank, world_size)
    x, w, gu, dn = _leaf(xs[rank]), _leaf(ws[rank]), _leaf(gate_up[own]), _leaf(down[own])
    out = expert_parallel_moe(x, ids[rank], w, gu, dn, num_experts)
    start = sum(tokens[:rank])
    mine = slice(start, start + tokens[rank])
    (out * upstream[mine]).sum().backward()

    x_all, w_all, gu_all, dn_all = _leaf(torch.cat(xs)), _leaf(torch.cat(ws)), _leaf(gate_up), _leaf(down)
    ref = moe_experts_torch(x_all, torch.cat(ids), w_all, gu_all, dn_all)
    (ref * upstream).sum().backward()
    plan = dispatch_plan(ids[rank], num_experts, world_size)
    return {
        "out": _max_err(out, ref[mine]),
        "shape": tuple(out.shape),
        "grad hidden_states": _max_err(x.grad, x_all.grad[mine]),
        "grad topk_weights": _max_err(w.grad, w_all.grad[mine]),
        "grad gate_up_proj": _max_err(gu.grad, gu_all.grad[own]),
        "grad down_proj": _max_err(dn.grad, dn_all.grad[own]),
        "sent": plan.send_counts.tolist(),
    }


def _module_with_router(rank, world_size):
    num_experts, top_k, tokens = 2 * world_size, 2, [4 + r for r in range(world_size)]
    xs, _, _, gate_up, down, upstream = _problem(world_size, tokens, num_experts, top_k, torch.float64, seed=7)
    router = torch.randn(num_experts, H, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(_device())
    layer = ExpertParallelMoE.from_full_weights(gate_up, down, router_weight=router.clone(), top_k=top_k)
    x = _leaf(xs[rank])
    start = sum(tokens[:rank])
    mine = slice(start, start + tokens[rank])
    (layer(x) * upstream[mine]).sum().backward()
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)  # the router is replicated: its gradient sums over ranks

    x_all, r_all = _leaf(torch.cat(xs)), _leaf(router)
    weights, ids = calculate_topk(x_all @ r_all.T, top_k, use_sigmoid=False, renormalize=True)
    ref = moe_experts_torch(x_all, ids, weights, gate_up, down)
    (ref * upstream).sum().backward()
    return {"grad hidden_states": _max_err(x.grad, x_all.grad[mine]), "grad router": _max_err(router_grad, r_all.grad)}


def _expect_error(fn):
    try:
        fn()
    except ValueError as exc:
        return ("ValueError", str(exc))
    except Exception as exc:  # reported, then judged by the test
        return (type(exc).__name__, str(exc))
    return ("no error", "")


def _bad_inputs(rank, world_size):
    """Each case is wrong on one rank (or all); every rank must raise the same ValueError."""
    num_experts, last = 2 * world_size, world_size - 1
    xs, ws, ids, gate_up, down, _ = _problem(world_size, [3] * world_size, num_experts, 2, torch.float32, seed=3)
    own = local_expert_slice(num_experts, rank, world_size)
    x, w, i, gu, dn = xs[rank], ws[rank], ids[rank], gate_up[own], down[own]
    run = functools.partial(expert_parallel_moe, num_experts=num_experts)
    odd = 2 * world_size + 1  # not divisible by world_size (> 1)
    cases = {
        "indivisible": lambda: expert_parallel_moe(x, i, w, gate_up[:1], down[:1], num_experts=odd),
        "hidden size differs on rank 1": lambda: (
            run(x[:, : H // 2], i, w, gu[:, :, : H // 2], dn[:, : H // 2]) if rank == 1 else run(x, i, w, gu, dn)
        ),
        "topk_weights shape on rank 0": lambda: run(x, i, w[:, :1] if rank == 0 else w, gu, dn),
        "full weights on last rank": lambda: run(
            x, i, w, gate_up if rank == last else gu, down if rank == last else dn
        ),
        "num_experts differs on rank 0": lambda: (  # rank 0 is self-consistent (4 experts of 4W), others not
            expert_parallel_moe(x, i, w, gate_up[:4], down[:4], num_experts=4 * world_size)
            if rank == 0
            else run(x, i, w, gu, dn)
        ),
        "grad only on rank 0": lambda: run(x.clone().requires_grad_(rank == 0), i, w, gu, dn),
        "dtype differs on last rank": lambda: (
            run(x.double(), i, w, gu.double(), dn.double()) if rank == last else run(x, i, w, gu, dn)
        ),
    }
    results = {name: _expect_error(case) for name, case in cases.items()}
    # After all that, the group still works: nobody is stuck in a half-finished exchange.
    ref = moe_experts_torch(torch.cat(xs), torch.cat(ids), torch.cat(ws), gate_up, down)
    results["still works"] = _max_err(run(x, i, w, gu, dn), ref[3 * rank : 3 * rank + 3])
    return results


def _scenario_worker(rank, world_size):
    W = world_size
    return {
        "random float64": _compare_with_single_process(
            rank, W, [3 + 2 * r for r in range(W)], 2 * W, 2, torch.float64, 1
        ),
        # all rows to rank 0's two experts: other experts empty, ranks > 0 receive nothing; rank 1 has no tokens
        "ragged": _compare_with_single_process(
            rank, W, [5, 0, 4, 3][:W], 2 * W, 2, torch.float64, 2, only_experts=[0, 1]
        ),
        "top-1 float32, one expert per rank": _compare_with_single_process(rank, W, [6] * W, W, 1, torch.float32, 4),
        "three experts per rank, top-3": _compare_with_single_process(
            rank, W, [2 + r for r in range(W)], 3 * W, 3, torch.float64, 5
        ),
        "module with router": _module_with_router(rank, W),
        "bad inputs": _bad_inputs(rank, W),
    }


@functools.cache
def _results(run):
    world_size, backend = run
    return launch(_scenario_worker, world_size, backend=backend, timeout_s=100 if backend == "gloo" else 300)


# 2 and 4 gloo processes on the CPU everywhere; 2 NCCL processes where there are 2 GPUs.
RUNS = [
    pytest.param((2, "gloo"), id="2-gloo"),
    pytest.param((4, "gloo"), id="4-gloo"),
    pytest.param(
        (2, "nccl"),
        id="2-nccl",
        marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 GPUs")],
    ),
]


SCENARIOS = {
    "random float64": 1e-12,
    "ragged": 1e-12,
    "top-1 float32, one expert per rank": 1e-5,
    "three experts per rank, top-3": 1e-12,
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_real_processes_match_single_process(run, scenario):
    for rank, report in enumerate(_results(run)):
        numbers = report[scenario]
        for key, err in numbers.items():
            if key.startswith("grad") or key == "out":
                assert err <= SCENARIOS[scenario], f"rank {rank}, {scenario}: {key} differs by {err}"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("run", RUNS)
def test_ragged_case_really_is_ragged(run):
    reports = [r["ragged"] for r in _results(run)]
    assert reports[1]["shape"] == (0, H)  # rank 1 had no tokens and got an empty output
    # every rank sent rows only to rank 0: ranks 1.. received none
    assert all(sum(r["sent"][1:]) == 0 for r in reports)
    assert sum(r["sent"][0] for r in reports) > 0


@pytest.mark.timeout(150)
@pytest.mark.parametrize("run", RUNS)
def test_module_with_router_matches_single_process(run):
    for rank, report in enumerate(_results(run)):
        for key, err in report["module with router"].items():
            assert err <= 1e-12, f"rank {rank}: {key} differs by {err}"


BAD = {
    "indivisible": "does not divide evenly over world_size",
    "hidden size differs on rank 1": r"disagree on hidden size H \(rank 0 has 8, rank 1 has 4",
    "topk_weights shape on rank 0": r"rank 0: topk_ids \(3, 2\) and topk_weights \(3, 1\) must both be \[T, k\]",
    "full weights on last rank": r"should hold E/W = \d+/\d+ = 2 experts",
    "num_experts differs on rank 0": "disagree on num_experts",
    "grad only on rank 0": r"disagree on hidden_states.requires_grad \(rank 0 has True, rank 1 has False",
    "dtype differs on last rank": "disagree on dtype",
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_the_same_error_on_every_rank(run, case):
    outcomes = [r["bad inputs"][case] for r in _results(run)]
    kinds = {kind for kind, _ in outcomes}
    assert kinds == {"ValueError"}, f"{case}: ranks ended with {outcomes}"
    messages = {msg for _, msg in outcomes}
    assert len(messages) == 1, f"{case}: ranks raised different messages {messages}"
    assert re.search(BAD[case], messages.pop()), f"{case}: {outcomes[0][1]}"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("run", RUNS)
def test_group_still_works_after_bad_input(run):
    for rank, report in enumerate(_results(run)):
        assert report["bad inputs"]["still works"] <= 1e-5, f"rank {rank}"


def _raises_on_last_rank(rank, world_size):
    if rank == world_size - 1:
        raise RuntimeError(f"boom on rank {rank}")
    return rank


def _hangs_on_rank_0(rank, world_size):
    if rank == 0:
        import time

        time.sleep(30)
    return rank


@pytest.mark.timeout(60)
def test_launcher_reports_worker_errors_and_kills_hung_workers():
    with pytest.raises(WorkerError, match="rank 0 raised RuntimeError: boom on rank 0"):
        launch(_raises_on_last_rank, 1, timeout_s=40)
    with pytest.raises(TimeoutError, match=r"ranks \[0\] were still running after 3 s"):
        launch(_hangs_on_rank_0, 1, timeout_s=3)
    with pytest.raises(ValueError, match="backend must be 'gloo'"):
        launch(_raises_on_last_rank, 2, backend="mpi")
