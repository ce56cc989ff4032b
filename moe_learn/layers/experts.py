"""The expert half of an MoE MLP: route, GEMM1 (gather), SwiGLU, GEMM2 (scatter), combine.

One home for every way the course runs the experts:

* ``moe_experts(..., backend="triton")``: the course's grouped GEMMs with the permutations
  fused into them, differentiable (the hand-written backward below);
* ``moe_experts(..., backend="torch")``: the same formulas on the PyTorch references, which
  is what float64 gradcheck verifies;
* ``fused_moe_experts``: the Triton experts with a launch ``config`` (inference or training);
* ``fused_moe_forward``: router -> fused routing -> fused experts, a whole MoE MLP.

All of them are differentiable and traceable by ``torch.compile(fullgraph=True)``: the
Triton GEMMs are ``torch.library`` ops (``moe_learn.kernels.ops``), the routing is plain
tensor code with no host sync, and the autograd Function below is traceable too.

Forward, per row r of the expert-ordered problem, which belongs to (token t, slot j)
``= divmod(gather_indices[r], k)`` and expert e (``x = hidden_states``, ``w_r = topk_weights[t, j]``):

    g_r   = x_t @ W1_e.T                   GEMM1, rows gathered from token order     [M, 2I]
    h_r   = w_r * silu(g_gate) * g_up      SwiGLU with the routing weight folded in  [M, I]
    y_tj  = h_r @ W2_e.T                   GEMM2, rows scattered to (t, j) order     [M, H]
    out_t = sum_j y_tj

Backward, given ``d_out [T, H]``:

    a_r     = d_out_t @ W2_e               grouped GEMM reading d_out's rows by token (other W layout)
    d_w_tj  = <a_r, silu(g_gate) * g_up>   the router's gradient       } the SwiGLU's backward: one
    dg_r    = SwiGLU'(g_r) * (w_r a_r)                                  } element-wise pass, or a's
    h_r     = recomputed                                               } epilogue (kernels/swiglu.py)
    dW2_e   = sum_r d_out_t.T h_r          weight-gradient kernel, d_out rows read by token
    dW1_e   = dg_e.T @ x_e                 weight-gradient kernel, x gathered from token order
    dx_t    = sum_j (dg_r @ W1_e)          forward kernel scattering to (t, j), summed over j

Folding w into h (GEMM2 is linear in its rows) is what keeps the backward lean: nothing of
size ``[M, H]`` is kept from the forward (only g), and no weighted copy of ``d_out`` is made;
the expert outputs, weighted or not, never exist outside GEMM2's output. Inference (no
gradient) applies the weights in GEMM2's epilogue and the SwiGLU in GEMM1's instead.

On a Hopper GPU training's SwiGLU and its backward can run in the epilogues of GEMM1 and of
a's kernel; whether they do is timed per shape, as tile configs are (``kernels/swiglu.py``:
fusing loses where the GEMM is compute bound).
"""

from __future__ import annotations

import torch

from moe_learn import device
from moe_learn.ops.grouped_gemm import expert_of_rows, torch_grouped_gemm, torch_grouped_gemm_dw
from moe_learn.ops.moe import swiglu, weighted_swiglu, weighted_swiglu_backward
from moe_learn.ops.permutation import permute, unpermute
from moe_learn.ops.routing import calculate_topk, expert_counts, gather_indices_by_expert
from moe_learn.validation import (
    check_expert_weights,
    check_index_range,
    check_moe_args,
    check_positive_int,
    check_tensor,
)

BACKENDS = ("triton", "torch")
# Inference: SwiGLU in GEMM1's epilogue on the Hopper kernel (A/B switch, perf/ab_kernels.py). Training keeps
# gate_up for the backward (stored, not recomputed: perf/NOTES.md item 13 weighs the two) and recomputes h.
FUSED_SWIGLU = True
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def effective_backend(backend: str, dtype: torch.dtype) -> str:
    """The Triton kernels take float32/float16/bfloat16; a float64 model runs the PyTorch GEMMs."""
    return "torch" if backend == "triton" and dtype not in TRITON_DTYPES else backend


def drop_invalid(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int):
    """Ids outside [0, E) contribute nothing: routed to a valid expert with weight 0 (no gradient there).

    This is what unchecked ids mean on the paths that do not read values back to the host (a GPU,
    torch.compile): never memory outside the tensors, never a contribution. transformers'
    expert-parallel sentinels (ids >= E) are the case it is made for.
    """
    invalid = (topk_ids < 0) | (topk_ids >= num_experts)
    return topk_ids.clamp(0, num_experts - 1), topk_weights.masked_fill(invalid, 0.0)


def route_rows(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows per expert [E] int32, gather_indices [T*k] int32) for ids already known to be in range.

    ``get_routing_indices`` without its range check: the check reads the ids back to the host,
    which would stall the GPU (and break CUDA graphs and torch.compile) on every forward.
    """
    flat = topk_ids.reshape(-1)
    return expert_counts(flat, num_experts), gather_indices_by_expert(flat)


# Decode-sized routing of given ids in one Triton launch (kernels/route_ids.py) instead of eight
# PyTorch ops; an A/B switch (perf/host_overhead.py).
ROUTE_IDS_KERNEL = True


def _one_launch_routing(topk_ids: torch.Tensor, topk_weights: torch.Tensor, backend: str) -> bool:
    """Whether ``drop_and_route`` takes the kernel: the Triton backend, eager, nothing recorded, decode-sized."""
    if backend != "triton" or not (ROUTE_IDS_KERNEL and device.HAS_TRITON) or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and topk_weights.requires_grad:
        return False  # the PyTorch ops keep the weights' gradient (zero where an id was dropped)
    from moe_learn.kernels.route_ids import MAX_SLOTS

    return (topk_ids.is_cuda or (topk_ids.is_cpu and device.INTERPRETER)) and topk_ids.numel() <= MAX_SLOTS


# Decode-sized inference in two launches with no routing pass (kernels/decode_experts.py): each (token,
# slot) pair reads its expert's weights itself; taken where that measured faster (its layers_take). An A/B
# switch (perf/decode_experts.py).
DECODE_EXPERTS = True


def _decode_allowed(backend: str, config) -> bool:
    """The decode path is on, Triton is there and asked for, and no launch ``config`` (that is for the grouped
    GEMMs) was given."""
    return DECODE_EXPERTS and device.HAS_TRITON and backend == "triton" and config is None


def decode_path(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, backend: str, config) -> bool:
    """Whether the experts take ``kernels.decode_experts``: allowed (``_decode_allowed``), eager, no gradient,
    and its rule (``decode_experts.layers_take``: few slots and bytes, where it measured faster; fewer bytes
    while a CUDA graph is captured)."""
    if not _decode_allowed(backend, config):
        return False
    if hidden_states.dtype not in TRITON_DTYPES or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (hidden_states, topk_weights, gate_up_proj,
                                                                   down_proj)):
        return False
    if not (hidden_states.is_cuda or (hidden_states.is_cpu and device.INTERPRETER)):
        return False
    from moe_learn.kernels.decode_experts import layers_take

    return layers_take(topk_ids, gate_up_proj, down_proj)


def planned_decode(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose: bool, backend: str,
                   config):
    """A decode step repeating the layouts of an earlier checked call that took ``kernels.decode_experts``: the
    output from that call's launch plan (no checks, no rule, no launch keys again); None otherwise."""
    if not _decode_allowed(backend, config):
        return None
    from moe_learn.kernels.decode_experts import planned

    return planned(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose, layers=True)


def drop_and_route(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, backend: str = "triton"):
    """``(counts, gather_indices, weights)``: ``drop_invalid``, then ``route_rows`` on the kept ids.

    Arguments as checked by the caller. On the Triton backend, decode-sized calls that record no
    gradient run as one launch (``kernels.route_ids``, the same results); the rest, the "torch"
    backend (the reference stays PyTorch) and torch.compile run the PyTorch ops.
    """
    if _one_launch_routing(topk_ids, topk_weights, backend):
        from moe_learn.kernels.route_ids import run_route_ids

        return run_route_ids(topk_ids, topk_weights, num_experts)
    ids, weights = drop_invalid(topk_ids, topk_weights, num_experts)
    counts, gather_indices = route_rows(ids, num_experts)
    return counts, gather_indices, weights


# ---------------------------------------------------------------------------------------
# The two GEMM shapes, per backend
# ---------------------------------------------------------------------------------------


def _gemm(backend, X, W, counts, gather_indices, *, topk=1, permute_x=False, permute_y=False, transpose=True,
          topk_weights=None, config=None, bias=None):
    """Y = grouped GEMM of X and W, optionally gathering X / scattering Y (see grouped_gemm)."""
    if backend == "triton":
        from moe_learn.kernels.grouped_gemm import grouped_gemm_trusted

        # run_experts checked the shapes once for both GEMMs (and the backward's)
        return grouped_gemm_trusted(X, W, counts, gather_indices, topk_weights, bias, topk, permute_x, permute_y,
                                    transpose, config)
    if permute_x:
        X = permute(X, gather_indices, topk)
    Y = torch_grouped_gemm(X, W, counts, transpose=transpose)
    if bias is not None:  # before the routing weight, as the kernels' epilogue does
        Y = Y + bias[expert_of_rows(counts)]
    if topk_weights is not None:
        Y = Y * topk_weights.reshape(-1)[gather_indices.long()].unsqueeze(-1).to(Y.dtype)
    return unpermute(Y, gather_indices) if permute_y else Y


def _gemm_dw(backend, X, dY, counts, gather_indices, *, topk=1, permute_x=False, transpose=True):
    """dW_e = dY_e.T @ X_e in the layout of the forward's W (transpose=True: [E, N, K])."""
    if backend == "triton":
        from moe_learn.kernels.backward import grouped_gemm_dw

        return grouped_gemm_dw(X, dY, counts, gather_indices=gather_indices, topk=topk, permute_x=permute_x,
                               transpose=transpose, validate=False)
    return torch_grouped_gemm_dw(X, dY, counts, gather_indices=gather_indices, topk=topk, permute_x=permute_x,
                                 transpose=transpose)


def _experts_forward(backend, hidden_states, counts, gather_indices, topk_weights, gate_up_proj, down_proj, *,
                     transpose=True, config=None):
    """Inference: GEMM1 (gather) -> SwiGLU -> GEMM2 (scatter, routing weights in its epilogue) -> sum over k.

    With ``FUSED_SWIGLU`` and the Triton backend, GEMM1 applies the SwiGLU as it stores:
    ``[M, 2I]`` is never written.
    """
    num_tokens, hidden = hidden_states.shape
    top_k = topk_weights.shape[1]
    # GEMM1 gathers token rows itself: the permuted copy of hidden_states never exists.
    if backend == "triton" and FUSED_SWIGLU:
        from moe_learn.kernels.grouped_gemm import grouped_gemm_swiglu

        h = grouped_gemm_swiglu(hidden_states, gate_up_proj, counts, gather_indices, top_k, True, transpose, config)
    else:
        h = swiglu(_gemm(backend, hidden_states, gate_up_proj, counts, gather_indices, topk=top_k, permute_x=True,
                         transpose=transpose, config=config))
    # the weights as they come (float32 from most routers): the epilogue multiplies in float32 either way,
    # and a cast would be one more launch per decode step
    y = _gemm(backend, h, down_proj, counts, gather_indices, permute_y=True, transpose=transpose, config=config,
              topk_weights=topk_weights)
    return y.view(num_tokens, top_k, hidden).sum(dim=1)


def _gemm1_weighted_swiglu(backend, hidden_states, gate_up_proj, counts, gather_indices, topk_weights, transpose,
                           config):
    """Training's GEMM1 and h_r = w_r * swiglu(gate_up_r): ``(gate_up, h)``.

    Triton: one kernel where that is faster (GEMM1's epilogue stores both, ``kernels/swiglu.py``).
    """
    top_k = topk_weights.shape[1]
    if backend == "triton":
        from moe_learn.kernels.swiglu import gemm_weighted_swiglu

        return gemm_weighted_swiglu(hidden_states, gate_up_proj, counts, gather_indices, topk_weights, topk=top_k,
                                    transpose=transpose, config=config)
    gate_up = _gemm(backend, hidden_states, gate_up_proj, counts, gather_indices, topk=top_k, permute_x=True,
                    transpose=transpose)
    return gate_up, weighted_swiglu(gate_up, topk_weights.reshape(-1)[gather_indices.long()])


def _dx2_weighted_swiglu_backward(backend, d_out, down_proj, counts, gather_indices, gate_up, topk_weights,
                                  transpose):
    """a = GEMM2's dX (d_out's token rows read in place, as GEMM1 reads x), then the SwiGLU's backward on it.

    Returns ``(d_gate_up, d_topk_weights in float32 or wider, shaped like topk_weights, h)``.
    Triton: the backward runs in the dX kernel's epilogue where that is faster (``a [M, I]`` is then never
    stored).
    """
    top_k = topk_weights.shape[1]
    if backend == "triton":
        from moe_learn.kernels.swiglu import gemm_swiglu_backward

        return gemm_swiglu_backward(d_out, down_proj, counts, gather_indices, gate_up, topk_weights, topk=top_k,
                                    transpose=not transpose)
    d_h = _gemm(backend, d_out, down_proj, counts, gather_indices, topk=top_k, permute_x=True, transpose=not transpose)
    index = gather_indices.long()
    d_gate_up, d_rows, h = weighted_swiglu_backward(gate_up, topk_weights.reshape(-1)[index], d_h)
    d_weights = d_rows.new_zeros(topk_weights.numel()).index_copy_(0, index, d_rows)
    return d_gate_up, d_weights.view(topk_weights.shape), h


# ---------------------------------------------------------------------------------------
# The autograd Function
# ---------------------------------------------------------------------------------------


class FusedMoEFunction(torch.autograd.Function):
    """Autograd for the expert half of an MoE MLP, given its routing; the module docstring has the math.

    Inputs: hidden_states [T, H], counts [E], gather_indices [T*k] (from the routing),
    topk_weights [T, k], gate_up_proj, down_proj, and the flags (transpose, backend, config).
    Keeps GEMM1's output g [M, 2I] for the backward; h is recomputed from it there.
    """

    @staticmethod
    def forward(ctx, hidden_states, counts, gather_indices, topk_weights, gate_up_proj, down_proj, transpose, backend,
                config):
        num_tokens, hidden = hidden_states.shape
        top_k = topk_weights.shape[1]
        gate_up, h = _gemm1_weighted_swiglu(backend, hidden_states, gate_up_proj, counts, gather_indices, topk_weights,
                                            transpose, config)
        y = _gemm(backend, h, down_proj, counts, gather_indices, permute_y=True, transpose=transpose, config=config)
        ctx.save_for_backward(hidden_states, counts, gather_indices, topk_weights, gate_up_proj, down_proj, gate_up)
        ctx.transpose, ctx.backend = transpose, backend
        return y.view(num_tokens, top_k, hidden).sum(dim=1)

    @staticmethod
    def backward(ctx, d_out):
        hidden_states, counts, gather_indices, topk_weights, gate_up_proj, down_proj, gate_up = ctx.saved_tensors
        backend, transpose = ctx.backend, ctx.transpose
        if backend == "triton" and torch.is_grad_enabled():  # create_graph=True: a gradient of this backward
            raise RuntimeError("the Triton experts have no double backward (create_graph=True); use "
                               "backend='torch' for higher-order gradients")
        need_x, _, _, need_w, need_w1, need_w2 = ctx.needs_input_grad[:6]
        num_tokens, top_k = topk_weights.shape
        d_out = d_out.to(hidden_states.dtype).contiguous()
        d_gate_up, d_weights, h = _dx2_weighted_swiglu_backward(backend, d_out, down_proj, counts, gather_indices,
                                                                 gate_up, topk_weights, transpose)
        d_weights = d_weights.to(topk_weights.dtype) if need_w else None
        d_x = d_w1 = d_w2 = None
        if need_w2:
            # dW2_e = sum_r d_out_t.T h_r. The dW kernel gathers only its X operand, so swap the
            # roles: it computes h_e.T @ D_e (= dW2_e.T) with d_out's token rows gathered, and
            # storing it in the opposite layout (transpose flipped) puts it back in W2's layout.
            d_w2 = _gemm_dw(backend, d_out, h, counts, gather_indices, topk=top_k, permute_x=True,
                            transpose=not transpose)
        del h  # [M, I], read by dW2 alone
        if need_w1:
            d_w1 = _gemm_dw(backend, hidden_states, d_gate_up, counts, gather_indices, topk=top_k, permute_x=True,
                            transpose=transpose)
        if need_x:
            # Each (token, slot) row lands at its own place; a token's k rows are summed.
            d_x_slots = _gemm(backend, d_gate_up, gate_up_proj, counts, gather_indices, permute_y=True,
                              transpose=not transpose)
            d_x = d_x_slots.view(num_tokens, top_k, -1).sum(dim=1)
        return d_x, None, None, d_weights, d_w1, d_w2, None, None, None


def _check_run_args(hidden_states, counts, gather_indices, topk_weights, gate_up_proj, down_proj, transpose) -> None:
    """What the GEMMs need to stay inside their tensors, in a few comparisons (this runs on every decode step)."""
    if hidden_states.ndim != 2 or topk_weights.ndim != 2 or gate_up_proj.ndim != 3 or down_proj.ndim != 3:
        raise ValueError(f"hidden_states {tuple(hidden_states.shape)} and topk_weights {tuple(topk_weights.shape)} "
                         f"must be 2-D, gate_up_proj {tuple(gate_up_proj.shape)} and down_proj "
                         f"{tuple(down_proj.shape)} 3-D")
    tokens, hidden = hidden_states.shape
    experts, n1, k1 = gate_up_proj.shape if transpose else gate_up_proj.transpose(1, 2).shape
    experts2, n2, k2 = down_proj.shape if transpose else down_proj.transpose(1, 2).shape
    if k1 != hidden or n2 != hidden or experts2 != experts or n1 != 2 * k2:
        want = "[E, 2I, H] and [E, H, I]" if transpose else "[E, H, 2I] and [E, I, H]"
        raise ValueError(f"gate_up_proj {tuple(gate_up_proj.shape)} and down_proj {tuple(down_proj.shape)} must be "
                         f"{want} with H={hidden} (transpose={transpose})")
    if topk_weights.shape[0] != tokens or gather_indices.shape != (topk_weights.numel(),) or counts.shape != (experts,):
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must be [T, k] with T={tokens}, gather_indices "
                         f"{tuple(gather_indices.shape)} [T*k] and counts {tuple(counts.shape)} [E={experts}]")
    if gate_up_proj.dtype != hidden_states.dtype or down_proj.dtype != hidden_states.dtype:
        raise TypeError(f"hidden_states is {hidden_states.dtype} but the weights are {gate_up_proj.dtype} and "
                        f"{down_proj.dtype}; cast them to one dtype")


def run_experts(hidden_states, counts, gather_indices, topk_weights, gate_up_proj, down_proj, *, transpose=True,
                backend="triton", config=None):
    """The experts given a routing (counts, gather_indices): differentiable when an input requires grad."""
    _check_run_args(hidden_states, counts, gather_indices, topk_weights, gate_up_proj, down_proj, transpose)
    backend = effective_backend(backend, hidden_states.dtype)
    if hidden_states.shape[0] == 0:
        # Nothing routed. The sums of empty slices (exactly 0) keep every input in the graph, so
        # each gets a zero gradient rather than none.
        tie = sum(t.flatten()[:0].sum() for t in (topk_weights, gate_up_proj, down_proj))
        return hidden_states * 0 + tie.to(hidden_states.dtype)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden_states, topk_weights, gate_up_proj, down_proj)
    )
    if not needs_grad:
        # Inference: the routing weights are applied in GEMM2's epilogue, nothing is kept.
        return _experts_forward(backend, hidden_states, counts, gather_indices, topk_weights, gate_up_proj,
                                down_proj, transpose=transpose, config=config)
    return FusedMoEFunction.apply(hidden_states, counts, gather_indices, topk_weights, gate_up_proj, down_proj,
                                  transpose, backend, config)


def _check_experts_args(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose, backend) -> None:
    """Check the arguments, and the ids' range on CPU tensors outside torch.compile."""
    check_backend(backend)
    check_moe_args(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose=transpose)
    # The ids' range is a value check (a device->host copy): on the CPU, outside torch.compile.
    if hidden_states.device.type == "cpu" and not torch.compiler.is_compiling():
        num_experts = gate_up_proj.shape[0]
        check_index_range("topk_ids", topk_ids, num_experts, f"expert ids must be below num_experts={num_experts}")


def moe_experts(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    transpose: bool = True,
    backend: str = "triton",
    config: dict | None = None,
) -> torch.Tensor:
    """The expert half of an MoE MLP, differentiable; returns ``[T, H]``.

    hidden_states ``[T, H]``; topk_ids/topk_weights ``[T, k]``. transpose=True: weights in
    the transformers 5.x layout, gate_up_proj ``[E, 2I, H]``, down_proj ``[E, H, I]``;
    transpose=False: ``[E, H, 2I]`` and ``[E, I, H]`` (Llama 4's storage). Gradients flow to
    hidden_states, topk_weights (so to the router) and both weights.
    backend: "triton" (the course's kernels; a float64 model runs the PyTorch GEMMs) or
    "torch" (the PyTorch reference GEMMs).
    config: launch parameters for the Triton grouped GEMMs (``grouped_gemm``'s ``config``).
    Expert ids outside [0, E) raise on CPU tensors; on a GPU or under torch.compile, where
    checking them would read values back to the host, they contribute nothing.
    """
    if isinstance(hidden_states, torch.Tensor) and not hidden_states.is_cpu:  # (the CPU checks the ids' values)
        out = planned_decode(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose, backend,
                             config)
        if out is not None:
            return out
    _check_experts_args(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose, backend)
    if decode_path(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, backend, config):
        from moe_learn.kernels.decode_experts import run_decode_experts

        return run_decode_experts(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose=transpose,
                                  remember=True)
    # ids out of range were refused on the CPU; elsewhere they are dropped here
    counts, gather_indices, topk_weights = drop_and_route(topk_ids, topk_weights, gate_up_proj.shape[0],
                                                          effective_backend(backend, hidden_states.dtype))
    return run_experts(hidden_states, counts, gather_indices, topk_weights, gate_up_proj, down_proj,
                       transpose=transpose, backend=backend, config=config)


def fused_moe_experts(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """Same contract as ``moe_experts_torch``, on the course's Triton kernels: returns ``[T, H]``.

    Compared with ``moe_experts_torch`` (permute -> GEMM -> SwiGLU -> GEMM -> unpermute ->
    weighted sum), the permuted copy of the hidden states and the unpermuted copy of the
    output never exist: GEMM1 gathers token rows in its prologue, GEMM2 scatters its rows
    back to (token, slot) order and applies the routing weights in its epilogue.
    config: launch parameters passed to both grouped GEMMs. Differentiable.
    """
    return moe_experts(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, config=config)


def fused_moe_forward(
    hidden_states: torch.Tensor,
    router_weight: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = True,
    use_sigmoid: bool = False,
    pre_act: bool = True,
    config: dict | None = None,
) -> torch.Tensor:
    """A whole MoE MLP: router -> fused routing -> fused experts. Differentiable.

    hidden_states ``[T, H]`` or ``[B, S, H]``; router_weight ``[E, H]``; experts in the
    transformers 5.x layout. Routing options as in ``calculate_topk`` (the defaults are
    Qwen3-MoE's and Mixtral's: softmax over all experts, top-k, renormalised). Three launches
    after the router matmul: one for routing, two grouped GEMMs (plus SwiGLU and the sum).
    """
    from moe_learn.kernels.fused_routing import fused_routing

    check_tensor("hidden_states", hidden_states, ndim=(2, 3))
    check_tensor("router_weight", router_weight, ndim=2)
    check_positive_int("top_k", top_k)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    if router_weight.shape[1] != x.shape[1] or router_weight.shape[0] != gate_up_proj.shape[0]:
        raise ValueError(
            f"router_weight {tuple(router_weight.shape)} must be [E, H] = [{gate_up_proj.shape[0]}, {x.shape[1]}]"
        )
    if router_weight.dtype != x.dtype:
        raise TypeError(f"router_weight is {router_weight.dtype} but hidden_states is {x.dtype}; cast one to the other")
    num_experts = gate_up_proj.shape[0]
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} is larger than num_experts={num_experts}; pass top_k <= num_experts")
    check_expert_weights(x, gate_up_proj, down_proj)
    logits = x @ router_weight.T
    if x.dtype in TRITON_DTYPES:
        weights, _, counts, gather_indices, _ = fused_routing(
            logits, top_k, use_sigmoid=use_sigmoid, renormalize=renormalize, pre_act=pre_act
        )
    else:  # float64: the same routing in PyTorch (the kernel ranks in float32), and the reference GEMMs
        weights, ids = calculate_topk(logits, top_k, use_sigmoid, renormalize, pre_act=pre_act, post_act=not pre_act)
        counts, gather_indices = route_rows(ids, num_experts)
    out = run_experts(x, counts, gather_indices, weights, gate_up_proj, down_proj, config=config)
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------
# Any activation between the GEMMs (transformers' experts interface: biases, custom gates)
# ---------------------------------------------------------------------------------------


def experts_with_activation(hidden_states, counts, gather_indices, topk_weights, w1, w2, activation, *,
                            b1=None, b2=None, post_norm=None, transpose=True, backend="triton", config=None):
    """GEMM1 (gather, + b1) -> ``activation`` -> GEMM2 (+ b2) -> [post_norm] -> weighted sum over the k slots.

    The general form of the experts: ``activation`` maps GEMM1's ``[M, N1]`` rows to GEMM2's
    input (a SwiGLU of either layout, gpt-oss's clamped gate, a plain activation), and
    ``post_norm`` (optional) normalises each expert's output row before it is weighted.
    Differentiable through the grouped GEMM ops; plain PyTorch for the activation.
    """
    backend = effective_backend(backend, hidden_states.dtype)
    num_tokens, hidden = hidden_states.shape
    top_k = topk_weights.shape[1]
    if backend == "triton":
        from moe_learn.kernels.grouped_gemm import grouped_gemm

        gemm = lambda x, w, b, **kw: grouped_gemm(x, w, counts, gather_indices=gather_indices, bias=b,  # noqa: E731
                                                  transpose=transpose, config=config, validate=False, **kw)
    else:  # the reference GEMMs, as the torch backend of moe_experts runs them
        gemm = lambda x, w, b, **kw: _gemm("torch", x, w, counts, gather_indices, transpose=transpose,  # noqa: E731
                                           bias=b, **kw)

    h = activation(gemm(hidden_states, w1, b1, topk=top_k, permute_x=True))
    if post_norm is None:  # the routing weights go in GEMM2's epilogue
        y = gemm(h, w2, b2, permute_y=True, topk_weights=topk_weights)
        return y.view(num_tokens, top_k, hidden).sum(dim=1)
    y = post_norm(gemm(h, w2, b2, permute_y=True)).view(num_tokens, top_k, hidden)
    return (y * topk_weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)
