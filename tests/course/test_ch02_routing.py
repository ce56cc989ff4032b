"""Chapter 02 checks: the reference passes, plausible wrong answers fail with a pointed message."""

import json

import pytest
import torch

from moe_learn import get_routing_indices
from moe_learn.course import notebook_build as nb_build
from moe_learn.course.checks import ch02_routing as ch02
from moe_learn.course.checks._core import CheckFailed
from moe_learn.course.exercises import all_exercises
from moe_learn.ops.routing import expert_counts, gather_indices_by_expert


def test_exercises_are_listed_with_hints():
    ids = [ex.id for ex in ch02.EXERCISES]
    assert ids == ["02.1", "02.2", "02.3"]
    assert all(2 <= len(ex.hints) <= 3 and ex.notebook == "02_routing_indices.ipynb" for ex in ch02.EXERCISES)
    assert set(ids) <= set(all_exercises())


@pytest.mark.parametrize(
    ("check", "reference", "label"),
    [
        (ch02.check_expert_counts, expert_counts, "02.1"),
        (ch02.check_gather_indices_by_expert, gather_indices_by_expert, "02.2"),
        (ch02.check_get_routing_indices, get_routing_indices, "02.3"),
    ],
)
def test_reference_passes(check, reference, label, capsys):
    check(reference)
    assert f"[PASS] {label}" in capsys.readouterr().out


def test_bincount_with_minlength_is_also_right(capsys):
    ch02.check_expert_counts(lambda ids, e: torch.bincount(ids.long(), minlength=e))
    assert "[PASS] 02.1" in capsys.readouterr().out


def test_stub_error_propagates():
    def stub(*args):
        raise NotImplementedError("exercise 02.1: replace this line with your code")

    with pytest.raises(NotImplementedError, match="exercise 02.1"):
        ch02.check_expert_counts(stub)


@pytest.mark.parametrize(
    ("wrong", "match"),
    [
        (lambda ids, e: torch.histc(ids, bins=e, min=0, max=e).int(), r"histc raised.*\n.*\.float\(\)"),
        (lambda ids, e: torch.histc(ids.float(), bins=e, min=0, max=e), "histc returns floats"),
        (lambda ids, e: torch.histc(ids.float(), bins=e).int(), "histc without min/max uses the smallest and largest"),
        (lambda ids, e: torch.histc(ids.float(), bins=e, min=1, max=e + 1).int(), "shifted by one expert"),
        (lambda ids, e: torch.histc(ids.float(), bins=e - 1 if e > 1 else 2, min=0, max=e).int(), "bins=num_experts"),
        (lambda ids, e: torch.bincount(ids.long()), "bincount without minlength"),
        (lambda ids, e: torch.histc(ids.float(), bins=e, min=0, max=e - 1.5).int(), "add up to"),
    ],
)
def test_counts_wrong_answers(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        ch02.check_expert_counts(wrong)


@pytest.mark.parametrize(
    ("wrong", "match"),
    [
        (lambda ids: torch.argsort(ids), r"token order inside expert \d+ is not stable.*\n.*stable=True"),
        (lambda ids: torch.sort(ids, stable=True).values, "holds the sorted expert ids"),
        (lambda ids: torch.argsort(ids, descending=True, stable=True), "descending=False"),
        (lambda ids: torch.argsort(ids, stable=True).flip(0), r"belongs to expert \d+ but comes after"),
        (lambda ids: torch.arange(ids.numel()), r"belongs to expert \d+ but comes after"),
        (lambda ids: torch.argsort(ids, stable=True).clamp(max=max(ids.numel() - 2, 0)), "not a permutation"),
    ],
)
def test_gather_wrong_answers(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        ch02.check_gather_indices_by_expert(wrong)


def _routing_with(*, flatten=True, stable=True, scatter="inverse", always_three=False):
    def fn(selected, num_experts, return_scatter_indices=False):
        flat = selected.reshape(-1)
        counts = expert_counts(flat, num_experts)
        gather = torch.argsort(flat if flatten else selected, dim=-1, stable=stable)
        if not (return_scatter_indices or always_three):
            return counts, gather
        s = {"inverse": lambda: torch.argsort(gather), "same": lambda: gather, "reversed": lambda: gather.flip(0)}
        return counts, gather, s[scatter]()

    return fn


@pytest.mark.parametrize(
    ("wrong", "match"),
    [
        (_routing_with(), None),
        (_routing_with(flatten=False), r"flatten selected_experts first"),
        (_routing_with(stable=False), "not stable"),
        (
            _routing_with(scatter="same"),
            r"(?s)scatter_indices\[gather_indices\[\d+\]\] is \d+, expected \d+.*equals gather_indices; the inverse",
        ),
        (_routing_with(scatter="reversed"), r"scatter_indices\[gather_indices\[\d+\]\] is \d+, expected"),
        (_routing_with(always_three=True), "with return_scatter_indices=False you returned 3 values"),
    ],
)
def test_get_routing_indices_wrong_answers(wrong, match, capsys):
    if match is None:  # the harness without a mistake is a right answer
        ch02.check_get_routing_indices(wrong)
        assert "[PASS] 02.3" in capsys.readouterr().out
        return
    with pytest.raises(CheckFailed, match=match):
        ch02.check_get_routing_indices(wrong)


def test_solved_notebook_has_an_exercise_and_a_check_cell_per_exercise():
    nb = json.loads((nb_build.SOLUTIONS / "02_routing_indices.ipynb").read_text())
    tags = {t for cell in nb["cells"] for t in cell.get("metadata", {}).get("tags", [])}
    for ex in ch02.EXERCISES:
        assert {f"exercise-{ex.id}", f"check-{ex.id}"} <= tags, ex.id
