"""The fictional-knowledge world: facts, corpus, MCQs, tokenizer, cache."""

import json

import pytest

from dsg_tl.config import ConfigError, from_dict, load_config
from dsg_tl.world.build import WorldConfig, build_or_load_world, sae_dir, verify_cache, world_dir
from dsg_tl.world.facts import (
    ATTRIBUTES,
    DOMAINS,
    HELDOUT_FRAMES,
    KIND_FRAMES,
    KINDS,
    TRAIN_FRAMES,
    FactsConfig,
    build_world,
)


def test_world_is_deterministic_in_its_config():
    a, b = build_world(FactsConfig(seed=3)), build_world(FactsConfig(seed=3))
    assert a.facts == b.facts and a.documents == b.documents and a.mcq == b.mcq
    assert build_world(FactsConfig(seed=4)).facts != a.facts


def test_value_pools_are_large_and_multi_word():
    for domain, attrs in ATTRIBUTES.items():
        for attr, pool in attrs.items():
            assert len(pool) >= 20, (domain, attr)
            assert len(set(pool)) == len(pool)
            assert all(len(v.split()) >= 2 for v in pool), (domain, attr)


def test_domains_share_frames_and_entity_names_are_unique():
    w = build_world(FactsConfig(entities_per_domain=10))
    entities = [e for d in DOMAINS for e in w.entities(d)]
    assert len(entities) == len(set(entities)) == 10 * len(DOMAINS)
    # every domain's MCQs use the same set of cloze frames
    frames = {d: {it.template for it in w.mcq["train_frames"][d]} for d in DOMAINS}
    assert len({frozenset(f) for f in frames.values()}) <= len(DOMAINS)
    assert set.union(*frames.values()) <= set(TRAIN_FRAMES)


def test_heldout_frames_never_occur_in_training_text():
    w = build_world(FactsConfig(entities_per_domain=6))
    corpus = " ".join(w.all_texts())
    assert not set(HELDOUT_FRAMES) & set(TRAIN_FRAMES)
    for domain in DOMAINS:
        for item in w.mcq["heldout_frames"][domain]:
            assert item.template in HELDOUT_FRAMES
            assert item.question not in corpus
        # sanity check of the check: training-frame questions do occur in the corpus
        assert any(it.question in corpus for it in w.mcq["train_frames"][domain])


def test_mcq_records_have_the_wmdp_shape_and_distractors_from_the_pool():
    w = build_world(FactsConfig(entities_per_domain=5))
    facts = {(f.entity, f.attribute): f.value for f in w.facts}
    for split in ("train_frames", "heldout_frames"):
        for domain in DOMAINS:
            for it in w.mcq[split][domain]:
                rec = it.to_record()
                assert set(rec) >= {"question", "choices", "answer"}
                assert len(it.choices) == 4 and len(set(it.choices)) == 4
                words = " " + it.question.replace(":", " ").replace(",", " ").replace("?", " ") + " "
                attr = next(a for a in ATTRIBUTES[domain] if f" {a} " in words)
                pool = ATTRIBUTES[domain][attr]
                assert all(c in pool for c in it.choices)
                ent = next(e for e in w.entities(domain) if e in it.question)
                assert it.choices[it.answer] == facts[(ent, attr)]


def test_adjacent_shares_vocabulary_with_hazard():
    shared = set(ATTRIBUTES["hazard"]) & set(ATTRIBUTES["adjacent"])
    assert {"host", "technique"} <= shared


def test_config_errors_name_key_and_file(tmp_path):
    bad = tmp_path / "world.yaml"
    bad.write_text("facts:\n  entities_per_domain: 4\n  colour: blue\n")
    with pytest.raises(ConfigError, match=r"world.yaml.*facts\.colour"):
        load_config(bad, WorldConfig)
    bad.write_text("model:\n  d_model: lots\n")
    with pytest.raises(ConfigError, match=r"model\.d_model.*integer"):
        load_config(bad, WorldConfig)
    bad.write_text("facts:\n  entities_per_domain: -3\n")
    with pytest.raises(ConfigError, match=r"facts\.entities_per_domain.*> 0"):
        load_config(bad, WorldConfig)
    bad.write_text("sae:\n  layer: 5\n")
    with pytest.raises(ConfigError, match=r"sae\.layer"):
        load_config(bad, WorldConfig)


def test_micro_world_builds_and_loads_through_the_tokenizer_path(micro_world):
    tok = micro_world.model.tokenizer
    assert tok.bos_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id is not None
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    toks = micro_world.model.to_tokens("The host of")
    assert toks[0, 0].item() == tok.bos_token_id
    assert (micro_world.path / "tokenizer" / "tokenizer.json").is_file()
    assert (micro_world.sae_path / "cfg.json").is_file() and micro_world.sae_path.parent == micro_world.path
    s = micro_world.metrics["sae"]
    assert {"fve", "l0", "dead_fraction", "ce_increase"} <= set(s)
    assert micro_world.sae.cfg.metadata.hook_name == micro_world.hook_name


def test_cache_reuse_corruption_and_config_change(micro_world_config, tmp_path):
    from dsg_tl.config import override

    cfg = override(micro_world_config, {"model.steps": 5})
    first = build_or_load_world(cfg, tmp_path)
    d = world_dir(cfg, tmp_path)
    assert first.path == d and verify_cache(d)
    stamp = (d / "manifest.json").stat().st_mtime_ns
    again = build_or_load_world(cfg, tmp_path)  # warm: no rebuild
    assert (d / "manifest.json").stat().st_mtime_ns == stamp
    assert again.metrics["config_hash"] == first.metrics["config_hash"]

    # corrupt a weight file: detected, rebuilt, never loaded
    weights = d / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert not verify_cache(d)
    rebuilt = build_or_load_world(cfg, tmp_path)
    assert verify_cache(d) and rebuilt.path == d

    # truncated SAE directory (a file gone, as after an interrupted copy): only the SAE is rebuilt
    lm_stamp = (d / "manifest.json").stat().st_mtime_ns
    s = sae_dir(cfg, tmp_path)
    (s / "sae_weights.safetensors").unlink()
    build_or_load_world(cfg, tmp_path)
    assert verify_cache(s) and (d / "manifest.json").stat().st_mtime_ns == lm_stamp

    # another SAE config reuses the language model and adds its own SAE directory
    other_sae = override(cfg, {"sae.d_sae": 32})
    art = build_or_load_world(other_sae, tmp_path)
    assert art.path == d and art.sae_path != s and art.sae.cfg.d_sae == 32
    assert (d / "manifest.json").stat().st_mtime_ns == lm_stamp

    # the LM manifest gone: everything under it is rebuilt
    (d / "manifest.json").unlink()
    build_or_load_world(cfg, tmp_path)
    assert verify_cache(d) and verify_cache(s)

    # a different config lands in a different directory
    other = override(cfg, {"facts.seed": 1})
    assert world_dir(other, tmp_path) != d
    # no temporary directories left behind
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_failed_build_leaves_nothing(micro_world_config, tmp_path, monkeypatch):
    import dsg_tl.world.build as build

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(build, "train_sae", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_or_load_world(micro_world_config, tmp_path)
    # the finished language model stays (complete and verified); the SAE directory was never created
    d = world_dir(micro_world_config, tmp_path)
    assert list(tmp_path.iterdir()) == [d] and verify_cache(d)
    assert not sae_dir(micro_world_config, tmp_path).exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_metrics_and_config_written(micro_world):
    m = json.loads((micro_world.path / "metrics.json").read_text())
    assert "versions" in m and "torch" in m["versions"]
    assert (micro_world.path / "config.yaml").is_file()
    cfg = load_config(micro_world.path / "config.yaml", WorldConfig)
    assert cfg == micro_world.config
    assert from_dict(WorldConfig, {}) == WorldConfig()


def test_kind_sentences_add_general_knowledge_without_changing_the_facts():
    plain = build_world(FactsConfig(entities_per_domain=6))
    kinds = build_world(FactsConfig(entities_per_domain=6, kind_sentences=0.5))
    assert kinds.facts == plain.facts and kinds.mcq == plain.mcq
    for domain in DOMAINS:
        sentence_of = {e: [f.format(e=e, k=KINDS[domain]) for f in KIND_FRAMES] for e in kinds.entities(domain)}
        opened = [any(d.startswith(s) for ss in sentence_of.values() for s in ss) for d in kinds.documents[domain]]
        # per-entity documents only (not the mixed ones); about half of them open with a kind sentence
        assert 0.3 < sum(opened) / (6 * 24) < 0.7, domain
        assert not any(KINDS[domain] in d for d in plain.documents[domain])
        assert not any(KINDS[domain] in it.question for it in kinds.mcq["train_frames"][domain])


def test_entity_tokens_make_each_name_one_token(tmp_path):
    from dsg_tl.world.tokenizer import load_tokenizer, train_tokenizer

    w = build_world(FactsConfig(entities_per_domain=3))
    names = [e for d in DOMAINS for e in w.entities(d)]
    texts = w.all_texts()
    plain = load_tokenizer(train_tokenizer(texts, 300, tmp_path / "plain"))
    whole = load_tokenizer(train_tokenizer(texts, 300, tmp_path / "whole", words=names))
    assert len(whole) == len(plain) + 2 * len(names)

    def n_tokens(tok, s):
        return len(tok(s, add_special_tokens=False)["input_ids"])

    assert any(n_tokens(plain, " " + e) > 1 for e in names)  # the check can fail
    for e in names:
        assert n_tokens(whole, " " + e) == n_tokens(whole, e) == 1
        ids = whole(f"The host of {e} is", add_special_tokens=False)["input_ids"]
        assert whole.decode(ids) == f"The host of {e} is"
        assert any(t.endswith(e) for t in whole.convert_ids_to_tokens(ids))


def test_builds_train_with_deterministic_kernels_and_restore_the_setting(micro_world_config, tmp_path, monkeypatch):
    import torch

    import dsg_tl.world.build as build

    seen = []
    real_lm, real_sae = build.train_language_model, build.train_sae

    def lm(*a, **k):
        seen.append(("lm", torch.are_deterministic_algorithms_enabled()))
        return real_lm(*a, **k)

    def sae(*a, **k):
        seen.append(("sae", torch.are_deterministic_algorithms_enabled()))
        return real_sae(*a, **k)

    monkeypatch.setattr(build, "train_language_model", lm)
    monkeypatch.setattr(build, "train_sae", sae)
    assert not torch.are_deterministic_algorithms_enabled()
    art = build_or_load_world(micro_world_config, tmp_path)
    assert seen == [("lm", True), ("sae", True)]
    assert not torch.are_deterministic_algorithms_enabled()
    # and the build is reproducible: a second build of the same config has the same weights, bit for bit
    again = build_or_load_world(micro_world_config, tmp_path / "again")
    assert (art.path / "model/model.safetensors").read_bytes() == (again.path / "model/model.safetensors").read_bytes()
    weights = "sae_weights.safetensors"
    assert (art.sae_path / weights).read_bytes() == (again.sae_path / weights).read_bytes()
