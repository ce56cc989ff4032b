"""``python -m moe_learn bench``: our grouped GEMM against the per-expert loop,
``torch._grouped_mm``, a dense matmul and the roofline, on real MoE shapes (bf16, GPU).

For each case it prints TFLOP/s and the fraction of the roofline floor
``max(FLOPs / measured bf16 matmul peak, bytes / measured copy bandwidth)``, where
bytes = X + all expert weights + Y, each read or written once. Results go to JSON and
a roofline plot (PNG). Without a GPU it says so and exits cleanly.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# name: (hidden H, expert intermediate I, experts E, top-k)
MODELS = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "llama4-scout": (5120, 8192, 16, 1),
    "gpt-oss-20b": (2880, 2880, 32, 4),
}
TOKENS = (1024, 8192)
GEMMS = ("gate_up", "down")


@dataclass
class Case:
    model: str
    gemm: str
    tokens: int
    M: int  # rows after routing: tokens * top-k
    N: int
    K: int
    E: int

    @property
    def flops(self) -> float:
        return 2.0 * self.M * self.N * self.K

    def bytes(self, elem: int = 2) -> float:
        return float(elem) * (self.M * self.K + self.E * self.N * self.K + self.M * self.N)

    @property
    def name(self) -> str:
        return f"{self.model} {self.gemm} T={self.tokens}"


def cases(models=None, tokens=TOKENS) -> list[Case]:
    out = []
    for model in models or MODELS:
        H, I, E, k = MODELS[model]
        for T in tokens:
            for gemm in GEMMS:
                N, K = (2 * I, H) if gemm == "gate_up" else (H, I)
                out.append(Case(model, gemm, T, T * k, N, K, E))
    return out


def measure_peaks(bench) -> dict:
    """The two ceilings, measured here: bf16 matmul TFLOP/s and copy bandwidth (TB/s)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t_mm = bench(lambda: a @ b)
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src))
    del a, b, src, dst
    return {"matmul_tflops": 2 * n**3 / t_mm / 1e12, "copy_tbs": 2 * (1 << 30) * 2 / t_copy / 1e12}


def routing_for(case: Case, top_k: int, seed: int):
    """m_sizes from top-k routing of random router logits (balanced only on average)."""
    from .routing import calculate_topk, get_routing_indices

    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(case.tokens, case.E, device="cuda", generator=g)
    _, ids = calculate_topk(logits, top_k, use_sigmoid=False, renormalize=True)
    counts, _ = get_routing_indices(ids, case.E)
    return counts


def per_expert_loop(X, W, sizes):
    outs, start = [], 0
    for e, m in enumerate(sizes):
        if m:
            outs.append(X[start : start + m] @ W[e].T)
            start += m
    return torch.cat(outs)


def run_gemm_cases(selected: list[Case], bench, peaks, progress=None, ours=None, with_loop=True) -> list[dict]:
    from .kernels.grouped_gemm_hopper import grouped_gemm_hopper

    ours = ours or grouped_gemm_hopper
    rows = []
    weights: dict[tuple, torch.Tensor] = {}
    for i, case in enumerate(selected):
        key = (case.model, case.gemm)
        if key not in weights:
            weights.clear()
            torch.cuda.empty_cache()
            H, I, E, k = MODELS[case.model]
            weights[key] = torch.randn(case.E, case.N, case.K, device="cuda", dtype=torch.bfloat16) * 0.02
        W = weights[key]
        top_k = MODELS[case.model][3]
        m_sizes = routing_for(case, top_k, seed=i)
        sizes = m_sizes.tolist()
        offs = torch.cumsum(m_sizes, 0, dtype=torch.int32)
        X = torch.randn(case.M, case.K, device="cuda", dtype=torch.bfloat16)
        Wt = W.transpose(1, 2)  # [E, K, N] view, column-major per expert: what _grouped_mm wants
        ref = torch._grouped_mm(X, Wt, offs=offs)
        y = torch.full_like(ref, float("nan"))
        ours(X, W, m_sizes, out=y)
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        times = {
            "grouped_mm": bench(lambda: torch._grouped_mm(X, Wt, offs=offs)),
            "ours": bench(lambda: ours(X, W, m_sizes, out=y)),
            "dense": bench(lambda: X @ W[0].T),
        }
        if with_loop:
            times["loop"] = bench(lambda: per_expert_loop(X, W, sizes))
        floor = max(case.flops / (peaks["matmul_tflops"] * 1e12), case.bytes() / (peaks["copy_tbs"] * 1e12))
        row = {
            **asdict(case),
            "name": case.name,
            "rel_err_vs_grouped_mm": err,
            "floor_ms": floor * 1e3,
            "roofline_tflops": case.flops / floor / 1e12,
            "ms": {k: v * 1e3 for k, v in times.items()},
            "tflops": {k: case.flops / v / 1e12 for k, v in times.items()},
            "frac_roofline": {k: floor / v for k, v in times.items()},
        }
        rows.append(row)
        del X, ref, y
        if progress is not None:
            progress()
    return rows


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarize(rows: list[dict]) -> dict:
    speedup = [r["ms"]["grouped_mm"] / r["ms"]["ours"] for r in rows]
    return {
        "geomean_speedup_vs_grouped_mm": geomean(speedup),
        "min_speedup_vs_grouped_mm": min(speedup),
        "geomean_frac_roofline_ours": geomean(r["frac_roofline"]["ours"] for r in rows),
        "geomean_frac_roofline_grouped_mm": geomean(r["frac_roofline"]["grouped_mm"] for r in rows),
        "max_rel_err": max(r["rel_err_vs_grouped_mm"] for r in rows),
    }


def environment() -> dict:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def print_table(rows: list[dict], console) -> None:
    from rich.table import Table

    table = Table(title="grouped GEMM, bf16 (TFLOP/s; fraction of roofline floor)")
    for col in ("case", "M", "N", "K", "E", "loop", "dense", "_grouped_mm", "ours", "roofline", "ours/roof", "ours/gmm"):
        table.add_column(col, justify="right" if col != "case" else "left")
    for r in rows:
        t = r["tflops"]
        table.add_row(
            r["name"], str(r["M"]), str(r["N"]), str(r["K"]), str(r["E"]),
            f"{t['loop']:.0f}" if "loop" in t else "-", f"{t['dense']:.0f}", f"{t['grouped_mm']:.0f}", f"{t['ours']:.0f}",
            f"{r['roofline_tflops']:.0f}", f"{r['frac_roofline']['ours']:.0%}",
            f"{r['ms']['grouped_mm'] / r['ms']['ours']:.2f}x",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-learn bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for results.json and roofline.png")
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), help="models to run (default: all four)")
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    parser.add_argument("--no-loop", action="store_true", help="skip the slow per-expert loop baseline")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    if not torch.cuda.is_available():
        console.print("[yellow]No CUDA GPU here: the benchmark needs one.[/] Stored H100 results: docs/benchmarks.md")
        return 0
    import triton.testing

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3

    selected = cases(args.models, tuple(args.tokens))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("measuring peaks", total=len(selected) + 1)
        peaks = measure_peaks(bench)
        progress.update(task, advance=1, description="grouped GEMM cases")
        rows = run_gemm_cases(selected, bench, peaks, progress=lambda: progress.advance(task), with_loop=not args.no_loop)
    print_table(rows, console)
    summary = summarize(rows)
    console.print(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment(), "peaks": peaks, "gemm": rows, "summary": summary,
              "command": "python -m moe_learn bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
