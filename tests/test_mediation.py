"""Causal-mediation checks: rank correlation, frequency selection, ablation, attribution, selection comparison."""

import copy
import math

import pytest
import torch

from dsg_tl.analysis.mediation import (
    ablation_effects,
    attribution_scores,
    compare_selections,
    frequency_selection,
    mediation_plot,
    spearman,
)
from dsg_tl.guardrail import Guardrail
from dsg_tl.stats import LatentStats


def test_spearman_toy_values():
    assert spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties take their average rank: ranks x = [1.5, 1.5, 3, 4], y = [1, 2, 3, 4] -> r = 0.9486833
    assert spearman([5, 5, 7, 9], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10), abs=1e-9)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_frequency_selection_on_hand_made_stats():
    z = torch.zeros(6)
    forget = LatentStats(z, z, torch.tensor([0.5, 0.4, 0.3, 0.2, 0.0, 0.3]), 100)
    retain = LatentStats(z, z, torch.tensor([0.5, 0.001, 0.0, 0.005, 0.0, 0.0]), 100)
    # latent 0 fires too often on retain, latent 4 never on forget; 2 and 5 tie -> lower index first
    assert frequency_selection(forget, retain, 3).tolist() == [1, 2, 5]
    assert frequency_selection(forget, retain, 10).tolist() == [1, 2, 5, 3]
    assert frequency_selection(forget, retain, 2, max_retain_freq=0.0001).tolist() == [2, 5]


@pytest.fixture(scope="module")
def texts(micro_world):
    docs = micro_world.world.documents
    return list(docs["hazard"][:6]), list(docs["geography"][:6])


@pytest.fixture(scope="module")
def guardrail(micro_world):
    return Guardrail.from_selection(micro_world.sae, torch.tensor([0, 1]), tau=0.0, c=5.0)


def test_ablation_effects_finite(micro_world, texts, guardrail):
    forget, retain = texts
    for mode in ("zero", "clamp"):
        eff = ablation_effects(micro_world.model, guardrail, forget, retain, torch.tensor([0, 1, 2]), mode=mode)
        assert eff["mode"] == mode and eff["latents"] == [0, 1, 2]
        assert eff["c"] == (0.0 if mode == "zero" else 5.0)
        vals = [eff["base"]["forget"], eff["base"]["retain"], *eff["joint"].values()]
        vals += [r[k] for r in eff["per_latent"] for k in ("d_forget", "d_retain")]
        assert all(math.isfinite(v) for v in vals)
        assert [r["latent"] for r in eff["per_latent"]] == [0, 1, 2]


def test_zero_ablation_of_latents_that_never_fire_changes_nothing(micro_world, texts):
    # a copy of the SAE whose latents 5..7 can never fire (the model itself does not use the SAE)
    sae = copy.deepcopy(micro_world.sae)
    with torch.no_grad():
        sae.b_enc[5:8] = -1e6
    g = Guardrail.from_selection(sae, torch.tensor([5, 6, 7]), tau=0.0, c=5.0)
    eff = ablation_effects(micro_world.model, g, *texts, torch.tensor([5, 6, 7]), mode="zero")
    assert eff["joint"] == {"d_forget": 0.0, "d_retain": 0.0}
    assert all(r["d_forget"] == 0.0 and r["d_retain"] == 0.0 for r in eff["per_latent"])
    attr = attribution_scores(micro_world.model, sae, g.hook_name, texts[0], torch.tensor([5, 6, 7]))
    assert torch.equal(attr, torch.zeros(3))  # a = 0 -> no attribution


def test_attribution_scores_shape_and_finite(micro_world, texts):
    sae = micro_world.sae
    before = [p.grad for p in micro_world.model.parameters()]
    s = attribution_scores(micro_world.model, sae, sae.cfg.metadata.hook_name, texts[0], torch.arange(5))
    assert s.shape == (5,) and torch.isfinite(s).all()
    after = [p.grad for p in micro_world.model.parameters()]
    assert all(a is b for a, b in zip(before, after, strict=True))  # no gradients accumulated on the model


@pytest.fixture(scope="module")
def fit(micro_world, tmp_path_factory):
    from dsg_tl.pipeline import DSGConfig, fit_dsg, world_corpora

    corpora = world_corpora(micro_world.world)
    cfg = DSGConfig(n_features=4, p_ratio=80.0, chunk_len=16)
    return fit_dsg(micro_world.model, micro_world.sae, corpora, cfg, progress=False), corpora


def test_compare_selections_rows(micro_world, fit, tmp_path):
    from dsg_tl.evaluation.domains import domain_groups

    f, corpora = fit
    groups = domain_groups(micro_world.world, "train_frames")
    groups = {k: v[:8] for k, v in groups.items() if k in ("forget", "retain")}
    texts = {"forget": corpora.forget_eval[:8], "retain": corpora.heldout_retain[:8]}
    rows = compare_selections(micro_world.model, micro_world.sae, f, texts, n=4, seed=0, groups=groups)
    assert [r["method"] for r in rows] == ["fisher", "random", "frequency", "mean_squared"]
    for r in rows:
        assert {"method", "latents", "n_latents", "d_forget_loss", "d_retain_loss", "forget_acc", "retain_acc",
                "base_forget_acc", "base_retain_acc"} <= set(r)
        assert r["n_latents"] == len(r["latents"]) <= 4
        if r["n_latents"]:
            assert math.isfinite(r["d_forget_loss"]) and math.isfinite(r["d_retain_loss"])
            assert 0.0 <= r["forget_acc"] <= 1.0 and 0.0 <= r["retain_acc"] <= 1.0
    assert rows[0]["latents"] == f.selection.latents.tolist()  # same n, p_ratio and formula as the fit
    assert not set(rows[1]["latents"]) & set(rows[0]["latents"])  # random control avoids the selected latents
    assert (mediation_plot(rows, tmp_path / "m.png")).stat().st_size > 1000
