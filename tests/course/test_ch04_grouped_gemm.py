"""Chapter 04's checks: the reference answers pass, stubs and plausible wrong answers are rejected."""

import pytest
import torch.nn.functional as F

from moe_learn import (
    calculate_topk,
    combine,
    get_routing_indices,
    moe_forward_torch,
    permute,
    torch_grouped_gemm,
    unpermute,
)
from moe_learn.course.checks import CheckFailed
from moe_learn.course.checks import ch04_grouped_gemm as ch04

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
