"""Triton kernels of the course. Import ``moe_learn`` first (it picks GPU or interpreter)."""
