"""Launch plans: a repeated eager call launches exactly what the full path would, and skips no check.

A plan (``grouped_gemm_hopper.LaunchPlan``) exists only where kernels launch directly, i.e. on a
GPU. Here the direct path is forced on and the "compiled kernel" runs the real kernel under
Triton's interpreter, so a plan's launches are checked twice: their numbers against float64,
and their arguments against the full path's launch of the same inputs (``PLANS = False``).
"""

import importlib

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moe_learn import get_routing_indices, permute, torch_grouped_gemm, unpermute
from moe_learn.course.checks._core import relative_error
from moe_learn.device import ON_GPU
from moe_learn.kernels import autotune, launcher

# the modules (the package exports the functions of the same names)
gg = importlib.import_module("moe_learn.kernels.grouped_gemm")
hopper = importlib.import_module("moe_learn.kernels.grouped_gemm_hopper")

pytestmark = pytest.mark.skipif(ON_GPU, reason="CPU stand-in for the compiled launch; the GPU suite runs the real one")

TINY = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}


class Interpreted:
    """A stand-in for a compiled kernel: its launcher runs the function under the interpreter and logs the launch."""

    function = packed_metadata = None

    def __init__(self, fn, constexprs, options, log):
        self.fn, self.constexprs, self.options, self.log = fn, constexprs, options, log

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit_, *args):
        runtime = args[: len(args) - len(self.constexprs)]
        self.log.append((self, (gx, gy, gz), runtime))
        self.fn[(gx, gy, gz)](*runtime, **self.constexprs, **self.options)


class InterpretedRaw(launcher.RawLaunch):
    """``RawLaunch`` over an ``Interpreted`` kernel: a descriptor's "tensor map" is the descriptor itself, so the
    C launcher's argument list is the kernel's arguments again, which run under the interpreter.

    A launch plan passes its tensors' addresses (``launcher.POINTER_INTS``), as the C launcher takes them; the
    interpreter needs the tensors, so each address goes back to the tensor it was taken from (``addressed``,
    filled by ``Compiled.addresses``), and ``ints`` logs which launches came with addresses."""

    def __init__(self, kernel, positions, pointers, addressed):
        self.kernel, self.positions, self.metas = kernel, positions, [{}] * len(positions)
        self.head, self.maps, self.made = (), {}, []
        self.pointers, self.addressed, self.ints = pointers, addressed, []

    def make_arg(self, desc, meta):
        self.made.append(desc.base.data_ptr())
        return [desc]

    def launch(self, gx, gy, gz, stream, *args):
        args = list(args)  # (a descriptor expands to itself: positions are the kernel's)
        given = [type(args[position]) is int for position in self.pointers]
        assert all(given) or not any(given), "a launch passes every tensor as an address, or none"
        self.ints.append(all(given) and bool(given))
        for position in self.pointers:
            if type(args[position]) is int:
                args[position] = self.addressed[args[position]]
        try:
            self.kernel.run(gx, gy, gz, stream, None, None, None, None, None, *args)
        except (TypeError, AttributeError, ValueError, SystemError) as exc:
            # (the launcher would take these for a refusal of its arguments and go on through kernel.run: fail)
            raise RuntimeError(f"the raw launch's kernel failed: {exc!r}") from exc


def _interpreted_direct_launches(monkeypatch, log, raw: bool) -> None:
    """Direct launches on the CPU: every ``FastLauncher`` compiles to an ``Interpreted`` stand-in that logs
    its launches (behind ``InterpretedRaw`` with its "tensor maps" when ``raw``)."""
    monkeypatch.setattr(launcher, "RAW", True)
    monkeypatch.setattr(launcher.RawLaunch, "_ok", True)
    monkeypatch.setattr(launcher, "INTERPRETER", False)
    monkeypatch.setattr(launcher, "_current_device", lambda: 0)
    monkeypatch.setattr(launcher, "_current_stream", lambda device: 0)
    monkeypatch.setattr(launcher, "_hooks_set", lambda: False)
    monkeypatch.setattr(launcher.FastLauncher, "_direct_ok", True)

    addressed = {}  # address -> the tensor a plan took it from
    addresses = launcher.Compiled.addresses

    def addresses_kept(self, args):
        ints = addresses(self, args)
        addressed.update((ints[position], args[position]) for position in self.pointers)
        return ints

    def compile_interpreted(self, key, args, constexprs, options):
        ordered = [constexprs[name] for name in self.fn.arg_names[len(args):]]
        kernel = Interpreted(self.fn, constexprs, options, log)
        descriptors = [i for i, arg in enumerate(args) if type(arg).__name__ == "TensorDescriptor"]
        pointers = tuple(i for i, arg in enumerate(args) if isinstance(arg, torch.Tensor))  # as _compile's
        return launcher.Compiled(key, kernel, ordered,
                                 InterpretedRaw(kernel, descriptors, pointers, addressed) if raw else None,
                                 constexprs, options, pointers)

    key = launcher.FastLauncher.key

    def key_every_argument(self, args, constexprs, options, device):
        # the interpreter's functions list no parameters: key every argument as Triton would
        self.loose = (False,) * len(args)
        return key(self, args, constexprs, options, device)

    monkeypatch.setattr(launcher.FastLauncher, "_compile", compile_interpreted)
    monkeypatch.setattr(launcher.FastLauncher, "key", key_every_argument)
    monkeypatch.setattr(launcher.Compiled, "addresses", addresses_kept)
    monkeypatch.setattr(launcher, "POINTER_INTS", True)


@pytest.fixture(params=["kernel.run", "raw launch"])
def direct(monkeypatch, request):
    """Direct launches on the CPU, tuned buckets (the tiny config), no plans left from other tests; the
    compiled kernel launched through its launcher, or through ``RawLaunch`` with its tensor maps."""
    log = []
    _interpreted_direct_launches(monkeypatch, log, raw=request.param == "raw launch")
    monkeypatch.setattr(hopper, "_LAUNCH", launcher.FastLauncher(hopper._grouped_gemm_tma_kernel))
    monkeypatch.setattr(hopper, "autotune_enabled", lambda X: True)
    monkeypatch.setattr(hopper, "choose_config",
                        lambda key, configs, run: autotune.TUNED.setdefault(key, {**configs[0], **TINY}))
    monkeypatch.setattr(autotune, "TUNED", {})
    monkeypatch.setattr(gg, "auto_candidate", lambda X: True)  # "auto" tries the Hopper kernel, as on a GPU
    monkeypatch.setattr(gg, "_PLANS", {})
    monkeypatch.setattr(gg, "PLANS", True)
    return log


def _normal(arg):
    """A launch argument as what decides the launch: descriptors by geometry, tensors by what a pointer parameter
    carries (the kernel gets only the address: the dtype, the size and whether it is laid out at unit stride;
    its strides, where they matter, are scalar arguments of their own)."""
    if isinstance(arg, torch.Tensor):
        return "tensor", arg.dtype, arg.numel(), arg.is_contiguous(), arg.data_ptr() % 16
    if type(arg).__name__ == "TensorDescriptor":
        return "desc", _normal(arg.base), tuple(arg.shape), tuple(arg.strides), tuple(arg.block_shape)
    return arg


def _routing(T, E, topk, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=g).topk(topk, dim=1).indices
    return get_routing_indices(ids, E)


CALLS = ["plain", "validated", "gather", "scatter_weights", "bias", "out", "trusted_gather", "trusted_scatter",
         "swiglu"]


def _call(kind, X, W, counts, gather, weights, bias, topk, transpose, out):
    if kind == "plain":
        return gg.grouped_gemm(X, W, counts, transpose=transpose, kernel="auto", validate=False)
    if kind == "gather":  # (validate=None, the default, validates on the CPU: no plan is kept for such calls)
        return gg.grouped_gemm(X, W, counts, gather_indices=gather, topk=topk, permute_x=True, transpose=transpose,
                               kernel="auto", validate=False)
    if kind == "validated":
        return gg.grouped_gemm(X, W, counts, transpose=transpose, kernel="auto")
    if kind == "scatter_weights":
        return gg.grouped_gemm(X, W, counts, gather_indices=gather, topk=topk, permute_y=True, topk_weights=weights,
                               transpose=transpose, kernel="auto", validate=False)
    if kind == "bias":
        return gg.grouped_gemm(X, W, counts, bias=bias, transpose=transpose, kernel="auto", validate=False)
    if kind == "out":
        return gg.grouped_gemm(X, W, counts, out=out, transpose=transpose, kernel="auto", validate=False)
    if kind == "trusted_gather":
        return gg.grouped_gemm_trusted(X, W, counts, gather, topk=topk, permute_x=True, transpose=transpose,
                                       kernel="auto")
    if kind == "trusted_scatter":
        return gg.grouped_gemm_trusted(X, W, counts, gather, weights, topk=topk, permute_y=True, transpose=transpose,
                                       kernel="auto")
    return gg.grouped_gemm_swiglu(X, W, counts, gather, topk=topk, permute_x=True, transpose=transpose,
                                  kernel="auto")


def _reference(kind, X, W_ref, counts, gather, weights, bias, topk):
    """float64: the expert-ordered product, then what the call adds (gather, scatter, weights, bias, SwiGLU)."""
    X, W_ref = X.double(), W_ref.double()
    if kind in ("gather", "trusted_gather", "swiglu"):
        X = permute(X, gather, topk)
    Y = torch_grouped_gemm(X, W_ref, counts)
    if kind == "bias":
        Y = Y + bias.double()[torch.repeat_interleave(torch.arange(len(counts)), counts)]
    if kind in ("scatter_weights", "trusted_scatter"):
        Y = unpermute(Y, gather) * weights.double().reshape(-1, 1)
    if kind == "swiglu":
        gate, up = Y.chunk(2, dim=1)
        Y = torch.nn.functional.silu(gate) * up
    return Y


# each property of a tensor's layout that a launch depends on, and the values the tests take
LAYOUT_CHOICES = {
    "dtype": [torch.float32, torch.float16],
    "x_offset": [0, 1],  # X starts 2 or 4 bytes in: not 16-byte aligned, TMA cannot read it
    "x_pad": [0, 8],  # X a column slice of a wider buffer: another row stride
    "sizes_dtype": [torch.int32, torch.int64],
    "sizes_strided": [False, True],  # m_sizes a strided view
    "weights_strided": [False, True],
    "out_pad": [0, 8],  # out= a column slice: another row stride
}
PLAIN = {name: values[0] for name, values in LAYOUT_CHOICES.items()}


def _sizes_in(counts, layout):
    """m_sizes in the layout's dtype and stride."""
    counts = counts.to(layout["sizes_dtype"])
    if layout["sizes_strided"]:
        counts = torch.stack([counts, torch.full_like(counts, -7)], dim=1)[:, 0]
    return counts


def _inputs(kind, T, E, topk, N, K, transpose, seed, layout):
    g = torch.Generator().manual_seed(seed)
    dtype = layout["dtype"]
    counts, gather = _routing(T, E, topk, seed)
    counts = _sizes_in(counts, layout)
    M = T * topk
    rows = T if kind in ("gather", "trusted_gather", "swiglu") else M
    n_w = 2 * N if kind == "swiglu" else N
    width, offset = K + layout["x_pad"], layout["x_offset"]
    X = torch.randn(rows * width + offset, generator=g)[offset:].view(rows, width)[:, :K].to(dtype)
    if offset:  # .to(dtype) copied it: make the misaligned view again in the target dtype
        X = torch.empty(rows * width + offset, dtype=dtype)[offset:].view(rows, width)[:, :K].copy_(X)
    W_ref = (torch.randn(E, n_w, K, generator=g) / K**0.5).to(dtype)
    W = W_ref if transpose else W_ref.transpose(1, 2).contiguous()
    weights = torch.rand(T, topk, generator=g).to(dtype)
    if layout["weights_strided"]:  # every other column: strided whatever the shape (a [1, 1] .t() would not be)
        weights = torch.rand(T, 2 * topk, generator=g).to(dtype)[:, ::2]
    bias = torch.randn(E, N, generator=g).to(dtype)
    out = torch.full((M, N + layout["out_pad"]), float("nan"), dtype=dtype)[:, :N]
    return X, W, W_ref, counts, gather, weights, bias, out


def _check_against_the_full_path(kind, X, W, W_ref, counts, gather, weights, bias, topk, transpose, out, log,
                                 plan=None):
    """One call: its numbers against float64, its launch against the full path's launch of the same inputs."""
    del log[:]
    result = _call(kind, X, W, counts, gather, weights, bias, topk, transpose, out)
    bound = 1e-5 if X.dtype == torch.float32 else 3e-3
    assert relative_error(result, _reference(kind, X, W_ref, counts, gather, weights, bias, topk)) <= bound
    if kind == "out":
        assert result is out
    launches = list(log)
    if plan is not None:
        assert len(launches) == 1 and launches[0][0] is plan.entry.kernel, "a repeat of a planned call uses its plan"
        assert launches[0][2][0] is X and launches[0][2][2] is W, "the caller's tensors themselves"
        if plan.entry.raw is not None:
            assert plan.entry.raw.ints[-1], "a plan's raw launch passes its tensors' addresses"
    del log[:]
    gg.PLANS = False
    # (out= again in the same layout: clone() would make a strided slice contiguous)
    same_layout = torch.empty(out.shape[0], out.stride(0), dtype=out.dtype)[:, : out.shape[1]]
    again = _call(kind, X, W, counts, gather, weights, bias, topk, transpose, same_layout)
    gg.PLANS = True
    if plan is not None and plan.entry.raw is not None:
        assert not plan.entry.raw.ints[-1], "the full path passes tensors (the driver checks them)"
    assert len(log) == len(launches)
    for (kernel, grid, args), (kernel_p, grid_p, args_p) in zip(log, launches, strict=True):
        assert kernel is kernel_p and grid == grid_p, "the same compiled kernel and grid as the full path"
        assert [_normal(a) for a in args] == [_normal(a) for a in args_p], "the same arguments as the full path"
    assert torch.equal(again, result)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(CALLS), T=st.integers(1, 9), E=st.integers(1, 5), topk_frac=st.floats(0, 1),
       N=st.sampled_from([4, 8, 24, 40]) | st.integers(1, 40), K=st.sampled_from([8, 16, 24, 40]),
       transpose=st.booleans(), seed=st.integers(0, 99),
       first=st.fixed_dictionaries({name: st.sampled_from(values) for name, values in LAYOUT_CHOICES.items()
                                    if name != "x_offset"}))
def test_a_repeat_launches_what_the_full_path_would(direct, kind, T, E, topk_frac, N, K, transpose, seed, first):
    """A call keeps a plan; then calls of the same shapes, each in the same layout or one that differs
    in one property (a stride, the alignment, a dtype), compute the right numbers and launch what the
    full path launches for them: the plan's launch where nothing differs, another where anything does.

    Ragged routings, empty experts, k = E, N and K off the tiles, both weight layouts. (The fixture is
    shared by the examples: each clears the plans first.)
    """
    topk = 1 + round(topk_frac * (E - 1))
    log = direct
    first = {**first, "x_offset": 0}
    for change in [None, *LAYOUT_CHOICES]:
        gg._PLANS.clear()
        inputs = _inputs(kind, T, E, topk, N, K, transpose, seed, first)
        X, W, W_ref, counts, gather, weights, bias, out = inputs
        _call(kind, X, W, counts, gather, weights, bias, topk, transpose, out)  # the full path; may keep a plan
        plans = [p for p in gg._PLANS.values() if p is not None]
        hopper_ran = hopper.unsupported_reason(X, W, transpose) is None
        assert len(plans) == (hopper_ran and kind != "validated"), "a plan where the Hopper kernel ran, unvalidated"
        second = dict(first)
        if change is not None:
            second[change] = next(v for v in LAYOUT_CHOICES[change] if v != first[change])
        X, W, W_ref, counts, gather, weights, bias, out = _inputs(kind, T, E, topk, N, K, transpose, seed + 1, second)
        counts, gather = _routing(T, E, topk, seed + 7)  # another routing, same shapes
        counts = _sizes_in(counts, second)
        _check_against_the_full_path(kind, X, W, W_ref, counts, gather, weights, bias, topk, transpose, out, log,
                                     plans[0] if plans and change is None else None)


def test_a_plan_follows_its_buckets_tuned_config(direct):
    log = direct
    X, W, _, counts, *_ = _inputs("plain", 8, 3, 2, 24, 16, True, 0, PLAIN)
    gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    (key,) = autotune.TUNED
    gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    assert log[-1][0].constexprs["BLOCK_N"] == 16
    autotune.TUNED[key] = {**autotune.TUNED[key], "BLOCK_N": 32}  # retuned (another process's cache, say)
    expected = gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    assert log[-1][0].constexprs["BLOCK_N"] == 32, "a plan made for the old config is not current any more"
    gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    assert log[-1][0].constexprs["BLOCK_N"] == 32 and sum(p is not None for p in gg._PLANS.values()) == 1
    autotune.TUNED.clear()  # cleared (an A/B run flipping a switch): tuned again, then planned again
    assert relative_error(gg.grouped_gemm(X, W, counts, kernel="auto", validate=False), expected) <= 1e-6
    assert log[-1][0].constexprs["BLOCK_N"] == 16
    gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    assert log[-1][0].constexprs["BLOCK_N"] == 16


def test_no_plan_while_a_profiler_listens_or_the_direct_path_is_off(direct, monkeypatch):
    log = direct
    X, W, _, counts, *_ = _inputs("plain", 8, 3, 2, 24, 16, True, 0, PLAIN)
    gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    assert len(log) == 2
    triton_launches = []
    real_getitem = type(hopper._grouped_gemm_tma_kernel).__getitem__
    monkeypatch.setattr(type(hopper._grouped_gemm_tma_kernel), "__getitem__",
                        lambda self, grid: triton_launches.append(grid) or real_getitem(self, grid))
    monkeypatch.setattr(launcher, "_hooks_set", lambda: True)
    gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    assert len(log) == 2 and len(triton_launches) == 1, "with hooks set, every launch goes through Triton's path"
    monkeypatch.setattr(launcher, "_hooks_set", lambda: False)
    monkeypatch.setattr(launcher, "DIRECT", False)
    gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    assert len(log) == 2 and len(triton_launches) == 2


def test_a_plan_skips_no_check(direct):
    """Once a layout has a plan, inputs that differ from it in any checked property still get the error."""
    X, W, _, counts, gather, weights, *_ = _inputs("plain", 8, 3, 2, 24, 16, True, 0, PLAIN)
    for _ in range(2):
        gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    assert any(p is not None for p in gg._PLANS.values())
    with pytest.raises(ValueError, match="expects K=16"):
        gg.grouped_gemm(X[:, :8], W, counts, kernel="auto", validate=False)
    with pytest.raises(TypeError, match="W is torch.float16"):
        gg.grouped_gemm(X, W.half(), counts, kernel="auto", validate=False)
    with pytest.raises(ValueError, match="m_sizes has 2 entries"):
        gg.grouped_gemm(X, W, counts[:2], kernel="auto", validate=False)
    bad = counts.clone()
    bad[0] += 1  # the sizes no longer sum to M: found by validate=True (a host read), plan or not
    with pytest.raises(ValueError, match="m_sizes"):
        gg.grouped_gemm(X, W, bad, kernel="auto", validate=True)
    with pytest.raises(ValueError, match="m_sizes"):
        gg.grouped_gemm(X, W, bad, kernel="auto")  # the CPU's default validates


@pytest.mark.parametrize("moved", ["X", "W", "m_sizes", "gather_indices", "topk_weights", "bias", "out"])
def test_a_tensor_on_another_device_never_launches_from_a_plan(direct, moved):
    """A plan gives the launcher addresses without the driver's check of each one (``launcher.POINTER_INTS``), which
    is safe only because its key holds every tensor's device: a call with any one tensor elsewhere (here the meta
    device, whose addresses are 0) takes the full path and gets the device error, launching nothing."""
    log = direct
    X, W, _, counts, gather, weights, bias, out = _inputs("scatter_weights", 6, 3, 2, 24, 16, True, 0, PLAIN)
    args = dict(X=X, W=W, m_sizes=counts, gather_indices=gather, topk_weights=weights, bias=bias, out=out)
    for _ in range(2):
        gg.grouped_gemm(**args, topk=2, permute_y=True, kernel="auto", validate=False)
    assert any(p is not None for p in gg._PLANS.values())
    del log[:]
    args[moved] = args[moved].to("meta")
    with pytest.raises(ValueError, match="one device"):
        gg.grouped_gemm(**args, topk=2, permute_y=True, kernel="auto", validate=False)
    assert log == [], "nothing launched"


def test_a_plan_never_drops_a_gradient(direct):
    X, W, W_ref, counts, *_ = _inputs("plain", 8, 3, 2, 24, 16, True, 0, PLAIN)
    for _ in range(2):
        gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    Xg, Wg = X.clone().requires_grad_(), W.clone().requires_grad_()
    y = gg.grouped_gemm(Xg, Wg, counts, kernel="auto", validate=False)
    assert y.requires_grad, "an input that requires grad goes through the op, which records autograd"
    y.sum().backward()
    Xd, Wd = X.double().requires_grad_(), W.double().requires_grad_()
    torch_grouped_gemm(Xd, Wd, counts).sum().backward()
    assert relative_error(Xg.grad, Xd.grad) <= 1e-5 and relative_error(Wg.grad, Wd.grad) <= 1e-5


def test_plans_are_bounded(direct, monkeypatch):
    monkeypatch.setattr(gg, "MAX_PLANS", 3)
    W = torch.randn(3, 24, 16)
    for T in range(1, 8):
        counts, _ = _routing(T, 3, 1, T)
        gg.grouped_gemm(torch.randn(T, 16), W, counts, kernel="auto", validate=False)
        assert len(gg._PLANS) <= 3


@pytest.mark.parametrize("kind", ["plain", "gather", "swiglu"])
def test_a_plan_launches_on_the_tensors_it_is_given(direct, kind):
    """A decode loop: the same weights, new activations every step (the allocator recycling a few addresses).
    Each step computes on its own X, and a tensor map is made once per address pair, not per call."""
    log = direct
    X, W, W_ref, counts, gather, weights, bias, out = _inputs(kind, 6, 4, 2, 24, 16, True, 0, PLAIN)
    _call(kind, X, W, counts, gather, weights, bias, 2, True, out)
    (plan,) = [p for p in gg._PLANS.values() if p is not None]
    pool = [torch.empty_like(X) for _ in range(3)]  # three buffers the steps' activations take turns in
    for step in range(7):
        X = pool[step % 3].normal_()
        counts, gather = _routing(6, 4, 2, step)
        result = _call(kind, X, W, counts, gather, weights, bias, 2, True, out)
        assert relative_error(result, _reference(kind, X, W_ref, counts, gather, weights, bias, 2)) <= 1e-5
        assert log[-1][0] is plan.entry.kernel
    raw = plan.entry.raw
    if raw is not None:
        assert len(plan.maps) == 3, "one set of tensor maps per (X, W) address pair"
        assert raw.made.count(W.data_ptr()) == 1 + 3, "W's map made by the first call's launch, then once per pair"


def test_an_untuned_bucket_is_planned_while_tuning_is_off(direct, monkeypatch):
    """MOE_LEARN_AUTOTUNE=0 (or a graph capture): the bucket's first candidate, planned like a tuned config,
    until tuning is on again and the next call tunes the bucket."""
    log = direct
    monkeypatch.setattr(hopper, "autotune_enabled", lambda X: False)
    X, W, _, counts, *_ = _inputs("plain", 8, 3, 2, 24, 16, True, 0, PLAIN)
    gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    (plan,) = [p for p in gg._PLANS.values() if p is not None]
    assert plan.tuned is None and autotune.TUNED == {}
    X = torch.randn_like(X)
    out = gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    assert log[-1][0] is plan.entry.kernel, "the repeat went through the plan"
    assert log[-1][0].constexprs["BLOCK_N"] == hopper.pick_config(16, 3)["BLOCK_N"], "the bucket's first candidate"
    assert relative_error(out, torch_grouped_gemm(X.double(), W.double(), counts)) <= 1e-5
    monkeypatch.setattr(hopper, "autotune_enabled", lambda X: True)
    gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    assert len(autotune.TUNED) == 1 and log[-1][0].constexprs["BLOCK_N"] == TINY["BLOCK_N"], "tuned, not planned"
    gg.grouped_gemm(X, W, counts, kernel="auto", validate=False)
    (plan,) = [p for p in gg._PLANS.values() if p is not None]
    assert plan.tuned is not None and log[-1][0] is plan.entry.kernel, "then planned with the tuned config"


# ---------------------------------------------------------------------------------------
# The decode experts' plans (kernels/decode_experts.py)
# ---------------------------------------------------------------------------------------

dec = importlib.import_module("moe_learn.kernels.decode_experts")


@pytest.fixture
def direct_decode(monkeypatch):
    """Direct launches on the CPU for the decode kernels, each compiled kernel the interpreter behind a log and a
    raw launch (no descriptors: the C launcher itself on a GPU)."""
    log = []
    _interpreted_direct_launches(monkeypatch, log, raw=True)
    monkeypatch.setattr(dec, "_GATE_UP", launcher.FastLauncher(dec._gate_up_swiglu_kernel))
    monkeypatch.setattr(dec, "_DOWN", launcher.FastLauncher(dec._down_sum_kernel))
    monkeypatch.setattr(dec, "_KERNEL", launcher.FastLauncher(dec._decode_experts_kernel))
    monkeypatch.setattr(dec, "_PLANS", {})
    monkeypatch.setattr(dec, "PLANS", True)
    return log


def _decode_reference(x, ids, weights, w1, w2, transpose):
    """float64, slot by slot; h rounded to the dtype as the kernel stores it."""
    w1 = (w1 if transpose else w1.transpose(1, 2)).double()
    w2 = (w2 if transpose else w2.transpose(1, 2)).double()
    E, inter = w1.shape[0], w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if 0 <= e < E:
                gate_up = w1[e] @ x[t].double()
                h = (torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]).to(x.dtype).double()
                out[t] += weights[t, j].double() * (w2[e] @ h)
    return out


DECODE_LAYOUTS = {
    "dtype": [torch.float32, torch.float16],
    "x_offset": [0, 1],  # x starts 2 or 4 bytes in
    "x_pad": [0, 5],  # x a column slice: another row stride
    "ids_dtype": [torch.int64, torch.int32],
    "ids_strided": [False, True],
    "weights_strided": [False, True],
    "transpose": [True, False],
}
DECODE_PLAIN = {name: values[0] for name, values in DECODE_LAYOUTS.items()}


def _decode_inputs(T, k, E, H, I, seed, layout):  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    dtype, offset, width = layout["dtype"], layout["x_offset"], H + layout["x_pad"]
    x = torch.empty(T * width + offset, dtype=dtype)[offset:].view(T, width)[:, :H]
    x.copy_(torch.randn(T, H, generator=g))
    ids = torch.randint(-1, E + 1, (T, k), generator=g).to(layout["ids_dtype"])  # some slots dropped
    if layout["ids_strided"]:
        ids = torch.stack([ids, torch.full_like(ids, 10**6)], dim=2)[:, :, 0]
    weights = torch.rand(T, k, generator=g)
    if layout["weights_strided"]:  # every other column: strided whatever the shape (a [1, 1] .t() would not be)
        weights = torch.rand(T, 2 * k, generator=g)[:, ::2]
    w1 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    if not layout["transpose"]:
        w1, w2 = w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    return x, ids, weights.to(dtype), w1, w2


def _launch_record(log):
    return [(entry.fn, grid, tuple(_normal(a) for a in args)) for entry, grid, args in log]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(changed="weights_strided", T=1, k=1, E=1, H=15, I=4, seed=0)  # (a [1, 1] weights view, strided still)
@given(changed=st.sampled_from(sorted(DECODE_LAYOUTS)), T=st.integers(1, 3), k=st.integers(1, 3),
       E=st.integers(1, 4), H=st.integers(1, 20), I=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_decode_plans_launch_what_the_full_path_launches(direct_decode, changed, T, k, E, H, I, seed):  # noqa: E741
    """A repeated layout runs from its plan: the same kernels, grids and arguments as the full path, float64's
    numbers; a layout that differs in one property gets its own plan."""
    dec._PLANS.clear()
    log = direct_decode
    first = dict(DECODE_PLAIN)
    second = {**first, changed: DECODE_LAYOUTS[changed][1]}
    for n, layout in enumerate((first, first, second, second)):
        inputs = _decode_inputs(T, k, E, H, I, seed + n, layout)
        transpose = layout["transpose"]
        had_plan = len(dec._PLANS)
        del log[:]
        with torch.no_grad():
            got = dec.decode_experts(*inputs, transpose=transpose)
        planned_launch = _launch_record(log)
        entries = [entry for entry, _, _ in next(iter(dec._PLANS.values())).launches] if n == 1 else []
        assert all(entry.raw.ints[-1] for entry in entries), "a plan's launches pass its tensors' addresses"
        assert len(dec._PLANS) == (1 if n < 2 else 2)
        assert (n in (1, 3)) == (had_plan == len(dec._PLANS)), "a repeated layout reuses its plan, a new one adds one"
        dec.PLANS, saved = False, dict(dec._PLANS)
        dec._PLANS.clear()
        del log[:]
        with torch.no_grad():
            full = dec.decode_experts(*inputs, transpose=transpose)
        dec.PLANS = True
        dec._PLANS.update(saved)
        assert not any(entry.raw.ints[-1] for entry in entries), "the full path passes tensors"
        assert planned_launch == _launch_record(log)
        assert torch.equal(got, full)
        want = _decode_reference(*inputs, transpose)
        tol = 2e-2 if layout["dtype"] == torch.float16 else 1e-4
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol * (1 + want.abs().max().item()))


def test_decode_plans_skip_no_check_that_depends_on_more_than_the_layout(direct_decode, monkeypatch):
    """A gradient to record refuses, plan or not; the CPU's id-range check of moe_experts runs on every call;
    the plans stay bounded."""
    from moe_learn.layers.experts import moe_experts

    x, ids, weights, w1, w2 = _decode_inputs(2, 2, 3, 8, 4, 0, DECODE_PLAIN)
    ids = ids.clamp(0, 2)
    with torch.no_grad():
        dec.decode_experts(x, ids, weights, w1, w2)
    assert len(dec._PLANS) == 1
    with pytest.raises(ValueError, match="no_grad"):
        dec.decode_experts(x.requires_grad_(), ids, weights, w1, w2)
    x = x.detach()
    with torch.no_grad():
        moe_experts(x, ids, weights, w1, w2)
        bad = ids.clone()
        bad[0, 0] = 3
        with pytest.raises(ValueError, match="topk_ids"):
            moe_experts(x, bad, weights, w1, w2)
    dec._PLANS.clear()
    monkeypatch.setattr(dec, "MAX_PLANS", 3)
    with torch.no_grad():
        for T in range(1, dec.MAX_PLANS + 3):
            dec.run_decode_experts(x[:1].expand(T, -1), ids[:1].expand(T, -1), weights[:1].expand(T, -1), w1, w2,
                                   remember=True)
    assert 0 < len(dec._PLANS) <= dec.MAX_PLANS


@pytest.mark.parametrize("moved", range(5))
def test_a_tensor_on_another_device_never_launches_from_a_decode_plan(direct_decode, moved):
    """As for the GEMM's plans: any one of the five tensors elsewhere (the meta device) gets the device error from
    the checks, and nothing is launched with its address."""
    log = direct_decode
    inputs = list(_decode_inputs(2, 2, 3, 8, 4, 0, DECODE_PLAIN))
    with torch.no_grad():
        for _ in range(2):
            dec.decode_experts(*inputs)
        assert len(dec._PLANS) == 1
        del log[:]
        inputs[moved] = inputs[moved].to("meta")
        with pytest.raises(ValueError, match="one device"):
            dec.decode_experts(*inputs)
    assert log == [], "nothing launched"


def test_layers_take_a_decode_plan_only_within_their_rule(direct_decode, monkeypatch):
    """A plan that ``decode_experts`` made for shapes past the layers' rule (too many bytes of weights) is not
    the layers' (``planned(layers=True)``); changing the rule's limits retires every plan made under the old."""
    x, ids, weights, w1, w2 = _decode_inputs(2, 2, 3, 8, 4, 0, DECODE_PLAIN)
    ids = ids.clamp(0, 2)
    per_slot = (w1.numel() + w2.numel()) // 3 * w1.element_size()
    monkeypatch.setattr(dec, "MAX_WEIGHT_BYTES", 4 * per_slot - 1)  # 4 slots are one byte too many
    assert not dec.layers_take(ids, w1, w2) and dec.layers_take(ids[:1], w1, w2)
    with torch.no_grad():
        want = dec.decode_experts(x, ids, weights, w1, w2)
        assert torch.equal(dec.planned(x, ids, weights, w1, w2), want)  # decode_experts' own calls: planned
        assert dec.planned(x, ids, weights, w1, w2, layers=True) is None
        dec.decode_experts(x[:1], ids[:1], weights[:1], w1, w2)
        assert dec.planned(x[:1], ids[:1], weights[:1], w1, w2, layers=True) is not None
        # the layers' look-up (moe_experts, transformers' experts): the plan, unless their switch, the
        # backend or a config says otherwise
        from moe_learn.layers import experts as layers

        assert torch.equal(layers.planned_decode(x[:1], ids[:1], weights[:1], w1, w2, True, "triton", None),
                           dec.planned(x[:1], ids[:1], weights[:1], w1, w2))
        assert layers.planned_decode(x[:1], ids[:1], weights[:1], w1, w2, True, "torch", None) is None
        assert layers.planned_decode(x[:1], ids[:1], weights[:1], w1, w2, True, "triton", {"BLOCK_M": 16}) is None
        monkeypatch.setattr(layers, "DECODE_EXPERTS", False)
        assert layers.planned_decode(x[:1], ids[:1], weights[:1], w1, w2, True, "triton", None) is None
        monkeypatch.setattr(layers, "DECODE_EXPERTS", True)
        monkeypatch.setattr(dec, "PLANS", False)  # the A/B switch off: no plan is used, even one kept before
        assert dec.planned(x[:1], ids[:1], weights[:1], w1, w2, layers=True) is None
        monkeypatch.setattr(dec, "PLANS", True)
        monkeypatch.setattr(dec, "MAX_SLOTS", 1)  # other limits: no plan of the old ones is reused
        assert dec.planned(x[:1], ids[:1], weights[:1], w1, w2, layers=True) is None


def test_the_one_launch_as_on_a_gpu(direct_decode, monkeypatch):
    """The GPU's one-launch path on the CPU: not the interpreter's branch (a grid sized from the compiled kernel's
    resources, ``grid_sync.most_programs``, with stand-in device properties and one SM so the interpreter's
    programs never wait for a later one), then its plan with the scratch kept per stream; every launch logged."""
    from types import SimpleNamespace

    from moe_learn.kernels import grid_sync

    log = direct_decode
    monkeypatch.setattr(dec, "ONE_LAUNCH", True)
    monkeypatch.setattr(dec, "INTERPRETER", False)
    monkeypatch.setattr(dec, "_MOST_PROGRAMS", {})
    monkeypatch.setattr(grid_sync, "num_sms", lambda device: 1 if isinstance(device, torch.device) else None.type)
    props = SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                            shared_memory_per_multiprocessor=233472)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(Interpreted, "n_regs", 255, raising=False)  # one program per SM
    monkeypatch.setattr(Interpreted, "metadata", SimpleNamespace(num_warps=8, shared=0), raising=False)
    for step in range(3):
        x, ids, weights, w1, w2 = _decode_inputs(2, 3, 4, 24, 12, step, DECODE_PLAIN)
        with torch.no_grad():
            got = dec.decode_experts(x, ids, weights, w1, w2)
        want = _decode_reference(x, ids, weights, w1, w2, True)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    launched = [(kernel.fn, grid) for kernel, grid, _ in log]
    assert launched == [(dec._decode_experts_kernel, (1, 1, 1))] * 3, launched  # first call, then two from its plan
    (plan,) = dec._PLANS.values()
    assert plan.one_launch and [stream for stream, _ in plan.scratch] == [0]  # the stand-in's stream
    assert len(dec._GATE_UP.cache) == len(dec._DOWN.cache) == 1, "the two launches a captured graph takes: compiled"
    assert all(int(pair.abs().sum()) == 0 for pair in grid_sync._COUNTERS.values())


def test_the_one_launch_switch_reaches_calls_that_have_a_plan(direct_decode, monkeypatch):
    """``ONE_LAUNCH`` flipped between calls of one layout: each call launches what the switch says, not what the
    layout's first call made a plan of (an A/B run compares the two on the same tensors)."""
    log = direct_decode
    x, ids, weights, w1, w2 = _decode_inputs(2, 2, 3, 16, 8, 0, DECODE_PLAIN)
    want = _decode_reference(x, ids, weights, w1, w2, True)
    kernels = []
    with torch.no_grad():
        for one in (True, True, False, False, True):
            monkeypatch.setattr(dec, "ONE_LAUNCH", one)
            log.clear()
            got = dec.decode_experts(x, ids, weights, w1, w2)
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
            kernels.append(tuple(kernel.fn.__name__ for kernel, _, _ in log))
    one, two = ("_decode_experts_kernel",), ("_gate_up_swiglu_kernel", "_down_sum_kernel")
    assert kernels == [one, one, two, two, one], kernels


def test_two_launch_plans_keep_h_per_stream_but_not_in_a_graph(direct_decode, monkeypatch):
    """The two launches' plan keeps h per stream (one allocation less a call): steps of one layout with new inputs
    and dropped slots stay right and share one h; another stream gets its own; a call while a CUDA graph is
    captured gets a fresh h (a graph may be replayed on any stream, beside eager calls on this one)."""
    log = direct_decode
    monkeypatch.setattr(dec, "ONE_LAUNCH", False)
    stream = [0]
    monkeypatch.setattr(launcher, "_current_stream", lambda device: stream[0])
    hs = []
    for step, (on, capturing) in enumerate([(0, False), (0, False), (0, False), (7, False), (7, True), (0, False)]):
        stream[0] = on
        monkeypatch.setattr(dec, "_capturing", lambda capturing=capturing: capturing)
        x, ids, weights, w1, w2 = _decode_inputs(2, 3, 4, 24, 12, step, DECODE_PLAIN)
        log.clear()
        with torch.no_grad():
            got = dec.decode_experts(x, ids, weights, w1, w2)
        torch.testing.assert_close(got.double(), _decode_reference(x, ids, weights, w1, w2, True), rtol=1e-4,
                                   atol=1e-5)
        (gate_up, _, args), (down, _, down_args) = log
        assert (gate_up.fn, down.fn) == (dec._gate_up_swiglu_kernel, dec._down_sum_kernel)
        assert args[3] is down_args[0]  # gate_up writes the h that down reads
        hs.append(args[3].data_ptr())
    (plan,) = dec._PLANS.values()
    assert sorted(stream for stream, _ in plan.scratch) == [0, 7]
    kept = {on: h.data_ptr() for (on, _), (h, _) in plan.scratch.items()}
    # the first call (checked, no plan yet) allocates; then stream 0's kept h, stream 7's, a fresh one in the graph
    assert hs[1] == hs[2] == hs[5] == kept[0] and hs[3] == kept[7] and hs[4] not in kept.values()


def test_plans_keep_h_per_thread_too(direct_decode, monkeypatch):
    """Two threads on one stream (the default stream is every thread's) could interleave their two launches
    (gate_up of A, gate_up of B, down of A): each thread has its own h, and each gets its own answer."""
    import threading

    monkeypatch.setattr(dec, "ONE_LAUNCH", False)
    x, ids, weights, w1, w2 = _decode_inputs(2, 3, 4, 24, 12, 0, DECODE_PLAIN)
    with torch.no_grad():
        dec.decode_experts(x, ids, weights, w1, w2)  # the plan
    results, one_at_a_time, both_alive = {}, threading.Lock(), threading.Barrier(2)

    def step(name, seed):
        x, ids, weights, _, _ = _decode_inputs(2, 3, 4, 24, 12, seed, DECODE_PLAIN)
        with one_at_a_time, torch.no_grad():  # (the interpreter's launches in turn: the point is the keys)
            results[name] = (dec.decode_experts(x, ids, weights, w1, w2), (x, ids, weights))
        both_alive.wait(timeout=60)  # (a thread that ended could hand its id to the next)

    threads = [threading.Thread(target=step, args=(name, seed)) for name, seed in (("a", 1), ("b", 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["a", "b"]  # (a thread that raised would leave its entry out)
    (plan,) = dec._PLANS.values()
    hs = [h.data_ptr() for h, _ in plan.scratch.values()]
    assert len({thread for _, thread in plan.scratch}) == 2 and len(set(hs)) == 2
    for got, inputs in results.values():
        torch.testing.assert_close(got.double(), _decode_reference(*inputs, w1, w2, True), rtol=1e-4, atol=1e-5)
