"""The guarded buffers and row diagnosis every kernel check shares (moe_learn.course.checks._kernels)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_learn.course.checks._core import CheckFailed
from moe_learn.course.checks._kernels import (
    FINITE_POISON,
    OUTPUT_GUARD,
    ExpertRows,
    check_no_stray_writes,
    explain_rows,
    guarded_input,
    guarded_output,
    never_written,
)

layouts = st.tuples(
    st.lists(st.integers(1, 5), min_size=1, max_size=3),  # shape
    st.lists(st.integers(0, 3), min_size=3, max_size=3),  # pad per dim (cut to the shape's length)
    st.integers(1, 4),  # guard cells before and after (at least one: there is a cell to write)
)


@settings(max_examples=60, deadline=None)
@given(layouts, st.data())
def test_every_guard_cell_is_reported_where_it_lies(layout, data):
    shape, pad, guard = layout
    pad = pad[: len(shape)]
    out = guarded_output(shape, pad=pad, guard=guard, device="cpu")
    assert torch.isnan(out.view).all() and out.view.stride()[-1] == 1
    cells = out.guard_cells()
    assert int((~cells).sum()) == math.prod(shape)
    assert bool((out.buffer[cells] == OUTPUT_GUARD).all())
    p = data.draw(st.sampled_from(cells.nonzero().flatten().tolist()))
    out.buffer[p] = 1.0
    (index,) = out.stray_writes()
    # The index is outside the view, and the view's strides continued lead back to the cell.
    assert any(i < 0 or i >= size for i, size in zip(index, shape, strict=True))
    assert out.front + sum(i * s for i, s in zip(index, out.view.stride(), strict=True)) == p
    # ... and it says which edge: inner coordinates stay inside the padded box, the first one carries the rest.
    assert all(0 <= i < s + q for i, s, q in zip(index[1:], shape[1:], pad[1:], strict=True))


def test_an_input_reads_nan_past_its_edges():
    x = guarded_input(torch.ones(3, 5), pad=(2, 4), guard=3)
    assert torch.equal(x.view, torch.ones(3, 5))
    past_row = x.read_as((3, 7), x.strides)  # two columns past the end of every row
    assert torch.isnan(past_row[:, 5:]).all() and (past_row[:, :5] == 1).all()
    assert x.read_as((3, 100), x.strides) is None  # past the buffer: nothing to say
    x.scramble_guard()
    assert torch.isfinite(x.buffer).all() and torch.equal(x.view, torch.ones(3, 5))


def test_never_written_tells_unwritten_from_nan_read():
    def kernel(poison):
        """Writes NaN (as if read from outside an input) into row 0, nothing into row 1, 1.0 into row 2."""
        out = guarded_output((3, 2), poison=poison, device="cpu")
        out.view[0] = float("nan")
        out.view[2] = 1.0
        return out.view

    first = kernel(float("nan"))
    assert never_written(first, kernel).tolist() == [[False, False], [True, True], [False, False]]
    assert not never_written(torch.ones(2), lambda poison: pytest.fail("no NaN: no rerun")).any()
    assert FINITE_POISON == float(torch.tensor(FINITE_POISON, dtype=torch.bfloat16))  # exact in every dtype


@pytest.mark.parametrize(
    ("row", "col", "match"),
    [
        (4, 0, r"wrote past the last output row: row 4, column 0, but the output has 3 rows"),
        (1, 6, r"wrote column 6 of row 1, but the output has only 5 columns"),
        (-1, 6, r"wrote 1 element\(s\) before the first output row"),
    ],
)
def test_stray_writes_of_a_grouped_gemm_output(row, col, match):
    out = guarded_output((3, 5), pad=(2, 3), guard=8, device="cpu")
    out.buffer[out.front + row * out.view.stride(0) + col] = 0.0
    with pytest.raises(CheckFailed, match=match):
        check_no_stray_writes("06.2", out, "case 'x'")


def test_expert_rows_skip_empty_experts():
    rows = ExpertRows([2, 0, 3])
    assert [rows.expert(r) for r in range(5)] == [0, 0, 2, 2, 2]
    assert rows.describe(3, 4) == "rows 1-2 of expert 2 (expert-order rows 3-4)"


def _explain(got, never=None):
    want = torch.ones(4, 3)
    rows = ExpertRows([4])
    explain_rows(
        "06.2", got, want, case="case 'x'", describe=rows.describe, group=rows.expert, mistakes=[],
        unwritten_hint=lambda r: "UNWRITTEN", wrong_hint="WRONG", never=never, inputs="X or W",
        read_outside_hint="READ",
    )  # fmt: skip


def test_explain_rows_names_nan_read_from_outside_apart_from_unwritten_rows():
    got = torch.ones(4, 3)
    got[1:3] = float("nan")
    never = torch.zeros(4, 3, dtype=torch.bool)
    with pytest.raises(CheckFailed, match=r"rows 1-2 of expert 0 .* hold NaN read from outside X or W .*\n.*READ"):
        _explain(got, never)
    never[1:3] = True
    with pytest.raises(CheckFailed, match=r"rows 1-2 of expert 0 .* were never written .*\n.*UNWRITTEN"):
        _explain(got, never)
    with pytest.raises(CheckFailed, match=r"were never written"):  # a plain tensor: NaN counts as unwritten
        _explain(got)
    _explain(torch.ones(4, 3))
