"""The benchmark command, ``moe-learn bench`` (also ``python -m moe_learn bench``).

    cases.py            the MoE models' experts and expert GEMMs the benchmark measures, and their routing
    timing.py           medians of CUDA-event timings after a rest (do_bench, eager loops, single calls,
                        CUDA graphs); the matmul and copy ceilings; the versions recorded
    experts.py          the experts section: ours, transformers' default, Liger-Kernel, a float32 reference
    run.py              the sections (experts, decode, prefill, routing), the plan and its time, the JSON
    report.py           a run as Markdown: headline ratios, issue #15's targets met or not, the tables
    expert_parallel.py  the 2-GPU expert-parallel measurement
"""
