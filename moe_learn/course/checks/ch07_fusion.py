"""Checks for chapter 07: the grouped GEMM with a gather prologue and a scatter epilogue."""

from __future__ import annotations

import itertools
import random

import torch
import torch.nn.functional as F

from moe_learn.course.checks._core import call_learner, expect_tensor, passed
from moe_learn.course.checks._kernels import (
    GEMM_BLOCKS,
    POISON,
    ExpertRows,
    Mistake,
    check_no_stray_writes,
    explain_rows,
    grouped_gemm_args,
    guarded_input,
    guarded_output,
    launch,
    never_written,
    require_kernel,
)
from moe_learn.course.exercises import Exercise
from moe_learn.device import DEVICE
from moe_learn.ops.moe import moe_experts_torch
from moe_learn.ops.routing import get_routing_indices

NOTEBOOK = "07_fusion.ipynb"

EXERCISES = [
    Exercise(
        id="07.1",
        notebook=NOTEBOOK,
        title="fused grouped GEMM: gather X rows in the prologue, scatter Y rows (with weights) in the epilogue",
        hints=(
            "Start from your chapter-06 kernel; only the row indices of the loads and of the store change. "
            "Load flat = tl.load(gather_ptr + rows, mask=mask_m, other=0) once per tile.",
            "PERMUTE_X: the X rows to read are flat // TOP_K (each token appears TOP_K times). "
            "PERMUTE_Y: the output rows to write are flat itself.",
            "HAS_WEIGHTS: scale the fp32 accumulator by tl.load(topk_weights_ptr + flat, mask=mask_m)[:, None] "
            "before the store. Use `if PERMUTE_X:` etc.: they are constexprs, so the unused code is not compiled.",
        ),
    ),
    Exercise(
        id="07.2",
        notebook=NOTEBOOK,
        title="the fused MoE forward: routing indices, two fused grouped GEMMs, SwiGLU, a sum over slots",
        hints=(
            "counts, gather_indices = get_routing_indices(topk_ids, E); nothing is permuted by hand.",
            "GEMM1: grouped_gemm(hidden_states, gate_up_proj, counts, gather_indices=..., topk=k, permute_x=True), "
            "then swiglu. GEMM2: grouped_gemm(h, down_proj, counts, gather_indices=..., permute_y=True, "
            "topk_weights=...).",
            "GEMM2's output is in (token, slot) order and already weighted: .view(T, k, H).sum(dim=1).",
        ),
    ),
]

def run_fused_kernel(
    kernel, X, W, m_sizes, gather_indices, topk_weights, out, *, topk, permute_x, permute_y,
    BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, NUM_PROGRAMS=3,
):  # fmt: skip
    """Launch a chapter-07 kernel (the chapter-06 signature plus gather/weights pointers and four constexprs)."""
    weights = topk_weights.reshape(-1) if topk_weights is not None else gather_indices
    kernel[(NUM_PROGRAMS,)](
        X, W, out, m_sizes, gather_indices, weights, *grouped_gemm_args(X, W, out),
        TOP_K=topk, PERMUTE_X=permute_x, PERMUTE_Y=permute_y, HAS_WEIGHTS=topk_weights is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, NUM_PROGRAMS=NUM_PROGRAMS,
    )  # fmt: skip
    return out


def _fused_reference(
    X_store, K, W, m_list, gather, topk, permute_x, permute_y, weights, x_mode="token", y_mode="gather", w_mode="gather"
):
    """float64 output of the fused GEMM, or of one of its plausible mistakes (the *_mode arguments)."""
    M = sum(m_list)
    idx = torch.arange(M)
    expert_of = torch.repeat_interleave(torch.arange(len(m_list)), torch.tensor(m_list, dtype=torch.long))
    rows = {"token": gather // topk, "flat": gather, "row": idx}[x_mode] if permute_x else idx
    Y = torch.einsum("mk,mnk->mn", X_store[rows, :K], W[expert_of])
    if weights is not None and w_mode != "none":
        Y = Y * weights.reshape(-1)[{"gather": gather, "row": idx}[w_mode]][:, None]
    if permute_y and y_mode == "gather":
        out = torch.empty_like(Y)
        out[gather] = Y
        return out
    return Y


_SAYS = {
    ("x", "flat"): (
        "multiplied token row gather_indices[i] instead of gather_indices[i] // TOP_K",
        "gather_indices holds flat (token, slot) indices: the token is gather_indices[i] // TOP_K",
    ),
    ("x", "row"): (
        "read X in expert order (row i) although X is in token order",
        "with PERMUTE_X, row i of a tile reads X[gather_indices[i] // TOP_K], not X[i]",
    ),
    ("y", "none"): (
        "hold(s) results in expert order: rows were stored at i, not at gather_indices[i]",
        "with PERMUTE_Y, store row i of the tile at out[gather_indices[i]] (the epilogue scatter)",
    ),
    ("w", "none"): (
        "lack(s) the routing weight",
        "with HAS_WEIGHTS, multiply the accumulator by topk_weights[gather_indices[i]] before storing",
    ),
    ("w", "row"): (
        "get(s) scaled by another (token, slot)'s weight: topk_weights[i] instead of topk_weights[gather_indices[i]]",
        "topk_weights is in flat (token, slot) order: index it with gather_indices[i], not with the expert-order row i",
    ),
}


def _fused_cases(rng: random.Random):
    # (what, T, E, topk, K, N, permute_x, permute_y, weights, skew)
    cases = [
        ("plain (no flags): chapter 06's kernel", 10, 4, 1, 24, 40, False, False, False, None),
        ("PERMUTE_X, TOP_K=1", 11, 4, 1, 24, 40, True, False, False, None),
        ("PERMUTE_X, TOP_K=2", 9, 5, 2, 24, 40, True, False, False, None),
        ("PERMUTE_Y, TOP_K=2", 9, 5, 2, 24, 40, False, True, False, None),
        ("PERMUTE_Y with routing weights, TOP_K=2", 9, 5, 2, 24, 40, False, True, True, None),
        ("PERMUTE_X and PERMUTE_Y with weights, TOP_K=3, ragged K and N", 7, 6, 3, 40, 36, True, True, True, None),
        ("all tokens to expert 1, both fusions, TOP_K=1", 13, 4, 1, 32, 32, True, True, True, 1),
    ]
    T, E, k = rng.randint(3, 12), rng.randint(2, 6), rng.randint(1, 2)
    cases.append(
        (
            f"random T={T}, E={E}, TOP_K={k}, both fusions",
            T,
            E,
            k,
            rng.randint(17, 48),
            rng.randint(17, 64),
            True,
            True,
            True,
            None,
        )
    )
    return cases


def check_fused_kernel(kernel) -> None:
    """Run the learner's fused ``@triton.jit`` kernel (signature: see ``run_fused_kernel``)."""
    ex = "07.1"
    require_kernel(kernel, "fused grouped GEMM kernel", "check_fused_kernel")
    rng = random.Random(7071)
    gen = torch.Generator().manual_seed(7071)
    bm, bn, bk = GEMM_BLOCKS["BLOCK_M"], GEMM_BLOCKS["BLOCK_N"], GEMM_BLOCKS["BLOCK_K"]
    cases = _fused_cases(rng)
    for what, T, E, topk, K, N, px, py, with_w, skew in cases:
        scores = torch.rand(T, E, generator=gen)
        if skew is not None:
            scores[:, skew] += 10
        ids = scores.topk(topk, dim=1).indices
        counts, gather = get_routing_indices(ids, E)
        m_list = counts.tolist()
        M = T * topk
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        x_rows = T if px else M
        # X's buffer holds M finite rows (X is its first x_rows): a read of X[flat] for flat >= T computes a
        # known wrong result instead of NaN; the pad puts guard cells past each row (the K tail) and past row M.
        X_store = guarded_input(torch.randn(M, K).to(DEVICE), pad=(bm, bk))
        X = X_store.view[:x_rows]
        W = guarded_input(torch.randn(E, N, K).to(DEVICE), pad=(1, bn, bk))
        weights = (torch.rand(T, topk) + 0.5).to(DEVICE) if with_w else None
        case = f"case '{what}', K={K}, N={N}"

        def run(poison, X=X, W=W, counts=counts, gather=gather, weights=weights, M=M, N=N, topk=topk, px=px, py=py,
                case=case):  # fmt: skip
            out = guarded_output((M, N), pad=(bm, bn), poison=poison)
            launch(
                ex,
                case,
                lambda: run_fused_kernel(
                    kernel, X, W.view, counts.to(DEVICE), gather.to(DEVICE), weights, out.view,
                    topk=topk, permute_x=px, permute_y=py, NUM_PROGRAMS=3, **GEMM_BLOCKS,
                ),  # fmt: skip
            )
            return out

        out = run(POISON)
        check_no_stray_writes(ex, out, case)
        Xs64, W64 = X_store.view.double().cpu(), W.view.double().cpu()
        w64 = weights.double().cpu() if weights is not None else None
        g = gather.long()
        want = _fused_reference(Xs64, K, W64, m_list, g, topk, px, py, w64)

        # Every combination of the plausible mistakes that applies to this case.
        options = [
            [("x", "token")] + ([("x", "flat")] if px and topk > 1 else []) + ([("x", "row")] if px else []),
            [("y", "gather")] + ([("y", "none")] if py else []),
            [("w", "gather")] + ([("w", "none"), ("w", "row")] if with_w else []),
        ]
        mistakes = []
        for combo in itertools.product(*options):
            wrong = [c for c in combo if c not in (("x", "token"), ("y", "gather"), ("w", "gather"))]
            if not wrong:
                continue
            modes = {f"{k}_mode": v for k, v in combo}
            output = _fused_reference(Xs64, K, W64, m_list, g, topk, px, py, w64, **modes)
            says = " and ".join(_SAYS[c][0] for c in wrong)
            hint = "; ".join(_SAYS[c][1] for c in wrong)
            mistakes.append(Mistake(output, says, hint))
        mistakes.sort(key=lambda m: m.says.count(" and "))  # single mistakes first

        if py:

            def describe(r0, r1, topk=topk):
                if r0 == r1:
                    return f"row {r0} (token {r0 // topk}, slot {r0 % topk})"
                tokens = f"token {r0 // topk}" if r0 // topk == r1 // topk else f"tokens {r0 // topk}-{r1 // topk}"
                return f"rows {r0}-{r1} ({tokens})"

            def group(r):
                return 0

            def unwritten_hint(r):
                return (
                    "with PERMUTE_Y each expert-order row i is stored at out[gather_indices[i]]; every (token, slot) "
                    "row appears once in gather_indices, so an unwritten row means a store went elsewhere "
                    "(or a tile was skipped)"
                )
        else:
            rows = ExpertRows(m_list)
            describe, group = rows.describe, rows.expert

            def unwritten_hint(r):
                return (
                    "these tiles were never computed: keep chapter 06's walk (all experts in order, tiles "
                    "tile_id % NUM_PROGRAMS == pid, cdiv(m_size, BLOCK_M) row blocks)"
                )

        if K % bk:
            read_outside = "K is not a multiple of BLOCK_K: mask the last K step (offs_k < K - k0, other=0.0)"
        else:
            read_outside = (
                "mask every load: X with mask_m (and the K tail), W with offs_n < N, other=0.0; and check the X rows "
                "(flat // TOP_K with PERMUTE_X, else row_start + offs_m)"
            )
        explain_rows(
            ex,
            out.view,
            want,
            case=case,
            describe=describe,
            group=group,
            mistakes=mistakes,
            unwritten_hint=unwritten_hint,
            wrong_hint="check the row indices: loads use X rows (flat // TOP_K with PERMUTE_X, else row_start + "
            "offs_m), the store uses flat with PERMUTE_Y, and the weights are loaded at flat",
            never=never_written(out.view, lambda poison, run=run: run(poison).view),
            inputs="X or W",
            read_outside_hint=read_outside,
            other_row_hint="the store's row index is off: with PERMUTE_Y row i goes to out[gather_indices[i]] "
            "(not gather_indices[i] // TOP_K, not i)",
        )
    passed(ex, "fused grouped GEMM (gather prologue, scatter + weights epilogue)", len(cases))


# ------------------------------------------------------------------------------ 07.2


def _moe_variants(x, ids, w, gu, dp):
    """float64 outputs of plausible mistakes in a fused MoE forward."""
    T, k = ids.shape

    def experts(gate_first=True):
        per_slot = torch.zeros(T, k, x.shape[1], dtype=torch.float64)
        for t in range(T):
            for s in range(k):
                e = int(ids[t, s])
                gate, up = (x[t] @ gu[e].T).chunk(2)
                if not gate_first:
                    gate, up = up, gate
                per_slot[t, s] = (F.silu(gate) * up) @ dp[e].T
        return per_slot

    right, swapped = experts(True), experts(False)
    return [
        Mistake(
            right.sum(1),
            "hold(s) the plain sum over the k experts: the routing weights are missing",
            "pass topk_weights=topk_weights to the second grouped_gemm (with permute_y=True)",
        ),
        Mistake(
            (right * w[..., None]).mean(1),
            "hold(s) the average over the k slots instead of their sum",
            "the weights already scale each slot: .view(T, k, H).sum(dim=1), not .mean",
        ),
        Mistake(
            (right * (w * w)[..., None]).sum(1),
            "hold(s) the routing weights applied twice",
            "grouped_gemm(..., topk_weights=...) already multiplies: don't multiply again",
        ),
        Mistake(
            (swapped * w[..., None]).sum(1),
            "use(s) up_proj as the gate: gate and up are swapped",
            "gate_up_proj's first I rows are the gate: use moe_learn.swiglu (gate, up = h.chunk(2, dim=-1))",
        ),
    ]


def check_fused_moe(fn) -> None:
    """``fn(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj) -> [T, H]``, as moe_experts_torch."""
    ex = "07.2"
    gen = torch.Generator().manual_seed(7072)
    cases = [
        ("two experts per token", 9, 32, 16, 5, 2, None),
        ("top-1 routing", 7, 24, 16, 4, 1, None),
        ("one token", 1, 24, 16, 3, 2, None),
        ("all tokens to expert 2", 8, 24, 16, 4, 2, 2),
        ("three experts per token, H and I not multiples of 16", 6, 40, 20, 6, 3, None),
    ]
    for what, T, H, I, E, k, skew in cases:
        x = torch.randn(T, H, generator=gen)
        gu = torch.randn(E, 2 * I, H, generator=gen) / H**0.5
        dp = torch.randn(E, H, I, generator=gen) / I**0.5
        logits = torch.randn(T, E, generator=gen)
        if skew is not None:
            logits[:, skew] += 20
        w, ids = torch.softmax(logits, -1).topk(k, dim=-1)
        w = w / w.sum(-1, keepdim=True) if k > 1 else w * 0.5 + 0.25  # weights that are not all 1
        args = [t.to(DEVICE) for t in (x, ids, w, gu, dp)]
        got = call_learner(ex, fn, *args)
        expect_tensor(ex, "the output", got, (T, H))
        want = moe_experts_torch(x.double(), ids, w.double(), gu.double(), dp.double())
        explain_rows(
            ex,
            got,
            want,
            case=f"case '{what}', T={T}, H={H}, I={I}, E={E}, k={k}",
            describe=lambda r0, r1: f"token {r0}'s output" if r0 == r1 else f"the outputs of tokens {r0}-{r1}",
            group=lambda r: 0,
            mistakes=_moe_variants(x.double(), ids, w.double(), gu.double(), dp.double()),
            unwritten_hint=lambda r: "the output holds NaN: was a buffer left unwritten?",
            wrong_hint="compare with moe_experts_torch step by step: routing indices, GEMM1 with permute_x, swiglu, "
            "GEMM2 with permute_y and topk_weights, then .view(T, k, H).sum(1)",
            other_row_hint="tokens are mixed up: GEMM2 must scatter (permute_y=True) so rows come back in token order",
        )
    passed(ex, "fused MoE forward matches moe_experts_torch", len(cases))
