"""The kernels as ``torch.library`` custom ops, with fake (meta) implementations and autograd.

``moe_learn::grouped_gemm``, ``moe_learn::grouped_gemm_dw``, ``moe_learn::fused_routing``,
``moe_learn::weighted_swiglu`` (with its backward) and the GEMMs with the SwiGLU fused
(``moe_learn::gemm_weighted_swiglu``, ``moe_learn::gemm_swiglu_backward``) are what
``torch.compile`` traces (no graph break: the compiler sees one opaque op with a known
output shape) and what autograd records.
The public Python functions (``grouped_gemm``, ``grouped_gemm_dw``, ``fused_routing``,
``weighted_swiglu``) call them whenever a gradient must be recorded or a graph is being
compiled; an eager call with nothing to record goes straight to the launch, so decode-sized
calls pay no dispatcher cost.

The gradients, for ``Y_e = X_e @ W_e.T + b_e`` in expert order (rows of X gathered as
``X[g[i] // topk]`` with permute_x; rows of the output scattered to ``g[i]`` and scaled by
``w[g[i]]`` with permute_y):

    dY_e  = the output's gradient in expert order (gathered by g, times w, with permute_y)
    dX    = dY_e @ W_e                    the same kernel, W read in the other layout; with
                                          permute_x scattered to (token, slot) rows and summed over k
    dW_e  = dY_e.T @ X_e                  the dW kernel (zero for experts with no rows)
    db_e  = sum of dY_e's rows
    dw    = <d_out row, unweighted row>   the forward again without the weights
"""

from __future__ import annotations

import torch

from moe_learn.kernels.backward import run_grouped_gemm_dw
from moe_learn.kernels.fused_routing import run_fused_routing
from moe_learn.kernels.grouped_gemm import decode_config, run_grouped_gemm
from moe_learn.kernels.swiglu import (
    run_gemm_swiglu_backward,
    run_gemm_weighted_swiglu,
    run_weighted_swiglu,
    run_weighted_swiglu_backward,
)
from moe_learn.ops.grouped_gemm import expert_of_rows

Tensor = torch.Tensor


# ------------------------------------------------------------------------------- grouped GEMM


@torch.library.custom_op("moe_learn::grouped_gemm", mutates_args=())
def grouped_gemm_op(
    X: Tensor, W: Tensor, m_sizes: Tensor, gather_indices: Tensor | None, topk_weights: Tensor | None,
    bias: Tensor | None, topk: int, permute_x: bool, permute_y: bool, transpose: bool, config: str, kernel: str,
) -> Tensor:
    return run_grouped_gemm(X, W, m_sizes, gather_indices, topk_weights, bias, topk, permute_x, permute_y, transpose,
                            decode_config(config), kernel)


@grouped_gemm_op.register_fake
def _(X, W, m_sizes, gather_indices, topk_weights, bias, topk, permute_x, permute_y, transpose, config, kernel):
    rows = X.shape[0] * topk if permute_x else X.shape[0]
    return X.new_empty(rows, W.shape[1] if transpose else W.shape[2])


def _gemm_setup_context(ctx, inputs, output):
    X, W, m_sizes, gather, weights, bias, topk, permute_x, permute_y, transpose, config, kernel = inputs
    ctx.save_for_backward(X, W, m_sizes, gather, weights, bias)
    ctx.flags = (topk, permute_x, permute_y, transpose, config, kernel)


def _gemm(X, W, m_sizes, gather=None, weights=None, bias=None, topk=1, permute_x=False, permute_y=False,
          transpose=True, config="", kernel="auto"):
    return torch.ops.moe_learn.grouped_gemm(X, W, m_sizes, gather, weights, bias, topk, permute_x, permute_y,
                                            transpose, config, kernel)


def _gemm_backward(ctx, d_out):
    X, W, m_sizes, gather, weights, bias = ctx.saved_tensors
    topk, permute_x, permute_y, transpose, config, kernel = ctx.flags
    need_x, need_w, _, _, need_weights, need_bias = ctx.needs_input_grad[:6]
    d_out = d_out.contiguous()
    M = d_out.shape[0]
    d_x = d_w = d_weights = d_bias = None

    if need_weights:  # out[g[i]] = w[g[i]] * y[i]: d w[g[i]] = <d_out[g[i]], y[i]> with y unweighted
        unweighted = _gemm(X, W, m_sizes, gather, None, bias, topk, permute_x, True, transpose, config, kernel)
        acc = torch.promote_types(d_out.dtype, torch.float32)
        d_weights = (d_out.to(acc) * unweighted.to(acc)).sum(-1).view(weights.shape).to(weights.dtype)

    # The output's gradient per row of the expert-ordered problem. With permute_y, row i's
    # gradient is d_out[g[i]] * w[g[i]]: pre-scaled here, gathered by the kernels below.
    d_rows = d_out
    if permute_y and weights is not None:
        d_rows = d_out * weights.reshape(-1, 1).to(d_out.dtype)
    if need_x:
        # dX rows = d_rows (gathered when permute_y) @ W_e; scattered to (token, slot) rows when permute_x.
        d_x = _gemm(d_rows, W, m_sizes, gather, None, None, 1, permute_y, permute_x, not transpose, config, kernel)
        if permute_x:
            d_x = d_x.view(X.shape[0], topk, X.shape[1]).sum(dim=1)
    if need_w or need_bias:
        d_sorted = d_rows.index_select(0, gather.long()) if permute_y else d_rows  # expert order
        if need_w:  # dW in W's own layout ([E, N, K] with transpose, else [E, K, N])
            d_w = torch.ops.moe_learn.grouped_gemm_dw(X, d_sorted, m_sizes, gather if permute_x else None, topk,
                                                      permute_x, transpose, "", "auto")
        if need_bias:
            acc = torch.promote_types(d_out.dtype, torch.float32)
            d_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device).index_add_(
                0, expert_of_rows(m_sizes, M), d_sorted.to(acc)).to(bias.dtype)
    return d_x, d_w, None, None, d_weights, d_bias, None, None, None, None, None, None


grouped_gemm_op.register_autograd(_gemm_backward, setup_context=_gemm_setup_context)


# ------------------------------------------------------------------------------- dW


@torch.library.custom_op("moe_learn::grouped_gemm_dw", mutates_args=())
def grouped_gemm_dw_op(
    X: Tensor, dY: Tensor, m_sizes: Tensor, gather_indices: Tensor | None, topk: int, permute_x: bool,
    transpose: bool, config: str, kernel: str,
) -> Tensor:
    return run_grouped_gemm_dw(X, dY, m_sizes, gather_indices, topk, permute_x, transpose, decode_config(config),
                               kernel=kernel)


@grouped_gemm_dw_op.register_fake
def _(X, dY, m_sizes, gather_indices, topk, permute_x, transpose, config, kernel):
    E, N, K = m_sizes.shape[0], dY.shape[1], X.shape[1]
    return X.new_empty((E, N, K) if transpose else (E, K, N))


def _dw_setup_context(ctx, inputs, output):
    X, dY, m_sizes, gather, topk, permute_x, transpose, config, kernel = inputs
    ctx.save_for_backward(X, dY, m_sizes, gather)
    ctx.flags = (topk, permute_x, transpose)


def _dw_backward(ctx, g):
    # dW_e = dY_e.T @ X_e is bilinear: d X_e = dY_e @ G_e, d dY_e = X_e @ G_e.T (G: dW's gradient).
    X, dY, m_sizes, gather = ctx.saved_tensors
    topk, permute_x, transpose = ctx.flags
    need_x, need_dy = ctx.needs_input_grad[:2]
    g = g.contiguous()
    d_x = d_dy = None
    if need_x:  # G stored [E, N, K] (transpose) is, for dY [M, N] -> [M, K], the [E, K, N]-layout read
        d_x = _gemm(dY, g, m_sizes, gather, None, None, 1, False, permute_x, not transpose)
        if permute_x:
            d_x = d_x.view(X.shape[0], topk, X.shape[1]).sum(dim=1)
    if need_dy:
        d_dy = _gemm(X, g, m_sizes, gather, None, None, topk, permute_x, False, transpose)
    return d_x, d_dy, None, None, None, None, None, None, None


grouped_gemm_dw_op.register_autograd(_dw_backward, setup_context=_dw_setup_context)


# ------------------------------------------------------------------------------- fused routing


@torch.library.custom_op("moe_learn::fused_routing", mutates_args=())
def fused_routing_op(
    router_logits: Tensor, top_k: int, use_sigmoid: bool, renormalize: bool, pre_act: bool, cooperative: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return run_fused_routing(router_logits, top_k, use_sigmoid=use_sigmoid, renormalize=renormalize, pre_act=pre_act,
                             cooperative=cooperative, separate_outputs=True)


@fused_routing_op.register_fake
def _(router_logits, top_k, use_sigmoid, renormalize, pre_act, cooperative):
    T, E = router_logits.shape
    new = router_logits.new_empty
    return (new(T, top_k), new(T, top_k, dtype=torch.int64), new(E, dtype=torch.int32),
            new(T * top_k, dtype=torch.int32), new(T * top_k, dtype=torch.int32))


def _routing_setup_context(ctx, inputs, output):
    router_logits, top_k, use_sigmoid, renormalize, pre_act, cooperative = inputs
    ctx.save_for_backward(router_logits, output[1])
    ctx.flags = (use_sigmoid, renormalize, pre_act)


def topk_weights_backward(logits, ids, d_weights, use_sigmoid, renormalize, pre_act):
    """d logits from d topk_weights, for the weights ``calculate_topk`` defines (ids fixed).

    pre_act: s = act(logits)[ids] (softmax over all E, or sigmoid); post_act: s = act(logits[ids])
    (softmax over the k picked, or sigmoid). renormalize: w = s / sum(s). In float32 or wider.
    """
    acc = torch.promote_types(logits.dtype, torch.float32)
    logits, g = logits.to(acc), d_weights.to(acc)
    picked = logits.gather(1, ids)
    if pre_act and not use_sigmoid:
        probs = torch.softmax(logits, dim=-1)
        s = probs.gather(1, ids)
    else:
        s = torch.sigmoid(picked) if use_sigmoid else torch.softmax(picked, dim=-1)
    if renormalize:
        total = s.sum(-1, keepdim=True)
        g = (g - (g * s / total).sum(-1, keepdim=True)) / total  # d(s / S) / ds
    if use_sigmoid:
        d_picked = g * s * (1 - s)
        d_logits = torch.zeros_like(logits).scatter_add_(1, ids, d_picked)
    elif pre_act:
        d_probs = torch.zeros_like(logits).scatter_add_(1, ids, g)
        d_logits = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
    else:
        d_picked = s * (g - (g * s).sum(-1, keepdim=True))
        d_logits = torch.zeros_like(logits).scatter_add_(1, ids, d_picked)
    return d_logits


def _routing_backward(ctx, d_weights, d_ids, d_counts, d_gather, d_scatter):
    logits, ids = ctx.saved_tensors
    use_sigmoid, renormalize, pre_act = ctx.flags
    if d_weights is None:
        return None, None, None, None, None, None
    d_logits = topk_weights_backward(logits, ids, d_weights, use_sigmoid, renormalize, pre_act)
    return d_logits.to(logits.dtype), None, None, None, None, None


fused_routing_op.register_autograd(_routing_backward, setup_context=_routing_setup_context)


# ------------------------------------------------------------------------------- weighted SwiGLU


@torch.library.custom_op("moe_learn::weighted_swiglu", mutates_args=())
def weighted_swiglu_op(gate_up: Tensor, topk_weights: Tensor, gather_indices: Tensor) -> Tensor:
    return run_weighted_swiglu(gate_up, topk_weights, gather_indices)


@weighted_swiglu_op.register_fake
def _(gate_up, topk_weights, gather_indices):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@torch.library.custom_op("moe_learn::weighted_swiglu_backward", mutates_args=())
def weighted_swiglu_backward_op(gate_up: Tensor, topk_weights: Tensor, gather_indices: Tensor,
                                d_h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return run_weighted_swiglu_backward(gate_up, topk_weights, gather_indices, d_h)


@weighted_swiglu_backward_op.register_fake
def _(gate_up, topk_weights, gather_indices, d_h):
    return (torch.empty_like(gate_up), topk_weights.new_empty(topk_weights.shape, dtype=torch.float32),
            gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2))


def _swiglu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, d_h):
    gate_up, topk_weights, gather_indices = ctx.saved_tensors
    d_gate_up, d_weights, _ = torch.ops.moe_learn.weighted_swiglu_backward(gate_up, topk_weights, gather_indices,
                                                                           d_h.contiguous())
    return d_gate_up, d_weights.to(topk_weights.dtype), None


weighted_swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup_context)


# ------------------------------------------------------------------------------- GEMMs with the SwiGLU fused
# No autograd: moe_experts' autograd.Function calls them (forward, and its backward).


@torch.library.custom_op("moe_learn::gemm_weighted_swiglu", mutates_args=())
def gemm_weighted_swiglu_op(X: Tensor, W: Tensor, m_sizes: Tensor, gather_indices: Tensor, topk_weights: Tensor,
                            topk: int, transpose: bool, config: str, kernel: str) -> tuple[Tensor, Tensor]:
    return run_gemm_weighted_swiglu(X, W, m_sizes, gather_indices, topk_weights, topk, transpose,
                                    decode_config(config), kernel)


@gemm_weighted_swiglu_op.register_fake
def _(X, W, m_sizes, gather_indices, topk_weights, topk, transpose, config, kernel):
    two_i = W.shape[1] if transpose else W.shape[2]
    return X.new_empty(X.shape[0] * topk, two_i), X.new_empty(X.shape[0] * topk, two_i // 2)


@torch.library.custom_op("moe_learn::gemm_swiglu_backward", mutates_args=())
def gemm_swiglu_backward_op(d_out: Tensor, W: Tensor, m_sizes: Tensor, gather_indices: Tensor, gate_up: Tensor,
                            topk_weights: Tensor, topk: int, transpose: bool, config: str,
                            kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    return run_gemm_swiglu_backward(d_out, W, m_sizes, gather_indices, gate_up, topk_weights, topk, transpose,
                                    decode_config(config), kernel)


@gemm_swiglu_backward_op.register_fake
def _(d_out, W, m_sizes, gather_indices, gate_up, topk_weights, topk, transpose, config, kernel):
    return (torch.empty_like(gate_up), topk_weights.new_empty(topk_weights.shape, dtype=torch.float32),
            gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2))
