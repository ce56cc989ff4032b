"""The weight-gradient kernel against one PyTorch matmul per expert."""

import pytest
import torch

from moe_learn.device import DEVICE, ON_GPU
from moe_learn.kernels.backward import grouped_gemm_dw
from moe_learn.ops.grouped_gemm import torch_grouped_gemm_dw
from moe_learn.ops.routing import get_routing_indices

TOL = {torch.float32: 5e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(not ON_GPU, reason="Triton's interpreter computes bf16 wrong on the CPU"),
    ),
]


def _routing(num_tokens, top_k, num_experts, empty=()):
    """Random distinct top-k picks per token, never touching the experts in ``empty``."""
    allowed = torch.tensor([e for e in range(num_experts) if e not in empty])
    ids = torch.stack([allowed[torch.randperm(len(allowed))[:top_k]] for _ in range(num_tokens)])
    return ids.to(DEVICE)


def _rel(got, ref):
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("permute_x", [False, True])
@pytest.mark.parametrize("transpose", [True, False])
def test_dw_matches_per_expert_matmuls(dtype, permute_x, transpose):
    # Ragged: 13 tokens x top-2 over 5 experts, expert 1 empty; N, K not multiples of 16.
    T, k, E, N, K = 13, 2, 5, 20, 35
    ids = _routing(T, k, E, empty=(1,))
    counts, gather = get_routing_indices(ids, E)
    X = torch.randn(T if permute_x else T * k, K, device=DEVICE, dtype=dtype)
    dY = torch.randn(T * k, N, device=DEVICE, dtype=dtype)
    out = torch.full((E, N, K) if transpose else (E, K, N), float("nan"), device=DEVICE, dtype=dtype)
    got = grouped_gemm_dw(X, dY, counts, gather_indices=gather, topk=k, permute_x=permute_x, transpose=transpose,
                          out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = torch_grouped_gemm_dw(X.double(), dY.double(), counts, gather_indices=gather, topk=k,
                                permute_x=permute_x, transpose=transpose)
    assert _rel(got, ref) <= TOL[dtype]
    assert torch.count_nonzero(got[1]) == 0, "an expert with no rows must get an all-zero gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dw_small_tiles_and_int64_offsets(dtype):
    # Several row steps per expert and several N/K tiles, through the 64-bit offset path.
    T, k, E, N, K = 40, 1, 3, 33, 17
    ids = _routing(T, k, E)
    counts, gather = get_routing_indices(ids, E)
    X = torch.randn(T, K, device=DEVICE, dtype=dtype)
    dY = torch.randn(T, N, device=DEVICE, dtype=dtype)
    ref = torch_grouped_gemm_dw(X.double(), dY.double(), counts, gather_indices=gather, permute_x=True)
    for int64 in (False, True):
        got = grouped_gemm_dw(X, dY, counts, gather_indices=gather, permute_x=True, config=dict(BLOCK_M=16, BLOCK_N=16,
                              BLOCK_K=16), use_int64=int64)
        assert _rel(got, ref) <= TOL[dtype]


def test_dw_all_rows_to_one_expert_and_no_rows_at_all():
    counts = torch.tensor([0, 6, 0], device=DEVICE, dtype=torch.int32)
    X, dY = torch.randn(6, 8, device=DEVICE), torch.randn(6, 4, device=DEVICE)
    got = grouped_gemm_dw(X, dY, counts)
    torch.testing.assert_close(got[1], dY.T @ X, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got[0]) == 0 and torch.count_nonzero(got[2]) == 0
    empty = grouped_gemm_dw(X[:0], dY[:0], torch.zeros(3, device=DEVICE, dtype=torch.int32))
    assert empty.shape == (3, 4, 8) and torch.count_nonzero(empty) == 0


def test_dw_rejects_bad_arguments():
    counts = torch.tensor([2, 2], device=DEVICE)
    X, dY = torch.randn(4, 8, device=DEVICE), torch.randn(4, 3, device=DEVICE)
    with pytest.raises(TypeError, match="dY is"):
        grouped_gemm_dw(X, dY.half(), counts)
    with pytest.raises(ValueError, match="m_sizes sums to"):
        grouped_gemm_dw(X, dY, torch.tensor([2, 1], device=DEVICE))
    with pytest.raises(ValueError, match="needs gather_indices"):
        grouped_gemm_dw(X, dY, counts, permute_x=True)
    with pytest.raises(ValueError, match="X has 3 rows"):
        grouped_gemm_dw(X[:3], dY, counts)
    with pytest.raises(ValueError, match="out has shape"):
        grouped_gemm_dw(X, dY, counts, out=torch.empty(2, 8, 3, device=DEVICE))
