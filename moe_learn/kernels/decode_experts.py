"""The experts of a decode step in two launches: no routing, no permutation, no sum afterwards.

At decode a layer sees a handful of tokens: T*k (token, slot) pairs, most of them on different
experts. The grouped path (``layers.experts``) first groups the pairs by expert (``route_ids``:
one launch), runs two grouped GEMMs whose tiles are 16 rows of mostly padding, writes ``[T*k, H]``
and sums its k slots (one more launch): four launches, each 10-40 us of host time on a VM
(perf/NOTES.md item 22), for GPU work of a few microseconds.

Here every slot is its own row, and the work is what it is at this size: streaming the chosen
experts' weights past one vector (a matrix-vector product, which tensor cores would not speed up).

- ``_gate_up_swiglu_kernel``, grid (T*k, I / BLOCK_N): slot s = (t, j) reads expert e = ids[t, j]'s
  gate and up rows for its column block, dots them with x[t] and stores ``h[s] = silu(gate) * up``.
- ``_down_sum_kernel``, grid (T, H / BLOCK_N): token t walks its k slots and adds
  ``w[t, j] * W_down[e] @ h[s]`` for its column block in float32; out[t] is written once.

Nothing is sorted, so nothing waits for a routing pass, and no expert that got no slot is read.
An expert that got several slots is read once per slot (from L2 when they run close together):
one reason the layers take this path only for a few slots (``layers_take``). Ids outside [0, E) skip
their slot: it contributes nothing, as ``drop_invalid`` says (transformers' expert-parallel
sentinels). Inference only: no autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_learn.device import check_kernel_device
from moe_learn.kernels import launcher
from moe_learn.kernels.autotune import num_sms
from moe_learn.kernels.grouped_gemm import _layout as layout
from moe_learn.kernels.launcher import FastLauncher, cdiv, direct_possible, next_power_of_2
from moe_learn.validation import check_moe_args

# When the layers (moe_experts, transformers' experts) take this path in inference: at most MAX_SLOTS (token,
# slot) pairs whose experts' weights come to at most MAX_WEIGHT_BYTES (counted once per slot, as read), and not
# while a CUDA graph is captured. Its kernels stream weights at 0.6-0.8 of what the grouped GEMMs reach, so it
# wins only where the grouped path's four launches cost more host time than that: on an H100 VM, Qwen3-30B-A3B
# at T = 1-2 (75-150 MB) and gpt-oss-120b at T = 1 (200 MB) won, everything from 300 MB up lost
# (perf/decode_experts.py, perf/NOTES.md item 22). In a CUDA graph host time is free: the grouped path wins.
MAX_SLOTS = 64
MAX_WEIGHT_BYTES = 224 * 2**20
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Launch parameters (perf/decode_experts.py --sweep compares others): the K block of each kernel (the gate_up
# kernel streams two tiles a step), the narrowest column block and the programs per SM to aim for.
BLOCK_K_GATE_UP, BLOCK_K_DOWN, MIN_BLOCK_N, PROGRAMS_PER_SM = 128, 256, 8, 2
OPTIONS = dict(num_warps=4, num_stages=4)


@triton.jit(do_not_specialize=["E", "TOP_K"])
def _gate_up_swiglu_kernel(x_ptr, ids_ptr, w_ptr, h_ptr, E, I, H, TOP_K,
                           stride_xt, stride_xh, stride_it, stride_ik, stride_we, stride_wn, stride_wk,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    slot = tl.program_id(0)
    t = slot // TOP_K
    e = tl.load(ids_ptr + t * stride_it + (slot - t * TOP_K) * stride_ik).to(tl.int64)
    # Another id contributes nothing: every load below is masked off (no traffic), h's row is 0 (bounds in
    # the masks rather than a branch around the loop).
    valid = (e >= 0) & (e < E)
    e = tl.where(valid, e, 0)
    k_end = tl.where(valid, H, 0)  # (bounds, not a scalar mask: the interpreter takes no scalar in a mask)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < tl.where(valid, I, 0)
    gate_rows = w_ptr + e * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn  # W[e, n, :], n < I: the gate
    up_rows = w_ptr + e * stride_we + (offs_n + I).to(tl.int64)[:, None] * stride_wn  # W[e, I + n, :]: the up
    x_row = x_ptr + t.to(tl.int64) * stride_xt
    # products summed per lane, reduced once after the loop (one reduction, not one per step)
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_row + offs_k * stride_xh, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        mask = mask_n[:, None] & mask_k[None, :]
        acc_gate += tl.load(gate_rows + offs_k[None, :] * stride_wk, mask=mask, other=0.0).to(tl.float32) * x
        acc_up += tl.load(up_rows + offs_k[None, :] * stride_wk, mask=mask, other=0.0).to(tl.float32) * x
    gate = tl.sum(acc_gate, axis=1)
    h = gate * tl.sigmoid(gate) * tl.sum(acc_up, axis=1)  # in fp32, rounded once: as the grouped GEMM's epilogue
    tl.store(h_ptr + slot.to(tl.int64) * I + offs_n, h.to(h_ptr.dtype.element_ty), mask=offs_n < I)


@triton.jit(do_not_specialize=["E", "TOP_K"])
def _down_sum_kernel(h_ptr, ids_ptr, weights_ptr, w_ptr, out_ptr, E, H, I, TOP_K,
                     stride_it, stride_ik, stride_rt, stride_rk, stride_we, stride_wn, stride_wk, stride_ot, stride_oh,
                     SLOTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
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
    bases = tl.where(valid, ids, 0) * stride_we
    bounds = tl.where(valid, I, 0)
    # one flat loop over (slot, K block), so that loads run ahead across slots too (a decode step has few K
    # blocks per slot); each step adds W_down[e] tile * (weight * h) per lane, reduced once at the end
    chunks = tl.cdiv(I, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for step in range(0, TOP_K * chunks):
        j = step // chunks
        this = offs_s == j
        offs_k = (step - j * chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < tl.sum(tl.where(this, bounds, 0))
        weight = tl.sum(tl.where(this, weights, 0.0))
        h = tl.load(h_ptr + (t * TOP_K + j).to(tl.int64) * I + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = tl.load(rows + tl.sum(tl.where(this, bases, 0)) + offs_k[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc += w.to(tl.float32) * (weight * h)[None, :]
    out = tl.sum(acc, axis=1)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs_n * stride_oh, out.to(out_ptr.dtype.element_ty), mask=mask_n)


_GATE_UP = FastLauncher(_gate_up_swiglu_kernel)
_DOWN = FastLauncher(_down_sum_kernel)
# Launch plans, as grouped_gemm's: a repeated eager call with tensors of the same layout (shape, strides,
# dtype, device, 16-byte alignment) skips the checks, the block choice and the launch keys. A/B switch.
PLANS = True
MAX_PLANS = 256
_PLANS: dict[tuple, _Plan] = {}


class _Plan:
    """What a decode call with these layouts launches: both compiled kernels, their grids and their scalars."""

    __slots__ = ("device", "tokens", "hidden", "slots", "inter", "gate_up", "down", "layers_take_it")

    def __init__(self, device, tokens, hidden, slots, inter, gate_up, down, layers_take_it):
        self.device, self.tokens, self.hidden, self.slots, self.inter = device, tokens, hidden, slots, inter
        self.gate_up, self.down = gate_up, down  # (compiled kernel, grid, scalar arguments)
        self.layers_take_it = layers_take_it  # the layers' rule (layers_take) for these shapes

    def __call__(self, x, ids, weights, w1, w2) -> torch.Tensor:
        out = x.new_empty(self.tokens, self.hidden)
        h = x.new_empty(self.slots, self.inter)
        entry, grid, scalars = self.gate_up
        _GATE_UP.launch(entry, grid, (x, ids, w1, h, *scalars), self.device)
        entry, grid, scalars = self.down
        _DOWN.launch(entry, grid, (h, ids, weights, w2, out, *scalars), self.device)
        return out


_CUDA = torch.cuda.is_available()


def _capturing() -> bool:
    return _CUDA and torch.cuda.is_current_stream_capturing()  # (a CPU build has no such query)


def layers_take(topk_ids: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """The layers' rule (see MAX_WEIGHT_BYTES): few slots, few bytes of weights, no CUDA graph being captured."""
    slots = topk_ids.numel()
    if slots > MAX_SLOTS or _capturing():
        return False
    per_expert = (gate_up_proj.numel() + down_proj.numel()) // max(gate_up_proj.shape[0], 1)
    return slots * per_expert * gate_up_proj.element_size() <= MAX_WEIGHT_BYTES


def _plan_key(x, ids, weights, w1, w2, transpose) -> tuple:
    # (the rule's limits too: a plan made under other limits is not reused)
    return layout(x), layout(ids), layout(weights), layout(w1), layout(w2), transpose, MAX_SLOTS, MAX_WEIGHT_BYTES


def planned(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose=True, *,
            layers=False) -> torch.Tensor | None:
    """The output of a call whose layouts ran (checked) before, from its plan; None where there is no plan
    (a new layout, a gradient to record, a changed current device, torch.compile): then take the checked path.
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
    if layers and (not plan.layers_take_it or _capturing()):
        return None
    if torch.is_grad_enabled() and (hidden_states.requires_grad or topk_weights.requires_grad
                                    or gate_up_proj.requires_grad or down_proj.requires_grad):
        return None
    return plan(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj)


def _block_n(rows: int, columns: int, sms: int) -> int:
    """The widest column block that still gives every SM PROGRAMS_PER_SM programs (decode streams weights: every
    SM must pull, with loads in flight)."""
    for block in (64, 32, 16):
        if rows * cdiv(columns, block) >= PROGRAMS_PER_SM * sms:
            return block
    return MIN_BLOCK_N


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
    h = hidden_states.new_empty(slots, inter)  # slot-major [T*k, I]; invalid slots' rows stay unwritten
    sms = num_sms(hidden_states.device)
    block = _block_n(slots, inter, sms)
    gate_up = ((slots, cdiv(inter, block)),
               (num_experts, inter, hidden, top_k, *hidden_states.stride(), *topk_ids.stride(),
                *_nk_strides(gate_up_proj, transpose)), dict(BLOCK_N=block, BLOCK_K=_block_k(hidden, BLOCK_K_GATE_UP)))
    block = _block_n(tokens, hidden, sms)
    down = ((tokens, cdiv(hidden, block)),
            (num_experts, hidden, inter, top_k, *topk_ids.stride(), *topk_weights.stride(),
             *_nk_strides(down_proj, transpose), *out.stride()),
            dict(SLOTS=next_power_of_2(top_k), BLOCK_N=block, BLOCK_K=_block_k(inter, BLOCK_K_DOWN)))
    gate_up_args = (hidden_states, topk_ids, gate_up_proj, h, *gate_up[1])
    down_args = (h, topk_ids, topk_weights, down_proj, out, *down[1])
    if not direct_possible():
        _GATE_UP(gate_up[0], gate_up_args, gate_up[2], OPTIONS)
        _DOWN(down[0], down_args, down[2], OPTIONS)
        return out
    device = launcher._current_device()
    launches = []
    for launch, (grid, scalars, constexprs), args in ((_GATE_UP, gate_up, gate_up_args), (_DOWN, down, down_args)):
        entry = launch.compiled(args, constexprs, OPTIONS, device)
        launch.launch(entry, grid, args, device)
        launches.append((entry, grid, scalars))
    if remember and PLANS:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        key = _plan_key(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose)
        _PLANS[key] = _Plan(device, tokens, hidden, slots, inter, *launches,
                            layers_take(topk_ids, gate_up_proj, down_proj))
    return out


def decode_experts(hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                   gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *, transpose: bool = True) -> torch.Tensor:
    """The expert half of an MoE MLP for a few tokens, in two launches; returns ``[T, H]``. Inference only.

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
