"""dsg_tl.analysis.neyman_pearson: ROC/AUC, TPR at alpha, bootstrap of tau and FPR, TVD, MLR, plots (literals)."""

from __future__ import annotations

import json

import beartype
import jaxtyping
import pytest
import torch

from dsg_tl.analysis.neyman_pearson import (
    auc,
    bootstrap_tau,
    fpr_interval,
    gate_analysis,
    likelihood_ratio_check,
    rho_histogram_plot,
    roc_curve,
    roc_plot,
    statistic_separation,
    total_variation,
    tpr_at_alpha,
)
from dsg_tl.selection import percentile

checked = jaxtyping.jaxtyped(typechecker=beartype.beartype)
TYPE_ERRORS = (jaxtyping.TypeCheckError, beartype.roar.BeartypeException)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def t(xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def test_auc_mann_whitney_with_ties():
    # neg=[0,1,2], pos=[1,2,3]: pos>neg in 1+2+3 = 6 pairs, ties (1,1),(2,2) = 2 pairs -> (6 + 0.5*2) / 9
    assert auc(t([0, 1, 2]), t([1, 2, 3])) == pytest.approx(7 / 9, abs=1e-15)
    assert auc(t([0, 1]), t([2, 3, 4])) == 1.0
    assert auc(t([2, 3, 4]), t([0, 1])) == 0.0
    assert auc(t([1, 1]), t([1, 1, 1])) == 0.5
    # ints work too (raw counts); one pos vs neg=[0,2,2,5]: 1 below, 2 ties -> (1 + 0.5*2) / 4
    assert auc(t([0, 2, 2, 5], torch.long), t([2], torch.long)) == pytest.approx(0.5)


def test_roc_curve_hand_computed_and_trapezoid_equals_auc():
    fpr, tpr, thr = roc_curve(t([0, 1, 2]), t([1, 2, 3]))
    # rule "score > t": t=+inf and t=3 -> nothing positive; t=2 -> pos {3}; t=1 -> neg {2}, pos {2,3}; ...
    assert thr.tolist() == [float("inf"), 3.0, 2.0, 1.0, 0.0, float("-inf")]
    assert fpr.tolist() == pytest.approx([0, 0, 0, 1 / 3, 2 / 3, 1])
    assert tpr.tolist() == pytest.approx([0, 0, 1 / 3, 2 / 3, 1, 1])
    assert float(torch.trapezoid(tpr, fpr)) == pytest.approx(7 / 9)
    g = torch.Generator().manual_seed(0)
    neg, pos = torch.randint(0, 6, (50,), generator=g), torch.randint(2, 9, (40,), generator=g)  # many ties
    fpr, tpr, _ = roc_curve(neg, pos)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert float(torch.trapezoid(tpr, fpr)) == pytest.approx(auc(neg, pos), abs=1e-12)


def test_rejects_empty_nan_and_wrong_rank():
    with pytest.raises(ValueError, match="empty"):
        auc(t([]), t([1]))
    with pytest.raises(ValueError, match="NaN"):
        roc_curve(t([0.0, float("nan")]), t([1]))
    with pytest.raises(TYPE_ERRORS):
        checked(auc)(t([[0.0, 1.0]]), t([1.0]))
    assert checked(auc)(t([0.0]), t([1.0])) == 1.0


def test_tpr_at_alpha_linear_percentile():
    neg, pos = t([0, 1, 2, 3, 4]), t([2, 3, 3.5, 5])
    # alpha 0.25 -> 75th percentile: position 0.75*4 = 3 -> tau 3; neg>3: {4}; pos>3: {3.5, 5}
    tau, fpr, tpr = tpr_at_alpha(neg, pos, 0.25)
    assert (tau, fpr, tpr) == pytest.approx((3.0, 0.2, 0.5))
    # alpha 0.1 -> 90th: position 3.6 -> tau 3.6 (interpolated); FPR 1/5 > alpha (n = 5 is too small)
    tau, fpr, tpr = tpr_at_alpha(neg, pos, 0.1)
    assert (tau, fpr, tpr) == pytest.approx((3.6, 0.2, 0.25))
    assert tau == percentile(neg, 90.0)


def test_total_variation_literals():
    a, b = t([0, 0, 1, 1]), t([0, 1, 1, 1])
    # bins [0, .5), [.5, 1]: p = (.5, .5), q = (.25, .75) -> 0.5 * (.25 + .25)
    assert total_variation(a, b, t([0, 0.5, 1])) == pytest.approx(0.25)
    assert total_variation(a, b, 2) == pytest.approx(0.25)  # equal-width over the pooled range [0, 1]
    assert total_variation(a, a, 5) == 0.0
    assert total_variation(t([0, 0]), t([1, 1]), 4) == 1.0
    assert total_variation(t([3, 3]), t([3]), 4) == 0.0  # constant data: one occupied bin
    with pytest.raises(ValueError, match="outside"):
        total_variation(a, t([2]), t([0, 0.5, 1]))


def test_statistic_separation_rho_vs_count():
    # same raw counts, but retain sequences are twice as long: rho separates fully, the count not at all
    out = statistic_separation(t([2, 4]), t([4, 8]), t([2, 4]), t([8, 16]), bins=4)
    assert out["tvd_rho"] == 1.0 and out["tvd_count"] == 0.0
    assert out["auc_rho"] == 1.0 and out["auc_count"] == 0.5
    with pytest.raises(ValueError, match="length"):
        statistic_separation(t([5]), t([4]), t([1]), t([2]))


def test_likelihood_ratio_monotone_case():
    neg, pos = t([0, 0, 0, 1, 1, 2]), t([1, 2, 2, 2, 3, 3])
    # pooled sorted 0,0,0,1,1,1,2,2,2,2,3,3; median at position 5.5 -> 1.5; edges [0, 1.5, 3]
    r = likelihood_ratio_check(neg, pos, bins=2)
    assert r.edges == [0.0, 1.5, 3.0]
    assert (r.neg_counts, r.pos_counts) == ([5, 1], [1, 5])
    # K = 2, n = 6 on both sides: LR = (c_pos + .5) / (c_neg + .5)
    assert r.likelihood_ratio == pytest.approx([1.5 / 5.5, 5.5 / 1.5])
    assert r.monotone and r.decreasing_bins == []


def test_likelihood_ratio_detects_a_decrease():
    neg, pos = t([1, 1, 1, 2, 2, 3]), t([0, 0, 2, 3, 3, 3])
    # pooled 0,0,1,1,1,2,2,2,3,3,3,3; quartiles at positions 2.75, 5.5, 8.25 -> 1, 2, 3 (3 repeats: dropped)
    r = likelihood_ratio_check(neg, pos, bins=4)
    assert r.edges == [0.0, 1.0, 2.0, 3.0]
    assert (r.neg_counts, r.pos_counts) == ([0, 3, 3], [2, 0, 4])
    assert r.likelihood_ratio == pytest.approx([2.5 / 0.5, 0.5 / 3.5, 4.5 / 3.5])
    assert not r.monotone and r.decreasing_bins == [1]
    json.dumps(r.to_dict())


def test_bootstrap_tau_reproducible_and_matches_resample_percentiles():
    x = t([0.0, 0.1, 0.2, 0.4, 0.8])
    r1, r2 = bootstrap_tau(x, 80.0, n_boot=4, seed=3), bootstrap_tau(x, 80.0, n_boot=4, seed=3)
    assert torch.equal(r1.taus, r2.taus)
    assert r1.tau == percentile(x, 80.0) == pytest.approx(0.48)  # position 3.2 -> 0.4 + 0.2 * 0.4
    idx = torch.randint(5, (4, 5), generator=torch.Generator().manual_seed(3))
    assert r1.taus.tolist() == pytest.approx([percentile(x.double()[i], 80.0) for i in idx])
    assert not torch.equal(bootstrap_tau(x, 80.0, n_boot=4, seed=4).taus, r1.taus)
    g = torch.Generator().manual_seed(0)
    big = bootstrap_tau(torch.rand(500, generator=g), 95.0, n_boot=200, seed=0)
    assert big.lo <= big.tau <= big.hi and big.lo < big.hi
    assert big.to_dict()["n_boot"] == 200


def test_fpr_interval_covers_nominal_alpha_on_a_large_sample():
    # a fixed draw; over data seeds 0..99 (n_boot 200) this interval held alpha in 96 of 100 (checked offline)
    g = torch.Generator().manual_seed(0)
    cal, held = torch.rand(4000, generator=g) ** 2, torch.rand(4000, generator=g) ** 2  # known law: U^2
    r = fpr_interval(cal, held, 95.0, n_boot=300, seed=0)
    assert r.alpha == pytest.approx(0.05)
    assert r.tau == pytest.approx(percentile(cal, 95.0))
    assert abs(r.fpr - 0.05) < 0.015 and r.lo < r.hi
    assert r.nominal_inside and r.lo <= 0.05 <= r.hi
    fixed = fpr_interval(cal, held, 95.0, n_boot=300, seed=0, resample_heldout=False)
    assert fixed.fpr == r.fpr and fixed.hi - fixed.lo < r.hi - r.lo  # calibration noise only: narrower
    json.dumps(r.to_dict())


def test_plots_write_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    rhos = {"forget": torch.rand(30, generator=g) * 0.5 + 0.5, "retain": torch.rand(30, generator=g) * 0.5}
    p = rho_histogram_plot(rhos, 0.45, tmp_path / "sub" / "h.png", "toy")
    fpr, tpr, _ = roc_curve(rhos["retain"], rhos["forget"])
    q = roc_plot({"forget vs retain": (fpr, tpr, auc(rhos["retain"], rhos["forget"]))}, 0.05, tmp_path / "r.png")
    for f in (p, q):
        assert f.stat().st_size > 1000 and f.read_bytes()[:8] == PNG_MAGIC


def test_gate_analysis_json_and_plots(tmp_path):
    g = torch.Generator().manual_seed(7)
    rhos = {"calibration": torch.rand(200, generator=g) * 0.4, "heldout_retain": torch.rand(200, generator=g) * 0.4,
            "forget": 0.3 + torch.rand(100, generator=g) * 0.7}
    out = gate_analysis(rhos, p_dyn=90.0, out_dir=tmp_path, n_boot=100, mlr_bins=5)
    json.dumps(out)
    assert out["tau"] == pytest.approx(percentile(rhos["calibration"], 90.0))
    assert out["alpha"] == pytest.approx(0.1) and out["missing"] == ["adjacent"]
    assert set(out["auc"]["forget"]) == {"heldout_retain"} and out["auc"]["forget"]["heldout_retain"] > 0.9
    assert out["tpr"]["forget"]["tpr"] == out["gate_rate"]["forget"] > 0.8
    assert out["tau_ci"][0] <= out["tau"] <= out["tau_ci"][1]
    assert out["fpr"]["fpr"] == out["gate_rate"]["heldout_retain"]
    assert out["mlr"]["forget"]["likelihood_ratio"]
    for f in out["plots"].values():
        assert open(f, "rb").read(8) == PNG_MAGIC
    with pytest.raises(KeyError):
        gate_analysis({"forget": rhos["forget"]})
