"""Checks for chapter 09: the backward of a grouped GEMM.

09.1 the weight gradient ``dW_e = dY_e.T @ X_e`` (a Triton kernel the learner writes);
09.2 the input gradient ``dX`` through the forward kernel, scattered back to token order
and summed over the top-k slots;
09.3 the backward of the SwiGLU with the routing weight folded in (PyTorch): the router's
gradient and d(gate_up), what made training's backward lean.

Expected values come from float64 matmuls per expert written here, never from the
package's kernels, so a check and the reference cannot share a bug.
"""

from __future__ import annotations

import torch

from moe_learn.course.checks._core import call_learner, expect_tensor, fail, passed
from moe_learn.course.checks._kernels import POISON, guarded_input, guarded_output, never_written
from moe_learn.course.exercises import Exercise
from moe_learn.device import DEVICE

NOTEBOOK = "09_backward.ipynb"

EXERCISES = [
    Exercise(
        id="09.1",
        notebook=NOTEBOOK,
        title="The dW kernel: dW_e = dY_e.T @ X_e, one program per (expert, n-tile, k-tile)",
        hints=(
            "Expert e owns the expert-order rows offsets[e] .. offsets[e+1]-1. Start a float32 "
            "accumulator of zeros [BLOCK_N, BLOCK_K] and loop `for m0 in range(row_start, row_end, BLOCK_M)`: "
            "an expert with no rows runs the loop zero times and must still store its zeros.",
            "Inside the loop: offs_m = m0 + tl.arange(0, BLOCK_M), mask_m = offs_m < row_end. With PERMUTE_X "
            "the X rows are tl.load(gather_ptr + offs_m, mask=mask_m, other=0) // TOP_K, else offs_m. "
            "Load x [BLOCK_M, BLOCK_K] and dy [BLOCK_M, BLOCK_N] with other=0.0 under the masks.",
            "acc += tl.dot(tl.trans(dy), x); after the loop store acc.to(dw_ptr.dtype.element_ty) at "
            "dw_ptr + expert * stride_dwe + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk "
            "with mask (offs_n < N)[:, None] & (offs_k < K)[None, :].",
        ),
    ),
    Exercise(
        id="09.2",
        notebook=NOTEBOOK,
        title="dX with the forward kernel: W in the other layout, rows scattered back, summed over top-k",
        hints=(
            "The forward was Y_e = X_e @ W_e.T, so dX_e = dY_e @ W_e: the same grouped GEMM with "
            "transpose=False (W [E, N, K] read as [E, K', N'] with K' = N).",
            "Row i of dY is in expert order; pass gather_indices and permute_y=True so it lands in flat "
            "(token, slot) row gather_indices[i]: the result is [T * topk, K].",
            "A token that went to topk experts got topk gradient rows: "
            "dx.view(T, topk, K).sum(dim=1) is the gradient of the hidden state.",
        ),
    ),
    Exercise(
        id="09.3",
        notebook=NOTEBOOK,
        title="The SwiGLU's backward with the routing weight folded in: the router's gradient and d(gate_up)",
        hints=(
            "gate, up = gate_up.chunk(2, dim=-1); s = silu(gate) * up is the unweighted SwiGLU and h = w * s. "
            "The router's gradient is d_row_weights = (d_h * s).sum(-1): s, not h.",
            "d_h reaches s through the weight: d_s = row_weights[:, None] * d_h. Then d_up = d_s * silu(gate) "
            "and d_gate = d_s * up * silu'(gate), with silu'(x) = sigmoid(x) * (1 + x * (1 - sigmoid(x))).",
            "Return (torch.cat([d_gate, d_up], dim=-1), d_row_weights): gate half first, as in gate_up.",
        ),
    ),
]


def _routing(num_tokens: int, top_k: int, num_experts: int, allowed: list[int] | None = None):
    """Distinct top-k experts per token (from ``allowed``), grouped by a stable sort."""
    pool = torch.tensor(allowed if allowed is not None else list(range(num_experts)))
    ids = torch.stack([pool[torch.randperm(len(pool))[:top_k]] for _ in range(num_tokens)])
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts).to(torch.int32)
    gather = torch.argsort(flat, stable=True).to(torch.int32)
    return counts, gather


# name, T, topk, E, allowed experts (None: all), N, K, permute_x
_DW_CASES = [
    ("ragged rows, expert 3 gets no tokens", 11, 2, 5, [0, 1, 2, 4], 20, 24, True),
    ("expert-ordered X (permute_x=False), experts 0 and 4 empty", 9, 1, 5, [1, 2, 3], 16, 16, False),
    ("one token, top-1", 1, 1, 4, None, 8, 12, True),
    ("all tokens to one expert (70 rows: several row blocks)", 70, 1, 3, [1], 12, 10, True),
    ("N and K not multiples of 16, top-3", 8, 3, 4, None, 33, 17, True),
]


def _expected_dw(X, dY, counts, gather, topk, permute_x, rows_of=None):
    """float64 dW [E, N, K]; ``rows_of(e)`` may hand expert e another expert's row range (diagnosis)."""
    X64 = X.double()
    if permute_x:
        X64 = X64[gather.long() // topk]
    dY64 = dY.double()
    offsets = [0] + torch.cumsum(counts, 0).tolist()
    E = counts.numel()
    out = torch.zeros(E, dY.shape[1], X.shape[1], dtype=torch.float64, device=X.device)
    for e in range(E):
        src = rows_of(e) if rows_of else e
        if 0 <= src < E:
            lo, hi = offsets[src], offsets[src + 1]
            out[e] = dY64[lo:hi].T @ X64[lo:hi]
    return out


def _close(a, b, tol):
    return torch.isfinite(a).all() and torch.allclose(a.double(), b, rtol=tol, atol=tol)


def _shifted_rows(e, got, X, dY, counts, gather, topk, permute_x, tol):
    """'dW[e] uses expert e-1's rows' (or e+1's): the off-by-one in the row offsets, or None."""
    for shift, name in ((-1, "previous"), (1, "next")):
        src = e + shift
        if not (0 <= src < counts.numel()) or not counts[e] or not counts[src]:
            continue
        alt = _expected_dw(X, dY, counts, gather, topk, permute_x, rows_of=lambda j, s=shift: j + s)
        if _close(got[e].double(), alt[e], tol):
            return (
                f"dW[{e}] uses expert {src}'s rows: off-by-one in row offsets (it read the {name} expert's "
                f"block); expert e's rows are offsets[e] .. offsets[e+1]-1 with offsets = [0, cumsum(m_sizes)]"
            )
    return None


def _diagnose_dw(e, got, X, dY, counts, gather, topk, permute_x, tol):
    """The remaining usual mistakes, in the learner's terms."""
    g = got.double()
    if permute_x and topk == 1:
        # Reading X[i] instead of X[gather_indices[i] // topk] multiplies the wrong tokens' rows.
        wrong = _expected_dw(X, dY, counts, gather, topk, False)
        if _close(g[e], wrong[e], tol):
            return "X rows read in expert order: with PERMUTE_X, row i reads X[gather_indices[i] // TOP_K]"
    offsets = [0] + torch.cumsum(counts, 0).tolist()
    for block in (16, 32, 64, 128):
        full = int(counts[e]) // block * block
        if full == int(counts[e]):
            continue
        # Only whole blocks of rows were summed: the ragged tail of the expert went missing.
        lo = offsets[e]
        Xp = X.double()[gather.long() // topk] if permute_x else X.double()
        partial = dY.double()[lo : lo + full].T @ Xp[lo : lo + full]
        if _close(g[e], partial, tol):
            return (
                f"expert {e} has {int(counts[e])} rows but only the first {full} (whole blocks of {block}) were "
                "summed: the last partial block was dropped; loop to row_end and mask it (mask_m, other=0.0)"
            )
    if counts[e] and _close(g[e], torch.zeros_like(g[e]), tol):
        return "the accumulator never got this expert's rows: does the loop run from offsets[e] to offsets[e+1]?"
    return (
        "if only experts whose row count is not a multiple of BLOCK_M are wrong, the last partial block "
        "was dropped or loaded without its mask (other=0.0 keeps rows past the end out of the sum)"
    )


def check_grouped_gemm_dw(fn, dtype: torch.dtype = torch.float32) -> None:
    """``fn(X, dY, m_sizes, gather_indices=..., topk=..., permute_x=..., out=...)`` returns dW ``[E, N, K]``.

    X, dY and ``out`` are guarded buffers (``_kernels.Guarded``, contiguous): NaN lies around X
    and dY, so a read outside them shows; ``out`` arrives filled with NaN, so entries the kernel
    never stores show, and a write outside it is caught.
    """
    ex = "09.1"
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for what, T, topk, E, allowed, N, K, permute_x in _DW_CASES:
        counts, gather = _routing(T, topk, E, allowed)
        counts, gather = counts.to(DEVICE), gather.to(DEVICE)
        # Guard cells for a whole row block read or written past either end.
        X = guarded_input(torch.randn(T if permute_x else T * topk, K, device=DEVICE, dtype=dtype), guard=128 * K)
        dY = guarded_input(torch.randn(T * topk, N, device=DEVICE, dtype=dtype), guard=128 * N)

        def run(poison, X=X, dY=dY, counts=counts, gather=gather, topk=topk, permute_x=permute_x, E=E, N=N, K=K):
            out = guarded_output((E, N, K), dtype, guard=128 * K, poison=poison)
            got = call_learner(
                ex, fn, X.view, dY.view, counts, gather_indices=gather, topk=topk, permute_x=permute_x, out=out.view
            )
            return out, got

        out, got = run(POISON)
        expect_tensor(ex, f"dW ({what})", got, (E, N, K), dtype)
        sizes = counts.tolist()
        where = f"on {what} (m_sizes={sizes})"
        stray = out.stray_writes()
        if stray:
            e, n, k = stray[0]
            spot = "before dW[0][0, 0]" if min(stray[0]) < 0 else f"past the end of dW (as if at dW[{e}][{n}, {k}])"
            fail(
                ex,
                f"{where}: your kernel wrote outside dW: {len(stray)} element(s), the first {spot}",
                "store at dw_ptr + expert * stride_dwe + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk "
                "with mask (offs_n < N)[:, None] & (offs_k < K)[None, :]: the last tile sticks out past N and K",
            )
        X, dY = X.view, dY.view
        ref = _expected_dw(X, dY, counts, gather, topk, permute_x)
        atol = tol * ref.abs().max().clamp_min(1).item()
        g = got.double()
        if torch.isnan(g).any():  # 1. entries never stored, or NaN read from outside X or dY
            never = never_written(got, lambda poison, run=run: run(poison)[1])
            e, n, k = (int(v) for v in (never if never.any() else torch.isnan(g)).nonzero()[0])
            if never.any():
                fail(
                    ex,
                    f"{where}: dW[{e}][{n}, {k}] was never written (still NaN)",
                    "every program stores its whole tile, masked only by offs_n < N and offs_k < K; an expert "
                    "with no rows still stores its zeros",
                )
            fail(
                ex,
                f"{where}: dW[{e}][{n}, {k}] is NaN although X and dY hold none: your kernel read outside them",
                "mask both loads, other=0.0: rows with offs_m < row_end (the last row block of an expert is "
                "partly full), X columns with offs_k < K, dY columns with offs_n < N",
            )
        wrong = [e for e in range(E) if not torch.allclose(g[e], ref[e], rtol=tol, atol=atol)]
        if not wrong:
            continue
        for e in wrong:  # 2. an expert reading its neighbour's rows explains several failures at once
            shifted = _shifted_rows(e, got, X, dY, counts, gather, topk, permute_x, atol)
            if shifted:
                fail(ex, f"{where}: dW[{e}] does not match dY_{e}.T @ X_{e}", shifted)
        for e in wrong:  # 3. an empty expert with a non-zero gradient
            if sizes[e] == 0:
                fail(ex, f"{where}: dW of expert {e} is not zero though it got no tokens "
                         f"(max |dW[{e}]| = {g[e].abs().max():.3g})",
                     "start the accumulator at zeros and loop over rows offsets[e] .. offsets[e+1]-1 only: "
                     "an empty expert runs the loop zero times")
        e = wrong[0]
        bad = (~torch.isclose(g[e], ref[e], rtol=tol, atol=atol)).nonzero()[0]
        n, k = int(bad[0]), int(bad[1])
        fail(ex, f"{where}: dW[{e}][{n}, {k}] = {float(g[e, n, k]):.4f}, expected {float(ref[e, n, k]):.4f}",
             _diagnose_dw(e, got, X, dY, counts, gather, topk, permute_x, atol))
    passed(ex, "grouped GEMM weight gradient", len(_DW_CASES))


# ---------------------------------------------------------------- 09.2 dX

# name, T, topk, E, allowed, N, K
_DX_CASES = [
    ("top-2, ragged, expert 2 gets no tokens", 7, 2, 4, [0, 1, 3], 12, 20),
    ("top-1", 6, 1, 3, None, 16, 8),
    ("one token, top-3", 1, 3, 4, None, 8, 12),
    ("all tokens to one expert, top-1", 5, 1, 3, [2], 10, 6),
    ("top-2 over 6 experts", 9, 2, 6, None, 24, 16),
]


def _expected_dx_slots(dY, W, counts, gather):
    """float64 [T*k, K]: row gather[i] holds dY[i] @ W[expert of i]."""
    dY64, W64 = dY.double(), W.double()
    out = torch.zeros(dY.shape[0], W.shape[2], dtype=torch.float64, device=dY.device)
    start = 0
    for e, m in enumerate(counts.tolist()):
        out[gather[start : start + m].long()] = dY64[start : start + m] @ W64[e]
        start += m
    return out


def check_grouped_gemm_dx(fn, dtype: torch.dtype = torch.float32) -> None:
    """``fn(dY, W, m_sizes, gather_indices, topk)`` returns dX ``[T, K]`` in token order.

    The forward was ``Y = grouped_gemm(X, W, m_sizes, gather_indices=..., topk=..., permute_x=True)``
    with W ``[E, N, K]``; dY ``[T*topk, N]`` is in expert order.
    """
    ex = "09.2"
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for what, T, topk, E, allowed, N, K in _DX_CASES:
        counts, gather = _routing(T, topk, E, allowed)
        counts, gather = counts.to(DEVICE), gather.to(DEVICE)
        dY = torch.randn(T * topk, N, device=DEVICE, dtype=dtype)
        W = torch.randn(E, N, K, device=DEVICE, dtype=dtype)
        got = call_learner(ex, fn, dY, W, counts, gather, topk)
        slots = _expected_dx_slots(dY, W, counts, gather)
        ref = slots.view(T, topk, K).sum(1)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (T * topk, K) and topk > 1:
            fail(ex, f"on {what}: dX has shape {tuple(got.shape)}, expected {(T, K)}: dX not summed over top-k",
                 "each token has topk gradient rows, one per expert it visited: .view(T, topk, K).sum(dim=1)")
        expect_tensor(ex, f"dX ({what})", got, (T, K), dtype)
        g = got.double()
        scale = ref.abs().max().clamp_min(1).item()
        if torch.isfinite(g).all() and torch.allclose(g, ref, rtol=tol, atol=tol * scale):
            continue
        bad = ~(torch.isclose(g, ref, rtol=tol, atol=tol * scale) & torch.isfinite(g))
        t, k = (int(v) for v in bad.nonzero()[0])
        msg = f"on {what}: dX[{t}, {k}] = {float(g[t, k]):.4f}, expected {float(ref[t, k]):.4f}"
        hint = None
        if topk > 1 and torch.allclose(g, slots.view(T, topk, K)[:, 0], rtol=tol, atol=tol * scale):
            hint = "dX not summed over top-k: only the first slot of each token was kept; sum the topk rows"
        elif topk > 1 and torch.allclose(g, ref / topk, rtol=tol, atol=tol * scale):
            hint = "dX averaged over top-k: the forward used each token topk times, so gradients add (sum, not mean)"
        else:
            expert_order = torch.zeros_like(slots)
            start = 0
            for e, m in enumerate(counts.tolist()):
                expert_order[start : start + m] = dY[start : start + m].double() @ W[e].double()
                start += m
            if torch.allclose(g, expert_order.view(T, topk, K).sum(1), rtol=tol, atol=tol * scale):
                hint = ("rows left in expert order: scatter them back with permute_y=True (row i goes to "
                        "gather_indices[i]) before summing over top-k")
            elif W.shape[1] == W.shape[2]:
                hint = "check the W layout: dX_e = dY_e @ W_e, i.e. transpose=False for W [E, N, K]"
        fail(ex, msg, hint)
    passed(ex, "grouped GEMM input gradient", len(_DX_CASES))


# ---------------------------------------------------------------- 09.3 the weighted SwiGLU's backward

# name, rows, I, how the weights are drawn
_SWIGLU_CASES = [
    ("7 rows, I = 5", 7, 5, "uniform"),
    ("one row", 1, 3, "uniform"),
    ("rows whose weight is 0 (dropped slots)", 6, 4, "some zero"),
    ("large gate values (silu saturates)", 5, 6, "uniform"),
]


def _expected_weighted_swiglu(gate_up, row_weights, d_h):
    """float64 autograd through ``h = w * silu(gate) * up``: (d_gate_up, d_row_weights)."""
    g = gate_up.detach().double().requires_grad_(True)
    w = row_weights.detach().double().requires_grad_(True)
    gate, up = g.chunk(2, dim=-1)
    h = w.unsqueeze(-1) * torch.nn.functional.silu(gate) * up
    return torch.autograd.grad(h, (g, w), d_h.double())


def _diagnose_swiglu(got_dg, got_dw, gate_up, row_weights, d_h, tol):
    """The usual mistakes, each recomputed here and compared with what came back."""
    g, w, d = gate_up.double(), row_weights.double().unsqueeze(-1), d_h.double()
    gate, up = g.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig

    def close(a, b):
        return a is not None and a.shape == b.shape and torch.allclose(a.double(), b, rtol=tol, atol=tol)

    if close(got_dw, (d * w * silu * up).sum(-1)):
        return ("the router's gradient used h = w * silu(gate) * up; it is <d_h, silu(gate) * up>, the "
                "SwiGLU before the weight (h is linear in w)")
    if close(got_dg, torch.cat([d * up * sig * (1 + gate * (1 - sig)), d * silu], dim=-1)):
        return "d(gate_up) misses the routing weight: d_h reaches the SwiGLU as row_weights[:, None] * d_h"
    if close(got_dg, torch.cat([w * d * up * sig, w * d * silu], dim=-1)):
        return ("d_gate used sigmoid(gate) as silu's derivative; silu'(x) = sigmoid(x) * (1 + x * (1 - "
                "sigmoid(x)))")
    if close(got_dg, torch.cat([w * d * silu, w * d * up * sig * (1 + gate * (1 - sig))], dim=-1)):
        return "the halves are swapped: gate_up is [gate | up], so d(gate_up) is [d_gate | d_up]"
    return None


def check_weighted_swiglu_backward(fn, dtype: torch.dtype = torch.float64) -> None:
    """``fn(gate_up [M, 2I], row_weights [M], d_h [M, I])`` returns ``(d_gate_up [M, 2I], d_row_weights [M])``
    for ``h = row_weights[:, None] * silu(gate) * up``, checked against float64 autograd."""
    ex = "09.3"
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for what, rows, inner, weights in _SWIGLU_CASES:
        scale = 8.0 if "large" in what else 2.0
        gate_up = (torch.randn(rows, 2 * inner, device=DEVICE) * scale).to(dtype)
        row_weights = torch.rand(rows, device=DEVICE).to(dtype)
        if weights == "some zero":
            row_weights[::2] = 0
        d_h = torch.randn(rows, inner, device=DEVICE).to(dtype)
        got = call_learner(ex, fn, gate_up.clone(), row_weights.clone(), d_h.clone())
        if not (isinstance(got, tuple | list) and len(got) == 2):
            fail(ex, f"on {what}: return (d_gate_up, d_row_weights), got {type(got).__name__}",
                 "two tensors: the gradient of gate_up [M, 2I] and of the row weights [M]")
        got_dg, got_dw = got
        expect_tensor(ex, f"d_gate_up ({what})", got_dg, (rows, 2 * inner), dtype)
        expect_tensor(ex, f"d_row_weights ({what})", got_dw, (rows,))
        want_dg, want_dw = _expected_weighted_swiglu(gate_up, row_weights, d_h)
        ok_dg = torch.allclose(got_dg.double(), want_dg, rtol=tol, atol=tol)
        ok_dw = torch.allclose(got_dw.double(), want_dw, rtol=tol, atol=tol)
        if ok_dg and ok_dw:
            continue
        hint = _diagnose_swiglu(got_dg, got_dw, gate_up, row_weights, d_h, tol)
        name, got_t, want_t = ("d_row_weights", got_dw, want_dw) if not ok_dw else ("d_gate_up", got_dg, want_dg)
        bad = (~torch.isclose(got_t.double(), want_t, rtol=tol, atol=tol)).nonzero()[0].tolist()
        at = ", ".join(str(i) for i in bad)
        fail(ex, f"on {what}: {name}[{at}] = {float(got_t[tuple(bad)]):.6g}, expected {float(want_t[tuple(bad)]):.6g}",
             hint)
    passed(ex, "weighted SwiGLU backward", len(_SWIGLU_CASES))
