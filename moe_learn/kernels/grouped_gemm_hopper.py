"""The grouped GEMM tuned for Hopper (H100/H200): persistent, TMA loads, per-shape configs.

Same semantics as ``grouped_gemm`` (W in the ``[E, N, K]`` layout of the forward or the
``[E, K, N]`` layout the backward's dX reads it in, optional gather of X rows, scatter of
Y rows and routing weights); ``grouped_gemm`` sends bf16/fp16 work here on a Hopper GPU. What makes it fast (perf/NOTES.md has the measurements):

- A persistent grid, one program per SM, each taking every ``NUM_PROGRAMS``-th tile.
- The tile map lives in registers. Each program loads ``m_sizes`` once and prefix-sums
  it (rows and tiles per expert), so finding a tile's expert is a comparison and a few
  reductions, with no walk over memory. The loop over tiles is then a plain counted
  loop, which Triton can flatten with the K loop (``FLATTEN``): the next tile's loads
  start while the current tile's epilogue runs. Nothing waits on the host, so the
  launch can be captured in a CUDA graph; empty experts own no tiles.
- Inside an expert the M tile index runs fastest, so programs running side by side
  share one weight tile and each weight byte comes from DRAM about once (the small-T
  cases are bound by reading the weights).
- Weight tiles, and X tiles when X is not gathered, come through the tensor memory
  accelerator (TMA): hardware address generation, zero fill past the edges. Rows past
  an expert's end are loaded (next expert's rows or zero fill) but never stored.
- In the ``[E, K, N]`` layout the weight tile is ``[BLOCK_K, BLOCK_N]`` rows of the
  ``[E*K, N]`` view; when ``BLOCK_K`` does not divide K the last K step would read the next
  expert's rows, so such configs load W with masked loads instead of TMA (``W_TMA``).
- Host cost per call is small: the compiled kernel is launched directly
  (``launcher.FastLauncher``), descriptors are built field by field, a tuned bucket is
  one dict lookup, and a call that repeats an earlier one's layout reuses its
  ``LaunchPlan`` (config, grid, compiled kernel, tensor maps) without working any of it out.
- The MoE MLP's SwiGLU can run in the epilogue (``swiglu``): inference's ``silu(gate) * up``;
  training's forward storing gate_up and the weighted h from one pair of accumulators; and
  GEMM2's dX turning each tile of d_h into d_gate_up, h and the router's gradient
  (``kernels/swiglu.py`` times those against separate passes: they lose where the GEMM is
  compute bound).
- Autotuning keyed on shape buckets: the first call for a (N, K, E, rows-per-expert
  bucket, dtype, fusion) key times a few candidate configs and caches the fastest in
  ``TUNED``; later calls with any routing in the same bucket reuse it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moe_learn.kernels import autotune, launcher
from moe_learn.kernels.autotune import autotune_enabled, choose_config, num_sms
from moe_learn.kernels.launcher import FastLauncher, cdiv

try:  # Triton >= 3.4: host-side tensor descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: grouped_gemm keeps its portable kernel
    TensorDescriptor = None


@triton.jit
def _grouped_gemm_tma_kernel(
    x_ptr, x_desc, w_ptr, w_desc, y_ptr, m_sizes_ptr, gather_ptr, weights_ptr, bias_ptr,
    gate_up_ptr, d_gate_up_ptr, d_weights_ptr,  # [M, 2N], [M, 2N], [cdiv(N, BLOCK_N), M] (SAVE_GATE_UP, SWIGLU_BWD)
    N, K, E, stride_xm, stride_ym,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, NUM_PROGRAMS: tl.constexpr, PERMUTE_X: tl.constexpr, PERMUTE_Y: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, HAS_BIAS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    W_KN: tl.constexpr,  # W is [E, K, N] (the backward's dX reads the forward's W this way), else [E, N, K]
    W_TMA: tl.constexpr,  # W through TMA; False for [E, K, N] with K % BLOCK_K != 0, or the SwiGLU's up half
    # not starting on 16 bytes (masked loads)
    SWIGLU: tl.constexpr,  # W holds 2N outputs, [gate | up]; Y = silu(X @ W_gate.T) * (X @ W_up.T), N columns
    SAVE_GATE_UP: tl.constexpr,  # (with SWIGLU) also store gate and up, as training's backward needs them
    SWIGLU_BWD: tl.constexpr,  # the product is d_h: the weighted SwiGLU's backward in the epilogue (kernels/swiglu.py)
):
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    if SWIGLU:  # rows of W per expert ([E, N, K]) or columns ([E, K, N])
        W_N = 2 * N
    else:
        W_N = N
    offs_k = tl.arange(0, BLOCK_K)
    # rows of the expert-ordered problem (and of Y): X's rows, or its tokens x TOP_K when gathered
    if PERMUTE_X:
        M = x_desc.shape[0] * TOP_K
    else:
        M = x_desc.shape[0]
    # The tile map, per expert: rows, first row, first tile (exclusive prefix sums). Rows are
    # clamped into [0, M) whatever m_sizes holds (validate=False skips the check): a negative
    # size counts as 0 and no expert reaches past row M. Summed in int64, then int32 (TMA
    # coordinates are 32-bit).
    offs_e = tl.arange(0, BLOCK_E)
    sizes = tl.maximum(tl.load(m_sizes_ptr + offs_e, mask=offs_e < E, other=0).to(tl.int64), 0)
    rows_through = tl.cumsum(sizes, axis=0)
    row_begin = tl.minimum(rows_through - sizes, M).to(tl.int32)
    sizes = tl.minimum(rows_through, M).to(tl.int32) - row_begin
    m_tiles = tl.cdiv(sizes, BLOCK_M)
    tile_end = tl.cumsum(m_tiles * num_n_tiles, axis=0)
    tile_begin = tile_end - m_tiles * num_n_tiles
    num_tiles = tl.sum(m_tiles * num_n_tiles)

    for tile_id in tl.range(pid, num_tiles, NUM_PROGRAMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        e = tl.sum((tile_end <= tile_id).to(tl.int32))  # experts whose tiles all come before
        this = offs_e == e
        m_e = tl.sum(tl.where(this, sizes, 0))
        num_m_tiles = tl.sum(tl.where(this, m_tiles, 0))
        local = tile_id - tl.sum(tl.where(this, tile_begin, 0))
        row_start = tl.sum(tl.where(this, row_begin, 0))
        tile_m = local % num_m_tiles  # M fastest: neighbours share the weight tile
        tile_n = local // num_m_tiles
        offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_e
        rows = row_start + offs_m  # rows in expert order
        n0 = tile_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if PERMUTE_X or PERMUTE_Y:
            flat = tl.load(gather_ptr + rows, mask=mask_m, other=0)  # (token, slot) of each row
            # an index outside [0, M) (unchecked with validate=False) drops its row
            mask_m = mask_m & (flat >= 0) & (flat < M)
        if PERMUTE_X:  # gather token rows straight from X in token order
            src = flat // TOP_K
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if SWIGLU:  # the up half's tile, N columns further along W: both halves of a column block in one program
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if PERMUTE_X:
                x = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_xm + (k0 + offs_k)[None, :],
                            mask=mask_m[:, None] & (offs_k[None, :] < K - k0), other=0.0)
            else:
                x = x_desc.load([row_start + tile_m * BLOCK_M, k0])
            if not W_KN:  # [E*N, K] rows: a [BLOCK_N, BLOCK_K] tile, zero past K
                acc = tl.dot(x, w_desc.load([e * W_N + n0, k0]).T, acc)
                if SWIGLU:
                    acc_up = tl.dot(x, w_desc.load([e * W_N + N + n0, k0]).T, acc_up)
            elif W_TMA:  # [E*K, N] rows: a [BLOCK_K, BLOCK_N] tile; K % BLOCK_K == 0 keeps it inside expert e
                acc = tl.dot(x, w_desc.load([e * K + k0, n0]), acc)
                if SWIGLU:
                    acc_up = tl.dot(x, w_desc.load([e * K + k0, N + n0]), acc_up)
            else:  # the K tail would reach into expert e + 1's rows: masked loads instead
                w_rows = w_ptr + (e.to(tl.int64) * K + k0 + offs_k)[:, None] * W_N  # int64: one expert may pass 2**31
                mask_w = (offs_k[:, None] < K - k0) & (offs_n[None, :] < N)
                acc = tl.dot(x, tl.load(w_rows + offs_n[None, :], mask=mask_w, other=0.0), acc)
                if SWIGLU:
                    acc_up = tl.dot(x, tl.load(w_rows + N + offs_n[None, :], mask=mask_w, other=0.0), acc_up)
        if SAVE_GATE_UP or SWIGLU_BWD:  # gate_up [M, 2N] in expert order: row r's gate, then its up, N further
            pre = gate_up_ptr + rows.to(tl.int64)[:, None] * (2 * N) + offs_n[None, :]
            mask_mn = mask_m[:, None] & (offs_n[None, :] < N)
        if SWIGLU:  # in fp32, before rounding: silu(gate) * up
            if SAVE_GATE_UP:
                tl.store(pre, acc.to(gate_up_ptr.dtype.element_ty), mask=mask_mn)
                tl.store(pre + N, acc_up.to(gate_up_ptr.dtype.element_ty), mask=mask_mn)
            acc = acc * tl.sigmoid(acc) * acc_up
        if SWIGLU_BWD:  # acc = d_h, the gradient of h = w * silu(gate) * up; gate and up come from the forward
            gate = tl.load(pre, mask=mask_mn, other=0.0).to(tl.float32)
            up = tl.load(pre + N, mask=mask_mn, other=0.0).to(tl.float32)
            w = tl.load(weights_ptr + flat, mask=mask_m, other=0.0).to(tl.float32)[:, None]
            sig = tl.sigmoid(gate)
            silu = gate * sig
            s = silu * up
            # this column block's share of d_w[flat] = <d_h, s>: one partial per block, summed after the launch
            # (a fixed order, where atomics would make the router's gradient vary run to run)
            tl.store(d_weights_ptr + tile_n.to(tl.int64) * M + flat, tl.sum(acc * s, axis=1), mask=mask_m)
            d_s = acc * w
            d_pre = d_gate_up_ptr + rows.to(tl.int64)[:, None] * (2 * N) + offs_n[None, :]
            tl.store(d_pre, (d_s * up * sig * (1 + gate * (1 - sig))).to(d_gate_up_ptr.dtype.element_ty),
                     mask=mask_mn)
            tl.store(d_pre + N, (d_s * silu).to(d_gate_up_ptr.dtype.element_ty), mask=mask_mn)
            acc = w * s  # Y is h, recomputed for dW2
        if PERMUTE_Y:  # each row goes back to its (token, slot) position
            out_rows = flat
        else:
            out_rows = rows
        if HAS_BIAS:  # bias [E, N] contiguous; added before the routing weight
            acc += tl.load(bias_ptr + e.to(tl.int64) * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if HAS_WEIGHTS:  # row r's weight is that of its (token, slot), flat = gather_indices[r]
            acc = acc * tl.load(weights_ptr + flat, mask=mask_m, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + out_rows.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_n[None, :] < N))


def _config(m, n, k, warps, stages, warp_specialize=False):
    # Warp specialisation (producer/consumer warps) and flattening don't go together here.
    return dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=warps, num_stages=stages,
                FLATTEN=not warp_specialize, WARP_SPECIALIZE=warp_specialize)


# Candidates by average rows per expert, from the sweeps on an H100 (perf/NOTES.md): few
# rows -> the weights dominate, deep K tiles; many rows -> 128x256 tiles, where 3 or 4
# stages and warp specialisation win by turns. The first is the default without tuning.
# The two smallest buckets are decode: a token's k experts get a row or a few each, the
# work is streaming their weights, and a 64- or 128-row tile would be mostly padding; 16-
# and 32-row tiles with narrow N tiles give more tiles (all SMs streaming) and deeper pipelines.
SMALL_M_BUCKETS = (
    (4, (_config(16, 64, 128, 4, 6), _config(16, 128, 128, 4, 4), _config(32, 64, 256, 4, 4),
         _config(64, 128, 128, 4, 4))),
    (16, (_config(32, 128, 128, 4, 4), _config(16, 64, 128, 4, 6), _config(64, 128, 128, 4, 4),
          _config(128, 128, 128, 8, 3))),
)
CANDIDATES_BY_ROWS_PER_EXPERT = SMALL_M_BUCKETS + (
    (64, (_config(128, 128, 128, 8, 3), _config(64, 128, 128, 4, 4), _config(64, 256, 64, 4, 4))),
    (160, (_config(64, 128, 128, 4, 4), _config(64, 256, 64, 4, 4), _config(128, 256, 64, 8, 4),
           _config(128, 128, 128, 8, 3))),
    # few tiles per wave at this size: smaller tiles trade per-tile speed for fuller waves
    (384, (_config(128, 256, 64, 8, 4), _config(128, 256, 64, 8, 3), _config(128, 256, 64, 8, 4, True),
           _config(128, 128, 128, 8, 3), _config(64, 256, 64, 4, 4))),
    (float("inf"), (_config(128, 256, 64, 8, 3), _config(128, 256, 64, 8, 4), _config(128, 256, 64, 8, 3, True),
                    _config(128, 256, 64, 8, 4, True))),
)
# Switches for A/B runs (perf/ab_kernels.py); tuned choices are cached per key, so clear
# autotune.TUNED after flipping one.
SMALL_M = True  # the decode buckets above; False: up to 64 rows per expert use the 64-row bucket
KN_LAYOUT = True  # grouped_gemm(transpose=False) (the backward's dX) runs here; False: the portable kernel
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "FLATTEN", "WARP_SPECIALIZE",
               "NUM_PROGRAMS")


def candidates(rows: int, num_experts: int) -> tuple[dict, ...]:
    per_expert = rows / max(num_experts, 1)
    buckets = CANDIDATES_BY_ROWS_PER_EXPERT if SMALL_M else CANDIDATES_BY_ROWS_PER_EXPERT[len(SMALL_M_BUCKETS):]
    for limit, configs in buckets:
        if per_expert <= limit:
            return configs
    raise AssertionError("unreachable: the last bucket has no limit")


def pick_config(rows: int, num_experts: int) -> dict:
    """The untuned choice for ``rows`` expert-ordered rows over ``num_experts`` experts."""
    return dict(candidates(rows, num_experts)[0])


def tuning_key(rows, N, K, E, dtype, permute_x, permute_y, weighted, biased=False, w_kn=False, swiglu=False) -> tuple:
    """Routings differ call to call; rows per expert, rounded up to a power of two, do not."""
    return (N, K, E, autotune.rows_bucket(rows, E), str(dtype), permute_x, permute_y, weighted, biased, w_kn, swiglu)


def swiglu_candidates(configs) -> tuple[dict, ...]:
    """The fused SwiGLU keeps two accumulators (gate and up): column tiles of at most 128 keep them in registers."""
    out = []
    for config in configs:
        narrowed = {**config, "BLOCK_N": min(config["BLOCK_N"], 128)}
        if narrowed not in out:
            out.append(narrowed)
    return tuple(out)


@functools.cache
def capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def unsupported_reason(X: torch.Tensor, W: torch.Tensor, transpose: bool) -> str | None:
    """Why the TMA kernel cannot take these operands, or None when it can."""
    if TensorDescriptor is None:
        return "this Triton has no tensor descriptors (needs 3.4 or newer)"
    if not transpose and not KN_LAYOUT:
        return "reading W in the [E, K, N] layout (transpose=False) is switched off (grouped_gemm_hopper.KN_LAYOUT)"
    if X.is_cuda and capability(X.device.index)[0] < 9:
        return "TMA needs a Hopper (sm90) or newer GPU"
    experts, _, inner = W.shape
    if experts == 0:
        return "W has no experts"
    x_row_stride, x_col_stride = X.stride()
    if not W.is_contiguous() or x_col_stride != 1:
        return "W must be contiguous and X must have unit stride along K"
    elem = X.element_size()
    if (inner * elem) % 16 or (x_row_stride * elem) % 16 or W.data_ptr() % 16 or X.data_ptr() % 16:
        name = "K" if transpose else "N"
        return f"TMA needs 16-byte aligned rows ({name} * element size and X's row stride multiples of 16)"
    return None


def auto_candidate(X: torch.Tensor) -> bool:
    """Whether ``kernel="auto"`` tries this path: bf16/fp16 on a GPU (fp32 would run its dots in tf32)."""
    return X.is_cuda and X.dtype in (torch.bfloat16, torch.float16)


def grouped_gemm_hopper(
    X: torch.Tensor,
    W: torch.Tensor,
    m_sizes: torch.Tensor,
    out: torch.Tensor,
    *,
    gather_indices: torch.Tensor | None = None,
    topk: int = 1,
    permute_x: bool = False,
    permute_y: bool = False,
    topk_weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    transpose: bool = True,
    config: dict | None = None,
    swiglu: bool | str = False,
    gate_up: torch.Tensor | None = None,
    d_gate_up: torch.Tensor | None = None,
    d_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill ``out`` with ``Y_e = X_e @ W_e.T (+ bias[e])`` for all experts in one persistent launch.

    W is ``[E, N, K]`` (transpose=True) or ``[E, K, N]`` (``Y_e = X_e @ W_e``, the backward's dX).
    swiglu, the SwiGLU of an MoE MLP in the epilogue (no bias or scatter with it):

    * ``True``: W has 2N outputs, gate half then up half (``gate_up_proj``); ``out`` ``[M, N]``
      gets ``silu(gate) * up`` (inference).
    * ``"save"``: the same times the row's routing weight ``topk_weights.flat[gather_indices[r]]``,
      and gate and up also stored in ``gate_up`` ``[M, 2N]`` (training's forward).
    * ``"backward"``: the product is ``d_h``, the gradient of ``h = w * silu(gate) * up`` (GEMM2's
      dX); from ``gate_up`` ``[M, 2N]`` the epilogue writes ``d_gate_up`` ``[M, 2N]``, ``d_weights``
      (float32, ``[M]`` in (token, slot) order) and ``out = h``.

    Arguments are taken as valid: ``grouped_gemm`` (or ``kernels/swiglu.py``) checks them first.
    ``config`` overrides the tuned (or, without tuning, the default) choice; keys: ``CONFIG_KEYS``.
    """
    M, N = out.shape
    if M == 0:
        return out
    E, K = W.shape[0], X.shape[1]
    run = functools.partial(_launch, X=X, W=W, m_sizes=m_sizes, out=out, gather_indices=gather_indices, topk=topk,
                            permute_x=permute_x, permute_y=permute_y, topk_weights=topk_weights, bias=bias,
                            transpose=transpose, swiglu=swiglu, gate_up=gate_up, d_gate_up=d_gate_up,
                            d_weights=d_weights)
    if config:
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}; allowed: {list(CONFIG_KEYS)}")
        return run({**pick_config(M, E), **config})
    key = tuning_key(M, N, K, E, X.dtype, permute_x, permute_y, topk_weights is not None, bias is not None,
                     not transpose, swiglu)
    cfg = autotune.TUNED.get(key)  # the hot path: this bucket was tuned before
    if cfg is None:
        if autotune_enabled(X):
            cfg = choose_config(key, swiglu_candidates(candidates(M, E)) if swiglu else candidates(M, E), run)
        else:
            cfg = _untuned_config(M, E, swiglu)
    return run(cfg)


def _untuned_config(rows: int, num_experts: int, swiglu) -> dict:
    """What ``grouped_gemm_hopper`` runs for an untuned bucket while tuning is off: its first candidate."""
    configs = candidates(rows, num_experts)
    return dict((swiglu_candidates(configs) if swiglu else configs)[0])


def _descriptor_defaults() -> dict | None:
    """The fields of ``TensorDescriptor`` that have defaults, or None when it cannot be built field by field."""
    if TensorDescriptor is None or not dataclasses.is_dataclass(TensorDescriptor) or hasattr(TensorDescriptor,
                                                                                            "__slots__"):
        return None
    fields = dataclasses.fields(TensorDescriptor)
    if {f.name for f in fields if f.default is dataclasses.MISSING} != {"base", "shape", "strides", "block_shape"}:
        return None
    return {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}


_DESCRIPTOR_DEFAULTS = _descriptor_defaults()


def tensor_descriptor(base: torch.Tensor, shape: tuple, strides: tuple, block_shape: list):
    """``TensorDescriptor(base, shape, strides, block_shape)`` without its per-call checks (~2 us each).

    Safe because ``unsupported_reason`` checked what they check (16-byte aligned base and
    row strides, unit inner stride) and the caller never passes an empty shape.
    """
    if _DESCRIPTOR_DEFAULTS is None:  # a Triton whose descriptor is not a plain dataclass
        return TensorDescriptor(base, list(shape), list(strides), block_shape)
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(_DESCRIPTOR_DEFAULTS, base=base, shape=shape, strides=strides, block_shape=block_shape)
    return desc


_LAUNCH = FastLauncher(_grouped_gemm_tma_kernel)


class Geometry(NamedTuple):
    """What a launch works out from shapes, strides, dtypes and the config alone (no data)."""

    programs: int
    x_desc: tuple  # (shape, strides, block) of X's tensor descriptor
    w_desc: tuple | None  # W's, or None where W is read with masked loads
    scalars: tuple  # N, K, E, X's row stride, out's row stride
    constexprs: dict
    options: dict


def _geometry(cfg, X, W, out, *, topk, permute_x, permute_y, weighted, biased, transpose, swiglu) -> Geometry:
    E, K = W.shape[0], X.shape[1]
    M, N = out.shape
    backward = swiglu == "backward"
    w_n = 2 * N if swiglu and not backward else N  # W's outputs per expert
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    # [E*K, W_N] through TMA needs each K step inside expert e (K % BLOCK_K == 0) and, with the SwiGLU's up
    # half N columns along, that column to start on 16 bytes (the interpreter asserts it; masked loads otherwise)
    w_tma = transpose or (K % bk == 0 and not (swiglu and not backward and N * W.element_size() % 16))
    if transpose:
        w_desc = ((E * w_n, K), (K, 1), [bn, bk])
    elif w_tma:
        w_desc = ((E * K, w_n), (w_n, 1), [bk, bn])
    else:
        w_desc = None
    # more programs than tiles would only idle. At most min(E, M) experts have rows, and each
    # adds at most one ragged row block, so the tiles number at most this:
    max_tiles = (M + min(E, M) * (bm - 1)) // bm * cdiv(N, bn)
    programs = min(cfg.get("NUM_PROGRAMS") or num_sms(X.device), max_tiles)
    constexprs = dict(
        TOP_K=topk, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=1 << (E - 1).bit_length(), NUM_PROGRAMS=programs,
        PERMUTE_X=permute_x, PERMUTE_Y=permute_y,
        # the fused SwiGLUs read the weights themselves (forward: folded into h; backward: d_h -> d_gate_up)
        HAS_WEIGHTS=weighted and swiglu in (False, "save"), HAS_BIAS=biased,
        FLATTEN=cfg["FLATTEN"], WARP_SPECIALIZE=cfg["WARP_SPECIALIZE"], W_KN=not transpose, W_TMA=w_tma,
        SWIGLU=bool(swiglu) and not backward, SAVE_GATE_UP=swiglu == "save", SWIGLU_BWD=backward,
    )
    return Geometry(programs, ((X.shape[0], K), (X.stride(0), 1), [bm, bk]), w_desc, (N, K, E, X.stride(0), out.stride(0)),
                    constexprs, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


X_DESC, W_DESC = 1, 3  # where the descriptors are in the kernel's arguments


def _arguments(geometry: Geometry, X, W, m_sizes, out, gather_indices, topk_weights, bias, gate_up=None,
               d_gate_up=None, partials=None, describe=True, contiguous=False) -> tuple:
    """The kernel's runtime arguments, in its order (``describe=False``: None for the descriptors, whose
    tensor maps the caller passes instead). contiguous: the caller knows m_sizes, gather_indices, topk_weights
    and bias are contiguous (a launch plan, whose key holds their strides), so they go as they are (the kernel
    reads only their addresses) instead of through ``.contiguous()`` and ``reshape``."""
    if not contiguous:
        m_sizes = m_sizes.contiguous()  # read at unit stride, like the gather indices
        gather_indices = gather_indices.contiguous() if gather_indices is not None else None
        topk_weights = topk_weights.reshape(-1).contiguous() if topk_weights is not None else None
        bias = bias.contiguous() if bias is not None else None
    placeholder = m_sizes  # for pointers a variant never reads
    w_desc = geometry.w_desc
    if not describe:
        x_desc = w_desc = None
    else:
        x_desc = tensor_descriptor(X, *geometry.x_desc)
        w_desc = tensor_descriptor(W, *w_desc) if w_desc else None
    return (X, x_desc, W, w_desc, out,
            m_sizes, gather_indices if gather_indices is not None else placeholder,
            topk_weights if topk_weights is not None else placeholder, bias if bias is not None else placeholder,
            gate_up if gate_up is not None else placeholder, d_gate_up if d_gate_up is not None else placeholder,
            partials if partials is not None else placeholder, *geometry.scalars)


def _launch(cfg, *, X, W, m_sizes, out, gather_indices, topk, permute_x, permute_y, topk_weights, bias,
            transpose=True, swiglu=False, gate_up=None, d_gate_up=None, d_weights=None):
    geometry = _geometry(cfg, X, W, out, topk=topk, permute_x=permute_x, permute_y=permute_y,
                         weighted=topk_weights is not None, biased=bias is not None, transpose=transpose, swiglu=swiglu)
    backward = swiglu == "backward"
    # the backward's d_weights, one partial row per column block (written where a row is valid, else 0)
    M, N = out.shape
    partials = torch.zeros(cdiv(N, cfg["BLOCK_N"]), M, dtype=torch.float32, device=out.device) if backward else None
    _LAUNCH((geometry.programs,), _arguments(geometry, X, W, m_sizes, out, gather_indices, topk_weights, bias, gate_up,
                                            d_gate_up, partials), geometry.constexprs, geometry.options)
    if backward:
        torch.sum(partials, dim=0, out=d_weights)
    return out


class LaunchPlan:
    """One ``grouped_gemm_hopper`` launch worked out once, for a caller that repeats it with new tensors.

    A decode step calls the same GEMMs with tensors of the same shapes, strides, dtypes and
    alignment every time; everything the launch derives from those (the tuned config, the
    grid, the constexprs, the compiled kernel) is kept here, and so are the tensor maps of
    the addresses seen (a map encodes an address and the geometry, which the plan fixes), so a
    repeat costs building the argument tuple and the launch itself. The caller keys plans on
    all of that (``grouped_gemm._layout``). A plan stays ``current`` while its bucket's tuned
    config is the one it was made with (``autotune.TUNED`` cleared or retuned: a new plan; a
    plan of an untuned bucket, made while tuning was off, until tuning is on again), the
    direct launch is possible, and the current device is the same.
    """

    __slots__ = ("key", "tuned", "geometry", "entry", "device", "rows", "cols", "maps", "mappable", "contiguous")
    MAX_MAPS = 64  # (X, W) address pairs whose tensor maps are kept; past that they start over

    def __init__(self, key, tuned, geometry, entry, device, rows, cols, contiguous=False):
        self.key, self.tuned, self.geometry, self.entry = key, tuned, geometry, entry
        self.device, self.rows, self.cols = device, rows, cols
        self.maps: dict[tuple, list] = {}
        raw = entry.raw
        self.mappable = raw is not None and bool(raw.positions) and set(raw.positions) <= {X_DESC, W_DESC}
        # m_sizes, the gather indices, the routing weights and the bias were contiguous when the plan was made;
        # the caller's key holds their strides, so they are at every call (``_arguments``' contiguous)
        self.contiguous = contiguous

    def current(self, X) -> bool:
        tuned = autotune.TUNED.get(self.key)
        if tuned is not self.tuned or (tuned is None and autotune_enabled(X)):  # (the next call would tune)
            return False
        return launcher.direct_possible() and launcher._current_device() == self.device

    def __call__(self, X, W, m_sizes, out, gather_indices, topk_weights, bias) -> torch.Tensor:
        if out is None:
            out = X.new_empty(self.rows, self.cols)
        grid = (self.geometry.programs,)
        if not (self.mappable and _LAUNCH.launch_with_maps(
                self.entry, grid, _arguments(self.geometry, X, W, m_sizes, out, gather_indices, topk_weights, bias,
                                             describe=False, contiguous=self.contiguous),
                lambda: self._maps(X, W), self.device, addresses=True)):
            args = _arguments(self.geometry, X, W, m_sizes, out, gather_indices, topk_weights, bias)
            _LAUNCH.launch(self.entry, grid, args, self.device, addresses=True)
        return out

    def _maps(self, X, W) -> list:
        """The tensor maps of X's and W's descriptors (those the compiled kernel takes), made once per address."""
        key = (X.data_ptr(), W.data_ptr())
        maps = self.maps.get(key)
        if maps is None:
            if len(self.maps) >= self.MAX_MAPS:
                self.maps.clear()
            raw = self.entry.raw
            bases = {X_DESC: (X, self.geometry.x_desc), W_DESC: (W, self.geometry.w_desc)}
            maps = self.maps[key] = [list(raw.make_arg(tensor_descriptor(bases[position][0], *bases[position][1]),
                                                       meta)) for position, meta in zip(raw.positions, raw.metas,
                                                                                        strict=True)]
        return maps


def make_plan(X, W, m_sizes, out, *, gather_indices=None, topk=1, permute_x=False, permute_y=False, topk_weights=None,
              bias=None, transpose=True, swiglu=False) -> LaunchPlan | None:
    """The plan of the launch ``grouped_gemm_hopper`` (without a config) makes for these arguments.

    None where there is nothing to keep: no direct launch (interpreter, a profiler's hooks),
    no rows, a training SwiGLU mode, or a bucket not tuned yet while tuning is on (its next
    call tunes it).
    """
    if swiglu not in (False, True) or not launcher.direct_possible():
        return None
    M, N = out.shape
    if M == 0:
        return None
    key = tuning_key(M, N, X.shape[1], W.shape[0], X.dtype, permute_x, permute_y, topk_weights is not None,
                     bias is not None, not transpose, swiglu)
    tuned = autotune.TUNED.get(key)
    if tuned is None and autotune_enabled(X):
        return None
    geometry = _geometry(tuned or _untuned_config(M, W.shape[0], swiglu), X, W, out, topk=topk, permute_x=permute_x, permute_y=permute_y,
                         weighted=topk_weights is not None, biased=bias is not None, transpose=transpose, swiglu=swiglu)
    device = launcher._current_device()
    entry = _LAUNCH.compiled(_arguments(geometry, X, W, m_sizes, out, gather_indices, topk_weights, bias),
                             geometry.constexprs, geometry.options, device)
    contiguous = all(t is None or t.is_contiguous() for t in (m_sizes, gather_indices, topk_weights, bias))
    return LaunchPlan(key, tuned, geometry, entry, device, M, N, contiguous)
