"""The SwiGLU between training's two GEMMs, with the routing weight folded in, as Triton kernels.

Training keeps GEMM1's output ``gate_up [M, 2I]`` (expert order) for the backward. Row r
belongs to (token, slot) ``gather_indices[r]`` and carries the routing weight
``w_r = topk_weights.flat[gather_indices[r]]``:

    forward    h_r = w_r * silu(gate_r) * up_r                      GEMM2's input [M, I]
    backward   given d_h (= d_out_t @ W2_e, GEMM2's dX, read with the token's d_out row):
               d_w[gather_indices[r]] = <d_h_r, silu(gate_r) * up_r>
               d_gate_r = w_r d_h_r * up_r * sig(gate_r) * (1 + gate_r (1 - sig(gate_r)))
               d_up_r   = w_r d_h_r * silu(gate_r)
               h_r again (dW2's operand), recomputed: nothing but gate_up is kept

Each is one pass over the rows in float32 (``ops.moe.weighted_swiglu`` and
``weighted_swiglu_backward`` are the PyTorch references). Folding w into h is what lets the
backward skip the unweighted expert outputs ``[M, H]`` that ``d_w = <d_out, y>`` would need,
and the weighted copy of ``d_out`` ``[M, H]`` that GEMM2's gradients would read: the six
PyTorch element-wise passes those took cost more than the GEMMs on Qwen3-30B-A3B (perf/NOTES.md).
A gather index outside ``[0, T*k)`` (never from ``route_rows``) gives its row weight 0 and
writes no ``d_w``.

On a Hopper GPU neither pass runs on its own: ``gemm_weighted_swiglu`` computes GEMM1 and
stores gate_up and h from its accumulators (the forward never reads gate_up back), and
``gemm_swiglu_backward`` computes GEMM2's dX and applies the backward above to each tile
of d_h while it is still in registers (d_h ``[M, I]`` is never written). The separate
kernels here remain for the other paths (the portable kernel, CPU bf16, K or I = 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_learn.device import check_kernel_device
from moe_learn.kernels import autotune
from moe_learn.kernels.grouped_gemm import (
    check_grouped_gemm_args,
    choose_kernel,
    encode_config,
    needs_autograd,
    run_grouped_gemm,
)
from moe_learn.kernels.grouped_gemm_hopper import grouped_gemm_hopper, tuning_key
from moe_learn.kernels.launcher import FastLauncher, next_power_of_2
from moe_learn.validation import check_floating, check_integer, check_tensor

BLOCK_R = 8  # rows per program: the weight and d_w of a row are loaded / stored once


# the row counts change with the batch: no variant per M % 16 (nor a launcher-cache entry per value)
@triton.jit(do_not_specialize=["M", "NUM_WEIGHTS"])
def _weighted_swiglu_kernel(gate_up_ptr, weights_ptr, gather_ptr, h_ptr, M, I, NUM_WEIGHTS,
                            BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < M
    flat = tl.load(gather_ptr + rows, mask=mask_r, other=0)
    valid = mask_r & (flat >= 0) & (flat < NUM_WEIGHTS)
    w = tl.load(weights_ptr + flat, mask=valid, other=0.0).to(tl.float32)[:, None]
    gate_rows = gate_up_ptr + rows.to(tl.int64)[:, None] * (2 * I)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * I
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)[None, :]
        mask = mask_r[:, None] & (cols < I)
        gate = tl.load(gate_rows + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_rows + I + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_rows + cols, (w * (gate * tl.sigmoid(gate)) * up).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "NUM_WEIGHTS"])
def _weighted_swiglu_backward_kernel(gate_up_ptr, d_h_ptr, weights_ptr, gather_ptr, d_gate_up_ptr, h_ptr, d_w_ptr,
                                     M, I, NUM_WEIGHTS, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < M
    flat = tl.load(gather_ptr + rows, mask=mask_r, other=0)
    valid = mask_r & (flat >= 0) & (flat < NUM_WEIGHTS)
    w = tl.load(weights_ptr + flat, mask=valid, other=0.0).to(tl.float32)[:, None]
    wide = rows.to(tl.int64)[:, None] * (2 * I)
    narrow = rows.to(tl.int64)[:, None] * I
    d_w = tl.zeros([BLOCK_R], dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)[None, :]
        mask = mask_r[:, None] & (cols < I)
        gate = tl.load(gate_up_ptr + wide + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + wide + I + cols, mask=mask, other=0.0).to(tl.float32)
        d_h = tl.load(d_h_ptr + narrow + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        s = silu * up
        d_w += tl.sum(d_h * s, axis=1)
        d_s = w * d_h
        tl.store(d_gate_up_ptr + wide + cols, (d_s * up * sig * (1 + gate * (1 - sig))).to(
            d_gate_up_ptr.dtype.element_ty), mask=mask)
        tl.store(d_gate_up_ptr + wide + I + cols, (d_s * silu).to(d_gate_up_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + narrow + cols, (w * s).to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(d_w_ptr + flat, d_w, mask=valid)


# launched straight through the compiled kernels (Triton's own launch path costs 25-40 us of host time)
_SWIGLU = FastLauncher(_weighted_swiglu_kernel)
_SWIGLU_BACKWARD = FastLauncher(_weighted_swiglu_backward_kernel)


def _block_i(inner: int) -> int:
    return min(512, next_power_of_2(max(inner, 16)))


def _check(gate_up, topk_weights, gather_indices, d_h=None) -> None:
    check_tensor("gate_up", gate_up, ndim=2)
    if gate_up.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"gate_up must be float32, float16 or bfloat16 (the kernels compute in float32), got "
                        f"{gate_up.dtype}; for float64 use moe_learn.ops.moe.weighted_swiglu, the reference")
    check_tensor("topk_weights", topk_weights)
    check_floating("topk_weights", topk_weights)
    check_tensor("gather_indices", gather_indices, ndim=1)
    check_integer("gather_indices", gather_indices)
    rows, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up must have an even number of columns (gate half, then up half), got {width}")
    if gather_indices.shape[0] != rows:
        raise ValueError(f"gather_indices has {gather_indices.shape[0]} entries, expected one per gate_up row ({rows})")
    if d_h is not None:
        check_tensor("d_h", d_h, ndim=2)
        check_floating("d_h", d_h)
        if tuple(d_h.shape) != (rows, width // 2):
            raise ValueError(f"d_h has shape {tuple(d_h.shape)}, expected {(rows, width // 2)} (gate_up's rows, I)")
    devices = {t.device for t in (gate_up, topk_weights, gather_indices, d_h) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"gate_up, topk_weights, gather_indices and d_h must be on one device, got {devices}")
    check_kernel_device("weighted_swiglu" if d_h is None else "weighted_swiglu_backward", gate_up)


def _interpreter_bf16(*tensors) -> bool:
    """Triton's interpreter computes bf16 wrong: on the CPU such calls run in float32 and cast back."""
    return any(t.is_cpu and t.dtype == torch.bfloat16 for t in tensors)


def run_weighted_swiglu(gate_up, topk_weights, gather_indices):
    """``h [M, I]``, h_r = w[gather_indices[r]] * silu(gate_r) * up_r (arguments checked)."""
    M, I = gate_up.shape[0], gate_up.shape[1] // 2  # noqa: E741
    if _interpreter_bf16(gate_up, topk_weights):
        return run_weighted_swiglu(gate_up.float(), topk_weights.float(), gather_indices).to(gate_up.dtype)
    gate_up, weights, gather = gate_up.contiguous(), topk_weights.reshape(-1).contiguous(), gather_indices.contiguous()
    h = gate_up.new_empty(M, I)
    if M and I:
        _SWIGLU(((M + BLOCK_R - 1) // BLOCK_R,), (gate_up, weights, gather, h, M, I, weights.numel()),
                dict(BLOCK_R=BLOCK_R, BLOCK_I=_block_i(I)), {})
    return h


def run_weighted_swiglu_backward(gate_up, topk_weights, gather_indices, d_h):
    """``(d_gate_up [M, 2I], d_topk_weights float32 like topk_weights, h [M, I])`` (arguments checked)."""
    M, I = gate_up.shape[0], gate_up.shape[1] // 2  # noqa: E741
    if _interpreter_bf16(gate_up, topk_weights, d_h):
        d_gate_up, d_w, h = run_weighted_swiglu_backward(gate_up.float(), topk_weights.float(), gather_indices,
                                                         d_h.float())
        return d_gate_up.to(gate_up.dtype), d_w, h.to(gate_up.dtype)
    gate_up, d_h = gate_up.contiguous(), d_h.to(gate_up.dtype).contiguous()
    weights, gather = topk_weights.reshape(-1).contiguous(), gather_indices.contiguous()
    d_gate_up, h = torch.empty_like(gate_up), gate_up.new_empty(M, I)
    d_w = torch.zeros(topk_weights.shape, dtype=torch.float32, device=gate_up.device)  # a slot no row names gets 0
    if M and I:
        _SWIGLU_BACKWARD(((M + BLOCK_R - 1) // BLOCK_R,),
                         (gate_up, d_h, weights, gather, d_gate_up, h, d_w, M, I, weights.numel()),
                         dict(BLOCK_R=BLOCK_R, BLOCK_I=_block_i(I)), {})
    elif M:  # I == 0: empty rows, an empty sum
        d_gate_up.zero_()
    return d_gate_up, d_w, h


def weighted_swiglu(gate_up: torch.Tensor, topk_weights: torch.Tensor, gather_indices: torch.Tensor) -> torch.Tensor:
    """``h_r = topk_weights.flat[gather_indices[r]] * silu(gate_r) * up_r`` for ``gate_up = [gate | up]`` ``[M, 2I]``.

    topk_weights: ``[T, k]`` (any shape with ``T*k`` entries); gather_indices ``[M]`` from the
    routing. Returns ``[M, I]`` in gate_up's dtype. Differentiable (``moe_learn::weighted_swiglu``,
    backward ``weighted_swiglu_backward``); traceable by ``torch.compile``.
    """
    _check(gate_up, topk_weights, gather_indices)
    if torch.compiler.is_compiling() or needs_autograd(gate_up, topk_weights):
        return torch.ops.moe_learn.weighted_swiglu(gate_up, topk_weights, gather_indices)
    return run_weighted_swiglu(gate_up, topk_weights, gather_indices)  # eager, nothing to record


def weighted_swiglu_backward(gate_up, topk_weights, gather_indices, d_h):
    """The backward of ``weighted_swiglu`` given ``d_h [M, I]``: ``(d_gate_up, d_topk_weights, h)``.

    d_topk_weights has topk_weights' shape, in float32 (zero for a slot no row names); h is
    the forward's output, recomputed (training's dW2 reads it). Not differentiable again.
    """
    _check(gate_up, topk_weights, gather_indices, d_h)
    if needs_autograd(gate_up, topk_weights, d_h):
        raise ValueError("weighted_swiglu_backward is not differentiable (no double backward), and gate_up, "
                         "topk_weights or d_h requires grad; call it under torch.no_grad() or pass detached tensors")
    if torch.compiler.is_compiling():
        return torch.ops.moe_learn.weighted_swiglu_backward(gate_up, topk_weights, gather_indices, d_h)
    return run_weighted_swiglu_backward(gate_up, topk_weights, gather_indices, d_h)


# ---------------------------------------------------------------------------------------
# Fused with the GEMMs around it (the Hopper kernel's epilogue)
# ---------------------------------------------------------------------------------------

FUSED = True  # A/B switch (perf/ab_kernels.py): False always runs the GEMM, then the kernels above
# Fused is not always faster. The epilogue's extra traffic (read gate_up, write d_gate_up and h) runs
# on the SMs between two tiles' main loops instead of overlapping them, so where the GEMM is compute
# bound the separate element-wise pass wins: on an H100, Qwen3-30B-A3B T=8192 fwd+bwd took 5.52 ms
# fused and 4.75 separate, Mixtral T=8192 33.6 and 28.8; at T=1024 (host bound there: two launches
# fewer) 2.35 and 3.35 (perf/NOTES.md item 20). So the first call of each shape bucket times both
# ways, as the autotuner times configs, and later calls in the bucket take the winner.
MEASURED_CHOICE = True


def _fused_applies(X, W, transpose, config, kernel, width) -> bool:
    """The Hopper kernel takes the operands; K and I nonzero; not bf16 under the interpreter."""
    return (FUSED and X.shape[1] > 0 and width > 0 and not (X.is_cpu and X.dtype == torch.bfloat16)
            and choose_kernel(kernel, config, X, W, transpose) == "hopper")


def _fused_or_separate(mode, X, W, topk, transpose, config, fused, separate):
    """``fused()`` or ``separate()``: the faster for this shape bucket, timed on its first call.

    Without tuning (the interpreter, ``MOE_LEARN_AUTOTUNE=0``, CUDA-graph capture) a bucket
    not timed before runs fused. A given ``config`` (one launch's parameters) runs fused too.
    """
    if not MEASURED_CHOICE or config:
        return fused()
    rows, K = X.shape[0] * topk, X.shape[1]
    N = W.shape[1] if transpose else W.shape[2]
    key = ("swiglu", *tuning_key(rows, N, K, W.shape[0], X.dtype, True, False, True, False, not transpose, mode))
    choice = autotune.TUNED.get(key)
    if choice is None:
        if not autotune.autotune_enabled(X):
            return fused()
        ways = {True: fused, False: separate}
        choice = autotune.choose_config(key, ({"FUSED": True}, {"FUSED": False}), lambda c: ways[c["FUSED"]]())
    return fused() if choice["FUSED"] else separate()


def _check_fused(name, x_name, X, W, m_sizes, gather_indices, topk_weights, topk, transpose, kernel,
                 gate_up=None) -> None:
    """The arguments of the two fused calls (``x_name``: what the caller calls the GEMM's X)."""
    problem = check_grouped_gemm_args(X, W, m_sizes, gather_indices=gather_indices, topk=topk, permute_x=True,
                                      transpose=transpose, kernel=kernel, x_name=x_name)
    check_tensor("topk_weights", topk_weights, ndim=2)
    check_floating("topk_weights", topk_weights)
    if topk_weights.numel() != problem.M or topk_weights.device != X.device:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} on {topk_weights.device} must be [T, topk] with "
                         f"T * topk = {problem.M}, on {X.device}")
    if gate_up is None:
        if problem.N % 2:
            raise ValueError(f"W has {problem.N} outputs per expert; gate_up_proj has an even number (gate, then up)")
    else:
        check_tensor("gate_up", gate_up, ndim=2)
        if tuple(gate_up.shape) != (problem.M, 2 * problem.N) or gate_up.dtype != X.dtype:
            raise ValueError(f"gate_up {tuple(gate_up.shape)} {gate_up.dtype} must be GEMM1's output "
                             f"[M, 2I] = {(problem.M, 2 * problem.N)} in {X.dtype}")
        if gate_up.device != X.device:
            raise ValueError(f"gate_up is on {gate_up.device} but {name}'s other tensors are on {X.device}")
    if needs_autograd(X, W, topk_weights, gate_up):
        raise ValueError(f"{name} is not differentiable (the layer's autograd.Function calls it), and an input "
                         "requires grad; call it under torch.no_grad() or use moe_learn.moe_experts")


def run_gemm_weighted_swiglu(X, W, m_sizes, gather_indices, topk_weights, topk, transpose, config, kernel):
    """``gemm_weighted_swiglu`` without the checks (the op's implementation)."""
    M, two_i = X.shape[0] * topk, (W.shape[1] if transpose else W.shape[2])
    gather_indices = gather_indices.contiguous()

    def fused():
        gate_up, h = X.new_empty(M, two_i), X.new_empty(M, two_i // 2)
        grouped_gemm_hopper(X, W, m_sizes, h, gather_indices=gather_indices, topk=topk, permute_x=True,
                            topk_weights=topk_weights, transpose=transpose, config=config, swiglu="save",
                            gate_up=gate_up)
        return gate_up, h

    def separate():
        gate_up = run_grouped_gemm(X, W, m_sizes, gather_indices, None, None, topk, True, False, transpose, config,
                                   kernel)
        return gate_up, run_weighted_swiglu(gate_up, topk_weights, gather_indices)

    if _fused_applies(X, W, transpose, config, kernel, two_i):
        return _fused_or_separate("save", X, W, topk, transpose, config, fused, separate)
    return separate()


def run_gemm_swiglu_backward(d_out, W, m_sizes, gather_indices, gate_up, topk_weights, topk, transpose, config,
                             kernel):
    """``gemm_swiglu_backward`` without the checks (the op's implementation)."""
    M, two_i = gate_up.shape
    gather_indices, gate_up = gather_indices.contiguous(), gate_up.contiguous()

    def fused():
        d_gate_up, h = torch.empty_like(gate_up), gate_up.new_empty(M, two_i // 2)
        d_weights = torch.empty(topk_weights.shape, dtype=torch.float32, device=gate_up.device)
        grouped_gemm_hopper(d_out, W, m_sizes, h, gather_indices=gather_indices, topk=topk, permute_x=True,
                            topk_weights=topk_weights, transpose=transpose, config=config, swiglu="backward",
                            gate_up=gate_up, d_gate_up=d_gate_up, d_weights=d_weights.view(-1))
        return d_gate_up, d_weights, h

    def separate():
        d_h = run_grouped_gemm(d_out, W, m_sizes, gather_indices, None, None, topk, True, False, transpose, config,
                               kernel)
        return run_weighted_swiglu_backward(gate_up, topk_weights, gather_indices, d_h)

    if M and _fused_applies(d_out, W, transpose, config, kernel, two_i):
        return _fused_or_separate("backward", d_out, W, topk, transpose, config, fused, separate)
    return separate()


def gemm_weighted_swiglu(X, W, m_sizes, gather_indices, topk_weights, *, topk, transpose=True, config=None,
                         kernel="auto"):
    """Training's GEMM1 and weighted SwiGLU: ``(gate_up [M, 2I], h [M, I])``, M = T * topk.

    ``gate_up = grouped_gemm(X, W, m_sizes, gather_indices=..., topk=topk, permute_x=True)``
    (X ``[T, H]`` in token order, W = gate_up_proj ``[E, 2I, H]``, or ``[E, H, 2I]`` with
    transpose=False) and ``h = weighted_swiglu(gate_up, topk_weights, gather_indices)``. On the
    Hopper kernel both come out of one epilogue; elsewhere the two kernels run one after the
    other. Not differentiable (``moe_experts``'s autograd.Function calls it); traceable by
    ``torch.compile`` (op ``moe_learn::gemm_weighted_swiglu``).
    """
    _check_fused("gemm_weighted_swiglu", "X", X, W, m_sizes, gather_indices, topk_weights, topk, transpose, kernel)
    if torch.compiler.is_compiling():
        return torch.ops.moe_learn.gemm_weighted_swiglu(X, W, m_sizes, gather_indices, topk_weights, topk, transpose,
                                                        encode_config(config), kernel)
    return run_gemm_weighted_swiglu(X, W, m_sizes, gather_indices, topk_weights, topk, transpose, config, kernel)


def gemm_swiglu_backward(d_out, W, m_sizes, gather_indices, gate_up, topk_weights, *, topk, transpose=True,
                         config=None, kernel="auto"):
    """GEMM2's dX with ``weighted_swiglu_backward`` applied to it: ``(d_gate_up, d_topk_weights, h)``.

    d_out ``[T, H]`` (the layer's output gradient, token order); W = down_proj read for dX:
    ``[E, H, I]`` with transpose=False here (the forward's transpose=True), ``[E, I, H]`` with
    transpose=True. ``d_h = grouped_gemm(d_out, W, ..., permute_x=True)`` is never stored: the
    Hopper kernel turns each tile of it into d_gate_up, the tile's share of d_topk_weights and
    h. Returns what ``weighted_swiglu_backward(gate_up, topk_weights, gather_indices, d_h)``
    returns (d_topk_weights in float32). Not differentiable; traceable by ``torch.compile``.
    """
    _check_fused("gemm_swiglu_backward", "d_out", d_out, W, m_sizes, gather_indices, topk_weights, topk, transpose,
                 kernel, gate_up)
    if torch.compiler.is_compiling():
        return torch.ops.moe_learn.gemm_swiglu_backward(d_out, W, m_sizes, gather_indices, gate_up, topk_weights, topk,
                                                        transpose, encode_config(config), kernel)
    return run_gemm_swiglu_backward(d_out, W, m_sizes, gather_indices, gate_up, topk_weights, topk, transpose, config,
                                    kernel)
