"""Chapter 00's demonstration check: how every check in the course behaves.

Chapter 00 has no exercise for the learner; the notebook writes a small function
itself and runs this check on it, once right and once wrong, to show what a pass and
a failure look like. It is not registered in ``moe_learn.course.exercises``.
"""

from __future__ import annotations

import torch

from moe_learn.course.checks._core import call_learner, expect_tensor, fail, passed

DEMO_ID = "00.0"


def _cases(generator: torch.Generator) -> list[tuple[str, torch.Tensor, int]]:
    """(description, selected_experts [T, k], num_experts): random plus the edge cases."""
    cases = [
        ("one token, top-1", torch.tensor([[2]]), 4),
        ("all tokens to expert 0", torch.zeros(5, 2, dtype=torch.long), 3),
        ("the last two experts get nothing", torch.tensor([[0, 1], [1, 0], [0, 1]]), 4),
        ("no tokens at all", torch.zeros(0, 2, dtype=torch.long), 3),
    ]
    for _ in range(6):
        tokens = int(torch.randint(1, 40, (1,), generator=generator))
        experts = int(torch.randint(2, 9, (1,), generator=generator))
        topk = int(torch.randint(1, experts + 1, (1,), generator=generator))
        # top-k picks distinct experts per token: take the first k of a random permutation.
        picks = torch.stack([torch.randperm(experts, generator=generator)[:topk] for _ in range(tokens)])
        cases.append((f"random: {tokens} tokens, {experts} experts, top-{topk}", picks, experts))
    return cases


def check_count_tokens(fn, seed: int | None = None) -> None:
    """``fn(selected_experts, num_experts)`` must return how many tokens each expert got.

    ``selected_experts`` is ``[num_tokens, top_k]`` (int64): the experts each token
    chose. The answer is a 1-D integer tensor of length ``num_experts``.
    """
    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, (1,))))
    cases = _cases(generator)
    for what, selected, num_experts in cases:
        got = call_learner(DEMO_ID, fn, selected.clone(), num_experts)
        expected = torch.bincount(selected.flatten(), minlength=num_experts)
        if isinstance(got, torch.Tensor) and got.ndim == 1 and got.numel() < num_experts:
            fail(
                DEMO_ID,
                f"on '{what}' you returned {got.numel()} counts for {num_experts} experts",
                "experts that got no token still need a 0: torch.bincount(..., minlength=num_experts)",
            )
        expect_tensor(DEMO_ID, "the counts", got, (num_experts,))
        if got.dtype.is_floating_point:
            fail(
                DEMO_ID, f"the counts are {got.dtype}, expected an integer dtype", "torch.histc returns floats: .long()"
            )
        mismatch = (got.cpu() != expected).nonzero()
        if mismatch.numel():
            e = int(mismatch[0])
            fail(
                DEMO_ID,
                f"on '{what}', expert {e} got {int(got[e])} tokens, expected {int(expected[e])}",
                "count every one of a token's top-k choices, not only the first column",
            )
    passed(DEMO_ID, "count_tokens", len(cases))
