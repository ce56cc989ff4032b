"""Checks for chapter 06: the tile -> expert mapping and the grouped GEMM kernel."""

from __future__ import annotations

import random

import torch

from moe_learn.course.checks._core import call_learner, fail, passed
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

NOTEBOOK = "06_triton_grouped_gemm.ipynb"

EXERCISES = [
    Exercise(
        id="06.1",
        notebook=NOTEBOOK,
        title="locate_tile: which expert, row block and column block a tile id stands for",
        hints=(
            "Walk the experts in order; expert e has cdiv(m_sizes[e], BLOCK_M) * num_n_tiles tiles.",
            "Keep a running count of the tiles before expert e; the tile is in expert e when "
            "tiles_before <= tile_id < tiles_before + tiles_of_e. Empty experts have 0 tiles.",
            "Inside the expert, local = tile_id - tiles_before; tile_m = local // num_n_tiles, "
            "tile_n = local % num_n_tiles. Return None after the last expert.",
        ),
    ),
    Exercise(
        id="06.2",
        notebook=NOTEBOOK,
        title="the grouped GEMM kernel: a persistent walk over the experts' tiles",
        hints=(
            "Loop `for e in range(NUM_EXPERTS)`: load m_size, count its tiles, and run a "
            "`while next_tile < tiles_end` loop over the tiles this program owns "
            "(next_tile starts at pid and grows by NUM_PROGRAMS).",
            "Inside a tile: rows = row_start + offs_m with mask offs_m < m_size; "
            "B[k, n] = W[e, n, k] is w_ptr + e * stride_we + offs_k[:, None] * stride_wk "
            "+ offs_n[None, :] * stride_wn.",
            "Mask every load: rows (offs_m < m_size), columns (offs_n < N) and the K tail (offs_k < K - k0), "
            "with other=0.0; after each expert advance tiles_before and row_start, even when it is empty.",
        ),
    ),
]


# ------------------------------------------------------------------------------ 06.1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _reference_locate(
    tile_id: int, m_sizes: list[int], num_n_tiles: int, block_m: int, *, inclusive=False, floor=False, min_one=False
):
    """The right answer, or (with a flag set) what a known mistake computes."""
    before = 0
    for e, m in enumerate(m_sizes):
        blocks = m // block_m if floor else _cdiv(m, block_m)
        tiles = max(blocks, 1 if min_one else 0) * num_n_tiles
        if tile_id < before + tiles or (inclusive and tile_id == before + tiles):
            local = tile_id - before
            return (e, local // num_n_tiles, local % num_n_tiles)
        before += tiles
    return None


# Known wrong answers to 06.1 and the cause each one names. A cause is named only when that
# mistake reproduces every answer of the learner's on the failing case (one tile can agree by
# chance: m // BLOCK_M and a forgotten num_n_tiles both shift a tile onto a later expert).
LOCATE_MISTAKES = (
    (
        {"inclusive": True},
        "tile_id == tiles_before + tiles_of_e is already the next expert's first tile: "
        "the test is tile_id < tiles_before + tiles_of_e, not <= (an off-by-one)",
    ),
    (
        {"floor": True},
        "an expert with m rows has cdiv(m, BLOCK_M) row blocks: m // BLOCK_M forgets the partial last one",
    ),
    ({"min_one": True}, "an empty expert has no row blocks, hence no tiles: its count is cdiv(0, BLOCK_M) = 0"),
)


def _as_answer(got):
    try:
        return None if got is None else tuple(int(v) for v in got)
    except (TypeError, ValueError):
        return got  # not a tuple of ints: matches no mistake


def _named_mistake(locate_tile, m_sizes: list[int], num_n: int, block_m: int, total: int) -> str | None:
    """The cause of the known mistake that computes exactly what ``locate_tile`` does on this case."""
    try:
        answers = [_as_answer(locate_tile(t, list(m_sizes), num_n, block_m)) for t in range(total + 2)]
    except Exception:
        return None
    for flags, cause in LOCATE_MISTAKES:
        if answers == [_reference_locate(t, m_sizes, num_n, block_m, **flags) for t in range(total + 2)]:
            return cause
    return None


def check_locate_tile(locate_tile) -> None:
    """``locate_tile(tile_id, m_sizes, num_n_tiles, BLOCK_M) -> (expert, tile_m, tile_n) or None``."""
    ex = "06.1"
    rng = random.Random(606)
    cases = [
        ([4, 4, 4], 1, 4, "equal experts"),
        ([5, 0, 9, 1], 2, 4, "an empty expert and ragged sizes"),
        ([0, 0, 7], 1, 4, "empty experts before the only busy one"),
        ([8, 3, 0, 0], 3, 4, "empty experts at the end"),
        ([1], 1, 16, "one token"),
        ([0, 0, 0], 2, 4, "no tokens at all"),
        ([17, 16, 15], 2, 16, "sizes around BLOCK_M"),
    ]
    for _ in range(4):
        cases.append(
            (
                [rng.choice([0, rng.randint(1, 40)]) for _ in range(rng.randint(1, 6))],
                rng.randint(1, 3),
                rng.choice([4, 8, 16]),
                "random sizes",
            )
        )
    checked = 0
    for m_sizes, num_n, block_m, what in cases:
        total = sum(_cdiv(m, block_m) for m in m_sizes) * num_n
        row_start = [sum(m_sizes[:e]) for e in range(len(m_sizes))]
        for tile_id in range(total + 2):
            want = _reference_locate(tile_id, m_sizes, num_n, block_m)
            got = call_learner(ex, locate_tile, tile_id, list(m_sizes), num_n, block_m)
            checked += 1
            setting = f"m_sizes={m_sizes}, num_n_tiles={num_n}, BLOCK_M={block_m} ({what})"
            if want is None:
                if got is not None:
                    fail(
                        ex,
                        f"tile {tile_id} is past the last tile ({total} tiles in all) but you returned {got!r}; "
                        f"expected None. {setting}",
                        _named_mistake(locate_tile, m_sizes, num_n, block_m, total)
                        or "after the last expert there are no more tiles: return None",
                    )
                continue
            if got is None:
                e, tm, tn = want
                fail(
                    ex,
                    f"tile {tile_id} belongs to expert {e} (row block {tm}, column block {tn}) but you returned None. "
                    f"{setting}",
                    _named_mistake(locate_tile, m_sizes, num_n, block_m, total)
                    or "count cdiv(m, BLOCK_M) row blocks per expert (a partly full last block is a tile too)",
                )
            try:
                got_t = tuple(int(v) for v in got)
            except (TypeError, ValueError):
                fail(ex, f"locate_tile returned {got!r}; expected a tuple (expert, tile_m, tile_n) of ints")
            if len(got_t) != 3:
                fail(ex, f"locate_tile returned {got!r}; expected a tuple (expert, tile_m, tile_n) of 3 ints")
            if got_t == want:
                continue
            e, tm, tn = want
            lo, hi = tm * block_m, min((tm + 1) * block_m, m_sizes[e]) - 1
            span = f"row {lo}" if lo == hi else f"rows {lo}-{hi}"
            glob = f"row {row_start[e] + lo}" if lo == hi else f"rows {row_start[e] + lo}-{row_start[e] + hi}"
            rows = f"{span} of expert {e}, expert-order {glob}"
            named = _named_mistake(locate_tile, m_sizes, num_n, block_m, total)
            if got_t[0] != e:
                hint = named or (
                    "the tiles of the experts before this one are miscounted: expert e has "
                    "cdiv(m_sizes[e], BLOCK_M) * num_n_tiles tiles, an empty one none"
                )
                fail(
                    ex,
                    f"tile {tile_id} covers {rows}, column block {tn}, but you said expert {got_t[0]}. {setting}",
                    hint,
                )
            if named:
                hint = named
            elif got_t[1:] == (tn, tm) or (got_t[1] != tm and got_t[2] != tn):
                hint = (
                    "inside an expert tiles go row block by row block: "
                    "tile_m = local // num_n_tiles, tile_n = local % num_n_tiles"
                )
            else:
                hint = (
                    "local = tile_id - (tiles of the experts before); "
                    "then tile_m = local // num_n_tiles, tile_n = local % num_n_tiles"
                )
            fail(
                ex,
                f"tile {tile_id} is expert {e}'s row block {tm}, column block {tn} (covering {rows}), "
                f"but you returned {got_t}. {setting}",
                hint,
            )
    passed(ex, "locate_tile maps every tile id to its expert and block", checked)


# ------------------------------------------------------------------------------ 06.2

def run_grouped_gemm_kernel(kernel, X, W, m_sizes, out, *, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, NUM_PROGRAMS=3):
    """Launch a chapter-06 kernel: ``out[rows of e] = X[rows of e] @ W[e].T``, W ``[E, N, K]``."""
    kernel[(NUM_PROGRAMS,)](
        X, W, out, m_sizes, *grouped_gemm_args(X, W, out),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, NUM_PROGRAMS=NUM_PROGRAMS,
    )  # fmt: skip
    return out


def _kernel_cases(rng: random.Random):
    cases = [
        ("aligned: every size a multiple of its block", [16, 32, 16], 32, 64, 3),
        ("empty experts: m_sizes has zeros", [0, 16, 0, 32, 0], 32, 32, 3),
        ("ragged rows: m_sizes are not multiples of BLOCK_M=16", [5, 19, 1, 9], 32, 32, 3),
        ("K tail: K=40 is not a multiple of BLOCK_K=16", [16, 16], 40, 32, 3),
        ("N edge: N=40 is not a multiple of BLOCK_N=32", [16, 16], 32, 40, 3),
        ("all tokens to one expert", [0, 0, 37, 0], 24, 48, 3),
        ("one program walks every tile (NUM_PROGRAMS=1)", [7, 0, 20], 24, 40, 1),
        ("more programs than tiles (NUM_PROGRAMS=8)", [3, 0, 2], 16, 32, 8),
    ]
    m = [rng.choice([0, rng.randint(1, 30)]) for _ in range(5)]
    cases.append((f"random: m_sizes={m}", m, rng.randint(17, 50), rng.randint(17, 70), 3))
    return cases


def check_grouped_gemm_kernel(kernel) -> None:
    """Run the learner's ``@triton.jit`` kernel (see ``run_grouped_gemm_kernel`` for its signature)."""
    ex = "06.2"
    require_kernel(kernel, "grouped_gemm_kernel", "check_grouped_gemm_kernel")
    rng = random.Random(6062)
    gen = torch.Generator().manual_seed(6062)
    cases = _kernel_cases(rng)
    bm, bn, bk = GEMM_BLOCKS["BLOCK_M"], GEMM_BLOCKS["BLOCK_N"], GEMM_BLOCKS["BLOCK_K"]
    for what, m_list, K, N, programs in cases:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        E, M = len(m_list), sum(m_list)
        m_sizes = torch.tensor(m_list, dtype=torch.int32, device=DEVICE)
        # pad: a read past a row (the K tail) or past the last row lands on guard cells
        X = guarded_input(torch.randn(M, K).to(DEVICE), pad=(bm, bk))
        W = guarded_input(torch.randn(E, N, K).to(DEVICE), pad=(1, bn, bk))
        case = f"case '{what}', K={K}, N={N}"

        def run(poison, X=X, W=W, m_sizes=m_sizes, M=M, N=N, programs=programs, case=case):
            out = guarded_output((M, N), pad=(bm, bn), poison=poison)
            launch(
                ex,
                case,
                lambda: run_grouped_gemm_kernel(
                    kernel, X.view, W.view, m_sizes, out.view, NUM_PROGRAMS=programs, **GEMM_BLOCKS
                ),
            )
            return out

        out = run(POISON)
        check_no_stray_writes(ex, out, case)
        X64, W64 = X.view.double().cpu(), W.view.double().cpu()
        rows = ExpertRows(m_list)
        expert_of = torch.tensor([rows.expert(r) for r in range(M)], dtype=torch.long)
        want = torch.einsum("mk,mnk->mn", X64, W64[expert_of]) if M else torch.empty(0, N, dtype=torch.float64)

        def unwritten_hint(r, rows=rows):
            e = rows.expert(r)
            if (r - rows.starts[e]) >= (rows.m_sizes[e] // bm) * bm:
                return (
                    "the last, partly full row block of the expert was skipped: an expert has cdiv(m_size, BLOCK_M) "
                    "row blocks, not m_size // BLOCK_M"
                )
            return (
                "these tiles were never computed: every program walks all experts in order, counts each one's tiles "
                "(advancing tiles_before and row_start past empty experts too) and computes the tiles with "
                "tile_id % NUM_PROGRAMS == pid"
            )

        mistakes = [
            Mistake(
                torch.einsum("mk,nk->mn", X64, W64[e]),
                f"hold(s) expert {e}'s product (its weight W[{e}] times these rows)",
                "the tile -> expert mapping is off: use W[e] of the expert whose m_sizes[e] gave row_start, "
                "i.e. advance the W pointer together with row_start (w_ptr + e * stride_we)",
            )
            for e in range(E)
        ]
        if K % bk:
            read_outside = (
                "K is not a multiple of BLOCK_K: mask the loads of the last K step with offs_k < K - k0 "
                "and other=0.0; unmasked, they read past the end of each row"
            )
        else:
            read_outside = (
                "mask every load: X with offs_m < m_size (and the K tail), W with offs_n < N, other=0.0; "
                "and check the pointers (X rows are row_start + offs_m, W[e] starts at w_ptr + e * stride_we)"
            )
        explain_rows(
            ex,
            out.view,
            want,
            case=case,
            describe=rows.describe,
            group=rows.expert,
            mistakes=mistakes,
            unwritten_hint=unwritten_hint,
            wrong_hint="check the pointers: X rows are row_start + offs_m (stride_xm), W[e] starts at "
            "w_ptr + e * stride_we, and B[k, n] = W[e, n, k] uses stride_wk along k and stride_wn along n",
            never=never_written(out.view, lambda poison, run=run: run(poison).view),
            inputs="X or W",
            read_outside_hint=read_outside,
            other_row_hint="check row_start: the first row of expert e is the sum of m_sizes of the experts before it",
        )
    passed(ex, "grouped GEMM kernel matches the per-expert matmuls", len(cases))
