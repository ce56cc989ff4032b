"""``FastLauncher``: one compile per specialization key, then the compiled kernel's launcher directly.

The direct path only exists for compiled kernels (a GPU), so these tests drive it with a
stand-in for Triton's JIT function that records what Triton would be asked to do. The GPU
suite checks the keys against Triton's own choice (``MOE_LEARN_CHECK_LAUNCH=1``).
"""

import functools
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


# --- RawLaunch: Triton 3.6's launcher without its per-launch wrapper, tensor maps cached ---------------------------

_TRITON_36_DRIVER = '''
_BASE_ARGS_FORMAT_LEN = 13
made = []


def make_tensordesc_arg(arg, metadata):
    made.append((arg.base.data_ptr(), tuple(arg.block_shape)))
    return [("map", arg.base.data_ptr(), tuple(arg.block_shape), metadata["swizzle"]), *arg.shape, *arg.strides]


def wrap_handle_tensordesc(launcher, tensordesc_indices, tensordesc_meta):
    def inner(*args):
        final_args = list(args[:_BASE_ARGS_FORMAT_LEN])
        tensordesc_idx = 0
        for i, arg in enumerate(args[_BASE_ARGS_FORMAT_LEN:]):
            if i in tensordesc_indices:
                final_args.extend(make_tensordesc_arg(arg, tensordesc_meta[tensordesc_idx]))
                tensordesc_idx += 1
            else:
                final_args.append(arg)
        return launcher(*final_args)

    return inner
'''


@pytest.fixture
def triton_36(monkeypatch):
    """A stand-in for Triton 3.6's driver module: its launcher wrapper, built the way Triton builds it."""
    import sys
    import types

    module = types.ModuleType("fake_triton_36_driver")
    exec(compile(_TRITON_36_DRIVER, "fake_triton_36_driver", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(launcher.RawLaunch, "_ok", True)
    monkeypatch.setattr(launcher, "RAW", True)
    return module


class FakeRun:
    """``kernel.run``: Triton's ``CudaLauncher`` (its ``launch`` is the wrapper around the C launcher)."""

    launch_cooperative_grid, launch_pdl, global_scratch_size, profile_scratch_size = False, False, 0, 0

    def __init__(self, module, positions, metas):
        self.c_launches, self.wrapped_launches = [], []
        self.launch = module.wrap_handle_tensordesc(self.c_launch, set(positions), metas)

    def c_launch(self, *args):
        self.c_launches.append(args)

    def __call__(self, gx, gy, gz, stream, function, *args):  # CudaLauncher.__call__: through the wrapper
        self.wrapped_launches.append(args)
        self.launch(gx, gy, gz, stream, function, self.launch_cooperative_grid, self.launch_pdl, None, None, *args)


def _descriptor_kernel(module, fn):
    """A FakeJit whose compiled kernels take a tensor descriptor at parameter 1 (as the Hopper GEMM's do)."""
    def warmup(*args, grid, **kwargs):
        kernel = FakeJit.warmup(fn, *args, grid=grid, **kwargs)
        if not isinstance(kernel.run, FakeRun):
            kernel.run = FakeRun(module, [1], [{"swizzle": 128}])
        return kernel
    fn.warmup = warmup
    return fn


def test_raw_launch_passes_what_tritons_wrapper_would_and_makes_each_map_once(direct, triton_36):
    from triton.tools.tensor_descriptor import TensorDescriptor

    fn = _descriptor_kernel(triton_36, FakeJit(["x", "w_desc", "N", "BLOCK"], {"BLOCK"}))
    fast = launcher.FastLauncher(fn)
    x, w = torch.zeros(64), torch.zeros(8, 32)
    desc = TensorDescriptor(w, [8, 32], [32, 1], [8, 16])
    for _ in range(3):
        fast((7,), (x, desc, 32), {"BLOCK": 16}, {})
    (kernel,) = fn.kernels.values()
    assert triton_36.made == [(w.data_ptr(), (8, 16))], "one tensor map for one address, shape and box"
    # what Triton 3.6's own wrapper hands the C launcher for the same launch
    kernel.run(7, 1, 1, 1234, kernel.function, kernel.packed_metadata, None, None, None, x, desc, 32, 16)
    want = kernel.run.c_launches[-1]
    assert kernel.run.c_launches[:3] == [want] * 3
    assert want[:13] == (7, 1, 1, 1234, kernel.function, False, False, None, None, kernel.packed_metadata, None, None,
                         None)
    assert want[13] is x and want[-2:] == (32, 16)

    fast((7,), (x, TensorDescriptor(w, [8, 32], [32, 1], [4, 16]), 32), {"BLOCK": 16}, {})  # another box
    other = torch.zeros(8, 32)
    fast((7,), (x, TensorDescriptor(other, [8, 32], [32, 1], [8, 16]), 32), {"BLOCK": 16}, {})  # another address
    assert triton_36.made[-2:] == [(w.data_ptr(), (4, 16)), (other.data_ptr(), (8, 16))]
    assert kernel.run.c_launches[-1][14][1] == other.data_ptr(), "the map of the tensor passed, not a cached one"


def test_raw_launch_is_skipped_where_it_does_not_apply_and_falls_back_when_refused(direct, triton_36, monkeypatch):
    from triton.tools.tensor_descriptor import TensorDescriptor

    plain = FakeKernel(None)
    plain.run = FakeRun(triton_36, [], [])
    # no descriptors: Triton calls the C launcher itself (a C function: no __code__, as a partial has none)
    plain.run.launch = functools.partial(FakeRun.c_launch, plain.run)
    assert launcher.RawLaunch.of(plain) is None  # (FakeRun's module is not a driver: not Triton 3.6's)
    monkeypatch.setattr(FakeRun, "__module__", triton_36.__name__)
    raw = launcher.RawLaunch.of(plain)  # the C launcher itself, called as CudaLauncher.__call__ calls it
    x = torch.zeros(4)
    raw((3, 1, 1), 99, (x, 5))
    plain.run(3, 1, 1, 99, plain.function, plain.packed_metadata, None, None, None, x, 5)
    assert plain.run.c_launches[0] == plain.run.c_launches[1] and plain.run.c_launches[0][-2] is x
    scratch = FakeKernel(None)
    scratch.run = FakeRun(triton_36, [1], [{"swizzle": 128}])
    scratch.run.global_scratch_size = 64  # per-launch scratch to allocate: Triton's path
    assert launcher.RawLaunch.of(scratch) is None
    no_meta = FakeKernel(None)
    no_meta.run = FakeRun(triton_36, [1], [None])  # descriptors passed as pointers, shapes and strides
    assert launcher.RawLaunch.of(no_meta) is None

    fn = _descriptor_kernel(triton_36, FakeJit(["x", "w_desc", "N", "BLOCK"], {"BLOCK"}))
    fast = launcher.FastLauncher(fn)
    x, w = torch.zeros(64), torch.zeros(8, 32)
    desc = TensorDescriptor(w, [8, 32], [32, 1], [8, 16])
    fast((2,), (x, desc, 32), {"BLOCK": 16}, {})
    (kernel,) = fn.kernels.values()

    def refuse(*args):
        raise TypeError("another launcher signature")

    monkeypatch.setattr(launcher.RawLaunch, "__call__", lambda self, *a: refuse())
    with pytest.warns(UserWarning, match="through Triton's launcher"):
        fast((2,), (x, desc, 32), {"BLOCK": 16}, {})
    assert not launcher.RawLaunch._ok and len(kernel.run.wrapped_launches) == 1, "the launch went through Triton's"
    fast((2,), (x, desc, 32), {"BLOCK": 16}, {})
    assert len(kernel.run.wrapped_launches) == 2
