"""The hand-written MoE backward: float64 gradcheck, Triton vs reference, the block, the aux loss."""

import importlib

import pytest
import torch

from moe_learn.device import DEVICE, ON_GPU
from moe_learn.layers.blocks import FusedMoEBlock, load_balancing_loss
from moe_learn.layers.experts import moe_experts
from moe_learn.ops.moe import moe_experts_torch

TOL = {torch.float32: 5e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [
    torch.float32,
    pytest.param(torch.float16, marks=pytest.mark.skipif(not ON_GPU, reason="fp16/bf16 are checked on a GPU only")),
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not ON_GPU, reason="fp16/bf16 are checked on a GPU only")),
]

# name -> (T, k, E, list of allowed experts or None): ragged, empty experts, one expert takes all, top-1
ROUTINGS = {
    "ragged": (11, 2, 5, None),
    "empty_experts": (9, 2, 6, [0, 2, 5]),
    "all_to_one": (7, 1, 4, [3]),
    "one_token_top3": (1, 3, 4, None),
}


def _case(name, H, I, dtype, weights_dtype=None):
    T, k, E, allowed = ROUTINGS[name]
    allowed = torch.tensor(allowed if allowed is not None else list(range(E)))
    ids = torch.stack([allowed[torch.randperm(len(allowed))[:k]] for _ in range(T)]).to(DEVICE)
    x = torch.randn(T, H, device=DEVICE, dtype=torch.float64)
    w = torch.rand(T, k, device=DEVICE, dtype=torch.float64)
    w1 = torch.randn(E, 2 * I, H, device=DEVICE, dtype=torch.float64) / H**0.5
    w2 = torch.randn(E, H, I, device=DEVICE, dtype=torch.float64) / I**0.5
    tensors = [x.to(dtype), w.to(weights_dtype or dtype), w1.to(dtype), w2.to(dtype)]
    return ids, [t.requires_grad_() for t in tensors]


@pytest.mark.parametrize("routing", ["ragged", "empty_experts", "one_token_top3"])
def test_gradcheck_float64_reference_backward(routing):
    ids, (x, w, w1, w2) = _case(routing, H=5, I=3, dtype=torch.float64)
    cpu = [t.detach().cpu().requires_grad_() for t in (x, w, w1, w2)]
    fn = lambda *a: moe_experts(a[0], ids.cpu(), a[1], a[2], a[3], backend="torch")
    assert torch.autograd.gradcheck(fn, tuple(cpu), fast_mode=True)
    # The pure-PyTorch reference itself (autograd through its primitives) as well.
    ref = lambda *a: moe_experts_torch(a[0], ids.cpu(), a[1], a[2], a[3])
    assert torch.autograd.gradcheck(ref, tuple(cpu), fast_mode=True)


def _grads(fn, tensors, d_out):
    out = fn(*tensors)
    return [out, *torch.autograd.grad(out, tensors, d_out.to(out.dtype))]


def _rel(got, ref, strict=True):
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_triton_backward_matches_reference(routing, dtype):
    ids, tensors = _case(routing, H=24, I=20, dtype=dtype)
    ref_tensors = [t.detach().double().requires_grad_() for t in tensors]
    d_out = torch.randn(tensors[0].shape, device=DEVICE, dtype=torch.float64)
    ref = _grads(lambda x, w, a, b: moe_experts_torch(x, ids, w, a, b), ref_tensors, d_out)
    got = _grads(lambda x, w, a, b: moe_experts(x, ids, w, a, b, backend="triton"), tensors, d_out)
    for name, g, r in zip(["output", "d_hidden", "d_topk_weights", "d_gate_up", "d_down"], got, ref, strict=True):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert _rel(g, r) <= TOL[dtype], f"{name}: relative error {_rel(g, r):.2e}"
    if routing == "empty_experts":
        assert torch.count_nonzero(got[3][1]) == 0 and torch.count_nonzero(got[4][4]) == 0


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("routing", ["ragged", "empty_experts", "one_token_top3"])
def test_backward_with_the_swiglu_in_the_gemm_epilogues(routing, transpose, monkeypatch):
    """The Hopper kernel's path (on the CPU: forced, under the interpreter): GEMM1 stores gate_up and h
    from one epilogue, GEMM2's dX runs the SwiGLU's backward in its epilogue; every gradient against float64."""
    if not ON_GPU:  # (the module: the package exports a function of the same name)
        monkeypatch.setattr(importlib.import_module("moe_learn.kernels.grouped_gemm"), "auto_candidate", lambda X: True)
    monkeypatch.setenv("MOE_LEARN_AUTOTUNE", "0")  # untuned buckets run fused (a GPU would time fused vs separate)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    ids, tensors = _case(routing, H=48, I=40, dtype=dtype)
    ref_tensors = [t.detach().double().requires_grad_() for t in tensors]
    d_out = torch.randn(tensors[0].shape, device=DEVICE, dtype=torch.float64)
    ref = _grads(lambda x, w, a, b: moe_experts_torch(x, ids, w, a, b), ref_tensors, d_out)
    if not transpose:
        ref[3:] = [ref[3].mT, ref[4].mT]
        tensors[2:] = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in tensors[2:]]
    got = _grads(lambda x, w, a, b: moe_experts(x, ids, w, a, b, transpose=transpose), tensors, d_out)
    for name, g, r in zip(["output", "d_hidden", "d_topk_weights", "d_gate_up", "d_down"], got, ref, strict=True):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert _rel(g, r) <= TOL[dtype], f"{name}: relative error {_rel(g, r):.2e}"


def test_llama4_layout_and_float32_router_weights():
    """transpose=False ([E, H, 2I], [E, I, H]); fp32 weights with fp16 activations keep their dtype."""
    ids, (x, w, w1, w2) = _case("ragged", H=16, I=8, dtype=torch.float32)
    d_out = torch.randn_like(x)
    ref = _grads(lambda x, w, a, b: moe_experts_torch(x, ids, w, a, b), [x, w, w1, w2], d_out)
    w1t = w1.detach().transpose(1, 2).contiguous().requires_grad_()
    w2t = w2.detach().transpose(1, 2).contiguous().requires_grad_()
    got = _grads(lambda x, w, a, b: moe_experts(x, ids, w, a, b, transpose=False), [x, w, w1t, w2t], d_out)
    for g, r in zip(got, [ref[0], ref[1], ref[2], ref[3].mT, ref[4].mT], strict=True):
        assert _rel(g, r) <= 5e-4
    xh, w1h, w2h = (t.detach().half().requires_grad_() for t in (x, w1, w2))
    wf = w.detach().requires_grad_()
    out = moe_experts(xh, ids, wf, w1h, w2h, backend="torch")
    (d_w,) = torch.autograd.grad(out.float().sum(), wf)
    assert d_w.dtype == torch.float32


def test_no_tokens_and_frozen_inputs():
    ids, (x, w, w1, w2) = _case("ragged", H=8, I=4, dtype=torch.float32)
    out = moe_experts(x[:0], ids[:0], w[:0], w1, w2)
    assert out.shape == (0, 8)
    # Only the weights need gradients (frozen embeddings): no crash, same values.
    out = moe_experts(x.detach(), ids, w.detach(), w1, w2)
    d_w1, d_w2 = torch.autograd.grad(out.sum(), (w1, w2))
    ref = torch.autograd.grad(moe_experts_torch(x.detach(), ids, w.detach(), w1, w2).sum(), (w1, w2))
    assert _rel(d_w1, ref[0]) < 5e-4 and _rel(d_w2, ref[1]) < 5e-4


def test_moe_experts_rejects_bad_arguments():
    ids, (x, w, w1, w2) = _case("ragged", H=8, I=4, dtype=torch.float32)
    with pytest.raises(TypeError, match="topk_ids must hold integer"):
        moe_experts(x, ids.float(), w, w1, w2)
    with pytest.raises(ValueError, match="backend must be one of"):
        moe_experts(x, ids, w, w1, w2, backend="cuda")
    with pytest.raises(ValueError, match=r"must be \[E, 2I, H\] and \[E, H, I\]"):
        moe_experts(x, ids, w, w1, w2.mT)
    bad = ids.clone()
    bad[0, 0] = 7
    if x.device.type == "cpu":  # a value check: CPU tensors only
        with pytest.raises(ValueError, match="topk_ids holds 7"):
            moe_experts(x, bad, w, w1, w2)
    else:  # on a GPU nothing reads the ids back: an id out of range contributes nothing
        with torch.no_grad():
            dropped = w.clone()
            dropped[0, 0] = 0
            torch.testing.assert_close(moe_experts(x, bad, w, w1, w2), moe_experts(x, ids, dropped, w1, w2))
    with pytest.raises(TypeError, match="cast them to one dtype"):
        moe_experts(x, ids, w, w1.half(), w2)


def test_run_experts_refuses_inconsistent_operands():
    """run_experts (transformers' path) checks shapes once, then runs the GEMMs unchecked: every
    mismatch that would send a kernel past a tensor must be refused there."""
    from moe_learn.layers.experts import route_rows, run_experts

    ids, (x, w, w1, w2) = _case("ragged", H=8, I=4, dtype=torch.float32)
    counts, gather = route_rows(ids, w1.shape[0])
    run_experts(x, counts, gather, w, w1, w2)  # consistent: runs
    bad = {
        "hidden size": (x[:, :6], counts, gather, w, w1, w2),
        "experts": (x, counts, gather, w, w1, w2[:-1]),
        "intermediate size": (x, counts, gather, w, w1, w2[:, :, :3]),
        "gather length": (x, counts, gather[:-1], w, w1, w2),
        "counts length": (x, counts[:-1], gather, w, w1, w2),
        "weights rows": (x, counts, gather, w[:-1], w1, w2),
        "weights 1-D": (x, counts, gather, w.reshape(-1), w1, w2),
    }
    for args in bad.values():
        with pytest.raises(ValueError, match="must be"):
            run_experts(*args)
    with pytest.raises(TypeError, match="cast them to one dtype"):
        run_experts(x, counts, gather, w, w1.half(), w2)


@pytest.mark.parametrize("routing", ["softmax", "sigmoid"])
def test_block_trains_router_and_matches_reference_backend(routing):
    torch.manual_seed(0)
    block = FusedMoEBlock(16, 12, num_experts=4, top_k=2, routing=routing, device=DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE)
    grads = {}
    for backend in ("triton", "torch"):
        block.backend = backend
        block.zero_grad()
        out = block(x)
        assert out.shape == x.shape
        (out.square().mean() + load_balancing_loss(block.router_logits, block.topk_ids, 4)).backward()
        grads[backend] = {n: p.grad.clone() for n, p in block.named_parameters()}
    assert grads["triton"]["router.weight"].abs().sum() > 0, "the router must get a gradient"
    for name, ref in grads["torch"].items():
        assert _rel(grads["triton"][name], ref) <= 5e-4, name


def test_load_balancing_loss():
    E = 4
    ids = torch.arange(8).remainder(E).view(8, 1)
    assert load_balancing_loss(torch.zeros(8, E), ids, E).item() == pytest.approx(1.0)
    logits = torch.zeros(8, E)
    logits[:, 0] = 5.0
    logits.requires_grad_()
    loss = load_balancing_loss(logits, torch.zeros(8, 1, dtype=torch.long), E)
    assert loss.item() > 3.0  # all tokens on one confident expert: close to E
    (d,) = torch.autograd.grad(loss, logits)
    assert (d[:, 0] > 0).all(), "the loss must push the overloaded expert's logit down"


def test_block_rejects_bad_options():
    with pytest.raises(ValueError, match="routing must be"):
        FusedMoEBlock(8, 8, 4, 2, routing="relu")
    with pytest.raises(ValueError, match="top_k=5 is larger than num_experts=4"):
        FusedMoEBlock(8, 8, 4, 5)


def test_forward_matches_fused_moe_experts():
    """moe_experts keeps the forward contract of the chapter 07 fused_moe_experts."""
    from moe_learn.layers.experts import fused_moe_experts

    ids, (x, w, w1, w2) = _case("empty_experts", H=16, I=8, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(moe_experts(x, ids, w, w1, w2), fused_moe_experts(x, ids, w, w1, w2),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_training_keeps_only_gemm1_output_beyond_its_inputs(backend):
    """What the forward saves for the backward: its inputs, the routing and gate_up [M, 2I], nothing [M, H].

    The routing weight is folded into the SwiGLU, so neither the expert outputs nor h are kept
    (h is recomputed in the backward's element-wise pass); a regression here costs [M, H] of memory.
    """
    T, k, E, H, I = 9, 3, 4, 40, 8  # noqa: E741  (H much wider than 2I: an [M, H] tensor would stand out)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(DEVICE)
    x = torch.randn(T, H, device=DEVICE, requires_grad=True)
    w = torch.rand(T, k, device=DEVICE, requires_grad=True)
    w1 = torch.randn(E, 2 * I, H, device=DEVICE, requires_grad=True)
    w2 = torch.randn(E, H, I, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = moe_experts(x, ids, w, w1, w2, backend=backend)
    inputs = (x, w, w1, w2)
    extra = {tuple(t.shape) for t in saved if t.is_floating_point() and not any(t is i for i in inputs)}
    # gate_up, and the routing weights after dropping invalid ids ([T, k]): nothing of width H
    assert (T * k, 2 * I) in extra and extra <= {(T * k, 2 * I), (T, k)}, f"saved beyond the inputs: {extra}"
    out.sum().backward()
    assert all(t.grad is not None for t in (x, w, w1, w2))


def test_double_backward_is_refused_on_triton_and_runs_on_the_reference():
    T, k, E, H, I = 4, 2, 4, 8, 3  # noqa: E741
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(DEVICE)
    x = torch.randn(T, H, device=DEVICE, requires_grad=True)
    w, w1, w2 = (torch.rand(T, k, device=DEVICE), torch.randn(E, 2 * I, H, device=DEVICE),
                 torch.randn(E, H, I, device=DEVICE))
    with pytest.raises(RuntimeError, match="no double backward.*backend='torch'"):
        torch.autograd.grad(moe_experts(x, ids, w, w1, w2).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(moe_experts(x, ids, w, w1, w2, backend="torch").square().sum(), x, create_graph=True)
    assert g.requires_grad
