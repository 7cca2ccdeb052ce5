"""Sequential unlearning: merged-union composition of guardrails, per-domain accuracies, the study's structure."""

import pytest
import torch

from dsg_tl.analysis.sequential import (
    SequentialConfig,
    SequentialResult,
    StackedGuardrails,
    merge_guardrails,
    retain_bar,
    run_sequential,
    sequential_plot,
    union_latents,
)
from dsg_tl.baselines.rmu import RMUConfig
from dsg_tl.calibrate import encode_texts, sequence_rho
from dsg_tl.gate import calibrate_tau
from dsg_tl.guardrail import Guardrail
from dsg_tl.pipeline import DSGConfig, world_corpora
from dsg_tl.world.facts import DOMAINS


def test_union_latents_by_hand():
    assert union_latents([torch.tensor([3, 1, 2]), torch.tensor([2, 5])]).tolist() == [1, 2, 3, 5]
    with pytest.raises(ValueError):
        union_latents([])


def test_config_validation():
    with pytest.raises(ValueError, match="requests"):
        SequentialConfig(requests=("hazard", "geography"))
    with pytest.raises(ValueError, match="requests"):
        SequentialConfig(requests=("hazard", "hazard"))
    with pytest.raises(ValueError, match="baselines"):
        SequentialConfig(baselines=("npo",))


@pytest.fixture(scope="module")
def parts(micro_world):
    sae = micro_world.sae
    return [Guardrail.from_selection(sae, torch.tensor([0, 1, 2, 3]), tau=0.1, c=5.0),
            Guardrail.from_selection(sae, torch.tensor([3, 4, 5, 6]), tau=0.1, c=5.0)]


@pytest.fixture(scope="module")
def seqs(micro_world):
    c = world_corpora(micro_world.world, "hazard")
    tok = micro_world.model.tokenizer
    return {"calibration": encode_texts(tok, c.calibration, 64), "heldout": encode_texts(tok, c.heldout_retain, 64),
            "forget": encode_texts(tok, c.forget_eval, 64)}


def test_merge_is_union_with_recalibrated_tau(micro_world, parts, seqs):
    model = micro_world.model
    merged, report = merge_guardrails(model, parts, p_dyn=80.0, **seqs)
    assert merged.gate_latents.tolist() == [0, 1, 2, 3, 4, 5, 6] and merged.clamp.tolist() == [0, 1, 2, 3, 4, 5, 6]
    # rho of the union is the fraction of tokens where ANY union latent fires: >= each part's rho, sequence by sequence
    r = {i: sequence_rho(model, g, seqs["calibration"]) for i, g in enumerate(parts)}
    ru = sequence_rho(model, merged, seqs["calibration"])
    assert (ru >= torch.maximum(r[0], r[1]) - 1e-6).all()
    # tau: the p_dyn percentile of the merged rho on the calibration set (level alpha = 0.2)
    assert merged.tau == pytest.approx(calibrate_tau(ru, 80.0))
    assert report.tau == pytest.approx(merged.tau) and report.alpha == pytest.approx(0.2)
    assert merged.meta["composition"].startswith("union")
    # the merged guardrail is one guardrail: attaching two at one hook point is refused by the guardrail module
    with merged.attach(model), pytest.raises(RuntimeError, match="already attached"), parts[0].attach(model):
        pass


def test_stacked_guardrails_apply_each_gate_in_order(micro_world, parts):
    from dsg_tl.evaluation.mcq import evaluate_mcq

    model = micro_world.model
    items = list(micro_world.world.mcq["train_frames"]["hazard"])
    g = parts[0].with_(tau=0.0, c=50.0)
    never = parts[1].with_(tau=2.0)  # rho <= 1: never gates, passes h through exactly
    alone = evaluate_mcq(model, items, guardrail=g, gate_scope="sequence")
    stacked = evaluate_mcq(model, items, guardrail=StackedGuardrails((never, g)), gate_scope="sequence")
    assert torch.equal(stacked.choice_scores, alone.choice_scores)
    assert torch.equal(stacked.gated, alone.gated)  # gated = gated by any request
    assert not any("dsg" in n for n, _ in model.named_modules())  # the stack's hook is removed on exit
    both = evaluate_mcq(model, items, guardrail=StackedGuardrails((g, g.with_(gate_latents=torch.tensor([4, 5])))),
                        gate_scope="sequence")
    assert not torch.equal(both.choice_scores, alone.choice_scores)
    assert torch.equal(evaluate_mcq(model, items).choice_scores, evaluate_mcq(model, items).choice_scores)
    with pytest.raises(ValueError, match="one hook point"):
        StackedGuardrails((g, g.with_(hook_name="blocks.1.hook_resid_post")))


def test_merge_rejects_mismatched_parts(micro_world, parts, seqs):
    with pytest.raises(ValueError, match="differ in c"):
        merge_guardrails(micro_world.model, [parts[0], parts[1].with_(c=9.0)], p_dyn=95.0, **seqs)
    with pytest.raises(ValueError, match="at least one"):
        merge_guardrails(micro_world.model, [], p_dyn=95.0, **seqs)


def test_run_sequential_structure(micro_world, tmp_path):
    cfg = SequentialConfig(rmu=RMUConfig(layer=0, lr=1e-3, steps=2, batch_size=2, chunk_len=16, steering_coeff=5.0),
                           baselines=("rmu",))
    dsg = DSGConfig(n_features=4, chunk_len=16, calibration_max_len=64)
    res = run_sequential(micro_world, dsg, cfg, cache_dir=None, progress=False)
    assert set(res.stages) == {"dsg_union", "dsg_stacked", "rmu"}
    for st in res.stages.values():
        assert len(st) == 3 and set(st[0]) == {*DOMAINS, "retain"}
        assert st[0] == res.stages["dsg_union"][0]  # every method starts from the same base model
    # after one request there is nothing to combine: both compositions deploy the same guardrail
    assert res.stages["dsg_union"][1] == res.stages["dsg_stacked"][1]
    first, second = res.latents
    assert second["deployed_gate"] == sorted(set(first["own"]) | set(second["own"]))
    assert first["deployed_gate"] == sorted(first["own"]) or set(first["deployed_gate"]) == set(first["own"])
    assert [c["request"] for c in res.costs["rmu"]] == ["hazard", "exploits"]
    d = res.to_dict()
    assert d["drift"]["dsg_union"][0] == 0.0 and len(d["drift"]["rmu"]) == 3
    bar = retain_bar(res)
    assert bar["passes"] == (bar["final_retain"] >= 0.97 * bar["base_retain"])
    assert sequential_plot(res, cfg.requests, tmp_path / "s.png").stat().st_size > 0


def test_retain_bar_toy():
    base = {"retain": 0.9}
    res = SequentialResult({"dsg": [base, {"retain": 0.89}, {"retain": 0.88}]}, [], [], {}, 0.0)
    bar = retain_bar(res, "dsg")
    assert bar["passes"] and bar["ratio"] == pytest.approx(0.88 / 0.9)  # 0.88 >= 0.97 * 0.9 = 0.873
    assert res.drift()["dsg"] == pytest.approx([0.0, -0.01, -0.02])
    res.stages["dsg"][-1] = {"retain": 0.86}
    assert not retain_bar(res, "dsg")["passes"]
