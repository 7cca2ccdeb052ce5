"""ROUGE-1 / ROUGE-L against hand-computed values (rouge_score default tokenizer, no stemming)."""

from __future__ import annotations

import pytest

from dsg_tl.evaluation.rouge import (
    RougeScore,
    lcs_length,
    rouge1_recall,
    rouge_1,
    rouge_l,
    rouge_l_f1,
    tokenize,
)


def test_tokenize_like_rouge_score() -> None:
    assert tokenize("The Cat, sat!") == ["the", "cat", "sat"]
    assert tokenize("Don't stop-believing  in 2024.") == ["don", "t", "stop", "believing", "in", "2024"]
    assert tokenize("café naïve") == ["caf", "na", "ve"]  # non-ASCII letters are separators, as in rouge_score
    assert tokenize("  ...  ") == []
    assert tokenize("") == []


def test_lcs_length() -> None:
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length(["a", "b", "c"], ["c", "b", "a"]) == 1
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(list("abc"), list("abc")) == 3


def test_rouge_l_worked_example() -> None:
    # prediction "the cat on the mat" (5 tokens), reference "the cat sat on the mat" (6): LCS 5
    score = rouge_l("the cat on the mat", "the cat sat on the mat")
    assert score.precision == pytest.approx(5 / 5)
    assert score.recall == pytest.approx(5 / 6)
    assert score.fmeasure == pytest.approx(10 / 11)
    assert rouge_l_f1("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l_f1("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)  # F1 is symmetric


def test_rouge_l_non_contiguous_and_order() -> None:
    # LCS of "a b c d e" and "a x c y e" is "a c e": P = R = 3/5
    assert rouge_l("a b c d e", "a x c y e") == RougeScore(0.6, 0.6, pytest.approx(0.6))
    # reversed order keeps only one in-order match: P = R = 1/3
    assert rouge_l_f1("a b c", "c b a") == pytest.approx(1 / 3)
    # case and punctuation do not matter
    assert rouge_l_f1("The Cat!", "the cat") == 1.0


def test_rouge_1() -> None:
    assert rouge1_recall("the cat on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    clipped = rouge_1("the the the", "the cat")  # overlap clipped to min(3, 1) = 1
    assert clipped.precision == pytest.approx(1 / 3) and clipped.recall == pytest.approx(1 / 2)
    assert clipped.fmeasure == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert rouge1_recall("c b a", "a b c") == 1.0  # unigrams ignore order
    # recall is measured against the reference: 2 of its 4 tokens appear in the prediction
    assert rouge1_recall("Paris France", "Paris is in France") == pytest.approx(2 / 4)


@pytest.mark.parametrize(("pred", "ref"), [("", "the cat"), ("the cat", ""), ("!!!", "..."), ("", "")])
def test_empty_scores_zero(pred: str, ref: str) -> None:
    assert rouge_l(pred, ref) == RougeScore(0.0, 0.0, 0.0)
    assert rouge_1(pred, ref) == RougeScore(0.0, 0.0, 0.0)
    assert rouge_l_f1(pred, ref) == 0.0 and rouge1_recall(pred, ref) == 0.0


def test_no_overlap() -> None:
    assert rouge_l_f1("alpha beta", "gamma delta") == 0.0
    assert rouge1_recall("alpha beta", "gamma delta") == 0.0
