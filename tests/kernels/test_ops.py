"""The kernels as torch.library ops: gradients in every mode, fake implementations, torch.compile."""

import itertools

import pytest
import torch

from moe_learn import calculate_topk, fused_routing, get_routing_indices, grouped_gemm, grouped_gemm_dw
from moe_learn.device import DEVICE

T, K, N, E, TOP_K = 7, 12, 10, 4, 2


def _routing(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # expert 3 never chosen: its weight gradient must be exactly zero
    ids = torch.stack([torch.randperm(3, generator=gen)[:TOP_K] for _ in range(T)])
    counts, gather = get_routing_indices(ids, E)
    return counts.to(DEVICE), gather.to(DEVICE)


def _reference(X, W, counts, gather, topk, permute_x, permute_y, weights, bias, transpose):
    """The grouped GEMM written out in float64 PyTorch: autograd gives the reference gradients."""
    rows = X[gather.long() // topk] if permute_x else X
    Wn = W if transpose else W.transpose(1, 2)
    outs, start = [], 0
    for e, c in enumerate(counts.tolist()):
        y = rows[start : start + c] @ Wn[e].T
        outs.append(y + bias[e] if bias is not None else y)
        start += c
    Y = torch.cat(outs)
    if not permute_y:
        return Y
    if weights is not None:
        Y = Y * weights.reshape(-1)[gather.long()].unsqueeze(-1)
    return torch.zeros_like(Y).index_copy(0, gather.long(), Y)


MODES = [m for m in itertools.product([False, True], repeat=5) if not (m[2] and not m[1])]  # weights need permute_y


@pytest.mark.parametrize("permute_x, permute_y, weighted, biased, transpose", MODES)
def test_every_mode_is_differentiable(permute_x, permute_y, weighted, biased, transpose):
    counts, gather = _routing()
    leaf = lambda *shape: torch.randn(*shape, device=DEVICE, requires_grad=True)  # noqa: E731
    X = leaf(T if permute_x else T * TOP_K, K)
    W = leaf(*((E, N, K) if transpose else (E, K, N)))
    weights = torch.rand(T, TOP_K, device=DEVICE, requires_grad=True) if weighted else None
    bias = leaf(E, N) if biased else None
    kwargs = dict(gather_indices=gather if (permute_x or permute_y) else None, topk=TOP_K if permute_x else 1,
                  permute_x=permute_x, permute_y=permute_y, topk_weights=weights, bias=bias, transpose=transpose)
    out = grouped_gemm(X, W, counts, **kwargs)
    assert out.grad_fn is not None, "a result detached from autograd"
    leaves = [t for t in (X, W, weights, bias) if t is not None]
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, d_out)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    X64, W64 = next(it), next(it)
    w64, b64 = (next(it) if weighted else None), (next(it) if biased else None)
    ref = _reference(X64, W64, counts, gather, TOP_K if permute_x else 1, permute_x, permute_y, w64, b64, transpose)
    ref_grads = torch.autograd.grad(ref, ref_leaves, d_out.double())
    for name, got, want in zip(["out", "X", "W", "weights", "bias"][: 1 + len(leaves)], [out, *grads],
                               [ref, *ref_grads], strict=False):
        assert got.shape == want.shape, name
        err = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert err < 1e-5, f"{name}: relative error {err:.1e}"
    dW = grads[1]
    assert torch.count_nonzero(dW[3]) == 0, "an expert with no rows must get a zero gradient"


def test_dw_is_differentiable_in_both_inputs():
    counts, gather = _routing(1)
    X = torch.randn(T, K, device=DEVICE, requires_grad=True)
    dY = torch.randn(T * TOP_K, N, device=DEVICE, requires_grad=True)
    dW = grouped_gemm_dw(X, dY, counts, gather_indices=gather, topk=TOP_K, permute_x=True)
    G = torch.randn_like(dW)
    got = torch.autograd.grad(dW, [X, dY], G)
    X64, dY64 = X.detach().double().requires_grad_(), dY.detach().double().requires_grad_()
    rows, start, ref = X64[gather.long() // TOP_K], 0, []
    for c in counts.tolist():
        ref.append(dY64[start : start + c].T @ rows[start : start + c])
        start += c
    want = torch.autograd.grad(torch.stack(ref), [X64, dY64], G.double())
    for g, w in zip(got, want, strict=True):
        assert ((g.double() - w).norm() / w.norm()).item() < 1e-5


@pytest.mark.parametrize("use_sigmoid, renormalize, pre_act", list(itertools.product([False, True], repeat=3)))
def test_fused_routing_weights_have_calculate_topks_gradient(use_sigmoid, renormalize, pre_act):
    logits = torch.randn(9, 6, device=DEVICE, requires_grad=True)
    weights, ids, *_ = fused_routing(logits, 3, use_sigmoid=use_sigmoid, renormalize=renormalize, pre_act=pre_act)
    ref_logits = logits.detach().double().requires_grad_()
    ref_weights, ref_ids = calculate_topk(ref_logits, 3, use_sigmoid, renormalize, pre_act=pre_act,
                                          post_act=not pre_act)
    assert torch.equal(ids.cpu(), ref_ids.cpu())
    d = torch.randn_like(weights)
    (got,) = torch.autograd.grad(weights, logits, d)
    (want,) = torch.autograd.grad(ref_weights, ref_logits, d.double())
    assert ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item() < 1e-5


def test_out_with_inputs_that_require_grad_is_refused():
    counts, _ = _routing()
    X = torch.randn(T * TOP_K, K, device=DEVICE, requires_grad=True)
    W = torch.randn(E, N, K, device=DEVICE)
    with pytest.raises(ValueError, match="out= does not record autograd"):
        grouped_gemm(X, W, counts, out=torch.empty(T * TOP_K, N, device=DEVICE))
    with torch.no_grad():  # under no_grad out= is fine
        out = torch.full((T * TOP_K, N), float("nan"), device=DEVICE)
        assert grouped_gemm(X, W, counts, out=out) is out and not out.isnan().any()


def test_opcheck_fake_and_autograd_registrations():
    """torch.library's own consistency checks: schema, fake tensors, autograd registration."""
    counts, gather = _routing()
    X = torch.randn(T, K, device=DEVICE, requires_grad=True)
    W = torch.randn(E, N, K, device=DEVICE, requires_grad=True)
    w = torch.rand(T, TOP_K, device=DEVICE, requires_grad=True)
    b = torch.randn(E, N, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_learn.grouped_gemm.default,
                          (X, W, counts, gather, w, b, TOP_K, True, True, True, "", "auto"))
    dY = torch.randn(T * TOP_K, N, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_learn.grouped_gemm_dw.default,
                          (X, dY, counts, gather, TOP_K, True, True, "", "auto"))
    logits = torch.randn(T, E, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_learn.fused_routing.default, (logits, 2, False, True, True, False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
