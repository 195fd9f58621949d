"""accuracy, unbiased pass@k and maj@k against hand-computed values."""

import math

import pytest

from megatron_spo.training.eval_metrics import (
    accuracy,
    default_ks,
    maj_at_k,
    maj_at_k_single,
    majority_vote,
    pass_at_k,
    pass_at_k_single,
    summarize,
)


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 1, 0.25),            # pass@1 = c / n
        (4, 1, 2, 1 - 3 / 6),       # 1 - C(3,2)/C(4,2)
        (5, 2, 3, 1 - 1 / 10),      # 1 - C(3,3)/C(5,3)
        (4, 0, 4, 0.0),
        (4, 3, 2, 1.0),             # n - c < k: every pair holds a correct one
        (10, 4, 4, 1 - math.comb(6, 4) / math.comb(10, 4)),
    ],
)
def test_pass_at_k_single(n, c, k, expected):
    assert pass_at_k_single(n, c, k) == pytest.approx(expected)


def test_pass_at_k_large_n_is_stable():
    value = pass_at_k_single(1000, 1, 500)
    assert value == pytest.approx(0.5)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k_single(4, 1, 5)


def test_accuracy_and_pass_at_k_average_over_prompts():
    correct = [[True, False, False, False], [True, True, False, False]]
    assert accuracy(correct) == pytest.approx(3 / 8)
    # prompt 0: 1 - C(3,2)/C(4,2) = 0.5; prompt 1: 1 - C(2,2)/C(4,2) = 5/6
    assert pass_at_k(correct, 2) == pytest.approx((0.5 + 5 / 6) / 2)


def test_majority_vote_ties_go_to_the_earliest_answer():
    answers = ["3", "5", "5", "3", None]
    grades = [True, False, False, True, False]
    assert majority_vote(answers[:4]) == 0  # 2 votes each; "3" voted first
    assert maj_at_k_single(answers, grades, 4) is True
    assert maj_at_k_single(answers, grades, 3) is False  # "5" has 2 of 3 votes
    assert maj_at_k_single(answers, grades, 1) is True
    assert majority_vote(["5", "3", "3", "5"]) == 0  # same tie, "5" first this time


def test_no_answers_means_not_solved_and_key_merges_spellings():
    assert majority_vote([None, None]) is None
    assert maj_at_k_single([None, None], [False, False], 2) is False
    answers, grades = ["8", " 7", "7"], [False, True, True]
    # exact strings: three answers with one vote each -> the earliest ("8", wrong) wins
    assert majority_vote(answers) == 0
    assert maj_at_k([answers], [grades], 3) == 0.0
    # normalised: "7" has two votes
    assert majority_vote(answers, key=str.strip) == 1
    assert maj_at_k([answers], [grades], 3, key=str.strip) == 1.0


def test_summarize_reports_each_k():
    answers = [["1", "2", "1", "1"], ["9", "8", "8", None]]
    correct = [[True, False, True, True], [False, True, True, False]]
    summary = summarize(answers, correct)
    assert summary.num_prompts == 2 and summary.samples_per_prompt == 4
    assert summary.accuracy == pytest.approx(5 / 8)
    assert set(summary.pass_at) == {1, 2, 4} and set(summary.maj_at) == {1, 2, 4}
    assert summary.maj_at[4] == 1.0   # "1" wins prompt 0, "8" wins prompt 1
    assert summary.maj_at[1] == 0.5   # first samples: "1" right, "9" wrong
    assert summary.pass_at[4] == 1.0
    metrics = summary.metrics("val")
    assert metrics["val/maj@4"] == 1.0 and metrics["val/accuracy"] == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="same number"):
        summarize([["1"], ["1", "2"]], [[True], [True, False]])


def test_default_ks():
    assert default_ks(32) == [1, 2, 4, 8, 16, 32]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(1) == [1]
