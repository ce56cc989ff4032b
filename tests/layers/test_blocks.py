"""MoEBlock (TorchMoEBlock / FusedMoEBlock): shapes, training, and from_hf against transformers."""

import pytest
import torch

from moe_learn import TorchMoEBlock
from moe_learn.device import DEVICE


def test_block_accepts_batched_and_flat_input():
    torch.manual_seed(0)
    block = TorchMoEBlock(8, 6, num_experts=4, top_k=2).to(DEVICE)
    x = torch.randn(2, 3, 8, device=DEVICE)
    y = block(x)
    assert y.shape == x.shape
    torch.testing.assert_close(block(x.view(6, 8)), y.view(6, 8))
    assert block(x[:, :0]).shape == (2, 0, 8)  # zero tokens
    y.sum().backward()
    assert all(p.grad is not None for p in block.parameters())
    with pytest.raises(ValueError, match="top_k=5 is larger than num_experts=4"):
        TorchMoEBlock(8, 6, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match=r"hidden_states has 7 features but this block has hidden_size=8"):
        block(torch.randn(3, 7, device=DEVICE))


# ------------------------------------------------------------------ against transformers


def hf_block(kind, *, norm_topk_prob=True, E=6, k=2, H=16, inter=8, dtype=torch.float32):
    """A tiny transformers MoE block built from a config (no download), weights set with randn."""
    if kind == "qwen3":
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(
            hidden_size=H, moe_intermediate_size=inter, num_experts=E, num_experts_per_tok=k,
            norm_topk_prob=norm_topk_prob,
        )
        cls = Qwen3MoeSparseMoeBlock
    else:
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=H, intermediate_size=inter, num_local_experts=E, num_experts_per_tok=k)
        cls = MixtralSparseMoeBlock
    cfg._experts_implementation = "eager"  # the per-expert loop, the clearest reference
    block = cls(cfg).eval()
    with torch.no_grad():  # transformers inits the router to zeros / empty: give it real numbers
        for p in block.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return block.to(DEVICE, dtype)


@pytest.mark.parametrize(
    "kind, norm, k", [("qwen3", True, 2), ("qwen3", False, 2), ("qwen3", True, 1), ("mixtral", True, 2)]
)
def test_matches_transformers(kind, norm, k):
    block = hf_block(kind, norm_topk_prob=norm, k=k)
    ours = TorchMoEBlock.from_hf(block)
    assert (ours.top_k, ours.renormalize, ours.num_experts) == (k, norm, 6)
    x = torch.randn(3, 5, 16, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_transformers_in_half_precision(dtype):
    block = hf_block("qwen3", dtype=dtype)
    ours = TorchMoEBlock.from_hf(block)
    x = torch.randn(2, 8, 16, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        got, ref = ours(x), block(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), rtol=3e-2, atol=3e-2)


def test_from_hf_shares_the_weights():
    block = hf_block("qwen3")
    ours = TorchMoEBlock.from_hf(block)
    assert ours.gate_up_proj is block.experts.gate_up_proj and ours.router.weight is block.gate.weight
    x = torch.randn(4, 16, device=DEVICE)
    with torch.no_grad():
        block.experts.down_proj.mul_(2.0)  # a change to the HF block shows in ours
        torch.testing.assert_close(ours(x), block(x[None])[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="Linear is not a block TorchMoEBlock.from_hf reproduces"):
        TorchMoEBlock.from_hf(torch.nn.Linear(4, 4))
