"""A Triton grouped GEMM over all experts in one launch, with optional fused permutation.

Rows of the (virtual) expert-ordered input are grouped by expert: ``m_sizes[e]`` rows
for expert e, in expert order, no padding. Each expert e multiplies its rows by its own
weight ``W[e]``. The output of expert e is cut into ``cdiv(m_sizes[e], BLOCK_M) x
cdiv(N, BLOCK_N)`` tiles; the tiles of all experts are numbered one after the other
(expert 0's tiles first) and tile ``t`` is computed by program ``t % NUM_PROGRAMS``.

The kernel discovers that layout on the device: every program walks the experts in
order, reads ``m_sizes[e]``, counts the expert's tiles and computes the ones that are
its own. Nothing is read back to the host, so the launch can be captured in a CUDA
graph, and an empty expert costs one scalar load.

Fusions (chapter 07):
  PERMUTE_X  the prologue gathers rows straight from the token-ordered input:
             expert-order row i reads ``X[gather_indices[i] // TOP_K]`` (no permuted copy).
  PERMUTE_Y  the epilogue scatters rows to (token, slot) order: ``out[gather_indices[i]] = Y[i]``.
  HAS_WEIGHTS  (with PERMUTE_Y) each stored row is scaled by its routing weight
             ``topk_weights.flatten()[gather_indices[i]]``.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moe_learn import device as _device
from moe_learn.kernels.autotune import num_sms
from moe_learn.kernels.grouped_gemm_hopper import (
    LaunchPlan,
    auto_candidate,
    grouped_gemm_hopper,
    make_plan,
    unsupported_reason,
)
from moe_learn.kernels.launcher import FastLauncher
from moe_learn.ops.grouped_gemm import expert_of_rows
from moe_learn.validation import (
    check_gather_indices,
    check_integer,
    check_m_sizes,
    check_positive_int,
    check_same_device,
    check_tensor,
)

INT32_MAX = 2**31 - 1
KERNELS = ("auto", "portable", "hopper")


# M changes with every routing; don't compile a variant per M % 16 (or M == 1).
@triton.jit(do_not_specialize=["M"])
def _grouped_gemm_kernel(
    x_ptr,  # [M, K] expert order, or [T, K] token order with PERMUTE_X
    w_ptr,  # [E, N, K] (transpose=True) or [E, K, N]; strides tell the kernel which
    y_ptr,  # [M, N]: expert order, or (token, slot) order with PERMUTE_Y
    m_sizes_ptr,  # [E] rows per expert
    gather_ptr,  # [M] expert-order row -> flat (token, slot) index (PERMUTE_X / PERMUTE_Y)
    topk_weights_ptr,  # [T * TOP_K] routing weights, flat (token, slot) order (HAS_WEIGHTS)
    bias_ptr,  # [E, N] one bias row per expert, unit stride along N (HAS_BIAS)
    M,  # rows of the expert-ordered problem (sum of m_sizes); bounds every row and index the kernel forms
    N,
    K,
    NUM_EXPERTS,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    stride_be,
    TOP_K: tl.constexpr,
    PERMUTE_X: tl.constexpr,
    PERMUTE_Y: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_INT64: tl.constexpr,  # offsets in int64: some tensor has more than 2**31 - 1 elements
    INPUT_PRECISION: tl.constexpr,  # "ieee" (exact fp32) or "tf32" for fp32 inputs on GPU
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # tiles of GROUP_M row blocks are visited column by column (L2 reuse of W)
    NUM_PROGRAMS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)

    # The persistent walk: tiles are numbered over all experts, expert 0 first; this
    # program owns tile ids pid, pid + NUM_PROGRAMS, pid + 2 * NUM_PROGRAMS, ...
    next_tile = pid  # the next tile id this program owns (it may lie in a later expert)
    tiles_before = 0  # tiles of experts 0..e-1
    row_start = 0  # first expert-order row of expert e
    w_expert_ptr = w_ptr  # W[e]
    bias_expert_ptr = bias_ptr  # bias[e]
    for e in range(NUM_EXPERTS):
        # Clamped so that every row stays in [0, M) whatever m_sizes holds (validate=False
        # skips the check): a negative size counts as 0 and no expert reaches past row M.
        m_size = tl.minimum(tl.maximum(tl.load(m_sizes_ptr + e), 0), M - row_start).to(tl.int32)
        num_m_tiles = tl.cdiv(m_size, BLOCK_M)
        tiles_end = tiles_before + num_m_tiles * num_n_tiles
        # An empty expert has no tiles: the loop body never runs.
        while next_tile < tiles_end:
            local = next_tile - tiles_before
            # L2-friendly order inside the expert: GROUP_M row blocks share each W column block.
            tiles_per_group = GROUP_M * num_n_tiles
            first_m = (local // tiles_per_group) * GROUP_M
            group_rows = tl.minimum(num_m_tiles - first_m, GROUP_M)
            tile_m = first_m + (local % tiles_per_group) % group_rows
            tile_n = (local % tiles_per_group) // group_rows

            offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows inside expert e
            offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_k = tl.arange(0, BLOCK_K)
            rows = row_start + offs_m  # expert-order rows
            mask_m = offs_m < m_size  # ragged last row block of the expert
            mask_n = offs_n < N

            if PERMUTE_X or PERMUTE_Y:
                flat = tl.load(gather_ptr + rows, mask=mask_m, other=0)  # (token, slot) of each row
                # an index outside [0, M) (unchecked with validate=False) drops its row: it is
                # never used to read X, the routing weights or to write Y
                mask_m = mask_m & (flat >= 0) & (flat < M)
            if PERMUTE_X:
                x_rows = flat // TOP_K  # the token whose hidden state this row multiplies
            else:
                x_rows = rows
            if PERMUTE_Y:
                y_rows = flat
            else:
                y_rows = rows
            if USE_INT64:
                x_rows = x_rows.to(tl.int64)
                y_rows = y_rows.to(tl.int64)
                offs_n = offs_n.to(tl.int64)
                offs_k = offs_k.to(tl.int64)

            x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
            # B[k, n] = W[e, n, k] (transpose=True) or W[e, k, n]: the strides decide.
            w_ptrs = w_expert_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask_k = offs_k < K - k0  # ragged K tail
                a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
                x_ptrs += BLOCK_K * stride_xk
                w_ptrs += BLOCK_K * stride_wk

            if HAS_BIAS:  # before the routing weight: the expert's output is x @ W.T + b
                acc += tl.load(bias_expert_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if HAS_WEIGHTS:
                weight = tl.load(topk_weights_ptr + flat, mask=mask_m, other=0.0).to(tl.float32)
                acc = acc * weight[:, None]

            y_ptrs = y_ptr + y_rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
            next_tile += NUM_PROGRAMS
        tiles_before = tiles_end
        row_start += m_size
        w_expert_ptr += stride_we  # a pointer step, never e * stride_we: no int32 overflow
        bias_expert_ptr += stride_be


# ---------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------

CONFIG_KEYS = (
    "BLOCK_M",
    "BLOCK_N",
    "BLOCK_K",
    "GROUP_M",
    "NUM_PROGRAMS",
    "num_warps",
    "num_stages",
    "input_precision",
)


def default_config(device: torch.device | str | None = None) -> dict:
    """Launch parameters for ``device``: what ``grouped_gemm`` uses unless told otherwise.

    GPU: 64x128x64 tiles and one persistent program per SM. CPU (interpreter): every
    program and loop step is Python, so few programs and large tiles are fastest.
    Returns a new dict each call (safe to modify).
    """
    device = torch.device(device) if device is not None else _device.DEVICE
    if device.type == "cuda":
        sms = num_sms(device)
        return {
            "BLOCK_M": 64,
            "BLOCK_N": 128,
            "BLOCK_K": 64,
            "GROUP_M": 8,
            "NUM_PROGRAMS": sms,
            "num_warps": 4,
            "num_stages": 3,
            "input_precision": "ieee",  # exact fp32; "tf32" trades ~1e-3 error for speed
        }
    return {
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "BLOCK_K": 64,
        "GROUP_M": 8,
        "NUM_PROGRAMS": 2,
        "num_warps": 4,
        "num_stages": 1,
        "input_precision": "ieee",
    }


def _resolve_config(config: dict | None, device: torch.device) -> dict:
    cfg = default_config(device)
    if config:
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}; allowed: {list(CONFIG_KEYS)}")
        cfg.update(config)
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        value = cfg[key]
        if not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"config[{key!r}] must be a power of two >= 16 (tl.dot needs it), got {value!r}")
    for key in ("GROUP_M", "NUM_PROGRAMS", "num_warps", "num_stages"):
        check_positive_int(f"config[{key!r}]", cfg[key])
    if cfg["input_precision"] not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(
            f"config['input_precision'] must be 'ieee', 'tf32' or 'tf32x3', got {cfg['input_precision']!r}"
        )
    return cfg


# ---------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _max_offset(t: torch.Tensor) -> int:
    """The largest element offset the kernel can form into ``t`` (a view's strides can exceed its numel)."""
    if t.numel() == 0:
        return 0
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))


class Problem(NamedTuple):
    M: int  # rows of the expert-ordered problem
    N: int
    K: int
    num_experts: int


def check_grouped_gemm_args(X, W, m_sizes, *, gather_indices=None, topk=1, permute_x=False, permute_y=False,
                            topk_weights=None, bias=None, transpose=True, out=None, kernel="auto",
                            x_name="X") -> Problem:
    """Shapes, dtypes, devices and flags: everything that needs no device->host copy.

    x_name: what the caller calls X, for the messages (the fused SwiGLU backward's is d_out).
    """
    check_tensor(x_name, X, ndim=2)
    check_tensor("W", W, ndim=3)
    check_tensor("m_sizes", m_sizes, ndim=1)
    check_integer("m_sizes", m_sizes)
    check_positive_int("topk", topk)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if permute_x and gather_indices is None:
        raise ValueError(
            "permute_x=True needs gather_indices (from get_routing_indices) to know which token each row reads"
        )
    if permute_y and gather_indices is None:
        raise ValueError("permute_y=True needs gather_indices (from get_routing_indices) to know where each row goes")
    if topk_weights is not None and not permute_y:
        raise ValueError(
            "topk_weights is only applied with permute_y=True (weights belong to (token, slot) rows); "
            "pass permute_y=True or multiply the weights yourself"
        )
    # Each shape, dtype and device is read once: on a slow host every tensor attribute costs
    # a few hundred nanoseconds, and this runs on every decode-step call.
    if gather_indices is not None:
        check_tensor("gather_indices", gather_indices, ndim=1)
        check_integer("gather_indices", gather_indices)
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, ndim=2)
        if not topk_weights.dtype.is_floating_point:
            raise TypeError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    if bias is not None:
        check_tensor("bias", bias, ndim=2)
    if out is not None:
        check_tensor("out", out, ndim=2)
    device = X.device
    others = (W, m_sizes, gather_indices, topk_weights, bias, out)
    if any(t is not None and t.device != device for t in others):
        check_same_device(**{name: t for name, t in zip((x_name, "W", "m_sizes", "gather_indices", "topk_weights", "bias",
                                                         "out"), (X, *others), strict=True) if t is not None})

    x_rows, x_cols = X.shape
    num_experts, w1, w2 = W.shape
    K, N = (w2, w1) if transpose else (w1, w2)
    if x_cols != K:
        layout = "[E, N, K]" if transpose else "[E, K, N]"
        raise ValueError(
            f"{x_name} has {x_cols} columns but W {tuple(W.shape)} (layout {layout}, transpose={transpose}) "
            f"expects K={K}; check the layout or the transpose flag"
        )
    dtype = X.dtype
    if dtype != W.dtype:
        raise TypeError(f"{x_name} is {dtype} but W is {W.dtype}; cast one so they match")
    if dtype not in _DTYPES:
        raise TypeError(f"{x_name} must be float32, float16 or bfloat16, got {dtype}; cast {x_name} and W "
                        f"(e.g. {x_name}.float())")
    if m_sizes.shape[0] != num_experts:
        raise ValueError(
            f"m_sizes has {m_sizes.numel()} entries but W has {num_experts} experts; "
            "pass one row count per expert (zeros for experts with no tokens)"
        )
    M = x_rows * topk if permute_x else x_rows
    if gather_indices is not None and gather_indices.shape[0] != M:
        want = f"{x_name} rows ({x_rows}) x topk ({topk})" if permute_x else f"{x_name} rows ({x_rows})"
        raise ValueError(f"gather_indices has {gather_indices.numel()} entries, expected {M} = {want}")
    if topk_weights is not None and topk_weights.numel() != M:
        raise ValueError(
            f"topk_weights {tuple(topk_weights.shape)} has {topk_weights.numel()} entries; "
            f"expected [T, topk] with T * topk = {M} (one weight per output row)"
        )
    if bias is not None:
        if tuple(bias.shape) != (num_experts, N):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected [E, N] = {(num_experts, N)}: one row per expert")
        if bias.dtype != dtype:
            raise TypeError(f"bias is {bias.dtype} but X is {dtype}; cast the bias (bias.to(X.dtype))")
    if out is not None:
        if out.shape != (M, N):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(M, N)}")
        if out.dtype != dtype:
            raise TypeError(f"out is {out.dtype} but X is {dtype}; they must match")
    _check_runs_here(X)
    return Problem(M, N, K, num_experts)


def _check_runs_here(X: torch.Tensor) -> None:
    if X.is_cpu and not _device.INTERPRETER:  # (tested here first: this runs on every decode-step call)
        _device.check_kernel_device("grouped_gemm", X)


def check_grouped_gemm_values(m_sizes, gather_indices, problem: Problem) -> None:
    """The checks that read values (one device->host copy): m_sizes, and gather_indices a permutation."""
    check_m_sizes(m_sizes, problem.num_experts, problem.M)
    if gather_indices is not None:
        check_gather_indices(gather_indices, problem.M)


def choose_kernel(kernel: str, config: dict | None, X: torch.Tensor, W: torch.Tensor, transpose: bool) -> str:
    """"hopper" or "portable": what ``kernel`` asks for, and what these operands allow."""
    wants_hopper = kernel == "hopper" or (kernel == "auto" and config is None and auto_candidate(X))
    if not wants_hopper:
        return "portable"
    reason = unsupported_reason(X, W, transpose)
    if reason and kernel == "hopper":
        raise ValueError(f"kernel='hopper' cannot run these operands: {reason}; use kernel='portable'")
    return "portable" if reason else "hopper"


def needs_autograd(*tensors) -> bool:
    """Whether autograd must record this call: grad mode on and some input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def grouped_gemm(
    X: torch.Tensor,
    W: torch.Tensor,
    m_sizes: torch.Tensor,
    *,
    gather_indices: torch.Tensor | None = None,
    topk: int = 1,
    permute_x: bool = False,
    permute_y: bool = False,
    topk_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    transpose: bool = True,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    use_int64: bool | None = None,
    validate: bool | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """``Y_e = X_e @ W_e.T (+ bias[e])`` for every expert e in one Triton launch (see the module doc).

    X: ``[M, K]`` in expert order, or ``[T, K]`` in token order with ``permute_x``
       (then ``M = T * topk``). W: ``[E, N, K]`` (transpose=True) or ``[E, K, N]``.
    m_sizes: ``[E]`` integer rows per expert, summing to M.
    gather_indices: ``[M]`` from ``get_routing_indices``; needed by permute_x / permute_y.
    topk_weights: ``[T, topk]``; only with permute_y: rows are scaled by their weight (after the
       bias), so ``out.view(T, topk, N).sum(1)`` is the combined MoE output.
    bias: ``[E, N]``, one row per expert, added in the epilogue.
    out: optional ``[M, N]`` buffer (same dtype/device as X); every row is written. Not with
       inputs that require grad (as in PyTorch, ``out=`` does not record autograd).
    config: launch parameters overriding ``default_config`` (keys: ``CONFIG_KEYS``; the Hopper
       kernel's keys with ``kernel="hopper"``).
    use_int64: force 64-bit offsets (default: only when an offset into X, W or out can exceed 2**31 - 1).
    validate: check values that need a device->host copy (m_sizes sum, gather_indices a permutation).
       Default: on CPU tensors only, so the GPU path never syncs and can be graph-captured
       (and never under torch.compile). Without it the kernels still never touch memory
       outside the tensors. Shapes, dtypes and devices are always checked.
    kernel: "portable" (this module's kernel), "hopper" (``grouped_gemm_hopper``: TMA loads,
       tile map in registers; chapter 08) or "auto": hopper for bf16/fp16 on an sm90+ GPU
       when no ``config`` is given, else portable.

    Differentiable in every mode (``torch.library`` op ``moe_learn::grouped_gemm``): gradients
    reach X (summed over its k rows when gathered), W (zero for experts with no rows),
    topk_weights and bias. Traceable by ``torch.compile(fullgraph=True)``.
    Returns the output ``[M, N]`` (``out`` when given).

    Host cost: a call that repeats an earlier eager one (same shapes, strides, dtypes, devices,
    alignment and flags; a decode step's GEMMs) skips the checks, the kernel choice and the
    launch key, which that call already worked out (``launch plans``, see ``_PLANS``).
    """
    signature = None
    if PLANS and config is None and use_int64 is None and not validate and not torch.compiler.is_compiling():
        # (keyed on validate as passed: None validates on the CPU, so a plan is kept only where it did not)
        signature = ("grouped_gemm", _layout(X), _layout(W), _layout(m_sizes), _layout(gather_indices),
                     _layout(topk_weights), _layout(bias), _layout(out), topk, permute_x, permute_y, transpose,
                     kernel, validate)
        plan = _PLANS.get(signature)
        if plan is not None and plan.current(X) and not needs_autograd(X, W, topk_weights, bias):
            return plan(X, W, m_sizes, out, gather_indices, topk_weights, bias)
    problem = check_grouped_gemm_args(
        X, W, m_sizes, gather_indices=gather_indices, topk=topk, permute_x=permute_x, permute_y=permute_y,
        topk_weights=topk_weights, bias=bias, transpose=transpose, out=out, kernel=kernel,
    )
    compiling = torch.compiler.is_compiling()
    if validate is None:
        validate = X.device.type == "cpu" and not compiling
    if validate:
        if compiling:
            raise ValueError("validate=True reads values on the host, which torch.compile cannot trace; "
                             "validate before compiling or pass validate=False")
        check_grouped_gemm_values(m_sizes, gather_indices, problem)
    grad = needs_autograd(X, W, topk_weights, bias)
    if out is not None and grad:
        raise ValueError("out= does not record autograd, and X, W, topk_weights or bias requires grad; "
                         "drop out= (the result is differentiable) or call under torch.no_grad()")
    if grad or compiling:
        result = torch.ops.moe_learn.grouped_gemm(
            X, W, m_sizes, gather_indices, topk_weights, bias, topk, permute_x, permute_y, transpose,
            encode_config(config), kernel,
        )
        return out.copy_(result) if out is not None else result
    # Eager, nothing to record: straight to the launch (no dispatcher on the decode hot path).
    result = run_grouped_gemm(X, W, m_sizes, gather_indices, topk_weights, bias, topk, permute_x, permute_y,
                              transpose, config, kernel, out=out, use_int64=use_int64, problem=problem)
    if signature is not None and not validate:
        _remember_plan(signature, X, W, m_sizes, result, gather_indices, topk_weights, bias, topk, permute_x,
                       permute_y, transpose, kernel)
    return result


def grouped_gemm_trusted(X, W, m_sizes, gather_indices=None, topk_weights=None, bias=None, topk=1, permute_x=False,
                         permute_y=False, transpose=True, config=None, kernel="auto") -> torch.Tensor:
    """``grouped_gemm`` for callers whose arguments are consistent by construction: no checks, no validation.

    The layers (``layers/experts.py``) check their arguments once per layer call
    (``run_experts``) and then call this for both GEMMs, forward and backward, so a decode
    step pays for no check twice. Autograd and torch.compile go through the op as in
    ``grouped_gemm`` (whose implementation checks the arguments again, as any op call does).
    """
    if torch.compiler.is_compiling() or needs_autograd(X, W, topk_weights, bias):
        return torch.ops.moe_learn.grouped_gemm(X, W, m_sizes, gather_indices, topk_weights, bias, topk, permute_x,
                                                permute_y, transpose, encode_config(config), kernel)
    signature = None
    if PLANS and config is None:
        signature = ("trusted", _layout(X), _layout(W), _layout(m_sizes), _layout(gather_indices),
                     _layout(topk_weights), _layout(bias), topk, permute_x, permute_y, transpose, kernel)
        plan = _PLANS.get(signature)
        if plan is not None and plan.current(X):
            return plan(X, W, m_sizes, None, gather_indices, topk_weights, bias)
    _check_runs_here(X)
    N, K = (W.shape[1], W.shape[2]) if transpose else (W.shape[2], W.shape[1])
    problem = Problem(X.shape[0] * topk if permute_x else X.shape[0], N, K, W.shape[0])
    result = run_grouped_gemm(X, W, m_sizes, gather_indices, topk_weights, bias, topk, permute_x, permute_y, transpose,
                              config, kernel, problem=problem)
    if signature is not None:
        _remember_plan(signature, X, W, m_sizes, result, gather_indices, topk_weights, bias, topk, permute_x,
                       permute_y, transpose, kernel)
    return result


def grouped_gemm_swiglu(X, W, m_sizes, gather_indices=None, topk=1, permute_x=False, transpose=True, config=None,
                        kernel="auto") -> torch.Tensor:
    """``swiglu(grouped_gemm(X, W, ...))`` with the SwiGLU in the GEMM's epilogue, for inference.

    W is ``gate_up_proj``: ``[E, 2I, K]`` (transpose=True) or ``[E, K, 2I]``, gate half first;
    returns ``[M, I]``. Each program computes a gate tile and the matching up tile and stores
    ``silu(gate) * up`` from its fp32 accumulators: ``[M, 2I]`` is never written or read back.
    Arguments are taken as checked (``layers/experts.run_experts`` did). Where the fused
    kernel does not apply (the portable kernel, autograd, torch.compile, K = 0, bf16 under the
    interpreter) the GEMM and the SwiGLU run one after the other, with the same result.
    """
    from moe_learn.ops.moe import swiglu

    def separate():
        return swiglu(grouped_gemm_trusted(X, W, m_sizes, gather_indices, None, None, topk, permute_x, False,
                                           transpose, config, kernel))

    if torch.compiler.is_compiling() or needs_autograd(X, W):
        return separate()
    signature = None
    if PLANS and config is None:  # a repeat of an earlier call: its plan (which exists only where the fused kernel ran)
        signature = ("swiglu", _layout(X), _layout(W), _layout(m_sizes), _layout(gather_indices), topk, permute_x,
                     transpose, kernel)
        plan = _PLANS.get(signature)
        if plan is not None and plan.current(X):
            return plan(X, W, m_sizes, None, gather_indices, None, None)
    two_i, K = (W.shape[1], W.shape[2]) if transpose else (W.shape[2], W.shape[1])
    if K == 0 or (X.is_cpu and X.dtype == torch.bfloat16) or choose_kernel(kernel, config, X, W, transpose) != "hopper":
        return separate()
    out = X.new_empty(X.shape[0] * topk if permute_x else X.shape[0], two_i // 2)
    grouped_gemm_hopper(X, W, m_sizes, out, gather_indices=gather_indices, topk=topk, permute_x=permute_x,
                        transpose=transpose, config=config, swiglu=True)
    if signature is not None:
        _remember_plan(signature, X, W, m_sizes, out, gather_indices, None, None, topk, permute_x, False, transpose,
                       kernel, swiglu=True)
    return out


# Launch plans (``grouped_gemm_hopper.LaunchPlan``) of eager calls, keyed on everything the checks, the
# kernel choice and the launch key read: each tensor's layout (``_layout``) and the flags. A decode
# step repeats its GEMMs with new tensors of the same layouts, and such a repeat skips straight to
# the launch (perf/NOTES.md: the checks, the kernel choice and the key were most of a call's host
# time). None marks a layout that never takes the Hopper kernel (nothing to keep).
_PLANS: dict[tuple, LaunchPlan | None] = {}
PLANS = os.environ.get("MOE_LEARN_LAUNCH_PLANS", "1") not in ("", "0")  # False: no plans (A/B runs)
MAX_PLANS = 1024  # past that (every decode batch size of many layers, say) the plans start over


def _layout(t: torch.Tensor | None) -> tuple | None:
    """What a launch depends on in a tensor besides its data: shape, strides, dtype, device, 16-byte alignment."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15 == 0)


def _remember_plan(signature, X, W, m_sizes, result, gather_indices, topk_weights, bias, topk, permute_x, permute_y,
                   transpose, kernel, swiglu=False) -> None:
    """Keep the plan of the launch an eager call just made, when it took the Hopper kernel (with a tuned config,
    or the untuned one while tuning is off)."""
    if signature in _PLANS and (_PLANS[signature] is None or _PLANS[signature].current(X)):
        return
    if len(_PLANS) >= MAX_PLANS:
        _PLANS.clear()
    if (result.numel() == 0 or X.shape[1] == 0 or (X.is_cpu and X.dtype == torch.bfloat16)
            or choose_kernel(kernel, None, X, W, transpose) != "hopper"):
        _PLANS[signature] = None  # the portable kernel, or no launch at all: the full path every time
        return
    plan = make_plan(X, W, m_sizes, result, gather_indices=gather_indices, topk=topk, permute_x=permute_x,
                     permute_y=permute_y, topk_weights=topk_weights, bias=bias, transpose=transpose, swiglu=swiglu)
    if plan is not None:  # (None: not tuned yet, or no direct launch now; the next call tries again)
        _PLANS[signature] = plan


def encode_config(config: dict | None) -> str:
    """A config dict as the string a custom op can carry (sorted keys: equal dicts, equal strings)."""
    return "" if not config else json.dumps(config, sort_keys=True)


def decode_config(text: str) -> dict | None:
    return json.loads(text) if text else None


def run_grouped_gemm(X, W, m_sizes, gather_indices, topk_weights, bias, topk, permute_x, permute_y, transpose,
                     config, kernel, *, out=None, use_int64=None, problem: Problem | None = None) -> torch.Tensor:
    """Choose the kernel and launch it (arguments already checked): the op's implementation."""
    M, N, K, _ = problem or check_grouped_gemm_args(
        X, W, m_sizes, gather_indices=gather_indices, topk=topk, permute_x=permute_x, permute_y=permute_y,
        topk_weights=topk_weights, bias=bias, transpose=transpose, out=out, kernel=kernel)
    result = out if out is not None else X.new_empty(M, N)
    if M == 0 or N == 0:
        return result
    if K == 0:  # an empty sum: the bias (if any), weighted
        result.zero_()
        if bias is not None or topk_weights is not None:
            result.copy_(_epilogue_only(result, m_sizes, gather_indices, topk_weights, bias, permute_y))
        return result

    # Triton's interpreter computes bf16 wrong: on the CPU do the work in fp32 and cast back.
    if X.is_cpu and X.dtype == torch.bfloat16:
        target, X_run, W_run = torch.empty(M, N, dtype=torch.float32), X.float(), W.float()
        bias = bias.float() if bias is not None else None
    else:
        target, X_run, W_run = result, X, W
    if choose_kernel(kernel, config, X_run, W_run, transpose) == "hopper":
        grouped_gemm_hopper(X_run, W_run, m_sizes, target, gather_indices=gather_indices, topk=topk,
                            permute_x=permute_x, permute_y=permute_y, topk_weights=topk_weights, bias=bias,
                            transpose=transpose, config=config)
    else:
        launch_portable(X_run, W_run, m_sizes, target, gather_indices=gather_indices, topk=topk, permute_x=permute_x,
                        permute_y=permute_y, topk_weights=topk_weights, bias=bias, transpose=transpose,
                        config=config, use_int64=use_int64)
    if target is not result:
        result.copy_(target)
    return result


def _epilogue_only(result, m_sizes, gather_indices, topk_weights, bias, permute_y):
    """K == 0: every row is its expert's bias (or 0), times its routing weight, in the output's row order."""
    M, N = result.shape
    rows = torch.zeros(M, N, dtype=torch.float32, device=result.device)
    if bias is not None:
        rows = bias.float()[expert_of_rows(m_sizes, M)]
    if permute_y:
        rows = torch.empty_like(rows).index_copy_(0, gather_indices.long(), rows)
        if topk_weights is not None:
            rows = rows * topk_weights.reshape(-1, 1).float()
    return rows.to(result.dtype)


_PORTABLE = FastLauncher(_grouped_gemm_kernel)
_DEFAULT_CONFIGS: dict[torch.device, dict] = {}  # device -> default_config(device), checked once


def _fits_int32(t: torch.Tensor) -> bool:
    """Whether every offset the kernel forms into ``t`` fits in int32 (contiguous: its numel decides)."""
    return t.numel() <= INT32_MAX if t.is_contiguous() else _max_offset(t) <= INT32_MAX


def launch_portable(X, W, m_sizes, target, *, gather_indices, topk, permute_x, permute_y, topk_weights, bias,
                    transpose, config, use_int64) -> None:
    """Launch ``_grouped_gemm_kernel`` into ``target`` (arguments already checked)."""
    M, N = target.shape
    K = X.shape[1]
    if config:
        cfg = _resolve_config(config, X.device)
    else:
        cfg = _DEFAULT_CONFIGS.get(X.device)
        if cfg is None:
            cfg = _DEFAULT_CONFIGS[X.device] = _resolve_config(None, X.device)
    if use_int64 is None:
        use_int64 = not (_fits_int32(X) and _fits_int32(W) and _fits_int32(target))
    m_sizes = m_sizes.contiguous()  # the kernel reads m_sizes[e] and gather_indices[i] at unit stride
    gather = gather_indices.contiguous() if gather_indices is not None else m_sizes  # placeholder when unused
    weights = topk_weights.reshape(-1).contiguous() if topk_weights is not None else m_sizes
    bias = bias.contiguous() if bias is not None else None
    stride_wn, stride_wk = (W.stride(1), W.stride(2)) if transpose else (W.stride(2), W.stride(1))
    args = (X, W, target, m_sizes, gather, weights, bias if bias is not None else m_sizes, M, N, K, W.shape[0],
            X.stride(0), X.stride(1), W.stride(0), stride_wn, stride_wk, target.stride(0), target.stride(1),
            bias.stride(0) if bias is not None else 0)
    constexprs = dict(
        TOP_K=topk,
        PERMUTE_X=permute_x,
        PERMUTE_Y=permute_y,
        HAS_WEIGHTS=topk_weights is not None,
        HAS_BIAS=bias is not None,
        USE_INT64=bool(use_int64),
        INPUT_PRECISION=cfg["input_precision"] if X.dtype == torch.float32 else "tf32",  # only fp32 reads it
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"],
        NUM_PROGRAMS=cfg["NUM_PROGRAMS"],
    )
    _PORTABLE((cfg["NUM_PROGRAMS"],), args, constexprs, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
