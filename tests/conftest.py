import os
import random
import zlib

import pytest
import torch

import moe_learn  # noqa: F401  (sets TRITON_INTERPRET on machines without CUDA)


@pytest.fixture(autouse=True)
def _seed():
    """Fresh random inputs per test, but reproducible from the test's name."""
    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode())
    torch.manual_seed(seed)
    random.seed(seed)
    yield
