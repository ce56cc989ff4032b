"""``python -m moe_learn bench``: the course's kernels against their baselines on a GPU.

- grouped GEMM (bf16): the two expert GEMMs of four MoE models at T = 1024 and 8192,
  ours against the per-expert loop, ``torch._grouped_mm``, a dense matmul of the same
  size and the roofline floor ``max(FLOPs / bf16 matmul peak, bytes / copy bandwidth)``
  (both ceilings measured in the same run; bytes = X + all expert weights + Y once;
  every timing, ceilings included, follows a short rest: see ``REST_S``);
- routing: router logits -> top-k, counts, gather and scatter indices, fused vs eager;
- MoE forward: the fused block against transformers' ``Qwen3MoeSparseMoeBlock`` (eager);
- MoE backward: the same, for the backward pass, when ``moe_learn.layers.experts`` exists.

Prints tables, writes ``results.json`` and ``roofline.png``. Without a GPU it says so
and exits cleanly.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from moe_learn.bench import timing
from moe_learn.bench.cases import GEMMS, MODELS, TOKENS, Case, cases, per_expert_loop, routing_counts  # noqa: F401
from moe_learn.bench.timing import do_bench, do_bench_graph, environment, geomean, measure_peaks, rel_err

SECTIONS = ("gemm", "routing", "moe")

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
    err_fp32 = rel_err(y, per_expert_loop(X.float(), W.float(), sizes))
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


def summarize_gemm(rows: list[dict]) -> dict:
    speedup = [r["ms"]["grouped_mm"] / r["ms"]["ours"] for r in rows]
    return {
        "geomean_speedup_vs_grouped_mm": geomean(speedup),
        "min_speedup_vs_grouped_mm": min(speedup),
        "geomean_frac_roofline_ours": geomean(r["frac_roofline"]["ours"] for r in rows),
        "geomean_frac_roofline_grouped_mm": geomean(r["frac_roofline"]["grouped_mm"] for r in rows),
        "max_rel_err_vs_grouped_mm": max(r["rel_err_vs_grouped_mm"] for r in rows),
        "max_rel_err_vs_fp32": max(r.get("rel_err_vs_fp32", float("nan")) for r in rows),
    }


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


def qwen3_block(T: int):
    """transformers' Qwen3-30B-A3B MoE block (eager experts), random bf16 weights, and an input."""
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    H, I, E, k = MODELS["qwen3-30b-a3b"]
    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k,
                            norm_topk_prob=True)
    config._experts_implementation = "eager"  # the per-expert loop, whatever the default
    block = Qwen3MoeSparseMoeBlock(config).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)
    return block, x


def bench_moe_forward(T: int = 1024) -> dict:
    from moe_learn.layers.experts import fused_moe_forward

    block, x = qwen3_block(T)
    gate, experts = block.gate.weight, block.experts
    k = MODELS["qwen3-30b-a3b"][3]

    def ours():
        return fused_moe_forward(x.view(-1, x.shape[-1]), gate, experts.gate_up_proj, experts.down_proj, top_k=k,
                                 renormalize=True)

    with torch.no_grad():
        ref = block(x).view(T, -1)
        got = ours()
        t_hf, t_ours = do_bench(lambda: block(x)), do_bench(ours)
    return {"shape": {"T": T, "model": "qwen3-30b-a3b", "dtype": "bfloat16"}, "rel_err": rel_err(got, ref),
            "hf_eager_ms": t_hf * 1e3, "ours_ms": t_ours * 1e3, "speedup": t_hf / t_ours}


def gemm_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="grouped GEMM, bf16: TFLOP/s (ours as a fraction of the roofline floor)")
    for col in ("case", "M", "N", "K", "E", "loop", "dense", "_grouped_mm", "ours", "roofline", "ours/roof",
                "ours/_gmm"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in rows:
        t = r["tflops"]
        table.add_row(
            r["name"], str(r["M"]), str(r["N"]), str(r["K"]), str(r["E"]),
            f"{t['loop']:.0f}" if "loop" in t else "-", f"{t['dense']:.0f}", f"{t['grouped_mm']:.0f}",
            f"{t['ours']:.0f}", f"{r['roofline_tflops']:.0f}", f"{r['frac_roofline']['ours']:.0%}",
            f"{r['ms']['grouped_mm'] / r['ms']['ours']:.2f}x",
        )
    return table


def save_roofline(rows: list[dict], peaks: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from moe_learn.plots import roofline_plot

    short = {"qwen3-30b-a3b": "qwen3", "mixtral-8x7b": "mixtral", "llama4-scout": "llama4", "gpt-oss-20b": "gpt-oss"}
    points = []
    for r in rows:
        case = Case(r["model"], r["gemm"], r["tokens"], r["M"], r["N"], r["K"], r["E"])
        label = f"{short[case.model]} {case.gemm} {case.tokens // 1024}k"
        points.append({"label": label, "flops": case.flops, "bytes": case.bytes(), "seconds": r["ms"]["ours"] / 1e3})
    fig = roofline_plot(points, round(peaks["matmul_tflops"]), round(peaks["copy_tbs"], 2),
                        title=f"grouped GEMM (ours), bf16, {torch.cuda.get_device_name()}")
    fig.set_size_inches(11, 7)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def markdown_report(result: dict) -> str:
    """The stored results of one run as Markdown tables (what docs/benchmarks.md shows)."""
    env, peaks = result["environment"], result["peaks"]
    lines = [
        f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}, "
        f"{env['date']}. Command: `{result['command']}`. Measured ceilings: bf16 matmul "
        f"{peaks['matmul_tflops']:.0f} TFLOP/s, copy {peaks['copy_tbs']:.2f} TB/s."
        + (f" Each timing followed {result['rest_s']:g} s of idle." if "rest_s" in result else ""),
        "",
    ]
    if "gemm" in result:
        lines += [
            "| case | M | N | K | E | loop | dense | `_grouped_mm` | ours | roofline | ours / roofline "
            "| ours vs `_grouped_mm` |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["gemm"]:
            t = r["tflops"]
            loop = f"{t['loop']:.0f}" if "loop" in t else "-"
            lines.append(
                f"| {r['name']} | {r['M']} | {r['N']} | {r['K']} | {r['E']} | {loop} | {t['dense']:.0f} | "
                f"{t['grouped_mm']:.0f} | **{t['ours']:.0f}** | {r['roofline_tflops']:.0f} | "
                f"{r['frac_roofline']['ours']:.0%} | {r['ms']['grouped_mm'] / r['ms']['ours']:.2f}x |"
            )
        g = result["gemm_summary"]
        lines += [
            "",
            "TFLOP/s; roofline = FLOPs / max(FLOPs / matmul peak, bytes / copy bandwidth). Geometric means: ours "
            f"**{g['geomean_speedup_vs_grouped_mm']:.3f}x** `_grouped_mm` (lowest case "
            f"{g['min_speedup_vs_grouped_mm']:.3f}x); ours at **{g['geomean_frac_roofline_ours']:.1%}** of the "
            f"roofline, `_grouped_mm` at {g['geomean_frac_roofline_grouped_mm']:.1%}. Largest relative difference "
            f"from `_grouped_mm`'s output: {g['max_rel_err_vs_grouped_mm']:.1e}; from a float32 per-expert loop: "
            f"{g.get('max_rel_err_vs_fp32', float('nan')):.1e}.",
            "",
        ]
    if "routing" in result:
        r = result["routing"]
        sh = r["shape"]
        lines += [
            f"Routing (T={sh['T']}, E={sh['E']}, top-{sh['top_k']}, {sh['dtype']} logits): eager chain "
            f"{r['eager_us']:.0f} µs; fused {r['fused_us']:.0f} µs per call, {r['fused_graph_us']:.1f} µs replayed "
            f"from a CUDA graph (device time); identical to the eager chain on fp32 logits: {r['same_as_eager_fp32']}.",
            "",
        ]
    if "moe" in result:
        r = result["moe"]
        lines += [
            f"MoE forward ({r['shape']['model']}, T={r['shape']['T']}, {r['shape']['dtype']}): transformers' eager "
            f"block {r['hf_eager_ms']:.2f} ms, ours {r['ours_ms']:.3f} ms: **{r['speedup']:.0f}x**; relative "
            f"difference of the outputs {r['rel_err']:.1e}.",
            "",
        ]
    if "backward" in result and "skipped" not in result["backward"]:
        r = result["backward"]
        errs = ", ".join(f"{k} {v:.1e}" for k, v in r["grad_rel_err"].items())
        lines += [
            f"MoE backward (same block, T={r['shape']['T']}): transformers' eager {r['hf_eager_backward_ms']:.1f} ms, "
            f"ours {r['ours_backward_ms']:.2f} ms: **{r['backward_speedup']:.0f}x**; forward + backward "
            f"{r['forward_backward_speedup']:.0f}x. Relative gradient differences: {errs}.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-learn bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for results.json and roofline.png")
    parser.add_argument("--only", nargs="*", choices=SECTIONS + ("backward",), help="sections to run (default: all)")
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), help="GEMM models (default: all four)")
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS), help="GEMM token counts")
    parser.add_argument("--no-loop", action="store_true", help="skip the slow per-expert loop baseline")
    parser.add_argument("--rest", type=float, default=timing.REST_S, metavar="SECONDS",
                        help=f"idle before each timing, so no timing inherits the power cap (default {timing.REST_S})")
    parser.add_argument("--report", type=Path, metavar="RESULTS_JSON",
                        help="print a stored run as Markdown (no GPU needed), e.g. docs/bench/h100-results.json")
    args = parser.parse_args(argv)
    if args.rest < 0:
        parser.error(f"--rest must be 0 or more seconds, got {args.rest}")
    if args.report:
        print(markdown_report(json.loads(args.report.read_text())))
        return 0

    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    if not torch.cuda.is_available():
        console.print("No CUDA GPU here: the benchmarks need one. Stored H100 results: docs/benchmarks.md")
        return 0
    timing.REST_S = args.rest
    sections = args.only or [*SECTIONS, "backward"]
    selected = cases(args.models, tuple(args.tokens)) if "gemm" in sections else []
    result: dict = {"environment": environment(),
                    "command": "python -m moe_learn bench " + " ".join(sys.argv[1:] if argv is None else argv),
                    "rest_s": timing.REST_S}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("measuring peaks", total=1 + len(selected) + len(sections))
        # the ceilings before and after the GEMM cases, the higher of each kept: a GPU still hot
        # from earlier work once measured a 10% lower matmul peak, which would flatter every fraction
        peak_runs = [measure_peaks()]
        progress.advance(task)
        rows, W, last = [], None, None
        for i, case in enumerate(selected):
            progress.update(task, description=case.name)
            if (case.model, case.gemm) != last:  # one weight tensor alive at a time
                W = None
                torch.cuda.empty_cache()
                W = torch.randn(case.E, case.N, case.K, device="cuda", dtype=torch.bfloat16) * 0.02
                last = (case.model, case.gemm)
            rows.append(bench_gemm_case(case, W, seed=i, with_loop=not args.no_loop))
            progress.advance(task)
        W = None
        torch.cuda.empty_cache()
        if rows:
            peak_runs.append(measure_peaks())
        result["peaks"] = peaks = best_peaks(peak_runs)
        result["peak_measurements"] = peak_runs
        rows = [with_roofline(row, case, peaks) for row, case in zip(rows, selected, strict=True)]
        if rows:
            from moe_learn.kernels.autotune import TUNED

            result["gemm"], result["gemm_summary"] = rows, summarize_gemm(rows)
            result["tuned_configs"] = [{"key": list(map(str, key)), "config": cfg} for key, cfg in TUNED.items()]
        for name, fn in (("routing", bench_routing), ("moe", bench_moe_forward), ("backward", bench_moe_backward)):
            if name in sections:
                progress.update(task, description=name)
                result[name] = fn()
                progress.advance(task)

    if rows:
        console.print(gemm_table(rows))
        console.print(result["gemm_summary"])
    for name in ("routing", "moe", "backward"):
        if name in result:
            console.print(f"{name}: {result[name]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    (args.out / "results.md").write_text(markdown_report(result))
    if rows:
        save_roofline(rows, peaks, args.out / "roofline.png")
    console.print(f"wrote {args.out / 'results.json'}" + (f" and {args.out / 'roofline.png'}" if rows else ""))
    return 0


def bench_moe_backward(T: int = 1024) -> dict:
    """Backward pass of the fused block vs transformers' eager block, same weights and dY."""
    from moe_learn.layers.experts import moe_experts
    from moe_learn.ops.routing import calculate_topk

    block, x = qwen3_block(T)
    x = x.view(T, -1).requires_grad_(True)
    gate, experts = block.gate.weight, block.experts
    k = MODELS["qwen3-30b-a3b"][3]
    params = [x, gate, experts.gate_up_proj, experts.down_proj]
    dy = torch.randn(T, x.shape[-1], device="cuda", dtype=torch.bfloat16)

    def ours():
        logits = x @ gate.T
        weights, ids = calculate_topk(logits, k, use_sigmoid=False, renormalize=True)
        return moe_experts(x, ids, weights, experts.gate_up_proj, experts.down_proj)

    y_ref, y_ours = block(x.view(1, T, -1)).view(T, -1), ours()
    g_ref = torch.autograd.grad(y_ref, params, dy, retain_graph=True)
    g_ours = torch.autograd.grad(y_ours, params, dy, retain_graph=True)
    names = ("x", "router", "gate_up_proj", "down_proj")
    errs = {n: rel_err(a, b) for n, a, b in zip(names, g_ours, g_ref, strict=True)}
    t_hf = do_bench(lambda: torch.autograd.grad(y_ref, params, dy, retain_graph=True))
    t_ours = do_bench(lambda: torch.autograd.grad(y_ours, params, dy, retain_graph=True))
    t_hf_fwd = do_bench(lambda: block(x.view(1, T, -1)))
    t_ours_fwd = do_bench(ours)
    return {"shape": {"T": T, "model": "qwen3-30b-a3b", "dtype": "bfloat16"}, "forward_rel_err": rel_err(y_ours, y_ref),
            "grad_rel_err": errs, "hf_eager_backward_ms": t_hf * 1e3, "ours_backward_ms": t_ours * 1e3,
            "backward_speedup": t_hf / t_ours, "hf_eager_forward_train_ms": t_hf_fwd * 1e3,
            "ours_forward_train_ms": t_ours_fwd * 1e3,
            "forward_backward_speedup": (t_hf + t_hf_fwd) / (t_ours + t_ours_fwd)}


if __name__ == "__main__":
    sys.exit(main())
