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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_learn.device import check_kernel_device
from moe_learn.kernels.grouped_gemm import needs_autograd
from moe_learn.validation import check_floating, check_integer, check_tensor

BLOCK_R = 8  # rows per program: the weight and d_w of a row are loaded / stored once


@triton.jit
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


@triton.jit
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


def _block_i(inner: int) -> int:
    return min(512, triton.next_power_of_2(max(inner, 16)))


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
        _weighted_swiglu_kernel[(triton.cdiv(M, BLOCK_R),)](gate_up, weights, gather, h, M, I, weights.numel(),
                                                            BLOCK_R=BLOCK_R, BLOCK_I=_block_i(I))
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
        _weighted_swiglu_backward_kernel[(triton.cdiv(M, BLOCK_R),)](
            gate_up, d_h, weights, gather, d_gate_up, h, d_w, M, I, weights.numel(), BLOCK_R=BLOCK_R,
            BLOCK_I=_block_i(I))
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
