"""Moving rows between token order and expert order, and the weighted combine.

Three orders of rows appear in an MoE layer with ``T`` tokens and top-``k`` routing:

* token order ``[T, H]``: the layer's input and output;
* flat (token, slot) order ``[T*k, H]``: row ``t*k + j`` is token ``t``'s ``j``-th choice;
* expert order ``[T*k, H]``: all rows of expert 0, then expert 1, ... (what a grouped GEMM wants).

``gather_indices`` (from :func:`moe_learn.get_routing_indices`) maps expert order to flat
order: row ``i`` in expert order is flat slot ``gather_indices[i]``, i.e. token
``gather_indices[i] // k``. :func:`permute` goes token -> expert order, :func:`unpermute`
goes expert -> flat order, and :func:`combine` sums each token's ``k`` rows with its
routing weights to get back to token order.
"""

from __future__ import annotations

import torch

from moe_learn.validation import (
    check_floating,
    check_gather_indices,
    check_positive_int,
    check_same_device,
    check_tensor,
)


def permute(X: torch.Tensor, gather_indices: torch.Tensor, topk: int) -> torch.Tensor:
    """Token order -> expert order: row i of the result is ``X[gather_indices[i] // topk]``.

    X is ``[T, H]`` (or ``[B, S, H]``, flattened to ``[B*S, H]``). Each token appears
    ``topk`` times in the result, once per expert it was routed to. Returns ``[T*topk, H]``.
    """
    check_tensor("X", X, ndim=(2, 3))
    check_positive_int("topk", topk)
    check_tensor("gather_indices", gather_indices)
    check_same_device(X=X, gather_indices=gather_indices)
    X = X.reshape(-1, X.shape[-1])
    check_gather_indices(gather_indices, X.shape[0] * topk)
    # gather_indices counts (token, slot) pairs; // topk turns a pair into its token.
    token_ids = gather_indices if topk == 1 else gather_indices // topk
    return X[token_ids.long()]


def unpermute(X: torch.Tensor, gather_indices: torch.Tensor) -> torch.Tensor:
    """Expert order -> flat (token, slot) order: ``out[gather_indices[i]] = X[i]``.

    The inverse of the row shuffle in :func:`permute` (a scatter, not a gather): row
    ``t*k + j`` of the result is what the ``j``-th expert of token ``t`` produced.
    """
    check_tensor("X", X, ndim=2)
    check_tensor("gather_indices", gather_indices)
    check_same_device(X=X, gather_indices=gather_indices)
    check_gather_indices(gather_indices, X.shape[0])
    out = torch.empty_like(X)
    # index_copy_ wants int64 indices; get_routing_indices hands out int32.
    return out.index_copy_(0, gather_indices.long(), X)


def combine(Y_flat: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Flat (token, slot) order ``[T*k, H]`` -> token order ``[T, H]``, weighted.

    ``out[t] = sum_j topk_weights[t, j] * Y_flat[t*k + j]``. The products and the sum run
    in float32 or wider (bf16 sums of k terms lose bits; float64 stays float64) and the
    result has ``Y_flat``'s dtype.
    """
    check_tensor("Y_flat", Y_flat, ndim=2)
    check_tensor("topk_weights", topk_weights, ndim=2)
    check_floating("Y_flat", Y_flat)
    check_floating("topk_weights", topk_weights)
    check_same_device(Y_flat=Y_flat, topk_weights=topk_weights)
    num_tokens, top_k = topk_weights.shape
    if Y_flat.shape[0] != num_tokens * top_k:
        raise ValueError(
            f"Y_flat has {Y_flat.shape[0]} rows but topk_weights {tuple(topk_weights.shape)} needs "
            f"T*k = {num_tokens}*{top_k} = {num_tokens * top_k}; pass unpermute's output (flat (token, slot) order)"
        )
    acc = torch.promote_types(Y_flat.dtype, torch.float32)
    rows = Y_flat.reshape(num_tokens, top_k, Y_flat.shape[1]).to(acc)
    out = (rows * topk_weights.to(acc).unsqueeze(-1)).sum(dim=1)
    return out.to(Y_flat.dtype)
