"""Pure-Python ROUGE-1 and ROUGE-L, matching the ``rouge_score`` package's defaults (no stemming).

Tokenisation follows ``rouge_score``'s default tokenizer: lowercase, every run of characters outside ``[a-z0-9]``
becomes a space (so punctuation and non-ASCII letters are dropped), split on whitespace. ROUGE-L is the
sentence-level LCS variant (``rougeL``, not ``rougeLsum``). Arguments are ``(prediction, reference)``; recall is
measured against the reference, precision against the prediction. Empty token lists score 0.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["RougeScore", "lcs_length", "rouge1_recall", "rouge_1", "rouge_l", "rouge_l_f1", "tokenize"]

_NON_ALNUM_RE = re.compile(r"[^a-z0-9]+")
_SPACES_RE = re.compile(r"\s+")
_VALID_TOKEN_RE = re.compile(r"^[a-z0-9]+$")


@dataclass(frozen=True)
class RougeScore:
    """Precision, recall and F1 of one prediction against one reference."""

    precision: float
    recall: float
    fmeasure: float


def tokenize(text: str) -> list[str]:
    """``rouge_score``'s default tokenizer without stemming: lowercase alphanumeric runs."""
    text = _NON_ALNUM_RE.sub(" ", text.lower())
    return [tok for tok in _SPACES_RE.split(text) if _VALID_TOKEN_RE.match(tok)]


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a) * len(b)) time, linear memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> RougeScore:
    """ROUGE-L: P = LCS / |prediction|, R = LCS / |reference|, F1 their harmonic mean."""
    pred, ref = tokenize(prediction), tokenize(reference)
    if not pred or not ref:
        return RougeScore(0.0, 0.0, 0.0)
    lcs = lcs_length(pred, ref)
    precision, recall = lcs / len(pred), lcs / len(ref)
    return RougeScore(precision, recall, _f1(precision, recall))


def rouge_1(prediction: str, reference: str) -> RougeScore:
    """ROUGE-1: clipped unigram overlap over |prediction| (precision) and |reference| (recall)."""
    pred, ref = Counter(tokenize(prediction)), Counter(tokenize(reference))
    overlap = sum((pred & ref).values())
    precision = overlap / max(sum(pred.values()), 1)
    recall = overlap / max(sum(ref.values()), 1)
    return RougeScore(precision, recall, _f1(precision, recall))


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference``."""
    return rouge_l(prediction, reference).fmeasure


def rouge1_recall(prediction: str, reference: str) -> float:
    """ROUGE-1 recall: the fraction of the reference's unigrams (with multiplicity) found in ``prediction``."""
    return rouge_1(prediction, reference).recall
