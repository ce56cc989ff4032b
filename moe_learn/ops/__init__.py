"""The PyTorch references: routing, routers, permutation, grouped GEMMs and the MoE MLP.

    routing.py       calculate_topk, get_routing_indices (chapters 01-02)
    routers.py       Qwen3-MoE, Mixtral, Llama 4, gpt-oss and DeepSeek-V3 routers (chapter 01)
    permutation.py   permute, unpermute, combine (chapter 03)
    grouped_gemm.py  torch_grouped_gemm and its weight gradient (chapters 04, 09)
    moe.py           swiglu, moe_experts_torch, moe_forward_torch (chapter 04)

Pure PyTorch: no Triton needed.
"""
