"""dsg_tl.attacks.evasion on the micro world: the prompt transforms, the one-pass evaluation of several gate variants
(equal to evaluate_mcq with the dynamic guardrail when the input fits), inputs longer than the context, the report."""

from __future__ import annotations

import json

import pytest
import torch

from dsg_tl.attacks.evasion import (
    EvasionConfig,
    EvasionReport,
    calibrated_variants,
    cloze_sequences,
    dilute,
    evaluate_attack,
    fit_to_context,
    make_attacks,
    run_evasion,
    sample_groups,
    split_items,
    split_question,
)
from dsg_tl.evaluation.mcq import evaluate_mcq
from dsg_tl.gate import GateSpec


@pytest.fixture(scope="module")
def fit(micro_world):
    from dsg_tl.pipeline import DSGConfig, fit_dsg, world_corpora

    corpora = world_corpora(micro_world.world)
    cfg = DSGConfig(n_features=4, p_ratio=80.0, chunk_len=16, p_dyn=80.0)
    return fit_dsg(micro_world.model, micro_world.sae, corpora, cfg, progress=False), corpora


def _tok_len(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_split_question_hand_made():
    assert split_question("a b c d e", 3) == "a b\nc d\ne"
    assert split_question("a b c d e", 2, " | ") == "a b c | d e"
    assert split_question("a b c d e", 3, "\n", ["F1.", "F2."]) == "a b\nF1.\nc d\nF2.\ne"
    assert split_question("a b", 3) == "a\nb"  # fewer words than turns: one word per turn


def test_dilution_lengthens_prompts_as_specified(micro_world, fit):
    tok = micro_world.model.tokenizer
    _, corpora = fit
    items = list(micro_world.world.mcq["train_frames"]["hazard"][:6])
    for n in (5, 40, 200):
        attacked = dilute(items, tok, corpora.heldout_retain, n, seed=0)
        for before, after in zip(items, attacked, strict=True):
            assert after.question.endswith(before.question.strip())
            assert (after.choices, after.answer) == (before.choices, before.answer)
            added = _tok_len(tok, after.question) - _tok_len(tok, before.question)
            assert n - 2 <= added <= n + 2  # n benign tokens (+-1 where the texts join)
    assert dilute(items, tok, corpora.heldout_retain, 40, seed=0) == dilute(items, tok, corpora.heldout_retain, 40, 0)
    assert dilute(items, tok, corpora.heldout_retain, 40, seed=1) != dilute(items, tok, corpora.heldout_retain, 40, 0)


def test_split_produces_turns(micro_world, fit):
    _, corpora = fit
    items = list(micro_world.world.mcq["train_frames"]["hazard"][:5])
    for turns in (2, 3):
        plain = split_items(items, turns)
        filled = split_items(items, turns, "\n", corpora.heldout_retain)
        for it, p, f in zip(items, plain, filled, strict=True):
            assert p.question.count("\n") == turns - 1 and p.question.replace("\n", " ") == it.question.strip()
            assert f.question.count("\n") == 2 * (turns - 1)
            assert f.question.endswith(p.question.split("\n")[-1])  # the question's last part comes last


def test_fit_to_context_cuts_only_long_prompts(micro_world, fit):
    tok = micro_world.model.tokenizer
    _, corpora = fit
    n_ctx = micro_world.model.cfg.n_ctx
    items = list(micro_world.world.mcq["train_frames"]["hazard"][:4])
    long = dilute(items, tok, corpora.heldout_retain, 3 * n_ctx)
    fitted, cut = fit_to_context(items + long, tok, n_ctx)
    assert cut == len(long) and fitted[: len(items)] == items
    for it in fitted:
        for seq in cloze_sequences(tok, [it], "sequence")[0]:
            assert len(seq) <= n_ctx
    for before, after in zip(long, fitted[len(items):], strict=True):
        assert before.question.endswith(after.question.split(" ", 1)[-1])  # the tail (with the question) is kept


@pytest.mark.parametrize("scope", ["sequence", "question"])
def test_evaluate_attack_equals_evaluate_mcq_when_inputs_fit(micro_world, fit, scope):
    model = micro_world.model
    dsg, corpora = fit
    items = list(micro_world.world.mcq["train_frames"]["hazard"]) + list(micro_world.world.mcq["train_frames"]["geography"])
    items = items + dilute(items[:6], model.tokenizer, corpora.heldout_retain, 12)
    # a tau that gates some items but not all (the fitted one, or the median gate statistic)
    variants = {"fraction": dsg.guardrail, "windowed4": dsg.guardrail.with_(gate=GateSpec("windowed", window=4)),
                "hybrid": dsg.guardrail.with_(gate=GateSpec("hybrid", k_min=3))}
    out = evaluate_attack(model, variants, items, gate_scope=scope, batch_size=16)
    any_split = False
    for label, g in variants.items():
        outcome, result = out[label]
        direct = evaluate_mcq(model, items, "cloze", guardrail=g, batch_size=7, gate_scope=scope)
        torch.testing.assert_close(result.choice_scores, direct.choice_scores, atol=1e-4, rtol=1e-4)
        assert torch.equal(result.gated, direct.gated)
        assert outcome.accuracy == pytest.approx(direct.accuracy)
        assert outcome.gate_rate == pytest.approx(float(direct.gated.float().mean()))
        assert outcome.n_cut == 0 and outcome.n == len(items)
        any_split |= bool(direct.gated.any()) and not bool(direct.gated.all())
    assert any_split  # the comparison covered gated and ungated items


def test_gate_sees_the_whole_input_beyond_the_context(micro_world, fit):
    """Beyond n_ctx the model answers from the tail, but the gate counts every token: with a huge benign prefix the
    fraction gate passes items it gated, and the guarded scores of passed items are the bare ones."""
    model = micro_world.model
    dsg, corpora = fit
    g = dsg.guardrail.with_(tau=0.0)  # gate anything with one firing token
    items = list(micro_world.world.mcq["train_frames"]["hazard"][:6])
    long = dilute(items, model.tokenizer, corpora.heldout_retain, 4 * model.cfg.n_ctx)
    out = evaluate_attack(model, {"fraction": g, "never": g.with_(tau=float("inf"))}, long, batch_size=8)
    o_never, r_never = out["never"]
    assert o_never.n_cut == len(items) and o_never.gate_rate == 0.0
    bare = evaluate_mcq(model, fit_to_context(long, model.tokenizer, model.cfg.n_ctx)[0], "cloze")
    torch.testing.assert_close(r_never.choice_scores, bare.choice_scores)
    assert o_never.prompt_tokens > 4 * model.cfg.n_ctx


def test_run_evasion_report(micro_world, fit):
    model = micro_world.model
    dsg, corpora = fit
    cfg = EvasionConfig(dilution_lengths=(100,), split_turns=(2,), max_items=4, batch_size=16, windows=(4, 8),
                        groups=("forget", "adjacent"))
    guardrails, infos = calibrated_variants(model, dsg.guardrail, corpora, cfg, p_dyn=80.0, max_len=64)
    assert set(guardrails) == {"fraction", "windowed4", "windowed8", "per_turn", "hybrid"}
    assert guardrails["fraction"].tau == pytest.approx(dsg.guardrail.tau)  # the same calibration as the fit
    assert infos["fraction"].retain_fpr == pytest.approx(dsg.gate.retain_fpr)
    assert infos["hybrid"].k_min is not None and infos["per_turn"].separator_ids
    report = run_evasion(model, guardrails, infos, micro_world.world, forget_domain="hazard",
                         benign=corpora.heldout_retain, cfg=cfg, progress=False)
    assert isinstance(report, EvasionReport)
    names = [a.name for a in make_attacks(cfg)]
    assert names == ["none", "paraphrase", "dilution_100", "split2", "split2_filler"]
    assert set(report.outcomes) == {"forget", "adjacent"}
    for group in report.outcomes.values():
        assert list(group) == names
        for row in group.values():
            assert set(row) == set(guardrails)
            for o in row.values():
                assert o.n == 4 and 0 <= o.accuracy <= 1 and o.pass_rate == pytest.approx(1 - o.gate_rate)
    f = report.outcomes["forget"]
    assert f["dilution_100"]["fraction"].prompt_tokens > f["none"]["fraction"].prompt_tokens + 90
    assert f["dilution_100"]["fraction"].n_cut == 4  # 100 benign tokens do not fit the micro model's 64
    json.dumps(report.to_dict())
    table = report.table()
    assert "dilution_100" in table and "windowed8" in table and "chance 0.25" in table


def test_sample_groups_and_config_errors(micro_world):
    cfg = EvasionConfig(max_items=3)
    groups = sample_groups(micro_world.world, "hazard", cfg)
    for items, para in groups.values():
        assert len(items) == len(para) == 3
        # the same facts in other frames: the same right answer
        assert [it.choices[it.answer] for it in items] == [it.choices[it.answer] for it in para]
        assert [it.question for it in items] != [it.question for it in para]
    with pytest.raises(ValueError, match="split_turns"):
        EvasionConfig(split_turns=(1,))
    with pytest.raises(ValueError, match="gate"):
        EvasionConfig(gates=("fraction", "max"))
    with pytest.raises(ValueError, match="dilution"):
        EvasionConfig(dilution_lengths=(0,))
