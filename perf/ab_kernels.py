"""A/B of the kernel paths of issue #15 on one GPU: each new path, the old one, torch._grouped_mm.

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python3 perf/ab_kernels.py $OUT/ab.json [--sections dx,dw,decode,experts]

Sections (all by default, in this order; later ones reuse the tuned configs of earlier ones):

* dx: the backward's two dX GEMMs as the experts' backward calls them (GEMM2's dX gathers dY
  rows from (token, slot) order, GEMM1's scatters to it; W read as [E, K, N]):
  new = the Hopper TMA kernel (``grouped_gemm_hopper.KN_LAYOUT``), old = the portable kernel,
  and ``torch._grouped_mm`` on the same rows already permuted (so it does less work).
* dw: the two weight gradients as the experts' backward calls them (X gathered by the kernel):
  new = the persistent TMA dW kernel (``backward.DW_KERNEL="auto"``), old = the grid of small
  tiles (``"portable"``), and ``torch._grouped_mm(dY.T, X, offs)`` on permuted rows.
* decode: gpt-oss-120b's two GEMMs at T = 1 and 64 tokens, plain (expert-ordered X, out=),
  as the bench's decode section: new = decode buckets (``SMALL_M``) and the direct launch
  (``launcher.DIRECT``), old = neither; eager back-to-back calls (host included) and CUDA graph.
  Then the whole experts call (``moe_experts``, inference) at the same sizes: new adds the
  SwiGLU in GEMM1's epilogue (``experts.FUSED_SWIGLU``); the error column is against "new".
* experts: the experts half of the layer, forward+backward (and forward alone), Qwen3-30B-A3B
  and Mixtral at T = 8192: ours with every switch new, ours with every switch old, and
  transformers' default ``grouped_mm`` experts when transformers is installed.
* swiglu: the same calls (and Qwen3 T = 1024) with training's SwiGLU fused into the GEMMs'
  epilogues or run as separate passes (``kernels.swiglu.FUSED``): fused, separate, fused again.

Every variant's output is compared with ``_grouped_mm``'s (or the float32 reference for the
experts); a relative error above 2e-2 is marked BAD. Rows are written to the JSON as they
finish, so a run cut short keeps what it measured. Expect several minutes: every new tuning
bucket compiles its candidates on first use.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import json
import time

import torch

import moe_learn  # noqa: F401
from moe_learn.bench import timing
from moe_learn.bench.cases import MODELS, ExpertsCase, route
from moe_learn.kernels import autotune, launcher
from moe_learn.kernels import backward as bw

gg = importlib.import_module("moe_learn.kernels.grouped_gemm")  # the module (the package exports the function)
hopper = importlib.import_module("moe_learn.kernels.grouped_gemm_hopper")
experts_mod = importlib.import_module("moe_learn.layers.experts")

SECTIONS = ("dx", "dw", "decode", "experts", "swiglu")
TRAIN_CASES = (("qwen3-30b-a3b", 8192), ("mixtral-8x7b", 8192))
DECODE_CASES = (("gpt-oss-120b", 1), ("gpt-oss-120b", 64))
BAD = 2e-2
DEVICE, DTYPE = "cuda", torch.bfloat16  # (a CPU smoke run of this script sets cpu and float32)
timing.REST_S = 0.5  # shorter rests than the bench's 1.5 s: A/B pairs are timed back to back, in one run


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free():
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def switches(new: bool) -> None:
    """Every path of this work on (new) or off (old). Tuned choices depend on them: forget those."""
    launcher.DIRECT = new
    hopper.KN_LAYOUT = new
    hopper.SMALL_M = new
    bw.DW_KERNEL = "auto" if new else "portable"
    experts_mod.FUSED_SWIGLU = new
    autotune.TUNED.clear()


def rel_err(got, ref) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


class Recorder:
    def __init__(self, path):
        self.path, self.rows, self.meta = path, [], {"env": timing.environment(), "started": time.time()}

    def add(self, **row):
        self.rows.append(row)
        err = row.get("rel_err")
        flag = " BAD" if err is not None and not err <= BAD else ""
        extra = "".join(f" {k}={v:.1f}" for k, v in row.items() if k.endswith(("_us", "_mib")) and v is not None)
        ms = f"{row['ms']:.3f} ms" if row.get("ms") is not None else ""
        print(f"  {row['section']:<8} {row['case']:<34} {row['variant']:<18} {ms}{extra}"
              f"{'' if err is None else f' err={err:.1e}'}{flag}{' ' + row['error'] if 'error' in row else ''}",
              flush=True)
        with open(self.path, "w") as f:
            json.dump({**self.meta, "rows": self.rows}, f, indent=1)


def timed(rec, fn, ref, **row):
    """Run ``fn`` once (compile, tune, check against ``ref``), then time it; record either way."""
    try:
        out = fn()
        sync()
        err = rel_err(out, ref) if ref is not None else None
        seconds = timing.do_bench(fn)
        rec.add(**row, ms=seconds * 1e3, rel_err=err)
    except Exception as exc:  # noqa: BLE001 - one failing variant must not end the run
        rec.add(**row, ms=None, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}")


def training_problem(model, T, seed=0):
    """The operands of one experts backward: routing, weights, and the row tensors its GEMMs see."""
    H, I, E, k = MODELS[model]  # noqa: E741
    dev, dt = DEVICE, DTYPE
    weights, ids = route(T, E, k, seed, dev)
    counts, gather = experts_mod.route_rows(ids, E)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    g = gather.long()
    p = dict(H=H, I=I, E=E, k=k, counts=counts, gather=gather, offs=offs,
             w1=torch.randn(E, 2 * I, H, device=dev, dtype=dt) * 0.02,
             w2=torch.randn(E, H, I, device=dev, dtype=dt) * 0.02,
             hidden=torch.randn(T, H, device=dev, dtype=dt),
             d_y=torch.randn(T * k, H, device=dev, dtype=dt),  # (token, slot) order, as the backward has it
             d_gate_up=torch.randn(T * k, 2 * I, device=dev, dtype=dt),  # expert order
             h=torch.randn(T * k, I, device=dev, dtype=dt))  # expert order
    p["d_y_sorted"] = p["d_y"][g]  # what _grouped_mm needs: rows already in expert order
    p["hidden_sorted"] = p["hidden"][g // k]
    return p


def section_dx(rec):
    for model, T in TRAIN_CASES:
        _dx_case(rec, model, T)
        free()


def _dx_case(rec, model, T):
    p = training_problem(model, T)
    c, gi = p["counts"], p["gather"]
    # GEMM2's dX: dh = d_y (gathered) @ W2_e, W2 [E, H, I] read as [E, K=H, N=I]
    ref = torch._grouped_mm(p["d_y_sorted"], p["w2"], offs=p["offs"])
    name = f"{model} T={T} down dX"
    for variant, kern in (("new (hopper)", "hopper"), ("old (portable)", "portable")):
        timed(rec, lambda kern=kern: gg.grouped_gemm(p["d_y"], p["w2"], c, gather_indices=gi, permute_x=True,
                                                     transpose=False, validate=False, kernel=kern),
              ref, section="dx", case=name, variant=variant)
    timed(rec, lambda: torch._grouped_mm(p["d_y_sorted"], p["w2"], offs=p["offs"]), ref, section="dx",
          case=name, variant="_grouped_mm")
    # GEMM1's dX: dx rows = d_gate_up @ W1_e, W1 [E, 2I, H] read as [E, K=2I, N=H], scattered
    ref = torch.empty(T * p["k"], p["H"], device=DEVICE, dtype=DTYPE)
    ref[gi.long()] = torch._grouped_mm(p["d_gate_up"], p["w1"], offs=p["offs"])
    name = f"{model} T={T} gate_up dX"
    for variant, kern in (("new (hopper)", "hopper"), ("old (portable)", "portable")):
        timed(rec, lambda kern=kern: gg.grouped_gemm(p["d_gate_up"], p["w1"], c, gather_indices=gi,
                                                     permute_y=True, transpose=False, validate=False,
                                                     kernel=kern),
              ref, section="dx", case=name, variant=variant)
    timed(rec, lambda: torch._grouped_mm(p["d_gate_up"], p["w1"], offs=p["offs"]), None, section="dx",
          case=name, variant="_grouped_mm")


def _grouped_mm_dw(dy_sorted, x_sorted, offs):
    """dW_e = dY_e.T @ X_e as torch's autograd of grouped_mm computes it: offsets along the reduction."""
    return torch._grouped_mm(dy_sorted.t(), x_sorted, offs=offs)


def section_dw(rec):
    for model, T in TRAIN_CASES:
        _dw_case(rec, model, T)
        free()


def _dw_case(rec, model, T):
    p = training_problem(model, T)
    c, gi, k = p["counts"], p["gather"], p["k"]
    # GEMM1's dW: dg_e.T @ x_e, x gathered from token order: [E, 2I, H]
    name = f"{model} T={T} gate_up dW"
    ref = _grouped_mm_dw(p["d_gate_up"], p["hidden_sorted"], p["offs"])
    for variant, kern in (("new (hopper)", "hopper"), ("old (portable)", "portable")):
        timed(rec, lambda kern=kern: bw.grouped_gemm_dw(p["hidden"], p["d_gate_up"], c, gather_indices=gi,
                                                        topk=k, permute_x=True, validate=False, kernel=kern),
              ref, section="dw", case=name, variant=variant)
    timed(rec, lambda: _grouped_mm_dw(p["d_gate_up"], p["hidden_sorted"], p["offs"]), ref, section="dw",
          case=name, variant="_grouped_mm")
    # GEMM2's dW, as the experts' backward computes it: h_e.T @ dy_e (dy gathered), stored [E, H, I]
    name = f"{model} T={T} down dW"
    ref = _grouped_mm_dw(p["d_y_sorted"], p["h"], p["offs"])  # [E, H, I]
    for variant, kern in (("new (hopper)", "hopper"), ("old (portable)", "portable")):
        timed(rec, lambda kern=kern: bw.grouped_gemm_dw(p["d_y"], p["h"], c, gather_indices=gi, topk=1,
                                                        permute_x=True, transpose=False, validate=False,
                                                        kernel=kern),
              ref, section="dw", case=name, variant=variant)
    timed(rec, lambda: _grouped_mm_dw(p["d_y_sorted"], p["h"], p["offs"]), ref, section="dw", case=name,
          variant="_grouped_mm")


def _eager_us(fn, calls=200) -> float:
    """Per call of back-to-back eager calls, host included: what a decode loop pays."""
    for _ in range(20):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls * 1e6


def section_decode(rec):
    for model, T in DECODE_CASES:
        H, I, E, k = MODELS[model]  # noqa: E741
        _, ids = route(T, E, k, 0, DEVICE)
        counts, _ = experts_mod.route_rows(ids, E)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        for gemm, (N, K) in (("gate_up", (2 * I, H)), ("down", (H, I))):
            W = torch.randn(E, N, K, device=DEVICE, dtype=DTYPE) * 0.02
            X = torch.randn(T * k, K, device=DEVICE, dtype=DTYPE)
            y = torch.empty(T * k, N, device=DEVICE, dtype=DTYPE)
            ref = torch._grouped_mm(X, W.transpose(1, 2), offs=offs)
            name = f"{model} {gemm} T={T}"
            for variant, new in (("new", True), ("old", False)):
                switches(new)
                fn = functools.partial(gg.grouped_gemm, X, W, counts, out=y)
                try:
                    fn()
                    err = rel_err(y, ref)
                    rec.add(section="decode", case=name, variant=variant, ms=None, rel_err=err,
                            eager_us=_eager_us(fn), graph_us=timing.do_bench_graph(fn) * 1e6)
                except Exception as exc:  # noqa: BLE001
                    rec.add(section="decode", case=name, variant=variant, ms=None, error=f"{type(exc).__name__}: {exc}")
            switches(True)
            fn = functools.partial(torch._grouped_mm, X, W.transpose(1, 2), offs=offs)
            rec.add(section="decode", case=name, variant="_grouped_mm", ms=None, rel_err=None,
                    eager_us=_eager_us(fn), graph_us=timing.do_bench_graph(fn) * 1e6)
            del W
            free()
        _decode_experts(rec, model, T)
        free()


def _decode_experts(rec, model, T):
    """The whole experts call at decode size (routing given as ids), inference: what a decode step pays."""
    from moe_learn.bench import experts as bx

    case = ExpertsCase(model, T, *MODELS[model])
    p = bx.make_problem(case, seed=0, device=DEVICE, dtype=DTYPE)
    hidden, weights = p["hidden"].detach(), p["weights"].detach()
    name = f"{model} experts T={T}"
    ref = None
    impls = [("new", True, None), ("old", False, None)]
    default = next(i for i in bx.implementations(with_eager=False) if i.name == "default")
    if default.missing is None:
        impls.append(("grouped_mm (transformers default)", True, default))
    for variant, new, impl in impls:
        switches(new)
        try:
            call = (impl.build(case, p["gate_up"], p["down"]) if impl else
                    functools.partial(experts_mod.moe_experts, gate_up_proj=p["gate_up"], down_proj=p["down"]))
            fn = functools.partial(torch.no_grad()(call), hidden, p["ids"], weights)
            out = fn()
            ref = out if ref is None else ref
            rec.add(section="decode", case=name, variant=variant, ms=None, rel_err=rel_err(out, ref),
                    eager_us=_eager_us(fn), graph_us=timing.do_bench_graph(fn) * 1e6)
        except Exception as exc:  # noqa: BLE001
            rec.add(section="decode", case=name, variant=variant, ms=None,
                    error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}")
    switches(True)


def section_experts(rec):
    from moe_learn.bench import experts as bx

    impls = {i.name: i for i in bx.implementations(with_eager=False)}
    for model, T in TRAIN_CASES:
        _experts_case(rec, bx, impls, ExpertsCase(model, T, *MODELS[model]))
        switches(True)
        free()


def section_swiglu(rec):
    """Training's SwiGLU in the GEMMs' epilogues (``kernels.swiglu.FUSED``) against the separate passes.

    Fused, separate, fused again (so drift between the first and the last shows), everything else new.
    """
    from moe_learn.bench import experts as bx
    from moe_learn.kernels import swiglu as swiglu_kernels

    def fused(on):
        return lambda: (switches(True), setattr(swiglu_kernels, "FUSED", on))

    impls = {i.name: i for i in bx.implementations(with_eager=False)}
    variants = [("fused swiglu", impls["ours"], fused(True)), ("separate swiglu", impls["ours"], fused(False)),
                ("fused swiglu (again)", impls["ours"], fused(True))]
    for model, T in (("qwen3-30b-a3b", 1024), *TRAIN_CASES):
        _experts_case(rec, bx, impls, ExpertsCase(model, T, *MODELS[model]), variants, section="swiglu")
        swiglu_kernels.FUSED = True
        free()


def _experts_case(rec, bx, impls, case, variants=None, section="experts"):
    p = bx.make_problem(case, seed=0, device=DEVICE, dtype=DTYPE)
    params = (p["hidden"], p["weights"], p["gate_up"], p["down"])
    if variants is None:
        variants = [("new", impls["ours"], lambda: switches(True)), ("old", impls["ours"], lambda: switches(False))]
        if impls["default"].missing is None:
            variants.append(("grouped_mm (transformers default)", impls["default"], lambda: switches(True)))
    for variant, impl, setup in variants:
        setup()
        try:
            fn = impl.build(case, p["gate_up"], p["down"])
            ids = p["ids"].to(impl.ids_dtype)
            out = fn(p["hidden"], ids, p["weights"])
            grads = torch.autograd.grad(out, params, p["d_out"])
            errs = bx.reference_errors({"out_train": out.detach(), **dict(zip(bx.GRADS, grads, strict=True))},
                                       p["hidden"], p["ids"], p["weights"], p["gate_up"], p["down"], p["d_out"])
            err = max(errs.values())
            del out, grads

            def forward(fn=fn, ids=ids):
                with torch.no_grad():
                    return fn(p["hidden"], ids, p["weights"])

            def training(fn=fn, ids=ids):
                return torch.autograd.grad(fn(p["hidden"], ids, p["weights"]), params, p["d_out"])

            forward()
            for mode, call, flops in (("forward", forward, case.flops_forward),
                                      ("fwd+bwd", training, case.flops_training)):
                seconds = timing.do_bench(call)
                sync()
                peak = None
                if DEVICE == "cuda":  # one more call, for its peak memory
                    torch.cuda.reset_peak_memory_stats()
                    call()
                    peak = torch.cuda.max_memory_allocated() / 2**20
                rec.add(section=section, case=f"{case.name} {mode}", variant=variant, ms=seconds * 1e3,
                        rel_err=err, tflops=flops / seconds / 1e12, peak_mib=peak)
        except Exception as exc:  # noqa: BLE001
            rec.add(section=section, case=case.name, variant=variant, ms=None,
                    error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}")
        fn = forward = training = None
        gc.collect()


def table(rows) -> str:
    lines = [f"{'section':<8} {'case':<36} {'variant':<34} {'ms':>9} {'eager us':>9} {'graph us':>9} "
             f"{'vs _grouped_mm':>14} {'err':>8}"]
    base = {(r["section"], r["case"]): r for r in rows if r["variant"].startswith(("_grouped_mm", "grouped_mm"))}
    for r in rows:
        b = base.get((r["section"], r["case"]))
        t, tb = (r.get("ms"), b and b.get("ms")) if r["section"] != "decode" else (r.get("eager_us"),
                                                                                      b and b.get("eager_us"))
        ratio = f"{tb / t:.2f}x" if t and tb and r is not b else ""
        fmt = lambda v: "" if v is None else f"{v:.3f}" if v < 100 else f"{v:.1f}"  # noqa: E731
        err = r.get("rel_err")
        lines.append(f"{r['section']:<8} {r['case']:<36} {r['variant']:<34} {fmt(r.get('ms')):>9} "
                     f"{fmt(r.get('eager_us')):>9} {fmt(r.get('graph_us')):>9} {ratio:>14} "
                     f"{'' if err is None else f'{err:.1e}':>8}{' BAD' if err is not None and not err <= BAD else ''}"
                     f"{' ' + r['error'] if 'error' in r else ''}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON path for the rows")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args()
    wanted = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    rec = Recorder(args.out)
    print(rec.meta["env"], flush=True)
    switches(True)
    for name in SECTIONS:
        if name in wanted:
            print(f"== {name}", flush=True)
            start = time.time()
            globals()[f"section_{name}"](rec)
            print(f"   ({time.time() - start:.0f} s)", flush=True)
    print(table(rec.rows))


if __name__ == "__main__":
    main()
