"""Latent separability at entity tokens: the mask, the best-latent rule, and the rates on the micro world."""

import torch

from dsg_tl.analysis.separability import best_latent, entity_firing, entity_mask, separability_summary


def test_best_latent_is_the_largest_margin_over_any_other_domain():
    firing = {
        "hazard": {"entity": torch.tensor([0.9, 0.5, 0.2])},
        "adjacent": {"entity": torch.tensor([0.8, 0.0, 0.0])},
        "geography": {"entity": torch.tensor([0.0, 0.1, 0.0])},
    }
    # margins: 0.9 - 0.8 = 0.1, 0.5 - 0.1 = 0.4, 0.2 - 0.0 = 0.2
    b = best_latent(firing, "hazard")
    assert b["latent"] == 1
    assert abs(b["margin"] - 0.4) < 1e-6 and abs(b["max_other_entity_rate"] - 0.1) < 1e-6


def test_entity_mask_covers_exactly_the_name(micro_world):
    tok = micro_world.model.tokenizer
    e = micro_world.world.entities("hazard")[0]
    q = f"The host of {e} is"
    ids, mask = entity_mask(tok, q, e)
    assert ids[0] == tok.bos_token_id and len(ids) == len(mask) and not mask[0]
    assert tok.decode([i for i, m in zip(ids, mask) if m]).strip() == e
    assert "host" in tok.decode([i for i, m in zip(ids, mask) if not m][1:])


def test_entity_firing_rates_and_the_selection_union(micro_world):
    w = micro_world.world
    items = {d: w.mcq["train_frames"][d][:6] for d in ("hazard", "geography")}
    ents = {d: w.entities(d) for d in items}
    sel = torch.tensor([0, 1, 2])
    firing = entity_firing(micro_world.model, micro_world.sae, micro_world.hook_name, items, ents, selected=sel)
    for d, r in firing.items():
        assert r["n_entity_tokens"] >= 6 and r["n_other_tokens"] > r["n_entity_tokens"]
        for kind in ("entity", "other"):
            rates = r[kind]
            assert rates.shape == (micro_world.sae.cfg.d_sae,) and 0 <= rates.min() and rates.max() <= 1
            union = r[f"selected_any_{kind}"]
            # the union fires at least as often as its most frequent member, and at most as often as all together
            assert rates[sel].max() - 1e-6 <= union <= min(1.0, float(rates[sel].sum())) + 1e-6
    s = separability_summary(firing, "hazard")
    assert set(s["domains"]) == set(items) and "entity" not in s["domains"]["hazard"]
