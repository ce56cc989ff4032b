"""One GPU call: peaks, baselines and a config sweep of the Hopper grouped GEMM.

    PYTHONUNBUFFERED=1 python perf/sweep_gemm.py $OUT/sweep.json ["qwen3-30b-a3b down T=8192" ...]

Prints, per case, torch._grouped_mm and each config's TFLOP/s, the best config, its
error against _grouped_mm, and whether the compiled kernel uses wgmma. Case names after
the output path restrict the sweep to those cases. Every config is timed REPEATS times,
in turns, so the spread between repeats shows what is noise.
"""

import functools
import json
import sys

import torch

import moe_learn  # noqa: F401
from moe_learn.bench import cases as C
from moe_learn.bench import timing as B
from moe_learn.kernels import autotune
from moe_learn.kernels import grouped_gemm_hopper as H


def _c(m, n, k, w, st, ws=False, programs=None):
    cfg = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st, FLATTEN=not ws, WARP_SPECIALIZE=ws)
    if programs:
        cfg["NUM_PROGRAMS"] = programs
    return cfg


# The tuning candidates, each timed twice, in turns. (Sweep 9's TMA-store variants are in
# commit 314165d, sweep 10's split-K in 3a79db7; earlier sweeps' lists are in this file's history.)
CONFIGS = {
    "m128n256k64s3": _c(128, 256, 64, 8, 3),
    "m128n256k64s4": _c(128, 256, 64, 8, 4),
    "m128n256k64s3ws": _c(128, 256, 64, 8, 3, True),
    "m128n256k64s4ws": _c(128, 256, 64, 8, 4, True),
    "m128n128k128s3": _c(128, 128, 128, 8, 3),
    "m64n128k128w4s4": _c(64, 128, 128, 4, 4),
    "m64n256k64w4s4": _c(64, 256, 64, 4, 4),
}
REPEATS = 2


def bench(fn):
    """The autotuner's own timer: a median over at least ~20 runs, whatever the kernel's length."""
    return autotune.median_seconds(fn)


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else "sweep.json"
    env = B.environment()
    print(env)
    peaks = B.measure_peaks()
    print("peaks", peaks)
    wanted = sys.argv[2:]
    rows = []
    W = None
    last = None
    for i, case in enumerate(C.cases()):
        if wanted and case.name not in wanted:
            continue
        if (case.model, case.gemm) != last:
            W = None
            torch.cuda.empty_cache()
            W = torch.randn(case.E, case.N, case.K, device="cuda", dtype=torch.bfloat16) * 0.02
            last = (case.model, case.gemm)
        top_k = C.MODELS[case.model][3]
        m_sizes = C.routing_counts(case.tokens, case.E, top_k, seed=i)
        offs = torch.cumsum(m_sizes, 0, dtype=torch.int32)
        X = torch.randn(case.M, case.K, device="cuda", dtype=torch.bfloat16)
        Wt = W.transpose(1, 2)
        ref = torch._grouped_mm(X, Wt, offs=offs)
        t_gmm = bench(functools.partial(torch._grouped_mm, X, Wt, offs=offs))
        floor = max(case.flops / (peaks["matmul_tflops"] * 1e12), case.bytes() / (peaks["copy_tbs"] * 1e12))
        res = {"case": case.name, "gmm_tflops": case.flops / t_gmm / 1e12, "roof_tflops": case.flops / floor / 1e12,
               "max_rows": int(m_sizes.max()), "configs": {}}
        y = torch.empty_like(ref)
        for _ in range(REPEATS):
            for name, cfg in CONFIGS.items():
                if "error" in res["configs"].get(name, {}):
                    continue
                try:
                    y.fill_(float("nan"))
                    H.grouped_gemm_hopper(X, W, m_sizes, y, config=cfg)
                    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                    t = bench(functools.partial(H.grouped_gemm_hopper, X, W, m_sizes, y, config=cfg))
                    entry = res["configs"].setdefault(name, {"err": err, "all": []})
                    entry["all"].append(case.flops / t / 1e12)
                    entry["tflops"] = max(entry["all"])
                except Exception as exc:  # a config that does not fit (shared memory) is reported, not fatal
                    res["configs"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
        ok = {k: v for k, v in res["configs"].items() if "tflops" in v}
        best = max(ok, key=lambda k: ok[k]["tflops"])
        res["best"] = best
        top = sorted(ok, key=lambda k: -ok[k]["tflops"])[:4]
        shown = "  ".join(f"{k} {'/'.join(f'{v:.0f}' for v in ok[k]['all'])}" for k in top)
        print(f"{case.name:32s} rows/exp {case.M / case.E:6.0f} | gmm {res['gmm_tflops']:4.0f} roof "
              f"{res['roof_tflops']:4.0f} | {shown}", flush=True)
        errors = {k: v["error"] for k, v in res["configs"].items() if "error" in v}
        if errors:
            print("   errors:", errors, flush=True)
        rows.append(res)
    # does the compiled kernel use Hopper's wgmma?
    try:
        for kern in list(H._grouped_gemm_tma_kernel.device_caches[0][0].values())[:4]:  # Triton 3.6 layout
            asm = kern.asm.get("ptx", "")
            print("compiled variant uses wgmma:", "wgmma" in asm, "| regs", getattr(kern, "n_regs", "?"),
                  "spills", getattr(kern, "n_spills", "?"))
    except Exception as exc:
        print("could not read the compiled kernels:", exc)
    # which schedule/config wins most often, and geomeans per config
    for name in CONFIGS:
        vals = [r["configs"][name].get("tflops", 0) / r["gmm_tflops"] for r in rows]
        if all(vals):
            print(f"  {name:28s} geomean vs gmm {B.geomean(vals):.3f} min {min(vals):.3f}")
    json.dump({"env": env, "peaks": peaks, "rows": rows}, open(out_path, "w"), indent=1)

    speed = [r["configs"][r["best"]]["tflops"] / r["gmm_tflops"] for r in rows]
    frac = [r["configs"][r["best"]]["tflops"] / r["roof_tflops"] for r in rows]
    gfrac = [r["gmm_tflops"] / r["roof_tflops"] for r in rows]
    print(f"best-per-case: geomean vs grouped_mm {B.geomean(speed):.3f}, min {min(speed):.3f}, "
          f"roofline frac {B.geomean(frac):.3f} (grouped_mm {B.geomean(gfrac):.3f})")


if __name__ == "__main__":
    main()
