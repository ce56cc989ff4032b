"""MoE blocks: a router and SwiGLU experts in one ``nn.Module``, one vocabulary for all.

Every block of the course is built the same way and holds the same parameters, in the
layout of Hugging Face transformers 5.x:

    MoEBlock(hidden_size, intermediate_size, num_experts, top_k, *,
             routing="softmax" | "sigmoid", renormalize=True, backend="triton" | "torch",
             device=None, dtype=None)

    router        nn.Linear(hidden_size, num_experts, bias=False)   weight [E, H]
    gate_up_proj  [E, 2I, H]   (gate rows first, then up rows)
    down_proj     [E, H, I]

All three start as ``nn.Linear`` would (uniform in +-1/sqrt(fan_in)). ``routing="softmax"``:
softmax over all experts, then top-k (Qwen3-MoE, Mixtral; ``renormalize`` rescales the k
weights to sum to 1). ``routing="sigmoid"``: top-k on the logits, then a sigmoid of the k
picked (Llama 4 style; never renormalised). ``backend`` picks the expert GEMMs: the
course's Triton kernels or the PyTorch reference of chapter 04. ``TorchMoEBlock`` and
``FusedMoEBlock`` are the same block with the backend preset; the expert-parallel layer
(``moe_learn.layers.expert_parallel.ExpertParallelMoE``) takes the same arguments.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_learn.layers.experts import check_backend, moe_experts
from moe_learn.ops.moe import is_silu
from moe_learn.ops.routing import calculate_topk
from moe_learn.validation import check_index_range, check_integer, check_positive_int, check_tensor

ROUTINGS = ("softmax", "sigmoid")

# transformers blocks that MoEBlock.from_hf reproduces exactly: softmax -> top-k (->
# renormalize), SwiGLU experts, no shared expert, no bias. Anything else is refused.
HF_SOFTMAX_BLOCKS = ("Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock")


def check_block_args(hidden_size, intermediate_size, num_experts, top_k, routing, renormalize, backend) -> None:
    """The constructor arguments every block of the course shares."""
    for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                        ("num_experts", num_experts), ("top_k", top_k)):
        check_positive_int(name, value)
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is larger than num_experts={num_experts}; pass top_k <= num_experts")
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be True or False, got {renormalize!r}")
    check_backend(backend)


def setup_block(module: nn.Module, hidden_size, intermediate_size, num_experts, top_k, routing, renormalize,
                backend, *, experts_here: int, device=None, dtype=None) -> None:
    """The attributes and parameters every block of the course holds (``experts_here``: the
    experts this module stores, all of them or, for the expert-parallel layer, its rank's share)."""
    check_block_args(hidden_size, intermediate_size, num_experts, top_k, routing, renormalize, backend)
    factory = {"device": device, "dtype": dtype}
    module.hidden_size, module.intermediate_size = hidden_size, intermediate_size
    module.num_experts, module.top_k = num_experts, top_k
    module.routing, module.renormalize, module.backend = routing, renormalize, backend
    module.router = nn.Linear(hidden_size, num_experts, bias=False, **factory)
    module.gate_up_proj = nn.Parameter(torch.empty(experts_here, 2 * intermediate_size, hidden_size, **factory))
    module.down_proj = nn.Parameter(torch.empty(experts_here, hidden_size, intermediate_size, **factory))
    init_expert_weights(module.gate_up_proj, module.down_proj)


def init_expert_weights(*weights: torch.Tensor) -> None:
    """nn.Linear's default scale for each expert's ``[N, K]`` matrix: uniform in +-1/sqrt(K)."""
    with torch.no_grad():
        for w in weights:
            bound = 1 / w.shape[-1] ** 0.5
            w.uniform_(-bound, bound)


def route(logits: torch.Tensor, top_k: int, routing: str, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights, topk_ids) ``[T, k]`` from router logits, the block's way (in float32 or wider)."""
    sigmoid = routing == "sigmoid"
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64
    return calculate_topk(logits, top_k, use_sigmoid=sigmoid, renormalize=renormalize and not sigmoid,
                          pre_act=not sigmoid, post_act=sigmoid)


class MoEBlock(nn.Module):
    """Router + SwiGLU experts (see the module docstring for the arguments).

    ``forward(hidden_states)`` takes ``[T, H]`` or ``[B, S, H]`` and returns the same shape.
    The router's logits and picks of the last forward stay on the module
    (``router_logits``, ``topk_ids``) for a load-balancing loss.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        routing: str = "softmax",
        renormalize: bool = True,
        backend: str = "triton",
        device=None,
        dtype=None,
    ):
        super().__init__()
        setup_block(self, hidden_size, intermediate_size, num_experts, top_k, routing, renormalize, backend,
                    experts_here=num_experts, device=device, dtype=dtype)
        self.router_logits: torch.Tensor | None = None
        self.topk_ids: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits ``[T, E]``, then (topk_weights, topk_ids) ``[T, k]``."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states has {x.shape[-1]} features but this block has hidden_size={self.hidden_size}; "
                f"pass [T, {self.hidden_size}] or [B, S, {self.hidden_size}]"
            )
        logits = self.router(x)
        weights, ids = route(logits, self.top_k, self.routing, self.renormalize)
        return logits, weights, ids

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        check_tensor("hidden_states", hidden_states, ndim=(2, 3))
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits, weights, ids = self.route(x)
        self.router_logits, self.topk_ids = logits, ids
        out = moe_experts(x, ids, weights, self.gate_up_proj, self.down_proj, backend=self.backend)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, routing={self.routing}, "
            f"renormalize={self.renormalize}, backend={self.backend}"
        )

    @classmethod
    def from_hf(cls, block: nn.Module, *, backend: str | None = None) -> MoEBlock:
        """The same block as a transformers ``Qwen3MoeSparseMoeBlock`` / ``MixtralSparseMoeBlock``.

        The router and expert weights are the *same* Parameters as the block's (no copy):
        a change to one shows in the other. Any other block is refused with the reason
        (a shared expert, biases, another activation or routing would be computed wrong).
        """
        name = type(block).__name__
        experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
        if name not in HF_SOFTMAX_BLOCKS:
            raise TypeError(
                f"{name} is not a block {cls.__name__}.from_hf reproduces (supported: {', '.join(HF_SOFTMAX_BLOCKS)}); "
                "for any transformers MoE model use experts_implementation='moe_learn' (moe_learn.layers.hf)"
            )
        if experts is None or gate is None or not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
            raise TypeError(f"{name} has no .gate router and .experts.gate_up_proj: not a transformers 5.x block")
        for attr in ("shared_expert", "shared_experts"):
            if getattr(block, attr, None) is not None:
                raise TypeError(f"{name} has a {attr}; {cls.__name__} has routed experts only")
        if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
            raise TypeError(f"{type(experts).__name__} stores transposed or biased experts; not supported here")
        if not getattr(experts, "is_concatenated", True) or not getattr(experts, "has_gate", True):
            raise TypeError(f"{type(experts).__name__} is not concatenated [gate | up] SwiGLU; not supported here")
        if not is_silu(getattr(experts, "act_fn", None)):
            raise TypeError(f"the experts use {getattr(experts, 'act_fn', None)!r}; {cls.__name__} implements SwiGLU "
                            "(SiLU) only")
        if getattr(gate, "bias", None) is not None:
            raise TypeError(f"{name}'s router has a bias; {cls.__name__}'s router has none")
        num_experts, two_i, hidden = experts.gate_up_proj.shape
        if tuple(experts.down_proj.shape) != (num_experts, hidden, two_i // 2) or tuple(gate.weight.shape) != (
            num_experts, hidden,
        ):
            raise TypeError(
                f"unexpected shapes: gate.weight {tuple(gate.weight.shape)}, gate_up_proj "
                f"{tuple(experts.gate_up_proj.shape)}, down_proj {tuple(experts.down_proj.shape)}"
            )
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.hidden_size, out.intermediate_size, out.num_experts = hidden, two_i // 2, num_experts
        out.top_k = _hf_top_k(block)
        out.routing, out.renormalize = "softmax", _hf_renormalize(block)
        out.backend = backend if backend is not None else getattr(cls, "default_backend", "triton")
        check_backend(out.backend)
        # Assigning the Parameter objects registers them here too: shared, not copied.
        out.router = nn.Linear(hidden, num_experts, bias=False, device="meta")
        out.router.weight = gate.weight
        out.gate_up_proj = experts.gate_up_proj
        out.down_proj = experts.down_proj
        out.router_logits = out.topk_ids = None
        return out


def _hf_top_k(block: nn.Module) -> int:
    for owner in (block, getattr(block, "gate", None)):
        value = getattr(owner, "top_k", None)
        if isinstance(value, int):
            return value
    value = getattr(getattr(block.experts, "config", None), "num_experts_per_tok", None)
    if isinstance(value, int):
        return value
    raise TypeError(f"cannot find top_k on {type(block).__name__} (looked at .top_k, .gate.top_k, config)")


def _hf_renormalize(block: nn.Module) -> bool:
    # Qwen3-MoE: config.norm_topk_prob (kept on the router); Mixtral always renormalizes.
    for owner in (getattr(block, "gate", None), block):
        value = getattr(owner, "norm_topk_prob", None)
        if isinstance(value, bool):
            return value
    value = getattr(getattr(getattr(block, "experts", None), "config", None), "norm_topk_prob", None)
    return value if isinstance(value, bool) else True


class TorchMoEBlock(MoEBlock):
    """``MoEBlock`` with ``backend="torch"``: the naive grouped GEMM of chapter 04."""

    default_backend = "torch"

    def __init__(self, hidden_size, intermediate_size, num_experts, top_k, *, backend="torch", **kwargs):
        super().__init__(hidden_size, intermediate_size, num_experts, top_k, backend=backend, **kwargs)


class FusedMoEBlock(MoEBlock):
    """``MoEBlock`` with ``backend="triton"``: the fused grouped GEMMs of chapters 06-09."""

    default_backend = "triton"


def load_balancing_loss(router_logits: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss: ``E * sum_e f_e * P_e``.

    f_e: the fraction of (token, slot) picks that went to expert e (no gradient: counts);
    P_e: the mean router probability of expert e (softmax over all experts; differentiable).
    Equals 1 when routing is perfectly uniform, and grows as tokens pile onto few experts.
    """
    check_tensor("router_logits", router_logits, ndim=2)
    check_positive_int("num_experts", num_experts)
    check_tensor("topk_ids", topk_ids, ndim=2)
    check_integer("topk_ids", topk_ids)
    if router_logits.shape[1] != num_experts or topk_ids.shape[0] != router_logits.shape[0]:
        raise ValueError(f"router_logits {tuple(router_logits.shape)} and topk_ids {tuple(topk_ids.shape)} must be "
                         f"[T, E] and [T, k] with E = num_experts = {num_experts}")
    if topk_ids.device.type == "cpu":  # a value check: on a GPU it would stall the device
        check_index_range("topk_ids", topk_ids, num_experts, f"expert ids must be below num_experts={num_experts}")
    probs = torch.softmax(router_logits.float(), dim=-1)
    # (a scatter-add, not bincount: no device->host copy, and an id out of range cannot grow it)
    flat = topk_ids.reshape(-1).long().clamp(0, num_experts - 1)
    counts = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=probs.dtype))
    fraction = counts / counts.sum().clamp_min(1)
    return num_experts * (fraction * probs.mean(dim=0)).sum()



