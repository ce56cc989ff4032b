"""``FastLauncher``: one compile per specialization key, then the compiled kernel's launcher directly.

The direct path only exists for compiled kernels (a GPU), so these tests drive it with a
stand-in for Triton's JIT function that records what Triton would be asked to do. The GPU
suite checks the keys against Triton's own choice (``MOE_LEARN_CHECK_LAUNCH=1``).
"""

from types import SimpleNamespace

import pytest
import torch

from moe_learn.kernels import launcher


class FakeKernel:
    def __init__(self, spec):
        self.spec, self.function, self.packed_metadata, self.launches = spec, object(), object(), []

    def _init_handles(self):
        pass

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit, *args):
        assert function is self.function and metadata is self.packed_metadata
        self.launches.append(((gx, gy, gz), stream, args))


class FakeJit:
    """Compiles (``warmup``) one kernel per specialization, the way Triton keys them."""

    def __init__(self, names, constexprs, loose=()):
        self.arg_names = names
        self.params = [SimpleNamespace(name=n, do_not_specialize=n in loose, is_constexpr=n in constexprs)
                       for n in names]
        self.kernels, self.triton_launches = {}, []
        self.__name__ = "fake"

    def spec(self, args, kwargs):
        out = []
        for param, arg in zip(self.params, args, strict=False):
            if isinstance(arg, torch.Tensor):
                out.append((arg.dtype, arg.data_ptr() % 16 == 0))
            elif isinstance(arg, int) and not param.do_not_specialize:
                out.append((arg == 1, arg % 16 == 0))
            else:
                out.append(None)
        return tuple(out) + tuple(sorted(kwargs.items()))

    def warmup(self, *args, grid, **kwargs):
        spec = self.spec(args, kwargs)
        return self.kernels.setdefault(spec, FakeKernel(spec))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.triton_launches.append((grid, args, kwargs))


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(launcher, "INTERPRETER", False)
    monkeypatch.setattr(launcher, "_current_device", lambda: 0)
    monkeypatch.setattr(launcher, "_current_stream", lambda device: 1234)
    monkeypatch.setattr(launcher, "_hooks_set", lambda: False)
    monkeypatch.setattr(launcher.FastLauncher, "_direct_ok", True)


def _fn():
    return FakeJit(["x", "y", "M", "N", "BLOCK", "FLAG"], {"BLOCK", "FLAG"}, loose={"M"})


def test_compiles_once_per_key_and_launches_directly(direct):
    fn = _fn()
    fast = launcher.FastLauncher(fn)
    x, y = torch.zeros(64), torch.zeros(64)
    for M in (3, 17, 1):  # M is do_not_specialize: one kernel whatever its value
        fast((5,), (x, y, M, 64), {"FLAG": True, "BLOCK": 32}, {"num_warps": 4})
    assert len(fn.kernels) == 1 and not fn.triton_launches
    (kernel,) = fn.kernels.values()
    assert [launch[0] for launch in kernel.launches] == [(5, 1, 1)] * 3
    grid, stream, args = kernel.launches[-1]
    assert stream == 1234
    assert args[:4] == (x, y, 1, 64) and args[4:] == (32, True), "constexprs go last, in the kernel's order"

    fast((5,), (x, y, 3, 65), {"FLAG": True, "BLOCK": 32}, {"num_warps": 4})  # N changes: Triton keys on it
    fast((5,), (x.half(), y, 3, 64), {"FLAG": True, "BLOCK": 32}, {"num_warps": 4})  # a dtype changes
    fast((5,), (x[1:], y, 3, 64), {"FLAG": True, "BLOCK": 32}, {"num_warps": 4})  # no longer 16-byte aligned
    fast((5,), (x, y, 3, 64), {"FLAG": False, "BLOCK": 32}, {"num_warps": 4})  # a constexpr changes
    fast((5,), (x, y, 3, 64), {"FLAG": True, "BLOCK": 32}, {"num_warps": 8})  # an option changes
    assert len(fn.kernels) == 6, "each specialization Triton distinguishes gets its own compiled kernel"
    misaligned = next(k for k in fn.kernels.values() if k.spec[0] == (torch.float32, False))
    assert misaligned.launches[-1][2][0].data_ptr() % 16 == 4
    assert len(fast.cache) == 6


def test_int_width_is_part_of_the_key_even_when_not_specialized(direct):
    fn = _fn()
    fast = launcher.FastLauncher(fn)
    x = torch.zeros(16)
    fast((1,), (x, x, 5, 16), {"BLOCK": 16, "FLAG": False}, {})
    fast((1,), (x, x, 2**31, 16), {"BLOCK": 16, "FLAG": False}, {})
    assert len(fast.cache) == 2, "an M past int32 is another kernel signature (i64) in Triton"


def test_falls_back_to_tritons_launch(direct, monkeypatch):
    fn = _fn()
    fast = launcher.FastLauncher(fn)
    x = torch.zeros(16)
    monkeypatch.setattr(launcher, "_hooks_set", lambda: True)  # a profiler is listening
    fast((2,), (x, x, 5, 16), {"BLOCK": 16, "FLAG": False}, {"num_warps": 4})
    assert fn.triton_launches == [((2,), (x, x, 5, 16), {"BLOCK": 16, "FLAG": False, "num_warps": 4})]
    assert not fn.kernels

    monkeypatch.setattr(launcher, "_hooks_set", lambda: False)
    monkeypatch.setattr(FakeKernel, "run", lambda self, *a: (_ for _ in ()).throw(TypeError("other signature")))
    with pytest.warns(UserWarning, match="Triton's own launch path"):
        fast((3,), (x, x, 5, 16), {"BLOCK": 16, "FLAG": False}, {})
    assert len(fn.triton_launches) == 2 and not launcher.FastLauncher._direct_ok
    fast((4,), (x, x, 5, 16), {"BLOCK": 16, "FLAG": False}, {})  # from now on, Triton's path
    assert len(fn.triton_launches) == 3


def test_check_mode_catches_a_key_that_misses_a_specialization(direct):
    fn = _fn()
    fast = launcher.FastLauncher(fn)
    fast.check = True
    x = torch.zeros(16)
    fast((1,), (x, x, 5, 16), {"BLOCK": 16, "FLAG": False}, {})  # Triton agrees with the key
    fast.key = lambda *a: "one key for everything"  # a planted bug: the key ignores the dtypes
    fast.cache = {}
    fast((1,), (x, x, 5, 16), {"BLOCK": 16, "FLAG": False}, {})
    with pytest.raises(AssertionError, match="another compiled kernel"):
        fast((1,), (x.double(), x, 5, 16), {"BLOCK": 16, "FLAG": False}, {})


def test_constexprs_must_be_the_trailing_parameters(direct):
    fast = launcher.FastLauncher(_fn())
    x = torch.zeros(16)
    with pytest.raises(TypeError, match="exactly the constexprs"):
        fast((1,), (x, x, 5), {"N": 16, "BLOCK": 16, "FLAG": False}, {})
