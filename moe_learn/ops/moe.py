"""A whole MoE MLP in PyTorch, built only from the course's primitives: the references.

    router linear -> top-k (calculate_topk) -> route (get_routing_indices) -> permute
    -> grouped GEMM -> SwiGLU -> grouped GEMM -> unpermute -> weighted combine

Weights use the layout of Hugging Face transformers 5.x: router ``[E, H]``,
``gate_up_proj [E, 2I, H]`` (gate rows first, then up rows), ``down_proj [E, H, I]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_learn.ops.grouped_gemm import torch_grouped_gemm
from moe_learn.ops.permutation import combine, permute, unpermute
from moe_learn.ops.routing import calculate_topk, get_routing_indices
from moe_learn.validation import check_floating, check_index_range, check_moe_args, check_positive_int, check_tensor


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on ``[M, 2I]`` laid out as transformers does: gate first, then up."""
    check_tensor("gate_up", gate_up)
    if gate_up.ndim == 0 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"gate_up must have an even last dimension (gate half, then up half), got shape {tuple(gate_up.shape)}"
        )
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward(gate_up: torch.Tensor, d_h: torch.Tensor) -> torch.Tensor:
    """d(silu(gate) * up) / d(gate_up) given ``d_h``, for ``gate_up = [gate | up]``.

    Computed in float32, or float64 for float64 inputs (never narrower than the inputs),
    and returned in ``gate_up``'s dtype.
    """
    acc = torch.promote_types(gate_up.dtype, torch.float32)
    gate, up = gate_up.to(acc).chunk(2, dim=-1)
    d_h = d_h.to(acc)
    sig = torch.sigmoid(gate)
    d_gate = d_h * up * sig * (1 + gate * (1 - sig))  # silu'(x) = s(x) (1 + x (1 - s(x)))
    d_up = d_h * gate * sig
    return torch.cat([d_gate, d_up], dim=-1).to(gate_up.dtype)


def weighted_swiglu(gate_up: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """``row_weights[:, None] * silu(gate) * up``: the SwiGLU with each row's routing weight folded in.

    Training applies the routing weight here, before GEMM2, instead of after it: GEMM2 is
    linear in its input rows, so ``(w h) @ W2.T = w (h @ W2.T)``, and the backward then needs
    neither the unweighted expert outputs ``[M, H]`` nor a weighted copy of ``d_out``
    (``weighted_swiglu_backward``). Computed in float32 or wider, returned in gate_up's dtype.
    """
    acc = torch.promote_types(gate_up.dtype, torch.float32)
    gate, up = gate_up.to(acc).chunk(2, dim=-1)
    return (row_weights.to(acc).unsqueeze(-1) * F.silu(gate) * up).to(gate_up.dtype)


def weighted_swiglu_backward(gate_up: torch.Tensor, row_weights: torch.Tensor, d_h: torch.Tensor):
    """The backward of ``h = weighted_swiglu(gate_up, row_weights)`` given ``d_h``.

    Returns ``(d_gate_up, d_row_weights, h)``: ``d_row_weights[r] = <d_h[r], swiglu(gate_up[r])>``
    (float32 or wider), ``d_gate_up = swiglu_backward(gate_up, row_weights * d_h)``, and h itself,
    recomputed for the backward's dW2 rather than kept from the forward.
    """
    acc = torch.promote_types(gate_up.dtype, torch.float32)
    gate, up = gate_up.to(acc).chunk(2, dim=-1)
    d_h, w = d_h.to(acc), row_weights.to(acc).unsqueeze(-1)
    s = F.silu(gate) * up
    return swiglu_backward(gate_up, w * d_h), (d_h * s).sum(-1), (w * s).to(gate_up.dtype)


def is_silu(activation) -> bool:
    """Whether ``activation`` computes SiLU: asked by probing values, not by trusting a class name."""
    if activation is None:
        return False
    probe = torch.linspace(-6.0, 6.0, 25)
    try:
        return bool(torch.allclose(activation(probe), F.silu(probe), rtol=1e-5, atol=1e-6))
    except Exception:  # noqa: BLE001 - an activation that cannot take a tensor is not SiLU
        return False


def moe_experts_torch(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """The expert half of an MoE MLP, from the primitives of chapters 02-04.

    hidden_states ``[T, H]``; topk_ids/topk_weights ``[T, k]``;
    gate_up_proj ``[E, 2I, H]``, down_proj ``[E, H, I]`` (transformers 5.x layout).
    route -> permute -> grouped GEMM -> SwiGLU -> grouped GEMM -> unpermute -> weighted sum.
    """
    check_moe_args(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj)
    num_experts = gate_up_proj.shape[0]
    top_k = topk_ids.shape[1]
    check_index_range("topk_ids", topk_ids, num_experts, f"expert ids must be below num_experts={num_experts}")
    counts, gather_indices = get_routing_indices(topk_ids, num_experts)
    x = permute(hidden_states, gather_indices, top_k)
    h = swiglu(torch_grouped_gemm(x, gate_up_proj, counts))
    y = torch_grouped_gemm(h, down_proj, counts)
    return combine(unpermute(y, gather_indices), topk_weights)


def moe_forward_torch(
    hidden_states: torch.Tensor,
    router_weight: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k: int,
    renormalize: bool = True,
) -> torch.Tensor:
    """A softmax-routed SwiGLU MoE MLP on ``hidden_states [T, H]`` or ``[B, S, H]``.

    router_weight ``[E, H]`` (logits = ``hidden @ router_weight.T``), gate_up_proj
    ``[E, 2I, H]``, down_proj ``[E, H, I]``. The output has the input's shape and dtype.
    """
    check_tensor("hidden_states", hidden_states, ndim=(2, 3))
    check_tensor("router_weight", router_weight, ndim=2)
    check_tensor("gate_up_proj", gate_up_proj, ndim=3)
    check_floating("hidden_states", hidden_states)
    check_positive_int("top_k", top_k)
    hidden = hidden_states.shape[-1]
    if router_weight.shape[1] != hidden:
        raise ValueError(f"router_weight {tuple(router_weight.shape)} must be [E, H] with H={hidden}")
    if router_weight.shape[0] != gate_up_proj.shape[0]:
        raise ValueError(
            f"router_weight has {router_weight.shape[0]} experts but gate_up_proj {tuple(gate_up_proj.shape)} "
            f"has {gate_up_proj.shape[0]}; they must agree"
        )
    flat = hidden_states.reshape(-1, hidden)
    router_logits = F.linear(flat, router_weight.to(flat.dtype))
    # Softmax over all experts, then top-k (Qwen3 and Mixtral both do this, in float32).
    topk_weights, topk_ids = calculate_topk(
        router_logits.float(), top_k, use_sigmoid=False, renormalize=renormalize, pre_act=True, post_act=False
    )
    out = moe_experts_torch(flat, topk_ids, topk_weights, gate_up_proj, down_proj)
    return out.reshape(hidden_states.shape)
