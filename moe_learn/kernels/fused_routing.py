"""Router logits -> top-k weights and ids, per-expert counts, gather and scatter indices.

The eager chain (softmax, topk, histc, argsort, argsort) launches about ten kernels and
sorts T*k keys twice. Routing is a counting sort with E buckets, so three small
kernels do it, each with plenty of programs:

1. ``_topk_histogram`` (one program per block of tokens): activation, top-k and
   renormalisation, plus how many of the block's slots chose each expert.
2. ``_expert_scan`` (one program per expert): a prefix sum over the blocks of that
   expert's counts (where the block's slots of that expert start inside the expert),
   and the expert's total (the counts).
3. ``_place_slots`` (one program per block): each slot's rank among earlier slots of
   the block with the same expert, plus where its expert starts (prefix sum of the
   counts) and the block's offset. The order is the stable argsort's: by expert, then by
   flat slot index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..validation import check_floating, check_positive_int, check_tensor


@triton.jit
def _topk_histogram(
    logits_ptr, weights_ptr, ids_ptr, block_counts_ptr,
    T, E, stride_t,
    TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    USE_SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, PRE_ACT: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, TOP_K_PAD)
    t_mask = offs_t < T
    e_mask = offs_e < E
    x = tl.load(
        logits_ptr + offs_t[:, None].to(tl.int64) * stride_t + offs_e[None, :],
        mask=t_mask[:, None] & e_mask[None, :], other=0.0,
    ).to(tl.float32)
    x = tl.where(e_mask[None, :], x, float("-inf"))  # padded experts: never chosen
    if PRE_ACT:
        if USE_SIGMOID:
            scores = tl.sigmoid(x)
        else:
            x_max = tl.max(x, axis=1)
            p = tl.exp(x - x_max[:, None])
            scores = p / tl.sum(p, axis=1)[:, None]
        # padded experts must never win, whatever the activation made of -inf
        scores = tl.where(e_mask[None, :], scores, float("-inf"))
    else:
        scores = x

    top_vals = tl.zeros([BLOCK_T, TOP_K_PAD], dtype=tl.float32)
    top_ids = tl.zeros([BLOCK_T, TOP_K_PAD], dtype=tl.int32)
    picked = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(scores, axis=1)
        # lowest expert id among equal scores, like a stable sort
        idx = tl.min(tl.where(scores == best[:, None], offs_e[None, :], BLOCK_E), axis=1)
        chosen = offs_e[None, :] == idx[:, None]
        scores = tl.where(chosen, float("-inf"), scores)
        top_vals = tl.where(offs_k[None, :] == j, best[:, None], top_vals)
        top_ids = tl.where(offs_k[None, :] == j, idx[:, None], top_ids)
        picked += chosen.to(tl.int32)

    # one reduction across tokens (and warps) for the histogram, after the k rounds
    hist = tl.sum(tl.where(t_mask[:, None], picked, 0), axis=0)
    k_mask = offs_k < TOP_K
    if not PRE_ACT:  # activate only the k chosen logits (Llama 4, gpt-oss)
        if USE_SIGMOID:
            top_vals = tl.sigmoid(top_vals)
        else:
            v = tl.where(k_mask[None, :], top_vals, float("-inf"))
            v = tl.exp(v - tl.max(v, axis=1)[:, None])
            top_vals = v / tl.sum(v, axis=1)[:, None]
    if RENORMALIZE:
        total = tl.sum(tl.where(k_mask[None, :], top_vals, 0.0), axis=1)
        top_vals = top_vals / total[:, None]

    out_offs = offs_t[:, None].to(tl.int64) * TOP_K + offs_k[None, :]
    out_mask = t_mask[:, None] & k_mask[None, :]
    tl.store(weights_ptr + out_offs, top_vals.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out_offs, top_ids.to(ids_ptr.dtype.element_ty), mask=out_mask)
    tl.store(block_counts_ptr + offs_e * tl.num_programs(0) + pid, hist, mask=e_mask)  # [E, blocks]


@triton.jit
def _expert_scan(block_counts_ptr, block_prefix_ptr, counts_ptr, num_blocks, BLOCK_B: tl.constexpr):
    e = tl.program_id(0)
    row = e.to(tl.int64) * num_blocks
    running = 0
    for b0 in range(0, num_blocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask = offs_b < num_blocks
        c = tl.load(block_counts_ptr + row + offs_b, mask=mask, other=0)
        tl.store(block_prefix_ptr + row + offs_b, tl.cumsum(c, axis=0) - c + running, mask=mask)
        running += tl.sum(c, axis=0)
    tl.store(counts_ptr + e, running)


@triton.jit
def _place_slots(ids_ptr, block_prefix_ptr, counts_ptr, gather_ptr, scatter_ptr, num_slots, num_blocks, E,
                 SLOTS_PER_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK_S)
    offs_s = pid * SLOTS_PER_BLOCK + lane
    s_mask = (lane < SLOTS_PER_BLOCK) & (offs_s < num_slots)
    ids = tl.load(ids_ptr + offs_s, mask=s_mask, other=-1).to(tl.int32)
    # rank = earlier slots of this block (flat order) that chose the same expert
    same = (ids[:, None] == ids[None, :]) & (lane[None, :] < lane[:, None])
    rank = tl.sum(same.to(tl.int32), axis=1)
    # where each expert starts: exclusive prefix sum of the counts, picked per slot
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    expert_start = tl.cumsum(counts, axis=0) - counts
    start = tl.gather(expert_start, tl.where(s_mask, ids, 0), axis=0)
    block_offset = tl.load(block_prefix_ptr + ids.to(tl.int64) * num_blocks + pid, mask=s_mask, other=0)
    pos = start + block_offset + rank
    tl.store(gather_ptr + pos, offs_s, mask=s_mask)
    tl.store(scatter_ptr + offs_s, pos, mask=s_mask)


def fused_routing(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    use_sigmoid: bool = False,
    renormalize: bool = True,
    pre_act: bool = True,
):
    """``calculate_topk`` + ``get_routing_indices(..., return_scatter_indices=True)`` in 3 kernels.

    Returns (topk_weights [T, k] in the logits' dtype, topk_ids [T, k] int64,
    token_counts_by_expert [E] int32, gather_indices [T*k] int32, scatter_indices [T*k] int32).
    Among equal scores the lower expert id wins.
    """
    check_tensor("router_logits", router_logits, ndim=2)
    check_floating("router_logits", router_logits)
    check_positive_int("top_k", top_k)
    T, E = router_logits.shape
    if top_k > E:
        raise ValueError(f"top_k={top_k} is larger than the number of experts ({E})")
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    device = router_logits.device
    block_e = triton.next_power_of_2(E)
    # about 128 slots per block: the one-hot rank matrix is BLOCK_S x BLOCK_E
    # a power of two with block_t * top_k <= 128: the pairwise rank matrix is 128 x 128 at most
    block_t = 1 << max(0, (128 // top_k).bit_length() - 1)
    slots_per_block = block_t * top_k
    num_blocks = max(1, triton.cdiv(T, block_t))

    weights = torch.empty(T, top_k, dtype=router_logits.dtype, device=device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=device)
    # one allocation for all int32 outputs and scratch: fewer host-side calls per routing
    buf = torch.empty(2 * num_blocks * E + E + 2 * T * top_k, dtype=torch.int32, device=device)
    block_counts, block_prefix, counts, gather, scatter = torch.split(
        buf, [num_blocks * E, num_blocks * E, E, T * top_k, T * top_k])

    _topk_histogram[(num_blocks,)](
        router_logits, weights, ids, block_counts, T, E, router_logits.stride(0),
        TOP_K=top_k, TOP_K_PAD=triton.next_power_of_2(top_k), BLOCK_T=block_t, BLOCK_E=block_e,
        USE_SIGMOID=use_sigmoid, RENORMALIZE=renormalize, PRE_ACT=pre_act, num_warps=4,
    )
    _expert_scan[(E,)](block_counts, block_prefix, counts, num_blocks,
                       BLOCK_B=min(1024, triton.next_power_of_2(num_blocks)), num_warps=4)
    _place_slots[(num_blocks,)](
        ids, block_prefix, counts, gather, scatter, T * top_k, num_blocks, E,
        SLOTS_PER_BLOCK=slots_per_block, BLOCK_S=triton.next_power_of_2(slots_per_block),
        BLOCK_E=block_e, num_warps=4,
    )
    return weights, ids, counts, gather, scatter
