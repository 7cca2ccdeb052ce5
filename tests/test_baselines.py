"""Baselines: loss formulas on hand-computed values, config validation, and RMU / GradDiff / NPO / static clamping on
the micro world (a new model is returned, the input model is untouched, a few steps lower the forget term)."""

import math

import pytest
import torch

from dsg_tl.baselines.common import (
    TrainConfig,
    config_grid,
    copy_model,
    mean_nll,
    measure,
    sequence_logprob,
    token_chunks,
)
from dsg_tl.baselines.graddiff import GradDiffConfig, apply_graddiff, graddiff_loss
from dsg_tl.baselines.npo import NPOConfig, apply_npo, npo_loss
from dsg_tl.baselines.rmu import RMUConfig, apply_rmu, random_direction, rmu_loss
from dsg_tl.baselines.static import StaticConfig, static_guardrail
from dsg_tl.config import ConfigError, from_dict

# ------------------------------------------------------------------------------------------- formulas


def test_npo_loss_hand_values():
    # diffs (theta - ref) = [1, 0], beta = 0.5: -(2/0.5) * mean(log sigmoid(-0.5), log sigmoid(0))
    #   log sigmoid(-0.5) = -0.9740770, log 0.5 = -0.6931472 -> mean -0.8336121 -> loss 3.3344484
    got = npo_loss(torch.tensor([-2.0, -5.0]), torch.tensor([-3.0, -5.0]), beta=0.5)
    assert got.item() == pytest.approx(3.3344484, abs=1e-6)
    # at theta = ref the loss is (2 / beta) log 2; it falls as the forget likelihood drops below the reference
    same = npo_loss(torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.1)
    assert same.item() == pytest.approx(20 * math.log(2), rel=1e-6)
    assert npo_loss(torch.tensor([-40.0]), torch.tensor([-4.0]), beta=0.1).item() < same.item()


def test_rmu_loss_hand_values():
    h_f = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])
    control = torch.tensor([0.0, 2.0])
    mask_f = torch.tensor([[False, True]])  # BOS position excluded
    h_r = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    h_r0 = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])
    mask_r = torch.tensor([[True, True]])
    total, lf, lr = rmu_loss(h_f, h_r, h_r0, control, mask_f, mask_r, alpha=3.0)
    assert lf.item() == pytest.approx(13 / 2)  # ||(3,4)-(0,2)||^2 = 13 over 1 token * d=2
    assert lr.item() == pytest.approx(4 / 4)  # (0 + 4) over 2 tokens * d=2
    assert total.item() == pytest.approx(6.5 + 3 * 1.0)


def test_graddiff_and_likelihood_helpers_hand_values():
    assert graddiff_loss(torch.tensor(2.0), torch.tensor(1.5), 1.0, 2.0).item() == pytest.approx(-2 + 3)
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert sequence_logprob(logp, mask).tolist() == pytest.approx([-3.0, -1.5])
    assert mean_nll(logp, mask).item() == pytest.approx(4.5 / 5)


def test_random_direction_unit_nonnegative_seeded():
    u = random_direction(16, seed=3)
    assert u.norm().item() == pytest.approx(1.0, abs=1e-6) and (u >= 0).all()
    assert torch.equal(u, random_direction(16, seed=3)) and not torch.equal(u, random_direction(16, seed=4))


def test_measure_sees_a_large_allocation():
    with measure() as cost:
        x = torch.ones(25_000_000)  # 100 MB, touched
        del x
    assert cost["wall_s"] > 0 and cost["meter"] == "rss_peak_delta"
    assert cost["peak_mem_mb"] > 60


def test_config_grid_row_major():
    grid = config_grid(RMUConfig(), {"layer": (1, 2), "alpha": (10.0, 100.0)})
    assert [(g.layer, g.alpha) for g in grid] == [(1, 10.0), (1, 100.0), (2, 10.0), (2, 100.0)]


# ---------------------------------------------------------------------------------------- validation


def test_config_validation_errors():
    assert RMUConfig().lr == 5e-6 and RMUConfig().layer == 3 and RMUConfig().steering_coeff == 400.0
    assert RMUConfig().alpha == 100.0 and RMUConfig().layers_updated == (1, 2, 3)
    assert RMUConfig(layer=1).layers_updated == (0, 1)
    with pytest.raises(ConfigError, match="lr"):
        RMUConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="update_layers"):
        RMUConfig(layer=1, update_layers=(2,))
    with pytest.raises(ConfigError, match="mlp_params"):
        RMUConfig(mlp_params=("W_Q",))
    with pytest.raises(ConfigError, match="beta"):
        NPOConfig(beta=0.0)
    with pytest.raises(ConfigError, match="steps"):
        GradDiffConfig(steps=0)
    with pytest.raises(ConfigError, match="c"):
        StaticConfig(c=0.0)
    with pytest.raises(ConfigError, match="chunk_len"):
        TrainConfig(chunk_len=2)
    with pytest.raises(ConfigError, match="stepz"):
        from_dict(RMUConfig, {"stepz": 3})
    with pytest.raises(ConfigError, match="steering_coeff"):
        from_dict(RMUConfig, {"steering_coeff": "big"})
    assert from_dict(NPOConfig, {"beta": 0.2, "max_chunks": 5}).beta == 0.2


# ------------------------------------------------------------------------------------ micro world runs


@pytest.fixture(scope="module")
def texts(micro_world):
    from dsg_tl.pipeline import world_corpora

    c = world_corpora(micro_world.world, "hazard")
    return c.forget, c.retain


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_copy_model_is_independent(micro_world):
    m = micro_world.model
    new = copy_model(copy_model(m))
    toks = torch.tensor([[m.tokenizer.bos_token_id, 5, 6, 7, 8]])
    assert torch.equal(new(toks), m(toks))
    with torch.no_grad():
        new.blocks[0].mlp.W_in.mul_(0)  # with a plain deepcopy the copy's MLPs would still run the original's weights
    assert not torch.allclose(new(toks), m(toks))


def test_token_chunks_match_stats_chunking(micro_world, texts):
    tok = micro_world.model.tokenizer
    chunks = token_chunks(tok, texts[0], 16)
    assert chunks and all(len(c) == 16 and c[0] == tok.bos_token_id for c in chunks)
    with pytest.raises(ValueError, match="no full chunk"):
        token_chunks(tok, ["a b"], 64)


TRAIN = {"steps": 4, "batch_size": 2, "chunk_len": 16, "lr": 3e-3, "seed": 1}


@pytest.mark.parametrize("method", ["rmu", "graddiff", "npo"])
def test_baseline_returns_new_model_and_lowers_forget_term(micro_world, texts, method):
    m = micro_world.model
    before = _state(m)
    forget, retain = texts
    if method == "rmu":
        cfg = RMUConfig(layer=1, steering_coeff=20.0, alpha=1.0, **TRAIN)
        res = apply_rmu(m, forget, retain, cfg, progress=False)
        first, last = res.terms["forget"][0], res.terms["forget"][-1]
    elif method == "graddiff":
        res = apply_graddiff(m, forget, retain, GradDiffConfig(**TRAIN), progress=False)
        first, last = -res.terms["forget_nll"][0], -res.terms["forget_nll"][-1]  # the forget term is -NLL
    else:
        res = apply_npo(m, forget, retain, NPOConfig(beta=0.5, **TRAIN), progress=False)
        first, last = res.terms["npo"][0], res.terms["npo"][-1]
        assert first == pytest.approx(4 * math.log(2), rel=1e-4)  # theta = ref at step 0
    assert res.model is not m and len(res.losses) == TRAIN["steps"]
    assert last < first
    assert res.wall_s > 0 and math.isfinite(res.peak_mem_mb) and res.config.steps == TRAIN["steps"]
    after = _state(m)
    assert all(torch.equal(before[k], after[k]) for k in before), "the input model was modified"
    assert all(p.grad is None for p in m.parameters()), "gradients reached the input model"
    new = res.model.state_dict()
    assert any(not torch.equal(before[k], new[k]) for k in before), "the returned model was not edited"
    if method == "rmu":  # only MLP W_out of layers <= L change
        changed = {k for k in before if not torch.equal(before[k], new[k])}
        assert changed and changed <= {"blocks.0.mlp.W_out", "blocks.1.mlp.W_out"}


def test_rmu_layer_beyond_model_is_an_error(micro_world, texts):
    with pytest.raises(ConfigError, match="layers"):
        apply_rmu(micro_world.model, *texts, RMUConfig(layer=5, **TRAIN), progress=False)


def test_static_guardrail_is_the_ungated_dsg_guardrail(micro_world):
    from dsg_tl.pipeline import DSGConfig, fit_dsg, world_corpora

    corpora = world_corpora(micro_world.world, "hazard")
    fit = fit_dsg(micro_world.model, micro_world.sae, corpora, DSGConfig(n_features=4, p_ratio=80.0, chunk_len=16),
                  progress=False)
    g = static_guardrail(fit)
    assert g.mode == "static" and torch.equal(g.gate_latents, fit.guardrail.gate_latents) and g.c == fit.guardrail.c
    g2 = static_guardrail(fit, StaticConfig(n_features=2, c=7.0))
    assert g2.mode == "static" and len(g2.gate_latents) == 2 and g2.c == 7.0
    assert set(g2.gate_latents.tolist()) <= set(fit.selection.latents.tolist())  # top 2 of the same ranking


# ------------------------------------------------------------------------------------------------ report


def test_best_under_retain_and_pareto_front():
    from dsg_tl.baselines.report import best_under_retain, pareto_front

    pts = [{"forget": 0.9, "retain": 1.0}, {"forget": 0.3, "retain": 0.97}, {"forget": 0.3, "retain": 0.99},
           {"forget": 0.1, "retain": 0.90}, {"forget": 0.5, "retain": 0.95}]
    # floor 0.98 * 1.0: points 0, 1, 2 qualify; lowest forget 0.3, tie broken by the higher retain
    assert best_under_retain(pts, 1.0) == {"forget": 0.3, "retain": 0.99}
    assert best_under_retain(pts, 1.0, ratio=0.9) == {"forget": 0.1, "retain": 0.90}
    assert best_under_retain(pts, 2.0) is None
    # point 1 (0.3 @ 0.97) is dominated by point 2 (0.3 @ 0.99); point 4 by point 1 and 2
    assert pareto_front(pts) == [pts[3], pts[2], pts[0]]


def test_methods_plot_writes_png(tmp_path):
    from dsg_tl.baselines.report import methods_plot

    path = methods_plot({"a": [{"forget": 0.5, "retain": 0.9}], "b": []}, {"forget": 0.9, "retain": 0.95},
                        tmp_path / "p.png", "t")
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
