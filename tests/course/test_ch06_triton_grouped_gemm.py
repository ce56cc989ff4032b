"""Chapter 06 checks accept the right answers and reject plausible wrong ones with pointed messages."""

import pytest

from moe_learn.course.checks._core import CheckFailed
from moe_learn.course.checks.ch06_triton_grouped_gemm import (
    LOCATE_MISTAKES,
    check_grouped_gemm_kernel,
    check_locate_tile,
)
from tests.course.planted import Chapter06

# ------------------------------------------------------------------ 06.1


def locate_tile(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    before = 0
    for e, m in enumerate(m_sizes):
        tiles = -(-m // BLOCK_M) * num_n_tiles
        if tile_id < before + tiles:
            local = tile_id - before
            return e, local // num_n_tiles, local % num_n_tiles
        before += tiles
    return None


def locate_floor(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    before = 0
    for e, m in enumerate(m_sizes):
        tiles = (m // BLOCK_M) * num_n_tiles  # forgets the partial last row block
        if tile_id < before + tiles:
            local = tile_id - before
            return e, local // num_n_tiles, local % num_n_tiles
        before += tiles
    return None


def locate_column_major(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    before = 0
    for e, m in enumerate(m_sizes):
        num_m = -(-m // BLOCK_M)
        if tile_id < before + num_m * num_n_tiles:
            local = tile_id - before
            return e, local % num_m, local // num_m  # column-major inside the expert
        before += num_m * num_n_tiles
    return None


def locate_empty_has_a_tile(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    before = 0
    for e, m in enumerate(m_sizes):
        tiles = max(1, -(-m // BLOCK_M)) * num_n_tiles  # an empty expert still gets a row block
        if tile_id < before + tiles:
            local = tile_id - before
            return e, local // num_n_tiles, local % num_n_tiles
        before += tiles
    return None


def locate_inclusive(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    before = 0
    for e, m in enumerate(m_sizes):
        tiles = -(-m // BLOCK_M) * num_n_tiles
        if tile_id <= before + tiles:  # off by one: the next expert's first tile lands here
            local = tile_id - before
            return e, local // num_n_tiles, local % num_n_tiles
        before += tiles
    return None


def locate_forgets_column_blocks(tile_id, m_sizes, num_n_tiles, BLOCK_M):
    before = 0
    for e, m in enumerate(m_sizes):
        tiles = -(-m // BLOCK_M)  # row blocks only: no known mistake, so the general cause
        if tile_id < before + tiles:
            local = tile_id - before
            return e, local // num_n_tiles, local % num_n_tiles
        before += tiles
    return None


def test_locate_tile_reference_passes(capsys):
    check_locate_tile(locate_tile)
    assert "[PASS] 06.1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "fn,match",
    [
        (locate_floor, r"(?s)but you said expert .*m // BLOCK_M forgets the partial last one$"),
        (locate_column_major, r"(?s)row block 0, column block 1 .*row block by row block"),
        (locate_empty_has_a_tile, r"(?s)but you said expert .*an empty expert has no row blocks, hence no tiles"),
        (locate_inclusive, r"(?s)tile 1 covers .*but you said expert 0.*not <= \(an off-by-one\)"),
        (locate_forgets_column_blocks, r"(?s)but you said expert .*tiles of the experts before this one"),
    ],
)
def test_locate_tile_rejects(fn, match):
    with pytest.raises(CheckFailed, match=match) as info:
        check_locate_tile(fn)
    causes = [cause for _, cause in LOCATE_MISTAKES if cause in str(info.value)]
    assert len(causes) <= 1, f"one cause named, not several: {causes}"


def test_locate_tile_names_only_the_mistake_that_was_made():
    """Each known mistake gets its own cause, never another one's (the <= bug used to get 'cdiv')."""
    for fn, flags in ((locate_inclusive, "inclusive"), (locate_floor, "floor"), (locate_empty_has_a_tile, "min_one")):
        with pytest.raises(CheckFailed) as info:
            check_locate_tile(fn)
        named = [cause for mistake, cause in LOCATE_MISTAKES if cause in str(info.value)]
        expected = [cause for mistake, cause in LOCATE_MISTAKES if flags in mistake]
        assert named == expected, (fn.__name__, str(info.value))


def test_locate_tile_stub_propagates():
    def stub(*args):
        raise NotImplementedError("exercise 06.1")

    with pytest.raises(NotImplementedError):
        check_locate_tile(stub)


# ------------------------------------------------------------------ 06.2


def test_kernel_reference_passes(capsys):
    check_grouped_gemm_kernel(Chapter06())
    assert "[PASS] 06.2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bug,match",
    [
        ("BUG_NO_STORE", r"(?s)wrote nothing.*still `pass`"),
        (
            "BUG_NO_K_MASK",
            r"(?s)rows 0-15 of expert 0 .* hold NaN read from outside X or W .*K tail.*mask the loads of the last K",
        ),
        ("BUG_FLOOR_TILES", r"(?s)rows 0-4 of expert 0 .*never written.*partly full row block"),
        ("BUG_BUSY_EXPERT_INDEX", r"(?s)rows 0-15 of expert 1 .* hold expert 0's product.*tile -> expert mapping"),
        ("BUG_NO_N_STORE_MASK", r"(?s)wrote column 4\d of row .*only 40 columns.*offs_n < N"),
        ("BUG_NO_M_STORE_MASK", r"(?s)wrote past the last output row.*mask the store with the rows that exist"),
    ],
)
def test_kernel_rejects(bug, match):
    with pytest.raises(CheckFailed, match=match):
        check_grouped_gemm_kernel(Chapter06(**{bug: True}))


def test_kernel_check_wants_the_kernel_not_the_wrapper():
    with pytest.raises(TypeError, match="not its wrapper"):
        check_grouped_gemm_kernel(locate_tile)
