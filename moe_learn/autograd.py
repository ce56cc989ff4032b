"""Training through the fused MoE experts: a hand-written backward and a drop-in block.

Forward, per (token t, slot j) routed to expert e (``x = hidden_states``, ``w = topk_weights``):

    g   = x_t @ W1_e.T            GEMM1, rows gathered from token order     [M, 2I]
    h   = silu(g_gate) * g_up     SwiGLU                                   [M, I]
    y   = h @ W2_e.T              GEMM2, rows scattered to (t, j) order     [M, H]
    out_t = sum_j w_tj * y_tj

Backward, given ``d_out [T, H]``:

    d_w_tj  = <d_out_t, y_tj>                 the router's gradient, through its weights
    dy_tj   = w_tj * d_out_t
    dh      = dy_e @ W2_e                     grouped GEMM, other W layout (forward kernel)
    dW2_e   = dy_e.T @ h_e                    weight-gradient kernel
    dg      = SwiGLU'(g) * dh
    dW1_e   = dg_e.T @ x_e                    weight-gradient kernel, x gathered from token order
    dx_t    = sum_j (dg_tj @ W1_e)            forward kernel scattering to (t, j), summed over j

``backend="triton"`` runs the GEMMs with the course's kernels; ``backend="torch"`` runs the
same formulas with the PyTorch references, which is what float64 gradcheck verifies.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from .routing import calculate_topk, get_routing_indices
from .torch_moe import swiglu, torch_grouped_gemm
from .validation import check_index_range, check_moe_args, check_tensor

BACKENDS = ("triton", "torch")


# ---------------------------------------------------------------------------------------
# The two GEMM shapes, per backend
# ---------------------------------------------------------------------------------------


def _gemm(backend, X, W, counts, gather_indices, *, topk=1, permute_x=False, permute_y=False, transpose=True):
    """Y = grouped GEMM of X and W, optionally gathering X / scattering Y (see grouped_gemm)."""
    if backend == "triton":
        from .kernels.grouped_gemm import grouped_gemm

        return grouped_gemm(
            X, W, counts, gather_indices=gather_indices, topk=topk, permute_x=permute_x,
            permute_y=permute_y, transpose=transpose, validate=False,
        )
    if permute_x:
        X = X[gather_indices.long() // topk]
    Y = torch_grouped_gemm(X, W, counts, transpose=transpose)
    if permute_y:
        Y = torch.empty_like(Y).index_copy_(0, gather_indices.long(), Y)
    return Y


def _gemm_dw(backend, X, dY, counts, gather_indices, *, topk=1, permute_x=False, transpose=True):
    """dW_e = dY_e.T @ X_e in the layout of the forward's W (transpose=True: [E, N, K])."""
    from .kernels.grouped_gemm_backward import grouped_gemm_dw, torch_grouped_gemm_dw

    fn = grouped_gemm_dw if backend == "triton" else torch_grouped_gemm_dw
    return fn(X, dY, counts, gather_indices=gather_indices, topk=topk, permute_x=permute_x, transpose=transpose)


def swiglu_backward(gate_up: torch.Tensor, d_h: torch.Tensor) -> torch.Tensor:
    """d(silu(gate) * up) for ``gate_up = [gate | up]``, computed in float32."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    d_h = d_h.float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    d_gate = d_h * up * sig * (1 + gate * (1 - sig))  # silu'(x) = s(x) (1 + x (1 - s(x)))
    d_up = d_h * silu
    return torch.cat([d_gate, d_up], dim=-1).to(gate_up.dtype)


# ---------------------------------------------------------------------------------------
# The autograd Function
# ---------------------------------------------------------------------------------------


class FusedMoEFunction(torch.autograd.Function):
    """Autograd for the expert half of an MoE MLP; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose, backend):
        num_tokens, hidden = hidden_states.shape
        top_k = topk_ids.shape[1]
        num_experts = gate_up_proj.shape[0]
        counts, gather_indices = get_routing_indices(topk_ids, num_experts)
        weights = topk_weights.to(hidden_states.dtype)
        # GEMM1 gathers token rows itself: the permuted copy of hidden_states never exists.
        gate_up = _gemm(backend, hidden_states, gate_up_proj, counts, gather_indices, topk=top_k,
                        permute_x=True, transpose=transpose)
        h = swiglu(gate_up)
        # GEMM2 scatters rows to (token, slot) order. The rows stay unweighted here because
        # the weights' gradient needs them: d_w_tj = <d_out_t, y_tj>.
        y = _gemm(backend, h, down_proj, counts, gather_indices, permute_y=True, transpose=transpose)
        y = y.view(num_tokens, top_k, hidden)
        out = (y * weights.unsqueeze(-1)).sum(dim=1)
        # h is cheap to recompute from gate_up, so it is not kept.
        ctx.save_for_backward(hidden_states, weights, gate_up_proj, down_proj, counts, gather_indices, gate_up, y)
        ctx.transpose = transpose
        ctx.backend = backend
        ctx.weights_dtype = topk_weights.dtype
        return out

    @staticmethod
    @once_differentiable  # the backward is hand-written kernels, not itself differentiable
    def backward(ctx, d_out):
        hidden_states, weights, gate_up_proj, down_proj, counts, gather_indices, gate_up, y = ctx.saved_tensors
        backend, transpose = ctx.backend, ctx.transpose
        need_x, _, need_w, need_w1, need_w2 = ctx.needs_input_grad[:5]
        num_tokens, top_k, hidden = y.shape
        d_out = d_out.to(y.dtype).contiguous()

        d_weights = None
        if need_w:
            d_weights = (y.float() * d_out.float().unsqueeze(1)).sum(-1).to(ctx.weights_dtype)

        d_x = d_w1 = d_w2 = None
        if need_x or need_w1 or need_w2:
            # dy in (token, slot) order; the GEMMs below gather its rows into expert order.
            d_y = (d_out.unsqueeze(1) * weights.unsqueeze(-1)).reshape(num_tokens * top_k, hidden)
            if need_w2:
                # dW2_e = dy_e.T @ h_e. The dW kernel gathers only its X operand, so swap the
                # roles: it computes h_e.T @ dy_e (= dW2_e.T) with dy gathered, and storing it
                # in the opposite layout (transpose flipped) puts it back in W2's layout.
                h = swiglu(gate_up)
                d_w2 = _gemm_dw(backend, d_y, h, counts, gather_indices, topk=1, permute_x=True,
                                transpose=not transpose)
            if need_x or need_w1:
                # dh = dy_e @ W2_e: the forward kernel with W read in the other layout.
                d_h = _gemm(backend, d_y, down_proj, counts, gather_indices, topk=1, permute_x=True,
                            transpose=not transpose)
                d_gate_up = swiglu_backward(gate_up, d_h)
                if need_w1:
                    d_w1 = _gemm_dw(backend, hidden_states, d_gate_up, counts, gather_indices, topk=top_k,
                                    permute_x=True, transpose=transpose)
                if need_x:
                    # Each (token, slot) row lands at its own place; a token's k rows are summed.
                    d_x_slots = _gemm(backend, d_gate_up, gate_up_proj, counts, gather_indices,
                                      permute_y=True, transpose=not transpose)
                    d_x = d_x_slots.view(num_tokens, top_k, hidden).sum(dim=1)
        return d_x, None, d_weights, d_w1, d_w2, None, None


def _check_moe_args(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose, backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_moe_args(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose=transpose)
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
) -> torch.Tensor:
    """The expert half of an MoE MLP (``fused_moe_experts`` semantics), differentiable.

    hidden_states ``[T, H]``; topk_ids/topk_weights ``[T, k]``. transpose=True: weights in
    the transformers 5.x layout, gate_up_proj ``[E, 2I, H]``, down_proj ``[E, H, I]``;
    transpose=False: ``[E, H, 2I]`` and ``[E, I, H]`` (Llama 4's storage). Gradients flow to
    hidden_states, topk_weights (so to the router) and both weights.
    backend: "triton" (the course's kernels) or "torch" (the PyTorch reference GEMMs).
    """
    _check_moe_args(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose, backend)
    if hidden_states.shape[0] == 0:
        # Nothing routed; the product keeps the result attached to the graph.
        return hidden_states * 0
    return FusedMoEFunction.apply(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, transpose, backend)


# ---------------------------------------------------------------------------------------
# A whole MoE block: router + experts
# ---------------------------------------------------------------------------------------


class FusedMoEBlock(nn.Module):
    """Router + SwiGLU experts, trained through ``moe_experts``.

    routing="softmax": softmax over all experts, then top-k (Qwen3, Mixtral; ``renormalize``
    rescales the k weights to sum to 1). routing="sigmoid": top-k on the logits, then a
    sigmoid of the k picked (Llama 4 style). The router's logits and picks of the last
    forward stay on the module (``router_logits``, ``topk_ids``) for a load-balancing loss.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        routing: str = "softmax",
        renormalize: bool = True,
        backend: str = "triton",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if routing not in ("softmax", "sigmoid"):
            raise ValueError(f"routing must be 'softmax' or 'sigmoid', got {routing!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        factory = {"device": device, "dtype": dtype}
        self.num_experts, self.top_k = num_experts, top_k
        self.routing, self.renormalize, self.backend = routing, renormalize, backend
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **factory)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.reset_parameters()
        self.router_logits: torch.Tensor | None = None
        self.topk_ids: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        # nn.Linear's default scale for each expert's matrices.
        for w in (self.gate_up_proj, self.down_proj):
            bound = 1 / w.shape[2] ** 0.5
            nn.init.uniform_(w, -bound, bound)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits ``[T, E]``, then (topk_weights, topk_ids) ``[T, k]``."""
        logits = self.router(x)
        use_sigmoid = self.routing == "sigmoid"
        weights, ids = calculate_topk(
            logits, self.top_k, use_sigmoid=use_sigmoid, renormalize=self.renormalize and not use_sigmoid,
            pre_act=not use_sigmoid, post_act=use_sigmoid,
        )
        return logits, weights, ids

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits, weights, ids = self.route(x)
        self.router_logits, self.topk_ids = logits, ids
        out = moe_experts(x, ids, weights, self.gate_up_proj, self.down_proj, backend=self.backend)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        E, two_i, H = self.gate_up_proj.shape
        return (
            f"hidden={H}, intermediate={two_i // 2}, experts={E}, top_k={self.top_k}, "
            f"routing={self.routing}, backend={self.backend}"
        )


def load_balancing_loss(router_logits: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss: ``E * sum_e f_e * P_e``.

    f_e: the fraction of (token, slot) picks that went to expert e (no gradient: counts);
    P_e: the mean router probability of expert e (softmax over all experts; differentiable).
    Equals 1 when routing is perfectly uniform, and grows as tokens pile onto few experts.
    """
    check_tensor("router_logits", router_logits, ndim=2)
    probs = torch.softmax(router_logits.float(), dim=-1)
    counts = torch.bincount(topk_ids.reshape(-1), minlength=num_experts).to(probs.dtype)
    fraction = counts / counts.sum().clamp_min(1)
    return num_experts * (fraction * probs.mean(dim=0)).sum()
