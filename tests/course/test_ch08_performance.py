"""Chapter 08 checks accept the right answers and reject plausible wrong ones with pointed messages."""

import pytest
import torch

from moe_learn.course.checks._core import CheckFailed
from moe_learn.course.checks.ch08_performance import (
    EXERCISES,
    check_locate_tile_prefix,
    check_roofline_floor,
    check_tuning_config,
)
from moe_learn.kernels.grouped_gemm_hopper import pick_config

# ------------------------------------------------------------------ 08.1


def _floor(M, N, K, E, peak, bw, elem=2, *, weights_e=None, flops_x=1.0, x_per_expert=1, pick=max,
           bw_scale=1e12):
    flops = 2.0 * M * N * K * flops_x
    experts = E if weights_e is None else weights_e
    nbytes = elem * (x_per_expert * (M * K + M * N) + experts * N * K)
    t_c, t_m = flops / (peak * 1e12), nbytes / (bw * bw_scale)
    return pick(t_c, t_m), "memory" if t_m >= t_c else "compute"


def roofline_floor(M, N, K, E, peak_tflops, bandwidth_tbs, elem_bytes=2):
    return _floor(M, N, K, E, peak_tflops, bandwidth_tbs, elem_bytes)


def test_roofline_reference_passes(capsys):
    check_roofline_floor(roofline_floor)
    assert "[PASS] 08.1" in capsys.readouterr().out


@pytest.mark.parametrize("wrong,match", [
    (lambda M, N, K, E, p, b, el=2: _floor(M, N, K, E, p, b, el, weights_e=1), "weights of one expert"),
    (lambda M, N, K, E, p, b, el=2: _floor(M, N, K, E, p, b, el, pick=min), "larger one \\(max\\)"),
    (lambda M, N, K, E, p, b, el=2: _floor(M, N, K, E, p, b, el, bw_scale=1e9), "mixed units"),
    (lambda M, N, K, E, p, b, el=2: _floor(M, N, K, E, p, b, el, flops_x=E), "for every expert"),
    (lambda M, N, K, E, p, b, el=2: _floor(M, N, K, E, p, b, el, x_per_expert=E), "X and Y once per expert"),
    (lambda M, N, K, E, p, b, el=2: _floor(M, N, K, E, p, b, 1), "elements, not bytes"),
    (lambda M, N, K, E, p, b, el=2: (_floor(M, N, K, E, p, b, el)[0] * 1e6, "memory"), "microseconds"),
    (lambda M, N, K, E, p, b, el=2: (_floor(M, N, K, E, p, b, el)[0], "memory"), "bound is 'memory'"),
    (lambda M, N, K, E, p, b, el=2: (_floor(M, N, K, E, p, b, el)[0], "MEMORY"), "the string"),
])
def test_roofline_wrong_answers_are_explained(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        check_roofline_floor(wrong)


def test_roofline_stub_propagates():
    def stub(*args):
        raise NotImplementedError

    with pytest.raises(NotImplementedError):
        check_roofline_floor(stub)


# ------------------------------------------------------------------ 08.2


def _locate(tile_id, m_sizes, BLOCK_M, N, BLOCK_N, *, m_fastest=True, strict=True, floor_tiles=False,
            tile_row_start=True):
    m_tiles = m_sizes // BLOCK_M if floor_tiles else (m_sizes + BLOCK_M - 1) // BLOCK_M
    n_tiles = -(-N // BLOCK_N)
    tile_end = torch.cumsum(m_tiles * n_tiles, 0)
    tile_begin = tile_end - m_tiles * n_tiles
    row_begin = torch.cumsum(m_sizes, 0) - m_sizes
    e = int((tile_end <= tile_id).sum()) if strict else int((tile_end < tile_id).sum())
    e = min(e, len(m_sizes) - 1)
    local = tile_id - int(tile_begin[e])
    mt = max(int(m_tiles[e]), 1)
    tile_m, tile_n = (local % mt, local // mt) if m_fastest else (local // n_tiles, local % n_tiles)
    row = int(row_begin[e]) + (tile_m * BLOCK_M if tile_row_start else 0)
    return e, tile_m, tile_n, row


def test_locate_reference_passes(capsys):
    check_locate_tile_prefix(_locate)
    assert "[PASS] 08.2" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs,match", [
    ({"m_fastest": False}, "N-fastest"),
    ({"strict": False}, "tile_end <= tile_id"),
    ({"tile_row_start": False}, "first row of the TILE"),
    ({"floor_tiles": True}, "round UP"),
])
def test_locate_wrong_answers_are_explained(kwargs, match):
    with pytest.raises(CheckFailed, match=match):
        check_locate_tile_prefix(lambda *a: _locate(*a, **kwargs))


def test_locate_inclusive_row_prefix_is_explained():
    def inclusive_rows(tile_id, m_sizes, BLOCK_M, N, BLOCK_N):
        e, tm, tn, row = _locate(tile_id, m_sizes, BLOCK_M, N, BLOCK_N)
        return e, tm, tn, row + int(m_sizes[e])  # cumsum(m_sizes)[e]: the expert's END, not its start

    with pytest.raises(CheckFailed, match="EXCLUSIVE prefix sum"):
        check_locate_tile_prefix(inclusive_rows)


# ------------------------------------------------------------------ 08.3


def test_tuning_reference_passes(capsys):
    check_tuning_config(lambda M, N, K, E: {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, time_on_gpu=False)
    check_tuning_config(lambda M, N, K, E: pick_config(M, E), time_on_gpu=False)
    assert capsys.readouterr().out.count("[PASS] 08.3") == 2


@pytest.mark.parametrize("config,match", [
    ({"BLOCK_M": 96}, "powers of two"),
    ({"BLOCK_K": 8}, "at least 16"),
    ({"GROUP_M": 8}, "portable kernel"),
    ({"block_m": 64}, "unknown keys"),
    ({"FLATTEN": True, "WARP_SPECIALIZE": True}, "don't go together"),
    ({"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 128, "num_stages": 4}, "shared memory"),
    ({"num_warps": 6}, "power of two"),
    ({"FLATTEN": 1}, "True or False"),
])
def test_tuning_wrong_configs_are_explained(config, match):
    with pytest.raises(CheckFailed, match=match):
        check_tuning_config(lambda M, N, K, E: config, time_on_gpu=False)


def test_tuning_not_a_dict():
    with pytest.raises(CheckFailed, match="expected a dict"):
        check_tuning_config(lambda M, N, K, E: [("BLOCK_M", 64)], time_on_gpu=False)


def test_exercises_have_progressive_hints():
    assert [ex.id for ex in EXERCISES] == ["08.1", "08.2", "08.3"]
    assert all(2 <= len(ex.hints) <= 3 and ex.notebook == "08_performance.ipynb" for ex in EXERCISES)
