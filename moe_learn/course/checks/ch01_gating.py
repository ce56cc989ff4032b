"""Checks for chapter 01 (gating): ``calculate_topk`` and the routers of five models.

Which expert wins a tie is up to ``torch.topk``, so the checks never compare expert ids
position by position. They ask two questions instead, both robust to ties and to the
order of the k slots: did you pick experts whose scores are the top k, and are your
weights the right ones FOR THE EXPERTS YOU PICKED? When the answer is no, they try the
usual mistakes (missing renormalization, the wrong activation or dimension, activating
on the wrong side of top-k...) and name the one your output matches.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moe_learn.course.checks._core import call_learner, expect_tensor, fail, passed
from moe_learn.course.exercises import Exercise
from moe_learn.ops.routers import group_limited_mask

NOTEBOOK = "01_gating.ipynb"

EXERCISES = [
    Exercise(
        id="01.1",
        notebook=NOTEBOOK,
        title="calculate_topk: activation, top-k, renormalization",
        hints=(
            "Start from float32 logits, and follow the flags: pre_act means activate all E scores (softmax over "
            "dim=-1, or sigmoid) and then torch.topk; post_act means torch.topk on the raw logits and then "
            "activate only those k values.",
            "renormalize divides each row of the k weights by its sum (keepdim=True). Raise ValueError unless "
            "exactly one of pre_act / post_act is True.",
            "Return (weights.to(gating_output.dtype), ids): the weights in the dtype of the logits, the ids as "
            "torch.topk gives them (int64).",
        ),
    ),
    Exercise(
        id="01.2",
        notebook=NOTEBOOK,
        title="Qwen3-MoE router (softmax, top-k, optional renormalization)",
        hints=(
            "The logits are F.linear(hidden_states, weight): weight is [E, H], so this is hidden_states @ weight.T.",
            "Then it is one call: calculate_topk(logits, top_k, use_sigmoid=False, renormalize=norm_topk_prob).",
            "Return (logits, weights, ids) in that order.",
        ),
    ),
    Exercise(
        id="01.3",
        notebook=NOTEBOOK,
        title="Llama 4 router (top-k on logits, sigmoid, no renormalization)",
        hints=(
            "Llama 4 ranks the raw logits: that is post_act=True (and pre_act=False).",
            "The activation is a sigmoid, and the k weights are NOT renormalized (with top-1 that would make "
            "every weight 1).",
        ),
    ),
    Exercise(
        id="01.4",
        notebook=NOTEBOOK,
        title="gpt-oss router (bias, top-k on logits, softmax over the k)",
        hints=(
            "gpt-oss's router is an nn.Linear WITH a bias: F.linear(hidden_states, weight, bias).",
            "Top-k on the logits first, then a softmax over just those k values: post_act=True, use_sigmoid=False.",
            "A softmax over k values already sums to 1, so renormalize=False gives the same answer.",
        ),
    ),
    Exercise(
        id="01.5",
        notebook=NOTEBOOK,
        title="DeepSeek-V3 router (sigmoid, correction bias, group-limited top-k, scaling)",
        hints=(
            "scores = sigmoid(logits) in float32; choose with scores + e_score_correction_bias, but take the "
            "weights from the plain scores (scores.gather(1, ids)).",
            "Groups: view the biased scores as [T, n_group, E // n_group]; a group's score is the sum of its top-2; "
            "keep the topk_group best groups and set every other expert's choice score to -inf before the top-k.",
            "Last: if norm_topk_prob divide the k weights by their sum (+1e-20), then multiply by "
            "routed_scaling_factor.",
        ),
    ),
]


# ---------------------------------------------------------------------------------------
# Shared comparison: selection by score (tie-robust), then weights given the chosen ids.
# ---------------------------------------------------------------------------------------


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype == torch.bfloat16:
        return 2e-2, 1e-2
    if dtype == torch.float16:
        return 2e-3, 1e-3
    return 1e-5, 1e-6


def _fmt(values) -> str:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, list):
        return "[" + ", ".join(_fmt(v) for v in values) + "]"
    return f"{values:.4g}" if isinstance(values, float) else str(values)


def _by_expert(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (ids, weights) sorted by expert id, so slot order does not matter."""
    ids_sorted, order = ids.long().sort(dim=1)
    return ids_sorted, weights.gather(1, order)


def _same_routing(ids_a, w_a, ids_b, w_b, rtol, atol) -> bool:
    if ids_a.shape != ids_b.shape:
        return False
    ia, wa = _by_expert(ids_a.cpu(), w_a.detach().double().cpu())
    ib, wb = _by_expert(ids_b.cpu(), w_b.detach().double().cpu())
    return bool(torch.equal(ia, ib) and torch.allclose(wa, wb, rtol=rtol, atol=atol))


@dataclass
class _Case:
    """One call of the learner's function and what a right answer looks like."""

    label: str
    args: tuple
    dtype: torch.dtype
    num_experts: int
    top_k: int
    # [T, E] score that ranks the experts; -inf where an expert may not be chosen.
    selection_key: torch.Tensor
    # ids [T, k] -> the weights a right answer gives those experts.
    weights_for: Callable[[torch.Tensor], torch.Tensor]
    # name of a plausible mistake -> (ids, weights) it would produce.
    mistakes: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    # name of a mistake that picks the right experts -> the weights it gives YOUR ids (tie-proof).
    weight_mistakes: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)


def _diagnose(case: _Case, ids: torch.Tensor, weights: torch.Tensor, selection_ok: bool = True) -> str | None:
    rtol, atol = _tolerance(case.dtype)
    for mistake, produce in case.mistakes.items():
        try:
            m_ids, m_weights = produce()
        except Exception:  # a mistake that cannot even run on this case is not the one
            continue
        if _same_routing(ids, weights, m_ids, m_weights, rtol, atol):
            return mistake
    if selection_ok and ids.shape == weights.shape and ids.ndim == 2:
        for mistake, weights_for in case.weight_mistakes.items():
            expected = weights_for(ids.long().to(case.selection_key.device)).detach().double().cpu()
            if torch.allclose(weights.detach().double().cpu(), expected, rtol=rtol, atol=atol):
                return mistake
    return None


def _compare(exercise: str, case: _Case, ids, weights) -> None:
    """Fail on the first token whose experts or weights are wrong."""
    num_tokens = case.selection_key.shape[0]
    k, num_experts = case.top_k, case.num_experts
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        fail(exercise, f"[{case.label}] topk_ids has dtype {ids.dtype}; expert ids must be integers")
    ids_cpu = ids.detach().long().cpu()
    if ids_cpu.numel() and (int(ids_cpu.min()) < 0 or int(ids_cpu.max()) >= num_experts):
        fail(exercise, f"[{case.label}] topk_ids holds {_fmt(ids_cpu.unique())}, outside [0, {num_experts})")
    rtol, atol = _tolerance(case.dtype)
    key = case.selection_key.detach().double().cpu()
    best = key.topk(k, dim=1).values
    for t in range(num_tokens):
        row = ids_cpu[t]
        if row.unique().numel() != k:
            fail(exercise, f"[{case.label}] token {t} picked expert(s) {_fmt(row)}: each of the k experts must differ")
        got = key[t, row].sort(descending=True).values
        if not torch.allclose(got, best[t], rtol=rtol, atol=atol):
            mistake = _diagnose(case, ids, weights, selection_ok=False)
            expect = key[t].topk(k).indices
            fail(
                exercise,
                f"[{case.label}] token {t}: you picked experts {_fmt(sorted(row.tolist()))}, "
                f"the top-{k} are {_fmt(sorted(expect.tolist()))} (their selection scores {_fmt(best[t])}, "
                f"yours {_fmt(got)})",
                mistake or "rank the experts with torch.topk(..., dim=-1) on the right score, largest first",
            )
    expected = case.weights_for(ids_cpu.to(case.selection_key.device)).detach().double().cpu()
    got_w = weights.detach().double().cpu()
    close = torch.isclose(got_w, expected, rtol=rtol, atol=atol) & torch.isfinite(got_w)
    bad_rows = (~close.all(dim=1)).nonzero()
    if bad_rows.numel():
        t = int(bad_rows[0])
        mistake = _diagnose(case, ids, weights)
        fail(
            exercise,
            f"[{case.label}] token {t}, experts {_fmt(ids_cpu[t])}: weights {_fmt(got_w[t])}, "
            f"expected {_fmt(expected[t])}",
            mistake,
        )


def _expect_tuple(exercise: str, out, n: int, names: str) -> tuple:
    if not isinstance(out, tuple | list) or len(out) != n:
        got = f"a {type(out).__name__} of length {len(out)}" if isinstance(out, tuple | list) else type(out).__name__
        fail(exercise, f"expected a tuple ({names}), got {got}")
    return tuple(out)


# ---------------------------------------------------------------------------------------
# 01.1 calculate_topk
# ---------------------------------------------------------------------------------------


def _act(x: torch.Tensor, use_sigmoid: bool, dim: int = -1) -> torch.Tensor:
    return torch.sigmoid(x) if use_sigmoid else torch.softmax(x, dim=dim)


def _topk_weights_for(logits32, ids, use_sigmoid, renormalize, pre_act, softmax_dim=-1):
    """The weights of the experts ``ids`` under one reading of the calculate_topk flags."""
    if pre_act or use_sigmoid:  # sigmoid is elementwise: before or after top-k is the same
        w = _act(logits32, use_sigmoid, softmax_dim).gather(1, ids)
    else:
        w = torch.softmax(logits32.gather(1, ids), dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w


def _calculate_topk_case(logits: torch.Tensor, top_k: int, use_sigmoid: bool, renormalize: bool, pre_act: bool):
    logits32 = logits.float()
    name = "sigmoid" if use_sigmoid else "softmax"
    label = (
        f"{tuple(logits.shape)} {str(logits.dtype).removeprefix('torch.')}, top_k={top_k}, {name}, "
        f"renormalize={renormalize}, {'pre_act' if pre_act else 'post_act'}"
    )

    def ranked(key, largest=True):
        ids = key.topk(top_k, dim=-1, largest=largest).indices
        return lambda: (ids, _topk_weights_for(logits32, ids, use_sigmoid, renormalize, pre_act))

    def weights_with(**change):
        flags = dict(use_sigmoid=use_sigmoid, renormalize=renormalize, pre_act=pre_act) | change
        return lambda ids: _topk_weights_for(logits32, ids, **flags)

    mistakes, weight_mistakes = {}, {}
    if not use_sigmoid and pre_act and not renormalize:
        # softmax over the k chosen == their renormalized share of the full softmax: one symptom, two causes.
        weight_mistakes[
            "your k weights sum to 1: softmax taken over only the k chosen logits (post_act), or renormalized; "
            "pre_act=True means softmax over all E experts, then top-k, and without renormalize the k weights "
            "sum to less than 1"
        ] = weights_with(pre_act=False)
    if renormalize:
        weight_mistakes["the weights are not renormalized: divide the k weights by their sum"] = weights_with(
            renormalize=False
        )
    else:
        weight_mistakes["the weights are renormalized although renormalize=False"] = weights_with(renormalize=True)
    other = "softmax" if use_sigmoid else "sigmoid"
    weight_mistakes[f"{other} used where use_sigmoid={use_sigmoid} asks for {name}"] = weights_with(
        use_sigmoid=not use_sigmoid
    )
    if not use_sigmoid and not pre_act:
        weight_mistakes[
            "softmax taken over all E experts (pre_act); post_act=True means top-k on the raw logits, "
            "then softmax over those k"
        ] = weights_with(pre_act=True)
    if not use_sigmoid:
        # One token: a softmax over dim=0 is all ones, so the picks are arbitrary; judge the weights.
        weight_mistakes["softmax over dim=0 (across tokens); each token's softmax runs over its experts: dim=-1"] = (
            lambda ids: _topk_weights_for(logits32, ids, use_sigmoid, renormalize, pre_act, 0)
        )
    if not use_sigmoid and logits.shape[0] > 1:
        ids_dim0 = torch.softmax(logits32, dim=0).topk(top_k, dim=-1).indices
        mistakes["softmax over dim=0 (across tokens); each token's softmax runs over its experts: dim=-1"] = lambda: (
            ids_dim0,
            _topk_weights_for(logits32, ids_dim0, use_sigmoid, renormalize, pre_act, 0),
        )
    mistakes["the weights are the raw logits: activate them"] = lambda: (
        logits32.topk(top_k, dim=-1).indices,
        logits32.topk(top_k, dim=-1).values,
    )
    mistakes["torch.topk(..., largest=False) picks the smallest scores"] = ranked(logits32, largest=False)

    return _Case(
        label=label,
        args=(logits, top_k, use_sigmoid, renormalize, pre_act, not pre_act),
        dtype=logits.dtype,
        num_experts=logits.shape[1],
        top_k=top_k,
        selection_key=logits32,  # softmax and sigmoid keep each row's order: rank by logits
        weights_for=lambda ids: _topk_weights_for(logits32, ids, use_sigmoid, renormalize, pre_act),
        mistakes=mistakes,
        weight_mistakes=weight_mistakes,
    )


def _calculate_topk_cases() -> list[_Case]:
    cases = []
    # Every combination of the three flags, on fresh logits of assorted shapes.
    for use_sigmoid in (False, True):
        for renormalize in (False, True):
            for pre_act in (True, False):
                num_tokens, num_experts = random.choice([(7, 8), (33, 16), (16, 6)])
                top_k = random.choice([1, 2, min(4, num_experts)])
                logits = torch.randn(num_tokens, num_experts) * 2
                cases.append(_calculate_topk_case(logits, top_k, use_sigmoid, renormalize, pre_act))
    # Edge cases: one token, top_k == E, ties, half precision, zero tokens.
    cases.append(_calculate_topk_case(torch.randn(1, 4), 2, False, True, True))
    cases.append(_calculate_topk_case(torch.randn(5, 4), 4, False, False, True))
    ties = torch.randint(-2, 3, (12, 8)).float()
    cases.append(_calculate_topk_case(ties, 3, False, False, True))
    cases.append(_calculate_topk_case(ties, 3, True, True, False))
    cases.append(_calculate_topk_case(torch.randn(9, 8).to(torch.bfloat16), 2, False, True, True))
    cases.append(_calculate_topk_case(torch.randn(9, 8).to(torch.float16), 2, True, False, True))
    cases.append(_calculate_topk_case(torch.randn(0, 8), 2, False, True, True))
    return cases


def _expect_value_error(exercise: str, fn, args: tuple, what: str) -> None:
    try:
        fn(*args)
    except NotImplementedError:
        raise
    except ValueError:
        return
    except Exception as exc:
        fail(exercise, f"{what} raised {type(exc).__name__}: {exc}; it should raise ValueError")
    fail(exercise, f"{what} returned a result; it should raise ValueError (exactly one of pre_act/post_act is True)")


def check_calculate_topk(fn) -> None:
    """``fn(gating_output, top_k, use_sigmoid, renormalize, pre_act, post_act) -> (weights, ids)``."""
    ex = "01.1"
    cases = _calculate_topk_cases()
    for case in cases:
        logits = case.args[0]
        out = _expect_tuple(ex, call_learner(ex, fn, *case.args), 2, "topk_weights, topk_ids")
        weights, ids = out
        shape = (logits.shape[0], case.top_k)
        if isinstance(weights, torch.Tensor) and weights.shape == (case.top_k, logits.shape[1]) != shape:
            fail(
                ex,
                f"[{case.label}] topk_weights has shape {tuple(weights.shape)}, expected {shape}",
                "top-k ran over the tokens (dim=0); each token picks among its experts: dim=-1",
            )
        expect_tensor(ex, "topk_weights", weights, shape)
        expect_tensor(ex, "topk_ids", ids, shape)
        if weights.dtype != logits.dtype:
            fail(
                ex,
                f"[{case.label}] topk_weights has dtype {weights.dtype}, expected {logits.dtype}",
                "compute in float32 if you like, but cast the weights back: .to(gating_output.dtype)",
            )
        _compare(ex, case, ids, weights)
    logits = torch.randn(4, 6)
    _expect_value_error(ex, fn, (logits, 2, False, True, True, True), "pre_act=True, post_act=True")
    _expect_value_error(ex, fn, (logits, 2, False, True, False, False), "pre_act=False, post_act=False")
    passed(ex, "calculate_topk", len(cases) + 2)


# ---------------------------------------------------------------------------------------
# 01.2-01.5 routers
# ---------------------------------------------------------------------------------------


def _router_inputs(num_tokens: int, hidden: int, num_experts: int, dtype=torch.float32):
    x = torch.randn(num_tokens, hidden).to(dtype)
    w = (torch.randn(num_experts, hidden) / hidden**0.5 * 2).to(dtype)
    return x, w


def _check_router(ex: str, name: str, fn, cases: list[_Case], logits_fn) -> None:
    for case in cases:
        out = _expect_tuple(ex, call_learner(ex, fn, *case.args), 3, "router_logits, topk_weights, topk_ids")
        logits, weights, ids = out
        num_tokens = case.selection_key.shape[0]
        expect_tensor(ex, "router_logits", logits, (num_tokens, case.num_experts))
        expect_tensor(ex, "topk_weights", weights, (num_tokens, case.top_k))
        expect_tensor(ex, "topk_ids", ids, (num_tokens, case.top_k))
        ref_logits = logits_fn(*case.args)
        rtol, atol = 1e-4, 1e-5
        if not torch.allclose(logits.detach().double(), ref_logits.double(), rtol=rtol, atol=atol):
            hint = "the logits are F.linear(hidden_states, weight) = hidden_states @ weight.T"
            if name == "gpt-oss":
                no_bias = case.args[0].float() @ case.args[1].float().T
                if torch.allclose(logits.detach().double(), no_bias.double(), rtol=rtol, atol=atol):
                    hint = "the router bias is missing: F.linear(hidden_states, weight, bias)"
            row = int(
                (~torch.isclose(logits.detach().double(), ref_logits.double(), rtol=rtol, atol=atol))
                .any(1)
                .nonzero()[0]
            )
            fail(
                ex,
                f"[{case.label}] router_logits of token {row}: {_fmt(logits[row].detach().float())}, "
                f"expected {_fmt(ref_logits[row])}",
                hint,
            )
        _compare(ex, case, ids, weights)
    passed(ex, f"{name} router", len(cases))


def _post_act_cases(kind: str) -> list[_Case]:
    """Llama 4 (sigmoid) and gpt-oss (softmax over k, with a bias): top-k on the logits."""
    cases = []
    for num_tokens, hidden, num_experts, top_k in [(16, 8, 8, 1), (9, 16, 8, 2), (1, 8, 4, 4), (24, 12, 16, 4)]:
        x, w = _router_inputs(num_tokens, hidden, num_experts)
        bias = torch.randn(num_experts)
        logits32 = x @ w.T + (bias if kind == "gpt-oss" else 0)
        label = f"T={num_tokens}, H={hidden}, E={num_experts}, top_k={top_k}"
        use_sigmoid = kind == "llama4"
        ids_true = logits32.topk(top_k, dim=-1).indices

        def weights(ids, logits32=logits32, use_sigmoid=use_sigmoid, pre_act=False, renorm=False):
            return _topk_weights_for(logits32, ids, use_sigmoid, renorm, pre_act)

        mistakes = {}
        if use_sigmoid:
            if top_k == 1:
                mistakes[
                    "every weight is 1.0: with top_k=1 a renormalization (or a softmax over the one chosen logit) "
                    "always gives 1; Llama 4 keeps the plain sigmoid score of its expert"
                ] = lambda ids=ids_true: (ids, torch.ones(ids.shape))
            else:
                mistakes["the weights are renormalized; Llama 4 keeps the k sigmoid scores as they are"] = (
                    lambda ids=ids_true, f=weights: (ids, f(ids, renorm=True))
                )
            mistakes["softmax instead of sigmoid: Llama 4 scores each expert with a sigmoid"] = (
                lambda ids=ids_true, lg=logits32: (ids, _topk_weights_for(lg, ids, False, False, False))
            )
            mistakes["softmax over all E experts; Llama 4 takes a sigmoid of the k chosen logits"] = (
                lambda ids=ids_true, lg=logits32: (ids, _topk_weights_for(lg, ids, False, False, True))
            )
        else:
            no_bias = x @ w.T
            ids_nb = no_bias.topk(top_k, dim=-1).indices
            mistakes["the router bias is missing from the logits"] = lambda ids=ids_nb, lg=no_bias: (
                ids,
                _topk_weights_for(lg, ids, False, False, False),
            )
            mistakes[
                "softmax over all E experts (pre_act); gpt-oss takes the top-k logits, then softmax over those k"
            ] = lambda ids=ids_true, f=weights: (ids, f(ids, pre_act=True))
            mistakes["sigmoid instead of softmax over the k chosen logits"] = lambda ids=ids_true, lg=logits32: (
                ids,
                _topk_weights_for(lg, ids, True, False, False),
            )
        args = (x, w, top_k) if kind == "llama4" else (x, w, bias, top_k)
        cases.append(_Case(label, args, torch.float32, num_experts, top_k, logits32, weights, mistakes))
    return cases


def check_qwen3_moe_router(fn) -> None:
    """``fn(hidden_states, weight, top_k, norm_topk_prob) -> (logits, weights, ids)``."""
    cases = []
    for num_tokens, hidden, num_experts, top_k, norm in [
        (16, 8, 8, 2, True),
        (16, 8, 8, 2, False),
        (1, 16, 4, 1, True),
        (21, 12, 16, 4, False),
        (7, 8, 6, 6, True),
    ]:
        x, w = _router_inputs(num_tokens, hidden, num_experts)
        logits32 = x @ w.T
        ids_true = logits32.topk(top_k, dim=-1).indices

        def weights(ids, lg=logits32, norm=norm):
            return _topk_weights_for(lg, ids, False, norm, True)

        mistakes = {
            (
                "norm_topk_prob=True but the weights are not renormalized"
                if norm
                else "the weights are renormalized although norm_topk_prob=False"
            ): lambda ids=ids_true, lg=logits32, norm=norm: (ids, _topk_weights_for(lg, ids, False, not norm, True)),
            "sigmoid instead of softmax: Qwen3-MoE's router is a softmax over all experts": (
                lambda ids=ids_true, lg=logits32, norm=norm: (ids, _topk_weights_for(lg, ids, True, norm, True))
            ),
        }
        if not norm:
            mistakes["softmax over only the k chosen logits (post_act); Qwen3 takes softmax over all E, then top-k"] = (
                lambda ids=ids_true, lg=logits32: (ids, _topk_weights_for(lg, ids, False, False, False))
            )
        label = f"T={num_tokens}, H={hidden}, E={num_experts}, top_k={top_k}, norm_topk_prob={norm}"
        cases.append(_Case(label, (x, w, top_k, norm), torch.float32, num_experts, top_k, logits32, weights, mistakes))
    _check_router("01.2", "Qwen3-MoE", fn, cases, lambda x, w, *_: x @ w.T)


def check_llama4_router(fn) -> None:
    """``fn(hidden_states, weight, top_k) -> (logits, weights, ids)``."""
    _check_router("01.3", "Llama 4", fn, _post_act_cases("llama4"), lambda x, w, *_: x @ w.T)


def check_gpt_oss_router(fn) -> None:
    """``fn(hidden_states, weight, bias, top_k) -> (logits, weights, ids)``."""
    _check_router("01.4", "gpt-oss", fn, _post_act_cases("gpt-oss"), lambda x, w, b, *_: x @ w.T + b)


def _group_limited(choice: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """``choice`` with -inf outside each token's best groups."""
    return choice.masked_fill(~group_limited_mask(choice, n_group, topk_group), float("-inf"))


def _deepseek_case(num_tokens, hidden, num_experts, top_k, n_group, topk_group, norm, scale) -> _Case:
    x, w = _router_inputs(num_tokens, hidden, num_experts)
    # A bias as large as the scores themselves, so it really changes who gets picked.
    bias = torch.randn(num_experts) * 0.3
    logits32 = x @ w.T
    scores = torch.sigmoid(logits32)
    biased = scores + bias
    key = _group_limited(biased, n_group, topk_group)

    def weights(ids, scores=scores, norm=norm, scale=scale):
        wts = scores.gather(1, ids)
        if norm:
            wts = wts / (wts.sum(dim=-1, keepdim=True) + 1e-20)
        return wts * scale

    def variant(ids_from, weights_from, norm=norm, scale=scale):
        def produce():
            ids = ids_from.topk(top_k, dim=-1).indices
            wts = weights_from.gather(1, ids)
            if norm:
                wts = wts / wts.sum(dim=-1, keepdim=True)
            return ids, wts * scale

        return produce

    mistakes = {
        "the weights include e_score_correction_bias; the bias only chooses the experts, the weights are the "
        "plain sigmoid scores": variant(key, biased),
        "the experts are chosen without e_score_correction_bias (add it to the scores before the top-k)": variant(
            _group_limited(scores, n_group, topk_group), scores
        ),
        "routed_scaling_factor is missing: multiply the final weights by it": variant(key, scores, scale=1.0),
        "softmax instead of sigmoid: DeepSeek-V3 scores each expert with a sigmoid": variant(
            _group_limited(torch.softmax(logits32, dim=-1) + bias, n_group, topk_group),
            torch.softmax(logits32, dim=-1),
        ),
    }
    if topk_group < n_group:
        mistakes["the group limit is missing: only experts of the topk_group best groups may be chosen"] = variant(
            biased, scores
        )
    if norm:
        mistakes["norm_topk_prob=True but the weights are not renormalized before the scaling"] = variant(
            key, scores, norm=False
        )
    else:
        mistakes["the weights are renormalized although norm_topk_prob=False"] = variant(key, scores, norm=True)
    label = (
        f"T={num_tokens}, E={num_experts}, top_k={top_k}, n_group={n_group}, topk_group={topk_group}, "
        f"norm_topk_prob={norm}, routed_scaling_factor={scale}"
    )
    args = (x, w, bias, top_k, n_group, topk_group, norm, scale)
    return _Case(label, args, torch.float32, num_experts, top_k, key, weights, mistakes)


def check_deepseek_v3_router(fn) -> None:
    """``fn(hidden_states, weight, e_score_correction_bias, top_k, n_group, topk_group,
    norm_topk_prob, routed_scaling_factor) -> (logits, weights, ids)``."""
    cases = [
        _deepseek_case(32, 16, 16, 4, 4, 2, True, 2.5),
        _deepseek_case(32, 8, 16, 3, 4, 1, False, 1.0),
        _deepseek_case(17, 8, 12, 4, 3, 2, False, 2.5),
        _deepseek_case(9, 8, 8, 2, 1, 1, True, 1.5),
        _deepseek_case(1, 8, 8, 1, 2, 1, True, 1.0),
    ]
    _check_router("01.5", "DeepSeek-V3", fn, cases, lambda x, w, *_: x.float() @ w.float().T)
