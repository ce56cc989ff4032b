"""``moe-learn bench`` (``python -m moe_learn bench``): the course's kernels against what a user would otherwise run.

Sections, side by side in one process on one GPU, bf16 (``--only`` picks some; all four take
about 7.5 minutes on an H100 by ``estimate_seconds``: experts 3, decode 2, prefill 2.5, routing
a few seconds):

- experts: the experts half of an MoE layer (hidden ``[T, H]``, top-k ids and weights,
  ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), forward and forward+backward, for
  Qwen3-30B-A3B, Mixtral-8x7B, gpt-oss-20b and DeepSeek-V3: ours (``moe_learn.moe_experts``)
  against transformers' default experts path (``grouped_mm``) and Liger-Kernel's fused MoE
  (when installed), with transformers' eager loop as context (``experts.py``);
- decode: the two expert GEMMs at T = 1, 8, 64, 256 tokens, ours (``moe_learn.grouped_gemm``)
  against ``torch._grouped_mm``: eager calls back to back, one call alone, replayed from a
  CUDA graph, and the memory floor (weights of the experts that got tokens + X + Y);
- prefill: the two expert GEMMs at T = 1024 and 8192 against ``torch._grouped_mm``, the
  per-expert loop, a dense matmul and the roofline floor ``max(FLOPs / bf16 matmul peak, bytes
  / copy bandwidth)`` (results.json keeps these rows under "gemm", as earlier runs did);
- routing: router logits -> top-k, counts, gather and scatter indices, fused vs eager.

Both ceilings are measured in the same run; every timing follows a short rest (``timing.REST_S``).
Prints the report (``report.py``: headlines, issue #15's targets, tables), writes results.json
(after each section, so a run cut short keeps what it measured), results.md and roofline.png.
Without a GPU it says so and exits cleanly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from moe_learn.bench import timing
from moe_learn.bench.cases import (
    DECODE_MODELS,
    DECODE_TOKENS,
    MODELS,
    PREFILL_MODELS,
    TOKENS,
    Case,
    cases,
    decode_cases,
    experts_cases,
    per_expert_loop,
    routing_counts,
)
from moe_learn.bench.experts import bench_experts_case, guarded, implementations
from moe_learn.bench.report import (
    evaluate_targets,
    markdown_report,
    merge_results,
    summarize_decode,
    summarize_experts,
    summarize_gemm,
)
from moe_learn.bench.timing import (
    do_bench,
    do_bench_graph,
    do_bench_loop,
    environment,
    measure_peaks,
    rel_err,
    time_single_call,
)

SECTIONS = ("experts", "decode", "prefill", "routing")

# ---------------------------------------------------------------------------------------
# Prefill GEMMs
# ---------------------------------------------------------------------------------------


def bench_gemm_case(case: Case, W: torch.Tensor, seed: int, with_loop: bool) -> dict:
    from moe_learn.kernels.grouped_gemm import grouped_gemm

    m_sizes = routing_counts(case.tokens, case.E, MODELS[case.model][3], seed)
    sizes = m_sizes.tolist()
    offs = torch.cumsum(m_sizes, 0, dtype=torch.int32)
    X = torch.randn(case.M, case.K, device="cuda", dtype=torch.bfloat16)
    Wt = W.transpose(1, 2)  # [E, K, N] view, column-major per expert: the layout _grouped_mm takes
    ref = torch._grouped_mm(X, Wt, offs=offs)
    y = torch.full_like(ref, float("nan"))  # poisoned: an unwritten row shows up as NaN
    grouped_gemm(X, W, m_sizes, out=y)  # the first call of a shape bucket also autotunes
    err_fp32 = rel_err(y, per_expert_loop(X, W, sizes, dtype=torch.float32))
    times = {
        "grouped_mm": do_bench(lambda: torch._grouped_mm(X, Wt, offs=offs)),
        "ours": do_bench(lambda: grouped_gemm(X, W, m_sizes, out=y)),
        "dense": do_bench(lambda: X @ W[0].T),
    }
    if with_loop:
        times["loop"] = do_bench(lambda: per_expert_loop(X, W, sizes))
    return {
        **asdict(case),
        "name": case.name,
        "rel_err_vs_grouped_mm": rel_err(y, ref),
        "rel_err_vs_fp32": err_fp32,
        "ms": {k: v * 1e3 for k, v in times.items()},
        "tflops": {k: case.flops / v / 1e12 for k, v in times.items()},
    }


def with_roofline(row: dict, case: Case, peaks: dict) -> dict:
    """Add the roofline floor of ``case`` under ``peaks`` and each kernel's fraction of it."""
    floor = max(case.flops / (peaks["matmul_tflops"] * 1e12), case.bytes() / (peaks["copy_tbs"] * 1e12))
    return {**row, "floor_ms": floor * 1e3, "roofline_tflops": case.flops / floor / 1e12,
            "frac_roofline": {k: floor / (ms * 1e-3) for k, ms in row["ms"].items()}}


def best_peaks(measurements: list[dict]) -> dict:
    """The highest of each ceiling: a throttled or disturbed measurement must not lower the roofline."""
    return {key: max(m[key] for m in measurements) for key in measurements[0]}


# ---------------------------------------------------------------------------------------
# Decode GEMMs
# ---------------------------------------------------------------------------------------


def bench_decode_case(case: Case, W: torch.Tensor, seed: int) -> dict:
    """One decode GEMM, ours (as a user calls it: no ``out``, no config) against ``torch._grouped_mm``.

    Six short timings (each about 0.1-0.2 s) follow one rest: a decode GEMM moves megabytes,
    not the seconds of sustained load that bring an H100 to its power cap, and a rest before
    each would make this section alone take 5 minutes.
    """
    from moe_learn.kernels.grouped_gemm import grouped_gemm

    m_sizes = routing_counts(case.tokens, case.E, MODELS[case.model][3], seed)
    sizes = m_sizes.tolist()
    offs = torch.cumsum(m_sizes, 0, dtype=torch.int32)
    X = torch.randn(case.M, case.K, device="cuda", dtype=torch.bfloat16)
    Wt = W.transpose(1, 2)
    fns = {"ours": lambda: grouped_gemm(X, W, m_sizes), "grouped_mm": lambda: torch._grouped_mm(X, Wt, offs=offs)}
    ref, y = fns["grouped_mm"](), fns["ours"]()  # ours' first call autotunes its shape bucket
    row = {**asdict(case), "name": case.name, "experts_hit": sum(m > 0 for m in sizes),
           "rel_err_vs_grouped_mm": rel_err(y, ref),
           "rel_err_vs_fp32": rel_err(y, per_expert_loop(X, W, sizes, dtype=torch.float32)),
           "us": {name: {} for name in fns}}
    timers = (("loop", do_bench_loop), ("single", time_single_call),
              ("graph", lambda fn, rest: do_bench_graph(fn, rep=20, rest=rest)))
    first = True
    for mode, timer in timers:
        for name, fn in fns.items():
            seconds, error = guarded(lambda timer=timer, fn=fn, rest=first: timer(fn, rest=rest))
            first = False
            if error:
                row["us"][name]["error"] = f"{mode}: {error}"
            else:
                row["us"][name][mode] = seconds * 1e6
    return row


def with_decode_floor(row: dict, peaks: dict) -> dict:
    """Add the memory floor: X, Y and the weights of the experts that got tokens, at the copy bandwidth."""
    if "experts_hit" not in row:
        return row
    moved = Case.of(row).bytes(experts=row["experts_hit"])
    return {**row, "bytes": moved, "floor_us": moved / (peaks["copy_tbs"] * 1e12) * 1e6}


# ---------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------


def bench_routing(T: int = 8192, E: int = 128, k: int = 8) -> dict:
    from moe_learn.kernels.fused_routing import fused_routing
    from moe_learn.ops.routing import calculate_topk, get_routing_indices

    def eager(logits):
        w, ids = calculate_topk(logits, k, use_sigmoid=False, renormalize=True)
        return (w, ids, *get_routing_indices(ids, E, return_scatter_indices=True))

    logits32 = torch.randn(T, E, device="cuda")  # fp32: no ties, so both must agree exactly
    same = all(torch.equal(a, b) for a, b in zip(eager(logits32)[1:], fused_routing(logits32, k)[1:], strict=True))
    logits = logits32.to(torch.bfloat16)
    return {
        "shape": {"T": T, "E": E, "top_k": k, "dtype": "bfloat16"},
        "same_as_eager_fp32": same,
        "eager_us": do_bench(lambda: eager(logits)) * 1e6,
        "fused_us": do_bench(lambda: fused_routing(logits, k)) * 1e6,
        "fused_graph_us": do_bench_graph(lambda: fused_routing(logits, k)) * 1e6,
    }


# ---------------------------------------------------------------------------------------
# The plan, its time, and the run
# ---------------------------------------------------------------------------------------


def make_plan(sections, models=None, tokens=None, with_loop: bool = True) -> dict:
    """The cases each selected section will run; ``models``/``tokens`` keep only matching cases."""

    def keep(all_models, all_tokens):
        return ([m for m in all_models if models is None or m in models],
                [t for t in all_tokens if tokens is None or t in tokens])

    decode_models, decode_tokens = keep(DECODE_MODELS, DECODE_TOKENS)
    prefill_models, prefill_tokens = keep(PREFILL_MODELS, TOKENS)
    return {
        "experts": experts_cases(models, tokens) if "experts" in sections else [],
        "decode": decode_cases(decode_models, decode_tokens) if "decode" in sections and decode_models
        and decode_tokens else [],
        "gemm": cases(prefill_models, prefill_tokens) if "prefill" in sections and prefill_models
        and prefill_tokens else [],
        "routing": "routing" in sections,
        "with_loop": with_loop,
    }


# Wall-clock seconds per unit, rough, from H100 runs: one do_bench timing besides its rest
# (its estimate, warm-up and 100 ms of calls, L2 flushes between them), one decode case's six
# timings, and each case's setup (weights, the first calls that compile and autotune, the
# correctness check against the reference).
COST_S = {"timing": 0.3, "decode_timings": 1.0, "decode_setup": 1.0, "prefill_setup": 1.5}
# An experts case's setup per implementation, in a fresh process (H200, sessions 6 and 7 of
# perf/NOTES.md): ours compiles and tunes ~8 keys (37-47 s), Liger-Kernel's triton.autotune takes
# 212-304 s, and 527 s at DeepSeek-V3's shape (H = 7168: one of its kernels' tuning alone took 322 s);
# caches (MOE_LEARN_TUNING_CACHE, TRITON_CACHE_AUTOTUNING) cut both on a later run.
EXPERTS_SETUP_S = {"ours": 45.0, "liger": 270.0}
EXPERTS_SETUP_BY_MODEL_S = {("liger", "deepseek-v3"): 530.0}
EXPERTS_SETUP_OTHER_S = 1.0


def experts_setup_seconds(impl: str, model: str) -> float:
    """The expected seconds of one implementation's first calls on one model's experts case."""
    return EXPERTS_SETUP_BY_MODEL_S.get((impl, model), EXPERTS_SETUP_S.get(impl, EXPERTS_SETUP_OTHER_S))


def estimate_seconds(plan: dict, impls, rest: float) -> dict:
    """How long the plan should take: every rest, every timing, every case's setup, added up."""
    available = [i for i in impls if not i.missing]
    per_experts_case = len(available) + sum(i.training for i in available)
    peaks = 2 * 2 if plan["decode"] or plan["gemm"] else 0  # two ceilings, before and after the GEMM sections
    timed = (len(plan["experts"]) * per_experts_case + len(plan["gemm"]) * (3 + plan["with_loop"])
             + 3 * plan["routing"] + peaks)
    rests = timed + len(plan["decode"])
    seconds = (rests * rest + timed * COST_S["timing"]
               + len(plan["decode"]) * (COST_S["decode_timings"] + COST_S["decode_setup"])
               + sum(experts_setup_seconds(i.name, case.model) for case in plan["experts"] for i in available)
               + len(plan["gemm"]) * COST_S["prefill_setup"])
    return {"seconds": seconds, "rests": rests, "timings": timed + 6 * len(plan["decode"])}


def _experts_line(row: dict) -> str:
    """One experts case in a line: each implementation's forward and forward+backward milliseconds."""
    if "error" in row:
        return row["error"]
    parts = []
    for mode in ("forward", "training"):
        times = ", ".join(f"{name} {r['ms']:.3f}" if "ms" in r else f"{name} -" for name, r in row[mode].items())
        parts.append(f"{mode} ms: {times}")
        peaks = ", ".join(f"{name} {r['peak_mib']:g}" for name, r in row[mode].items() if "peak_mib" in r)
        if peaks:
            parts.append(f"{mode} peak MiB: {peaks}")
    setup = ", ".join(f"{name} {seconds:g}" for name, seconds in row.get("setup_s", {}).items())
    return "; ".join(parts) + (f"; first calls (compile, tune, check) s: {setup}" if setup else "")


def _error_row(case, error: str) -> dict:
    return {**asdict(case), "name": case.name, "error": error}


def gemm_weights(case: Case) -> torch.Tensor:
    """The case's expert weights ``[E, N, K]``, bf16, drawn in place (no float32 copy of 15 GB)."""
    return torch.empty(case.E, case.N, case.K, device="cuda", dtype=torch.bfloat16).normal_(0.0, 0.02)


def _gemm_rows(selected: list[Case], bench_case, progress, task) -> list[dict]:
    """Each case through ``bench_case(case, W, seed)``, one weight tensor alive at a time."""
    rows, W, last = [], None, None
    for i, case in enumerate(selected):
        progress.update(task, description=case.name)
        if (case.model, case.gemm) != last:
            W = None
            torch.cuda.empty_cache()
            W, w_error = guarded(lambda case=case: gemm_weights(case))
            last = (case.model, case.gemm)
        if W is None:
            rows.append(_error_row(case, w_error))
        else:
            row, error = guarded(lambda case=case, W=W, i=i: bench_case(case, W, i))
            rows.append(row if error is None else _error_row(case, error))
        progress.advance(task)
    W = None
    torch.cuda.empty_cache()
    return rows


def save_roofline(rows: list[dict], peaks: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from moe_learn.plots import roofline_plot

    short = {"qwen3-30b-a3b": "qwen3", "mixtral-8x7b": "mixtral", "llama4-scout": "llama4", "gpt-oss-20b": "gpt-oss"}
    points = []
    for r in rows:
        if "ms" not in r:
            continue
        case = Case.of(r)
        label = f"{short.get(case.model, case.model)} {case.gemm} {case.tokens // 1024}k"
        points.append({"label": label, "flops": case.flops, "bytes": case.bytes(), "seconds": r["ms"]["ours"] / 1e3})
    fig = roofline_plot(points, round(peaks["matmul_tflops"]), round(peaks["copy_tbs"], 2),
                        title=f"grouped GEMM (ours), bf16, {torch.cuda.get_device_name()}")
    fig.set_size_inches(11, 7)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-learn bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for results.json and roofline.png")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="sections to run (default: all)")
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), help="only the cases of these models")
    parser.add_argument("--tokens", nargs="*", type=int, help="only the cases with these token counts")
    parser.add_argument("--no-loop", action="store_true",
                        help="skip the slow per-expert loops (prefill's loop, transformers' eager experts)")
    parser.add_argument("--rest", type=float, default=timing.REST_S, metavar="SECONDS",
                        help=f"idle before each timing, so no timing inherits the power cap (default {timing.REST_S})")
    parser.add_argument("--report", type=Path, nargs="+", metavar="RESULTS_JSON",
                        help="print a stored run as Markdown (no GPU needed), e.g. docs/bench/h100-results.json; "
                        "several runs of one GPU and one software stack make one report")
    args = parser.parse_args(argv)
    if args.rest < 0:
        parser.error(f"--rest must be 0 or more seconds, got {args.rest}")
    if args.report:
        runs = []
        for path in args.report:
            try:
                run = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                parser.error(f"--report {path}: cannot read it as JSON ({e})")
            if not isinstance(run, dict) or "environment" not in run:
                parser.error(f"--report {path}: not a results.json written by moe-learn bench (it has no environment)")
            runs.append(run)
        try:
            result = merge_results(runs)
        except ValueError as e:
            parser.error(str(e))
        print(markdown_report(result))
        return 0

    if not torch.cuda.is_available():
        print("No CUDA GPU here: the benchmarks need one. Stored H100 results: docs/benchmarks.md")
        return 0
    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    timing.REST_S = args.rest
    sections = args.only or SECTIONS
    impls = implementations(with_eager=not args.no_loop) if "experts" in sections else []
    plan = make_plan(sections, args.models, args.tokens, with_loop=not args.no_loop)
    estimate = estimate_seconds(plan, impls, args.rest)
    console.print(f"{len(plan['experts'])} experts, {len(plan['decode'])} decode and {len(plan['gemm'])} prefill "
                  f"cases{', routing' if plan['routing'] else ''}: about {estimate['timings']} timings after "
                  f"{estimate['rests']} rests of {args.rest:g} s, estimated {estimate['seconds'] / 60:.1f} min")
    for impl in impls:
        if impl.missing:
            console.print(f"{impl.label}: {impl.missing}")
    result: dict = {"environment": environment(),
                    "command": "python -m moe_learn bench " + " ".join(sys.argv[1:] if argv is None else argv),
                    "rest_s": timing.REST_S, "estimate_s": estimate["seconds"]}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each section: a run cut short keeps what it measured
        (args.out / "results.json").write_text(json.dumps(result, indent=2))

    start = time.perf_counter()
    n_cases = len(plan["experts"]) + len(plan["decode"]) + len(plan["gemm"]) + plan["routing"]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("measuring peaks", total=n_cases)
        # the ceilings before and after the GEMM sections, the higher of each kept: a GPU still hot
        # from earlier work once measured a 10% lower matmul peak, which would flatter every fraction
        peak_runs = [measure_peaks()] if plan["decode"] or plan["gemm"] else []
        if plan["experts"]:
            rows = []
            for i, case in enumerate(plan["experts"]):
                progress.update(task, description=f"experts {case.name}")
                row, error = guarded(lambda case=case, i=i: bench_experts_case(case, impls, seed=i, progress=True))
                rows.append(row if error is None else _error_row(case, error))
                torch.cuda.empty_cache()
                progress.advance(task)
                # saved after every case: one case takes minutes to compile and tune, and a run cut short keeps them
                result["experts"], result["experts_summary"] = rows, summarize_experts(rows)
                save()
                print(f"experts {case.name}: {_experts_line(rows[-1])}", flush=True)  # one line, unwrapped
        if plan["decode"]:
            result["decode"] = _gemm_rows(plan["decode"], bench_decode_case, progress, task)
            save()
        if plan["gemm"]:
            result["gemm"] = _gemm_rows(plan["gemm"], lambda c, W, i: bench_gemm_case(c, W, i, plan["with_loop"]),
                                        progress, task)
            save()
        if peak_runs:
            peak_runs.append(measure_peaks())
            result["peaks"] = peaks = best_peaks(peak_runs)
            result["peak_measurements"] = peak_runs
        if plan["decode"]:
            result["decode"] = [with_decode_floor(r, peaks) for r in result["decode"]]
            result["decode_summary"] = summarize_decode(result["decode"])
        if plan["gemm"]:
            from moe_learn.kernels.autotune import TUNED

            result["gemm"] = [with_roofline(r, Case.of(r), peaks) if "ms" in r else r for r in result["gemm"]]
            result["gemm_summary"] = summarize_gemm(result["gemm"])
            result["tuned_configs"] = [{"key": list(map(str, key)), "config": cfg} for key, cfg in TUNED.items()]
        if plan["routing"]:
            progress.update(task, description="routing")
            routing, error = guarded(bench_routing)
            result["routing"] = routing if error is None else {"error": error}
            progress.advance(task)

    result["elapsed_s"] = time.perf_counter() - start
    result["targets"] = evaluate_targets(result)
    save()
    report = markdown_report(result)
    (args.out / "results.md").write_text(report)
    plotted = any("ms" in r for r in result.get("gemm", []))
    if plotted:
        save_roofline(result["gemm"], peaks, args.out / "roofline.png")
    print(report)
    console.print(f"wrote {args.out / 'results.json'} and results.md" + (" and roofline.png" if plotted else "")
                  + f" in {result['elapsed_s'] / 60:.1f} min (estimated {estimate['seconds'] / 60:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
