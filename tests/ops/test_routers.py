"""The five routers match Hugging Face transformers' modules, built from tiny random configs.

No download: each test builds the transformers router from a config, copies random
weights into it, and compares. Only the router submodules are used, so small API changes
between transformers releases (5.17 on the GPU machine, 5.2x here) do not matter.
"""

import importlib

import pytest
import torch

from moe_learn.device import DEVICE
from moe_learn.ops.routers import (
    ROUTERS,
    deepseek_v3_router,
    dense_router_scores,
    gpt_oss_router,
    group_limited_mask,
    llama4_router,
    mixtral_router,
    qwen3_moe_router,
)

transformers = pytest.importorskip("transformers")


def _hf(module: str, *names: str):
    """The first of ``names`` that transformers' ``module`` defines (names move between releases)."""
    mod = importlib.import_module(f"transformers.models.{module}")
    for name in names:
        if hasattr(mod, name):
            return getattr(mod, name)
    pytest.skip(f"transformers {transformers.__version__} has none of {names} in {module}")


def _inputs(num_tokens, hidden, num_experts, dtype):
    x = torch.randn(num_tokens, hidden, device=DEVICE).to(dtype)
    w = (torch.randn(num_experts, hidden, device=DEVICE) / hidden**0.5 * 2).to(dtype)
    return x, w


def _load(module: torch.nn.Module, dtype, **tensors):
    module = module.to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(module, name).copy_(value)
    return module


def _by_expert(ids, weights):
    ids_sorted, order = ids.sort(dim=1)
    return ids_sorted, weights.gather(1, order)


def _assert_same_routing(ref_ids, ref_w, ids, w, key, rtol, atol):
    """Same experts and weights per token, slot order aside.

    A token may pick a different expert only where the selection scores ``key`` tie (bf16
    rounding makes ties common; torch.topk breaks them in no documented order).
    """
    ref_ids, ref_w = _by_expert(ref_ids.long(), ref_w.float())
    ids, w = _by_expert(ids.long(), w.float())
    same = (ref_ids == ids).all(dim=1)
    torch.testing.assert_close(w[same], ref_w[same], rtol=rtol, atol=atol)
    for t in (~same).nonzero().flatten().tolist():
        torch.testing.assert_close(key[t, ids[t]].sort().values, key[t, ref_ids[t]].sort().values)
    assert same.float().mean() > 0.8, "most tokens cannot be ties"


DTYPES = [(torch.float32, 1e-6, 1e-6), (torch.bfloat16, 1.6e-2, 1e-2), (torch.float16, 2e-3, 1e-3)]


@pytest.mark.parametrize(("dtype", "rtol", "atol"), DTYPES)
@pytest.mark.parametrize("norm", [True, False])
def test_qwen3_moe_router_matches_transformers(dtype, rtol, atol, norm):
    Router = _hf("qwen3_moe.modeling_qwen3_moe", "Qwen3MoeTopKRouter")
    config = transformers.Qwen3MoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm)
    x, w = _inputs(24, 16, 8, dtype)
    ref_logits, ref_w, ref_ids = _load(Router(config), dtype, weight=w)(x)
    logits, weights, ids = qwen3_moe_router(x, w, 2, norm)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert weights.dtype == ref_w.dtype
    _assert_same_routing(ref_ids, ref_w, ids, weights, logits.float(), rtol, atol)


@pytest.mark.parametrize(("dtype", "rtol", "atol"), DTYPES)
def test_mixtral_router_matches_transformers(dtype, rtol, atol):
    Router = _hf("mixtral.modeling_mixtral", "MixtralTopKRouter")
    config = transformers.MixtralConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=2)
    x, w = _inputs(24, 16, 8, dtype)
    ref_logits, ref_w, ref_ids = _load(Router(config), dtype, weight=w)(x)
    logits, weights, ids = mixtral_router(x, w, 2)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert weights.dtype == ref_w.dtype == torch.float32, "Mixtral keeps its weights in float32"
    _assert_same_routing(ref_ids, ref_w, ids, weights, logits.float(), rtol, atol)


@pytest.mark.parametrize(("dtype", "rtol", "atol"), DTYPES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_llama4_router_matches_transformers(dtype, rtol, atol, top_k):
    Router = _hf("llama4.modeling_llama4", "Llama4Router")
    config = transformers.Llama4TextConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=top_k)
    x, w = _inputs(24, 16, 8, dtype)
    ref_scores, ref_logits = _load(Router(config), dtype, weight=w)(x)  # dense [T, E] scores
    logits, weights, ids = llama4_router(x, w, top_k)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    ref_ids = ref_scores.float().topk(top_k, dim=-1).indices
    _assert_same_routing(ref_ids, ref_scores.gather(1, ref_ids), ids, weights, logits.float(), rtol, atol)
    if dtype == torch.float32:
        torch.testing.assert_close(dense_router_scores(weights, ids, 8), ref_scores, rtol=0, atol=0)


def test_llama4_weights_scale_the_expert_input():
    """Llama4TextMoe = shared(x) + sum_e expert_e(x * score_e): the score multiplies the INPUT."""
    Moe = _hf("llama4.modeling_llama4", "Llama4TextMoe")
    config = transformers.Llama4TextConfig(
        hidden_size=16, intermediate_size=8, num_local_experts=4, num_experts_per_tok=1
    )
    moe = Moe(config).to(DEVICE)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(10, 16, device=DEVICE)
    out = moe(x)
    out = out[0] if isinstance(out, tuple) else out
    _, weights, ids = llama4_router(x, moe.router.weight, 1)
    with torch.no_grad():
        expected = moe.shared_expert(x)
        wrong = moe.shared_expert(x)
        for t in range(x.shape[0]):
            e, s = int(ids[t, 0]), weights[t, 0]
            # Run expert e alone: the experts module computes every expert on its own row block.
            block = torch.zeros(4, 16, device=DEVICE)
            block[e] = x[t] * s
            expected[t] += moe.experts(block)[e]
            block[e] = x[t]
            wrong[t] += s * moe.experts(block)[e]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, wrong, rtol=1e-3, atol=1e-4), "scaling the output instead must differ"


@pytest.mark.parametrize(("dtype", "rtol", "atol"), DTYPES)
def test_gpt_oss_router_matches_transformers(dtype, rtol, atol):
    Router = _hf("gpt_oss.modeling_gpt_oss", "GptOssTopKRouter")
    config = transformers.GptOssConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=4)
    x, w = _inputs(24, 16, 8, dtype)
    bias = torch.randn(8, device=DEVICE).to(dtype)
    ref_logits, ref_w, ref_ids = _load(Router(config), dtype, weight=w, bias=bias)(x)
    logits, weights, ids = gpt_oss_router(x, w, bias, 4)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert weights.dtype == ref_w.dtype
    _assert_same_routing(ref_ids, ref_w, ids, weights, logits.float(), rtol, atol)


@pytest.mark.parametrize(("dtype", "rtol", "atol"), DTYPES)
@pytest.mark.parametrize(
    ("num_experts", "top_k", "n_group", "topk_group", "norm", "scale"),
    [(16, 4, 4, 2, True, 2.5), (16, 3, 4, 1, False, 1.0), (12, 4, 3, 2, True, 1.0), (8, 2, 1, 1, False, 2.0)],
)
def test_deepseek_v3_router_matches_transformers(
    dtype, rtol, atol, num_experts, top_k, n_group, topk_group, norm, scale
):
    Router = _hf("deepseek_v3.modeling_deepseek_v3", "DeepseekV3TopkRouter")
    config = transformers.DeepseekV3Config(
        hidden_size=16,
        n_routed_experts=num_experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
    )
    x, w = _inputs(32, 16, num_experts, dtype)
    bias = torch.randn(num_experts, device=DEVICE) * 0.3
    router = Router(config).to(DEVICE)  # the router keeps float32 weights and casts itself
    with torch.no_grad():
        router.weight.copy_(w.float())
        router.e_score_correction_bias.copy_(bias)
    ref_logits, ref_w, ref_ids = router(x)
    logits, weights, ids = deepseek_v3_router(x, w, bias, top_k, n_group, topk_group, norm, scale)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert weights.dtype == ref_w.dtype == torch.float32
    biased = torch.sigmoid(logits) + bias
    key = biased.masked_fill(~group_limited_mask(biased, n_group, topk_group), float("-inf"))
    # transformers sums the k weights in its own (unsorted) slot order: 1 ulp apart at most.
    _assert_same_routing(ref_ids, ref_w, ids, weights, key, 1e-6, 1e-6)


def test_deepseek_bias_picks_but_does_not_weigh():
    x, w = _inputs(16, 8, 8, torch.float32)
    bias = torch.zeros(8, device=DEVICE)
    bias[5] = 10.0  # expert 5 always wins the selection...
    _, weights, ids = deepseek_v3_router(x, w, bias, 2, 1, 1, norm_topk_prob=False)
    assert bool((ids == 5).any(dim=1).all())
    scores = torch.sigmoid(x @ w.T)
    torch.testing.assert_close(weights, scores.gather(1, ids))  # ...but weighs its plain sigmoid score


def test_group_limit_keeps_experts_in_the_best_groups():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.1, 0.5, 0.5, 0.7, 0.0]])
    mask = group_limited_mask(scores, n_group=4, topk_group=2)  # group sums 1.7, 0.2, 1.0, 0.7
    assert mask.tolist() == [[True, True, False, False, True, True, False, False]]


def test_every_router_in_the_table_runs():
    x, w = _inputs(5, 8, 8, torch.float32)
    bias = torch.zeros(8, device=DEVICE)
    extra = {"gpt-oss": (x, w, bias, 2), "DeepSeek-V3": (x, w, bias, 2, 2, 1)}
    for model, info in ROUTERS.items():
        logits, weights, ids = info.fn(*extra.get(model, (x, w, 2)))
        assert logits.shape == (5, 8) and weights.shape == ids.shape == (5, 2), model
    assert {info.weight_scales for info in ROUTERS.values()} == {"expert output", "expert input"}


def test_routers_flatten_batch_and_sequence():
    x, w = _inputs(6, 8, 4, torch.float32)
    flat = qwen3_moe_router(x, w, 2)
    batched = qwen3_moe_router(x.view(2, 3, 8), w, 2)
    for a, b in zip(flat, batched, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x, w, b: qwen3_moe_router(x, w.T, 2), ValueError, r"weight has shape \(16, 8\).*\[E, 16\]"),
        (lambda x, w, b: qwen3_moe_router(x, w.double(), 2), TypeError, "weight is torch.float64"),
        (lambda x, w, b: mixtral_router(x, w, 9), ValueError, "top_k=9 is larger than the number of experts"),
        (lambda x, w, b: llama4_router(x.long(), w, 1), TypeError, "hidden_states must be a floating-point"),
        (lambda x, w, b: gpt_oss_router(x, w, b[:5], 2), ValueError, "bias has 5 entries but weight has 8"),
        (lambda x, w, b: deepseek_v3_router(x, w, b, 2, 3, 1), ValueError, "n_group=3 does not divide the 8"),
        (lambda x, w, b: deepseek_v3_router(x, w, b, 2, 2, 3), ValueError, "topk_group=3 is larger than n_group=2"),
        (lambda x, w, b: deepseek_v3_router(x, w, b, 5, 2, 1), ValueError, "chosen groups hold only 4 experts"),
        (lambda x, w, b: deepseek_v3_router(x, w, b[:4], 2, 2, 1), ValueError, "e_score_correction_bias has 4"),
        (lambda x, w, b: deepseek_v3_router(x, w, b, 2, 0, 1), ValueError, "n_group must be a positive int"),
        (
            lambda x, w, b: dense_router_scores(torch.ones(2, 2), torch.zeros(2, 3, dtype=torch.long), 4),
            ValueError,
            "must match",
        ),
    ],
)
def test_router_bad_input(call, error, match):
    x, w = _inputs(4, 16, 8, torch.float32)
    with pytest.raises(error, match=match):
        call(x, w, torch.zeros(8, device=DEVICE))
