"""Run a Hugging Face transformers 5.x MoE model through the course's fused experts.

``patch_model(model)`` swaps every supported MoE block of a model for a fused block that
holds the SAME submodules (router, experts, shared expert): no weight is copied, parameter
names and the state dict stay as they were, and hooks transformers puts on the router
(``output_router_logits``, the auxiliary loss) keep working. Only the experts' loop over
``nn.functional.linear`` calls is replaced by ``moe_learn.layers.experts.moe_experts``: two
grouped GEMMs forward, and the backward of chapter 09.

Supported blocks (matched by class name, so no import of a particular model is needed):
  Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock  softmax -> top-k (-> renormalize),
      output weighted by the routing weights; experts ``[E, 2I, H]`` / ``[E, H, I]``.
  Llama4TextMoe  top-k on the logits, sigmoid of the k picked; the score scales the
      expert's INPUT (not its output); a shared expert runs on every token; experts are
      stored ``[E, H, 2I]`` / ``[E, I, H]`` (``transpose=False``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moe_learn.layers.experts import check_backend, moe_experts
from moe_learn.ops.moe import is_silu

SOFTMAX_BLOCKS = ("Qwen3MoeSparseMoeBlock", "MixtralSparseMoeBlock")
LLAMA4_BLOCKS = ("Llama4TextMoe",)
SUPPORTED_BLOCKS = SOFTMAX_BLOCKS + LLAMA4_BLOCKS


def _check_swiglu_experts(experts: nn.Module, block_name: str) -> None:
    """The fused experts compute silu(gate) * up, with no biases: refuse anything else."""
    for attr in ("gate_up_proj", "down_proj"):
        if not isinstance(getattr(experts, attr, None), torch.Tensor):
            raise ValueError(f"{block_name}.experts has no 3-D tensor {attr!r}; this transformers version stores "
                             "experts differently and is not supported")
    for attr in ("gate_up_proj_bias", "down_proj_bias"):
        if getattr(experts, attr, None) is not None:
            raise ValueError(f"{block_name}.experts has {attr}: the fused experts have no biases")
    act = getattr(experts, "act_fn", None)
    if not is_silu(act):
        raise ValueError(f"{block_name}.experts.act_fn is {act!r}; the fused experts implement SwiGLU (silu) only")


class _FusedBlockBase(nn.Module):
    def __init__(self, block: nn.Module, backend: str):
        super().__init__()
        check_backend(backend)
        self.backend = backend
        # Kept out of the module tree (a tuple is not registered): unpatch_model puts it back.
        self._original = (block,)

    @property
    def original(self) -> nn.Module:
        return self._original[0]


class FusedSparseMoeBlock(_FusedBlockBase):
    """Qwen3-MoE / Mixtral sparse MoE block running the fused experts (softmax routing)."""

    def __init__(self, block: nn.Module, backend: str = "triton"):
        super().__init__(block, backend)
        name = type(block).__name__
        _check_swiglu_experts(block.experts, name)
        self.gate = block.gate  # the same modules: parameters are shared, not copied
        self.experts = block.experts
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        self.top_k = getattr(block, "top_k", None) or getattr(block.gate, "top_k", None)
        self.norm_topk_prob = getattr(block, "norm_topk_prob", getattr(block.gate, "norm_topk_prob", True))

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.gate(x)
        if isinstance(out, torch.Tensor):
            # A router that returns only its logits (nn.Linear): route as transformers does.
            probs = torch.softmax(out, dim=-1, dtype=torch.float)
            weights, ids = torch.topk(probs, self.top_k, dim=-1)
            if self.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return weights.to(out.dtype), ids
        # transformers 5.x routers return (logits, weights, indices), in that order. Taken by
        # position: with top_k == num_experts the logits have the weights' shape and dtype.
        if not isinstance(out, tuple | list) or len(out) != 3:
            raise TypeError(f"{type(self.gate).__name__} returned {type(out).__name__}; expected the transformers 5.x "
                            "router output (router_logits, top_k_weights, top_k_index)")
        _, weights, ids = out
        return weights, ids

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        if self.training and self.jitter_noise > 0:  # Mixtral's multiplicative input noise
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
        x = hidden_states.reshape(-1, shape[-1])
        weights, ids = self._route(x)
        out = moe_experts(x, ids, weights, self.experts.gate_up_proj, self.experts.down_proj, backend=self.backend)
        return out.reshape(shape)


class FusedLlama4TextMoe(_FusedBlockBase):
    """Llama 4's text MoE: sigmoid scores scale the expert input, plus a shared expert.

    Each (token, slot) pair is its own row ``x_t * score_tj`` routed to one expert with
    weight 1, so the score's gradient flows through the input scaling (plain PyTorch) and
    the experts run as the fused top-1 problem of ``T * k`` rows.
    """

    def __init__(self, block: nn.Module, backend: str = "triton"):
        super().__init__(block, backend)
        _check_swiglu_experts(block.experts, type(block).__name__)
        self.router = block.router
        self.experts = block.experts
        self.shared_expert = block.shared_expert
        self.top_k = block.top_k
        self.hidden_dim = block.hidden_dim

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)
        # The router returns dense scores [T, E] (sigmoid of the top-k logits, 0 elsewhere).
        router_scores, router_logits = self.router(x)
        ids = torch.topk(router_logits, self.top_k, dim=1).indices  # the router's own picks
        scores = router_scores.gather(1, ids)  # gradients reach the logits through the router
        num_tokens, top_k = ids.shape
        routed_in = (x.unsqueeze(1) * scores.unsqueeze(-1).to(x.dtype)).reshape(num_tokens * top_k, -1)
        ones = routed_in.new_ones(num_tokens * top_k, 1)
        routed = moe_experts(
            routed_in, ids.reshape(-1, 1), ones, self.experts.gate_up_proj, self.experts.down_proj,
            transpose=False, backend=self.backend,
        )
        out = self.shared_expert(x) + routed.view(num_tokens, top_k, -1).sum(dim=1)
        return out, router_logits


def fuse_moe_block(block: nn.Module, backend: str = "triton") -> nn.Module:
    """The fused replacement of one transformers MoE block (sharing its parameters)."""
    name = type(block).__name__
    if name in SOFTMAX_BLOCKS:
        return FusedSparseMoeBlock(block, backend)
    if name in LLAMA4_BLOCKS:
        return FusedLlama4TextMoe(block, backend)
    raise TypeError(f"{name} is not a supported MoE block; supported: {', '.join(SUPPORTED_BLOCKS)}")


def _replace(model: nn.Module, match, make) -> list[str]:
    targets = [(name, module) for name, module in model.named_modules() if name and match(module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(module))
    return [name for name, _ in targets]


def patch_model(model: nn.Module, *, backend: str = "triton") -> nn.Module:
    """Swap every supported MoE block of ``model`` (in place) for its fused version.

    Returns the model. Parameters are shared, so an optimizer built before or after the
    patch trains the same tensors, and ``model.state_dict()`` keys do not change.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend(backend)
    replaced = _replace(model, lambda m: type(m).__name__ in SUPPORTED_BLOCKS, lambda m: fuse_moe_block(m, backend))
    if not replaced:
        already = sum(isinstance(m, _FusedBlockBase) for m in model.modules())
        raise ValueError(
            f"found no MoE block to patch in {type(model).__name__} (supported: {', '.join(SUPPORTED_BLOCKS)}); "
            f"{already} block(s) are already fused"
        )
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put the original transformers blocks back (they share the same parameters)."""
    _replace(model, lambda m: isinstance(m, _FusedBlockBase), lambda m: m.original)
    return model


def fused_blocks(model: nn.Module) -> list[str]:
    """Names of the fused blocks in ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, _FusedBlockBase)]
