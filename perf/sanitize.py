"""Every kernel and mode once, on small ragged shapes: what compute-sanitizer runs over.

    compute-sanitizer --tool memcheck  python3 perf/sanitize.py
    compute-sanitizer --tool racecheck python3 perf/sanitize.py

Each call's output is checked against a float32 PyTorch reference, so the run also fails on a
wrong answer. Autotuning is off (MOE_LEARN_AUTOTUNE=0): the sanitizer makes timing meaningless.
"""

import os

os.environ.setdefault("MOE_LEARN_AUTOTUNE", "0")

import torch  # noqa: E402

import moe_learn  # noqa: E402
from moe_learn import fused_routing, get_routing_indices, grouped_gemm, grouped_gemm_dw, moe_experts  # noqa: E402
from moe_learn.kernels.grouped_gemm import grouped_gemm_swiglu  # noqa: E402
from moe_learn.ops.grouped_gemm import torch_grouped_gemm  # noqa: E402


def check(name, got, want, tol=2e-2):
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-6)).item()
    status = "ok" if err < tol else "WRONG"
    print(f"{status:5s} {name}: relative error {err:.1e}", flush=True)
    if err >= tol:
        raise SystemExit(1)


def main():
    torch.manual_seed(0)
    dev, T, k, E, H, I = "cuda", 37, 2, 6, 96, 80
    ids = torch.stack([torch.randperm(E - 1)[:k] for _ in range(T)]).to(dev)  # the last expert gets nothing
    counts, gather = get_routing_indices(ids, E)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        X = torch.randn(T, H, device=dev, dtype=dtype)
        W = (torch.randn(E, 2 * I, H, device=dev) / H**0.5).to(dtype)
        bias = torch.randn(E, 2 * I, device=dev, dtype=dtype)
        Xs = X[gather.long() // k]
        ref = torch_grouped_gemm(Xs.float(), W.float(), counts)
        kernels = ("portable", "hopper") if dtype != torch.float32 else ("portable",)
        for kernel in kernels:
            tag = f"{kernel} {str(dtype)[6:]}"
            w = torch.rand(T, k, device=dev, dtype=dtype)
            want = torch.empty_like(ref).index_copy_(0, gather.long(), (ref + bias.float()[
                torch.repeat_interleave(torch.arange(E, device=dev), counts.long())]) * w.reshape(-1, 1)[gather.long()])
            # twice each: the second call of a layout launches from its plan (the Hopper kernel's; addresses given
            # to the launcher as integers)
            for call in ("first call", "planned"):
                check(f"{tag} gather ({call})", grouped_gemm(X, W, counts, gather_indices=gather, topk=k,
                                                             permute_x=True, kernel=kernel), ref)
                check(f"{tag} plain ({call})", grouped_gemm(Xs, W, counts, kernel=kernel), ref)
                y = grouped_gemm(Xs, W, counts, gather_indices=gather, permute_y=True, topk_weights=w, bias=bias,
                                 kernel=kernel)
                check(f"{tag} scatter+weights+bias ({call})", y, want)
            Wt = W.transpose(1, 2).contiguous()  # [E, K, N]: the backward's dX layout
            check(f"{tag} transpose=False", grouped_gemm(Xs, Wt, counts, transpose=False, kernel=kernel), ref)
            if kernel == "hopper":  # [E, K, N] through TMA (BLOCK_K divides K = 96; the default 128 does not)
                check(f"{tag} transpose=False W by TMA", grouped_gemm(Xs, Wt, counts, transpose=False, kernel=kernel,
                                                                     config={"BLOCK_K": 32}), ref)
                h = grouped_gemm_swiglu(X, W, counts, gather, k, True, True, None, kernel)
                check(f"{tag} SwiGLU in the epilogue", h, moe_learn.swiglu(ref))
                one = counts.new_zeros(E)
                one[2] = 1  # a decode step: one row, the 16-row tiles
                check(f"{tag} one row", grouped_gemm(Xs[:1], W, one, kernel=kernel), Xs[:1].float() @ W[2].float().T)
        dY = torch.randn(T * k, 2 * I, device=dev, dtype=dtype)
        want = torch.stack([dY[s:e].float().T @ Xs[s:e].float() for s, e in zip(
            [0, *counts.cumsum(0)[:-1].tolist()], counts.cumsum(0).tolist(), strict=True)])
        for kernel in ("portable", "hopper") if dtype != torch.float32 else ("portable",):
            dW = grouped_gemm_dw(X, dY, counts, gather_indices=gather, topk=k, permute_x=True, kernel=kernel)
            check(f"dW {kernel} {str(dtype)[6:]}", dW, want)
        if dtype != torch.float32:  # X not gathered: both operands through TMA in the Hopper dW
            check(f"dW hopper plain {str(dtype)[6:]}", grouped_gemm_dw(Xs, dY, counts, kernel="hopper"), want)
    logits = torch.randn(T, E, device=dev)
    for cooperative in (True, False):
        w, i, c, g, s = fused_routing(logits, k, cooperative=cooperative)
        rw, ri = moe_learn.calculate_topk(logits, k, False, True)
        check(f"fused routing cooperative={cooperative}", w, rw)
        assert torch.equal(i, ri) and int(c.sum()) == T * k
    from moe_learn.kernels.route_ids import route_ids
    from moe_learn.layers.experts import drop_invalid, route_rows

    sentinels = ids.clone()
    sentinels[::5, 0] = E  # transformers' expert-parallel sentinel: weight 0
    rw = torch.rand(T, k, device=dev)
    c, g, w = route_ids(sentinels, rw, E)
    kept, ref_w = drop_invalid(sentinels, rw, E)
    ref_c, ref_g = route_rows(kept, E)
    assert torch.equal(c, ref_c) and torch.equal(g, ref_g) and torch.equal(w, ref_w), "route_ids"
    print("ok    route_ids: equal to drop_invalid + route_rows", flush=True)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(E, 2 * I, H, device=dev) / H**0.5).to(torch.bfloat16).requires_grad_()
    w2 = (torch.randn(E, H, I, device=dev) / I**0.5).to(torch.bfloat16).requires_grad_()
    weights = torch.rand(T, k, device=dev, requires_grad=True)
    with torch.no_grad():  # inference: the one-launch routing and the fused SwiGLU epilogue
        check("experts inference", moe_experts(x, sentinels, weights, w1, w2),
              moe_experts(x, sentinels, weights, w1, w2, backend="torch"))
        # decode-sized: the decode path (kernels/decode_experts.py), in one launch with its grid barrier and in
        # two, with the next step's loads ahead and without, twice each (the second from its plan), in both weight
        # layouts
        from moe_learn.kernels import decode_experts as dec

        defaults = dec.ONE_LAUNCH, dec.PREFETCH
        for one in (True, False):
            for prefetch in (True, False):
                dec.ONE_LAUNCH, dec.PREFETCH = one, prefetch
                for tag, a, b, transpose in (("", w1, w2, True),
                                             (" transpose=False", w1.transpose(1, 2).contiguous(),
                                              w2.transpose(1, 2).contiguous(), False)):
                    for call in ("first call", "planned"):
                        check(f"decode experts, {'one launch' if one else 'two launches'}, prefetch {prefetch}{tag} "
                              f"({call})",
                              moe_experts(x[:3], sentinels[:3], weights[:3], a, b, transpose=transpose),
                              moe_experts(x[:3], sentinels[:3], weights[:3], a, b, transpose=transpose,
                                          backend="torch"))
        dec.ONE_LAUNCH, dec.PREFETCH = defaults
    from moe_learn.kernels import swiglu as swiglu_kernels

    ref_out = moe_experts(x, ids, weights, w1, w2, backend="torch")
    ref_grads = torch.autograd.grad(ref_out.float().square().sum(), [x, weights, w1, w2])
    # training's SwiGLU in the GEMMs' epilogues (what an untuned bucket runs), then as separate passes
    for fused in (True, False):
        swiglu_kernels.FUSED = fused
        out = moe_experts(x, ids, weights, w1, w2)
        grads = torch.autograd.grad(out.float().square().sum(), [x, weights, w1, w2])
        tag = "fused SwiGLU" if fused else "separate SwiGLU"
        check(f"experts forward ({tag})", out, ref_out)
        for name, g, r in zip(("d_x", "d_weights", "d_w1", "d_w2"), grads, ref_grads, strict=True):
            check(f"experts backward {name} ({tag})", g, r, tol=3e-2)
    swiglu_kernels.FUSED = True
    torch.cuda.synchronize()
    print("all kernels and modes ran", flush=True)


if __name__ == "__main__":
    main()
