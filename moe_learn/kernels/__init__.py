"""Triton kernels of the course, one module per chapter (the importable answers)."""
