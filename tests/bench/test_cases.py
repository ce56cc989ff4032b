"""The benchmark's cases: the models' shapes, the FLOP and byte counts, the routing they draw."""

import pytest
import torch

from moe_learn.bench import cases as C


def test_sixteen_prefill_cases_with_the_models_shapes():
    cases = C.cases()
    assert len(cases) == 16
    qwen = {(c.gemm, c.tokens): c for c in cases if c.model == "qwen3-30b-a3b"}
    gate_up = qwen[("gate_up", 1024)]
    assert (gate_up.M, gate_up.N, gate_up.K, gate_up.E) == (8192, 1536, 2048, 128)  # T*k rows, [E, 2I, H]
    down = qwen[("down", 8192)]
    assert (down.M, down.N, down.K) == (65536, 2048, 768)  # [E, H, I]


def test_thirty_two_decode_cases_one_weight_set_after_another():
    cases = C.decode_cases()
    assert len(cases) == 32
    assert {c.model for c in cases} == {"qwen3-30b-a3b", "deepseek-v3", "mixtral-8x7b", "gpt-oss-120b"}
    # each (model, GEMM) is one run of four token counts, so the bench draws each weight tensor once
    groups = [(c.model, c.gemm) for c in cases]
    assert len({g: None for g in groups}) == 8 and all(groups[i] == groups[i - i % 4] for i in range(32))
    assert [c.tokens for c in cases[:4]] == [1, 8, 64, 256]
    ds = {(c.gemm, c.tokens): c for c in cases if c.model == "deepseek-v3"}
    assert (ds["gate_up", 256].M, ds["gate_up", 256].N, ds["gate_up", 256].K, ds["gate_up", 256].E) == (2048, 4096,
                                                                                                       7168, 256)
    oss = {(c.gemm, c.tokens): c for c in cases if c.model == "gpt-oss-120b"}
    assert (oss["down", 1].M, oss["down", 1].N, oss["down", 1].K, oss["down", 1].E) == (4, 2880, 2880, 128)


def test_seven_experts_cases_and_their_flops():
    cases = C.experts_cases()
    assert [(c.model, c.tokens) for c in cases] == [
        ("qwen3-30b-a3b", 1024), ("qwen3-30b-a3b", 8192), ("qwen3-30b-a3b", 32768), ("mixtral-8x7b", 1024),
        ("mixtral-8x7b", 8192), ("gpt-oss-20b", 8192), ("deepseek-v3", 4096)]
    for case in cases:
        H, I, E, k = C.MODELS[case.model]
        assert (case.H, case.I, case.E, case.k) == (H, I, E, k)
        # forward = the two GEMMs' 2*M*N*K, the backward's dX and dW twice that
        gemms = [g for g in C.cases([case.model], (case.tokens,))]
        assert case.flops_forward == sum(g.flops for g in gemms) == 6 * case.tokens * k * H * I
        assert case.flops_training == 3 * case.flops_forward
    assert C.experts_cases()[-1].weight_bytes() == 2 * 3 * 256 * 7168 * 2048  # DeepSeek-V3: ~22.5 GB in bf16
    assert "plain SwiGLU" in C.experts_cases(["gpt-oss-20b"])[0].note
    assert [c.tokens for c in C.experts_cases(["qwen3-30b-a3b"], [1024, 32768])] == [1024, 32768]


def test_bytes_count_x_the_weights_of_the_experts_read_and_y_once():
    case = C.Case("m", "gate_up", 4, M=8, N=6, K=5, E=3)
    assert case.flops == 2 * 8 * 6 * 5
    assert case.bytes() == 2 * (8 * 5 + 3 * 6 * 5 + 8 * 6)
    assert case.bytes(experts=1) == 2 * (8 * 5 + 1 * 6 * 5 + 8 * 6)
    assert C.Case.of({**vars(case), "name": case.name, "ms": {}}) == case


@pytest.mark.parametrize("tokens,experts,k", [(1, 8, 2), (64, 128, 8), (33, 16, 1)])
def test_routing_is_top_k_of_a_softmax_renormalized(tokens, experts, k):
    weights, ids = C.route(tokens, experts, k, seed=3, device="cpu")
    assert weights.shape == ids.shape == (tokens, k) and ids.dtype == torch.int64
    torch.testing.assert_close(weights.sum(-1), torch.ones(tokens))
    assert all(len(set(row)) == k for row in ids.tolist())  # k distinct experts per token
    again = C.route(tokens, experts, k, seed=3, device="cpu")
    assert torch.equal(again[1], ids)  # same seed, same routing: every implementation gets the same
    counts = C.routing_counts(tokens, experts, k, seed=3, device="cpu")
    assert counts.sum().item() == tokens * k and torch.equal(counts, torch.bincount(ids.flatten(), minlength=experts))


def test_per_expert_loop_matches_a_float64_matmul_and_can_compute_in_float32():
    sizes = [3, 0, 2]
    X, W = torch.randn(5, 4, dtype=torch.float16), torch.randn(3, 6, 4, dtype=torch.float16)
    owners = [0, 0, 0, 2, 2]
    expected = torch.stack([X[i].double() @ W[e].double().T for i, e in enumerate(owners)])
    got = C.per_expert_loop(X, W, sizes, dtype=torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert C.per_expert_loop(X[:0], W, [0, 0, 0]).shape == (0, 6)
