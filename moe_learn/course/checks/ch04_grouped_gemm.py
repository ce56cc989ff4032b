"""Checks for chapter 04: the naive grouped GEMM and the whole SwiGLU MoE forward.

The expected values come from plain dense math (float64 einsums over every expert),
not from the package's own grouped GEMM, so a check and the reference cannot share a bug.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_learn.course.checks._core import (
    call_learner,
    call_with_hint,
    expect_tensor,
    fail,
    first_mismatch,
    matching_mistake,
    passed,
)
from moe_learn.course.exercises import Exercise

NOTEBOOK = "04_naive_grouped_gemm.ipynb"

EXERCISES = [
    Exercise(
        id="04.1",
        notebook=NOTEBOOK,
        title="torch_grouped_gemm: one matmul per expert over its block of rows",
        hints=(
            "Walk the experts in order with a running row offset: expert e owns rows "
            "start .. start + m_sizes[e] - 1, and the next expert starts where it ends.",
            "With transpose=True W[e] is [N, K] (nn.Linear layout), so Y_e = X_e @ W[e].T; "
            "with transpose=False W[e] is already [K, N].",
            "Allocate Y = X.new_empty(M, N); for e, m in enumerate(m_sizes.tolist()): "
            "Y[start:start+m] = X[start:start+m] @ (W[e].T if transpose else W[e]); start += m",
        ),
    ),
    Exercise(
        id="04.2",
        notebook=NOTEBOOK,
        title="moe_forward: router -> top-k -> permute -> SwiGLU experts -> unpermute -> combine",
        hints=(
            "Routing: logits = hidden_states @ router_weight.T, then calculate_topk(logits, top_k, "
            "use_sigmoid=False, renormalize=renormalize); then get_routing_indices(topk_ids, E).",
            "Experts: x = permute(...); h = torch_grouped_gemm(x, gate_up_proj, counts) is [T*k, 2I]; "
            "gate, up = h.chunk(2, dim=-1) (gate first!); act = F.silu(gate) * up; "
            "y = torch_grouped_gemm(act, down_proj, counts).",
            "Back to tokens: combine(unpermute(y, gather_indices), topk_weights) -> [T, H].",
        ),
    ),
]


# ---------------------------------------------------------------- 04.1 grouped GEMM


def _gemm_cases() -> list[tuple[str, list[int], int, int, bool]]:
    """(description, m_sizes, K, N, transpose); the first is square so an un-transposed W does not crash."""
    E = int(torch.randint(3, 7, ()))
    ragged = torch.randint(0, 6, (E,)).tolist()
    return [
        ("4 experts, ragged rows, W square [4, 8, 8]", [3, 1, 4, 2], 8, 8, True),
        ("expert 1 gets no rows", [2, 0, 3, 2], 8, 8, True),
        ("non-square W [E, N=5, K=7]", [2, 3, 1], 7, 5, True),
        ("transpose=False, W [E, K=7, N=5]", [3, 1, 2], 7, 5, False),
        ("transpose=False, square W", [2, 2, 3], 6, 6, False),
        ("first and last experts get no rows", [0, 3, 2, 0], 6, 4, True),
        ("all rows to one expert", [0, 0, 7, 0], 5, 6, True),
        ("a single expert", [6], 4, 3, True),
        (f"{E} experts, random sizes {ragged}", ragged, 8, 6, True),
        ("no rows at all", [0, 0, 0], 4, 5, True),
    ]


def _block_diagnosis(X, W, m_sizes, e, start, got_blk, transpose, rtol, atol) -> str | None:
    """Compare expert e's block of the learner's output with the usual wrong answers."""
    m = m_sizes[e]
    X64, W64, got64 = X.double(), W.double(), got_blk.double()

    def same(candidate):
        return candidate.shape == got64.shape and torch.allclose(got64, candidate, rtol=rtol, atol=atol)

    def weight(j, flip=False):
        return W64[j].T if transpose != flip else W64[j]

    if not torch.isfinite(got64).all() or (got64 == 0).all():
        return f"the rows of expert {e} were never written: does your loop reach every expert (range(E), not E - 1)?"
    X_e = X64[start : start + m]
    if W.shape[1] == W.shape[2] and same(X_e @ weight(e, flip=True)):
        if transpose:
            return "W was not transposed: with transpose=True W[e] is [N, K] (nn.Linear layout), use X_e @ W[e].T"
        return "W was transposed although transpose=False: W[e] is already [K, N], use X_e @ W[e]"
    for lo in range(X.shape[0] - m + 1):
        if lo != start and same(X64[lo : lo + m] @ weight(e)):
            return (
                f"wrong row offset: expert {e} starts at row {start} (the sum of m_sizes[:{e}]), "
                f"but you read its rows from row {lo}"
            )
    for j in range(W.shape[0]):
        if j != e and same(X_e @ weight(j)):
            return f"expert {e}'s rows were multiplied by W[{j}]: skipping empty experts must not shift the index"
    return None


def check_grouped_gemm(fn) -> None:
    """``fn(X, W, m_sizes, transpose)`` must return the per-expert products stacked in row order."""
    ex = "04.1"
    cases = _gemm_cases()
    for what, sizes, K, N, transpose in cases:
        layout = (
            "with transpose=True W[e] is [N, K] (nn.Linear layout): use X_e @ W[e].T"
            if transpose
            else "with transpose=False W[e] is already [K, N]: use X_e @ W[e], no .T"
        )
        crash_hints = [
            ("cannot be multiplied", layout),
            ("size mismatch", layout),
            ("doesn't match the broadcast shape", "the row slice of expert e must have m_sizes[e] rows"),
        ]
        E, M = len(sizes), sum(sizes)
        X = torch.randn(M, K)
        W = torch.randn(E, N, K) if transpose else torch.randn(E, K, N)
        m_sizes = torch.tensor(sizes, dtype=torch.int32)
        got = call_with_hint(ex, fn, crash_hints, X, W, m_sizes, transpose)
        expect_tensor(ex, f"output ({what})", got, (M, N), X.dtype)
        rtol, atol = 1e-4, 1e-4
        start = 0
        for e, m in enumerate(sizes):
            W_e = W[e].double().T if transpose else W[e].double()
            ref = X[start : start + m].double() @ W_e
            blk = got[start : start + m]
            mismatch = first_mismatch(blk, ref, rtol, atol)
            if mismatch is not None:
                r, c = mismatch
                msg = (
                    f"on {what} (m_sizes={sizes}, transpose={transpose}): expert {e} owns rows "
                    f"{start}..{start + m - 1}; row {start + r}, column {c}: expected {ref[r, c]:.4f}, "
                    f"got {float(blk[r, c]):.4f}"
                )
                fail(ex, msg, _block_diagnosis(X, W, sizes, e, start, blk, transpose, rtol, atol))
            start += m
    passed(ex, "torch_grouped_gemm", len(cases))


# ---------------------------------------------------------------- 04.2 MoE forward


def dense_moe(
    hidden, router_weight, gate_up_proj, down_proj, top_k, renormalize, *, swap_gate_up=False, use_weights=True,
    scale_input=False, sigmoid=False, force_renormalize=None,
):
    """Every expert on every token in float64, then pick each token's top-k; wrong-answer switches."""
    h, rw, gu, dp = (t.double() for t in (hidden, router_weight, gate_up_proj, down_proj))
    probs = torch.sigmoid(h @ rw.T) if sigmoid else torch.softmax(h @ rw.T, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    renorm = renormalize if force_renormalize is None else force_renormalize
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if not use_weights:
        weights = torch.ones_like(weights)
    inter = gu.shape[1] // 2
    # x_tk: the input of token t for its k-th expert (scaled first in the "weights too early" mistake).
    x = h[:, None, :].expand(-1, top_k, -1)
    if scale_input:
        x = x * weights[..., None]
    proj = torch.einsum("tkh,tkih->tki", x, gu[ids])
    gate, up = proj[..., :inter], proj[..., inter:]
    if swap_gate_up:
        gate, up = up, gate
    y = torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, dp[ids])
    if not scale_input:
        y = y * weights[..., None]
    return y.sum(dim=1), ids, weights


def _moe_cases():
    """(description, T, I, E, top_k, renormalize, router): router None is random routing."""
    return [
        ("8 tokens, 4 experts, top-2, renormalize", 8, 6, 4, 2, True, None),
        ("top-2 without renormalize", 8, 6, 4, 2, False, None),
        ("top-1 routing", 7, 5, 4, 1, False, None),
        ("one token", 1, 6, 5, 2, True, None),
        ("experts 1 and 4 get no tokens", 10, 4, 6, 2, True, "avoid 1 and 4"),
        ("all tokens to experts 0 and 1", 6, 4, 6, 2, True, "ordered"),
        ("16 tokens, 8 experts, top-4", 16, 6, 8, 4, True, None),
        ("zero tokens", 0, 4, 4, 2, True, None),
    ]


def _router_inputs(T: int, H: int, E: int, router: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [T, H] and router_weight [E, H] that produce the routing a case asks for."""
    if router is None:
        return torch.randn(T, H), torch.randn(E, H) * 0.5
    hidden = torch.randn(T, H).abs() + 0.1  # every token has a positive sum
    if router == "ordered":
        # row e = -0.3 e * ones: logits fall with e for every token, so experts 0, 1, ... win
        return hidden, -0.3 * torch.arange(E, dtype=torch.float32)[:, None] * torch.ones(E, H)
    router_weight = torch.randn(E, H) * 0.5
    router_weight[[1, 4]] = -5.0  # "avoid 1 and 4": their logits sit far below the rest
    return hidden, router_weight


def check_moe_forward(fn) -> None:
    """``fn(hidden [T, H], router_weight [E, H], gate_up_proj [E, 2I, H], down_proj [E, H, I], top_k,
    renormalize)`` must return the MoE MLP output ``[T, H]``."""
    ex = "04.2"
    cases = _moe_cases()
    H = 8
    for what, T, inter, E, k, renorm, router in cases:
        hidden, router_weight = _router_inputs(T, H, E, router)
        gate_up_proj = torch.randn(E, 2 * inter, H) / H**0.5
        down_proj = torch.randn(E, H, inter) / inter**0.5
        got = call_learner(ex, fn, hidden, router_weight, gate_up_proj, down_proj, k, renorm)
        expect_tensor(ex, f"MoE output ({what})", got, (T, H), hidden.dtype)
        ref, ids, weights = dense_moe(hidden, router_weight, gate_up_proj, down_proj, k, renorm)
        rtol, atol = 1e-4, 1e-5
        mismatch = first_mismatch(got, ref, rtol, atol)
        if mismatch is None:
            continue
        t, c = mismatch
        msg = (
            f"on {what} (top_k={k}, renormalize={renorm}): token {t}, column {c}: expected {ref[t, c]:.5f}, "
            f"got {float(got[t, c]):.5f}; token {t} goes to experts {ids[t].tolist()} "
            f"with weights {[round(w, 4) for w in weights[t].tolist()]}"
        )
        args = (hidden, router_weight, gate_up_proj, down_proj, k, renorm)
        wrong = {
            "gate and up are swapped: gate_up_proj's first I rows are the gate (SiLU), the last I rows are up": {
                "swap_gate_up": True
            },
            "the routing weights were never applied: multiply each expert's output by its topk_weight": {
                "use_weights": False
            },
            "the routing weights scaled the expert INPUT; SwiGLU is not linear, so scale the expert output": {
                "scale_input": True
            },
            "the router used sigmoid; Qwen3 and Mixtral use softmax over all experts (use_sigmoid=False)": {
                "sigmoid": True
            },
            f"renormalize={renorm} was ignored: pass it on to calculate_topk": {"force_renormalize": not renorm},
        }
        mistakes = ((name, dense_moe(*args, **switch)[0]) for name, switch in wrong.items())
        fail(ex, msg, matching_mistake(got, mistakes, rtol, atol))
    passed(ex, "MoE forward", len(cases))
