"""Chapter 00's demonstration check accepts a right answer and explains plausible wrong ones."""

import pytest
import torch

from moe_learn.course.checks import CheckFailed
from moe_learn.course.checks.ch00_tour import check_count_tokens


def right(selected, num_experts):
    return torch.bincount(selected.flatten(), minlength=num_experts)


def test_the_right_answer_passes(capsys):
    check_count_tokens(right)
    assert capsys.readouterr().out.startswith("[PASS] 00.0 count_tokens: 10 cases")


def test_bincount_without_minlength_is_explained():
    with pytest.raises(CheckFailed, match=r"returned 3 counts for 4 experts(.|\n)*minlength=num_experts"):
        check_count_tokens(lambda s, e: torch.bincount(s.flatten()))


def test_counting_only_the_first_choice_names_the_expert():
    with pytest.raises(CheckFailed, match=r"expert \d+ got \d+ tokens, expected \d+(.|\n)*top-k choices"):
        check_count_tokens(lambda s, e: torch.bincount(s[:, 0], minlength=e))


def test_float_counts_from_histc_are_rejected():
    with pytest.raises(CheckFailed, match="expected an integer dtype"):
        check_count_tokens(lambda s, e: torch.histc(s.flatten().float(), bins=e, min=0, max=e - 1))


def test_a_crash_names_the_inputs_and_a_stub_stays_not_implemented():
    with pytest.raises(CheckFailed, match="your function raised ZeroDivisionError"):
        check_count_tokens(lambda s, e: 1 / 0)

    def stub(selected, num_experts):
        raise NotImplementedError("exercise 00.0: replace this line with your code")

    with pytest.raises(NotImplementedError, match="exercise 00.0"):
        check_count_tokens(stub)
