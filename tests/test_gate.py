"""dsg_tl.gate: rho per sequence (padding, BOS), tau as a percentile, the FPR/TPR report (literal values)."""

from __future__ import annotations

import beartype
import jaxtyping
import pytest
import torch

from dsg_tl.batching import pad_batch
from dsg_tl.gate import GateReport, calibrate_tau, gate_report, rho

checked = jaxtyping.jaxtyped(typechecker=beartype.beartype)
TYPE_ERRORS = (jaxtyping.TypeCheckError, beartype.roar.BeartypeException)
T, F = True, False


def b(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_rho_excludes_bos():
    # position 0 is BOS (fires but is not counted): 2 of 3 counted tokens fire
    r = rho(b([[F, T, T, F]]), b([[F, T, T, T]]))
    assert r.tolist() == pytest.approx([2 / 3])


def test_rho_padding_on_both_sides_and_all_masked_row():
    fire = b([
        [T, T, T, F, F],  # left padding: pad, BOS, x, y, z -> fire on pad/BOS ignored, 1 of 3
        [T, T, F, T, T],  # right padding: BOS, x, y, pad, pad -> 1 of 2
        [T, T, T, T, T],  # only BOS + padding: no counted token -> 0
        [F, F, F, F, F],  # nothing fires -> 0
    ])
    mask = b([
        [F, F, T, T, T],
        [F, T, T, F, F],
        [F, F, F, F, F],
        [F, T, T, T, T],
    ])
    r = rho(fire, mask)
    assert r.tolist() == pytest.approx([1 / 3, 1 / 2, 0.0, 0.0])
    assert r.dtype == torch.float32 and r.shape == (4,)


def test_rho_with_pad_batch_masks_left_and_right():
    seqs = [[0, 5, 6, 7], [0, 8]]
    for side in ("left", "right"):
        batch = pad_batch(seqs, 2, special_ids=(0, 1), padding_side=side)
        fire = batch.tokens >= 6  # tokens 6, 7, 8 "fire"; the pad token (2) and BOS (0) never do
        fire |= batch.attention_mask == 0  # even if the pad position "fired" it must not count
        assert rho(fire, batch.rho_mask).tolist() == pytest.approx([2 / 3, 1.0])


def test_rho_type_checked():
    fire, mask = b([[F, T, T, F]]), b([[F, T, T, T]])
    assert checked(rho)(fire, mask).tolist() == pytest.approx([2 / 3])
    with pytest.raises(TYPE_ERRORS):
        checked(rho)(b([[F, T, T, F]]), b([[F, T, T]]))  # pos mismatch
    with pytest.raises(TYPE_ERRORS):
        checked(rho)(b([[F, T], [T, T]]), b([[F, T]]))  # batch mismatch
    with pytest.raises(TYPE_ERRORS):
        checked(rho)(torch.ones(1, 4), mask)  # float where bool is declared
    with pytest.raises(TYPE_ERRORS):
        checked(rho)(b([F, T, T, F]), b([F, T, T, T]))  # missing batch dimension


def test_calibrate_tau_is_percentile():
    assert calibrate_tau(torch.tensor([0.1, 0.2, 0.3, 0.4]), 50) == pytest.approx(0.25)
    assert calibrate_tau(torch.arange(20.0) / 20, 95) == pytest.approx(0.9025)
    assert calibrate_tau(torch.tensor([0.4, 0.1, 0.3, 0.2]), 100) == pytest.approx(0.4)
    assert calibrate_tau(torch.tensor([0.0, 0.0, 0.0]), 95) == 0.0


def test_gate_report_fpr_tpr():
    heldout = torch.tensor([0.1, 0.3, 0.2, 0.5])
    forget = torch.tensor([0.3, 0.26, 0.25, 0.1, 0.9])  # 0.25 == tau is NOT above tau
    rep = gate_report(0.25, 95, 40, heldout, forget)
    assert isinstance(rep, GateReport)
    assert rep.tau == 0.25
    assert rep.alpha == pytest.approx(0.05)
    assert rep.retain_fpr == pytest.approx(0.5)  # 0.3, 0.5 of 4
    assert rep.forget_tpr == pytest.approx(0.6)  # 0.3, 0.26, 0.9 of 5
    assert (rep.n_calibration, rep.n_heldout, rep.n_forget) == (40, 4, 5)
    d = rep.to_dict()
    assert d["retain_fpr"] == pytest.approx(0.5) and set(d) == {
        "tau", "alpha", "retain_fpr", "forget_tpr", "n_calibration", "n_heldout", "n_forget"}


def test_gate_report_extremes():
    rep = gate_report(float("inf"), 100, 3, torch.tensor([1.0, 0.0]), torch.tensor([1.0]))
    assert (rep.alpha, rep.retain_fpr, rep.forget_tpr) == (0.0, 0.0, 0.0)
    rep = gate_report(-1.0, 0, 3, torch.tensor([0.0]), torch.tensor([0.0, 0.5]))
    assert (rep.alpha, rep.retain_fpr, rep.forget_tpr) == (1.0, 1.0, 1.0)
