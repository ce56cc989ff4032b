"""Given top-k expert ids: per-expert counts, the gather indices and the weights, in one launch.

The experts half of a layer receives ``topk_ids [T, k]`` (transformers hands them over) and must
group the T*k (token, slot) pairs by expert before its GEMMs. In PyTorch that is eight small ops
(``layers.experts.drop_invalid`` then ``route_rows``: compares, clamp, masked_fill, a histogram by
``index_add_``, a stable ``argsort``, casts). On a decode step each op is tiny on the GPU but costs
10-40 us of host time (an H200 VM, perf/NOTES.md item 15): about 150 us per layer call, more than the
two GEMMs. ``route_ids`` does it in one launch for decode-sized inputs.

Each program places a block of ``ROWS`` slots and counts a block of ``EXPERTS`` experts, both by
comparing against every slot (T*k is small here: ``MAX_SLOTS``). The place of slot i in expert order
is the number of slots that sort before it, ``#{j : e_j < e_i or (e_j == e_i and j < i)}``: the stable
argsort's order, with no prefix sum and nothing shared between programs. Ids outside [0, E) are
routed to the nearest valid expert with weight 0, as ``drop_invalid`` does (transformers'
expert-parallel sentinels contribute nothing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_learn.device import check_kernel_device
from moe_learn.kernels.launcher import FastLauncher, cdiv
from moe_learn.validation import check_floating, check_integer, check_positive_int, check_tensor

MAX_SLOTS = 4096  # T*k up to this take the kernel in the layers (decode and small prefill); beyond, PyTorch's sort
ROWS, EXPERTS, CHUNK = 64, 64, 64


@triton.jit(do_not_specialize=["n", "E"])  # one compiled kernel for every size (and one launch key)
def _route_ids_kernel(ids_ptr, weights_ptr, counts_ptr, gather_ptr, weights_out_ptr, n, E,
                      ROWS: tl.constexpr, EXPERTS: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    # this program's slots: where each goes in expert order, and its weight
    rows = pid * ROWS + tl.arange(0, ROWS)
    mask_r = rows < n
    raw = tl.load(ids_ptr + rows, mask=mask_r, other=0)
    e_r = tl.minimum(tl.maximum(raw, 0), E - 1)
    place = tl.zeros([ROWS], dtype=tl.int32)
    for j0 in range(0, n, CHUNK):
        cols = j0 + tl.arange(0, CHUNK)
        mask_c = cols < n
        e_c = tl.minimum(tl.maximum(tl.load(ids_ptr + cols, mask=mask_c, other=0), 0), E - 1)
        before = (e_c[None, :] < e_r[:, None]) | ((e_c[None, :] == e_r[:, None]) & (cols[None, :] < rows[:, None]))
        place += tl.sum((before & mask_c[None, :]).to(tl.int32), axis=1)
    tl.store(gather_ptr + place, rows, mask=mask_r)
    w = tl.load(weights_ptr + rows, mask=mask_r, other=0.0)
    valid = (raw >= 0) & (raw < E)
    tl.store(weights_out_ptr + rows, tl.where(valid, w, tl.zeros_like(w)), mask=mask_r)
    # this program's experts: how many slots each got
    experts = pid * EXPERTS + tl.arange(0, EXPERTS)
    counts = tl.zeros([EXPERTS], dtype=tl.int32)
    for j0 in range(0, n, CHUNK):
        cols = j0 + tl.arange(0, CHUNK)
        mask_c = cols < n
        e_c = tl.minimum(tl.maximum(tl.load(ids_ptr + cols, mask=mask_c, other=0), 0), E - 1)
        counts += tl.sum(((e_c[None, :] == experts[:, None]) & mask_c[None, :]).to(tl.int32), axis=1)
    tl.store(counts_ptr + experts, counts, mask=experts < E)


_LAUNCH = FastLauncher(_route_ids_kernel)


def run_route_ids(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int):
    """``route_ids`` without its checks: the layers call it with arguments they checked."""
    ids, weights = topk_ids.reshape(-1).contiguous(), topk_weights.reshape(-1).contiguous()
    n = ids.numel()
    counts = torch.empty(num_experts, dtype=torch.int32, device=ids.device)
    gather = torch.empty(n, dtype=torch.int32, device=ids.device)
    weights_out = torch.empty_like(weights)
    programs = max(cdiv(n, ROWS), cdiv(num_experts, EXPERTS))
    _LAUNCH((programs,), (ids, weights, counts, gather, weights_out, n, num_experts),
            dict(ROWS=ROWS, EXPERTS=EXPERTS, CHUNK=CHUNK), dict(num_warps=4))
    return counts, gather, weights_out.view(topk_weights.shape)


def route_ids(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int):
    """``(counts [E] int32, gather_indices [T*k] int32, weights [T, k])`` from ``topk_ids [T, k]``.

    counts[e]: slots routed to expert e; gather_indices: the flat (token, slot) positions in expert
    order, ties in token order (``torch.argsort(ids, stable=True)``); weights: topk_weights with
    0 where an id is outside [0, num_experts) (such a slot is counted with the nearest valid
    expert). Equal to ``route_rows(*drop_invalid(topk_ids, topk_weights, E), E)`` in one launch,
    for up to ``MAX_SLOTS`` (T*k) entries: each program compares its slots against all of them.
    Not differentiable: with ``topk_weights`` requiring grad it refuses (``drop_and_route`` keeps the
    gradient by taking the PyTorch ops then).
    """
    check_tensor("topk_ids", topk_ids)
    check_integer("topk_ids", topk_ids)
    check_tensor("topk_weights", topk_weights)
    check_floating("topk_weights", topk_weights)
    check_positive_int("num_experts", num_experts)
    if topk_ids.shape != topk_weights.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must have "
                         "one shape ([T, k])")
    if topk_ids.device != topk_weights.device:
        raise ValueError(f"topk_ids is on {topk_ids.device} but topk_weights on {topk_weights.device}; move one")
    if torch.is_grad_enabled() and topk_weights.requires_grad:
        raise ValueError("route_ids does not record autograd, and topk_weights requires grad; use "
                         "layers.experts.drop_and_route (it keeps the gradient) or call under torch.no_grad()")
    if topk_ids.numel() > MAX_SLOTS:  # (which also keeps every index in int32)
        raise ValueError(f"topk_ids has {topk_ids.numel()} entries; route_ids takes at most MAX_SLOTS={MAX_SLOTS} "
                         "(its work grows with the square of T*k): for more, use layers.experts.drop_and_route, "
                         "which sorts them with PyTorch")
    check_kernel_device("route_ids", topk_ids)
    if topk_ids.numel() == 0:
        return (torch.zeros(num_experts, dtype=torch.int32, device=topk_ids.device),
                torch.empty(0, dtype=torch.int32, device=topk_ids.device), topk_weights.clone())
    return run_route_ids(topk_ids, topk_weights, num_experts)
