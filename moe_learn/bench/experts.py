"""The experts section: the experts half of an MoE layer, ours against what a user would otherwise run.

Every implementation takes the same contract, ``(hidden [T, H], top-k ids [T, k], top-k weights
[T, k]) -> [T, H]`` over weights ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` (gate
half first, then up; plain SwiGLU, no biases):

* ``default``: transformers 5.x's default experts path (``experts_implementation="grouped_mm"``:
  sort by expert, ``torch.nn.functional.grouped_mm``, torch's CUTLASS grouped GEMM), on the
  model's own experts module built from its config;
* ``liger``: Liger-Kernel's Triton fused MoE (``LigerFusedMoEFunction``), when installed;
* ``ours``: ``moe_learn.layers.experts.moe_experts`` (backend "triton");
* ``eager``: transformers' per-expert loop, forward only, as context (its backward builds a
  full-size weight gradient per expert, which makes DeepSeek-V3's take seconds).

Each case draws one weight set, one routing and one upstream gradient that every implementation
uses; the outputs and the four gradients are checked against a float32 reference computed one
expert at a time (so DeepSeek-V3's 22 GB of bf16 weights never exist in float32).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from moe_learn.bench.cases import ExpertsCase, route

LIGER_MISSING = "Liger-Kernel not installed (pip install liger-kernel)"
GRADS = ("d_hidden", "d_weights", "d_gate_up", "d_down")


@dataclass
class Implementation:
    """One way to run the experts: ``build(case, gate_up, down)`` returns ``f(hidden, ids, weights)``."""

    name: str
    label: str
    build: Callable | None
    ids_dtype: torch.dtype = torch.int64
    training: bool = True  # time forward+backward too
    missing: str | None = None  # why it cannot run here


# ---------------------------------------------------------------------------------------
# The implementations
# ---------------------------------------------------------------------------------------


def _build_ours(case, gate_up, down):
    from moe_learn.layers.experts import moe_experts

    return lambda hidden, ids, weights: moe_experts(hidden, ids, weights, gate_up, down, backend="triton")


def _transformers_module(case: ExpertsCase, implementation: str, gate_up, down):
    """The model's own experts module from its config, holding ``gate_up``/``down`` as its parameters."""
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    H, I, E, k = case.H, case.I, case.E, case.k
    if case.model == "mixtral-8x7b":
        module, config = MixtralExperts, MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                                       num_experts_per_tok=k)
    elif case.model == "deepseek-v3":
        module, config = DeepseekV3Experts, DeepseekV3Config(hidden_size=H, moe_intermediate_size=I,
                                                             n_routed_experts=E, num_experts_per_tok=k)
    else:  # Qwen3-MoE, and the plain-SwiGLU problem of other shapes (gpt-oss: see cases.EXPERTS_NOTES)
        module, config = Qwen3MoeExperts, Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                                         num_experts_per_tok=k)
    config._experts_implementation = implementation
    with torch.device("meta"):  # no second copy of the weights: the parameters are ours, assigned below
        experts = module(config)
    experts.gate_up_proj, experts.down_proj = gate_up, down
    return experts


def _transformers(implementation: str) -> Callable:
    def build(case, gate_up, down):
        experts = _transformers_module(case, implementation, gate_up, down)
        return lambda hidden, ids, weights: experts(hidden, ids, weights)

    return build


def _build_liger(case, gate_up, down):
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    # forward(ctx, x, gate_up_proj, down_proj, top_k_index (int32), top_k_weights); returns [T, H]
    return lambda hidden, ids, weights: LigerFusedMoEFunction.apply(hidden, gate_up, down, ids, weights)


def _import_problem(module: str, missing: str) -> str | None:
    """None when ``module`` imports, else why not (a broken install is reported, not raised)."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return missing
    except Exception as e:  # noqa: BLE001 (a package that fails to import must not end the benchmark)
        return f"{missing.split(' not installed')[0]} failed to import: {_one_line(e)}"
    return None


def implementations(with_eager: bool = True) -> list[Implementation]:
    """ours, transformers' default, Liger-Kernel (and transformers' eager loop), each marked when missing."""
    no_hf = _import_problem("transformers", "transformers not installed (pip install 'transformers>=5')")
    no_liger = _import_problem("liger_kernel.ops.fused_moe", LIGER_MISSING)
    out = [
        Implementation("ours", "ours", _build_ours),
        Implementation("default", "transformers default (grouped_mm)", _transformers("grouped_mm"), missing=no_hf),
        Implementation("liger", "Liger-Kernel", _build_liger, ids_dtype=torch.int32, missing=no_liger),
    ]
    if with_eager:
        out.append(Implementation("eager", "transformers eager loop", _transformers("eager"), training=False,
                                  missing=no_hf))
    return out


# ---------------------------------------------------------------------------------------
# The float32 reference
# ---------------------------------------------------------------------------------------


@contextmanager
def _ieee_float32_matmuls():
    """Full float32 matmuls inside: a reference in TF32 would be about as rough as what it checks."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


def reference_errors(got: dict, hidden, ids, weights, gate_up, down, d_out) -> dict[str, float]:
    """Relative errors ``||got - ref|| / ||ref||`` of one implementation's results.

    got: any of "out" (forward), "out_train" (the forward that backward used), "d_hidden",
    "d_weights", "d_gate_up", "d_down". The reference runs in float32 (float64 for float32
    inputs), one expert at a time, through autograd on the textbook formulas.
    """
    acc = torch.float64 if hidden.dtype in (torch.float32, torch.float64) else torch.float32
    num_tokens, top_k = ids.shape
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    tokens, slots = order // top_k, order % top_k
    out = hidden.new_zeros(hidden.shape, dtype=acc)
    d_hidden, d_weights = torch.zeros_like(out), hidden.new_zeros((num_tokens, top_k), dtype=acc)
    sums = {name: [0.0, 0.0] for name in ("d_gate_up", "d_down") if name in got}  # ||got - ref||^2, ||ref||^2
    start = 0
    with _ieee_float32_matmuls(), torch.enable_grad():
        for e, m in enumerate(counts):
            t, j = tokens[start : start + m], slots[start : start + m]
            start += m
            x = hidden.detach()[t].to(acc).requires_grad_(True)
            w = weights.detach()[t, j].to(acc).requires_grad_(True)
            w1 = gate_up.detach()[e].to(acc).requires_grad_(True)
            w2 = down.detach()[e].to(acc).requires_grad_(True)
            gate, up = (x @ w1.T).chunk(2, dim=-1)
            y = w.unsqueeze(-1) * ((F.silu(gate) * up) @ w2.T)
            gx, gw, gw1, gw2 = torch.autograd.grad(y, (x, w, w1, w2), d_out.detach()[t].to(acc))
            out.index_add_(0, t, y.detach())
            d_hidden.index_add_(0, t, gx)
            d_weights[t, j] = gw
            for name, ref in (("d_gate_up", gw1), ("d_down", gw2)):
                if name in sums:
                    sums[name][0] += (got[name][e].to(acc) - ref).square().sum().item()
                    sums[name][1] += ref.square().sum().item()
    refs = {"out": out, "out_train": out, "d_hidden": d_hidden, "d_weights": d_weights}
    errs = {name: ((got[name].to(acc) - ref).norm() / ref.norm()).item() for name, ref in refs.items() if name in got}
    errs.update({name: (diff / ref) ** 0.5 for name, (diff, ref) in sums.items()})
    return errs


# ---------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def guarded(fn: Callable):
    """``(fn(), None)``, or ``(None, why)`` when it raised: one failing implementation, or one case
    that does not fit in memory, is reported in its row and the benchmark goes on."""
    try:
        return fn(), None
    except torch.OutOfMemoryError as e:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None, f"out of memory: {_one_line(e)}"
    except Exception as e:  # noqa: BLE001 (reported per case, see the docstring)
        return None, f"{type(e).__name__}: {_one_line(e)}"


def _peak_mib(call: Callable) -> float:
    """GPU memory one call allocates beyond what was live before it, at its peak (MiB): for training,
    what the forward keeps for the backward plus the backward's temporaries."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return round(peak / 2**20, 1)


def make_problem(case: ExpertsCase, seed: int, device="cuda", dtype=torch.bfloat16) -> dict:
    """Weights, hidden states, routing and upstream gradient: random (never zeros), drawn once per case."""
    g = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape, std=1.0):  # drawn in place: no float32 temporary of DeepSeek-V3's weights
        return torch.empty(*shape, device=device, dtype=dtype).normal_(0.0, std, generator=g)

    weights, ids = route(case.tokens, case.E, case.k, seed, device)
    return {
        # nn.Parameter: transformers' experts modules hold them as their own parameters
        "gate_up": torch.nn.Parameter(normal(case.E, 2 * case.I, case.H, std=0.02)),
        "down": torch.nn.Parameter(normal(case.E, case.H, case.I, std=0.02)),
        "hidden": normal(case.tokens, case.H).requires_grad_(True),
        "weights": weights.to(dtype).requires_grad_(True),
        "ids": ids,
        "d_out": normal(case.tokens, case.H),
    }


def bench_experts_case(case: ExpertsCase, impls: list[Implementation], *, seed: int = 0, device="cuda",
                       dtype=torch.bfloat16, timed: bool = True, progress: bool = False) -> dict:
    """One case: every implementation checked against the reference, then timed (forward with no
    grad; forward+backward as ``autograd.grad`` of the output against the same ``d_out``).
    progress: print each implementation's setup time (its first calls and the check) when it is known."""
    from moe_learn.bench.timing import do_bench

    row = {**asdict(case), "name": case.name, "note": case.note, "flops_forward": case.flops_forward,
           "flops_training": case.flops_training, "forward": {}, "training": {}, "rel_err": {}, "setup_s": {}}
    problem, error = guarded(lambda: make_problem(case, seed, device, dtype))
    if error:
        row["error"] = error
        return row
    p = problem
    params = (p["hidden"], p["weights"], p["gate_up"], p["down"])
    for impl in impls:
        if impl.missing:
            for mode in ("forward", "training") if impl.training else ("forward",):
                row[mode][impl.name] = {"error": impl.missing}
            continue
        fn, error = guarded(lambda impl=impl: impl.build(case, p["gate_up"], p["down"]))
        ids = p["ids"].to(impl.ids_dtype)

        def forward(fn=fn, ids=ids):
            with torch.no_grad():
                return fn(p["hidden"], ids, p["weights"])

        def training(fn=fn, ids=ids):
            return torch.autograd.grad(fn(p["hidden"], ids, p["weights"]), params, p["d_out"])

        def check(impl=impl, forward=forward, fn=fn, ids=ids):
            # also the first calls, which compile and autotune before any timing
            got = {"out": forward()}
            if impl.training:
                out = fn(p["hidden"], ids, p["weights"])
                got["out_train"] = out.detach()
                got.update(zip(GRADS, torch.autograd.grad(out, params, p["d_out"]), strict=True))
            return reference_errors(got, p["hidden"], p["ids"], p["weights"], p["gate_up"], p["down"], p["d_out"])

        if error is None:
            started = time.perf_counter()
            row["rel_err"][impl.name], error = guarded(check)
            # the first calls compile and autotune: minutes for some shapes, worth knowing apart from the timings
            row["setup_s"][impl.name] = round(time.perf_counter() - started, 1)
            if progress:  # a case can spend minutes compiling and tuning: say where the time goes as it goes
                print(f"  {case.name} {impl.name}: checked in {row['setup_s'][impl.name]} s", flush=True)
        if error:
            row["rel_err"][impl.name] = {"error": error}
            for mode in ("forward", "training") if impl.training else ("forward",):
                row[mode][impl.name] = {"error": error}
            continue
        modes = (("forward", forward, case.flops_forward),)
        if impl.training:
            modes += (("training", training, case.flops_training),)
        for mode, call, flops in modes if timed else ():
            seconds, error = guarded(lambda call=call: do_bench(call))
            row[mode][impl.name] = {"error": error} if error else {"ms": seconds * 1e3,
                                                                   "tflops": flops / seconds / 1e12}
            if not error and torch.cuda.is_available() and str(device).startswith("cuda"):
                row[mode][impl.name]["peak_mib"] = _peak_mib(call)
        fn = forward = training = check = None  # drop the module (it holds the weights) before the next one
        gc.collect()
    return row
