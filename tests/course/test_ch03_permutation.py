"""Chapter 03's checks: the reference answers pass, stubs and plausible wrong answers are rejected."""

import pytest
import torch

from moe_learn import combine, permute, unpermute
from moe_learn.course.checks import CheckFailed
from moe_learn.course.checks import ch03_permutation as ch03

# ------------------------------------------------------------------ the checks


def test_reference_answers_pass_the_checks(capsys):
    ch03.check_permute(permute)
    ch03.check_unpermute(unpermute)
    ch03.check_combine(combine)
    out = capsys.readouterr().out
    assert "[PASS] 03.1" in out and "[PASS] 03.2" in out and "[PASS] 03.3" in out


def test_stubs_raise_not_implemented():
    def stub(*args):
        raise NotImplementedError("exercise 03.1")

    for check in (ch03.check_permute, ch03.check_unpermute, ch03.check_combine):
        with pytest.raises(NotImplementedError):
            check(stub)


def permute_without_div(X, gather_indices, topk):
    return X[gather_indices.long()]


def permute_by_scatter(X, gather_indices, topk):
    out = torch.empty(X.shape[0] * topk, X.shape[1], dtype=X.dtype)
    out[gather_indices.long()] = X.repeat_interleave(topk, dim=0)
    return out


def permute_with_modulo(X, gather_indices, topk):
    return X[gather_indices.long() % X.shape[0]] if X.shape[0] else X.new_empty(0, X.shape[1])


@pytest.mark.parametrize(
    "wrong, pattern",
    [
        (permute_without_div, r"out of bounds.*\n.*\n.*divide by topk"),
        (permute_by_scatter, r"row \d+ of your output holds token \d+'s row, expected token \d+.*\n.*you scattered"),
        (permute_with_modulo, r"03.1: on .*: row \d+ of your output holds token \d+'s row, expected token"),
    ],
)
def test_check_permute_rejects(wrong, pattern):
    with pytest.raises(CheckFailed, match=pattern):
        ch03.check_permute(wrong)


def unpermute_by_gather(X, gather_indices):
    return X[gather_indices.long()]


def unpermute_int32_index(X, gather_indices):
    return torch.empty_like(X).index_copy_(0, gather_indices, X)


def unpermute_misses_last_row(X, gather_indices):
    out = torch.zeros_like(X)
    out[gather_indices[:-1].long()] = X[:-1]
    return out


@pytest.mark.parametrize(
    "wrong, pattern",
    [
        (unpermute_by_gather, r"output row \d+ \(token \d+, slot \d+\) holds row \d+ .*\n.*you gathered"),
        (unpermute_int32_index, r"raised RuntimeError.*\n.*\n.*int64 indices"),
        (unpermute_misses_last_row, r"holds all zeros \(never written\?\).*\n.*never written"),
    ],
)
def test_check_unpermute_rejects(wrong, pattern):
    with pytest.raises(CheckFailed, match=pattern):
        ch03.check_unpermute(wrong)


def combine_unweighted(Y, w):
    return Y.view(w.shape[0], w.shape[1], Y.shape[1]).sum(1)


def combine_slot_major(Y, w):
    T, k = w.shape
    return (Y.view(k, T, Y.shape[1]) * w.T[..., None].to(Y.dtype)).sum(0)


def combine_keeps_float32(Y, w):
    return (Y.view(w.shape[0], w.shape[1], Y.shape[1]) * w[..., None]).sum(1)


@pytest.mark.parametrize(
    "wrong, pattern",
    [
        (combine_unweighted, r"token \d+, column \d+: expected .*, got .*\n.*without multiplying by topk_weights"),
        (combine_slot_major, r"token \d+, column \d+.*\n.*token-major"),
        (combine_keeps_float32, r"has dtype torch.float32, expected torch.float16"),
    ],
)
def test_check_combine_rejects(wrong, pattern):
    with pytest.raises(CheckFailed, match=pattern):
        ch03.check_combine(wrong)


def test_exercises_have_progressive_hints():
    assert [e.id for e in ch03.EXERCISES] == ["03.1", "03.2", "03.3"]
    assert all(2 <= len(e.hints) <= 3 and e.notebook == "03_permutation.ipynb" for e in ch03.EXERCISES)
