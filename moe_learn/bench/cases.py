"""The benchmark's cases: real MoE models' experts and expert GEMMs, routed like a router routes.

Three sets, one per section of ``moe-learn bench``:

* ``experts_cases()``: the whole experts half of a layer (GEMM1, SwiGLU, GEMM2, combine),
  forward and forward+backward, at training/prefill sizes;
* ``decode_cases()``: the two expert GEMMs at decode sizes (1 to 256 tokens);
* ``cases()``: the two expert GEMMs at prefill sizes (the 16 cases of the stored runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# name: (hidden H, expert intermediate I, experts E, top-k)
MODELS = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "llama4-scout": (5120, 8192, 16, 1),
    "gpt-oss-20b": (2880, 2880, 32, 4),
    "gpt-oss-120b": (2880, 2880, 128, 4),
    "deepseek-v3": (7168, 2048, 256, 8),
}
GEMMS = ("gate_up", "down")

PREFILL_MODELS = ("qwen3-30b-a3b", "mixtral-8x7b", "llama4-scout", "gpt-oss-20b")
TOKENS = (1024, 8192)  # prefill token counts
DECODE_MODELS = ("qwen3-30b-a3b", "deepseek-v3", "mixtral-8x7b", "gpt-oss-120b")
DECODE_TOKENS = (1, 8, 64, 256)
EXPERTS_RUNS = (
    ("qwen3-30b-a3b", 1024), ("qwen3-30b-a3b", 8192), ("qwen3-30b-a3b", 32768),
    ("mixtral-8x7b", 1024), ("mixtral-8x7b", 8192),
    ("gpt-oss-20b", 8192),
    ("deepseek-v3", 4096),
)
# What differs from the model itself; the report prints it under the experts tables.
EXPERTS_NOTES = {
    "gpt-oss-20b": "gpt-oss-20b's shape on a plain SwiGLU without biases: its own experts add biases and a clamped, "
    "interleaved SwiGLU, which neither Liger-Kernel nor ours takes, so all implementations run this same problem",
}


@dataclass
class Case:
    """One grouped GEMM: ``M = tokens * top-k`` routed rows times ``E`` weights ``[N, K]``."""

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

    def bytes(self, elem: int = 2, experts: int | None = None) -> float:
        """X + the weights of ``experts`` experts (default: all E) + Y, each moved once."""
        experts = self.E if experts is None else experts
        return float(elem) * (self.M * self.K + experts * self.N * self.K + self.M * self.N)

    @property
    def name(self) -> str:
        return f"{self.model} {self.gemm} T={self.tokens}"

    @classmethod
    def of(cls, row: dict) -> Case:
        """The case a results.json row was measured on."""
        return cls(*(row[f] for f in ("model", "gemm", "tokens", "M", "N", "K", "E")))


def _gemm_cases(models, tokens) -> list[Case]:
    out = []
    for model in models:
        H, I, E, k = MODELS[model]
        for T in tokens:
            for gemm in GEMMS:
                N, K = (2 * I, H) if gemm == "gate_up" else (H, I)
                out.append(Case(model, gemm, T, T * k, N, K, E))
    return out


def cases(models=None, tokens=TOKENS) -> list[Case]:
    """The prefill GEMMs: both GEMMs of each model at each token count (default: the 16 stored cases)."""
    return _gemm_cases(models or PREFILL_MODELS, tokens)


def decode_cases(models=None, tokens=DECODE_TOKENS) -> list[Case]:
    """The decode GEMMs, grouped by (model, GEMM) so one weight tensor serves its four token counts."""
    models = list(models or DECODE_MODELS)
    return sorted(_gemm_cases(models, tokens), key=lambda c: (models.index(c.model), GEMMS.index(c.gemm), c.tokens))


@dataclass
class ExpertsCase:
    """The experts half of one MoE layer: hidden ``[T, H]``, top-k routing, ``[E, 2I, H]`` and ``[E, H, I]``."""

    model: str
    tokens: int
    H: int
    I: int  # noqa: E741 (the models' own name for it)
    E: int
    k: int

    @property
    def flops_forward(self) -> float:
        """Two GEMMs over T*k routed rows: 2*(T*k)*(2I)*H + 2*(T*k)*H*I = 6*T*k*H*I."""
        return 6.0 * self.tokens * self.k * self.H * self.I

    @property
    def flops_training(self) -> float:
        """Forward + backward: the backward's dX and dW GEMMs are twice the forward's."""
        return 3.0 * self.flops_forward

    def weight_bytes(self, elem: int = 2) -> float:
        return float(elem) * 3 * self.E * self.H * self.I

    @property
    def name(self) -> str:
        return f"{self.model} T={self.tokens}"

    @property
    def note(self) -> str | None:
        return EXPERTS_NOTES.get(self.model)


def experts_cases(models=None, tokens=None) -> list[ExpertsCase]:
    """The seven experts cases of issue #15, optionally only those of ``models`` / ``tokens``."""
    out = []
    for model, T in EXPERTS_RUNS:
        if (models is None or model in models) and (tokens is None or T in tokens):
            out.append(ExpertsCase(model, T, *MODELS[model]))
    return out


def route(tokens: int, num_experts: int, top_k: int, seed: int, device="cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 ``[T, k]``, ids int64 ``[T, k]``): softmax over random router logits, top-k, renormalized."""
    from moe_learn.ops.routing import calculate_topk

    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(tokens, num_experts, device=device, generator=g)
    return calculate_topk(logits, top_k, use_sigmoid=False, renormalize=True)


def routing_counts(tokens: int, num_experts: int, top_k: int, seed: int, device="cuda") -> torch.Tensor:
    """m_sizes from top-k routing of random router logits (balanced only on average)."""
    from moe_learn.ops.routing import get_routing_indices

    _, ids = route(tokens, num_experts, top_k, seed, device)
    return get_routing_indices(ids, num_experts)[0]


def per_expert_loop(X, W, sizes: list[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The plain PyTorch baseline: one matmul launch per expert that has rows.

    dtype: compute in this dtype, casting one expert's rows and weights at a time (a float32
    reference of DeepSeek-V3's 15 GB gate_up weights never exists whole).
    """
    outs, start = [], 0
    for e, m in enumerate(sizes):
        if m:
            x, w = X[start : start + m], W[e]
            if dtype is not None:
                x, w = x.to(dtype), w.to(dtype)
            outs.append(x @ w.T)
            start += m
    return torch.cat(outs) if outs else X.new_zeros(0, W.shape[1], dtype=dtype or X.dtype)
