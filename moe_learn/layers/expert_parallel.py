"""Expert parallelism: each rank holds a slice of the experts; tokens travel to them.

With E experts on W ranks, rank r owns the contiguous experts
``[r * E/W, (r + 1) * E/W)`` of ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``.
Every rank routes its own tokens, then:

1. **plan** (pure): sort the (token, slot) rows by expert. Experts are contiguous per
   rank, so expert order is also destination-rank order; count rows per expert and
   per destination rank (:func:`dispatch_plan`).
2. **exchange counts**: one even ``all_to_all_single`` of the per-expert counts, so each
   rank learns how many rows it will get from every other rank, for each local expert.
3. **dispatch**: ``all_to_all_single`` of the rows themselves with uneven split sizes.
4. **local experts**: the received rows arrive grouped by source rank; regroup them by
   local expert (:func:`local_expert_order`, :func:`local_expert_sizes`) and run the
   grouped GEMM + SwiGLU (``local_experts_fn``, swappable for the Triton kernel).
5. **combine**: undo the regrouping, send every row back with the reversed splits, and
   sum each token's k expert outputs with its routing weights (:func:`unpermute_combine`).

Autograd flows through all of it: the backward of an all-to-all is the all-to-all with
the split sizes swapped (:class:`_AllToAllRows`). Before the first uneven exchange the
ranks compare their configurations with one small ``all_gather_object``, so a mistake
on one rank makes *every* rank raise the same ``ValueError`` instead of hanging.

    python -m moe_learn.layers.expert_parallel --world-size 2            # gloo on the CPU
    python -m moe_learn.layers.expert_parallel --world-size 2 --backend nccl  # two GPUs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from moe_learn.layers.blocks import check_block_args, route, setup_block
from moe_learn.ops.grouped_gemm import torch_grouped_gemm
from moe_learn.ops.moe import moe_experts_torch, swiglu
from moe_learn.ops.permutation import combine, permute, unpermute
from moe_learn.ops.routing import calculate_topk, get_routing_indices
from moe_learn.validation import check_integer, check_positive_int, check_tensor

# ----------------------------------------------------------------------------------
# Pure steps: no processes needed, so the learner can write and test them directly.
# ----------------------------------------------------------------------------------


def experts_per_rank(num_experts: int, world_size: int) -> int:
    """E / W, the experts each rank holds; E must split evenly over the ranks."""
    check_positive_int("num_experts", num_experts)
    check_positive_int("world_size", world_size)
    if num_experts % world_size:
        raise ValueError(
            f"num_experts={num_experts} does not divide evenly over world_size={world_size} ranks; "
            f"pick a world size that divides {num_experts} (each rank holds the same number of experts)"
        )
    return num_experts // world_size


def local_expert_slice(num_experts: int, rank: int, world_size: int) -> slice:
    """The experts rank ``rank`` holds: a contiguous slice of the global expert ids."""
    per_rank = experts_per_rank(num_experts, world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return slice(rank * per_rank, (rank + 1) * per_rank)


class DispatchPlan(NamedTuple):
    """Where this rank's rows go. Rows are (token, top-k slot) pairs, T*k of them."""

    gather_indices: torch.Tensor  # [T*k] flat (token, slot) ids in expert order (stable)
    expert_counts: torch.Tensor  # [E] int64: rows for each global expert
    send_counts: torch.Tensor  # [W] int64: rows for each destination rank


def dispatch_plan(topk_ids: torch.Tensor, num_experts: int, world_size: int) -> DispatchPlan:
    """Sort this rank's rows by expert and count them per expert and per destination rank.

    Because rank r owns experts ``[r*E/W, (r+1)*E/W)``, the expert-sorted rows are also
    sorted by destination: the first ``send_counts[0]`` rows go to rank 0, and so on.
    """
    check_tensor("topk_ids", topk_ids, ndim=2)
    check_integer("topk_ids", topk_ids)
    per_rank = experts_per_rank(num_experts, world_size)
    expert_counts, gather_indices = get_routing_indices(topk_ids, num_experts)
    expert_counts = expert_counts.to(torch.int64)
    send_counts = expert_counts.view(world_size, per_rank).sum(dim=1)
    return DispatchPlan(gather_indices, expert_counts, send_counts)


def _check_recv_counts(recv_counts: torch.Tensor) -> None:
    check_tensor("recv_counts", recv_counts, ndim=2)
    check_integer("recv_counts", recv_counts)
    if recv_counts.numel() and int(recv_counts.min()) < 0:
        raise ValueError(f"recv_counts must be non-negative, got {recv_counts.tolist()}")


def local_expert_sizes(recv_counts: torch.Tensor) -> torch.Tensor:
    """Rows per local expert, summed over the source ranks.

    ``recv_counts [W, E/W]``: entry (s, e) counts the rows rank s sent to local expert e.
    """
    _check_recv_counts(recv_counts)
    return recv_counts.sum(dim=0)


def local_expert_order(recv_counts: torch.Tensor) -> torch.Tensor:
    """The order that regroups received rows by local expert: ``x_local = x_recv[order]``.

    The exchange delivers rank 0's rows first (sorted by local expert, as rank 0 sent
    them), then rank 1's, ... Label each received row with its local expert and sort
    the labels stably: rows of expert 0 come first (from rank 0, then rank 1, ...),
    then expert 1, and so on, each in the order received.
    """
    _check_recv_counts(recv_counts)
    world_size, per_rank = recv_counts.shape
    labels = torch.arange(per_rank, device=recv_counts.device).repeat(world_size)
    expert_of_row = torch.repeat_interleave(labels, recv_counts.reshape(-1).long())
    return torch.argsort(expert_of_row, stable=True)


def unpermute_combine(y_sorted: torch.Tensor, gather_indices: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Expert-ordered outputs back to tokens: ``combine(unpermute(y_sorted, gather_indices), topk_weights)``.

    ``y_sorted [T*k, H]`` holds this rank's rows in the order of ``gather_indices`` (the
    dispatch plan), as the return exchange delivers them; ``out[t] = sum_j w[t, j] * y[(t, j)]``.
    """
    check_tensor("y_sorted", y_sorted, ndim=2)
    check_tensor("topk_weights", topk_weights, ndim=2)
    num_tokens, top_k = topk_weights.shape
    if y_sorted.shape[0] != num_tokens * top_k:
        raise ValueError(
            f"y_sorted has {y_sorted.shape[0]} rows but topk_weights {tuple(topk_weights.shape)} "
            f"means T*k = {num_tokens * top_k}"
        )
    return combine(unpermute(y_sorted, gather_indices), topk_weights)


# ----------------------------------------------------------------------------------
# Local experts: the hook where the Triton grouped GEMM plugs in.
# ----------------------------------------------------------------------------------

LocalExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_local_experts_fn(grouped_gemm: Callable) -> LocalExpertsFn:
    """SwiGLU experts from any grouped GEMM with ``torch_grouped_gemm``'s signature.

    ``make_local_experts_fn(moe_learn.grouped_gemm)`` runs the local experts with the
    Triton kernel of chapter 06 instead of the PyTorch loop.
    """

    def local_experts(x, gate_up_proj, down_proj, m_sizes):
        return grouped_gemm(swiglu(grouped_gemm(x, gate_up_proj, m_sizes)), down_proj, m_sizes)

    local_experts.__name__ = f"local_experts[{getattr(grouped_gemm, '__name__', 'grouped_gemm')}]"
    return local_experts


torch_local_experts: LocalExpertsFn = make_local_experts_fn(torch_grouped_gemm)


def _stay_in_graph(y: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """Tie an empty expert output to its inputs, so this rank still joins backward's exchanges.

    A rank that receives no rows gets an output with no autograd history (nothing was
    computed). Its backward would then skip the reverse all-to-alls that every other rank
    runs, and they would wait forever. Adding the sum of an empty slice of each input
    (exactly 0, even if the input holds inf) costs nothing and gives the weights zero
    gradients, as in the single-process layer.
    """
    if not torch.is_grad_enabled():
        return y
    for t in inputs:
        if t.requires_grad:
            y = y + t.flatten()[:0].sum().to(y.dtype)
    return y


def simulate_expert_parallel(
    hidden_states: list[torch.Tensor],
    topk_ids: list[torch.Tensor],
    topk_weights: list[torch.Tensor],
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    dispatch_plan_fn: Callable = dispatch_plan,
    local_sizes_fn: Callable = local_expert_sizes,
    local_order_fn: Callable = local_expert_order,
    combine_fn: Callable = unpermute_combine,
    local_experts_fn: LocalExpertsFn | None = None,
) -> list[torch.Tensor]:
    """Expert parallelism for W pretend ranks in one process: the exchanges are list shuffles.

    Rank r's inputs are ``hidden_states[r]``, ``topk_ids[r]``, ``topk_weights[r]``; the
    full weights are sliced per rank as the real layer does. An all-to-all is just "rank
    s's chunk d goes to rank d", so the data movement can be watched (and the learner's
    pieces, passed as ``*_fn``, tried) without starting any process.
    """
    world_size, num_experts = len(hidden_states), gate_up_proj.shape[0]
    per_rank = experts_per_rank(num_experts, world_size)
    experts = torch_local_experts if local_experts_fn is None else local_experts_fn
    # Unpack by position: a learner's plan may be a plain (gather_indices, expert_counts, send_counts) tuple.
    plans = [DispatchPlan(*dispatch_plan_fn(ids, num_experts, world_size)) for ids in topk_ids]
    # Exchange 1, the counts: rank r learns what every rank s sends to each of r's experts.
    recv_counts = [
        torch.stack([plans[s].expert_counts[r * per_rank : (r + 1) * per_rank] for s in range(world_size)])
        for r in range(world_size)
    ]
    # Exchange 2, the rows: rank s cuts its expert-sorted rows into one chunk per destination.
    chunks = [
        permute(x, plan.gather_indices, ids.shape[1]).split(plan.send_counts.tolist())
        for x, ids, plan in zip(hidden_states, topk_ids, plans, strict=True)
    ]
    y_back = []
    for r in range(world_size):
        x_recv = torch.cat([chunks[s][r] for s in range(world_size)])
        order = local_order_fn(recv_counts[r])
        own = local_expert_slice(num_experts, r, world_size)
        y_local = experts(x_recv[order], gate_up_proj[own], down_proj[own], local_sizes_fn(recv_counts[r]))
        y_recv = unpermute(y_local, order.to(torch.int64))
        y_back.append(y_recv.split(recv_counts[r].sum(dim=1).tolist()))  # one chunk per source rank
    # Exchange 3, the results go home; then each rank combines its own tokens.
    return [
        combine_fn(torch.cat([y_back[r][s] for r in range(world_size)]), plans[s].gather_indices, topk_weights[s])
        for s in range(world_size)
    ]


# ----------------------------------------------------------------------------------
# The exchanges (torch.distributed all_to_all_single) and the layer.
# ----------------------------------------------------------------------------------


class _AllToAllRows(torch.autograd.Function):
    """``all_to_all_single`` on rows, differentiable: backward swaps the split sizes.

    Forward: this rank sends ``input_splits[d]`` consecutive rows to rank d and receives
    ``output_splits[s]`` rows from rank s. The gradient of a received row belongs to the
    rank that sent it, so backward sends the gradients back along the same paths.
    """

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.input_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all_rows(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group=None) -> torch.Tensor:
    """Send ``input_splits[d]`` rows of ``x`` to rank d, receive ``output_splits[s]`` from rank s."""
    return _AllToAllRows.apply(x, list(output_splits), list(input_splits), group)


def exchange_counts(expert_counts: torch.Tensor, world_size: int, group=None) -> torch.Tensor:
    """Even all-to-all of the per-expert counts: returns ``recv_counts [W, E/W]``.

    Rank r sends entries ``[d*E/W, (d+1)*E/W)`` of its counts to rank d, so row s of
    the result counts the rows rank s will send to each of this rank's experts.
    """
    recv = torch.empty_like(expert_counts)
    dist.all_to_all_single(recv, expert_counts.contiguous(), group=group)
    return recv.view(world_size, -1)


@dataclass
class DispatchState:
    """What the combine step needs to send the rows back and restore token order."""

    plan: DispatchPlan
    recv_counts: torch.Tensor  # [W, E/W] rows received from each rank for each local expert
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    local_order: torch.Tensor  # received (source-major) -> local-expert-major
    local_sizes: torch.Tensor  # [E/W] rows per local expert
    group: object = None


def ep_dispatch(
    hidden_states: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, group=None
) -> tuple[torch.Tensor, DispatchState]:
    """Plan, exchange counts, send rows; returns the rows grouped by local expert."""
    world_size = dist.get_world_size(group)
    plan = dispatch_plan(topk_ids, num_experts, world_size)
    recv_counts = exchange_counts(plan.expert_counts, world_size, group)
    # One host sync for both lists: the uneven exchange needs its split sizes on the CPU.
    splits = torch.cat([plan.send_counts, recv_counts.sum(dim=1)]).tolist()
    send_splits, recv_splits = splits[:world_size], splits[world_size:]
    x_sorted = permute(hidden_states, plan.gather_indices, topk_ids.shape[1])
    x_recv = all_to_all_rows(x_sorted, recv_splits, send_splits, group)
    local_order = local_expert_order(recv_counts)
    state = DispatchState(
        plan=plan,
        recv_counts=recv_counts,
        send_splits=send_splits,
        recv_splits=recv_splits,
        local_order=local_order,
        local_sizes=local_expert_sizes(recv_counts),
        group=group,
    )
    return x_recv[local_order], state


def ep_combine(y_local: torch.Tensor, topk_weights: torch.Tensor, state: DispatchState) -> torch.Tensor:
    """Undo the regrouping, send the rows home (reversed splits), weight and sum per token."""
    y_recv = unpermute(y_local, state.local_order.to(torch.int64))
    y_sorted = all_to_all_rows(y_recv, state.send_splits, state.recv_splits, state.group)
    return unpermute_combine(y_sorted, state.plan.gather_indices, topk_weights)


def ep_local_experts(
    x_local: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    state: DispatchState,
    local_experts_fn: LocalExpertsFn | None = None,
) -> torch.Tensor:
    """Run the received rows through this rank's experts (grouped GEMM + SwiGLU)."""
    fn = torch_local_experts if local_experts_fn is None else local_experts_fn
    y = fn(x_local, gate_up_proj, down_proj, state.local_sizes)
    if x_local.shape[0] == 0:
        y = _stay_in_graph(y, x_local, gate_up_proj, down_proj)
    return y


# ---------------------------------- checks ----------------------------------------

_CONFIG_FIELDS = (
    "num_experts",
    "hidden size H",
    "intermediate size I",
    "dtype",
    "device type",
    "hidden_states.requires_grad",
    "expert weights require grad",
)


def _local_problem(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, num_experts, world_size, backend):
    """What is wrong with this rank's arguments on their own (None if nothing)."""
    try:
        check_tensor("hidden_states", hidden_states, ndim=2)
        check_tensor("topk_ids", topk_ids, ndim=2)
        check_integer("topk_ids", topk_ids)
        check_tensor("topk_weights", topk_weights, ndim=2)
        check_tensor("gate_up_proj", gate_up_proj, ndim=3)
        check_tensor("down_proj", down_proj, ndim=3)
        per_rank = experts_per_rank(num_experts, world_size)
    except (TypeError, ValueError) as exc:
        return str(exc)
    num_tokens, hidden = hidden_states.shape
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        return (
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [T, k] with T={num_tokens} (the rows of hidden_states)"
        )
    if gate_up_proj.shape[0] != per_rank or down_proj.shape[0] != per_rank:
        return (
            f"this rank should hold E/W = {num_experts}/{world_size} = {per_rank} experts, but gate_up_proj is "
            f"{tuple(gate_up_proj.shape)} and down_proj {tuple(down_proj.shape)}; pass the local slice "
            "(local_expert_slice(num_experts, rank, world_size)) of the full weights"
        )
    inter = down_proj.shape[2]
    if gate_up_proj.shape[1:] != (2 * inter, hidden) or down_proj.shape[1] != hidden:
        return (
            f"gate_up_proj {tuple(gate_up_proj.shape)} and down_proj {tuple(down_proj.shape)} must be "
            f"[E/W, 2I, H] and [E/W, H, I] with H={hidden} (the columns of hidden_states)"
        )
    if topk_ids.numel() and not 0 <= int(topk_ids.min()) <= int(topk_ids.max()) < num_experts:
        return f"topk_ids must lie in [0, {num_experts}), got values {int(topk_ids.min())}..{int(topk_ids.max())}"
    if len({hidden_states.dtype, gate_up_proj.dtype, down_proj.dtype}) > 1:
        return (
            f"hidden_states ({hidden_states.dtype}), gate_up_proj ({gate_up_proj.dtype}) and down_proj "
            f"({down_proj.dtype}) must share one dtype"
        )
    devices = {t.device for t in (hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj)}
    if len(devices) > 1:
        return f"all tensors must be on one device, got {sorted(str(d) for d in devices)}"
    if backend == "nccl" and hidden_states.device.type != "cuda":
        return "the NCCL backend exchanges CUDA tensors; move the tensors to this rank's GPU (or use gloo on the CPU)"
    if backend == "gloo" and hidden_states.device.type != "cpu":
        return "the gloo backend here exchanges CPU tensors; use backend='nccl' for GPU tensors"
    return None


def _rank_config(hidden_states, gate_up_proj, down_proj, num_experts) -> tuple | None:
    try:
        grad = torch.is_grad_enabled()
        return (
            num_experts,
            hidden_states.shape[1],
            down_proj.shape[2],
            str(hidden_states.dtype),
            hidden_states.device.type,
            grad and hidden_states.requires_grad,
            grad and (gate_up_proj.requires_grad or down_proj.requires_grad),
        )
    except (AttributeError, IndexError):
        return None  # the local check already explains what is wrong


def check_ranks_agree(
    hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, num_experts: int, group=None
) -> None:
    """Compare every rank's arguments with one small all_gather; raise the same error on all.

    Runs before any uneven exchange: if one rank's split sizes were wrong, the others
    would wait for rows that never come. Gathering (config, problem) from every rank
    first lets all ranks see the same facts and raise the same ``ValueError``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "expert parallelism needs a torch.distributed process group: call "
            "torch.distributed.init_process_group first (moe_learn.layers.launch.launch does it for you)"
        )
    world_size = dist.get_world_size(group)
    backend = dist.get_backend(group)
    problem = _local_problem(
        hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, num_experts, world_size, backend
    )
    config = _rank_config(hidden_states, gate_up_proj, down_proj, num_experts) if problem is None else None
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, (config, problem), group=group)
    problems = [f"rank {r}: {p}" for r, (_, p) in enumerate(gathered) if p is not None]
    if problems:
        raise ValueError("expert-parallel MoE: bad arguments on " + "; ".join(problems))
    for i, field in enumerate(_CONFIG_FIELDS):
        values = [cfg[i] for cfg, _ in gathered]
        if len(set(values)) > 1:
            listing = ", ".join(f"rank {r} has {v}" for r, v in enumerate(values))
            raise ValueError(
                f"expert-parallel MoE: the ranks disagree on {field} ({listing}); every rank must build "
                "the same layer (and call it with grad enabled on all ranks or none)"
            )


def expert_parallel_moe(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    num_experts: int,
    group=None,
    local_experts_fn: LocalExpertsFn | None = None,
    check: bool = True,
) -> torch.Tensor:
    """The expert half of an MoE MLP with the experts spread over the ranks of ``group``.

    Every rank of the group calls it together with its own tokens: ``hidden_states
    [T_r, H]``, ``topk_ids``/``topk_weights [T_r, k]`` (T_r may differ per rank, even be
    0), and its own slice of the experts: ``gate_up_proj [E/W, 2I, H]``, ``down_proj
    [E/W, H, I]``, experts ``local_expert_slice(num_experts, rank, W)``. Returns ``[T_r, H]``,
    equal to ``moe_experts_torch`` on the full weights for these tokens.

    ``check=False`` skips the cross-rank argument check (one small all_gather per call);
    only do that once the same call has passed the check.
    """
    if check:
        check_ranks_agree(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, num_experts, group)
    x_local, state = ep_dispatch(hidden_states, topk_ids, num_experts, group)
    y_local = ep_local_experts(x_local, gate_up_proj, down_proj, state, local_experts_fn)
    return ep_combine(y_local, topk_weights, state)


class ExpertParallelMoE(torch.nn.Module):
    """``MoEBlock`` with its experts spread over the ranks of ``group``.

    Same arguments and parameters as ``moe_learn.layers.blocks.MoEBlock``, except that
    ``gate_up_proj`` and ``down_proj`` hold only this rank's ``E/W`` experts
    (``local_expert_slice``); the router is replicated on every rank. Build it on every rank
    of the group, directly (each rank initialises its own experts), from a whole block
    (:meth:`from_block`) or from full weights (:meth:`from_full_weights`).
    ``forward(hidden_states)`` routes with the router; ``forward(hidden_states, topk_ids,
    topk_weights)`` takes a routing from the caller. ``backend`` runs the local experts:
    "torch" (the PyTorch grouped GEMM) or "triton" (the course's kernel); both train.
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
        backend: str = "torch",
        group=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_block_args(hidden_size, intermediate_size, num_experts, top_k, routing, renormalize, backend)
        world_size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        setup_block(self, hidden_size, intermediate_size, num_experts, top_k, routing, renormalize, backend,
                    experts_here=experts_per_rank(num_experts, world_size), device=device, dtype=dtype)
        self.group = group

    @classmethod
    def from_full_weights(cls, gate_up_proj, down_proj, router_weight=None, *, top_k, group=None,
                          **kwargs) -> ExpertParallelMoE:
        """Keep this rank's slice of ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` (copies).

        ``router_weight [E, H]`` is copied too; without it the router starts as ``nn.Linear`` would.
        """
        check_tensor("gate_up_proj", gate_up_proj, ndim=3)
        check_tensor("down_proj", down_proj, ndim=3)
        num_experts, two_i, hidden = gate_up_proj.shape
        factory = {"device": gate_up_proj.device, "dtype": gate_up_proj.dtype}
        layer = cls(hidden, two_i // 2, num_experts, top_k, group=group, **factory, **kwargs)
        own = local_expert_slice(num_experts, dist.get_rank(group), dist.get_world_size(group))
        with torch.no_grad():
            layer.gate_up_proj.copy_(gate_up_proj[own])
            layer.down_proj.copy_(down_proj[own])
            if router_weight is not None:
                layer.router.weight.copy_(router_weight)
        return layer

    @classmethod
    def from_block(cls, block, group=None, *, backend: str | None = None) -> ExpertParallelMoE:
        """This rank's share of a whole ``MoEBlock`` (same routing options; weights copied)."""
        return cls.from_full_weights(
            block.gate_up_proj.detach(), block.down_proj.detach(), block.router.weight.detach(), top_k=block.top_k,
            group=group, routing=block.routing, renormalize=block.renormalize,
            backend=block.backend if backend is None else backend,
        )

    def local_experts_fn(self) -> LocalExpertsFn:
        if self.backend == "torch":
            return torch_local_experts
        from moe_learn.kernels.grouped_gemm import grouped_gemm

        return make_local_experts_fn(grouped_gemm)

    def forward(self, hidden_states, topk_ids=None, topk_weights=None):
        if (topk_ids is None) != (topk_weights is None):
            raise ValueError("pass both topk_ids and topk_weights (a routing of your own), or neither (the router's)")
        if topk_ids is None:
            topk_weights, topk_ids = route(self.router(hidden_states), self.top_k, self.routing, self.renormalize)
        return expert_parallel_moe(
            hidden_states, topk_ids, topk_weights, self.gate_up_proj, self.down_proj, self.num_experts, self.group,
            self.local_experts_fn(),
        )

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
            f"num_experts={self.num_experts} ({self.gate_up_proj.shape[0]} here), top_k={self.top_k}, "
            f"routing={self.routing}, renormalize={self.renormalize}, backend={self.backend}"
        )


# ----------------------------------------------------------------------------------
# A demo the notebook and the command line run: real processes vs one process.
# ----------------------------------------------------------------------------------


def demo_problem(
    world_size: int,
    *,
    num_experts: int = 8,
    hidden: int = 16,
    inter: int = 8,
    top_k: int = 2,
    tokens_per_rank: tuple[int, ...] | None = None,
    dtype=torch.float32,
    seed: int = 0,
):
    """The same random problem on every rank: per-rank tokens and routing, full weights."""
    gen = torch.Generator().manual_seed(seed)
    if tokens_per_rank is None:
        tokens_per_rank = tuple(6 + 3 * r for r in range(world_size))  # ragged on purpose
    hidden_states = [torch.randn(t, hidden, generator=gen, dtype=dtype) for t in tokens_per_rank]
    logits = [torch.randn(t, num_experts, generator=gen, dtype=dtype) for t in tokens_per_rank]
    routing = [calculate_topk(lg, top_k, use_sigmoid=False, renormalize=True) for lg in logits]
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen, dtype=dtype) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter, generator=gen, dtype=dtype) / inter**0.5
    return {
        "hidden_states": hidden_states,
        "topk_weights": [w for w, _ in routing],
        "topk_ids": [i for _, i in routing],
        "gate_up_proj": gate_up,
        "down_proj": down,
    }


def demo_worker(rank: int, world_size: int, num_experts: int = 8) -> dict:
    """One rank of the demo: run the layer forward and backward, compare with one process."""
    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    problem = demo_problem(world_size, num_experts=num_experts)
    own = local_expert_slice(num_experts, rank, world_size)

    def leaf(t):  # a fresh copy on this rank's device that collects its own gradient
        return t.detach().to(device).clone().requires_grad_()

    x = leaf(problem["hidden_states"][rank])
    ids, weights = problem["topk_ids"][rank].to(device), problem["topk_weights"][rank].to(device)
    gate_up, down = leaf(problem["gate_up_proj"][own]), leaf(problem["down_proj"][own])
    # First a mistake: the last rank passes tokens of a different width. Every rank must
    # raise the same ValueError (nobody waits for rows that never come).
    last = rank == world_size - 1
    try:
        expert_parallel_moe(x.detach()[:, :-1] if last else x, ids, weights, gate_up, down, num_experts)
        bad_config_error = "no error"
    except ValueError as exc:
        bad_config_error = str(exc)

    out = expert_parallel_moe(x, ids, weights, gate_up, down, num_experts)
    out.square().sum().backward()  # any loss works; this one gives non-trivial gradients

    # The single-process reference on all ranks' tokens (every rank can rebuild it).
    x_all = leaf(torch.cat(problem["hidden_states"]))
    gu_all, dn_all = leaf(problem["gate_up_proj"]), leaf(problem["down_proj"])
    ref = moe_experts_torch(
        x_all, torch.cat(problem["topk_ids"]).to(device), torch.cat(problem["topk_weights"]).to(device), gu_all, dn_all
    )
    ref.square().sum().backward()
    start = sum(h.shape[0] for h in problem["hidden_states"][:rank])
    mine = slice(start, start + x.shape[0])
    plan = dispatch_plan(ids, num_experts, world_size)
    return {
        "bad_config_error": bad_config_error,
        "rank": rank,
        "experts": (own.start, own.stop - 1),
        "tokens": x.shape[0],
        "sends": plan.send_counts.tolist(),
        "output_error": (out - ref[mine]).abs().max().item(),
        "grad_error": max(
            (x.grad - x_all.grad[mine]).abs().max().item(),
            (gate_up.grad - gu_all.grad[own]).abs().max().item(),
            (down.grad - dn_all.grad[own]).abs().max().item(),
        ),
    }


def run_demo(world_size: int = 2, backend: str = "gloo", num_experts: int = 8, timeout_s: float = 120.0) -> list[dict]:
    """Launch ``world_size`` processes, run the demo on each, print and return their reports."""
    from moe_learn.layers.launch import launch

    reports = launch(demo_worker, world_size, backend=backend, args=(num_experts,), timeout_s=timeout_s)
    print(f"{world_size} ranks ({backend}), {num_experts} experts, {num_experts // world_size} per rank")
    errors = {rep["bad_config_error"] for rep in reports}
    same = "the same ValueError" if len(errors) == 1 else "DIFFERENT errors"
    print(f"  a call with a bad argument on rank {world_size - 1}: every rank raised {same}:")
    for message in sorted(errors):
        print(f"    {message}")
    print("  then a good call, forward and backward:")
    for rep in reports:
        print(
            f"  rank {rep['rank']}: experts {rep['experts'][0]}..{rep['experts'][1]}, {rep['tokens']:2d} tokens, "
            f"sends rows {rep['sends']}, max |out - single process| = {rep['output_error']:.1e}, "
            f"max grad error = {rep['grad_error']:.1e}"
        )
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the expert-parallel MoE layer in real processes.")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--num-experts", type=int, default=8)
    args = parser.parse_args(argv)
    reports = run_demo(args.world_size, args.backend, args.num_experts)
    worst = max(max(r["output_error"], r["grad_error"]) for r in reports)
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
