"""Router logits -> top-k weights and ids, per-expert counts, gather and scatter indices.

The eager chain (softmax, topk, histc, argsort, argsort) launches about ten kernels and
sorts T*k keys twice. Routing is a counting sort with E buckets, and it fits in one
launch of a single kernel, ``_route``, in three phases over blocks of tokens:

1. top-k (``_topk_block``, per block): activation, top-k and renormalisation, plus how
   many of the block's slots chose each expert (a histogram row per block).
2. scan (``_scan_expert``, per expert): a prefix sum over the blocks of that expert's
   counts (where each block's slots of that expert start inside the expert), and the
   expert's total (the counts).
3. place (``_place_block``, per block): each slot's rank among earlier slots of the
   block with the same expert, plus where its expert starts (prefix sum of the counts)
   and the block's offset. The order is the stable argsort's: by expert, then by flat
   slot index.

Each phase needs everything the phase before wrote, from every program. On a GPU the
programs wait for each other at a grid-wide barrier (an atomic counter): there are
never more programs than fit on the GPU at once, so all of them run side by side and
the wait always ends. One launch instead of three matters because routing is small:
at T=8192, E=128, top-8 its GPU time (about 40 us) is less than the host time of three
Triton launches on the benchmark VMs (perf/NOTES.md). Triton's CPU interpreter runs programs one after another, where a
program waiting for a later one would wait forever, so there the last program to finish
phase 1 runs phases 2 and 3 for everyone (``cooperative=False``, also selectable on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_learn.device import INTERPRETER, check_kernel_device
from moe_learn.kernels.autotune import num_sms
from moe_learn.kernels.grid_sync import counters, grid_sync, grid_sync_done, most_programs
from moe_learn.kernels.launcher import cdiv, next_power_of_2
from moe_learn.validation import check_floating, check_positive_int, check_tensor


@triton.jit
def _topk_block(
    b, logits_ptr, weights_ptr, ids_ptr, block_counts_ptr, T, E, stride_t, num_blocks,
    TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    USE_SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, PRE_ACT: tl.constexpr,
):
    offs_t = b * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, TOP_K_PAD)
    t_mask = offs_t < T
    e_mask = offs_e < E
    x = tl.load(
        logits_ptr + offs_t[:, None].to(tl.int64) * stride_t + offs_e[None, :],
        mask=t_mask[:, None] & e_mask[None, :], other=0.0,
    ).to(tl.float32)
    is_nan = x != x
    # The k rounds rank the logits as calculate_topk does (its docstring has the rules).
    # The key is an int32 that orders like the floats (negatives get their magnitude bits
    # flipped), with every NaN above +inf, -0.0 equal to +0.0 and padded experts below all.
    # Integers make the max and the equality exact, with none of NaN's special cases.
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(is_nan, 0x7FFFFFFF, tl.where(x == 0.0, 0, key))
    key = tl.where(e_mask[None, :], key, -0x80000000)  # no real logit has this key

    top_keys = tl.zeros([BLOCK_T, TOP_K_PAD], dtype=tl.int32)
    top_ids = tl.zeros([BLOCK_T, TOP_K_PAD], dtype=tl.int32)
    picked = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(key, axis=1)
        # lowest expert id among equal keys, like a stable sort
        idx = tl.min(tl.where(key == best[:, None], offs_e[None, :], BLOCK_E), axis=1)
        chosen = offs_e[None, :] == idx[:, None]
        key = tl.where(chosen, -0x80000000, key)  # below every real key: never chosen twice
        top_keys = tl.where(offs_k[None, :] == j, best[:, None], top_keys)
        top_ids = tl.where(offs_k[None, :] == j, idx[:, None], top_ids)
        picked += chosen.to(tl.int32)

    # one reduction across tokens (and warps) for the histogram, after the k rounds
    hist = tl.sum(tl.where(t_mask[:, None], picked, 0), axis=0)
    k_mask = offs_k < TOP_K
    # the chosen logits back from their keys (the bit flip is its own inverse)
    top_vals = (top_keys ^ ((top_keys >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    # Softmax maxima skip NaN explicitly (tl.max on NaN differs between GPU and interpreter);
    # NaN still reaches the weights through exp and the sums, as in torch.softmax: a row
    # holding NaN or +inf, or only -inf, is NaN throughout.
    if USE_SIGMOID:  # elementwise: activating before or after the top-k is the same
        top_vals = tl.sigmoid(top_vals)
    elif PRE_ACT:  # softmax over all E experts, taken at the k chosen
        x_max = tl.max(tl.where(is_nan | ~e_mask[None, :], float("-inf"), x), axis=1)
        total = tl.sum(tl.where(e_mask[None, :], tl.exp(x - x_max[:, None]), 0.0), axis=1)
        top_vals = tl.exp(top_vals - x_max[:, None]) / total[:, None]
    else:  # softmax over the k chosen logits only (gpt-oss)
        v_max = tl.max(tl.where(k_mask[None, :] & (top_vals == top_vals), top_vals, float("-inf")), axis=1)
        v = tl.where(k_mask[None, :], tl.exp(top_vals - v_max[:, None]), 0.0)
        top_vals = v / tl.sum(v, axis=1)[:, None]
    if RENORMALIZE:
        total = tl.sum(tl.where(k_mask[None, :], top_vals, 0.0), axis=1)
        top_vals = top_vals / total[:, None]

    out_offs = offs_t[:, None].to(tl.int64) * TOP_K + offs_k[None, :]
    out_mask = t_mask[:, None] & k_mask[None, :]
    tl.store(weights_ptr + out_offs, top_vals.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out_offs, top_ids.to(ids_ptr.dtype.element_ty), mask=out_mask)
    tl.store(block_counts_ptr + offs_e * num_blocks + b, hist, mask=e_mask)  # [E, blocks]


@triton.jit
def _scan_expert(e, block_counts_ptr, block_prefix_ptr, counts_ptr, num_blocks, BLOCK_B: tl.constexpr):
    row = e * num_blocks  # int32: the whole [E, blocks] table is far below 2**31 entries
    running = 0
    for b0 in range(0, num_blocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask = offs_b < num_blocks
        # .cg: straight from L2, where other programs' writes are (never a stale L1 line)
        c = tl.load(block_counts_ptr + row + offs_b, mask=mask, other=0, cache_modifier=".cg")
        tl.store(block_prefix_ptr + row + offs_b, tl.cumsum(c, axis=0) - c + running, mask=mask)
        running += tl.sum(c, axis=0)
    tl.store(counts_ptr + e, running)


@triton.jit
def _place_block(b, ids_ptr, block_prefix_ptr, counts_ptr, gather_ptr, scatter_ptr, num_slots, num_blocks, E,
                 SLOTS_PER_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
                 RANK_CHUNK: tl.constexpr):
    lane = tl.arange(0, BLOCK_S)
    offs_s = b * SLOTS_PER_BLOCK + lane
    s_mask = (lane < SLOTS_PER_BLOCK) & (offs_s < num_slots)
    ids = tl.load(ids_ptr + offs_s, mask=s_mask, other=-1, cache_modifier=".cg").to(tl.int32)
    # rank = earlier slots of this block (flat order) that chose the same expert, counted
    # against RANK_CHUNK slots at a time: a BLOCK_S x BLOCK_S compare at once would hold
    # BLOCK_S values per thread and cost the registers that let more programs share an SM
    rank = tl.zeros([BLOCK_S], dtype=tl.int32)
    for c in tl.static_range(BLOCK_S // RANK_CHUNK):
        other_lane = c * RANK_CHUNK + tl.arange(0, RANK_CHUNK)
        other_s = b * SLOTS_PER_BLOCK + other_lane
        other = tl.load(ids_ptr + other_s, mask=(other_lane < SLOTS_PER_BLOCK) & (other_s < num_slots), other=-1,
                        cache_modifier=".cg").to(tl.int32)
        same = (ids[:, None] == other[None, :]) & (other_lane[None, :] < lane[:, None])
        rank += tl.sum(same.to(tl.int32), axis=1)
    # where each expert starts: exclusive prefix sum of the counts, picked per slot
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0, cache_modifier=".cg")
    expert_start = tl.cumsum(counts, axis=0) - counts
    start = tl.gather(expert_start, tl.where(s_mask, ids, 0), axis=0)
    block_offset = tl.load(block_prefix_ptr + ids.to(tl.int64) * num_blocks + b, mask=s_mask, other=0,
                           cache_modifier=".cg")
    pos = start + block_offset + rank
    tl.store(gather_ptr + pos, offs_s, mask=s_mask)
    tl.store(scatter_ptr + offs_s, pos, mask=s_mask)


# Compiled once per key (dtypes, constexprs): the integers' values must not change the code
@triton.jit(do_not_specialize=["T", "E", "stride_t", "num_blocks"])
def _route(
    logits_ptr, weights_ptr, ids_ptr, block_counts_ptr, block_prefix_ptr, counts_ptr, gather_ptr, scatter_ptr,
    counter_ptr, T, E, stride_t, num_blocks,
    TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr, USE_SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, PRE_ACT: tl.constexpr,
    RANK_CHUNK: tl.constexpr, COOPERATIVE: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    num_slots = T * TOP_K
    for b in range(pid, num_blocks, programs):
        _topk_block(b, logits_ptr, weights_ptr, ids_ptr, block_counts_ptr, T, E, stride_t, num_blocks,
                    TOP_K, TOP_K_PAD, BLOCK_T, BLOCK_E, USE_SIGMOID, RENORMALIZE, PRE_ACT)
    if COOPERATIVE:
        grid_sync(counter_ptr, programs)
        for e in range(pid, E, programs):
            _scan_expert(e, block_counts_ptr, block_prefix_ptr, counts_ptr, num_blocks, BLOCK_B)
        grid_sync(counter_ptr, 2 * programs)
        for b in range(pid, num_blocks, programs):
            _place_block(b, ids_ptr, block_prefix_ptr, counts_ptr, gather_ptr, scatter_ptr, num_slots, num_blocks,
                         E, BLOCK_T * TOP_K, BLOCK_T * TOP_K_PAD, BLOCK_E, RANK_CHUNK)
        grid_sync_done(counter_ptr, programs)  # the last program out resets the counters for the next launch
    else:
        tl.debug_barrier()
        if tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == programs - 1:
            # the last program to finish phase 1 sees every block's histogram: it does the rest
            for e in range(0, E):
                _scan_expert(e, block_counts_ptr, block_prefix_ptr, counts_ptr, num_blocks, BLOCK_B)
            tl.debug_barrier()  # this program's scan stores, before its own reads of them
            for b in range(0, num_blocks):
                _place_block(b, ids_ptr, block_prefix_ptr, counts_ptr, gather_ptr, scatter_ptr, num_slots,
                             num_blocks, E, BLOCK_T * TOP_K, BLOCK_T * TOP_K_PAD, BLOCK_E, RANK_CHUNK)
            tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")


MAX_PROGRAMS_PER_SM = 2  # measured best at T=8192 (perf/NOTES.md), when the resources allow it
# key -> (compiled kernel, most programs at once, constexprs in parameter order, direct launch?)
_COMPILED: dict[tuple, tuple] = {}
_DIRECT_LAUNCH = [True]  # False once this Triton's compiled kernels turn out to take other arguments


def _compile(args, constexprs, options, device) -> tuple:
    """Compile without launching; size the grid from the compiled kernel's resources."""
    kernel = _route.warmup(*args, **constexprs, **options, grid=(1,))
    kernel._init_handles()
    programs = most_programs(kernel, device, MAX_PROGRAMS_PER_SM)
    # the launcher takes every parameter in the kernel's order, constexprs included
    ordered = [constexprs[name] for name in _route.arg_names[len(args):]]
    # Triton's launch hooks (profilers) only run on its own launch path: go direct only without any
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    hooks = [getattr(runtime, name, None) for name in ("launch_enter_hook", "launch_exit_hook")]
    direct = runtime is not None and not any(getattr(h, "calls", h) for h in hooks)  # None, or an empty chain
    return kernel, programs, ordered, direct


def _launch(key, num_blocks, args, constexprs, device, stream):
    """Launch ``_route`` over at most as many programs as the GPU holds at once.

    Triton's ``kernel[grid](...)`` binds and specializes every argument and looks up its
    cache on each call: 25-40 us of host time per launch on the VMs of our benchmarks
    (perf/NOTES.md), more than this kernel's GPU time. So the kernel is compiled once per
    key and later calls go straight to the compiled kernel's launcher (about 7 us). That is
    right only because nothing in the key's compiled code depends on argument values: the
    integers are ``do_not_specialize`` and the key holds what decides the pointers' alignment.
    """
    if INTERPRETER:
        _route[(min(num_blocks, num_sms(device)),)](*args, **constexprs, num_warps=4)
        return
    options = dict(num_warps=4, launch_cooperative_grid=constexprs["COOPERATIVE"])
    entry = _COMPILED.get(key)
    if entry is None:
        entry = _COMPILED[key] = _compile(args, constexprs, options, device)
    kernel, programs_at_once, ordered, direct = entry
    # never more programs than run at once: the grid barrier waits for all of them
    # (the cooperative launch makes the driver refuse a grid that would not fit)
    programs = min(num_blocks, programs_at_once)
    if direct and _DIRECT_LAUNCH[0]:
        try:
            kernel.run(programs, 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *args,
                       *ordered)
            return
        except (TypeError, AttributeError):  # another Triton: use its own launch path from now on
            _DIRECT_LAUNCH[0] = False
    _route[(programs,)](*args, **constexprs, **options)


def fused_routing(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    use_sigmoid: bool = False,
    renormalize: bool = True,
    pre_act: bool = True,
    cooperative: bool | None = None,
):
    """``calculate_topk`` + ``get_routing_indices(..., return_scatter_indices=True)`` in one launch.

    Returns (topk_weights [T, k] in the logits' dtype, topk_ids [T, k] int64,
    token_counts_by_expert [E] int32, gather_indices [T*k] int32, scatter_indices [T*k] int32).
    The same experts as ``calculate_topk``, also on NaN, inf and ties (the lower expert id
    wins), and the same weights up to float32 rounding, NaN exactly where its are. router_logits:
    float32, float16 or bfloat16 (the kernel ranks in float32). ``cooperative`` (default:
    on a GPU) picks the grid-barrier version; ``False`` lets the last program of phase 1
    finish alone. Differentiable (op ``moe_learn::fused_routing``): the weights' gradient
    reaches the logits as through ``calculate_topk``.
    """
    check_tensor("router_logits", router_logits, ndim=2)
    check_floating("router_logits", router_logits)
    if router_logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        # float64 logits that round to one float32 would tie here but not in calculate_topk
        raise TypeError(f"router_logits must be float32, float16 or bfloat16, got {router_logits.dtype}; "
                        "pass router_logits.float(), or route float64 logits with calculate_topk")
    check_positive_int("top_k", top_k)
    T, E = router_logits.shape
    if top_k > E:
        raise ValueError(f"top_k={top_k} is larger than the number of experts ({E}, the last dim of router_logits); "
                         "pass top_k <= num_experts")
    for name, flag in (("use_sigmoid", use_sigmoid), ("renormalize", renormalize), ("pre_act", pre_act)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    device = router_logits.device
    check_kernel_device("fused_routing", router_logits, "logits")
    if cooperative is None:
        cooperative = device.type == "cuda" and not INTERPRETER
    elif cooperative and (INTERPRETER or device.type != "cuda"):
        raise ValueError("cooperative=True needs a GPU: Triton's interpreter runs one program at a time, so a "
                         "program waiting for the others would wait forever; use cooperative=False or None")
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and router_logits.requires_grad):
        return torch.ops.moe_learn.fused_routing(router_logits, top_k, use_sigmoid, renormalize, pre_act, cooperative)
    return run_fused_routing(router_logits, top_k, use_sigmoid=use_sigmoid, renormalize=renormalize, pre_act=pre_act,
                             cooperative=cooperative)


def run_fused_routing(router_logits, top_k, *, use_sigmoid, renormalize, pre_act, cooperative,
                      separate_outputs=False):
    """Launch the routing kernel (arguments already checked): the op's implementation."""
    T, E = router_logits.shape
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    device = router_logits.device
    # a power of two with block_t * top_k <= 128: the pairwise rank matrix is 128 x 128 at most
    block_t = 1 << max(0, (128 // top_k).bit_length() - 1)
    num_blocks = max(1, cdiv(T, block_t))
    slots = T * top_k

    weights = torch.empty(T, top_k, dtype=router_logits.dtype, device=device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=device)
    if separate_outputs:  # a custom op's outputs may not share storage
        gather, scatter, counts = (torch.empty(n, dtype=torch.int32, device=device) for n in (slots, slots, E))
        block_counts, block_prefix = torch.empty(2, num_blocks * E, dtype=torch.int32, device=device)
    else:  # one allocation for all int32 outputs and scratch: fewer host-side calls per routing
        gather, scatter, counts, block_counts, block_prefix = torch.empty(
            2 * slots + E + 2 * num_blocks * E, dtype=torch.int32, device=device,
        ).split_with_sizes([slots, slots, E, num_blocks * E, num_blocks * E])
    constexprs = dict(
        TOP_K=top_k, TOP_K_PAD=next_power_of_2(top_k), BLOCK_T=block_t, BLOCK_E=next_power_of_2(E),
        BLOCK_B=min(1024, next_power_of_2(num_blocks)), USE_SIGMOID=use_sigmoid, RENORMALIZE=renormalize,
        PRE_ACT=pre_act, RANK_CHUNK=min(32, block_t * next_power_of_2(top_k)), COOPERATIVE=cooperative,
    )
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    args = (router_logits, weights, ids, block_counts, block_prefix, counts, gather, scatter,
            counters(device, stream), T, E, router_logits.stride(0), num_blocks)
    # what decides the pointers' 16-byte alignment, which the compiled code may assume
    alignment = (router_logits.data_ptr() % 16, slots % 4, E % 4)
    key = (device, router_logits.dtype, alignment, *constexprs.values())
    _launch(key, num_blocks, args, constexprs, device, stream)
    return weights, ids, counts, gather, scatter
