"""Host time per call of the decode-sized grouped GEMM and experts, against torch._grouped_mm.

    PYTHONPATH=$PWD python3 perf/host_overhead.py [$OUT/host.json]     # on a GPU
    PYTHONPATH=$PWD python3 perf/host_overhead.py --stub               # on a CPU: our Python alone

GPU: each row times back-to-back eager calls with a host clock (batches of 50 with no sync in between,
each batch started on an idle GPU, the columns' batches taking turns), so ``host us/call`` is what the CPU
spends per call; a CUDA graph replay of the same call gives the GPU time. An eager decode step costs
max(host, GPU): the target (issue #15) is host <= 15 us for ``grouped_gemm`` and the fused experts.
Rows: ours as shipped (launch plans, the direct launch, cached tensor maps, addresses); for
``moe_experts`` at these sizes the decode path (``kernels/decode_experts.py``; two launches, and one) and,
beside it, the grouped path; ``torch._grouped_mm``. Columns (``VARIANTS``): as shipped; without launch
plans ("no plan": every call checks, chooses the kernel and computes the launch key; ``grouped_gemm.PLANS``);
with the plans passing tensors instead of addresses ("tensors": the C launcher asks the driver about each
pointer; ``launcher.POINTER_INTS``); without the cached maps ("no raw": Triton's launcher wrapper makes the
maps per call; ``launcher.RAW``); through Triton's own launch (``launcher.DIRECT``).

--stub (no GPU): the compiled kernel's C launcher is replaced by a no-op and the direct path
(with cached tensor maps) is forced on, so the time is our wrapper's Python (checks, key, descriptors,
allocation) without the launcher itself (Triton's C launcher adds a few us on a GPU). The experts rows
then also include the CPU doing the SwiGLU and the sum over the k slots for real.
"""

from __future__ import annotations

import functools
import importlib
import json
import statistics
import sys
import time

import torch

import moe_learn  # noqa: F401  (interpreter on CPU)
from moe_learn.kernels import autotune, decode_experts, launcher

gg = importlib.import_module("moe_learn.kernels.grouped_gemm")  # the module (the package exports the function)
hopper = importlib.import_module("moe_learn.kernels.grouped_gemm_hopper")
experts = importlib.import_module("moe_learn.layers.experts")

CALLS = 2000
# (name, E, H, I, top-k, tokens): gpt-oss-120b and Qwen3-30B-A3B decode
CASES = [("gpt-oss-120b", 128, 2880, 2880, 4, 1), ("gpt-oss-120b", 128, 2880, 2880, 4, 64),
         ("qwen3-30b-a3b", 128, 2048, 768, 8, 1)]


def host_us(fn, variants: dict, calls=CALLS, batches=40) -> dict:
    """Host microseconds per call of ``fn`` under each variant: {column: median over ``batches`` of the mean
    host time per call in back-to-back calls}. A variant is None (as shipped) or (module, switch, value), the
    A/B switch set while its batches run.

    The variants' batches take turns (round robin), so a host that speeds up or slows down while it is
    measured moves every column alike (timed one column after another, neighbouring columns of one row
    differed by up to 2x on the benchmark VMs: perf/NOTES.md item 25). Each batch starts on an idle GPU (a
    sync, not timed) and queues 50 calls, up to a few hundred launches: fewer than the GPU's launch queue
    holds, so no call waits for the GPU and a call that is faster on the GPU than on the host is not timed at
    its GPU time (before session 12, 2000 calls without a sync filled the queue)."""
    per_batch = calls // batches

    def batch(variant, n):
        def run():
            sync()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - start) / n * 1e6
        return run() if variant is None else switched(*variant, run)

    for variant in variants.values():  # warm up each way of calling (the first call may compile or plan)
        batch(variant, 50)
    times = {column: [] for column in variants}
    for _ in range(batches):
        for column, variant in variants.items():
            times[column].append(batch(variant, per_batch))
    sync()
    return {column: statistics.median(values) for column, values in times.items()}


# The columns: as shipped, then each A/B switch off (``host_us`` takes their batches in turn)
VARIANTS = {
    "host_us": None,
    "host_us_no_plan": (gg, "PLANS", False),  # every call through the checks, the kernel choice and the launch key
    "host_us_tensors": (launcher, "POINTER_INTS", False),  # plans pass tensors: the C launcher checks each pointer
    "host_us_no_raw": (launcher, "RAW", False),  # direct, but through Triton's launcher wrapper (maps made per call)
    "host_us_triton_launch": (launcher, "DIRECT", False),  # kernel[grid](...)
}
STUB_VARIANTS = {column: VARIANTS[column] for column in ("host_us", "host_us_no_plan")}  # (no launcher to A/B)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def graph_us(fn) -> float:
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def stub_the_launch():
    """Force the direct path and make the compiled kernel's launch a no-op (CPU: measures our Python)."""

    class NoKernel:
        function = packed_metadata = None

        def run(self, *args):
            pass

    launcher.INTERPRETER = False
    # the interpreter's functions list no parameters, so the launch key would cover no argument: key them
    # all as Triton would (do_not_specialize aside), or the stub leaves out the key's per-argument cost
    key = launcher.FastLauncher.key

    def key_every_argument(self, args, constexprs, options, device):
        if len(self.loose) != len(args):
            self.loose = (False,) * len(args)
        return key(self, args, constexprs, options, device)

    launcher.FastLauncher.key = key_every_argument
    launcher._current_device = lambda: 0
    launcher._current_stream = lambda device: 0

    class NoRawLaunch:
        """The raw launch (launcher.RawLaunch) with a no-op for the C launcher: plans take the GPU's path."""

        def __init__(self, args):
            self.positions = [i for i, arg in enumerate(args) if isinstance(arg, launcher.TensorDescriptor)]
            self.metas = [None] * len(self.positions)

        def make_arg(self, desc, meta):
            return [desc.base.data_ptr(), *desc.shape, *desc.strides]

        def __call__(self, grid, stream, args):
            pass

        def call_with_maps(self, grid, stream, args, maps):
            pass

    launcher.FastLauncher._compile = lambda self, key, args, constexprs, options: launcher.Compiled(
        key, NoKernel(), [constexprs[n] for n in self.fn.arg_names[len(args):]], NoRawLaunch(args), constexprs,
        options, tuple(i for i, arg in enumerate(args) if isinstance(arg, torch.Tensor)))
    # on a GPU the bucket is tuned on the first call; here: the first candidate, cached the same way
    hopper.autotune_enabled = lambda X: True
    hopper.choose_config = lambda key, configs, run: autotune.TUNED.setdefault(key, dict(configs[0]))


def cases(device, dtype):
    from moe_learn.bench.cases import route

    for name, E, H, I, k, T in CASES:  # noqa: E741
        weights, ids = route(T, E, k, seed=0, device=device)
        counts, gather = experts.route_rows(ids, E)
        x = torch.randn(T, H, device=device, dtype=dtype)
        # real weights on a GPU; on the CPU (--stub) never-touched memory: only the host path runs
        weight = (lambda *s: torch.randn(*s, device=device, dtype=dtype) * 0.02) if device == "cuda" else (
            lambda *s: torch.empty(*s, dtype=dtype))
        w1, w2 = weight(E, 2 * I, H), weight(E, H, I)
        h = torch.randn(T * k, I, device=device, dtype=dtype)
        y = torch.empty(T * k, H, device=device, dtype=dtype)
        yield f"{name} T={T}", dict(x=x, w1=w1, w2=w2, h=h, y=y, counts=counts, gather=gather, weights=weights,
                                    ids=ids, k=k)


def pytorch_routing(fn, *args):
    """``fn(*args)`` on the grouped path with the routing of given ids as eight PyTorch ops (the A/B of
    ``experts.ROUTE_IDS_KERNEL``)."""
    return switched(experts, "ROUTE_IDS_KERNEL", False, grouped_path, fn, *args)


def switched(module, name: str, value, fn, *args):
    """``fn(*args)`` with ``module.name`` (an A/B switch) set to ``value``, restored after."""
    default = getattr(module, name)
    setattr(module, name, value)
    try:
        return fn(*args)
    finally:
        setattr(module, name, default)


def one_launch(fn, *args):
    """``fn(*args)`` with the decode path in one launch (``decode_experts.ONE_LAUNCH``)."""
    return switched(decode_experts, "ONE_LAUNCH", True, fn, *args)


def grouped_path(fn, *args):
    """``fn(*args)`` on the grouped path (routing, two grouped GEMMs, sum) instead of the decode path."""
    return switched(experts, "DECODE_EXPERTS", False, fn, *args)


def calls(c, kernel):
    """name -> zero-argument call, for one case."""
    out = {
        "grouped_gemm down (out=)": lambda: gg.grouped_gemm(c["h"], c["w2"], c["counts"], out=c["y"], kernel=kernel,
                                                             validate=False),
        "grouped_gemm down scatter+weights": lambda: gg.grouped_gemm(
            c["h"], c["w2"], c["counts"], gather_indices=c["gather"], permute_y=True, topk_weights=c["weights"],
            kernel=kernel, validate=False),
        "grouped_gemm_trusted gate_up gather": lambda: gg.grouped_gemm_trusted(
            c["x"], c["w1"], c["counts"], c["gather"], topk=c["k"], permute_x=True, kernel=kernel),
        "experts (routing given)": lambda: experts.run_experts(c["x"], c["counts"], c["gather"], c["weights"],
                                                               c["w1"], c["w2"]),
        "moe_experts (ids in)": lambda: experts.moe_experts(c["x"], c["ids"], c["weights"], c["w1"], c["w2"]),
        "moe_experts (ids in), one launch": lambda: one_launch(
            experts.moe_experts, c["x"], c["ids"], c["weights"], c["w1"], c["w2"]),
        "moe_experts (ids in), grouped path": lambda: grouped_path(
            experts.moe_experts, c["x"], c["ids"], c["weights"], c["w1"], c["w2"]),
        "moe_experts (ids in), PyTorch routing": lambda: pytorch_routing(
            experts.moe_experts, c["x"], c["ids"], c["weights"], c["w1"], c["w2"]),
    }
    return out


def main():
    stub = "--stub" in sys.argv
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    on_gpu = torch.cuda.is_available() and not stub
    if stub:
        stub_the_launch()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    kernel = "auto" if on_gpu else "hopper"
    rows = []
    with torch.no_grad():
        for case, c in cases(device, dtype):
            offs = torch.cumsum(c["counts"], 0, dtype=torch.int32)
            w2t = c["w2"].transpose(1, 2)
            for name, fn in calls(c, kernel).items():
                fn()  # compiles and tunes
                row = {"case": case, "call": name, **host_us(fn, VARIANTS if on_gpu else STUB_VARIANTS)}
                if on_gpu:
                    row["graph_us"] = graph_us(fn)
                rows.append(row)
            if on_gpu:
                gmm = functools.partial(torch._grouped_mm, c["h"], w2t, offs=offs)
                rows.append({"case": case, "call": "torch._grouped_mm down", **host_us(gmm, {"host_us": None}),
                             "graph_us": graph_us(gmm)})
    print(f"{'case':<26} {'call':<38} {'host us':>8} {'no plan':>8} {'tensors':>8} {'no raw':>7} "
          f"{'triton launch':>14} {'graph us':>9}")
    for r in rows:
        cells = [f"{r[name]:.1f}" if name in r else "-" for name in (
            "host_us_no_plan", "host_us_tensors", "host_us_no_raw", "host_us_triton_launch", "graph_us")]
        print(f"{r['case']:<26} {r['call']:<38} {r['host_us']:8.1f} {cells[0]:>8} {cells[1]:>8} {cells[2]:>7} "
              f"{cells[3]:>14} {cells[4]:>9}")
    if paths:
        with open(paths[0], "w") as f:
            json.dump({"stub": stub, "device": torch.cuda.get_device_name() if on_gpu else "cpu", "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
