"""The Triton grouped GEMM against a float64 PyTorch reference, and its tile schedule."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_learn import get_routing_indices, torch_grouped_gemm
from moe_learn.course.checks._core import relative_error
from moe_learn.device import DEVICE, ON_GPU
from moe_learn.kernels import grouped_gemm, tile_schedule
from moe_learn.plots import tile_schedule_plot

BOUNDS = {torch.float32: 5e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Small tiles so tiny problems still have ragged row blocks, N edges and several K steps.
SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "NUM_PROGRAMS": 3, "GROUP_M": 2}


def _dtypes():
    # fp16 runs in the interpreter (numpy has float16); bf16 only compiled on a GPU.
    return [
        torch.float32,
        torch.float16,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(not ON_GPU, reason="bf16 kernels need a GPU (the interpreter upcasts)"),
        ),
    ]


def _reference(
    X, W, m_sizes, gather_indices=None, topk=1, permute_x=False, permute_y=False, topk_weights=None, transpose=True
):
    """float64 reference built from the PyTorch primitives."""
    X64, W64 = X.double().cpu(), W.double().cpu()
    if permute_x:
        X64 = X64[gather_indices.long().cpu() // topk]
    Y = torch_grouped_gemm(X64, W64, m_sizes.cpu(), transpose=transpose)
    if permute_y:
        gi = gather_indices.long().cpu()
        if topk_weights is not None:
            Y = Y * topk_weights.double().cpu().reshape(-1)[gi][:, None]
        out = torch.empty_like(Y)
        out[gi] = Y
        Y = out
    return Y


def _poisoned(M, N, dtype):
    return torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)


def _routing(T, E, topk, skew=None):
    """Random top-k expert ids ([T, topk], distinct per token), counts and gather indices."""
    scores = torch.rand(T, E)
    if skew is not None:
        scores[:, skew] += 10.0  # every token picks expert `skew` (and its next best ones)
    ids = scores.topk(topk, dim=1).indices
    counts, gather = get_routing_indices(ids, E)
    return ids, counts.to(DEVICE), gather.to(DEVICE)


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize(
    "m_list,K,N",
    [
        ([5, 0, 37, 1, 0, 18], 40, 72),  # ragged, empty experts, K/N not block multiples
        ([0, 0, 61, 0], 24, 33),  # all rows to one expert
        ([1], 16, 32),  # one row, exact K and N blocks
        ([0, 0, 0], 24, 40),  # M == 0
        ([17, 3], 70, 9),  # N smaller than one block
    ],
)
def test_plain_matches_reference(dtype, m_list, K, N):
    m_sizes = torch.tensor(m_list, dtype=torch.int32, device=DEVICE)
    M, E = sum(m_list), len(m_list)
    X = torch.randn(M, K, device=DEVICE, dtype=dtype)
    W = torch.randn(E, N, K, device=DEVICE, dtype=dtype)
    out = _poisoned(M, N, dtype)
    got = grouped_gemm(X, W, m_sizes, out=out, config=SMALL)
    assert got.data_ptr() == out.data_ptr() and got.shape == (M, N)
    if M:
        assert relative_error(got, _reference(X, W, m_sizes)) <= BOUNDS[dtype]


@pytest.mark.parametrize("dtype", _dtypes())
def test_untransposed_weights(dtype):
    """transpose=False: W is [E, K, N] (the layout the backward pass multiplies by)."""
    m_sizes = torch.tensor([9, 0, 22], device=DEVICE)
    X = torch.randn(31, 20, device=DEVICE, dtype=dtype)
    W = torch.randn(3, 20, 45, device=DEVICE, dtype=dtype)
    got = grouped_gemm(X, W, m_sizes, transpose=False, out=_poisoned(31, 45, dtype), config=SMALL)
    assert relative_error(got, _reference(X, W, m_sizes, transpose=False)) <= BOUNDS[dtype]


def test_default_config_and_strided_inputs():
    """Default launch parameters; X and W views with non-unit strides."""
    m_sizes = torch.tensor([7, 0, 30, 2], device=DEVICE)
    X = torch.randn(39, 50, device=DEVICE)[:, ::2]  # K=25, column stride 2
    W = torch.randn(4, 25, 19, device=DEVICE).transpose(1, 2)  # [E, N, K] view, not contiguous
    got = grouped_gemm(X, W, m_sizes)
    assert relative_error(got, _reference(X, W, m_sizes)) <= BOUNDS[torch.float32]


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("topk", [1, 3])
def test_permute_x_gathers_token_rows(dtype, topk):
    T, E, K, N = 11, 5, 36, 40
    _, counts, gather = _routing(T, E, topk)
    X = torch.randn(T, K, device=DEVICE, dtype=dtype)
    W = torch.randn(E, N, K, device=DEVICE, dtype=dtype)
    got = grouped_gemm(
        X, W, counts, gather_indices=gather, topk=topk, permute_x=True, out=_poisoned(T * topk, N, dtype), config=SMALL
    )
    ref = _reference(X, W, counts, gather, topk, permute_x=True)
    assert relative_error(got, ref) <= BOUNDS[dtype]


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("topk,with_weights", [(1, False), (2, True), (4, True)])
def test_permute_y_scatters_and_weights(dtype, topk, with_weights):
    T, E, K, N = 9, 6, 28, 50
    _, counts, gather = _routing(T, E, topk, skew=2)  # expert 2 gets every token
    M = T * topk
    X = torch.randn(M, K, device=DEVICE, dtype=dtype)
    W = torch.randn(E, N, K, device=DEVICE, dtype=dtype)
    weights = torch.rand(T, topk, device=DEVICE, dtype=dtype) if with_weights else None
    got = grouped_gemm(
        X,
        W,
        counts,
        gather_indices=gather,
        permute_y=True,
        topk_weights=weights,
        out=_poisoned(M, N, dtype),
        config=SMALL,
    )
    ref = _reference(X, W, counts, gather, permute_y=True, topk_weights=weights)
    assert relative_error(got, ref) <= BOUNDS[dtype]
    if with_weights:  # the combined MoE output is a plain sum over the k slots
        combined = got.view(T, topk, N).sum(1)
        assert relative_error(combined, ref.view(T, topk, N).sum(1)) <= BOUNDS[dtype] * 2


def test_permute_x_and_y_together():
    T, E, K, N, topk = 8, 4, 20, 24, 2
    _, counts, gather = _routing(T, E, topk)
    X = torch.randn(T, K, device=DEVICE)
    W = torch.randn(E, N, K, device=DEVICE)
    got = grouped_gemm(
        X,
        W,
        counts,
        gather_indices=gather,
        topk=topk,
        permute_x=True,
        permute_y=True,
        out=_poisoned(T * topk, N, torch.float32),
        config=SMALL,
    )
    ref = _reference(X, W, counts, gather, topk, permute_x=True, permute_y=True)
    assert relative_error(got, ref) <= BOUNDS[torch.float32]


def test_int64_offsets_path():
    """The USE_INT64 constexpr (chosen for > 2**31 elements), forced on a small input."""
    T, E, K, N, topk = 7, 3, 33, 20, 2
    _, counts, gather = _routing(T, E, topk)
    X = torch.randn(T, K, device=DEVICE)
    W = torch.randn(E, N, K, device=DEVICE)
    weights = torch.rand(T, topk, device=DEVICE)
    got = grouped_gemm(
        X,
        W,
        counts,
        gather_indices=gather,
        topk=topk,
        permute_x=True,
        permute_y=True,
        topk_weights=weights,
        out=_poisoned(T * topk, N, torch.float32),
        config=SMALL,
        use_int64=True,
    )
    ref = _reference(X, W, counts, gather, topk, permute_x=True, permute_y=True, topk_weights=weights)
    assert relative_error(got, ref) <= BOUNDS[torch.float32]


@pytest.mark.skipif(ON_GPU, reason="the bf16 upcast is the CPU interpreter's path")
def test_bf16_on_cpu_is_upcast_not_wrong():
    m_sizes = torch.tensor([6, 0, 10])
    X = torch.randn(16, 24).bfloat16()
    W = torch.randn(3, 40, 24).bfloat16()
    out = torch.full((16, 40), float("nan"), dtype=torch.bfloat16)
    got = grouped_gemm(X, W, m_sizes, out=out)
    assert got.dtype == torch.bfloat16
    assert relative_error(got, _reference(X, W, m_sizes)) <= BOUNDS[torch.bfloat16]


def test_int64_m_sizes_and_gather_accepted():
    _, counts, gather = _routing(6, 3, 2)
    X = torch.randn(6, 16, device=DEVICE)
    W = torch.randn(3, 16, 16, device=DEVICE)
    got = grouped_gemm(X, W, counts.long(), gather_indices=gather.long(), topk=2, permute_x=True)
    assert relative_error(got, _reference(X, W, counts, gather, 2, permute_x=True)) <= 5e-4


# ------------------------------------------------------------------ bad input


def _args():
    m_sizes = torch.tensor([2, 3], device=DEVICE)
    return torch.randn(5, 8, device=DEVICE), torch.randn(2, 4, 8, device=DEVICE), m_sizes


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"permute_x": True}, ValueError, "permute_x=True needs gather_indices"),
        ({"permute_y": True}, ValueError, "permute_y=True needs gather_indices"),
        ({"topk_weights": "w"}, ValueError, "only applied with permute_y"),
        ({"out": "bad_shape"}, ValueError, r"out has shape \(5, 3\), expected \(5, 4\)"),
        ({"out": "bad_dtype"}, TypeError, "out is torch.float16"),
        ({"gather_indices": "short", "permute_y": True}, ValueError, "gather_indices has 4 entries, expected 5"),
        ({"gather_indices": "float", "permute_y": True}, TypeError, "gather_indices must hold integer"),
        ({"gather_indices": "range", "permute_y": True}, ValueError, r"gather_indices holds 9, outside \[0, 5\)"),
        ({"config": {"BLOCK_K": 24}}, ValueError, "power of two"),
        ({"config": {"BLOCK": 64}}, ValueError, "unknown keys"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    X, W, m_sizes = _args()
    special = {
        "w": torch.rand(5, 1, device=DEVICE),
        "bad_shape": torch.empty(5, 3, device=DEVICE),
        "bad_dtype": torch.empty(5, 4, device=DEVICE, dtype=torch.float16),
        "short": torch.arange(4, device=DEVICE),
        "float": torch.arange(5, device=DEVICE).float(),
        "range": torch.tensor([0, 1, 2, 3, 9], device=DEVICE),
    }
    kwargs = {k: special.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(exc, match=match):
        grouped_gemm(X, W, m_sizes, validate=True, **kwargs)


def test_bad_shapes_and_dtypes():
    X, W, m_sizes = _args()
    with pytest.raises(ValueError, match="X has 8 columns but W"):
        grouped_gemm(X, W, m_sizes, transpose=False)
    with pytest.raises(TypeError, match="cast one so they match"):
        grouped_gemm(X.half(), W, m_sizes)
    with pytest.raises(TypeError, match="m_sizes must hold integer"):
        grouped_gemm(X, W, m_sizes.float())
    with pytest.raises(ValueError, match="m_sizes has 3 entries but W has 2 experts"):
        grouped_gemm(X, W, torch.tensor([1, 1, 3], device=DEVICE))
    with pytest.raises(ValueError, match="m_sizes sums to 4 but X has 5 rows"):
        grouped_gemm(X, W, torch.tensor([1, 3], device=DEVICE), validate=True)
    with pytest.raises(ValueError, match="X must be 2-D"):
        grouped_gemm(X[None], W, m_sizes)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        grouped_gemm(X.double(), W.double(), m_sizes)
    with pytest.raises(ValueError, match="topk_weights .* expected \\[T, topk\\]"):
        grouped_gemm(
            X,
            W,
            m_sizes,
            gather_indices=torch.arange(5, device=DEVICE),
            permute_y=True,
            topk_weights=torch.rand(2, 2, device=DEVICE),
        )


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU to put tensors on two devices")
def test_mixed_devices_refused():
    X, W, m_sizes = _args()
    with pytest.raises(ValueError, match="one device"):
        grouped_gemm(X, W, m_sizes.cpu())


# ------------------------------------------------------------------ the schedule


def test_schedule_covers_every_output_element_once():
    m_sizes = [5, 0, 37, 1, 0, 18]
    N, BM, BN = 72, 16, 32
    sched = tile_schedule(torch.tensor(m_sizes), N, BM, BN, num_programs=3, GROUP_M=2)
    cover = torch.zeros(sum(m_sizes), N, dtype=torch.int32)
    for r in sched:
        cover[r.row_start : r.row_end, r.col_start : r.col_end] += 1
        assert r.program == r.tile_id % 3
    assert bool((cover == 1).all())
    assert {r.expert for r in sched} == {0, 2, 3, 5}  # empty experts have no tiles
    assert len(sched) == sum(-(-m // BM) for m in m_sizes) * -(-N // BN)
    expert_rows = {e: (sum(m_sizes[:e]), sum(m_sizes[: e + 1])) for e in range(len(m_sizes))}
    for r in sched:
        lo, hi = expert_rows[r.expert]
        assert lo <= r.row_start < r.row_end <= hi  # a tile never straddles two experts


def test_kernel_follows_the_schedule():
    """Program 0 of a 3-program grid writes exactly the tiles tile_schedule gives program 0."""
    from moe_learn.kernels.grouped_gemm import _grouped_gemm_kernel

    m_sizes = torch.tensor([5, 0, 37, 1], device=DEVICE)
    M, N, K, P = 43, 40, 16, 3
    X = torch.ones(M, K, device=DEVICE)
    W = torch.ones(4, N, K, device=DEVICE)
    sched = tile_schedule(m_sizes, N, SMALL["BLOCK_M"], SMALL["BLOCK_N"], P, SMALL["GROUP_M"])
    # A grid of one program runs only pid 0, which still believes there are P programs.
    out = _poisoned(M, N, torch.float32)
    _grouped_gemm_kernel[(1,)](
        X,
        W,
        out,
        m_sizes,
        m_sizes,
        m_sizes,
        m_sizes,
        M,
        N,
        K,
        4,
        X.stride(0),
        X.stride(1),
        W.stride(0),
        W.stride(1),
        W.stride(2),
        out.stride(0),
        out.stride(1),
        0,
        TOP_K=1,
        PERMUTE_X=False,
        PERMUTE_Y=False,
        HAS_WEIGHTS=False,
        HAS_BIAS=False,
        USE_INT64=False,
        INPUT_PRECISION="ieee",
        BLOCK_M=SMALL["BLOCK_M"],
        BLOCK_N=SMALL["BLOCK_N"],
        BLOCK_K=SMALL["BLOCK_K"],
        GROUP_M=SMALL["GROUP_M"],
        NUM_PROGRAMS=P,
    )
    expected = torch.zeros(M, N, dtype=torch.bool)
    for r in sched:
        if r.program == 0:
            expected[r.row_start : r.row_end, r.col_start : r.col_end] = True
    written = ~torch.isnan(out.cpu())
    assert 0 < int(expected.sum()) < M * N
    assert torch.equal(written, expected)
    assert bool((out.cpu()[written] == K).all())
    full = grouped_gemm(X, W, m_sizes, config=SMALL | {"NUM_PROGRAMS": 1}, out=_poisoned(M, N, torch.float32))
    assert bool((full == K).all())  # one program walks every tile


def test_schedule_group_order_and_plot():
    sched = tile_schedule([40, 0, 9], 64, 16, 16, num_programs=4, GROUP_M=2)
    first = [(r.tile_m, r.tile_n) for r in sched if r.expert == 0][:4]
    assert first == [(0, 0), (1, 0), (0, 1), (1, 1)]  # two row blocks share each column block
    fig = tile_schedule_plot(sched, color_by="program")
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
    assert {t.get_text() for t in ax.texts} >= {"p0.0", "p1.0", "p0.1"}, "tiles carry program.step labels"
    import matplotlib.pyplot as plt

    plt.close(fig)
    with pytest.raises(ValueError, match="BLOCK_M must be a positive int"):
        tile_schedule([1, 2], 8, 0, 16, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_replay_with_new_routing():
    """No host sync in the launch: capture once, then replay with different m_sizes and gather indices."""
    T, E, K, N, topk, dtype = 64, 8, 64, 96, 2, torch.bfloat16
    X = torch.randn(T, K, device=DEVICE, dtype=dtype)
    W = torch.randn(E, N, K, device=DEVICE, dtype=dtype)
    weights = torch.rand(T, topk, device=DEVICE, dtype=dtype)
    counts = torch.zeros(E, dtype=torch.int32, device=DEVICE)
    gather = torch.zeros(T * topk, dtype=torch.int32, device=DEVICE)
    out = torch.empty(T * topk, N, device=DEVICE, dtype=dtype)

    def route(skew):
        _, c, g = _routing(T, E, topk, skew=skew)
        counts.copy_(c)
        gather.copy_(g)

    def launch():
        grouped_gemm(X, W, counts, gather_indices=gather, topk=topk, permute_x=True, permute_y=True,
                     topk_weights=weights, out=out)  # fmt: skip

    route(None)
    launch()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    for skew in (3, None, 0):
        route(skew)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(X, W, counts, gather, topk, permute_x=True, permute_y=True, topk_weights=weights)
        assert relative_error(out, ref) <= BOUNDS[dtype]


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(
    m_list=st.lists(st.one_of(st.just(0), st.integers(1, 40)), min_size=1, max_size=6),
    K=st.integers(1, 50),
    N=st.integers(1, 70),
    topk=st.integers(1, 3),
    programs=st.integers(1, 5),
    group_m=st.integers(1, 3),
)
def test_property_any_sizes(m_list, K, N, topk, programs, group_m):
    """Random ragged sizes, any K and N, any program count: plain and fully fused both match."""
    E, M = len(m_list), sum(m_list)
    cfg = SMALL | {"NUM_PROGRAMS": programs, "GROUP_M": group_m}
    m_sizes = torch.tensor(m_list, device=DEVICE)
    X = torch.randn(M, K, device=DEVICE)
    W = torch.randn(E, N, K, device=DEVICE)
    got = grouped_gemm(X, W, m_sizes, out=_poisoned(M, N, torch.float32), config=cfg)
    if M:
        assert relative_error(got, _reference(X, W, m_sizes)) <= 5e-4
    if M % topk == 0 and M:
        T = M // topk
        gather = torch.randperm(M, device=DEVICE)  # any permutation of the (token, slot) rows
        weights = torch.rand(T, topk, device=DEVICE)
        Xt = X[:T]
        got = grouped_gemm(Xt, W, m_sizes, gather_indices=gather, topk=topk, permute_x=True, permute_y=True,
                           topk_weights=weights, out=_poisoned(M, N, torch.float32), config=cfg)  # fmt: skip
        ref = _reference(Xt, W, m_sizes, gather, topk, permute_x=True, permute_y=True, topk_weights=weights)
        assert relative_error(got, ref) <= 5e-4


def test_int64_chosen_from_offsets_not_sizes():
    """A view whose strides reach past 2**31 elements needs the int64 path even if it is small."""
    from moe_learn.kernels.grouped_gemm import INT32_MAX, _max_offset

    assert _max_offset(torch.randn(4, 8)) == 3 * 8 + 7
    wide = torch.empty_strided((3, 2), (2**30, 1), device="meta")  # 6 elements, offsets up to 2**31 + 1
    assert _max_offset(wide) > INT32_MAX
    assert _max_offset(torch.empty(0, 5)) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs a GPU with 40 GB for a tensor of more than 2**31 elements")
@pytest.mark.parametrize("kernel", ["portable", "hopper"])
def test_more_than_2_31_elements(kernel):
    """X of 2**31 + 2**21 elements: offsets past int32, on the rows at the end and the gathered ones."""
    K, E, N = 256, 4, 64
    M = (2**31 + 2**21) // K
    counts = torch.tensor([M - 3000, 1000, 0, 2000], device="cuda", dtype=torch.int32)
    X = torch.empty(M, K, device="cuda", dtype=torch.bfloat16).normal_()
    W = (torch.randn(E, N, K, device="cuda") / K**0.5).to(torch.bfloat16)
    out = grouped_gemm(X, W, counts, kernel=kernel, config={"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64} if
                       kernel == "portable" else None)
    for rows, e in ((slice(0, 512), 0), (slice(M - 3000, M - 2000), 1), (slice(M - 2000, M), 3)):
        ref = X[rows].float() @ W[e].float().T
        assert relative_error(out[rows], ref) < 1e-2, (kernel, rows)
    # gathered: expert-order row i reads token X[gather[i]], reversed, so the last tokens (past 2**31) come first
    gather = torch.arange(M - 1, -1, -1, device="cuda", dtype=torch.int32)
    out = grouped_gemm(X, W, counts, gather_indices=gather, permute_x=True, permute_y=True, kernel=kernel,
                       config={"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64} if kernel == "portable" else None)
    # row i is expert e's product of token gather[i], stored back at gather[i]: check the first and last tokens
    for tokens, e in ((slice(M - 512, M), 0), (slice(0, 2000), 3)):
        ref = X[tokens].float() @ W[e].float().T
        assert relative_error(out[tokens], ref) < 1e-2, (kernel, "gathered", tokens)
    # the weight gradient over the same rows: dW_e = dY_e.T @ X_e, offsets past int32 for the last experts
    from moe_learn import grouped_gemm_dw

    dY = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    dW = grouped_gemm_dw(X, dY, counts)
    for rows, e in ((slice(M - 3000, M - 2000), 1), (slice(M - 2000, M), 3)):
        ref = dY[rows].float().T @ X[rows].float()
        assert relative_error(dW[e], ref) < 1e-2, ("dW", e)
    assert not dW[2].any()
