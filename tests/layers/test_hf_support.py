"""Issue 13, items 2 and 4: the transformers drop-in at k = E, and MoEBlock.from_hf refusing what it does not compute.

At ``top_k == num_experts`` a transformers router's logits and its top-k weights have the
same shape and dtype: a drop-in that picks the weights by shape takes the logits instead
(off by 3.4, silently). And a block ``from_hf`` accepts must give the block's own output:
Qwen2-MoE's shared expert, Qwen3-Next's, DeepSeek-V3's group-limited sigmoid routing and
GLM-4-MoE's are things ``MoEBlock`` does not compute, so those blocks are refused.
All blocks are built from tiny configs (no download).
"""

import pytest
import torch

from moe_learn import MoEBlock, TorchMoEBlock
from moe_learn.layers.hf import fuse_moe_block

transformers = pytest.importorskip("transformers")

H, INTER, E = 16, 8, 4


def _randomize(block):
    with torch.no_grad():  # transformers inits some routers to zeros or empty
        for p in block.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return block.eval()


def _qwen3(k):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=INTER, num_experts=E,
                                      num_experts_per_tok=k, norm_topk_prob=False)
    cfg._experts_implementation = "eager"
    return _randomize(Qwen3MoeSparseMoeBlock(cfg))


def _mixtral(k):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = transformers.MixtralConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = "eager"
    return _randomize(MixtralSparseMoeBlock(cfg))


def _qwen2_moe():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = transformers.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=INTER, shared_expert_intermediate_size=INTER,
                                      num_experts=E, num_experts_per_tok=2)
    return _randomize(Qwen2MoeSparseMoeBlock(cfg))


def _qwen3_next():
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    cfg = transformers.Qwen3NextConfig(hidden_size=H, moe_intermediate_size=INTER,
                                       shared_expert_intermediate_size=INTER, num_experts=E, num_experts_per_tok=2)
    return _randomize(Qwen3NextSparseMoeBlock(cfg))


def _deepseek_v3():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = transformers.DeepseekV3Config(hidden_size=H, moe_intermediate_size=INTER, n_routed_experts=E,
                                        num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1)
    return _randomize(DeepseekV3MoE(cfg))


def _glm4_moe():
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    cfg = transformers.Glm4MoeConfig(hidden_size=H, moe_intermediate_size=INTER, n_routed_experts=E,
                                     num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1)
    return _randomize(Glm4MoeMoE(cfg))


@pytest.mark.parametrize("make", [_qwen3, _mixtral], ids=["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("k", [2, E])
def test_drop_in_matches_transformers_also_at_k_equal_e(make, k):
    block = make(k)
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        want = block(x)
        want = want[0] if isinstance(want, tuple) else want
        got = fuse_moe_block(block, backend="torch")(x)
        ours = TorchMoEBlock.from_hf(block)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [_qwen2_moe, _qwen3_next, _deepseek_v3, _glm4_moe],
                         ids=["qwen2_moe", "qwen3_next", "deepseek_v3", "glm4_moe"])
@pytest.mark.parametrize("cls", [MoEBlock, TorchMoEBlock])
def test_from_hf_refuses_blocks_it_does_not_compute(make, cls):
    block = make()
    name = type(block).__name__
    with pytest.raises(TypeError, match=rf"{name} is not a block {cls.__name__}\.from_hf reproduces"):
        cls.from_hf(block)
