"""The weight-gradient kernels (portable and Hopper) against one PyTorch matmul per expert."""

import pytest
import torch

from moe_learn.device import DEVICE, ON_GPU
from moe_learn.kernels import autotune
from moe_learn.kernels import backward as bw
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


@pytest.mark.parametrize("kernel", ["portable", "hopper"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("permute_x", [False, True])
@pytest.mark.parametrize("transpose", [True, False])
def test_dw_matches_per_expert_matmuls(dtype, permute_x, transpose, kernel):
    # Ragged: 13 tokens x top-2 over 5 experts, expert 1 empty; N, K not multiples of 16
    # (the Hopper kernel's default tiles; N * 2 bytes not a multiple of 16: dY without TMA).
    T, k, E, N, K = 13, 2, 5, 20, 35
    ids = _routing(T, k, E, empty=(1,))
    counts, gather = get_routing_indices(ids, E)
    X = torch.randn(T if permute_x else T * k, K, device=DEVICE, dtype=dtype)
    dY = torch.randn(T * k, N, device=DEVICE, dtype=dtype)
    out = torch.full((E, N, K) if transpose else (E, K, N), float("nan"), device=DEVICE, dtype=dtype)
    got = grouped_gemm_dw(X, dY, counts, gather_indices=gather, topk=k, permute_x=permute_x, transpose=transpose,
                          out=out, kernel=kernel)
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
    with pytest.raises(ValueError, match="m_sizes sums to"):  # a value check: asked for (default: CPU only)
        grouped_gemm_dw(X, dY, torch.tensor([2, 1], device=DEVICE), validate=True)
    with pytest.raises(ValueError, match="needs gather_indices"):
        grouped_gemm_dw(X, dY, counts, permute_x=True)
    with pytest.raises(ValueError, match="X has 3 rows"):
        grouped_gemm_dw(X[:3], dY, counts)
    with pytest.raises(ValueError, match="out has shape"):
        grouped_gemm_dw(X, dY, counts, out=torch.empty(2, 8, 3, device=DEVICE))


# Tiny Hopper tiles: several whole 16-row steps, a ragged tail, several N and K tiles.
HOPPER_TINY = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2, PROGRAMS_PER_SM=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("permute_x, pre_gather", [(False, False), (True, False), (True, True)])
def test_dw_hopper_steps_tails_and_tma_paths(dtype, permute_x, pre_gather, monkeypatch):
    """Sizes with whole steps only (32), a tail only (5), both (37), none (0); N and K so that
    dY and X rows are 16-byte aligned (TMA) in one run and not in the other. Gathered X either
    copied into expert order first (``gather_rows``) or gathered in the kernel."""
    monkeypatch.setattr(bw, "PRE_GATHER_MAX_BYTES", 1 << 40 if pre_gather else 0)
    counts = torch.tensor([32, 5, 0, 37, 16], dtype=torch.int32, device=DEVICE)
    M, topk = int(counts.sum()), 2 if permute_x else 1
    gather = torch.randperm(M, device=DEVICE)
    for N, K in ((40, 48), (36, 20)):
        X = torch.randn(M // topk if permute_x else M, K, device=DEVICE, dtype=dtype)
        dY = torch.randn(M, N, device=DEVICE, dtype=dtype)
        ref = torch_grouped_gemm_dw(X.double(), dY.double(), counts, gather_indices=gather, topk=topk,
                                    permute_x=permute_x)
        out = torch.full((5, N, K), float("nan"), device=DEVICE, dtype=dtype)
        grouped_gemm_dw(X, dY, counts, gather_indices=gather, topk=topk, permute_x=permute_x, out=out,
                        kernel="hopper", config=HOPPER_TINY)
        assert _rel(out, ref) <= TOL[dtype], (N, K)
        assert torch.count_nonzero(out[2]) == 0


def test_gather_rows_copies_in_expert_order_and_zeroes_dropped_rows():
    T, k, K = 7, 3, 300  # K over one 256-column block, not a multiple of it
    X = torch.randn(T, K, device=DEVICE)
    gather = torch.randperm(T * k, device=DEVICE).to(torch.int32)
    torch.testing.assert_close(bw.gather_rows(X, gather, k), X[gather.long() // k], rtol=0, atol=0)
    bad = gather.clone()
    bad[0], bad[5] = -1, T * k  # outside [0, M): the dW kernel drops such a row, so the copy is zero
    got = bw.gather_rows(X[:, ::1], bad, k)
    assert (got[0] == 0).all() and (got[5] == 0).all()
    torch.testing.assert_close(got[1:5], X[gather[1:5].long() // k], rtol=0, atol=0)
    strided = torch.randn(T, 2 * K, device=DEVICE)[:, :K]  # a row stride other than K
    torch.testing.assert_close(bw.gather_rows(strided, gather, k), strided[gather.long() // k], rtol=0, atol=0)
    assert bw.gather_rows(X, gather[:0], k).shape == (0, K)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on inf
@pytest.mark.parametrize("kernel", ["portable", "hopper"])
def test_dw_non_finite_rows_stay_in_their_expert(kernel):
    """inf in expert 2's rows of dY and X makes only expert 2's gradient non-finite.

    Expert 1 ends 5 rows into a 16-row step: a step that read past its end (a TMA box or an
    unmasked load) would multiply expert 2's inf by expert 1's values, or by zero (NaN).
    """
    counts = torch.tensor([16, 21, 9], dtype=torch.int32, device=DEVICE)
    X = torch.randn(46, 32, device=DEVICE)
    dY = torch.randn(46, 48, device=DEVICE)
    X[37, 3] = float("inf")  # expert 2's first row
    dY[38, 5] = float("-inf")
    config = HOPPER_TINY if kernel == "hopper" else dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    got = grouped_gemm_dw(X, dY, counts, kernel=kernel, config=config)
    ref = torch_grouped_gemm_dw(X.double(), dY.double(), counts)
    assert torch.isfinite(got[:2]).all(), "experts 0 and 1 saw no inf"
    assert torch.equal(torch.isfinite(got[2]), torch.isfinite(ref[2]))
    torch.testing.assert_close(got[:2].double(), ref[:2], rtol=5e-4, atol=5e-4)


def test_dw_hopper_candidates_and_tuning_key(monkeypatch):
    """Each bucket's candidates run (default tiles are large: one tile here), and the tuner's
    key separates what changes the kernel."""
    counts = torch.tensor([30, 0, 50], dtype=torch.int32, device=DEVICE)
    # the candidates are sized for bf16/fp16 (what the kernel serves on a GPU): fp32 tiles of that
    # size would not fit in shared memory
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    X, dY = torch.randn(80, 24, device=DEVICE, dtype=dtype), torch.randn(80, 40, device=DEVICE, dtype=dtype)
    ref = torch_grouped_gemm_dw(X.double(), dY.double(), counts)
    configs = {tuple(sorted(c.items())) for _, group in bw.DW_CANDIDATES_BY_ROWS_PER_EXPERT for c in group}
    for config in sorted(configs):
        got = grouped_gemm_dw(X, dY, counts, kernel="hopper", config=dict(config))
        assert _rel(got, ref) <= TOL[dtype], config
    assert bw.dw_candidates(64 * 128, 128)[0]["PROGRAMS_PER_SM"] == 2
    assert bw.dw_candidates(4096 * 8, 8)[0]["BLOCK_K"] == 256
    key = lambda rows, permute_x=True: bw.dw_tuning_key(rows, 1536, 2048, 128, torch.bfloat16, permute_x, True,  # noqa: E731
                                                      False, True)
    assert key(500 * 128) == key(400 * 128) != key(600 * 128) and key(512) != key(512, permute_x=False)
    # kernel="auto": the old kernel on the CPU, and on a GPU when the switch says so
    monkeypatch.setattr(autotune, "TUNED", {})
    assert bw.choose_dw_kernel("auto", None, X) == ("hopper" if ON_GPU and X.dtype != torch.float32 else "portable")
    monkeypatch.setattr(bw, "DW_KERNEL", "portable")
    assert bw.choose_dw_kernel("auto", None, X.half()) == "portable"
    with pytest.raises(ValueError, match="unknown keys"):
        grouped_gemm_dw(X, dY, counts, kernel="hopper", config={"GROUP_M": 8})
    with pytest.raises(ValueError, match="kernel must be one of"):
        grouped_gemm_dw(X, dY, counts, kernel="fast")
