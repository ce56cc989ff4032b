"""The Hopper grouped GEMM (TMA loads, tile map in registers) against a float64 reference.

Under the CPU interpreter the tensor descriptors are emulated, so the same kernel runs in
CI (``kernel="hopper"``); on an H100 ``kernel="auto"`` picks it for bf16/fp16.
"""

import json

import pytest
import torch

from moe_learn import get_routing_indices, grouped_gemm, permute, torch_grouped_gemm, unpermute
from moe_learn.course.checks._core import relative_error
from moe_learn.device import DEVICE, ON_GPU
from moe_learn.kernels import autotune
from moe_learn.kernels import grouped_gemm_hopper as hopper
from moe_learn.kernels.grouped_gemm_hopper import CANDIDATES_BY_ROWS_PER_EXPERT, pick_config

BOUNDS = {torch.float32: 5e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# fp32 on a GPU would run its dots in tf32 (the portable kernel serves fp32 there)
DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float32, torch.float16]
# tiny tiles so tiny problems have ragged row blocks, N edges and several K steps
TINY = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2, "NUM_PROGRAMS": 3}


def _routing(T, E, topk, empty=(), skew=None):
    scores = torch.rand(T, E)
    for e in empty:
        scores[:, e] = -1.0  # nobody picks it
    if skew is not None:
        scores[:, skew] += 10.0
    ids = scores.topk(topk, dim=1).indices
    counts, gather = get_routing_indices(ids, E)
    return counts.to(DEVICE), gather.to(DEVICE)


def _weights(E, N, K, dtype, transpose):
    """[E, N, K] weights (the reference's layout) and the tensor the kernel gets: itself, or [E, K, N]."""
    W = (torch.randn(E, N, K, device=DEVICE) / K**0.5).to(dtype)
    return W, (W if transpose else W.transpose(1, 2).contiguous())


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,topk,N,K,empty,skew", [
    # ragged, two empty experts, N and K not multiples of a block ([E, K, N]: masked W loads)
    (37, 6, 2, 40, 72, (1, 4), None),
    (1, 5, 1, 24, 40, (), None),  # one token
    (29, 4, 3, 56, 48, (), 2),  # every token picks expert 2 ([E, K, N]: W through TMA, K % 16 == 0)
    (64, 8, 1, 32, 64, (0, 7), None),  # sizes that are multiples of nothing in particular
])
def test_all_fusions_match_float64(dtype, T, E, topk, N, K, empty, skew, transpose):
    """transpose=False reads W as [E, K, N], as the backward's dX does; the same fusions apply."""
    counts, gather = _routing(T, E, topk, empty, skew)
    X = torch.randn(T, K, device=DEVICE).to(dtype)
    W1, W1_run = _weights(E, N, K, dtype, transpose)
    W2, W2_run = _weights(E, K, N, dtype, transpose)
    weights = torch.rand(T, topk, device=DEVICE).to(dtype)
    M = T * topk
    gemm = lambda *a, **kw: grouped_gemm(*a, kernel="hopper", config=TINY, transpose=transpose, **kw)  # noqa: E731

    # plain: X already in expert order; m_sizes as int64 (torch's default) must work too
    Xp = permute(X, gather, topk)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)  # unwritten rows stay NaN
    gemm(Xp, W1_run, counts.long(), out=out)
    ref = torch_grouped_gemm(Xp.double(), W1.double(), counts)
    assert relative_error(out, ref) <= BOUNDS[dtype]

    # gather in the prologue
    out1 = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
    gemm(X, W1_run, counts, gather_indices=gather, topk=topk, permute_x=True, out=out1)
    assert relative_error(out1, ref) <= BOUNDS[dtype]

    # scatter + routing weights in the epilogue
    out2 = torch.full((M, K), float("nan"), dtype=dtype, device=DEVICE)
    gemm(out1, W2_run, counts, gather_indices=gather, topk=topk, permute_y=True, topk_weights=weights, out=out2)
    ref2 = unpermute(torch_grouped_gemm(ref, W2.double(), counts), gather) * weights.double().reshape(-1, 1)
    assert relative_error(out2, ref2) <= BOUNDS[dtype]

    # the routing weights as every other column of a NaN-filled wider tensor: flattened, a strided view
    wide = torch.full((T, 2 * topk), float("nan"), dtype=dtype, device=DEVICE)
    wide[:, ::2] = weights
    out3 = torch.full((M, K), float("nan"), dtype=dtype, device=DEVICE)
    gemm(out1, W2_run, counts, gather_indices=gather, topk=topk, permute_y=True, topk_weights=wide[:, ::2], out=out3)
    assert relative_error(out3, ref2) <= BOUNDS[dtype]


def test_default_configs_run():
    """Every tuning candidate (the H100's big tiles, the decode buckets' small ones) on a small ragged problem.

    Candidates alternate between the two W layouts; K = 136 is a multiple of none of the
    BLOCK_K values, so the [E, K, N] ones take the masked-load path for W.
    """
    T, E, topk, N, K = 50, 4, 2, 72, 136
    counts, gather = _routing(T, E, topk, empty=(3,))
    dtype = DTYPES[0]
    X = torch.randn(T * topk, K, device=DEVICE).to(dtype)
    W, W_kn = _weights(E, N, K, dtype, False)
    ref = torch_grouped_gemm(X.double(), W.double(), counts)
    configs = sorted({tuple(sorted(c.items())) for _, group in CANDIDATES_BY_ROWS_PER_EXPERT for c in group})
    for i, config in enumerate(configs):
        transpose = i % 2 == 0
        out = torch.full((T * topk, N), float("nan"), dtype=dtype, device=DEVICE)
        grouped_gemm(X, W if transpose else W_kn, counts, out=out, kernel="hopper", transpose=transpose,
                     config={**dict(config), "NUM_PROGRAMS": 2})
        assert relative_error(out, ref) <= BOUNDS[dtype], (config, transpose)


@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_sizes_every_tile_written(tokens):
    """A token's k experts get a row each, most experts none; the small-M configs, and as many
    programs as the host's tile bound allows (too small a bound would leave rows NaN)."""
    E, topk, N, K = 16, 4, 48, 64
    counts, gather = _routing(tokens, E, topk)
    dtype = DTYPES[0]
    X = torch.randn(tokens, K, device=DEVICE).to(dtype)
    W, W_kn = _weights(E, N, K, dtype, False)
    ref = torch_grouped_gemm(permute(X, gather, topk).double(), W.double(), counts)
    for config, transpose in ((hopper.SMALL_M_BUCKETS[0][1][0], True), (hopper.SMALL_M_BUCKETS[1][1][0], False)):
        out = torch.full((tokens * topk, N), float("nan"), dtype=dtype, device=DEVICE)
        grouped_gemm(X, W if transpose else W_kn, counts, gather_indices=gather, topk=topk, permute_x=True, out=out,
                     kernel="hopper", transpose=transpose, config={**config, "BLOCK_N": 16, "NUM_PROGRAMS": 10**6})
        assert relative_error(out, ref) <= BOUNDS[dtype], (config, transpose)


@pytest.mark.parametrize("call", ["gather", "scatter+weights+bias", "trusted gather", "swiglu"])
def test_repeated_calls_with_new_inputs_match_float64(call, monkeypatch):
    """A decode step repeats its GEMMs with new tensors of the same layouts: on a GPU, once the bucket is tuned,
    from the call's launch plan (which gives the launcher the tensors' addresses). Each call's output against
    float64 (the gather call's out= filled with NaN first); on a GPU the plan is asserted to have run (on the CPU
    there is none)."""
    from moe_learn.kernels.grouped_gemm import grouped_gemm_swiglu, grouped_gemm_trusted

    planned = []
    plan_call = hopper.LaunchPlan.__call__
    monkeypatch.setattr(hopper.LaunchPlan, "__call__", lambda self, *args: planned.append(1) or plan_call(self, *args))

    E, topk, N, K, tokens = 8, 2, 48, 64, 3
    dtype = DTYPES[0]
    W, _ = _weights(E, 2 * N if call == "swiglu" else N, K, dtype, True)
    bias = torch.randn(E, N, device=DEVICE).to(dtype)
    for step in range(3):
        counts, gather = _routing(tokens, E, topk)  # new routing and values, same shapes
        X = torch.randn(tokens, K, device=DEVICE).to(dtype)
        weights = torch.rand(tokens, topk, device=DEVICE).to(dtype)
        Xs = permute(X, gather, topk)
        ref = torch_grouped_gemm(Xs.double(), W.double(), counts)
        if call == "gather":
            out = torch.full((tokens * topk, N), float("nan"), dtype=dtype, device=DEVICE)
            got = grouped_gemm(X, W, counts, gather_indices=gather, topk=topk, permute_x=True, out=out,
                               kernel="hopper", validate=False)
        elif call == "trusted gather":
            got = grouped_gemm_trusted(X, W, counts, gather, topk=topk, permute_x=True, kernel="hopper")
        elif call == "swiglu":
            got = grouped_gemm_swiglu(X, W, counts, gather, topk=topk, permute_x=True, kernel="hopper")
            gate, up = ref.chunk(2, dim=1)
            ref = torch.nn.functional.silu(gate) * up
        else:
            got = grouped_gemm(Xs, W, counts, gather_indices=gather, permute_y=True, topk_weights=weights, bias=bias,
                               kernel="hopper", validate=False)
            experts = torch.repeat_interleave(torch.arange(E, device=DEVICE), counts.long())
            ref = unpermute(ref + bias.double()[experts], gather) * weights.double().reshape(-1, 1)
        assert relative_error(got, ref) <= BOUNDS[dtype], (call, step)
    if ON_GPU:  # (the first call may tune its bucket, the second keeps a plan, the third runs from it)
        assert planned, "the repeats ran from a launch plan"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on inf
@pytest.mark.parametrize("transpose", [True, False])
def test_non_finite_weights_stay_in_their_expert(transpose):
    """A NaN in expert 1's weights makes only expert 1's outputs NaN: no tile reads past its expert.

    K = 40 with BLOCK_K = 16: the last K step of expert 0 ends 8 rows short of the [E*K, N]
    view's next expert; reading those rows (0 * NaN) would leak NaN into expert 0.
    """
    E, N, K = 3, 24, 40
    counts = torch.tensor([5, 6, 4], dtype=torch.int32, device=DEVICE)
    dtype = DTYPES[0]
    X = torch.randn(15, K, device=DEVICE).to(dtype)
    W, W_run = _weights(E, N, K, dtype, transpose)
    W[1, 3, :2] = float("nan")
    W_run = W if transpose else W.transpose(1, 2).contiguous()
    out = grouped_gemm(X, W_run, counts, kernel="hopper", transpose=transpose, config=TINY)
    ref = torch_grouped_gemm(X.double(), W.double(), counts)
    assert torch.equal(out.isnan(), ref.isnan()), "NaN exactly in expert 1's rows, column 3"
    torch.testing.assert_close(out.double(), ref, rtol=BOUNDS[dtype], atol=BOUNDS[dtype], equal_nan=True)


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("K", [48, 40])  # [E, K, 2I] with K = 40: masked W loads (BLOCK_K = 16)
# I = 2: in [E, K, 2I] the up half starts 2 elements along a row, not on 16 bytes (masked W loads there too)
@pytest.mark.parametrize("I", [40, 2])
def test_swiglu_in_the_epilogue(transpose, K, I):  # noqa: E741
    """GEMM1 with the SwiGLU fused: silu(x @ W_gate.T) * (x @ W_up.T) for every row, gathered,
    empty experts, an I that is not a multiple of BLOCK_N; the same through the unfused fallback."""
    from moe_learn.kernels.grouped_gemm import grouped_gemm_swiglu
    from moe_learn.ops.moe import swiglu

    T, E, topk = 21, 5, 2
    counts, gather = _routing(T, E, topk, empty=(3,))
    dtype = DTYPES[0]
    X = torch.randn(T, K, device=DEVICE).to(dtype)
    W, W_run = _weights(E, 2 * I, K, dtype, transpose)
    ref = swiglu(torch_grouped_gemm(permute(X, gather, topk).double(), W.double(), counts))
    out = torch.full((T * topk, I), float("nan"), dtype=dtype, device=DEVICE)
    hopper.grouped_gemm_hopper(X, W_run, counts, out, gather_indices=gather, topk=topk, permute_x=True,
                               transpose=transpose, config=TINY, swiglu=True)
    assert relative_error(out, ref) <= BOUNDS[dtype]
    for kernel in ("hopper", "auto", "portable"):  # fused, and the GEMM then the SwiGLU
        if kernel == "hopper" and hopper.unsupported_reason(X, W_run, transpose):
            # rows TMA cannot load (I = 2 with transpose=False: 8-byte rows): asked for by name, refused by name
            with pytest.raises(ValueError, match="kernel='hopper' cannot run these operands: TMA needs 16-byte"):
                grouped_gemm_swiglu(X, W_run, counts, gather, topk, True, transpose, None, kernel)
            continue
        got = grouped_gemm_swiglu(X, W_run, counts, gather, topk, True, transpose, None, kernel)
        assert got.shape == (T * topk, I) and relative_error(got, ref) <= BOUNDS[dtype], kernel


def test_swiglu_candidates_keep_two_accumulators_small():
    for _, configs in CANDIDATES_BY_ROWS_PER_EXPERT:
        narrowed = hopper.swiglu_candidates(configs)
        assert all(c["BLOCK_N"] <= 128 for c in narrowed) and len(narrowed) == len({tuple(c.items()) for c in narrowed})


def test_decode_buckets_and_their_switch(monkeypatch):
    assert pick_config(4, 128)["BLOCK_M"] == 16, "a token's rows: 16-row tiles"
    assert pick_config(12 * 128, 128)["BLOCK_M"] == 32
    monkeypatch.setattr(hopper, "SMALL_M", False)
    assert pick_config(4, 128)["BLOCK_M"] == 128, "switched off: the 64-row bucket's default"


def test_zero_rows():
    W = torch.randn(3, 16, 32, device=DEVICE, dtype=DTYPES[0])
    X = torch.empty(0, 32, device=DEVICE, dtype=DTYPES[0])
    m_sizes = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    assert grouped_gemm(X, W, m_sizes, kernel="hopper").shape == (0, 16)


def test_pick_config_buckets():
    assert pick_config(64 * 128, 128)["BLOCK_M"] == 128 and pick_config(64 * 128, 128)["BLOCK_K"] == 128
    assert pick_config(128 * 32, 32)["BLOCK_M"] == 64
    assert pick_config(2048 * 8, 8)["BLOCK_N"] == 256
    assert all(c["FLATTEN"] for c in (pick_config(m, 8) for m in (1, 1000, 10**6)))


def test_refusals_name_the_fix(monkeypatch):
    X = torch.randn(8, 24, device=DEVICE, dtype=DTYPES[0])
    m_sizes = torch.tensor([8, 0], dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(hopper, "KN_LAYOUT", False)  # the A/B switch for the [E, K, N] layout
    with pytest.raises(ValueError, match="transpose=False.*KN_LAYOUT.*kernel='portable'"):
        grouped_gemm(X, torch.randn(2, 24, 16, device=DEVICE, dtype=X.dtype), m_sizes, transpose=False,
                     kernel="hopper")
    with pytest.raises(ValueError, match="16-byte aligned"):  # K = 6: rows of 12 or 24 bytes
        grouped_gemm(X[:, :6].contiguous(), torch.randn(2, 16, 6, device=DEVICE, dtype=X.dtype), m_sizes,
                     kernel="hopper")
    with pytest.raises(ValueError, match="kernel must be one of"):
        grouped_gemm(X, torch.randn(2, 16, 24, device=DEVICE, dtype=X.dtype), m_sizes, kernel="fast")
    with pytest.raises(ValueError, match="unknown keys"):
        grouped_gemm(X, torch.randn(2, 16, 24, device=DEVICE, dtype=X.dtype), m_sizes, kernel="hopper",
                     config={"GROUP_M": 8})


def test_tuning_picks_the_fastest_candidate_and_caches_it(monkeypatch):
    monkeypatch.setattr(autotune, "TUNED", {})
    configs = ({"name": "a"}, {"name": "broken"}, {"name": "b"}, {"name": "c"})
    seconds = {"a": 3.0, "b": 1.0, "c": 2.0}
    launched = []

    def launch(config):
        if config["name"] == "broken":
            raise RuntimeError("out of shared memory")  # a candidate that cannot build is skipped
        launched.append(config["name"])

    def timer(fn):
        before = len(launched)
        fn()
        return seconds[launched[before]]

    key = hopper.tuning_key(1000, 64, 32, 8, torch.bfloat16, True, False, False)
    assert autotune.choose_config(key, configs, launch, timer) == {"name": "b"}
    assert launched.count("a") == 2, "the slowest candidate is not timed again"
    assert launched.count("b") == launched.count("c") == 5, "the two finalists are timed again, in turns"
    runs = len(launched)
    assert autotune.choose_config(key, configs, launch, timer) == {"name": "b"}
    assert len(launched) == runs, "a cached key must not be tuned again"
    with pytest.raises(RuntimeError, match="no candidate config could run(.|\n)*out of shared memory"):
        autotune.choose_config("other", ({"name": "broken"},), launch, timer)


def test_tuning_key_buckets_rows_per_expert():
    key = lambda rows: hopper.tuning_key(rows, 1536, 2048, 128, torch.bfloat16, False, False, False)
    assert key(64 * 128) == key(50 * 128), "routings of similar size share a tuned config"
    assert key(64 * 128) != key(65 * 128)
    assert key(0) == key(1)


def test_no_tuning_under_the_interpreter_or_when_disabled(monkeypatch):
    X = torch.zeros(2, 2, device=DEVICE)
    if not ON_GPU:
        assert not autotune.autotune_enabled(X)
    monkeypatch.setenv("MOE_LEARN_AUTOTUNE", "0")
    assert not autotune.autotune_enabled(X)


def test_finalists_decide_on_their_repeated_timings(monkeypatch):
    """A lucky first measurement does not win if the repeats say otherwise."""
    monkeypatch.setattr(autotune, "TUNED", {})
    first = {"a": 1.0, "b": 2.0, "c": 3.0}
    later = {"a": 5.0, "b": 1.0, "c": 0.5}  # c is not a finalist: its first timing was the worst
    seen = {"a": 0, "b": 0, "c": 0}
    launched = []

    def timer(fn):
        fn()
        name = launched[-1]
        seen[name] += 1
        return first[name] if seen[name] == 1 else later[name]

    configs = ({"name": "a"}, {"name": "b"}, {"name": "c"})
    assert autotune.choose_config("k", configs, lambda c: launched.append(c["name"]), timer) == {"name": "b"}


def test_tuning_cache_file_keeps_winners_across_processes(monkeypatch, tmp_path):
    """MOE_LEARN_TUNING_CACHE: a winner written by one process is used by the next without tuning;
    a file stamped for another GPU or other kernels, or a broken one, is ignored."""
    path = tmp_path / "tuning" / "cache.json"
    monkeypatch.setenv(autotune.CACHE_ENV, str(path))
    monkeypatch.setattr(autotune, "_LOADED", set())
    monkeypatch.setattr(autotune, "TUNED", {})
    stamp = {"gpu": "test GPU", "torch": "t", "triton": "tr", "kernels": "abc"}
    monkeypatch.setattr(autotune, "cache_stamp", lambda: stamp)
    launched = []
    timer = lambda fn: (fn(), {"a": 2.0, "b": 1.0}[launched[-1]])[1]  # noqa: E731
    configs = ({"name": "a", "BLOCK_M": 64, "FLATTEN": True}, {"name": "b", "BLOCK_M": 128, "FLATTEN": False})
    key = hopper.tuning_key(1000, 64, 32, 8, torch.bfloat16, True, False, False)
    assert autotune.choose_config(key, configs, lambda c: launched.append(c["name"]), timer)["name"] == "b"
    saved = json.loads(path.read_text())
    assert saved["stamp"] == stamp and saved["entries"] == [[list(key), configs[1]]]

    # a new process: nothing tuned yet, the file is read on the first miss
    monkeypatch.setattr(autotune, "_LOADED", set())
    monkeypatch.setattr(autotune, "TUNED", {})
    launched.clear()
    assert autotune.choose_config(key, configs, lambda c: launched.append(c["name"]), timer) == configs[1]
    assert launched == [], "a cached winner must not be tuned again"

    # another GPU (or other kernels, torch or Triton): the file is ignored, then rewritten for this one
    monkeypatch.setattr(autotune, "_LOADED", set())
    monkeypatch.setattr(autotune, "TUNED", {})
    monkeypatch.setattr(autotune, "cache_stamp", lambda: {**stamp, "gpu": "another GPU"})
    assert autotune.choose_config(key, configs, lambda c: launched.append(c["name"]), timer)["name"] == "b"
    assert launched, "a file stamped for another GPU must not be trusted"
    assert json.loads(path.read_text())["stamp"]["gpu"] == "another GPU"

    # a broken file: ignored and replaced
    path.write_text("{not json")
    monkeypatch.setattr(autotune, "_LOADED", set())
    monkeypatch.setattr(autotune, "TUNED", {})
    assert autotune.choose_config(key, configs, lambda c: launched.append(c["name"]), timer)["name"] == "b"
    assert len(json.loads(path.read_text())["entries"]) == 1


@pytest.mark.parametrize("setting", ["1", "0", None])
def test_tuning_log_prints_one_line_per_tuning_only_when_asked(monkeypatch, capsys, setting):
    """MOE_LEARN_TUNING_LOG=1: a line on stderr naming the key, the time and the winner; a cached key prints none."""
    if setting is None:
        monkeypatch.delenv(autotune.LOG_ENV, raising=False)
    else:
        monkeypatch.setenv(autotune.LOG_ENV, setting)
    monkeypatch.setattr(autotune, "TUNED", {})
    launched = []
    timer = lambda fn: (fn(), {"a": 2.0, "b": 1.0}[launched[-1]])[1]  # noqa: E731
    configs = ({"name": "a"}, {"name": "b"})
    autotune.choose_config(("log", 1), configs, lambda c: launched.append(c["name"]), timer)
    autotune.choose_config(("log", 1), configs, lambda c: launched.append(c["name"]), timer)
    lines = capsys.readouterr().err.splitlines()
    if setting == "1":
        assert len(lines) == 1 and "('log', 1)" in lines[0] and "over 2 configs" in lines[0] and "'b'" in lines[0]
    else:
        assert lines == []


def test_cache_stamp_names_the_versions_and_the_kernels_source():
    stamp = autotune.cache_stamp()
    assert set(stamp) == {"gpu", "torch", "triton", "kernels"} and len(stamp["kernels"]) == 16
