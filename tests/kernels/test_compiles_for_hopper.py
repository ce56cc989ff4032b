"""The kernels compile for a Hopper GPU (sm_90), checked on any machine: Triton's interpreter runs the Python
of a kernel and accepts what the compiler refuses (a global that is not a constexpr, say), so a kernel that
passes every CPU test can still fail its first compile on a GPU. Triton compiles for a given target without
one; this runs that compile in a child process with the interpreter off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moe_learn.kernels import decode_experts as dec

pointers = {"x_ptr": "*bf16", "ids_ptr": "*i64", "weights_ptr": "*fp32", "w_ptr": "*bf16", "w1_ptr": "*bf16",
            "w2_ptr": "*bf16", "h_ptr": "*bf16", "out_ptr": "*bf16", "counter_ptr": "*i32"}
kernels = [(dec._gate_up_swiglu_kernel, dict(BLOCK_N=8, BLOCK_K=128), dec.OPTIONS),
           (dec._down_sum_kernel, dict(SLOTS=8, BLOCK_N=8, BLOCK_K=256), dec.OPTIONS),
           (dec._decode_experts_kernel, dict(SLOTS=8, BLOCK_N_GATE_UP=8, BLOCK_K_GATE_UP=128, BLOCK_N_DOWN=8,
                                             BLOCK_K_DOWN=256), dec.ONE_LAUNCH_OPTIONS)]
done = []
for (fn, constexprs, options), prefetch in [(kernel, prefetch) for prefetch in (False, True) for kernel in kernels]:
    constexprs = dict(constexprs, **{name: prefetch for name in fn.arg_names if name.startswith("PREFETCH")})
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(options))
    done.append("atom" in kernel.asm["ptx"])
print(json.dumps(done))
"""


def _in_child(code: str):
    """Run ``code`` with the interpreter off; the JSON of its last line (skipped where Triton cannot compile
    for sm_90 here)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if result.returncode and ("ptxas" in result.stderr or "GPUTarget" in result.stderr
                              or "No module named 'triton.backends" in result.stderr):
        pytest.skip(f"this Triton cannot compile for sm_90 here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_decode_experts_kernels_compile_for_sm90():
    done = _in_child(CHILD)
    # the one launch has its grid barrier (atomics); the two phases alone have none (each without and with the
    # prefetch)
    assert done == [False, False, True] * 2


# Qwen3-30B-A3B at T = 1, contiguous bf16, specialized as Triton specializes a launch: pointers and integers
# that are multiples of 16 marked so, integers equal to 1 made constants (the do_not_specialize ones excepted)
SPECIALIZED = r"""
import json, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moe_learn.kernels import decode_experts as dec

common = dict(E=128, H=2048, I=768, TOP_K=8, stride_xt=2048, stride_xh=1, stride_it=8, stride_ik=1, stride_rt=8,
              stride_rk=1, stride_wk=1, stride_ot=2048, stride_oh=1)
weight_strides = {dec._gate_up_swiglu_kernel: dict(stride_we=1536 * 2048, stride_wn=2048),
                  dec._down_sum_kernel: dict(stride_we=2048 * 768, stride_wn=768)}
pointers = {"x_ptr": "*bf16", "ids_ptr": "*i64", "weights_ptr": "*fp32", "w_ptr": "*bf16", "h_ptr": "*bf16",
            "out_ptr": "*bf16"}


def compile_specialized(fn, constexprs):
    values = dict(common, **weight_strides[fn])
    signature, constants, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name], attrs[(i,)] = pointers[name], [["tt.divisibility", 16]]
        elif values[name] == 1 and name not in ("E", "TOP_K"):
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0 and name not in ("E", "TOP_K"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()},
                       attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(dec.OPTIONS))
"""

VECTOR_CHILD = SPECIALIZED + r"""
loads = {}
for (fn, constexprs), prefetch in [
        (kernel, prefetch) for prefetch in (False, True)
        for kernel in ((dec._gate_up_swiglu_kernel, dict(BLOCK_N=16, BLOCK_K=128)),
                       (dec._down_sum_kernel, dict(SLOTS=8, BLOCK_N=8, BLOCK_K=256)))]:
    ptx = compile_specialized(fn, dict(constexprs, PREFETCH=prefetch)).asm["ptx"]
    loads[f"{fn.__name__}, prefetch {prefetch}"] = sorted(set(re.findall(r"ld\.global[.\w]*", ptx)))
print(json.dumps(loads))
"""


def test_decode_kernels_load_weights_eight_elements_at_a_time():
    """Both phases stream weights with 16-byte loads (``ld.global.v4``), not one 2-byte load per element: the
    compiler vectorizes only where it can prove the address and the mask move in steps of 8 elements, which an
    expert's offset picked out of registers by a sum hid in the down kernel (8x the load instructions)."""
    loads = _in_child(VECTOR_CHILD)
    for name, kinds in loads.items():
        assert "ld.global.v4.b32" in kinds, (name, kinds)


SPILL_CHILD = SPECIALIZED + r"""
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
usage = {}
# every column block _block_n can choose, with the K block and the prefetch run_decode_experts gives it
for block_n in (8, 16, 32, 64):
    down_k = dec.BLOCK_K_DOWN_NARROW if block_n == dec.MIN_BLOCK_N else dec.BLOCK_K_DOWN
    gate_up_k = dec.BLOCK_K_GATE_UP
    for fn, constexprs in ((dec._gate_up_swiglu_kernel, dict(BLOCK_N=block_n, BLOCK_K=gate_up_k,
                                                             PREFETCH=dec._prefetch("gate_up", block_n, gate_up_k))),
                           (dec._down_sum_kernel, dict(SLOTS=8, BLOCK_N=block_n, BLOCK_K=down_k,
                                                       PREFETCH=dec._prefetch("down", block_n, down_k)))):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compile_specialized(fn, constexprs).asm["cubin"])
            f.flush()
            dump = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                  check=True).stdout
        registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", dump).groups()
        usage[f"{fn.__name__} {constexprs}"] = [int(registers), int(stack)]
print(json.dumps(usage))
"""


def test_the_planned_block_shapes_do_not_spill_registers():
    """Every column block the planner can choose, with its K block and its prefetch (``_prefetch``), keeps its
    accumulators and tiles in registers at Qwen3-30B-A3B's shapes (strides that are multiples of 16, as every
    benchmark model's; odd strides cost more address registers): compiled for sm_90, no stack. Spilled registers
    go to local memory, the same DRAM the kernel streams weights from: a prefetch over 64-column gate/up tiles
    spilled and ran 8-25% slower on an H100."""
    usage = _in_child(SPILL_CHILD)
    assert any("'PREFETCH': True" in name for name in usage), usage  # (the rule prefetches somewhere)
    for name, (registers, stack) in usage.items():
        assert stack == 0 and registers <= 255, (name, registers, stack)
