"""Benchmark: the expert-parallel MoE layer on 2 GPUs vs the same layer on one GPU.

    python -m moe_learn.bench.expert_parallel --json bench-out/ep.json

Two processes (``torch.multiprocessing`` spawn, no torchrun), NCCL, one GPU each, with
``NCCL_NVLS_ENABLE=0``. Each rank holds half the experts and half the tokens; one step
is dispatch (count exchange + row all-to-all) -> local experts -> unpermute_combine (row
all-to-all back + weighted sum). The baseline runs all tokens through all experts on
GPU 0 with the same building blocks. Phases are timed with CUDA events (median over
``--repeats`` steps after ``--warmup``), the ranks aligned by a barrier before each step;
the EP column is the slowest rank, since a step is done only when every rank is.

On a machine without 2 GPUs it says so and exits 0. ``--cpu-smoke`` runs the same code
with gloo on the CPU and wall-clock timers at toy sizes, to test the script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

PHASES = ("dispatch", "experts", "combine", "total")


class _Clock:
    """Named time marks: CUDA events on a GPU (what the GPU did), perf_counter on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: dict[str, object] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def ms(self, start: str, end: str) -> float:
        if self.cuda:
            return self.marks[start].elapsed_time(self.marks[end])
        return (self.marks[end] - self.marks[start]) * 1e3


def _local_experts_fn(name: str):
    from moe_learn.layers.expert_parallel import make_local_experts_fn, torch_local_experts

    if name == "torch":
        return torch_local_experts
    import moe_learn

    gemm = getattr(moe_learn, "grouped_gemm", None)
    if gemm is None:
        raise ValueError("--local-experts triton needs moe_learn.grouped_gemm (the Triton kernel of chapter 06)")
    return make_local_experts_fn(gemm)


def _problem(cfg: dict, device: torch.device):
    """Random non-zero inputs, identical on every rank (same seed, same device kind)."""
    from moe_learn.ops.routing import calculate_topk

    dtype = getattr(torch, cfg["dtype"])
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    tokens, hidden, inter, experts = cfg["tokens_total"], cfg["hidden"], cfg["inter"], cfg["experts"]
    x = torch.randn(tokens, hidden, generator=gen, device=device, dtype=dtype)
    logits = torch.randn(tokens, experts, generator=gen, device=device, dtype=torch.float32)
    topk_weights, topk_ids = calculate_topk(logits, cfg["top_k"], use_sigmoid=False, renormalize=True)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen, device=device, dtype=dtype) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=gen, device=device, dtype=dtype) / inter**0.5
    return x, topk_ids, topk_weights.to(dtype), gate_up, down


def _median_phases(step, clock: _Clock, warmup: int, repeats: int, barrier) -> dict[str, float]:
    samples = {p: [] for p in PHASES}
    for i in range(warmup + repeats):
        barrier()
        step()
        if clock.cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            samples["dispatch"].append(clock.ms("start", "dispatched"))
            samples["experts"].append(clock.ms("dispatched", "computed"))
            samples["combine"].append(clock.ms("computed", "combined"))
            samples["total"].append(clock.ms("start", "combined"))
    return {p: statistics.median(v) for p, v in samples.items()}


def bench_worker(rank: int, world_size: int, cfg: dict) -> dict:
    """One rank: time the EP layer on its share; rank 0 also times the one-device layer."""
    from moe_learn.layers.expert_parallel import (
        check_ranks_agree,
        dispatch_plan,
        ep_combine,
        ep_dispatch,
        ep_local_experts,
        local_expert_slice,
        unpermute_combine,
    )
    from moe_learn.ops.moe import moe_experts_torch
    from moe_learn.ops.permutation import permute

    cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    x_all, ids_all, w_all, gate_up, down = _problem(cfg, device)
    experts, per_rank_tokens = cfg["experts"], cfg["tokens_total"] // world_size
    mine = slice(rank * per_rank_tokens, (rank + 1) * per_rank_tokens)
    own = local_expert_slice(experts, rank, world_size)
    x, ids, w = x_all[mine].contiguous(), ids_all[mine].contiguous(), w_all[mine].contiguous()
    gate_up_local, down_local = gate_up[own].contiguous(), down[own].contiguous()
    local_fn = _local_experts_fn(cfg["local_experts"])
    clock = _Clock(cuda)
    result = {}

    with torch.no_grad():
        check_ranks_agree(x, ids, w, gate_up_local, down_local, experts)  # once; the timed loop skips it
        check_ms = []
        for _ in range(5):
            t0 = time.perf_counter()
            check_ranks_agree(x, ids, w, gate_up_local, down_local, experts)
            check_ms.append((time.perf_counter() - t0) * 1e3)
        result["config_check_ms"] = statistics.median(check_ms)

        out = {}

        def ep_step():
            clock.mark("start")
            x_local, state = ep_dispatch(x, ids, experts)
            clock.mark("dispatched")
            y_local = ep_local_experts(x_local, gate_up_local, down_local, state, local_fn)
            clock.mark("computed")
            out["y"] = ep_combine(y_local, w, state)
            clock.mark("combined")
            out["rows_received"] = x_local.shape[0]

        result["ep"] = _median_phases(ep_step, clock, cfg["warmup"], cfg["repeats"], dist.barrier)
        plan = dispatch_plan(ids, experts, world_size)
        result["rows_sent"] = plan.send_counts.tolist()
        result["rows_received"] = out["rows_received"]
        ref = moe_experts_torch(x, ids, w, gate_up, down).float()  # the same tokens, all experts, one device
        result["max_rel_error"] = ((out["y"].float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()

        if rank == 0:

            def single_step():
                clock.mark("start")
                plan = dispatch_plan(ids_all, experts, 1)
                x_sorted = permute(x_all, plan.gather_indices, cfg["top_k"])
                clock.mark("dispatched")
                y_sorted = local_fn(x_sorted, gate_up, down, plan.expert_counts)
                clock.mark("computed")
                unpermute_combine(y_sorted, plan.gather_indices, w_all)
                clock.mark("combined")

            result["single"] = _median_phases(single_step, clock, cfg["warmup"], cfg["repeats"], lambda: None)
        dist.barrier()
    result["device"] = torch.cuda.get_device_name(device) if cuda else "CPU"
    return result


def _table(cfg: dict, reports: list[dict]) -> str:
    single = reports[0]["single"]
    slowest = {p: max(r["ep"][p] for r in reports) for p in PHASES}
    lines = [
        f"expert-parallel MoE on {len(reports)} x {reports[0]['device']} ({cfg['backend']}) vs 1 device",
        f"T={cfg['tokens_total']} tokens ({cfg['tokens_total'] // len(reports)} per rank), H={cfg['hidden']}, "
        f"I={cfg['inter']}, E={cfg['experts']} ({cfg['experts'] // len(reports)} per rank), top-{cfg['top_k']}, "
        f"{cfg['dtype']}, local experts: {cfg['local_experts']}; "
        f"median of {cfg['repeats']} steps after {cfg['warmup']} warmup",
        "",
        f"{'phase':<10}{'1 device, all tokens':>22}{'EP, slowest rank':>18}"
        + "".join(f"{'rank ' + str(i):>10}" for i in range(len(reports))),
    ]
    for p in PHASES:
        ranks = "".join(f"{r['ep'][p]:>8.3f}ms" for r in reports)
        lines.append(f"{p:<10}{single[p]:>20.3f}ms{slowest[p]:>16.3f}ms{ranks}")
    lines.append("")
    lines.append(f"speed-up of a step: {single['total'] / slowest['total']:.2f}x")
    for i, r in enumerate(reports):
        lines.append(
            f"rank {i}: sends rows {r['rows_sent']}, receives {r['rows_received']}, "
            f"rel. error vs one device {r['max_rel_error']:.1e}, config check {r['config_check_ms']:.2f} ms (not timed)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens in total (split evenly over the ranks)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--local-experts", choices=("torch", "triton"), default="torch")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-smoke", action="store_true", help="gloo on the CPU at toy sizes (tests the script)")
    args = parser.parse_args(argv)
    world_size = 2

    if args.tokens % world_size or args.experts % world_size:
        parser.error(f"--tokens and --experts must be divisible by {world_size} (the number of GPUs)")
    if args.cpu_smoke:
        backend = "gloo"
        args.tokens, args.hidden, args.inter, args.experts, args.top_k = 16, 8, 4, 4, 2
        args.dtype, args.warmup, args.repeats = "float32", 1, 3
    else:
        backend = "nccl"
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < world_size:
            reason = f"this benchmark needs {world_size} CUDA GPUs; found {found}. Nothing to measure."
            print(reason)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"skipped": reason}, indent=1) + "\n")
            return 0

    cfg = {
        "backend": backend,
        "tokens_total": args.tokens,
        "hidden": args.hidden,
        "inter": args.inter,
        "experts": args.experts,
        "top_k": args.top_k,
        "dtype": args.dtype,
        "local_experts": args.local_experts,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
    }
    from moe_learn.layers.launch import launch

    reports = launch(bench_worker, world_size, backend=backend, args=(cfg,), timeout_s=540)
    print(_table(cfg, reports))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        slowest = {p: max(r["ep"][p] for r in reports) for p in PHASES}
        import platform

        import triton

        payload = {
            "config": cfg,
            "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                         "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")},
            "command": "python -m moe_learn.bench.expert_parallel " + " ".join(sys.argv[1:]),
            "world_size": world_size,
            "device": reports[0]["device"],
            "single_device_ms": reports[0]["single"],
            "expert_parallel_slowest_rank_ms": slowest,
            "speedup": reports[0]["single"]["total"] / slowest["total"],
            "ranks": [{k: v for k, v in r.items() if k != "single"} for r in reports],
        }
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}")
    worst = max(r["max_rel_error"] for r in reports)
    limit = 1e-5 if args.dtype == "float32" else 2e-2
    if worst > limit:
        print(f"expert-parallel output differs from the one-device layer: rel. error {worst:.1e} > {limit:.0e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
