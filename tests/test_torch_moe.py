"""The naive grouped GEMM, SwiGLU, the MoE experts, TorchMoEBlock against transformers, ch04 checks."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_learn import (
    TorchMoEBlock,
    calculate_topk,
    combine,
    get_routing_indices,
    moe_experts_torch,
    moe_forward_torch,
    permute,
    swiglu,
    torch_grouped_gemm,
    unpermute,
)
from moe_learn.course.checks import CheckFailed
from moe_learn.course.checks import ch04_grouped_gemm as ch04
from moe_learn.device import DEVICE


def per_row_reference(X, W, m_sizes, transpose):
    """Row by row: each row times the weight of the expert that owns it (no blocks, no offsets)."""
    owner = torch.repeat_interleave(torch.arange(len(m_sizes)), torch.as_tensor(m_sizes).long().cpu())
    rows = [X[r] @ (W[e].T if transpose else W[e]) for r, e in enumerate(owner.tolist())]
    N = W.shape[1] if transpose else W.shape[2]
    return torch.stack(rows) if rows else X.new_empty(0, N)


# ------------------------------------------------------------------ grouped GEMM


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=6),
    st.integers(1, 6),
    st.integers(1, 6),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_grouped_gemm_matches_row_by_row(sizes, K, N, transpose, seed):
    gen = torch.Generator().manual_seed(seed)
    E, M = len(sizes), sum(sizes)
    X = torch.randn(M, K, generator=gen).to(DEVICE)
    W = torch.randn(E, N, K, generator=gen) if transpose else torch.randn(E, K, N, generator=gen)
    W = W.to(DEVICE)
    m_sizes = torch.tensor(sizes, dtype=torch.int32, device=DEVICE)
    Y = torch_grouped_gemm(X, W, m_sizes, transpose=transpose)
    assert Y.shape == (M, N)
    torch.testing.assert_close(Y, per_row_reference(X, W, sizes, transpose), rtol=1e-5, atol=1e-5)


def test_transpose_false_with_non_square_W():
    X = torch.randn(5, 3, device=DEVICE)
    W = torch.randn(2, 3, 7, device=DEVICE)  # [E, K, N]
    m_sizes = torch.tensor([2, 3], device=DEVICE)
    Y = torch_grouped_gemm(X, W, m_sizes, transpose=False)
    assert Y.shape == (5, 7)
    torch.testing.assert_close(Y[:2], X[:2] @ W[0])
    torch.testing.assert_close(Y[2:], X[2:] @ W[1])
    # the same product with W in nn.Linear layout and transpose=True
    torch.testing.assert_close(torch_grouped_gemm(X, W.transpose(1, 2).contiguous(), m_sizes), Y)


def test_empty_experts_cost_nothing_and_leave_no_gap():
    X = torch.randn(4, 3, device=DEVICE)
    W = torch.randn(5, 2, 3, device=DEVICE)
    Y = torch_grouped_gemm(X, W, torch.tensor([0, 3, 0, 0, 1], device=DEVICE))
    torch.testing.assert_close(Y[:3], X[:3] @ W[1].T)
    torch.testing.assert_close(Y[3:], X[3:] @ W[4].T)
    assert torch_grouped_gemm(X[:0], W, torch.zeros(5, dtype=torch.int64, device=DEVICE)).shape == (0, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grouped_gemm_keeps_dtype(dtype):
    X = torch.randn(6, 8, device=DEVICE, dtype=dtype)
    W = torch.randn(3, 4, 8, device=DEVICE, dtype=dtype)
    sizes = [1, 2, 3]
    Y = torch_grouped_gemm(X, W, torch.tensor(sizes, device=DEVICE))
    assert Y.dtype == dtype
    torch.testing.assert_close(Y.float(), per_row_reference(X.float(), W.float(), sizes, True), rtol=2e-2, atol=2e-2)


def test_grouped_gemm_bad_inputs():
    X = torch.randn(5, 4, device=DEVICE)
    W = torch.randn(3, 6, 4, device=DEVICE)
    ok = torch.tensor([1, 2, 2], device=DEVICE)
    with pytest.raises(ValueError, match="m_sizes sums to 4 but X has 5 rows"):
        torch_grouped_gemm(X, W, torch.tensor([1, 2, 1], device=DEVICE))
    with pytest.raises(ValueError, match="m_sizes must be non-negative"):
        torch_grouped_gemm(X, W, torch.tensor([3, -1, 3], device=DEVICE))
    with pytest.raises(ValueError, match="m_sizes has 2 entries but W has 3 experts"):
        torch_grouped_gemm(X, W, torch.tensor([2, 3], device=DEVICE))
    with pytest.raises(TypeError, match="m_sizes must hold integer"):
        torch_grouped_gemm(X, W, ok.float())
    with pytest.raises(ValueError, match=r"X has 4 columns but W \(3, 6, 4\) \(layout \[E, K, N\], transpose=False\)"):
        torch_grouped_gemm(X, W, ok, transpose=False)
    with pytest.raises(ValueError, match="W must be 3-D"):
        torch_grouped_gemm(X, W[0], ok)
    with pytest.raises(ValueError, match="X must be 2-D"):
        torch_grouped_gemm(X[None], W, ok)
    with pytest.raises(TypeError, match="X is torch.float32 but W is torch.float16"):
        torch_grouped_gemm(X, W.half(), ok)
    with pytest.raises(TypeError, match="m_sizes must be a torch.Tensor"):
        torch_grouped_gemm(X, W, [1, 2, 2])


def test_swiglu_is_gate_first():
    gate, up = torch.randn(3, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    torch.testing.assert_close(swiglu(torch.cat([gate, up], dim=1)), F.silu(gate) * up)
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu(torch.randn(3, 5, device=DEVICE))


# ------------------------------------------------------------------ MoE experts and block


def random_moe(T=10, H=8, inter=6, E=5, k=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen)
    router = torch.randn(E, H, generator=gen)
    gate_up = torch.randn(E, 2 * inter, H, generator=gen) / H**0.5
    down = torch.randn(E, H, inter, generator=gen) / inter**0.5
    return (t.to(DEVICE, dtype) for t in (hidden, router, gate_up, down))


def experts_token_by_token(hidden, ids, weights, gate_up, down):
    """The definition, one token and one expert at a time."""
    out = torch.zeros_like(hidden, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            h = swiglu(hidden[t].double() @ gate_up[e].double().T)
            out[t] += weights[t, j].double() * (h @ down[e].double().T)
    return out


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 9), st.integers(1, 5), st.data())
def test_moe_experts_match_the_definition(T, E, data):
    k = data.draw(st.integers(1, E))
    hidden, router, gate_up, down = random_moe(T=T, E=E, k=k, seed=data.draw(st.integers(0, 2**31 - 1)))
    weights, ids = calculate_topk(hidden @ router.T, k, use_sigmoid=False, renormalize=True)
    got = moe_experts_torch(hidden, ids, weights, gate_up, down)
    torch.testing.assert_close(
        got.double(), experts_token_by_token(hidden, ids, weights, gate_up, down), rtol=1e-5, atol=1e-6
    )


def test_moe_experts_is_the_chapter_pipeline():
    hidden, router, gate_up, down = random_moe()
    weights, ids = calculate_topk(hidden @ router.T, 2, use_sigmoid=False, renormalize=False)
    counts, gather = get_routing_indices(ids, 5)
    y = torch_grouped_gemm(swiglu(torch_grouped_gemm(permute(hidden, gather, 2), gate_up, counts)), down, counts)
    expected = combine(unpermute(y, gather), weights)
    torch.testing.assert_close(moe_experts_torch(hidden, ids, weights, gate_up, down), expected)


def test_moe_experts_bad_inputs():
    hidden, router, gate_up, down = random_moe()
    weights, ids = calculate_topk(hidden @ router.T, 2, use_sigmoid=False, renormalize=True)
    with pytest.raises(ValueError, match=r"topk_ids \(10, 2\) and topk_weights \(10, 1\)"):
        moe_experts_torch(hidden, ids, weights[:, :1], gate_up, down)
    with pytest.raises(TypeError, match="topk_ids must hold integer"):
        moe_experts_torch(hidden, ids.float(), weights, gate_up, down)
    with pytest.raises(ValueError, match=r"gate_up_proj .* must be \[E, 2I, H\]"):
        moe_experts_torch(hidden, ids, weights, gate_up.transpose(1, 2), down)
    with pytest.raises(ValueError, match="disagree"):
        moe_experts_torch(hidden, ids, weights, gate_up[:, :-2], down)
    with pytest.raises(TypeError, match="hidden_states is torch.float32 but down_proj is torch.float16"):
        moe_experts_torch(hidden, ids, weights, gate_up, down.half())
    with pytest.raises(ValueError, match=r"topk_ids holds \d+, outside \[0, 5\)"):
        moe_experts_torch(hidden, ids + 5, weights, gate_up, down)


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


def test_functional_forward_bad_inputs():
    hidden, router, gate_up, down = random_moe()
    with pytest.raises(ValueError, match="router_weight has 4 experts but gate_up_proj"):
        moe_forward_torch(hidden, router[:4], gate_up, down, 2)
    with pytest.raises(TypeError, match="hidden_states must be a floating-point"):
        moe_forward_torch(hidden.long(), router, gate_up, down, 2)


# ------------------------------------------------------------------ the checks


def test_reference_answers_pass_the_checks(capsys):
    ch04.check_grouped_gemm(torch_grouped_gemm)
    ch04.check_moe_forward(moe_forward_torch)
    out = capsys.readouterr().out
    assert "[PASS] 04.1" in out and "[PASS] 04.2" in out


def test_stubs_raise_not_implemented():
    def stub(*args):
        raise NotImplementedError("exercise 04.1")

    for check in (ch04.check_grouped_gemm, ch04.check_moe_forward):
        with pytest.raises(NotImplementedError):
            check(stub)


def _gemm_loop(X, W, m_sizes, transpose, *, flip=False, experts=None, offset=None, compact_index=False):
    """A loop-over-experts grouped GEMM with switches for the classic mistakes."""
    N = W.shape[1] if transpose else W.shape[2]
    Y = X.new_zeros(X.shape[0], N)
    sizes = m_sizes.tolist()
    start, used = 0, 0
    for e in range(len(sizes) if experts is None else experts(len(sizes))):
        m = sizes[e]
        if m == 0:
            continue
        j = used if compact_index else e  # compact_index: counts only the non-empty experts
        W_e = W[j].T if transpose != flip else W[j]
        lo = start if offset is None else offset(start)
        Y[start : start + m] = X[lo : lo + m] @ W_e
        start, used = start + m, used + 1
    return Y


@pytest.mark.parametrize(
    "wrong, pattern",
    [
        (lambda X, W, m, t=True: _gemm_loop(X, W, m, t, flip=True), r"expert 0 owns rows 0..2.*\n.*not transposed"),
        (
            lambda X, W, m, t=True: _gemm_loop(X, W, m, t, experts=lambda E: E - 1),
            r"expert 3 owns rows 8..9; row 8.*got 0.0000\n.*never written.*range\(E\)",
        ),
        (
            lambda X, W, m, t=True: _gemm_loop(X, W, m, t, offset=lambda s: max(s - 1, 0)),
            r"expert 1 owns rows 3..3.*\n.*wrong row offset: expert 1 starts at row 3.*from row 2",
        ),
        (
            lambda X, W, m, t=True: _gemm_loop(X, W, m, t, compact_index=True),
            r"expert 2 owns rows 2..4.*\n.*multiplied by W\[1\]",
        ),
        (
            lambda X, W, m, t=True: _gemm_loop(X, W, m, True),
            r"raised RuntimeError.*\n.*\n.*with transpose=False W\[e\] is already \[K, N\]",
        ),
    ],
    ids=["W-not-transposed", "skips-last-expert", "off-by-one-offset", "index-skips-empty", "ignores-transpose"],
)
def test_check_grouped_gemm_rejects(wrong, pattern):
    with pytest.raises(CheckFailed, match=pattern):
        ch04.check_grouped_gemm(wrong)


def _moe_variant(*, swap=False, weights_on_input=False, weights=True, renorm=None, weights_before_down=False):
    """A learner's moe_forward built from the reference primitives, with one switch flipped."""

    def forward(hidden, router_weight, gate_up_proj, down_proj, top_k, renormalize):
        norm = renormalize if renorm is None else renorm
        topk_weights, topk_ids = calculate_topk(hidden @ router_weight.T, top_k, False, norm)
        counts, gather = get_routing_indices(topk_ids, router_weight.shape[0])
        x = permute(hidden, gather, top_k)
        w_rows = topk_weights.reshape(-1)[gather.long()][:, None]  # each row's weight, expert order
        if weights_on_input:
            x = x * w_rows
        gate, up = torch_grouped_gemm(x, gate_up_proj, counts).chunk(2, dim=-1)
        if swap:
            gate, up = up, gate
        act = F.silu(gate) * up
        if weights_before_down:
            act = act * w_rows
        y = unpermute(torch_grouped_gemm(act, down_proj, counts), gather)
        if weights_on_input or weights_before_down or not weights:
            return y.view(hidden.shape[0], top_k, hidden.shape[1]).sum(1)
        return combine(y, topk_weights)

    return forward


@pytest.mark.parametrize(
    "wrong, pattern",
    [
        (_moe_variant(swap=True), r"token \d+, column \d+: expected .* experts \[.*\n.*gate and up are swapped"),
        (_moe_variant(weights_on_input=True), r"\n.*scaled the expert INPUT"),
        (_moe_variant(weights=False), r"\n.*routing weights were never applied"),
        (_moe_variant(renorm=True), r"renormalize=False.*\n.*renormalize=False was ignored"),
    ],
    ids=["gate-up-swapped", "weights-on-input", "no-weights", "renormalize-ignored"],
)
def test_check_moe_forward_rejects(wrong, pattern):
    with pytest.raises(CheckFailed, match=pattern):
        ch04.check_moe_forward(wrong)


def test_check_moe_forward_accepts_weights_before_down_proj():
    # down_proj is linear, so scaling its input by the routing weight is the same math
    # (fused kernels do this); the check must not reject a correct variant.
    ch04.check_moe_forward(_moe_variant(weights_before_down=True))


def test_exercises_have_progressive_hints():
    assert [e.id for e in ch04.EXERCISES] == ["04.1", "04.2"]
    assert all(2 <= len(e.hints) <= 3 and e.notebook == "04_naive_grouped_gemm.ipynb" for e in ch04.EXERCISES)
