"""The experts of a decode step in two launches (or one): no routing, no permutation, no sum afterwards.

At decode a layer sees a handful of tokens: T*k (token, slot) pairs, most of them on different
experts. The grouped path (``layers.experts``) first groups the pairs by expert (``route_ids``:
one launch), runs two grouped GEMMs whose tiles are 16 rows of mostly padding, writes ``[T*k, H]``
and sums its k slots (one more launch): four launches, each 7-40 us of host time on a VM
(perf/NOTES.md items 22-23), for GPU work of a few microseconds.

Here every slot is its own row, and the work is what it is at this size: streaming the chosen
experts' weights past one vector (a matrix-vector product, which tensor cores would not speed up).
Two phases:

1. ``_gate_up_block``, items (slot, I block): slot s = (t, j) reads expert e = ids[t, j]'s gate and
   up rows for its column block, dots them with x[t] and stores ``h[s] = silu(gate) * up``.
2. ``_down_block``, items (t, H block): token t walks its k slots and adds
   ``w[t, j] * W_down[e] @ h[s]`` for its column block in float32; out[t] is written once.

Streaming is bound by the bytes in flight: a program that waits for each K step's loads before it
issues the next keeps one step per program in flight, and at T = 1 there are only a few programs per
SM. Triton pipelines loads that feed a ``tl.dot``, not these, so each phase loads the next step's
tiles before it multiplies this step's (``PREFETCH``, where the registers allow: ``_prefetch``).

Phase 2 reads what every program of phase 1 wrote. By default each phase is its own launch
(``_gate_up_swiglu_kernel``, grid (T*k, I/BLOCK_N); ``_down_sum_kernel``, grid (T, H/BLOCK_N)).
``ONE_LAUNCH`` runs both in ``_decode_experts_kernel``, whose programs (no more than the GPU holds at
once, cooperatively launched) wait for each other at a grid barrier (``grid_sync``) in between: one
launch less of host time, the same arithmetic, bits and GPU time, but slower in eager calls where the
layers take this path (getting a cooperative launch going costs more; perf/NOTES.md items 23-25), so it is off.
Triton's interpreter runs the one launch as a single program.
Either way a launch plan keeps h per stream, so a repeated call allocates only its output.

Nothing is sorted, so nothing waits for a routing pass, and no expert that got no slot is read.
An expert that got several slots is read once per slot (from L2 when they run close together):
one reason the layers take this path only for a few slots (``layers_take``). Ids outside [0, E) skip
their slot: it contributes nothing, as ``drop_invalid`` says (transformers' expert-parallel
sentinels). Inference only: no autograd.
"""

from __future__ import annotations

import threading
import warnings

import torch
import triton
import triton.language as tl

from moe_learn.device import INTERPRETER, check_kernel_device
from moe_learn.kernels import launcher
from moe_learn.kernels.autotune import num_sms
from moe_learn.kernels.grid_sync import counters, grid_sync, grid_sync_done, most_programs
from moe_learn.kernels.grouped_gemm import _layout as layout
from moe_learn.kernels.launcher import FastLauncher, cdiv, direct_possible, next_power_of_2
from moe_learn.validation import check_moe_args

# When the layers (moe_experts, transformers' experts) take this path in inference: at most MAX_SLOTS (token,
# slot) pairs whose experts' weights come to at most MAX_WEIGHT_BYTES (counted once per slot, as read), or
# MAX_WEIGHT_BYTES_IN_GRAPH while a CUDA graph is captured. Its kernels read an expert once per slot, the grouped
# GEMMs once per expert, so past a few hundred MB it loses. With the prefetch (perf/NOTES.md item 24, an H100 and
# an H200), eager: Qwen3-30B-A3B at T = 1-4 (75-300 MB) and gpt-oss-120b at T = 1-2 (200-400 MB) won, by 3-70%;
# DeepSeek-V3 and Mixtral at T = 1 (700 MB) were within 4% of the grouped path; gpt-oss T = 4 (800 MB) and
# Mixtral T = 2 (1.4 GB) lost. From a CUDA graph (host time free): Qwen3 T = 1-4 and gpt-oss T = 1 won on both
# GPUs (by 8-38%), gpt-oss T = 2 lost on the H200 by 7%.
MAX_SLOTS = 64
MAX_WEIGHT_BYTES = 400 * 2**20
MAX_WEIGHT_BYTES_IN_GRAPH = 300 * 2**20
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Launch parameters (perf/decode_experts.py --sweep compares others): the K block of each kernel (the gate_up
# kernel streams two tiles a step), the narrowest column block and the programs per SM to aim for.
BLOCK_K_GATE_UP, BLOCK_K_DOWN, MIN_BLOCK_N, PROGRAMS_PER_SM = 128, 256, 8, 2
# The down kernel's K block where its column block is the narrowest (MIN_BLOCK_N): wider, more bytes in flight
# (a sweep on an H100, perf/NOTES.md item 24: 512 beat 256 in the three T = 1 cases, by 4-17%)
BLOCK_K_DOWN_NARROW = 512
# Each K step's tiles loaded one step ahead (two steps of weights in flight per program): None = where the
# accumulators leave room in registers (``_prefetch``), True / False = everywhere / nowhere (A/B runs).
# Prefetched everywhere on an H100, Qwen3-30B-A3B T=1 ran 38% faster (CUDA graph 63 -> 38 us) but the 64-column
# gate/up tiles spilled registers and ran slower (Qwen3 T=8 +8%, Mixtral T=8 +25%); the down kernel's 32 x 256
# tiles did not spill and still ran 2-6% slower (gpt-oss-120b and Mixtral at T=4, both GPUs) (perf/NOTES.md item 24).
PREFETCH: bool | None = None
# fp32 accumulator elements per thread (4 warps) up to which each kernel prefetches: gate/up up to 2 x 32 x 128,
# down up to 16 x 256 (or 8 x 512)
PREFETCH_MAX_ACCUMULATOR = {"gate_up": 64, "down": 32}
OPTIONS = dict(num_warps=4, num_stages=4)


@triton.jit
def _gate_up_loads(x_row, gate_rows, up_rows, k0, k_end, mask_n, stride_xh, stride_wk, BLOCK_K: tl.constexpr):
    """One K step's x, gate tile and up tile (nothing read past k_end)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k_end
    x = tl.load(x_row + offs_k * stride_xh, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    mask = mask_n[:, None] & mask_k[None, :]
    gate = tl.load(gate_rows + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
    up = tl.load(up_rows + offs_k[None, :] * stride_wk, mask=mask, other=0.0)
    return x, gate, up


@triton.jit
def _gate_up_block(x_ptr, ids_ptr, w_ptr, h_ptr, slot, block, E, I, H, TOP_K,
                   stride_xt, stride_xh, stride_it, stride_ik, stride_we, stride_wn, stride_wk,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """h[slot, block's columns] = silu(gate) * up of slot = (t, j)'s expert."""
    t = slot // TOP_K
    e = tl.load(ids_ptr + t * stride_it + (slot - t * TOP_K) * stride_ik).to(tl.int64)
    # Another id contributes nothing: every load below is masked off (no traffic), h's row is 0 (bounds in
    # the masks rather than a branch around the loop).
    valid = (e >= 0) & (e < E)
    e = tl.where(valid, e, 0)
    k_end = tl.where(valid, H, 0)  # (bounds, not a scalar mask: the interpreter takes no scalar in a mask)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < tl.where(valid, I, 0)
    gate_rows = w_ptr + e * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn  # W[e, n, :], n < I: the gate
    up_rows = w_ptr + e * stride_we + (offs_n + I).to(tl.int64)[:, None] * stride_wn  # W[e, I + n, :]: the up
    x_row = x_ptr + t.to(tl.int64) * stride_xt
    # products summed per lane, reduced once after the loop (one reduction, not one per step)
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if PREFETCH:
        # The next step's tiles are loaded before this step's products: two steps of weights in flight per
        # program instead of one (Triton pipelines loads that feed a tl.dot, not these). The last load is past
        # H: masked off, no traffic. The same products in the same order: the same bits.
        x, gate, up = _gate_up_loads(x_row, gate_rows, up_rows, 0, k_end, mask_n, stride_xh, stride_wk, BLOCK_K)
        for k0 in range(BLOCK_K, H + BLOCK_K, BLOCK_K):
            x_next, gate_next, up_next = _gate_up_loads(x_row, gate_rows, up_rows, k0, k_end, mask_n, stride_xh,
                                                        stride_wk, BLOCK_K)
            acc_gate += gate.to(tl.float32) * x
            acc_up += up.to(tl.float32) * x
            x, gate, up = x_next, gate_next, up_next
    else:
        for k0 in range(0, H, BLOCK_K):
            x, gate, up = _gate_up_loads(x_row, gate_rows, up_rows, k0, k_end, mask_n, stride_xh, stride_wk, BLOCK_K)
            acc_gate += gate.to(tl.float32) * x
            acc_up += up.to(tl.float32) * x
    gate = tl.sum(acc_gate, axis=1)
    h = gate * tl.sigmoid(gate) * tl.sum(acc_up, axis=1)  # in fp32, rounded once: as the grouped GEMM's epilogue
    tl.store(h_ptr + slot.to(tl.int64) * I + offs_n, h.to(h_ptr.dtype.element_ty), mask=offs_n < I)


@triton.jit
def _down_loads(rows, h_ptr, step, chunks, t, I, TOP_K, offs_s, valid, weights, experts, mask_n, stride_we, stride_wk,
                BLOCK_K: tl.constexpr, H_CACHE: tl.constexpr):
    """Step ``step`` of the flat (slot, K block) loop: slot j's W_down tile and weight * h (nothing read for an
    invalid slot, or for j = TOP_K, one step past the end)."""
    j = step // chunks
    this = offs_s == j
    offs_k = (step - j * chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
    # The slot's expert, and its bound (I, or 0: nothing read), picked out of registers. Written as an unknown
    # integer times a stride (times I), so that the compiler still knows W's address and the mask move in steps
    # of 16 and loads 8 elements at once; a sum over the picked products would hide that and cost one 2-byte
    # load per element.
    mask_k = offs_k < tl.sum(tl.where(this, valid, 0)) * I
    weight = tl.sum(tl.where(this, weights, 0.0))
    # (H_CACHE ".cg" in the one launch: h was written by other programs of that launch; read it from L2, never
    # a stale L1 line)
    h = tl.load(h_ptr + (t * TOP_K + j).to(tl.int64) * I + offs_k, mask=mask_k, other=0.0,
                cache_modifier=H_CACHE).to(tl.float32)
    w = tl.load(rows + tl.sum(tl.where(this, experts, 0)) * stride_we + offs_k[None, :] * stride_wk,
                mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    return w, weight * h


@triton.jit
def _down_block(h_ptr, ids_ptr, weights_ptr, w_ptr, out_ptr, t, block, E, H, I, TOP_K,
                stride_it, stride_ik, stride_rt, stride_rk, stride_we, stride_wn, stride_wk, stride_ot, stride_oh,
                SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, H_CACHE: tl.constexpr,
                PREFETCH: tl.constexpr):
    """out[t, block's columns] = sum over t's slots of weight * W_down[e] @ h[slot]."""
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    # The token's k ids and weights, loaded once: inside the loop a slot's expert then comes from registers,
    # and no load of W waits for a load of its id. Another id is masked off (exactly nothing, not 0 times an
    # unwritten h): its bound is 0.
    offs_s = tl.arange(0, SLOTS)
    ids = tl.load(ids_ptr + t * stride_it + offs_s * stride_ik, mask=offs_s < TOP_K, other=-1).to(tl.int64)
    valid = (ids >= 0) & (ids < E)
    weights = tl.load(weights_ptr + t * stride_rt + offs_s * stride_rk, mask=offs_s < TOP_K, other=0.0)
    weights = tl.where(valid, weights.to(tl.float32), 0.0)
    experts = tl.where(valid, ids, 0)
    valid = valid.to(tl.int32)
    # one flat loop over (slot, K block), so that loads run ahead across slots too (a decode step has few K
    # blocks per slot); each step adds W_down[e] tile * (weight * h) per lane, reduced once at the end
    chunks = tl.cdiv(I, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if PREFETCH:  # (as in _gate_up_block: the next step's loads before this step's products)
        w, wh = _down_loads(rows, h_ptr, 0, chunks, t, I, TOP_K, offs_s, valid, weights, experts, mask_n,
                            stride_we, stride_wk, BLOCK_K, H_CACHE)
        for step in range(1, TOP_K * chunks + 1):
            w_next, wh_next = _down_loads(rows, h_ptr, step, chunks, t, I, TOP_K, offs_s, valid, weights, experts,
                                          mask_n, stride_we, stride_wk, BLOCK_K, H_CACHE)
            acc += w.to(tl.float32) * wh[None, :]
            w, wh = w_next, wh_next
    else:
        for step in range(0, TOP_K * chunks):
            w, wh = _down_loads(rows, h_ptr, step, chunks, t, I, TOP_K, offs_s, valid, weights, experts, mask_n,
                                stride_we, stride_wk, BLOCK_K, H_CACHE)
            acc += w.to(tl.float32) * wh[None, :]
    out = tl.sum(acc, axis=1)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs_n * stride_oh, out.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit(do_not_specialize=["E", "TOP_K"])
def _gate_up_swiglu_kernel(x_ptr, ids_ptr, w_ptr, h_ptr, E, I, H, TOP_K,
                           stride_xt, stride_xh, stride_it, stride_ik, stride_we, stride_wn, stride_wk,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """Phase 1 alone, grid (T*k, I / BLOCK_N)."""
    _gate_up_block(x_ptr, ids_ptr, w_ptr, h_ptr, tl.program_id(0), tl.program_id(1), E, I, H, TOP_K,
                   stride_xt, stride_xh, stride_it, stride_ik, stride_we, stride_wn, stride_wk, BLOCK_N, BLOCK_K,
                   PREFETCH)


@triton.jit(do_not_specialize=["E", "TOP_K"])
def _down_sum_kernel(h_ptr, ids_ptr, weights_ptr, w_ptr, out_ptr, E, H, I, TOP_K,
                     stride_it, stride_ik, stride_rt, stride_rk, stride_we, stride_wn, stride_wk, stride_ot, stride_oh,
                     SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """Phase 2 alone, grid (T, H / BLOCK_N), after phase 1's launch."""
    _down_block(h_ptr, ids_ptr, weights_ptr, w_ptr, out_ptr, tl.program_id(0), tl.program_id(1), E, H, I, TOP_K,
                stride_it, stride_ik, stride_rt, stride_rk, stride_we, stride_wn, stride_wk, stride_ot, stride_oh,
                SLOTS, BLOCK_N, BLOCK_K, "", PREFETCH)


@triton.jit(do_not_specialize=["T", "E", "TOP_K"])
def _decode_experts_kernel(x_ptr, ids_ptr, weights_ptr, w1_ptr, w2_ptr, h_ptr, out_ptr, counter_ptr, T, E, H, I, TOP_K,
                           stride_xt, stride_xh, stride_it, stride_ik, stride_rt, stride_rk,
                           stride_1e, stride_1n, stride_1k, stride_2e, stride_2n, stride_2k, stride_ot, stride_oh,
                           SLOTS: tl.constexpr, BLOCK_N_GATE_UP: tl.constexpr, BLOCK_K_GATE_UP: tl.constexpr,
                           BLOCK_N_DOWN: tl.constexpr, BLOCK_K_DOWN: tl.constexpr, PREFETCH_GATE_UP: tl.constexpr,
                           PREFETCH_DOWN: tl.constexpr):
    """Both phases in one launch: each program walks the (slot, I block) items of phase 1, waits at the grid
    barrier (every program runs at once, see grid_sync), then walks the (token, H block) items of phase 2."""
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    # items in the two launches' order (their grids' first axis varies fastest): slot (token) first, then block
    slots = T * TOP_K
    for item in range(program, slots * tl.cdiv(I, BLOCK_N_GATE_UP), programs):
        block = item // slots
        _gate_up_block(x_ptr, ids_ptr, w1_ptr, h_ptr, item - block * slots, block, E, I, H, TOP_K,
                       stride_xt, stride_xh, stride_it, stride_ik, stride_1e, stride_1n, stride_1k,
                       BLOCK_N_GATE_UP, BLOCK_K_GATE_UP, PREFETCH_GATE_UP)
    grid_sync(counter_ptr, programs)
    for item in range(program, T * tl.cdiv(H, BLOCK_N_DOWN), programs):
        block = item // T
        _down_block(h_ptr, ids_ptr, weights_ptr, w2_ptr, out_ptr, item - block * T, block, E, H, I, TOP_K,
                    stride_it, stride_ik, stride_rt, stride_rk, stride_2e, stride_2n, stride_2k, stride_ot,
                    stride_oh, SLOTS, BLOCK_N_DOWN, BLOCK_K_DOWN, ".cg", PREFETCH_DOWN)
    grid_sync_done(counter_ptr, programs)


_GATE_UP = FastLauncher(_gate_up_swiglu_kernel)
_DOWN = FastLauncher(_down_sum_kernel)
_KERNEL = FastLauncher(_decode_experts_kernel)
# Two launches (_gate_up_swiglu_kernel, then _down_sum_kernel), or, with ONE_LAUNCH, one launch of
# _decode_experts_kernel with the grid barrier (a cooperative launch: the driver refuses a grid that would not
# fit at once). The one launch costs one launch less of host time (6-9 us on the H100 VM), and replayed from a
# CUDA graph it takes the same GPU time as the two, but its eager calls are slower where the layers take this
# path (H100: Qwen3-30B-A3B T=1 39.4 us against 38.2, T=2 69.2 against 61.3, gpt-oss-120b T=1 101.0 against
# 86.2; H200 the same way except Qwen3 T=1): the cooperative launch is slower to get going (NOTES items 24-25).
# Off. Two launches also wherever the barrier cannot be used: while a CUDA graph is captured (the barrier's
# counters and the plans' scratch belong to a stream, and a graph may be replayed on any), or once a GPU refused
# the cooperative launch.
ONE_LAUNCH = False
_ONE_LAUNCH_OK = [True]
ONE_LAUNCH_OPTIONS = dict(OPTIONS, launch_cooperative_grid=True)
# Launch plans, as grouped_gemm's: a repeated eager call with tensors of the same layout (shape, strides,
# dtype, device, 16-byte alignment) skips the checks, the block choice and the launch keys. A/B switch.
PLANS = True
MAX_PLANS = 256
MAX_STREAMS = 64  # (stream, thread) pairs whose scratch a plan keeps; past that it starts over
MAX_PROGRAMS_PER_SM = 8  # the one launch's grid: as many as the resources allow, at most this (all wait on one counter)
_PLANS: dict[tuple, _Plan] = {}
_MOST_PROGRAMS: dict[tuple, int] = {}  # a compiled one-launch kernel's key -> programs the GPU holds at once


class _Plan:
    """What a decode call with these layouts launches: the compiled kernel(s), grid(s) and scalar arguments."""

    __slots__ = ("device", "tokens", "hidden", "slots", "inter", "launches", "scratch", "layers_take_it")

    def __init__(self, device, tokens, hidden, slots, inter, launches, layers_take_it):
        self.device, self.tokens, self.hidden, self.slots, self.inter = device, tokens, hidden, slots, inter
        self.launches = launches  # (compiled kernel, grid, scalar arguments) of the one launch, or of the two
        # (stream, thread) -> (h, the one launch's barrier counters or None): h kept per stream, as launches on
        # one stream run in order (a call's down phase reads its h before the next call's gate_up phase writes
        # it), and per thread (two threads on one stream could interleave their two launches); one allocation
        # less per call (3.9 us of host on the H200 VM of perf/NOTES.md item 24), slots * I elements held
        self.scratch: dict[tuple, tuple] = {}
        self.layers_take_it = layers_take_it  # the layers' rule (layers_take) for these shapes

    @property
    def one_launch(self) -> bool:
        return len(self.launches) == 1

    def __call__(self, x, ids, weights, w1, w2, capturing: bool) -> torch.Tensor:
        out = x.new_empty(self.tokens, self.hidden)
        stream = launcher._current_stream(self.device)
        if capturing:  # (two launches: a graph may be replayed on any stream, so its h is its own)
            h = x.new_empty(self.slots, self.inter)
        else:
            owner = (stream, threading.get_ident())
            scratch = self.scratch.get(owner)
            if scratch is None:
                if len(self.scratch) >= MAX_STREAMS:
                    self.scratch.clear()
                scratch = self.scratch[owner] = (x.new_empty(self.slots, self.inter),
                                                 counters(x.device, stream) if self.one_launch else None)
            h, pair = scratch
        if self.one_launch:
            entry, grid, scalars = self.launches[0]
            _KERNEL.launch(entry, grid, (x, ids, weights, w1, w2, h, out, pair, *scalars), self.device, stream,
                           addresses=True)
            return out
        (entry, grid, scalars), (down_entry, down_grid, down_scalars) = self.launches
        _GATE_UP.launch(entry, grid, (x, ids, w1, h, *scalars), self.device, stream, addresses=True)
        _DOWN.launch(down_entry, down_grid, (h, ids, weights, w2, out, *down_scalars), self.device, stream,
                     addresses=True)
        return out


_CUDA = torch.cuda.is_available()


def _capturing() -> bool:
    return _CUDA and torch.cuda.is_current_stream_capturing()  # (a CPU build has no such query)


def layers_take(topk_ids: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """The layers' rule (see MAX_WEIGHT_BYTES): few slots, few bytes of weights (fewer while a CUDA graph is
    captured)."""
    slots = topk_ids.numel()
    if slots > MAX_SLOTS:
        return False
    per_expert = (gate_up_proj.numel() + down_proj.numel()) // max(gate_up_proj.shape[0], 1)
    limit = MAX_WEIGHT_BYTES_IN_GRAPH if _capturing() else MAX_WEIGHT_BYTES
    return slots * per_expert * gate_up_proj.element_size() <= limit


def _plan_key(x, ids, weights, w1, w2, transpose) -> tuple:
    # (the rule's limits and the switch too: a plan made under others is not reused)
    return (layout(x), layout(ids), layout(weights), layout(w1), layout(w2), transpose, MAX_SLOTS, MAX_WEIGHT_BYTES,
            ONE_LAUNCH, PREFETCH)


def planned(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose=True, *,
            layers=False) -> torch.Tensor | None:
    """The output of a call whose layouts ran (checked) before, from its plan; None where there is no plan
    (a new layout, a gradient to record, a changed current device, torch.compile, a one-launch plan or the
    layers' call while a CUDA graph is captured): then take the checked path.
    layers: for the layers, which take this path only by their rule (``layers_take``)."""
    if not (PLANS and _PLANS) or torch.compiler.is_compiling():
        return None
    try:
        key = _plan_key(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose)
    except AttributeError:  # not tensors: the checks name them
        return None
    plan = _PLANS.get(key)
    if plan is None or not direct_possible() or plan.device != launcher._current_device():
        return None
    if layers and not plan.layers_take_it:
        return None
    capturing = _capturing()
    if capturing and (layers or plan.one_launch):
        return None
    if torch.is_grad_enabled() and (hidden_states.requires_grad or topk_weights.requires_grad
                                    or gate_up_proj.requires_grad or down_proj.requires_grad):
        return None
    return plan(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, capturing)


def _block_n(rows: int, columns: int, sms: int) -> int:
    """The widest column block that still gives every SM PROGRAMS_PER_SM programs (decode streams weights: every
    SM must pull, with loads in flight)."""
    for block in (64, 32, 16):
        if rows * cdiv(columns, block) >= PROGRAMS_PER_SM * sms:
            return block
    return MIN_BLOCK_N


def _prefetch(kernel: str, block_n: int, block_k: int) -> bool:
    """Whether ``kernel`` ("gate_up": two [BLOCK_N, BLOCK_K] fp32 accumulators, "down": one) loads one step ahead:
    where they take at most PREFETCH_MAX_ACCUMULATOR[kernel] registers a thread, leaving room for a second step's
    tiles (past that the tiles spill or the occupancy drops, and it measured slower)."""
    if PREFETCH is not None:
        return PREFETCH
    accumulators = 2 if kernel == "gate_up" else 1
    return accumulators * block_n * block_k <= PREFETCH_MAX_ACCUMULATOR[kernel] * 32 * OPTIONS["num_warps"]


def _block_k(depth: int, widest: int) -> int:
    return max(16, min(widest, next_power_of_2(depth)))


def _nk_strides(w: torch.Tensor, transpose: bool) -> tuple[int, int, int]:
    """Strides of w seen as [E, N, K] (transpose=False stores [E, K, N])."""
    se, s1, s2 = w.stride()
    return (se, s1, s2) if transpose else (se, s2, s1)


def run_decode_experts(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, *, transpose=True,
                       remember=False):
    """``decode_experts`` without its checks: the layers call it with arguments they checked.

    remember: keep a launch plan for these layouts (only for arguments that passed the checks: a plan's
    calls skip them).
    """
    tokens, hidden = hidden_states.shape
    top_k = topk_ids.shape[1]
    num_experts = gate_up_proj.shape[0]
    inter = down_proj.shape[2] if transpose else down_proj.shape[1]
    out = hidden_states.new_empty(tokens, hidden)
    if tokens == 0 or top_k == 0:
        return out.zero_()
    slots = tokens * top_k
    h = hidden_states.new_empty(slots, inter)  # slot-major [T*k, I]; an invalid slot's row is written as 0, never read
    sms = num_sms(hidden_states.device)
    block_gate_up, block_down = _block_n(slots, inter, sms), _block_n(tokens, hidden, sms)
    gate_up = ((slots, cdiv(inter, block_gate_up)),
               (num_experts, inter, hidden, top_k, *hidden_states.stride(), *topk_ids.stride(),
                *_nk_strides(gate_up_proj, transpose)),
               dict(BLOCK_N=block_gate_up, BLOCK_K=_block_k(hidden, BLOCK_K_GATE_UP)))
    down = ((tokens, cdiv(hidden, block_down)),
            (num_experts, hidden, inter, top_k, *topk_ids.stride(), *topk_weights.stride(),
             *_nk_strides(down_proj, transpose), *out.stride()),
            dict(SLOTS=next_power_of_2(top_k), BLOCK_N=block_down,
                 BLOCK_K=_block_k(inter, BLOCK_K_DOWN_NARROW if block_down == MIN_BLOCK_N else BLOCK_K_DOWN)))
    gate_up[2]["PREFETCH"] = _prefetch("gate_up", block_gate_up, gate_up[2]["BLOCK_K"])
    down[2]["PREFETCH"] = _prefetch("down", block_down, down[2]["BLOCK_K"])
    gate_up_args = (hidden_states, topk_ids, gate_up_proj, h, *gate_up[1])
    down_args = (h, topk_ids, topk_weights, down_proj, out, *down[1])
    direct = direct_possible()
    device = launcher._current_device() if direct else None
    launches = None
    if ONE_LAUNCH and _ONE_LAUNCH_OK[0] and not _capturing():
        current = device if device is not None else (launcher._current_device() if hidden_states.is_cuda else None)
        stream = launcher._current_stream(current) if current is not None else 0
        scalars = (tokens, num_experts, hidden, inter, top_k, *hidden_states.stride(), *topk_ids.stride(),
                   *topk_weights.stride(), *_nk_strides(gate_up_proj, transpose), *_nk_strides(down_proj, transpose),
                   *out.stride())
        args = (hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, h, out,
                counters(hidden_states.device, stream), *scalars)
        constexprs = dict(SLOTS=down[2]["SLOTS"], BLOCK_N_GATE_UP=block_gate_up, BLOCK_K_GATE_UP=gate_up[2]["BLOCK_K"],
                          BLOCK_N_DOWN=block_down, BLOCK_K_DOWN=down[2]["BLOCK_K"],
                          PREFETCH_GATE_UP=gate_up[2]["PREFETCH"], PREFETCH_DOWN=down[2]["PREFETCH"])
        items = max(gate_up[0][0] * gate_up[0][1], down[0][0] * down[0][1])  # the two launches' grids
        launches = _one_launch(args, constexprs, items, device, hidden_states.device)
    if launches is None:
        if not direct:
            _GATE_UP(gate_up[0], gate_up_args, gate_up[2], OPTIONS)
            _DOWN(down[0], down_args, down[2], OPTIONS)
            return out
        launches = []
        for launch, (grid, scalars, constexprs), args in ((_GATE_UP, gate_up, gate_up_args), (_DOWN, down, down_args)):
            entry = launch.compiled(args, constexprs, OPTIONS, device)
            launch.launch(entry, grid, args, device)
            launches.append((entry, grid, scalars))
    elif direct and remember and PLANS:  # compile the two launches too: a CUDA graph captured later takes them
        for launch, (_, _, constexprs), args in ((_GATE_UP, gate_up, gate_up_args), (_DOWN, down, down_args)):
            launch.compiled(args, constexprs, OPTIONS, device)
    if remember and PLANS and direct and not _capturing():
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        key = _plan_key(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose)
        _PLANS[key] = _Plan(device, tokens, hidden, slots, inter, tuple(launches),
                            layers_take(topk_ids, gate_up_proj, down_proj))
    return out


def _one_launch(args, constexprs, items, device: int | None, torch_device: torch.device):
    """The launch with the grid barrier over as many programs as the GPU holds at once (one under the
    interpreter, which runs programs one after another). Returns what a plan repeats ([(compiled kernel, grid,
    scalars)]; an empty list where no direct launch is possible); None, launching nothing, once a cooperative
    launch was refused (the caller takes two launches)."""
    entry = None
    if device is not None or not INTERPRETER:  # (compiled: its resources size the grid)
        entry = _KERNEL.compiled(args, constexprs, ONE_LAUNCH_OPTIONS,
                                 device if device is not None else launcher._current_device())
    if INTERPRETER:
        programs = 1
    else:
        programs = _MOST_PROGRAMS.get(entry.key)
        if programs is None:
            # as many as fit (the two launches' grids run one program per item where they fit)
            programs = _MOST_PROGRAMS[entry.key] = most_programs(entry.kernel, torch_device, MAX_PROGRAMS_PER_SM)
    grid = (min(items, programs),)
    try:
        _launch_cooperative(entry, grid, args, constexprs, device)
    except RuntimeError as exc:
        if "cooperative" not in str(exc).lower():
            raise
        _ONE_LAUNCH_OK[0] = False  # e.g. a GPU shared with MPS limits: two launches from now on
        warnings.warn(f"moe_learn: the one-launch decode experts' cooperative launch was refused ({exc}); they take "
                      "two launches from now on", stacklevel=4)
        return None
    return [(entry, grid, args[8:])] if device is not None else []


def _launch_cooperative(entry, grid, args, constexprs, device: int | None) -> None:
    if device is None:  # no direct launch (the interpreter, a profiler's hooks): Triton's own
        _KERNEL(grid, args, constexprs, ONE_LAUNCH_OPTIONS)
    else:
        _KERNEL.launch(entry, grid, args, device)


def decode_experts(hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *, transpose: bool = True) -> torch.Tensor:
    """The expert half of an MoE MLP for a few tokens, in two launches (``ONE_LAUNCH``: one); returns ``[T, H]``.
    Inference only.

    Arguments as ``layers.experts.moe_experts``: hidden_states ``[T, H]``, topk_ids / topk_weights
    ``[T, k]``, gate_up_proj ``[E, 2I, H]`` (gate rows first) and down_proj ``[E, H, I]``
    (transpose=False: ``[E, H, 2I]`` and ``[E, I, H]``). For each token t and slot j with
    ``e = topk_ids[t, j]`` in [0, E): ``h = silu(gate) * up`` (float32, rounded to the dtype, as the
    grouped GEMM stores it), and ``out[t] = sum_j topk_weights[t, j] * down_e(h)`` summed in float32
    and rounded once. A slot whose id is outside [0, E) contributes nothing. Any number of tokens
    works; ``moe_experts`` takes this path only where it measured faster (``layers_take``): past that its
    grouped path reads each expert's weights once instead of once per slot, at a higher bandwidth.
    """
    out = planned(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose)
    if out is not None:
        return out
    check_moe_args(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose=transpose)
    if hidden_states.dtype not in DTYPES:
        raise TypeError(f"decode_experts takes hidden_states in {[str(d) for d in DTYPES]}, got "
                        f"{hidden_states.dtype}; for other dtypes use layers.experts.moe_experts (it runs PyTorch)")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (hidden_states, topk_weights, gate_up_proj,
                                                                   down_proj)):
        raise ValueError("decode_experts records no autograd and an input requires grad: call it under "
                         "torch.no_grad(), or use layers.experts.moe_experts, which is differentiable")
    check_kernel_device("decode_experts", hidden_states)
    return run_decode_experts(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose=transpose,
                              remember=True)
