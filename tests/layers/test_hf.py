"""Patched transformers MoE models give the same logits and the same gradient for every parameter."""

import copy

import pytest
import torch

from moe_learn.device import DEVICE
from moe_learn.layers.hf import FusedLlama4TextMoe, FusedSparseMoeBlock, fused_blocks, patch_model, unpatch_model

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, max_position_embeddings=64)


def _qwen3(top_k=2, **extra):
    config = transformers.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                                         num_experts_per_tok=top_k, norm_topk_prob=True, **extra)
    return transformers.Qwen3MoeForCausalLM(config)


def _mixtral(**extra):
    config = transformers.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                                        **extra)
    return transformers.MixtralForCausalLM(config)


def _llama4(top_k=1):
    config = transformers.Llama4TextConfig(**COMMON, intermediate_size=16, intermediate_size_mlp=48,
                                           num_local_experts=4, num_experts_per_tok=top_k)
    return transformers.Llama4ForCausalLM(config)


MODELS = {
    "qwen3_moe": (_qwen3, FusedSparseMoeBlock),
    "mixtral": (_mixtral, FusedSparseMoeBlock),
    "llama4": (_llama4, FusedLlama4TextMoe),
    "llama4_top2": (lambda: _llama4(top_k=2), FusedLlama4TextMoe),
}


def _init(model):
    """Random weights everywhere (some transformers inits leave experts at zero or empty)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.to(DEVICE).float()


def _loss_and_grads(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_model_matches_logits_and_every_gradient(name):
    make, fused_type = MODELS[name]
    torch.manual_seed(0)
    reference = _init(make())
    patched = copy.deepcopy(reference)
    params_before = {n: p.data_ptr() for n, p in patched.named_parameters()}
    assert patch_model(patched) is patched
    names = fused_blocks(patched)
    assert len(names) == 2 and all(isinstance(patched.get_submodule(n), fused_type) for n in names)
    # Shared, not copied: the same tensors under the same names.
    assert {n: p.data_ptr() for n, p in patched.named_parameters()} == params_before

    ids = torch.randint(0, 64, (2, 7), device=DEVICE)
    ref_out, ref_grads = _loss_and_grads(reference, ids)
    out, grads = _loss_and_grads(patched, ids)
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == {n for n, _ in reference.named_parameters()} == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    # The routers got gradients through the fused experts.
    assert any("gate.weight" in n or "router.weight" in n for n in grads)
    assert all(grads[n].abs().sum() > 0 for n in grads if n.endswith(("gate.weight", "router.weight")))


def test_router_logits_and_aux_loss_still_recorded():
    torch.manual_seed(1)
    reference = _init(_mixtral(output_router_logits=True, router_aux_loss_coef=0.1))
    patched = patch_model(copy.deepcopy(reference))
    ids = torch.randint(0, 64, (1, 9), device=DEVICE)
    ref_out, ref_grads = _loss_and_grads(reference, ids, output_router_logits=True)
    out, grads = _loss_and_grads(patched, ids, output_router_logits=True)
    assert out.aux_loss is not None and len(out.router_logits) == 2
    torch.testing.assert_close(out.aux_loss, ref_out.aux_loss)
    torch.testing.assert_close(grads["model.layers.0.mlp.gate.weight"], ref_grads["model.layers.0.mlp.gate.weight"],
                               rtol=1e-4, atol=1e-5)


def test_unpatch_restores_and_errors_are_clear():
    model = _init(_qwen3())
    original = model.model.layers[1].mlp
    patch_model(model, backend="torch")
    with pytest.raises(ValueError, match="2 block"):
        patch_model(model)
    unpatch_model(model)
    assert model.model.layers[1].mlp is original and not fused_blocks(model)
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_model(model, backend="cuda")
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        patch_model("qwen3")
    with pytest.raises(ValueError, match="no MoE block"):
        patch_model(torch.nn.Linear(2, 2))
