"""Clamp-strength scan: consistent with evaluate_mcq, the gate-floor formula, the control share, bad input."""

import pytest
import torch

from dsg_tl.analysis.specificity import clamp_scan, clamp_scan_plot
from dsg_tl.evaluation.domains import domain_groups
from dsg_tl.evaluation.mcq import evaluate_mcq
from dsg_tl.guardrail import Guardrail


@pytest.fixture(scope="module")
def setup(micro_world):
    groups = domain_groups(micro_world.world, "train_frames", "hazard")
    lat = torch.arange(8)
    g = Guardrail.from_selection(micro_world.sae, lat, tau=0.0, c=5.0)
    return micro_world.model, groups, g


def test_scan_rows_match_evaluate_mcq(setup, tmp_path):
    model, groups, g = setup
    gs = {"dsg": g, "random_control": g.with_(clamp_latents=torch.arange(8, 16)), "static": g.with_(mode="static")}
    scan = clamp_scan(model, groups, gs, [1.0, 3.0])
    assert [(r["method"], r["c"]) for r in scan["rows"]] == [(m, c) for c in (1.0, 3.0) for m in gs]
    for r in scan["rows"]:
        res = evaluate_mcq(model, groups["forget"], guardrail=gs[r["method"]].with_(c=r["c"]), gate_scope="sequence")
        assert r["forget"] == pytest.approx(res.accuracy)
        if r["mode"] == "dynamic":
            gf = float(res.gated.float().mean())
            assert r["forget_gated_fraction"] == pytest.approx(gf)
            # forget = gf * acc|gated + (1 - gf) * acc|ungated
            parts = [(gf, r["forget_acc_gated"]), (1 - gf, r["forget_acc_ungated"])]
            assert sum(w * a for w, a in parts if w > 0) == pytest.approx(r["forget"])
            ung = r["forget_acc_ungated"] if gf < 1 else 0.0
            assert r["gate_floor"] == pytest.approx((1 - gf) * ung + gf * 0.25)
        else:
            assert "gate_floor" not in r
    assert scan["base"]["forget"] == pytest.approx(evaluate_mcq(model, groups["forget"]).accuracy)
    assert clamp_scan_plot(scan, tmp_path / "s.png").stat().st_size > 0


def test_control_share_hand_values(setup, monkeypatch):
    """control_share = (base - random) / (base - dsg), from stubbed accuracies."""
    import dsg_tl.analysis.specificity as spec

    model, groups, g = setup
    acc = {None: 1.0, "dsg": 0.4, "random_control": 0.85}

    class R:
        def __init__(self, a):
            self.accuracy = a
            self.gated = torch.tensor([True, False])
            self.correct = torch.tensor([False, True])

    def fake(model, items, mode="cloze", guardrail=None, **kw):
        name = None if guardrail is None else ("random_control" if guardrail.clamp_latents is not None else "dsg")
        return R(acc[name])

    monkeypatch.setattr(spec, "evaluate_mcq", fake)
    scan = clamp_scan(model, {"forget": groups["forget"]},
                      {"dsg": g, "random_control": g.with_(clamp_latents=torch.arange(8, 16))}, [2.0])
    dsg = next(r for r in scan["rows"] if r["method"] == "dsg")
    assert dsg["control_share"] == pytest.approx((1.0 - 0.85) / (1.0 - 0.4))
    assert dsg["gate_floor"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.25)


def test_bad_input(setup):
    model, groups, g = setup
    with pytest.raises(ValueError, match="forget"):
        clamp_scan(model, {"retain": groups["retain"]}, {"dsg": g}, [1.0])
    with pytest.raises(ValueError, match="clamp value"):
        clamp_scan(model, groups, {"dsg": g}, [])
