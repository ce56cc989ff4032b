"""The benchmark command, ``moe-learn bench`` (also ``python -m moe_learn bench``).

    cases.py            the MoE models' expert GEMMs and routings the benchmark measures
    timing.py           medians of CUDA-event timings after a rest; the matmul and copy ceilings
    run.py              the sections, the tables, the JSON and the roofline plot
    expert_parallel.py  the 2-GPU expert-parallel measurement
"""
