"""Relearning attack: entity split and data, LoRA layout, the attack loop (copy, curves, train-time guardrail), study."""

import math

import pytest
import torch

from dsg_tl.attacks.relearn import (
    CONDITIONS,
    LoRADelta,
    RelearnConfig,
    RelearnStudyConfig,
    add_lora,
    attack_subset,
    attacker_documents,
    bar_check,
    fact_items,
    items_for_entities,
    lm_loss,
    mentioned_entities,
    merge_lora,
    relearn,
    relearn_plot,
    relearn_study,
    split_entities,
)
from dsg_tl.baselines.common import copy_model
from dsg_tl.config import ConfigError
from dsg_tl.guardrail import Guardrail, GuardrailModule


def test_mentioned_entities_whole_words():
    ents = ["Bako", "Bakoru", "Zed"]
    assert mentioned_entities("Bako met Bakoru.", ents) == {"Bako", "Bakoru"}
    assert mentioned_entities("Bakorux and zed.", ents) == set()
    assert mentioned_entities("anything", []) == set()


def test_entity_split_is_disjoint_and_documents_respect_it(micro_world):
    w = micro_world.world
    s = split_entities(w, "hazard", 0.5, seed=0)
    assert set(s.attacker).isdisjoint(s.heldout)
    assert set(s.attacker) | set(s.heldout) == set(w.entities("hazard"))
    assert len(s.attacker) == 2 and s == split_entities(w, "hazard", 0.5, seed=0)
    docs = attacker_documents(w, s)
    assert docs and len(docs) < len(w.documents["hazard"])
    for d in docs:
        assert mentioned_entities(d, s.attacker) and not mentioned_entities(d, s.heldout)
    held = items_for_entities(w, "train_frames", "hazard", s.heldout)
    known = items_for_entities(w, "train_frames", "hazard", s.attacker)
    assert len(held) + len(known) == len(w.mcq["train_frames"]["hazard"])
    for it in held:
        assert mentioned_entities(it.question, s.heldout) and not mentioned_entities(it.question, s.attacker)
    with pytest.raises(ValueError, match="overlap"):
        type(s)("hazard", ("A", "B"), ("B",))


def test_fact_items_pairing_is_checked(micro_world):
    w = micro_world.world
    pairs = fact_items(w, "heldout_frames", "exploits")
    assert all(it.choices[it.answer] == f.value and f.entity in it.question for f, it in pairs)
    broken = type(w)(w.facts, w.documents, w.background,
                     {**w.mcq, "train_frames": {**w.mcq["train_frames"],
                                                "hazard": w.mcq["train_frames"]["hazard"][::-1]}})
    with pytest.raises(ValueError, match="does not ask about"):
        fact_items(broken, "train_frames", "hazard")


def test_attack_subset_fraction_and_cap():
    texts = [f"t{i}" for i in range(20)]
    assert len(attack_subset(texts, RelearnConfig(doc_fraction=0.25))) == 5
    assert len(attack_subset(texts, RelearnConfig(doc_fraction=0.25, max_docs=3))) == 3
    assert len(attack_subset(texts, RelearnConfig(doc_fraction=0.01))) == 1
    assert attack_subset(texts, RelearnConfig(doc_fraction=0.5)) == attack_subset(texts, RelearnConfig(doc_fraction=0.5))


def test_config_validation():
    with pytest.raises(ConfigError):
        RelearnConfig(epochs=0)
    with pytest.raises(ValueError, match="adapter"):
        RelearnConfig(adapter="qlora")
    with pytest.raises(ValueError, match="lora_targets"):
        RelearnConfig(lora_targets=("W_X",))
    with pytest.raises(ValueError, match="lrs"):
        RelearnStudyConfig(lrs=())


class _UniformLM:
    """Logits equal everywhere over a vocabulary of 4: every next-token log-probability is -log 4."""

    def __call__(self, tokens, attention_mask=None, return_type="logits"):
        return torch.zeros(*tokens.shape, 4)


def test_lm_loss_toy_value():
    tokens = torch.tensor([[0, 1, 2, 3], [0, 2, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert float(lm_loss(_UniformLM(), tokens, mask)) == pytest.approx(math.log(4))


def test_lora_layouts_by_hand():
    gen = torch.Generator().manual_seed(0)
    q = LoRADelta("W_Q", (2, 3, 4), rank=1, alpha=1.0, generator=gen, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        q.A.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
        q.B.copy_(torch.arange(8.0)[None])
    d = q.delta()  # (A @ B)[i, h*4 + j] = A[i] * (h*4 + j)
    assert d.shape == (2, 3, 4)
    assert d[1, 2, 3] == 3.0 * 7 and d[0, 1, 2] == 2.0 * 2
    o = LoRADelta("W_O", (2, 4, 3), rank=1, alpha=2.0, generator=gen, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        o.A.copy_(torch.arange(8.0)[:, None])
        o.B.copy_(torch.tensor([[1.0, 10.0, 100.0]]))
    W = torch.zeros(2, 4, 3)
    assert o(W)[1, 0, 2] == 2.0 * 4 * 100  # scale alpha/r = 2, row h*4 + i = 4


def test_lora_starts_at_the_model_and_merges(micro_world):
    m = copy_model(micro_world.model)
    toks = m.to_tokens(["The host of Bako is"])
    before = m(toks).detach()
    params = add_lora(m, ("W_Q", "W_in"), rank=2, alpha=4.0)
    assert len(params) == 2 * 2 * m.cfg.n_layers
    assert torch.allclose(m(toks), before)  # B = 0: the adapter starts as the identity
    assert all(not p.requires_grad for n, p in m.named_parameters() if "original" in n)
    with torch.no_grad():
        params[1].add_(0.1)
    changed = m(toks).detach()
    merge_lora(m)
    assert {n for n, _ in m.named_parameters()} == {n for n, _ in micro_world.model.named_parameters()}
    assert torch.allclose(m(toks), changed, atol=1e-5)


@pytest.fixture(scope="module")
def guardrail(micro_world):
    g = Guardrail.from_selection(micro_world.sae, torch.arange(8), tau=0.0, c=5.0)
    return g.with_(mode="static", clamp_positions="all")  # clamps every content token of every sequence


@pytest.fixture(scope="module")
def attack_docs(micro_world):
    return attacker_documents(micro_world.world, split_entities(micro_world.world, "hazard"))


def test_relearn_curves_copy_and_train_time_guardrail(micro_world, guardrail, attack_docs, monkeypatch):
    model = micro_world.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"forward": 0, "with_grad": 0}
    orig = GuardrailModule.forward

    def counting(self, h, hook=None):
        calls["forward"] += 1
        calls["with_grad"] += int(torch.is_grad_enabled() and h.requires_grad)
        return orig(self, h, hook)

    monkeypatch.setattr(GuardrailModule, "forward", counting)
    seen_attached = []

    def eval_fn(m):
        seen_attached.append(hasattr(m.blocks[0], "dsg"))
        return {"a": 0.5, "b": 1.0}

    cfg = RelearnConfig(epochs=3, lr=1e-3, batch_size=8)
    res = relearn(model, attack_docs, cfg, guardrail=guardrail, eval_fn=eval_fn, progress=False)
    n_batches = math.ceil(len(attack_docs) / 8)
    assert res.curves == {"a": [0.5] * 3, "b": [1.0] * 3} and res.initial == {"a": 0.5, "b": 1.0}
    assert len(res.train_loss) == 3 and len(res.train_gate_rate) == 3
    assert res.train_gate_rate == [1.0] * 3  # static mode gates every sequence
    assert res.n_guarded_forwards == 3 * n_batches
    assert calls["forward"] == calls["with_grad"] == 3 * n_batches  # every training forward, in the graph
    assert seen_attached == [False] * 4  # detached while eval_fn runs
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"input model changed at {k}"
    assert res.model is not model
    assert not all(torch.equal(v, before[k]) for k, v in res.model.state_dict().items())

    # the clamp is in the graph: the same attack without the guardrail ends elsewhere
    plain = relearn(model, attack_docs, cfg, eval_fn=lambda m: 0.0, progress=False)
    assert plain.curves == {"accuracy": [0.0] * 3} and plain.train_gate_rate == []
    w0 = "blocks.0.mlp.W_in"
    assert (plain.model.state_dict()[w0] - res.model.state_dict()[w0]).abs().max() > 1e-4


def test_relearn_lora_trains_only_the_adapter(micro_world, attack_docs):
    cfg = RelearnConfig(epochs=2, lr=1e-2, adapter="lora", lora_rank=2, lora_targets=("W_V", "W_out"))
    res = relearn(micro_world.model, attack_docs, cfg, progress=False)
    base, new = micro_world.model.state_dict(), res.model.state_dict()
    assert set(base) == set(new)
    assert not torch.equal(base["blocks.1.mlp.W_out"], new["blocks.1.mlp.W_out"])
    assert torch.equal(base["blocks.1.mlp.W_in"], new["blocks.1.mlp.W_in"])  # not a target
    assert torch.equal(base["embed.W_E"], new["embed.W_E"])


def test_relearn_study_structure_plot_and_bar(micro_world, guardrail, tmp_path):
    cfg = RelearnStudyConfig(lrs=(1e-3, 1e-2), attack=RelearnConfig(epochs=1, batch_size=16), retain_items=8)
    g = guardrail.with_(mode="dynamic", tau=0.2)
    out = relearn_study(micro_world.model, g, micro_world.model, micro_world.world, cfg, forget_domain="hazard",
                        retain_domains=("geography",), progress=False)
    curves = out["curves"]
    assert set(curves) == set(CONDITIONS)
    for c in CONDITIONS:
        for lr in ("0.001", "0.01"):
            assert len(curves[c][lr]["forget"]) == len(curves[c][lr]["retain"]) == 2
    # base and test-time DSG are evaluations of the same attacked weights; RMU here is the base model itself
    assert curves["base"]["0.01"]["train_loss"] == curves["dsg_test_time"]["0.01"]["train_loss"]
    assert curves["base"]["0.01"]["forget"] == curves["rmu"]["0.01"]["forget"]
    assert "train_gate_rate" in curves["dsg_train_time"]["0.01"]
    assert out["n_heldout_items"] == 6 and set(out["split"]["attacker"]).isdisjoint(out["split"]["heldout"])
    assert relearn_plot(curves, tmp_path / "r.png").stat().st_size > 0


def test_bar_check_toy():
    curves = {"dsg_test_time": {"0.1": {"forget": [0.2, 0.3, 0.5]}}, "rmu": {"0.1": {"forget": [0.3, 0.4, 0.5]}}}
    r = bar_check(curves, "0.1")
    assert r["epochs_below"] == [True, True, False] and not r["below_at_every_attack_epoch"]
    curves["rmu"]["0.1"]["forget"] = [0.1, 0.4, 0.6]  # weaker before the attack, stronger under it
    r = bar_check(curves, "0.1")
    assert r["below_at_every_attack_epoch"] and not r["below_at_every_epoch_incl_0"]
