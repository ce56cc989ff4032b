"""The fused MoE forward equals the PyTorch one (float64 reference)."""

import pytest
import torch

from moe_learn import calculate_topk, fused_moe_experts, moe_experts_torch
from moe_learn.course.checks._core import relative_error
from moe_learn.device import DEVICE, ON_GPU

BOUNDS = {torch.float32: 5e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "NUM_PROGRAMS": 2}


def _case(T, H, I, E, k, dtype, one_expert=False):
    x = torch.randn(T, H)
    gate_up = torch.randn(E, 2 * I, H) / H**0.5
    down = torch.randn(E, H, I) / I**0.5
    logits = torch.randn(T, E)
    if one_expert:
        logits[:, 1] += 20.0
    weights, ids = calculate_topk(logits, k, use_sigmoid=False, renormalize=k > 1)
    to = {"device": DEVICE}
    return (
        x.to(dtype=dtype, **to),
        ids.to(**to),
        weights.to(dtype=dtype, **to),
        gate_up.to(dtype=dtype, **to),
        down.to(dtype=dtype, **to),
    )


def _reference(x, ids, w, gu, dp):
    return moe_experts_torch(x.double().cpu(), ids.cpu(), w.double().cpu(), gu.double().cpu(), dp.double().cpu())


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float16,
        pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not ON_GPU, reason="bf16 kernels need a GPU")),
    ],
)
@pytest.mark.parametrize(
    "T,H,I,E,k,one_expert", [(13, 40, 24, 6, 2, False), (5, 24, 20, 4, 1, False), (9, 32, 16, 5, 3, True)]
)
def test_fused_matches_pytorch(dtype, T, H, I, E, k, one_expert):
    args = _case(T, H, I, E, k, dtype, one_expert)
    got = fused_moe_experts(*args, config=SMALL)
    assert got.shape == (T, H) and got.dtype == dtype
    assert relative_error(got, _reference(*args)) <= BOUNDS[dtype] * 2  # two GEMMs and a SwiGLU


def test_default_config_and_one_token():
    args = _case(1, 24, 16, 3, 2, torch.float32)
    assert relative_error(fused_moe_experts(*args), _reference(*args)) <= BOUNDS[torch.float32]


def test_bad_inputs():
    x, ids, w, gu, dp = _case(4, 16, 8, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="must both be \\[T, k\\]"):
        fused_moe_experts(x, ids[:, :1], w, gu, dp)
    with pytest.raises(ValueError, match="\\[E, 2I, H\\]"):
        fused_moe_experts(x, ids, w, gu[:, :, :8], dp)
    with pytest.raises(ValueError, match="disagree"):
        fused_moe_experts(x, ids, w, gu, dp[:, :, :4])
    with pytest.raises(TypeError, match="topk_ids must hold integer"):
        fused_moe_experts(x, ids.float(), w, gu, dp)
    if not ON_GPU:
        with pytest.raises(ValueError, match="below num_experts=3"):
            fused_moe_experts(x, ids + 2, w, gu, dp)


@pytest.mark.skipif(not ON_GPU, reason="on the CPU out-of-range ids raise (test_bad_inputs)")
def test_out_of_range_ids_contribute_nothing_on_the_gpu():
    """On a GPU the ids' range is not read back to the host: ids outside [0, E) are dropped."""
    x, ids, w, gu, dp = _case(6, 16, 8, 3, 2, torch.float32)
    shifted = ids + 2  # 0 -> 2 stays; 1 -> 3 and 2 -> 4 fall outside [0, 3)
    kept = shifted < 3
    got = fused_moe_experts(x, shifted, w, gu, dp)
    want = _reference(x, torch.where(kept, shifted, 0), torch.where(kept, w, 0), gu, dp)
    assert relative_error(got, want) <= BOUNDS[torch.float32] * 2


def test_fused_moe_forward_equals_torch_block():
    """Router + fused routing + fused experts == the PyTorch MoE MLP of chapter 04."""
    from moe_learn.layers.experts import fused_moe_forward
    from moe_learn.ops.moe import moe_forward_torch

    H, I, E, k = 32, 24, 6, 2
    x = torch.randn(3, 7, H, device=DEVICE)
    router = torch.randn(E, H, device=DEVICE)
    gate_up = torch.randn(E, 2 * I, H, device=DEVICE) / H**0.5
    down = torch.randn(E, H, I, device=DEVICE) / I**0.5
    got = fused_moe_forward(x, router, gate_up, down, k, renormalize=True)
    ref = moe_forward_torch(x.double(), router.double(), gate_up.double(), down.double(), k, True)
    assert got.shape == x.shape
    assert relative_error(got, ref) <= 5e-4
    with pytest.raises(ValueError, match="router_weight"):
        fused_moe_forward(x, router[:, :5], gate_up, down, k)
