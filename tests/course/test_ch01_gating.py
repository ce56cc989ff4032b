"""Chapter 01 checks: the reference passes, plausible wrong answers fail with a pointed message."""

import json

import pytest
import torch
import torch.nn.functional as F

from moe_learn import calculate_topk
from moe_learn.course import notebook_build as nb_build
from moe_learn.course.checks import ch01_gating as ch01
from moe_learn.course.checks._core import CheckFailed
from moe_learn.course.exercises import all_exercises
from moe_learn.ops.routers import deepseek_v3_router, gpt_oss_router, llama4_router, qwen3_moe_router


def test_exercises_are_listed_with_hints():
    ids = [ex.id for ex in ch01.EXERCISES]
    assert ids == ["01.1", "01.2", "01.3", "01.4", "01.5"]
    assert all(2 <= len(ex.hints) <= 3 and ex.notebook == "01_gating.ipynb" for ex in ch01.EXERCISES)
    assert set(ids) <= set(all_exercises())


@pytest.mark.parametrize(
    ("check", "reference"),
    [
        (ch01.check_calculate_topk, calculate_topk),
        (ch01.check_qwen3_moe_router, qwen3_moe_router),
        (ch01.check_llama4_router, llama4_router),
        (ch01.check_gpt_oss_router, gpt_oss_router),
        (ch01.check_deepseek_v3_router, deepseek_v3_router),
    ],
)
def test_reference_passes(check, reference, capsys):
    check(reference)
    assert "[PASS] 01." in capsys.readouterr().out


def test_stub_error_propagates():
    def stub(*args):
        raise NotImplementedError("exercise 01.1: replace this line with your code")

    with pytest.raises(NotImplementedError):
        ch01.check_calculate_topk(stub)


# --------------------------------------------------------------------------- 01.1 wrong answers


def _topk_variant(
    *, renorm_off=False, swap_act=False, act_after=False, dim=-1, keep_float=False, no_flag_check=False, largest=True
):
    """calculate_topk with one deliberate mistake."""

    def fn(logits, top_k, use_sigmoid, renormalize, pre_act=True, post_act=False):
        if pre_act == post_act and not no_flag_check:
            raise ValueError("exactly one")
        sig = use_sigmoid != swap_act
        x = logits.float()
        if pre_act and not act_after:
            scores = torch.sigmoid(x) if sig else torch.softmax(x, dim=dim)
            w, ids = scores.topk(top_k, dim=-1, largest=largest)
        else:
            top, ids = x.topk(top_k, dim=-1, largest=largest)
            w = torch.sigmoid(top) if sig else torch.softmax(top, dim=-1)
        if renormalize and not renorm_off:
            w = w / w.sum(-1, keepdim=True)
        return (w if keep_float else w.to(logits.dtype)), ids

    return fn


@pytest.mark.parametrize(
    ("wrong", "match"),
    [
        (_topk_variant(renorm_off=True), "not renormalized"),
        (_topk_variant(swap_act=True), r"(sigmoid|softmax) used where use_sigmoid="),
        (
            _topk_variant(act_after=True),
            r"sum to 1: softmax taken over only the k chosen logits \(post_act\), or renormalized",
        ),
        (_topk_variant(dim=0), r"softmax over dim=0"),
        (_topk_variant(keep_float=True), r"topk_weights has dtype torch.float32, expected torch.bfloat16"),
        (_topk_variant(no_flag_check=True), r"pre_act=True, post_act=True returned a result; it should raise"),
        (lambda g, k, s, r, pre=True, post=False: torch.topk(g, k), r"the weights are the raw logits"),
        (_topk_variant(largest=False), r"largest=False"),
        (
            lambda g, k, s, r, pre=True, post=False: torch.topk(g, k, dim=0),
            r"topk_weights has shape .*\n.*dim=-1|raised RuntimeError: selected index k out of range",
        ),
    ],
)
def test_calculate_topk_wrong_answers_are_rejected(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        ch01.check_calculate_topk(wrong)


def test_calculate_topk_check_accepts_any_slot_order_and_tie_choice():
    """torch.topk's order among ties is unspecified: a right answer that breaks ties otherwise passes."""

    def reversed_slots(logits, top_k, use_sigmoid, renormalize, pre_act=True, post_act=False):
        # Reverse the expert axis before top-k (so ties go the other way), then the slot order.
        w, ids = calculate_topk(logits.flip(-1), top_k, use_sigmoid, renormalize, pre_act, post_act)
        return w.flip(-1), (logits.shape[1] - 1 - ids).flip(-1)

    ch01.check_calculate_topk(reversed_slots)


# --------------------------------------------------------------------------- 01.2-01.5 wrong answers


def _qwen3_no_norm(x, w, top_k, norm):
    logits = F.linear(x, w)
    return (logits, *calculate_topk(logits, top_k, False, False))


def _qwen3_sigmoid(x, w, top_k, norm):
    logits = F.linear(x, w)
    return (logits, *calculate_topk(logits, top_k, True, norm))


def _qwen3_returns_probabilities_as_logits(x, w, top_k, norm):
    logits = F.linear(x, w)
    return (torch.softmax(logits, -1), *calculate_topk(logits, top_k, False, norm))


@pytest.mark.parametrize(
    ("wrong", "match"),
    [
        (_qwen3_no_norm, "norm_topk_prob=True but the weights are not renormalized"),
        (_qwen3_sigmoid, "sigmoid instead of softmax"),
        (_qwen3_returns_probabilities_as_logits, r"router_logits of token \d+: .* expected"),
    ],
)
def test_qwen3_router_wrong_answers(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        ch01.check_qwen3_moe_router(wrong)


def _llama4(use_sigmoid=True, renormalize=False, pre_act=False):
    def fn(x, w, top_k):
        logits = F.linear(x, w)
        return (logits, *calculate_topk(logits, top_k, use_sigmoid, renormalize, pre_act, not pre_act))

    return fn


@pytest.mark.parametrize(
    ("wrong", "match"),
    [
        (_llama4(renormalize=True), "renormaliz"),
        (_llama4(use_sigmoid=False), r"softmax (instead of sigmoid|over the one chosen logit)"),
        (_llama4(use_sigmoid=False, pre_act=True), "softmax over all E experts"),
    ],
)
def test_llama4_router_wrong_answers(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        ch01.check_llama4_router(wrong)


def _gpt_oss(with_bias=True, use_sigmoid=False, pre_act=False):
    def fn(x, w, bias, top_k):
        logits = F.linear(x, w, bias if with_bias else None)
        return (logits, *calculate_topk(logits, top_k, use_sigmoid, False, pre_act, not pre_act))

    return fn


def _gpt_oss_bias_only_in_returned_logits(x, w, bias, top_k):
    logits = F.linear(x, w)
    return (logits + bias, *calculate_topk(logits, top_k, False, False, False, True))


@pytest.mark.parametrize(
    ("wrong", "match"),
    [
        (_gpt_oss(with_bias=False), "router bias is missing"),
        (_gpt_oss(pre_act=True), r"softmax over all E experts \(pre_act\)"),
        (_gpt_oss(use_sigmoid=True), "sigmoid instead of softmax"),
        (_gpt_oss_bias_only_in_returned_logits, "router bias is missing from the logits"),
    ],
)
def test_gpt_oss_router_wrong_answers(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        ch01.check_gpt_oss_router(wrong)


def _deepseek(*, bias_in_weights=False, no_bias=False, no_groups=False, no_scale=False, no_norm=False, softmax=False):
    def fn(x, w, bias, top_k, n_group, topk_group, norm, scale):
        logits = x.float() @ w.float().T
        scores = torch.softmax(logits, -1) if softmax else torch.sigmoid(logits)
        choice = scores if no_bias else scores + bias
        if not no_groups:
            groups = choice.view(x.shape[0], n_group, -1)
            group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(groups.shape[-1], dim=1), float("-inf"))
        ids = choice.topk(top_k, dim=-1).indices
        weights = (scores + bias if bias_in_weights else scores).gather(1, ids)
        if norm and not no_norm:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights * (1.0 if no_scale else scale), ids

    return fn


@pytest.mark.parametrize(
    ("wrong", "match"),
    [
        (_deepseek(), None),
        (_deepseek(bias_in_weights=True), "weights include e_score_correction_bias"),
        (_deepseek(no_bias=True), "chosen without e_score_correction_bias"),
        (_deepseek(no_groups=True), "group limit is missing"),
        (_deepseek(no_scale=True), "routed_scaling_factor is missing"),
        (_deepseek(no_norm=True), "not renormalized before the scaling"),
        (_deepseek(softmax=True), "softmax instead of sigmoid"),
    ],
)
def test_deepseek_router_wrong_answers(wrong, match, capsys):
    if match is None:  # the harness itself, without a mistake, is a right answer
        wrong_is_right = wrong
        ch01.check_deepseek_v3_router(wrong_is_right)
        assert "[PASS] 01.5" in capsys.readouterr().out
        return
    with pytest.raises(CheckFailed, match=match):
        ch01.check_deepseek_v3_router(wrong)


def test_crash_in_learner_code_is_explained():
    def crashes(x, w, top_k):
        logits = F.linear(x, w)
        return logits, *torch.topk(torch.sigmoid(logits), top_k, dim=2)  # no dim 2 in [T, E]

    with pytest.raises(CheckFailed, match=r"(?s)your function raised IndexError.*on inputs"):
        ch01.check_llama4_router(crashes)


def test_solved_notebook_has_an_exercise_and_a_check_cell_per_exercise():
    nb = json.loads((nb_build.SOLUTIONS / "01_gating.ipynb").read_text())
    tags = {t for cell in nb["cells"] for t in cell.get("metadata", {}).get("tags", [])}
    for ex in ch01.EXERCISES:
        assert {f"exercise-{ex.id}", f"check-{ex.id}"} <= tags, ex.id
