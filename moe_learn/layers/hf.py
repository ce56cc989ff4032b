"""Hugging Face transformers 5.x: the course's kernels as an experts implementation.

transformers 5.x dispatches every MoE experts class decorated with
``use_experts_implementation`` on ``config._experts_implementation`` (its default is
``"grouped_mm"``, torch's CUTLASS grouped GEMM). After ``import moe_learn`` the name
``"moe_learn"`` is registered there, so any such model runs the course's Triton grouped
GEMMs, forward and backward:

    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="moe_learn")
    model.set_experts_implementation("moe_learn")        # or switch a loaded model

The decorator's flags describe each family's experts, and all are served:
``is_transposed`` (``[E, K, N]`` storage: the kernels read either layout), ``has_bias``
(biases added in the GEMM epilogues), ``has_gate=False`` (``up_proj`` and a plain
activation), a class's own ``_apply_gate`` (gpt-oss's interleaved, clamped SwiGLU) and
``has_post_expert_norm``. The common case (concatenated ``[gate | up]`` SwiGLU, no bias, no
norm) takes the fused path of ``moe_learn.layers.experts`` (hand-written backward). Expert
ids outside ``[0, E)`` (transformers' expert-parallel sentinels) contribute nothing, as in
its ``grouped_mm`` path. Experts whose weights are not plain floating-point tensors
(quantized checkpoints) are refused when the model is built, naming the family and why.

``patch_model`` is the convenience on top: it switches every experts module of a model to
``"moe_learn"`` and swaps Llama 4's text MoE block (which does not use the interface) for a
fused block sharing its parameters.
"""

from __future__ import annotations

import copy
import importlib.abc
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from moe_learn.layers.experts import (
    check_backend,
    decode_path,
    drop_and_route,
    effective_backend,
    experts_with_activation,
    moe_experts,
    planned_decode,
    run_experts,
)
from moe_learn.ops.moe import is_silu

IMPLEMENTATION = "moe_learn"
_BACKEND_ATTR = "_moe_learn_backend"  # per experts module: "triton" (default) or "torch"
LLAMA4_BLOCKS = ("Llama4TextMoe",)


class UnsupportedExperts(TypeError):
    """An experts module the course's kernels cannot serve; the message names the family and why."""


# ------------------------------------------------------------------------------------------ the experts


@dataclass(frozen=True)
class ExpertsLayout:
    """What the decorator's flags say about one experts module's weights."""

    up: str  # "gate_up_proj" (has_gate) or "up_proj"
    transpose: bool  # True: stored [E, N, K] (nn.Linear layout); False: [E, K, N] (is_transposed)
    bias: bool
    fused: bool  # plain SwiGLU on [gate | up]: the fused path with the hand-written backward


def _family(module: nn.Module) -> str:
    config = getattr(module, "config", None)
    return f"{getattr(config, 'model_type', None) or 'unknown'} ({type(module).__name__})"


def experts_layout(module: nn.Module) -> ExpertsLayout:
    """The layout of a transformers experts module, or ``UnsupportedExperts`` naming the family and why."""
    has_gate = getattr(module, "has_gate", True)
    up = "gate_up_proj" if has_gate else "up_proj"
    transpose = not getattr(module, "is_transposed", False)
    has_bias = bool(getattr(module, "has_bias", False))
    family = _family(module)
    weights = [up, "down_proj"] + ([f"{up}_bias", "down_proj_bias"] if has_bias else [])
    for name in weights:
        w = getattr(module, name, None)
        if not isinstance(w, torch.Tensor):
            raise UnsupportedExperts(f"{family}: experts have no tensor {name!r}; experts_implementation="
                                     f"'{IMPLEMENTATION}' needs the layout of transformers' experts interface")
        if not w.dtype.is_floating_point or w.dtype.itemsize < 2:
            raise UnsupportedExperts(f"{family}: {name} is {w.dtype} (a quantized checkpoint?); the course's kernels "
                                     "take float32, float16, bfloat16 or float64 weights: load it unquantized")
    w1, w2 = getattr(module, up), module.down_proj
    if w1.ndim != 3 or w2.ndim != 3 or w1.shape[0] != w2.shape[0]:
        raise UnsupportedExperts(f"{family}: {up} {tuple(w1.shape)} and down_proj {tuple(w2.shape)} are not "
                                 "[E, N, K] expert stacks")
    from transformers.integrations.moe import _default_apply_gate

    default_gate = getattr(type(module), "_apply_gate", _default_apply_gate) is _default_apply_gate
    fused = (has_gate and default_gate and getattr(module, "is_concatenated", True) and not has_bias
             and not getattr(module, "has_post_expert_norm", False) and is_silu(getattr(module, "act_fn", None)))
    return ExpertsLayout(up, transpose, has_bias, fused)


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward, ``experts_implementation="moe_learn"``: returns ``[T, H]``."""
    layout = experts_layout(self)
    backend = getattr(self, _BACKEND_ATTR, "triton")
    w1, w2 = getattr(self, layout.up), self.down_proj
    num_experts = w1.shape[0]
    x = hidden_states
    weights = top_k_weights
    ids = top_k_index
    if w1.dtype != x.dtype:  # autocast may hand over fp32 activations with bf16 weights, as in grouped_mm
        x = x.to(w1.dtype)
    if layout.fused:  # a few tokens, inference: the decode path (two launches) where the layers take it
        out = planned_decode(x, ids, weights, w1, w2, layout.transpose, backend, None)
        if out is None and decode_path(x, ids, weights, w1, w2, backend, None):
            from moe_learn.kernels.decode_experts import decode_experts

            out = decode_experts(x, ids, weights, w1, w2, transpose=layout.transpose)  # (checked; keeps a plan)
        if out is not None:
            return out.to(hidden_states.dtype)
    # transformers' expert-parallel sentinels (ids >= E, and anything else out of range) contribute
    # nothing: routed to a valid expert with weight 0, and kept out of the router's gradient.
    counts, gather_indices, weights = drop_and_route(ids, weights, num_experts, effective_backend(backend, w1.dtype))
    if layout.fused:
        out = run_experts(x, counts, gather_indices, weights, w1, w2, transpose=layout.transpose, backend=backend)
    else:
        activation = self._apply_gate if getattr(self, "has_gate", True) else self.act_fn
        out = experts_with_activation(
            x, counts, gather_indices, weights, w1, w2, activation,
            b1=getattr(self, f"{layout.up}_bias") if layout.bias else None,
            b2=self.down_proj_bias if layout.bias else None,
            post_norm=self.post_expert_norm if getattr(self, "has_post_expert_norm", False) else None,
            transpose=layout.transpose, backend=backend,
        )
    return out.to(hidden_states.dtype)


# ------------------------------------------------------------------------------------------ registration


def _experts_modules(model: nn.Module, implementation: str | None = None):
    """The experts modules of ``model`` that use transformers' interface (and, if given, that implementation)."""
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if hasattr(module, "has_gate") and hasattr(module, "is_transposed") and config is not None:
            if implementation is None or getattr(config, "_experts_implementation", None) == implementation:
                yield name, module


def check_model(model: nn.Module) -> None:
    """Raise ``UnsupportedExperts`` if an experts module set to "moe_learn" cannot be served."""
    for _, module in _experts_modules(model, IMPLEMENTATION):
        experts_layout(module)


_REGISTERED = [False]


def register() -> None:
    """Register ``"moe_learn"`` with transformers' ``ExpertsInterface`` and check models as they are built."""
    if _REGISTERED[0]:
        return
    from transformers.integrations.moe import ExpertsInterface
    from transformers.modeling_utils import PreTrainedModel

    ExpertsInterface.register(IMPLEMENTATION, experts_forward)
    # Refuse unservable experts when the model is built (post_init runs at the end of every
    # model's __init__, from_config and from_pretrained alike) or switched, not at the first forward.
    post_init, set_impl = PreTrainedModel.post_init, PreTrainedModel.set_experts_implementation

    def checked_post_init(self, *args, **kwargs):
        result = post_init(self, *args, **kwargs)
        check_model(self)
        return result

    def checked_set_experts_implementation(self, *args, **kwargs):
        result = set_impl(self, *args, **kwargs)
        check_model(self)
        return result

    PreTrainedModel.post_init = checked_post_init
    PreTrainedModel.set_experts_implementation = checked_set_experts_implementation
    _REGISTERED[0] = True


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers with transformers right after ``transformers.modeling_utils`` is first imported.

    Importing transformers costs seconds, so ``import moe_learn`` does not do it; a program that
    uses transformers imports it anyway, and the registration follows.
    """

    TARGET = "transformers.modeling_utils"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.TARGET:
            return None
        sys.meta_path.remove(self)  # find the real module, once
        try:
            import importlib.util

            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        register()


def install() -> None:
    """Register now if transformers is loaded, else as soon as it is (``import moe_learn`` calls this)."""
    if "transformers.modeling_utils" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


# ------------------------------------------------------------------------------------------ Llama 4


class FusedLlama4TextMoe(nn.Module):
    """Llama 4's text MoE: sigmoid scores scale the expert input, plus a shared expert.

    Llama 4's text MoE does not use transformers' experts interface. Each (token, slot) pair
    is its own row ``x_t * score_tj`` routed to one expert with weight 1, so the score's
    gradient flows through the input scaling (plain PyTorch) and the experts run as the
    fused top-1 problem of ``T * k`` rows. Holds the SAME submodules as the block it replaces.
    """

    def __init__(self, block: nn.Module, backend: str = "triton"):
        super().__init__()
        check_backend(backend)
        experts = block.experts
        for attr in ("gate_up_proj", "down_proj"):
            if not isinstance(getattr(experts, attr, None), torch.Tensor):
                raise UnsupportedExperts(f"llama4 ({type(block).__name__}): experts have no tensor {attr!r}")
        if not is_silu(getattr(experts, "act_fn", None)):
            raise UnsupportedExperts(f"llama4 ({type(block).__name__}): experts.act_fn is not SiLU")
        self.backend = backend
        self._original = (block,)  # a tuple is not registered: unpatch_model puts it back
        self.router, self.experts, self.shared_expert = block.router, block.experts, block.shared_expert
        self.top_k, self.hidden_dim = block.top_k, block.hidden_dim

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)
        # The router returns dense scores [T, E] (sigmoid of the top-k logits, 0 elsewhere).
        router_scores, router_logits = self.router(x)
        ids = torch.topk(router_logits, self.top_k, dim=1).indices  # the router's own picks
        scores = router_scores.gather(1, ids)  # gradients reach the logits through the router
        num_tokens, top_k = ids.shape
        routed_in = (x.unsqueeze(1) * scores.unsqueeze(-1).to(x.dtype)).reshape(num_tokens * top_k, self.hidden_dim)
        ones = routed_in.new_ones(num_tokens * top_k, 1)
        routed = moe_experts(
            routed_in, ids.reshape(-1, 1), ones, self.experts.gate_up_proj, self.experts.down_proj,
            transpose=False, backend=self.backend,
        )
        out = self.shared_expert(x) + routed.view(num_tokens, top_k, self.hidden_dim).sum(dim=1)
        return out, router_logits


# ------------------------------------------------------------------------------------------ patch_model


def _switch(experts: nn.Module, backend: str) -> None:
    """Run one experts module on "moe_learn" with ``backend``, through a config copy of its own (so
    the other modules keep theirs); the original config is kept for ``unpatch_model``."""
    if not hasattr(experts, "_moe_learn_previous"):
        experts._moe_learn_previous = (experts.config, experts.config._experts_implementation)
    experts.config = copy.copy(experts.config)
    experts.config._experts_implementation_internal = IMPLEMENTATION
    setattr(experts, _BACKEND_ATTR, backend)


def fuse_moe_block(block: nn.Module, backend: str = "triton") -> nn.Module:
    """One MoE block on the course's kernels: Llama 4's text MoE is replaced (parameters
    shared); a block whose experts use transformers' interface is switched in place."""
    check_backend(backend)
    name = type(block).__name__
    if name in LLAMA4_BLOCKS:
        return FusedLlama4TextMoe(block, backend)
    found = list(_experts_modules(block))
    if not found:
        raise TypeError(f"{name} has no experts module that uses transformers' experts interface and is not a "
                        f"Llama 4 text MoE ({', '.join(LLAMA4_BLOCKS)}); it cannot run on the course's kernels")
    for _, experts in found:
        experts_layout(experts)  # refuse before changing anything
    for _, experts in found:
        _switch(experts, backend)
    return block


def _replace(model: nn.Module, match, make) -> list[str]:
    targets = [(name, module) for name, module in model.named_modules() if name and match(module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(module))
    return [name for name, _ in targets]


def patch_model(model: nn.Module, *, backend: str = "triton") -> nn.Module:
    """Run every MoE layer of ``model`` (in place) on the course's kernels; returns the model.

    Experts modules that use transformers' experts interface switch to ``"moe_learn"``;
    Llama 4 text MoE blocks are swapped for ``FusedLlama4TextMoe``. Parameters are shared, so
    an optimizer built before or after the patch trains the same tensors, and
    ``model.state_dict()`` keys do not change. ``unpatch_model`` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend(backend)
    replaced = _replace(model, lambda m: type(m).__name__ in LLAMA4_BLOCKS, lambda m: FusedLlama4TextMoe(m, backend))
    switched = []
    for name, experts in _experts_modules(model):
        experts_layout(experts)  # refuse before changing anything
        switched.append((name, experts))
    for _, experts in switched:
        _switch(experts, backend)
    if not replaced and not switched:
        raise ValueError(
            f"found no MoE block to patch in {type(model).__name__}: no experts module uses transformers' experts "
            f"interface and no block is a Llama 4 text MoE ({', '.join(LLAMA4_BLOCKS)})"
        )
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo ``patch_model``: the original blocks and experts implementations are back."""
    _replace(model, lambda m: isinstance(m, FusedLlama4TextMoe), lambda m: m.original)
    for _, experts in _experts_modules(model):
        previous = experts.__dict__.pop("_moe_learn_previous", None)
        if previous is not None:
            experts.config = previous[0]
            experts.__dict__.pop(_BACKEND_ATTR, None)
    return model


def fused_blocks(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that run on the course's kernels."""
    return [name for name, m in model.named_modules()
            if isinstance(m, FusedLlama4TextMoe)
            or (hasattr(m, "has_gate") and getattr(getattr(m, "config", None), "_experts_implementation", None)
                == IMPLEMENTATION)]
