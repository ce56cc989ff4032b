"""Launch a compiled Triton kernel with little host work per call.

``kernel[grid](*args)`` binds every argument to the kernel's signature, works out its
specialization (the dtype and 16-byte alignment of each pointer, which integers are 1 or
multiples of 16), builds a cache key from all of that and only then calls the compiled
kernel's launcher: 25-40 us of host time per call on the benchmark VMs (perf/NOTES.md),
more than a decode-sized grouped GEMM takes on the GPU. ``FastLauncher`` compiles once per
key through Triton itself (``warmup``) and later calls go straight to the launcher.

The key must decide everything Triton specializes on, so it is computed from the
arguments themselves: a tensor contributes its dtype and whether its address is a
multiple of 16, an integer its value (or, for a ``do_not_specialize`` integer such as the
row count M, only whether it needs 64 bits), a tensor descriptor its dtype and block
shape, and the constexprs and launch options their values. Triton's own launch path is
used instead whenever a launch hook is set (profilers see every launch), under the
interpreter, and for good once this Triton's launcher turns out to take other arguments.
``MOE_LEARN_DIRECT_LAUNCH=0`` (or ``launcher.DIRECT = False``) turns the direct path off, for
A/B runs; ``MOE_LEARN_CHECK_LAUNCH=1`` makes every direct launch ask Triton which kernel it would
have used and fail if it is not the cached one (the GPU test suite runs with it).

Tensor maps. A kernel that takes TMA descriptors pays, in Triton's launcher, for turning each
descriptor into a CUDA tensor map (``cuTensorMapEncodeTiled`` plus Python around it) on every
launch: with two descriptors the launcher took 12.7 us on the H100 VM, 9.0 with the maps cached
(perf/NOTES.md item 19). A tensor map encodes only an
address, a shape, strides and a box, so ``RawLaunch`` keeps the maps it made keyed on exactly
those (a weight's map is made once) and calls the C launcher underneath Triton's wrapper. It
takes that wrapper apart by the names Triton 3.6 uses (``_BASE_ARGS_FORMAT_LEN``, the closure's
``launcher``/``tensordesc_indices``/``tensordesc_meta``); any other Triton keeps the launcher as
it is (``RawLaunch.of`` returns None). ``MOE_LEARN_RAW_LAUNCH=0`` (``launcher.RAW = False``)
turns it off for A/B runs.

Addresses. Given a tensor for a pointer parameter, the C launcher calls its ``data_ptr()`` and then asks the
driver whether the address is device memory (``cuPointerGetAttribute``, once per pointer per launch); given an
integer it takes it as the address. A launch plan's key holds every tensor's device, so a plan's launches
(``addresses=True``) pass the addresses as integers. ``MOE_LEARN_POINTER_INTS=0`` (``launcher.POINTER_INTS =
False``) passes the tensors, for A/B runs. Every other launch passes tensors: the driver's check is what
turns a CPU tensor that reached a launch into an error instead of a kernel reading host addresses.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import triton

from moe_learn.device import INTERPRETER

try:  # Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: no TMA path, nothing to key on
    TensorDescriptor = None

DIRECT = os.environ.get("MOE_LEARN_DIRECT_LAUNCH", "1") not in ("", "0")
RAW = os.environ.get("MOE_LEARN_RAW_LAUNCH", "1") not in ("", "0")
POINTER_INTS = os.environ.get("MOE_LEARN_POINTER_INTS", "1") not in ("", "0")
_INT32 = range(-(2**31), 2**31)
_RUNTIME = getattr(getattr(triton, "knobs", None), "runtime", None)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for the host side of a launch: that one is a JIT-aware function whose call
    costs microseconds, paid on every eager call."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for the host side of a launch (the same reason)."""
    return -(-a // b)


def _hooks_set() -> bool:
    """Whether a launch hook is installed (a profiler): those run only on Triton's own path."""
    if _RUNTIME is None:
        return True  # an older Triton: take its own path, which knows its hooks
    enter, exit_ = _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook
    # a HookChain with calls (newer Triton) or a plain callable (older)
    return bool(getattr(enter, "calls", enter) or getattr(exit_, "calls", exit_))


_GET_DEVICE = getattr(torch._C, "_cuda_getDevice", None)  # absent from CPU builds


def _current_device() -> int:
    # torch.cuda.current_device() without its lazy-init check: a kernel is launched only on
    # tensors already on the GPU, so CUDA is initialized (~1 us a call on a slow host)
    return _GET_DEVICE() if _GET_DEVICE is not None else torch.cuda.current_device()


def _current_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def _arg_key(arg, loose: bool):
    kind = type(arg)  # exact types first: isinstance on every argument of every launch adds up
    if kind is int:
        return arg not in _INT32 if loose else arg
    if kind is torch.Tensor or isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if TensorDescriptor is not None and isinstance(arg, TensorDescriptor):
        return arg.base.dtype, tuple(arg.block_shape), len(arg.shape)
    return type(arg), arg  # None, bool, float


class RawLaunch:
    """Triton 3.6's launcher for one compiled kernel, with its tensor maps cached (see the module doc)."""

    MAX_MAPS = 256  # distinct (address, shape, box) maps kept per kernel; past that the cache starts over
    _ok = True  # False once a raw launch raised: every kernel goes back to the compiled launcher

    def __init__(self, kernel, launch, base_len, positions, metas, make_arg):
        run = kernel.run
        self.head = (kernel.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                     kernel.packed_metadata, None, None, None)  # scratch x2, launch metadata, hooks x2
        self.launch, self.positions, self.metas, self.make_arg = launch, positions, metas, make_arg
        self.maps: dict[tuple, list] = {}
        if base_len != 4 + len(self.head):
            raise TypeError(f"the launcher's base arguments number {base_len}, not {4 + len(self.head)}")

    @classmethod
    def of(cls, kernel) -> RawLaunch | None:
        """The raw launch for a compiled kernel, or None where it does not apply.

        With tensor descriptors, the C launcher under Triton's wrapper, with the maps cached; without, the
        C launcher itself (``run.launch``): that skips only ``run.__call__``'s Python (its scratch checks)."""
        run = getattr(kernel, "run", None)
        wrapper = getattr(run, "launch", None)
        code = getattr(wrapper, "__code__", None)
        # the driver module: the wrapper's, or (a C function's module is the launcher's own) the CudaLauncher's
        module = sys.modules.get(wrapper.__module__ if code is not None else type(run).__module__)
        base_len = getattr(module, "_BASE_ARGS_FORMAT_LEN", None)
        if (base_len is None or wrapper is None
                or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1)):
            return None  # another Triton, or scratch to allocate per launch: keep Triton's path
        try:
            if code is None:  # no descriptors: the compiled C launcher itself
                return cls(kernel, wrapper, base_len, [], [], None) if callable(wrapper) else None
            if set(code.co_freevars) != {"launcher", "tensordesc_indices", "tensordesc_meta"}:
                return None  # another Triton's wrapper
            cells = dict(zip(code.co_freevars, (cell.cell_contents for cell in wrapper.__closure__), strict=True))
            make_arg = getattr(module, "make_tensordesc_arg", None)
            metas = cells["tensordesc_meta"]
            positions = sorted(cells["tensordesc_indices"])
            if make_arg is None or not metas or len(metas) != len(positions) or any(meta is None for meta in metas):
                return None  # descriptors passed as pointers: keep Triton's path
            return cls(kernel, cells["launcher"], base_len, positions, list(metas), make_arg)
        except (TypeError, AttributeError):
            return None

    def tensor_map(self, desc, meta) -> list:
        """Triton's expansion of one descriptor ([map, *shape, *strides]), made once per address, shape and box."""
        key = (desc.base.data_ptr(), tuple(desc.shape), tuple(desc.strides), tuple(desc.block_shape),
               getattr(desc, "padding", None), id(meta))
        expanded = self.maps.get(key)
        if expanded is None:
            if len(self.maps) >= self.MAX_MAPS:
                self.maps.clear()
            expanded = self.maps[key] = list(self.make_arg(desc, meta))
        return expanded

    def __call__(self, grid: tuple, stream: int, args: tuple) -> None:
        maps = [self.tensor_map(args[position], meta) for position, meta in zip(self.positions, self.metas,
                                                                                 strict=True)]
        self.call_with_maps(grid, stream, args, maps)

    def call_with_maps(self, grid: tuple, stream: int, args: tuple, maps: list) -> None:
        """The launch with each descriptor's expansion given (``maps``, in the order of ``positions``);
        what ``args`` holds at those positions is not read."""
        final = [grid[0], grid[1], grid[2], stream, *self.head]
        start = 0
        for position, expanded in zip(self.positions, maps, strict=True):
            final.extend(args[start:position])
            final.extend(expanded)
            start = position + 1
        final.extend(args[start:])
        self.launch(*final)


def direct_possible() -> bool:
    """Whether a launch may skip Triton's own path (see the module doc): a GPU, no hooks, not switched off."""
    return not INTERPRETER and DIRECT and FastLauncher._direct_ok and not _hooks_set()


class Compiled:
    """One compiled kernel of a ``FastLauncher`` and what launching it takes besides the runtime arguments."""

    __slots__ = ("key", "kernel", "ordered", "raw", "constexprs", "options", "pointers")

    def __init__(self, key, kernel, ordered, raw, constexprs, options, pointers=()):
        self.key, self.kernel, self.ordered, self.raw = key, kernel, ordered, raw
        self.constexprs, self.options = constexprs, options  # for Triton's own path and the check mode
        # the positions of the runtime arguments that are tensors (the key fixes which are: a tensor, an
        # integer and None key differently)
        self.pointers = pointers

    def addresses(self, args) -> list:
        """``args`` with each tensor replaced by its address (see the module doc, "Addresses")."""
        args = list(args)
        for position in self.pointers:
            args[position] = args[position].data_ptr()
        return args


class FastLauncher:
    """``fn[grid](*args, **constexprs, **options)``, compiled once per key, launched directly after.

    ``args`` are the kernel's runtime parameters in order; the constexprs must be the
    parameters after them (the launcher takes every parameter, constexprs included).
    ``compiled`` and ``launch`` are the two halves of a call, for callers that keep the
    compiled kernel of a launch they repeat (``grouped_gemm_hopper.LaunchPlan``).
    """

    _direct_ok = True  # False once a Triton's launcher refused our call: its own path from then on

    def __init__(self, fn):
        self.fn = fn
        # which integers Triton keys on only by width (the interpreter's functions have no params)
        self.loose = tuple(p.do_not_specialize for p in getattr(fn, "params", ()))
        self.cache: dict[tuple, Compiled] = {}
        self.check = os.environ.get("MOE_LEARN_CHECK_LAUNCH", "0") not in ("", "0")

    def key(self, args, constexprs, options, device: int) -> tuple:
        return (device, *map(_arg_key, args, self.loose), *constexprs.values(), *options.values())

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, options: dict) -> None:
        if not direct_possible():
            self.fn[grid](*args, **constexprs, **options)
            return
        device = _current_device()  # where Triton would launch: the current device and stream
        self.launch(self.compiled(args, constexprs, options, device), grid, args, device)

    def compiled(self, args: tuple, constexprs: dict, options: dict, device: int) -> Compiled:
        """The compiled kernel these arguments launch (compiled on the first call of its key)."""
        key = self.key(args, constexprs, options, device)
        entry = self.cache.get(key)
        if entry is None:
            entry = self.cache[key] = self._compile(key, args, constexprs, options)
        return entry

    def launch(self, entry: Compiled, grid: tuple, args: tuple, device: int, stream: int | None = None,
               addresses: bool = False) -> None:
        """Launch ``entry`` (from ``compiled`` with arguments of the same key) on ``device``'s current stream
        (``stream``: that stream, where the caller has it already). addresses: the caller (a launch plan) keyed
        every tensor's device, so their addresses go to the launcher as integers (module doc)."""
        if self.check:
            chosen = self.fn.warmup(*args, **entry.constexprs, **entry.options, grid=grid)
            if chosen is not entry.kernel:
                raise AssertionError(f"{self._name()}: the launch key {entry.key} maps to another compiled kernel "
                                     "than Triton would pick; the key misses something Triton specializes on")
        if stream is None:
            stream = _current_stream(device)
        grid = (*grid, 1, 1)
        raw = entry.raw
        if raw is not None and RAW and RawLaunch._ok:
            if addresses and POINTER_INTS:
                args = entry.addresses(args)
            try:
                raw(grid, stream, (*args, *entry.ordered))
                return
            except (TypeError, AttributeError, ValueError, SystemError) as exc:  # the C launcher refused our arguments
                self._raw_failed(exc)
        kernel = entry.kernel
        try:
            kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None, None, None,
                       *args, *entry.ordered)
        except (TypeError, AttributeError) as exc:  # another Triton's launcher interface: its own path from now on
            FastLauncher._direct_ok = False
            warnings.warn(f"moe_learn: launching {self._name()} directly failed ({exc}); every kernel now takes "
                          "Triton's own launch path, which costs more host time per call", stacklevel=3)
            self.fn[grid[:3]](*args, **entry.constexprs, **entry.options)

    def launch_with_maps(self, entry: Compiled, grid: tuple, args: tuple, maps, device: int,
                         addresses: bool = False) -> bool:
        """``launch`` through ``entry.raw`` with the descriptors' tensor maps given (``maps()``, called only
        when they are used), for a caller that keeps them; False, launching nothing, where that path is
        off: no raw launch for this kernel or Triton, or the check mode (which needs the descriptors).
        addresses: as in ``launch``."""
        raw = entry.raw
        if raw is None or not RAW or not RawLaunch._ok or self.check:
            return False
        if addresses and POINTER_INTS:
            args = entry.addresses(args)
        try:
            raw.call_with_maps((*grid, 1, 1), _current_stream(device), (*args, *entry.ordered), maps())
            return True
        except (TypeError, AttributeError, ValueError, SystemError) as exc:
            self._raw_failed(exc)
            return False

    def _raw_failed(self, exc) -> None:
        RawLaunch._ok = False
        warnings.warn(f"moe_learn: launching {self._name()} with cached tensor maps failed ({exc}); "
                      "every kernel now goes through Triton's launcher", stacklevel=4)

    def _name(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))

    def _compile(self, key, args, constexprs, options) -> Compiled:
        names = self.fn.arg_names[len(args):]
        trailing_constexprs = all(p.is_constexpr for p in self.fn.params[len(args):])
        if sorted(names) != sorted(constexprs) or not trailing_constexprs:
            raise TypeError(f"{self._name()}: the parameters after the runtime arguments must be exactly the "
                            f"constexprs; got {sorted(constexprs)}, the kernel has {names}")
        kernel = self.fn.warmup(*args, **constexprs, **options, grid=(1,))
        kernel._init_handles()
        return Compiled(key, kernel, [constexprs[name] for name in names], RawLaunch.of(kernel), dict(constexprs),
                        dict(options), tuple(i for i, arg in enumerate(args) if isinstance(arg, torch.Tensor)))
