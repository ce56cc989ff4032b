"""The MoE layer built on the kernels.

    experts.py          the expert half (route, GEMM1, SwiGLU, GEMM2, combine), differentiable
    blocks.py           MoEBlock (router + experts; TorchMoEBlock, FusedMoEBlock), the aux loss
    hf.py               transformers integration
    expert_parallel.py  experts spread over ranks (all_to_all dispatch and combine)
    launch.py           start worker processes with a process group
"""
