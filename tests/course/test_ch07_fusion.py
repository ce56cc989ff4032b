"""Chapter 07 checks accept the right answers and reject plausible wrong ones with pointed messages."""

import pytest
import torch

from moe_learn import get_routing_indices, grouped_gemm, swiglu
from moe_learn.course.checks._core import CheckFailed
from moe_learn.course.checks.ch07_fusion import check_fused_kernel, check_fused_moe
from tests.course.planted import WithBug, grouped_gemm_kernel


def test_fused_kernel_reference_passes(capsys):
    check_fused_kernel(grouped_gemm_kernel)
    assert "[PASS] 07.1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bug,match",
    [
        ("BUG_NO_K_MASK", r"(?s)expert 0 .* hold NaN read from outside X or W .*no flags.*mask the last K step"),
        ("BUG_NO_TOPK_DIV", r"(?s)multiplied token row gather_indices\[i\] instead of .*// TOP_K.*TOP_K=2"),
        ("BUG_NO_WEIGHTS", r"(?s)lacks? the routing weight.*multiply the accumulator by topk_weights"),
        ("BUG_WEIGHT_BY_ROW", r"(?s)scaled by another \(token, slot\)'s weight.*index it with gather_indices"),
        ("BUG_UNPERMUTED_STORE", r"(?s)results in expert order.*store row i of the tile at out\[gather_indices\[i\]\]"),
        (
            "BUG_SCATTER_TO_TOKEN",
            r"(?s)row \d+ \(token \d+, slot \d\) (was never written|holds the result that belongs in row)"
            r".*out\[gather_indices\[i\]\]",
        ),
    ],
)
def test_fused_kernel_rejects(bug, match):
    with pytest.raises(CheckFailed, match=match):
        check_fused_kernel(WithBug(grouped_gemm_kernel, **{bug: True}))


# ------------------------------------------------------------------ 07.2


def _fused(x, ids, w, gu, dp, *, weights=True, reduce="sum", swap=False):
    T, H = x.shape
    k, E = ids.shape[1], gu.shape[0]
    counts, gather = get_routing_indices(ids, E)
    h = grouped_gemm(x, gu, counts, gather_indices=gather, topk=k, permute_x=True)
    if swap:
        h = torch.cat(h.chunk(2, dim=-1)[::-1], dim=-1)
    h = swiglu(h)
    y = grouped_gemm(h, dp, counts, gather_indices=gather, permute_y=True, topk_weights=w if weights else None)
    y = y.view(T, k, H)
    return y.sum(1) if reduce == "sum" else y.mean(1)


def test_fused_moe_reference_passes(capsys):
    check_fused_moe(_fused)
    assert "[PASS] 07.2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weights": False}, r"(?s)plain sum over the k experts: the routing weights are missing"),
        ({"reduce": "mean"}, r"(?s)average over the k slots.*not \.mean"),
        ({"swap": True}, r"(?s)gate and up are swapped"),
    ],
)
def test_fused_moe_rejects(kwargs, match):
    with pytest.raises(CheckFailed, match=match):
        check_fused_moe(lambda *a: _fused(*a, **kwargs))


def test_fused_moe_wrong_shape_and_stub():
    with pytest.raises(CheckFailed, match=r"shape \(18, 32\), expected \(9, 32\)"):
        check_fused_moe(lambda x, ids, w, gu, dp: _fused(x, ids, w, gu, dp).repeat(2, 1))

    def stub(*args):
        raise NotImplementedError("exercise 07.2")

    with pytest.raises(NotImplementedError):
        check_fused_moe(stub)
