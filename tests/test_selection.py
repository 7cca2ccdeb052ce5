"""dsg_tl.selection: percentile, forget scores, ratio with dead latents, thresholding and top-N (literal values)."""

from __future__ import annotations

import beartype
import jaxtyping
import pytest
import torch

from dsg_tl.selection import (
    FeatureSelection,
    forget_score,
    frequency_matched_random,
    percentile,
    select_features,
    top_by_score,
)
from dsg_tl.stats import LatentStats

checked = jaxtyping.jaxtyped(typechecker=beartype.beartype)
TYPE_ERRORS = (jaxtyping.TypeCheckError, beartype.roar.BeartypeException)


def stats(mean, mean_sq, freq=None, n=10) -> LatentStats:
    mean = torch.tensor(mean, dtype=torch.float32)
    freq = torch.zeros_like(mean) if freq is None else torch.tensor(freq, dtype=torch.float32)
    return LatentStats(mean, torch.tensor(mean_sq, dtype=torch.float32), freq, n)


# ------------------------------------------------------------------------------------------------- percentile


def test_percentile_linear_interpolation():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert percentile(x, 50) == pytest.approx(2.5)
    assert percentile(x, 25) == pytest.approx(1.75)
    assert percentile(x, 0) == 1.0
    assert percentile(x, 100) == 4.0
    assert percentile(torch.arange(20.0), 95) == pytest.approx(18.05)
    assert percentile(torch.tensor([4.0, 1.0, 3.0, 2.0]), 50) == pytest.approx(2.5)  # order does not matter
    assert percentile(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 50) == pytest.approx(2.5)  # flattened
    assert percentile(torch.tensor([7.0]), 95) == 7.0
    assert isinstance(percentile(x, 50), float)


def test_percentile_of_empty_raises():
    with pytest.raises(ValueError):
        percentile(torch.tensor([]), 50)


# ------------------------------------------------------------------------------------------------- scores


def test_forget_score_formulas():
    s = stats(mean=[1.0, -2.0, 0.0, 0.5], mean_sq=[3.0, 5.0, 0.5, 0.25])
    assert forget_score(s, "fisher").tolist() == [3.0, 5.0, 0.5, 0.25]  # E[a^2]
    assert forget_score(s, "mean_squared").tolist() == [1.0, 4.0, 0.0, 0.25]  # (E[a])^2
    with pytest.raises(ValueError):
        forget_score(s, "variance")


def test_forget_score_fisher_is_a_copy():
    s = stats(mean=[1.0], mean_sq=[3.0])
    f = forget_score(s, "fisher")
    f += 1
    assert s.mean_sq.tolist() == [3.0]


def test_forget_score_is_jaxtyping_checked():
    s = stats(mean=[1.0, 2.0], mean_sq=[1.0, 4.0])
    assert checked(forget_score)(s, "fisher").tolist() == [1.0, 4.0]


# ------------------------------------------------------------------------------------------------- selection

#                  latent: 0    1    2    3    4    5
FORGET = stats(mean=[0.0, -2.0, 1.0, 2.0, 0.5, 0.0], mean_sq=[0.0, 4.0, 2.0, 4.0, 1.0, 0.5])
RETAIN = stats(mean=[0.0, 1.0, 0.0, 1.0, 1.0, 0.5], mean_sq=[0.0, 1.0, 0.0, 2.0, 4.0, 0.5])
# fisher ratios F/(R + 1e-8): [0, 4, 2e8, 2, 0.25, 1]  -> sorted [0, 0.25, 1, 2, 4, 2e8]


def test_ratios_with_dead_latents():
    sel = select_features(FORGET, RETAIN, n_features=6, p_ratio=0)
    r = sel.ratios.tolist()
    assert r[0] == 0.0  # forget 0 and retain 0 -> ratio 0 (not NaN)
    assert r[1] == pytest.approx(4.0)
    assert r[2] == pytest.approx(2e8, rel=1e-5)  # retain 0, forget 2 -> 2 / 1e-8
    assert r[3] == pytest.approx(2.0)
    assert r[4] == pytest.approx(0.25)
    assert r[5] == pytest.approx(1.0)
    assert not torch.isnan(sel.ratios).any()
    # p_ratio 0 keeps every latent with forget > 0; the dead latent 0 is never selected; ties (1, 3) -> lower first
    assert sel.ratio_threshold == 0.0
    assert sel.latents.tolist() == [1, 3, 2, 4, 5]
    assert sel.forget_scores.tolist() == [0.0, 4.0, 2.0, 4.0, 1.0, 0.5]
    assert sel.retain_scores.tolist() == [0.0, 1.0, 0.0, 2.0, 4.0, 0.5]


def test_ratio_percentile_threshold_and_top_n():
    sel = select_features(FORGET, RETAIN, n_features=2, p_ratio=50)
    assert sel.ratio_threshold == pytest.approx(1.5)  # 50th of [0, .25, 1, 2, 4, 2e8]
    # candidates: ratio >= 1.5 -> {1, 2, 3}; by forget score 4 (1), 4 (3), 2 (2); ties -> lower index
    assert sel.latents.tolist() == [1, 3]
    assert select_features(FORGET, RETAIN, n_features=10, p_ratio=50).latents.tolist() == [1, 3, 2]
    sel70 = select_features(FORGET, RETAIN, n_features=10, p_ratio=70)
    assert sel70.ratio_threshold == pytest.approx(3.0)  # between 2 and 4
    assert sel70.latents.tolist() == [1, 2]
    sel100 = select_features(FORGET, RETAIN, n_features=10, p_ratio=100)
    assert sel100.latents.tolist() == [2]  # only the latent never seen on retain


def test_dead_latent_never_selected_even_if_everything_is_dead():
    dead = stats(mean=[0.0, 0.0], mean_sq=[0.0, 0.0])
    assert select_features(dead, dead, n_features=2, p_ratio=0).latents.tolist() == []


def test_mean_squared_formula():
    sel = select_features(FORGET, RETAIN, n_features=10, p_ratio=50, formula="mean_squared")
    # F' = [0, 4, 1, 4, .25, 0]; R' = [0, 1, 0, 1, 1, .25]; ratios [0, 4, 1e8, 4, .25, 0]
    assert sel.forget_scores.tolist() == [0.0, 4.0, 1.0, 4.0, 0.25, 0.0]
    assert sel.ratios[2].item() == pytest.approx(1e8, rel=1e-5)
    assert sel.ratio_threshold == pytest.approx(2.125)  # 50th of [0, 0, .25, 4, 4, 1e8]
    assert sel.latents.tolist() == [1, 3, 2]
    assert sel.formula == "mean_squared"


def test_select_features_validates():
    with pytest.raises(ValueError):
        select_features(FORGET, stats(mean=[0.0], mean_sq=[0.0]), n_features=1, p_ratio=50)
    with pytest.raises(ValueError):
        select_features(FORGET, RETAIN, n_features=0, p_ratio=50)


def test_top_by_score_ties_lower_index_first():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0])
    assert top_by_score(scores, torch.ones(5, dtype=torch.bool), 3).tolist() == [1, 2, 4]
    cands = torch.tensor([True, True, False, True, True])
    assert top_by_score(scores, cands, 3).tolist() == [1, 4, 0]
    assert top_by_score(scores, cands, 10).tolist() == [1, 4, 0, 3]
    # many equal scores: still ascending index (stable sort)
    assert top_by_score(torch.zeros(40), torch.ones(40, dtype=torch.bool), 40).tolist() == list(range(40))
    out = checked(top_by_score)(scores, cands, 2)
    assert out.dtype == torch.long


def test_explain_and_summary():
    sel = select_features(FORGET, RETAIN, n_features=2, p_ratio=50)
    assert isinstance(sel, FeatureSelection)
    rows = sel.explain()
    assert [r["latent"] for r in rows] == [1, 3] and [r["rank"] for r in rows] == [0, 1]
    assert rows[0]["forget_score"] == 4.0 and rows[0]["retain_score"] == 1.0
    assert rows[1]["ratio"] == pytest.approx(2.0)
    assert len(sel.explain(1)) == 1
    s = sel.summary()
    assert s["latents"] == [1, 3] and s["formula"] == "fisher" and s["n_features"] == 2 and s["p_ratio"] == 50


# ------------------------------------------------------------------------------------------------- random control


def test_frequency_matched_random():
    freq = torch.tensor([0.0] + [i / 40 for i in range(1, 40)])  # latent 0 dead, others strictly increasing
    selected = torch.tensor([10, 11, 30])
    out = frequency_matched_random(freq, selected, seed=3, exclude=torch.tensor([9]))
    assert out.dtype == torch.long and len(out) == 3
    assert len(set(out.tolist())) == 3
    assert not set(out.tolist()) & {10, 11, 30, 9, 0}
    for s, r in zip(selected.tolist(), out.tolist()):
        assert abs(s - r) <= 7  # a neighbour in frequency rank
    assert torch.equal(out, frequency_matched_random(freq, selected, seed=3, exclude=torch.tensor([9])))


def test_type_checks_reject_wrong_shapes():
    with pytest.raises(TYPE_ERRORS):
        checked(top_by_score)(torch.zeros(3), torch.ones(3, dtype=torch.bool), "2")
