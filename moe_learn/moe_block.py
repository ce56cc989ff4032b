"""A whole MoE MLP in PyTorch, built only from the course's primitives.

router linear -> softmax top-k (:func:`calculate_topk`) -> :func:`moe_experts_torch`
(route, permute, grouped GEMM, SwiGLU, grouped GEMM, unpermute, weighted combine).

:class:`TorchMoEBlock` holds its weights in the layout of Hugging Face transformers 5.x
(router ``[E, H]``, ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), so
:meth:`TorchMoEBlock.from_hf` can share the very tensors of a ``Qwen3MoeSparseMoeBlock``
or ``MixtralSparseMoeBlock`` and the two modules must agree on every input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .routing import calculate_topk
from .torch_moe import moe_experts_torch
from .validation import check_floating, check_positive_int, check_tensor


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


def _hf_top_k(block: nn.Module) -> int:
    for owner in (block, getattr(block, "gate", None)):
        value = getattr(owner, "top_k", None)
        if isinstance(value, int):
            return value
    config = getattr(block.experts, "config", None)
    value = getattr(config, "num_experts_per_tok", None)
    if isinstance(value, int):
        return value
    raise TypeError(f"cannot find top_k on {type(block).__name__} (looked at .top_k, .gate.top_k, config)")


def _hf_renormalize(block: nn.Module) -> bool:
    # Qwen3-MoE: config.norm_topk_prob (kept on the router); Mixtral always renormalizes.
    for owner in (getattr(block, "gate", None), block):
        value = getattr(owner, "norm_topk_prob", None)
        if isinstance(value, bool):
            return value
    config = getattr(getattr(block, "experts", None), "config", None)
    value = getattr(config, "norm_topk_prob", None)
    return value if isinstance(value, bool) else True


class TorchMoEBlock(nn.Module):
    """Router + SwiGLU experts, run with the naive grouped GEMM of chapter 04.

    Parameters (transformers 5.x layout): ``router_weight [E, H]``,
    ``gate_up_proj [E, 2I, H]`` (gate rows first, then up rows), ``down_proj [E, H, I]``.
    forward(hidden ``[B, S, H]`` or ``[T, H]``) returns the same shape.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool = True,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_experts", num_experts),
            ("top_k", top_k),
        ):
            check_positive_int(name, value)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} is larger than num_experts={num_experts}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = bool(renormalize)
        kw = {"dtype": dtype, "device": device}
        # nn.Linear-style init (std ~ 1/sqrt(fan_in)) so outputs neither vanish nor explode.
        self.router_weight = nn.Parameter(torch.randn(num_experts, hidden_size, **kw) / hidden_size**0.5)
        self.gate_up_proj = nn.Parameter(
            torch.randn(num_experts, 2 * intermediate_size, hidden_size, **kw) / hidden_size**0.5
        )
        self.down_proj = nn.Parameter(
            torch.randn(num_experts, hidden_size, intermediate_size, **kw) / intermediate_size**0.5
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return moe_forward_torch(
            hidden_states, self.router_weight, self.gate_up_proj, self.down_proj, self.top_k, self.renormalize
        )

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}"
        )

    @classmethod
    def from_hf(cls, block: nn.Module) -> TorchMoEBlock:
        """Wrap a transformers ``Qwen3MoeSparseMoeBlock`` / ``MixtralSparseMoeBlock``.

        The router and expert weights are the *same* Parameters as the block's (no copy):
        a change to one shows in the other. Needs transformers 5.x fused experts
        (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``, SiLU).
        """
        experts = getattr(block, "experts", None)
        gate = getattr(block, "gate", None)
        if experts is None or gate is None or not hasattr(experts, "gate_up_proj"):
            raise TypeError(
                f"{type(block).__name__} is not a transformers 5.x sparse MoE block: expected .gate (router) and "
                ".experts with gate_up_proj [E, 2I, H] and down_proj [E, H, I]"
            )
        if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
            raise TypeError(f"{type(experts).__name__} stores transposed or biased experts; not supported here")
        if not getattr(experts, "is_concatenated", True):
            raise TypeError(f"{type(experts).__name__} interleaves gate and up rows; not supported here")
        act = getattr(experts, "act_fn", None)
        # Ask the activation what it computes rather than trusting its class name across versions.
        probe = torch.linspace(-4.0, 4.0, 9)
        if act is not None and not torch.allclose(act(probe), F.silu(probe)):
            raise TypeError(f"the experts use {type(act).__name__}; TorchMoEBlock implements SwiGLU (SiLU) only")
        num_experts, two_i, hidden = experts.gate_up_proj.shape
        if tuple(experts.down_proj.shape) != (num_experts, hidden, two_i // 2) or tuple(gate.weight.shape) != (
            num_experts,
            hidden,
        ):
            raise TypeError(
                f"unexpected shapes: gate.weight {tuple(gate.weight.shape)}, gate_up_proj "
                f"{tuple(experts.gate_up_proj.shape)}, down_proj {tuple(experts.down_proj.shape)}"
            )
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.hidden_size, out.intermediate_size, out.num_experts = hidden, two_i // 2, num_experts
        out.top_k = _hf_top_k(block)
        out.renormalize = _hf_renormalize(block)
        # Assigning the Parameter objects registers them here too: shared, not copied.
        out.router_weight = gate.weight
        out.gate_up_proj = experts.gate_up_proj
        out.down_proj = experts.down_proj
        return out
