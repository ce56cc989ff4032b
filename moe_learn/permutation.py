"""Moving rows between token order and expert order."""

from __future__ import annotations

import torch

from .validation import check_index_range, check_integer, check_positive_int, check_tensor


def _check_gather_indices(gather_indices: torch.Tensor, length: int) -> None:
    check_tensor("gather_indices", gather_indices, ndim=1)
    check_integer("gather_indices", gather_indices)
    if gather_indices.numel() != length:
        raise ValueError(
            f"gather_indices has {gather_indices.numel()} entries, expected {length} "
            "(one per (token, top-k slot) pair, as get_routing_indices returns)"
        )
    check_index_range("gather_indices", gather_indices, max(length, 1), "it must be a permutation of 0..len-1")


def permute(X: torch.Tensor, gather_indices: torch.Tensor, topk: int) -> torch.Tensor:
    """Token order -> expert order: row i of the result is ``X[gather_indices[i] // topk]``.

    X is ``[T, H]`` (or ``[B, S, H]``, flattened to ``[B*S, H]``). Each token appears
    ``topk`` times in the result, once per expert it was routed to.
    """
    check_tensor("X", X, ndim=(2, 3))
    check_positive_int("topk", topk)
    X = X.reshape(-1, X.shape[-1])
    _check_gather_indices(gather_indices, X.shape[0] * topk)
    token_ids = gather_indices if topk == 1 else gather_indices // topk
    return X[token_ids.long()]


def unpermute(X: torch.Tensor, gather_indices: torch.Tensor) -> torch.Tensor:
    """Expert order -> flat (token, slot) order: ``out[gather_indices[i]] = X[i]``."""
    check_tensor("X", X, ndim=2)
    _check_gather_indices(gather_indices, X.shape[0])
    out = torch.empty_like(X)
    return out.index_copy_(0, gather_indices.long(), X)
