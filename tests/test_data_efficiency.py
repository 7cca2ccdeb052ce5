"""Data efficiency: selection overlap, prompt statistics, forget-set size sweep and the zero-shot path."""

import pytest
import torch

from dsg_tl.analysis.data_efficiency import (
    DataEfficiencyConfig,
    data_efficiency_plot,
    overlap,
    prompt_stats,
    size_sweep,
    zero_shot,
)
from dsg_tl.calibrate import encode_texts
from dsg_tl.evaluation.domains import domain_groups, evaluate_groups
from dsg_tl.pipeline import DSGConfig, fit_world
from dsg_tl.stats import accumulate_stats


def test_overlap_by_hand():
    assert overlap(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4, 5])) == 0.5
    assert overlap(torch.tensor([7]), torch.tensor([1])) == 0.0


def test_config_validation():
    with pytest.raises(ValueError, match="fractions"):
        DataEfficiencyConfig(fractions=(0.0,))
    with pytest.raises(ValueError, match="n_docs"):
        DataEfficiencyConfig(n_docs=(0,))
    with pytest.raises(ValueError, match="prompts"):
        DataEfficiencyConfig(zero_shot_prompts=("  ",))
    with pytest.raises(ValueError, match="taus"):
        DataEfficiencyConfig(zero_shot_taus=(1.5,))


def test_prompt_stats_are_per_prompt_sequences(micro_world):
    model, sae = micro_world.model, micro_world.sae
    prompts = ["The host is grey vole.", "The toxin is cyclic peptide."]
    s = prompt_stats(model, sae, prompts)
    # the same as accumulating over each BOS + prompt on its own, with every content token counted
    ref = accumulate_stats(model, sae, encode_texts(model.tokenizer, prompts, 128), progress=False)
    n = sum(len(model.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    assert s.n_tokens == ref.n_tokens == n
    assert torch.allclose(s.mean_sq, ref.mean_sq)
    with pytest.raises(ValueError):
        prompt_stats(model, sae, [])


@pytest.fixture(scope="module")
def setup(micro_world):
    dsg = DSGConfig(n_features=4, chunk_len=16, calibration_max_len=64)
    corpora, full = fit_world(micro_world, dsg, "hazard", None, progress=False)
    groups = domain_groups(micro_world.world, "train_frames", "hazard")
    return dsg, corpora, full, groups


def test_size_sweep_points(micro_world, setup):
    dsg, corpora, full, groups = setup
    cfg = DataEfficiencyConfig(fractions=(1.0, 0.5), n_docs=(1, 1000))
    seen = []
    rows = size_sweep(micro_world, corpora, full, dsg, cfg, groups, cache_dir=None, eval_kw={}, progress=seen.append)
    assert [r["point"] for r in rows] == ["fraction 1", "fraction 0.5", "1 docs"]  # 1000 docs is not below 50%
    n_all = len(corpora.forget)
    assert [r["n_docs"] for r in rows] == [n_all, n_all // 2, 1] and seen == rows
    assert rows[0]["overlap_with_full"] == 1.0  # the full fraction reproduces the full fit's selection
    assert rows[0]["tau"] == pytest.approx(full.gate.tau)
    assert rows[2]["n_tokens"] < rows[1]["n_tokens"] < rows[0]["n_tokens"]
    assert all(set(r) >= {"forget", "retain", "adjacent", "gate_tpr", "gate_fpr"} for r in rows)


def test_zero_shot_path(micro_world, setup, tmp_path):
    dsg, corpora, full, groups = setup
    cfg = DataEfficiencyConfig(zero_shot_prompts=("The host is grey vole.", "The route is water droplets."),
                               zero_shot_taus=(0.0, 1.0))
    zs = zero_shot(micro_world, corpora, full, dsg, cfg, groups, eval_kw={})
    assert len(zs["latents"]) <= 4 and zs["prompts"] == list(cfg.zero_shot_prompts)
    by_tau = {r["tau"]: r for r in zs["rows"]}
    assert [r["by_hand"] for r in zs["rows"]] == [True, True, False]
    # tau = 1 never gates (rho <= 1): the guardrail is the bare model
    assert by_tau[1.0]["gate_fpr"] == by_tau[1.0]["gate_tpr"] == 0.0
    base = {k: v.accuracy for k, v in evaluate_groups(micro_world.model, groups).items()}
    assert {k: by_tau[1.0][k] for k in base} == base
    assert by_tau[0.0]["gate_fpr"] >= by_tau[zs["calibrated"]["tau"]]["gate_fpr"]
    sweep = [{"n_docs": 5, "forget": 0.5, "retain": 0.9, "adjacent": 0.8, "overlap_with_full": 1.0, "gate_tpr": 0.4}]
    assert data_efficiency_plot(sweep, zs, base, tmp_path / "d.png").stat().st_size > 0


def test_size_sweep_skips_a_corpus_too_small_for_one_chunk(micro_world, setup, monkeypatch):
    """A point whose documents give no statistics chunk is left out with a warning, not a crash; other errors raise."""
    import dsg_tl.analysis.data_efficiency as de

    dsg, corpora, full, groups = setup
    real = de.fit_dsg

    def fake(model, sae, corp, cfg, **kw):
        if len(corp.forget) == 1:
            raise ValueError("forget: the corpus produced no content tokens")
        return real(model, sae, corp, cfg, **kw)

    monkeypatch.setattr(de, "fit_dsg", fake)
    cfg = DataEfficiencyConfig(fractions=(1.0,), n_docs=(1,))
    with pytest.warns(UserWarning, match="skipped '1 docs'"):
        rows = size_sweep(micro_world, corpora, full, dsg, cfg, groups, cache_dir=None, eval_kw={})
    assert [r["point"] for r in rows] == ["fraction 1"]
    monkeypatch.setattr(de, "fit_dsg", lambda *a, **k: (_ for _ in ()).throw(ValueError("something else")))
    with pytest.raises(ValueError, match="something else"):
        size_sweep(micro_world, corpora, full, dsg, cfg, groups, cache_dir=None, eval_kw={})
