"""The benchmark's cases: real MoE models' expert GEMMs, and routings drawn like a router's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# name: (hidden H, expert intermediate I, experts E, top-k)
MODELS = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "llama4-scout": (5120, 8192, 16, 1),
    "gpt-oss-20b": (2880, 2880, 32, 4),
}
TOKENS = (1024, 8192)
GEMMS = ("gate_up", "down")


@dataclass
class Case:
    model: str
    gemm: str
    tokens: int
    M: int  # rows after routing: tokens * top-k
    N: int
    K: int
    E: int

    @property
    def flops(self) -> float:
        return 2.0 * self.M * self.N * self.K

    def bytes(self, elem: int = 2) -> float:
        return float(elem) * (self.M * self.K + self.E * self.N * self.K + self.M * self.N)

    @property
    def name(self) -> str:
        return f"{self.model} {self.gemm} T={self.tokens}"


def cases(models=None, tokens=TOKENS) -> list[Case]:
    out = []
    for model in models or MODELS:
        H, I, E, k = MODELS[model]
        for T in tokens:
            for gemm in GEMMS:
                N, K = (2 * I, H) if gemm == "gate_up" else (H, I)
                out.append(Case(model, gemm, T, T * k, N, K, E))
    return out


def routing_counts(tokens: int, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """m_sizes from top-k routing of random router logits (balanced only on average)."""
    from moe_learn.ops.routing import calculate_topk, get_routing_indices

    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(tokens, num_experts, device="cuda", generator=g)
    _, ids = calculate_topk(logits, top_k, use_sigmoid=False, renormalize=True)
    return get_routing_indices(ids, num_experts)[0]


def per_expert_loop(X, W, sizes: list[int]) -> torch.Tensor:
    """The plain PyTorch baseline: one matmul launch per expert that has rows."""
    outs, start = [], 0
    for e, m in enumerate(sizes):
        if m:
            outs.append(X[start : start + m] @ W[e].T)
            start += m
    return torch.cat(outs)
