"""Argument checks shared by the reference ops: errors name the argument and the fix."""

from __future__ import annotations

import torch


def check_tensor(name: str, value, *, ndim: int | tuple[int, ...] | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.ndim not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")


def check_integer(name: str, value: torch.Tensor) -> None:
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold integer indices (int32 or int64), got {value.dtype}; "
            f"use {name}.long() if the values are whole numbers"
        )


def check_floating(name: str, value: torch.Tensor) -> None:
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_index_range(name: str, value: torch.Tensor, upper: int, what: str) -> None:
    """Every entry of ``value`` must lie in [0, upper). A meta tensor has no values to check."""
    if value.numel() == 0 or value.is_meta:
        return
    lo, hi = int(value.min()), int(value.max())
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds {bad}, outside [0, {upper}) ({what})")


def check_index_vector(name: str, value: torch.Tensor, length: int, mismatch: str) -> None:
    """``value`` must be a 1-D integer tensor of ``length`` entries.

    ``mismatch`` finishes the message "``name`` has N entries..." with what was expected and why.
    """
    check_tensor(name, value, ndim=1)
    check_integer(name, value)
    if value.numel() != length:
        raise ValueError(f"{name} has {value.numel()} entries{mismatch}")


def check_m_sizes(m_sizes: torch.Tensor, num_experts: int, total_rows: int) -> None:
    """m_sizes: one non-negative row count per expert, summing to the rows of X."""
    check_index_vector(
        "m_sizes",
        m_sizes,
        num_experts,
        f" but W has {num_experts} experts; pass one row count per expert (zeros for experts with no tokens)",
    )
    if m_sizes.numel() and int(m_sizes.min()) < 0:
        raise ValueError(f"m_sizes must be non-negative, got {m_sizes.tolist()}")
    total = int(m_sizes.sum()) if m_sizes.numel() else 0
    if total != total_rows:
        raise ValueError(
            f"m_sizes sums to {total} but X has {total_rows} rows; "
            "m_sizes[e] must count the rows of X that belong to expert e"
        )


def check_gather_indices(gather_indices: torch.Tensor, length: int) -> None:
    """gather_indices must be a 1-D integer permutation of 0..length-1."""
    check_index_vector(
        "gather_indices",
        gather_indices,
        length,
        f", expected {length} (one per (token, top-k slot) pair, as get_routing_indices returns)",
    )
    if length == 0:
        return
    check_index_range("gather_indices", gather_indices, length, f"it must be a permutation of 0..{length - 1}")
    # A repeated index would leave some output row of unpermute never written (garbage).
    seen = torch.zeros(length, dtype=torch.bool, device=gather_indices.device)
    seen[gather_indices.long()] = True
    if not bool(seen.all()):
        missing = int((~seen).nonzero()[0])
        raise ValueError(
            f"gather_indices is not a permutation of 0..{length - 1}: {missing} never appears "
            "(some other index repeats); pass the gather_indices that get_routing_indices returns"
        )


def check_same_device(**tensors: torch.Tensor) -> None:
    for name, value in tensors.items():
        check_tensor(name, value)
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device: {listing}")


def check_moe_args(hidden_states, topk_ids, topk_weights, gate_up_proj, down_proj, *, transpose: bool = True) -> None:
    """The arguments of an MoE expert layer: hidden ``[T, H]``, routing ``[T, k]``, and the
    weights ``[E, 2I, H]`` / ``[E, H, I]`` (``transpose=False``: ``[E, H, 2I]`` / ``[E, I, H]``)."""
    check_tensor("hidden_states", hidden_states, ndim=2)
    check_floating("hidden_states", hidden_states)
    check_tensor("topk_ids", topk_ids, ndim=2)
    check_integer("topk_ids", topk_ids)
    check_tensor("topk_weights", topk_weights, ndim=2)
    check_floating("topk_weights", topk_weights)
    check_tensor("gate_up_proj", gate_up_proj, ndim=3)
    check_tensor("down_proj", down_proj, ndim=3)
    check_same_device(hidden_states=hidden_states, topk_ids=topk_ids, topk_weights=topk_weights,
                      gate_up_proj=gate_up_proj, down_proj=down_proj)
    num_tokens = hidden_states.shape[0]
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [T, k] with T={num_tokens}"
        )
    _check_expert_shapes(hidden_states, gate_up_proj, down_proj, transpose)


def check_expert_weights(hidden_states, gate_up_proj, down_proj, *, transpose: bool = True) -> None:
    """Hidden ``[T, H]`` and the experts' weights ``[E, 2I, H]`` / ``[E, H, I]`` (``transpose=False``:
    ``[E, H, 2I]`` / ``[E, I, H]``): the shapes, one dtype and one device."""
    check_tensor("hidden_states", hidden_states, ndim=2)
    check_floating("hidden_states", hidden_states)
    check_tensor("gate_up_proj", gate_up_proj, ndim=3)
    check_tensor("down_proj", down_proj, ndim=3)
    check_same_device(hidden_states=hidden_states, gate_up_proj=gate_up_proj, down_proj=down_proj)
    _check_expert_shapes(hidden_states, gate_up_proj, down_proj, transpose)


def _check_expert_shapes(hidden_states, gate_up_proj, down_proj, transpose: bool) -> None:
    hidden = hidden_states.shape[1]
    # shapes as [E, N, K] whatever the storage layout
    w1 = gate_up_proj.shape if transpose else gate_up_proj.transpose(1, 2).shape
    w2 = down_proj.shape if transpose else down_proj.transpose(1, 2).shape
    want = "[E, 2I, H] and [E, H, I]" if transpose else "[E, H, 2I] and [E, I, H]"
    shapes = f"gate_up_proj {tuple(gate_up_proj.shape)} and down_proj {tuple(down_proj.shape)}"
    if w1[2] != hidden or w2[1] != hidden:
        raise ValueError(f"{shapes} must be {want} with H={hidden} (transpose={transpose})")
    if w1[0] != w2[0] or w1[1] != 2 * w2[2]:
        raise ValueError(f"{shapes} disagree: they must be {want} with the same E and I (transpose={transpose})")
    for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if w.dtype != hidden_states.dtype:
            raise TypeError(f"hidden_states is {hidden_states.dtype} but {name} is {w.dtype}; cast them to one dtype")
