import atexit
import os
import random
import shutil
import tempfile
import zlib

import pytest
import torch

# torch.compile's on-disk caches outlive a run; a graph cached before an op's schema changed
# (a new argument) fails to load. Each test session compiles into its own cache.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="moe_learn_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

# Tests tune with fake timers and fake configs: they must never read or write a real tuning cache.
os.environ.pop("MOE_LEARN_TUNING_CACHE", None)
os.environ.pop("MOE_LEARN_TUNING_LOG", None)

import moe_learn  # noqa: E402, F401  (sets TRITON_INTERPRET on machines without CUDA)


@pytest.fixture(autouse=True)
def _seed():
    """Fresh random inputs per test, but reproducible from the test's name."""
    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode())
    torch.manual_seed(seed)
    random.seed(seed)
    yield
