"""Patched transformers MoE models give the same logits and the same gradient for every parameter."""

import copy

import pytest
import torch

from moe_learn.device import DEVICE
from moe_learn.layers.hf import (
    FusedLlama4TextMoe,
    UnsupportedExperts,
    experts_layout,
    fuse_moe_block,
    fused_blocks,
    patch_model,
    unpatch_model,
)

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


def _gpt_oss():
    config = transformers.GptOssConfig(**COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                                       layer_types=["full_attention", "sliding_attention"], sliding_window=8)
    return transformers.GptOssForCausalLM(config)


def _is_experts(module):
    return hasattr(module, "has_gate") and module.config._experts_implementation == "moe_learn"


MODELS = {  # the fused modules are experts modules on "moe_learn", or Llama 4 blocks swapped whole
    "qwen3_moe": (_qwen3, _is_experts),
    "qwen3_moe_top_k_equals_num_experts": (lambda: _qwen3(top_k=8), _is_experts),
    "mixtral": (_mixtral, _is_experts),
    "gpt_oss": (_gpt_oss, _is_experts),
    "llama4": (_llama4, lambda m: isinstance(m, FusedLlama4TextMoe)),
    "llama4_top2": (lambda: _llama4(top_k=2), lambda m: isinstance(m, FusedLlama4TextMoe)),
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
    make, is_fused = MODELS[name]
    torch.manual_seed(0)
    reference = _init(make())
    patched = copy.deepcopy(reference)
    params_before = {n: p.data_ptr() for n, p in patched.named_parameters()}
    assert patch_model(patched) is patched
    names = fused_blocks(patched)
    assert len(names) == 2 and all(is_fused(patched.get_submodule(n)) for n in names)
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
    experts = model.model.layers[1].mlp.experts
    before = experts.config._experts_implementation
    patch_model(model, backend="torch")
    assert experts.config._experts_implementation == "moe_learn" and len(fused_blocks(model)) == 2
    patch_model(model)  # patching twice is harmless
    unpatch_model(model)
    assert experts.config._experts_implementation == before != "moe_learn" and not fused_blocks(model)
    assert model.model.layers[1].mlp.experts is experts
    llama = _init(_llama4())
    original = llama.model.layers[0].feed_forward
    unpatch_model(patch_model(llama))
    assert llama.model.layers[0].feed_forward is original
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_model(model, backend="cuda")
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        patch_model("qwen3")
    with pytest.raises(ValueError, match="found no MoE block"):
        patch_model(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="Linear has no experts module"):
        fuse_moe_block(torch.nn.Linear(2, 2))


def test_from_config_from_pretrained_and_set_experts_implementation(tmp_path):
    """experts_implementation="moe_learn" is a name transformers accepts, in all three ways."""
    reference = _init(_qwen3())
    ids = torch.randint(0, 64, (2, 5), device=DEVICE)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    built = transformers.Qwen3MoeForCausalLM._from_config(reference.config, experts_implementation="moe_learn")
    assert built.config._experts_implementation == "moe_learn"
    reference.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moe_learn")
    assert loaded.config._experts_implementation == "moe_learn"
    with torch.no_grad():
        torch.testing.assert_close(loaded.to(DEVICE)(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    reference.set_experts_implementation("moe_learn")
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_expert_parallel_sentinels_contribute_nothing():
    """Ids >= num_experts (transformers' EP sentinels) add nothing and give the router no gradient there."""
    model = _init(_qwen3())
    experts = model.model.layers[0].mlp.experts
    experts.config._experts_implementation = "moe_learn"
    x = torch.randn(5, 32, device=DEVICE, requires_grad=True)
    ids = torch.tensor([[0, 8], [1, 2], [9, 3], [4, 5], [8, 8]], device=DEVICE)
    weights = torch.rand(5, 2, device=DEVICE, requires_grad=True)
    out = experts(x, ids, weights)
    valid = ids < 8
    ref = experts(x, ids.clamp(max=7), weights * valid)  # the same, with the sentinels' weights at zero
    torch.testing.assert_close(out, ref)
    assert out[4].abs().max() == 0  # both picks were sentinels
    (grad,) = torch.autograd.grad(out.sum(), weights)
    assert (grad[~valid] == 0).all() and (grad[valid] != 0).all()


def test_unservable_experts_are_refused_when_the_model_is_built():
    model = _init(_qwen3())
    experts = model.model.layers[0].mlp.experts
    # int8 weights, as a quantized checkpoint would hold them
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedExperts, match=r"qwen3_moe \(Qwen3MoeExperts\): gate_up_proj is torch.int8"):
        experts_layout(experts)
    with pytest.raises(UnsupportedExperts, match="gate_up_proj is torch.int8"):
        model.set_experts_implementation("moe_learn")


def test_llama4_on_zero_tokens_returns_an_empty_output():
    model = _init(_llama4())
    block = model.model.layers[0].feed_forward
    fused = FusedLlama4TextMoe(block)
    x = torch.randn(0, 32, device=DEVICE)
    out, logits = fused(x)
    ref, ref_logits = block(x)
    assert out.shape == ref.shape == (0, 32) and logits.shape == ref_logits.shape
