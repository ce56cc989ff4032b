"""Every transformers MoE family that uses the experts interface, built tiny from its config (no download).

``families()`` lists the model types whose modeling code decorates an experts class with
``use_experts_implementation``; ``build_tiny(model_type)`` builds the base model of one with
small sizes and random weights; ``compare(model_type)`` runs it with ``"eager"`` and with
``"moe_learn"`` and returns the largest differences of the outputs and of every gradient.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from functools import cache

import torch

import moe_learn  # noqa: F401  (registers "moe_learn" with transformers once it is imported)
from moe_learn.device import DEVICE

SIZES = dict(
    hidden_size=32, intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=16,
    expert_intermediate_size=16, ffn_hidden_size=32, moe_ffn_hidden_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    vocab_size=96, max_position_embeddings=64,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_topk=2, moe_k=2, top_k=2, n_shared_experts=1, num_shared_experts=1, first_k_dense_replace=0,
    n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=8, qk_head_dim=16, decoder_sparse_step=1, mlp_only_layers=[], sliding_window=16, rope_theta=10000.0,
    moe_layer_freq=1, first_dense_layers=0, num_dense_layers=0, moe_layer_start_index=0, dense_layers=0,
    router_aux_loss_coef=0.0, attention_chunk_size=16, partial_rotary_factor=1.0, linear_num_value_heads=2,
    linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, conv_kernel_size=2,
    linear_conv_kernel_dim=2, index_n_heads=2, index_head_dim=16, index_topk=8, mamba_n_heads=4, mamba_d_head=8,
    mamba_d_state=8, mamba_n_groups=1, ssm_state_size=8, mamba_d_conv=2, mamba_expand=1, n_groups=1,
    mamba_head_dim=8, mamba_num_heads=4, num_nextn_predict_layers=0, num_mtp_layers=0,
)


@cache
def families() -> tuple[str, ...]:
    """Model types whose base model's modeling code uses transformers' experts interface."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    found = []
    for model_type, class_name in sorted(MODEL_MAPPING_NAMES.items()):
        if not isinstance(class_name, str):
            continue
        try:
            module = importlib.import_module(getattr(transformers, class_name).__module__)
            source = inspect.getsource(module)
        except Exception:  # noqa: BLE001 - a model transformers cannot import here is not one we can test
            continue
        if "@use_experts_implementation" in source:
            found.append(model_type)
    return tuple(found)


def _shrink(config) -> None:
    for key, value in SIZES.items():
        try:
            if not hasattr(config, key):
                continue
            current = getattr(config, key)
            if current is None and key in ("q_lora_rank", "kv_lora_rank"):
                continue  # the family has no low-rank projection: keep it that way
            setattr(config, key, copy.copy(value))
        except Exception:  # noqa: BLE001 - a per-layer, read-only or validated field stays as it is
            pass
    if hasattr(config, "attn_layer_period"):  # Jamba: attention in layer 1, experts in every layer
        config.attn_layer_period, config.attn_layer_offset = 2, 1
        config.expert_layer_period, config.expert_layer_offset = 1, 0
    layers = getattr(config, "num_hidden_layers", None)
    for key in ("layer_types", "layers_block_type", "hybrid_override_pattern", "mlp_layer_types", "attn_layer_types"):
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and layers:
            # keep the family's own pattern, cut to the layer count (a mix of kinds when it has one)
            kinds = list(dict.fromkeys(value))
            pattern = (kinds * layers)[:layers] if len(kinds) > 1 else list(value)[:layers]
            try:
                setattr(config, key, pattern)
            except Exception:  # noqa: BLE001
                pass
    for key in ("rope_parameters", "rope_scaling"):
        try:
            rope, head_dim = getattr(config, key, None), getattr(config, "head_dim", None) or 8
        except Exception:  # noqa: BLE001 - a per-layer attribute
            continue
        if isinstance(rope, dict) and rope.get("mrope_section"):
            # multimodal rotary sections must add up to half the rotary dims: keep their number
            n, half = len(rope["mrope_section"]), head_dim // 2
            rope["mrope_section"] = [half // n + (i < half % n) for i in range(n)]


def build_tiny(model_type: str, implementation: str = "eager", seed: int = 0):
    """The base model of ``model_type`` with tiny sizes and random weights (float32, eval mode)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    # A multimodal model's experts live in its language model: build that alone (its vision or
    # audio tower, at default sizes, would take gigabytes and has no experts).
    for sub in ("text_config", "thinker_config"):
        inner = getattr(config, sub, None)
        if inner is not None and getattr(inner, "model_type", None):
            config = getattr(inner, "text_config", None) or inner
            break
    _shrink(config)
    config._experts_implementation = implementation
    torch.manual_seed(seed)
    model = _model_class(config)._from_config(config).float().eval().to(DEVICE)
    with torch.no_grad():  # some inits leave experts at zero or empty
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _model_class(config):
    """The base model class for ``config``: AutoModel's, or the text model next to a multimodal one."""
    from transformers import AutoModel, PreTrainedModel

    try:
        return AutoModel._model_mapping[type(config)]
    except KeyError:
        pass
    module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    candidates = [obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, PreTrainedModel)
                  and getattr(obj, "config_class", None) is type(config) and obj.__name__.endswith("Model")]
    if not candidates:
        raise LookupError(f"no base model class for {type(config).__name__}")
    return min(candidates, key=lambda c: len(c.__name__))


def experts_modules(model) -> list[str]:
    return [name for name, m in model.named_modules() if hasattr(m, "has_gate") and hasattr(m, "is_transposed")]


def _run(model, input_ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden.float().square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return hidden.detach(), grads


class EagerFails(Exception):
    """The tiny model does not build or run with transformers' own "eager" experts: not counted."""


class AlreadyCompared(Exception):
    """The model type builds the same model class as one compared before."""


def compare(model_type: str, seen: dict | None = None) -> dict:
    """Outputs and every parameter's gradient under "eager" and "moe_learn" (same weights, same input).

    Raises ``EagerFails`` when the tiny model does not build or run with "eager" (or has no
    experts module): such a family is left out of the comparison, not counted as ours failing.
    ``seen`` maps model classes already compared to their model type (``AlreadyCompared``).
    """
    seen = {} if seen is None else seen
    input_ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    try:
        reference = build_tiny(model_type, "eager")
        if not experts_modules(reference):
            raise EagerFails("the tiny model has no experts module")
        ref_out, ref_grads = _run(reference, input_ids)
    except EagerFails:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' own failure, reported with the family
        raise EagerFails(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if type(reference).__name__ in seen:  # a multimodal type whose language model was compared already
        raise AlreadyCompared(f"builds {type(reference).__name__}, compared as {seen[type(reference).__name__]}")
    seen[type(reference).__name__] = model_type
    ours = copy.deepcopy(reference)
    ours.set_experts_implementation("moe_learn")
    out, grads = _run(ours, input_ids)
    scale = lambda t: t.abs().max().clamp_min(1e-6).item()  # noqa: E731
    return {
        "experts": len(experts_modules(ours)),
        "output": ((out - ref_out).abs().max() / scale(ref_out)).item(),
        "grad": max((((grads[n] - g).abs().max()) / scale(g)).item() for n, g in ref_grads.items()),
        "same_grad_names": grads.keys() == ref_grads.keys(),
    }


def sweep(path: str) -> None:
    """Compare every family; write {family: result} as JSON to ``path`` (run in a child process)."""
    import json
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    from moe_learn.layers.hf import UnsupportedExperts

    results, seen = {}, {}
    for model_type in families():
        try:
            results[model_type] = {"status": "compared", **compare(model_type, seen)}
        except AlreadyCompared as exc:
            results[model_type] = {"status": "same model", "why": str(exc)}
        except EagerFails as exc:
            results[model_type] = {"status": "eager fails", "why": str(exc)}
        except UnsupportedExperts as exc:
            results[model_type] = {"status": "refused", "why": str(exc)}
        except Exception as exc:  # noqa: BLE001 - ours failed: the test reports it
            results[model_type] = {"status": "error", "why": f"{type(exc).__name__}: {str(exc)[:300]}"}
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    import sys

    sweep(sys.argv[1])
