"""dsg_tl.guardrail (and dsg_tl.calibrate): the clamp-if-gated hook on a tiny HookedTransformer.

Every test that attaches builds a fresh model (same seed -> same weights), so one test's hooks cannot leak into
another's numbers.
"""

from __future__ import annotations

import functools
import json

import _tiny
import beartype
import jaxtyping
import pytest
import torch
from _tiny import HOOK, PAD, SPECIAL

from dsg_tl.batching import pad_batch
from dsg_tl.calibrate import calibrate, sequence_rho
from dsg_tl.gate import rho as rho_fn
from dsg_tl.guardrail import Guardrail, GuardrailModule, LatentSlice
from dsg_tl.selection import percentile

checked = jaxtyping.jaxtyped(typechecker=beartype.beartype)
TYPE_ERRORS = (jaxtyping.TypeCheckError, beartype.roar.BeartypeException)

SEQS = _tiny.random_seqs(8, seed=0, eos_every=3)
C = 3.0
KINDS = ["standard", "jumprelu"]
DSG_HOOKS = ("hook_latents", "hook_fire", "hook_rho", "hook_gate", "hook_clamped")


# ------------------------------------------------------------------------------------------------- set-up helpers


@functools.cache
def setup(kind: str):
    """(sae, gate latents, tau): 3 latents firing on 10-30 % of content tokens, tau just above the 4th rho."""
    sae = {"standard": _tiny.standard_sae, "jumprelu": _tiny.jumprelu_sae, "topk": _tiny.topk_sae}[kind](seed=0)
    model = _tiny.tiny_model()
    per_seq = []
    with torch.no_grad():
        for s in SEQS:
            keep = torch.tensor([t not in SPECIAL for t in s])
            per_seq.append(sae.encode(_tiny.hook_acts(model, s))[keep])
    freq = (torch.cat(per_seq) > 0).float().mean(0)
    latents = [j for j in range(_tiny.D_SAE) if 0.1 <= freq[j] <= 0.3][:3]
    assert len(latents) == 3
    rhos = sorted(float((a[:, latents] > 0).any(-1).float().mean()) for a in per_seq)
    above = [r for r in rhos if r > rhos[3]]  # the smallest rho above the 4th: tau splits the sequences there
    assert above and rhos[0] < above[0]
    tau = (rhos[3] + above[0]) / 2
    return sae, torch.tensor(latents), tau


def make(kind: str, **kw) -> Guardrail:
    sae, latents, tau = setup(kind)
    kw.setdefault("tau", tau)
    return Guardrail.from_selection(sae, latents, c=C, **kw)


def run(model, seqs, *, guardrail=None, bs=8, side="right", cache=False):
    """Per-sequence logits at real positions, plus rho / gate per sequence (guarded) and the last batch's cache."""
    n = len(seqs)
    logits, rhos, gates, full, last_cache = [None] * n, torch.zeros(n), torch.zeros(n, dtype=torch.bool), [], None

    def body(handle):
        nonlocal last_cache
        for start in range(0, n, bs):
            chunk = seqs[start : start + bs]
            batch = pad_batch(chunk, PAD, special_ids=SPECIAL, padding_side=side)
            if handle is not None:
                handle.set_batch(batch)
            with torch.no_grad():
                if cache:
                    out, last_cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
                else:
                    out = model(batch.tokens, attention_mask=batch.attention_mask)
            full.append(out)
            for i in range(len(chunk)):
                logits[start + i] = out[i][batch.attention_mask[i].bool()]
            if handle is not None:
                rhos[start : start + len(chunk)] = handle.last_rho
                gates[start : start + len(chunk)] = handle.last_gate

    if guardrail is None:
        body(None)
    else:
        with guardrail.attach(model) as handle:
            body(handle)
    return logits, rhos, gates, full, last_cache


# ------------------------------------------------------------------------------------------------- hand-made toy SAE


@torch.no_grad()
def toy_sae(kind: str = "standard", threshold0: float = 0.0):
    """d_sae 4, reading coordinates 0, 1, 2 of h; W_dec rows [1,2,0,..], [0,0,3,..], [0,0,0,1,..], 0."""
    sae = _tiny.jumprelu_sae() if kind == "jumprelu" else _tiny.standard_sae()
    # rebuild at width 4 with literal weights
    cfg_cls = type(sae.cfg)
    sae = type(sae)(cfg_cls(d_in=_tiny.D_MODEL, d_sae=4, metadata=sae.cfg.metadata)).eval()
    for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
        p.zero_()
    sae.W_enc[0, 0] = sae.W_enc[1, 1] = sae.W_enc[2, 2] = 1.0
    sae.W_dec[0, :3] = torch.tensor([1.0, 2.0, 0.0])
    sae.W_dec[1, :3] = torch.tensor([0.0, 0.0, 3.0])
    sae.W_dec[2, 3] = 1.0
    if kind == "jumprelu":
        sae.threshold.copy_(torch.tensor([threshold0, 0.0, 0.0, 0.0]))
    return sae


def toy_h() -> torch.Tensor:
    """[1, 3, d_model]: position 0 is BOS (fires, never counted), 1 and 2 are content."""
    h = torch.zeros(1, 3, _tiny.D_MODEL)
    h[0, 0, :3] = torch.tensor([5.0, 5.0, 5.0])
    h[0, 1, :3] = torch.tensor([0.5, -1.0, 0.25])  # acts: a0 = 0.5, a1 = 0, a2 = 0.25
    h[0, 2, :3] = torch.tensor([-1.0, 0.75, 0.0])  # acts: a0 = 0, a1 = 0.75, a2 = 0
    return h


def toy_apply(sae, gate, *, clamp=None, c=2.0, tau=0.4, path="fast", **kw) -> torch.Tensor:
    g = Guardrail.from_selection(sae, torch.tensor(gate), tau=tau, c=c, path=path,
                                 clamp_latents=None if clamp is None else torch.tensor(clamp), **kw)
    module = GuardrailModule(g)  # no batch set: every position but the first (BOS) is content
    with torch.no_grad():
        out = module(toy_h())
    return out[..., :4], module


# ================================================================================================= (9) the formula


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_toy_clamp_active_positions(path):
    out, m = toy_apply(toy_sae(), [0], path=path)  # rho = 1/2 > 0.4 -> gated; only position 1 fires
    assert m.last_rho.tolist() == [0.5] and m.last_gate.tolist() == [True]
    # position 1: a0 0.5 -> -2: h + (-2.5) * [1, 2, 0, 0]
    torch.testing.assert_close(out[0, 1], torch.tensor([-2.0, -6.0, 0.25, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 2], torch.tensor([-1.0, 0.75, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 0], torch.tensor([5.0, 5.0, 5.0, 0.0]), atol=1e-6, rtol=0)  # BOS untouched


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_toy_clamp_all_positions(path):
    out, _ = toy_apply(toy_sae(), [0], path=path, clamp_positions="all")
    torch.testing.assert_close(out[0, 1], torch.tensor([-2.0, -6.0, 0.25, 0.0]), atol=1e-6, rtol=0)
    # position 2: a0 0 -> -2: h + (-2) * [1, 2, 0, 0]
    torch.testing.assert_close(out[0, 2], torch.tensor([-3.0, -3.25, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 0], torch.tensor([5.0, 5.0, 5.0, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_toy_two_latents(path):
    out, m = toy_apply(toy_sae(), [0, 1], c=1.0, path=path)  # both content positions fire: rho 1
    assert m.last_rho.tolist() == [1.0]
    # pos 1: a (0.5, 0) -> (-1, -1): -1.5 * [1,2,0] - 1 * [0,0,3]; pos 2: a (0, .75) -> (-1, -1): -[1,2,0] - 1.75 [0,0,3]
    torch.testing.assert_close(out[0, 1], torch.tensor([-1.0, -4.0, -2.75, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 2], torch.tensor([-2.0, -1.25, -5.25, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_toy_not_gated_when_rho_equals_tau(path):
    out, m = toy_apply(toy_sae(), [0], tau=0.5, path=path)  # rho 0.5 is not > 0.5
    assert m.last_gate.tolist() == [False]
    assert torch.equal(out, toy_h()[..., :4])


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_toy_static_mode_ignores_tau(path):
    out, m = toy_apply(toy_sae(), [0], tau=0.9, mode="static", path=path)
    assert m.last_gate.tolist() == [True] and m.last_rho.tolist() == [0.5]
    torch.testing.assert_close(out[0, 1], torch.tensor([-2.0, -6.0, 0.25, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_toy_random_latent_control(path):
    """Gate on latent 0, clamp latent 1: latent 1 is set to -c where latent 0 fires, nowhere else."""
    out, m = toy_apply(toy_sae(), [0], clamp=[1], path=path)
    # pos 1: a1 0 -> -2: h + (-2) * [0, 0, 3]; pos 2 (latent 1 active but the gate latent is not) unchanged
    torch.testing.assert_close(out[0, 1], torch.tensor([0.5, -1.0, -5.75, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0, 2], torch.tensor([-1.0, 0.75, 0.0, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_toy_jumprelu_threshold(path):
    sae = toy_sae("jumprelu", threshold0=0.6)  # a0 = 0.5 at position 1 is below the threshold -> 0
    out, m = toy_apply(sae, [0], path=path)
    assert m.last_rho.tolist() == [0.0] and torch.equal(out, toy_h()[..., :4])
    out, _ = toy_apply(sae, [0], path=path, mode="static", clamp_positions="all")
    torch.testing.assert_close(out[0, 1], torch.tensor([-1.5, -5.0, 0.25, 0.0]), atol=1e-6, rtol=0)  # 0 -> -2
    out, m = toy_apply(toy_sae("jumprelu", threshold0=0.4), [0], path=path)  # 0.5 > 0.4: fires
    assert m.last_rho.tolist() == [0.5]
    torch.testing.assert_close(out[0, 1], torch.tensor([-2.0, -6.0, 0.25, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_clamped_residual_on_model_matches_formula(kind):
    """blocks.1.hook_resid_pre at one firing token of a gated sequence = h + sum_j (-c - a_j) W_dec[j]."""
    sae, latents, _ = setup(kind)
    model = _tiny.tiny_model()
    batch = pad_batch(SEQS, PAD, special_ids=SPECIAL)
    with torch.no_grad():
        _, bare = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=HOOK)
    g = make(kind, mode="static")
    with g.attach(model) as handle:
        handle.set_batch(batch)
        with torch.no_grad():
            _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    fire = cache["blocks.0.dsg.hook_fire"]
    i, t = (int(x) for x in fire.nonzero()[0])
    h = bare[HOOK][i, t].double()
    with torch.no_grad():
        a = sae.encode(bare[HOOK][i, t][None])[0].double()
    expected = h.clone()
    for j in latents.tolist():
        expected += (-C - a[j]) * sae.W_dec[j].detach().double()
    assert a[latents].max() > 0
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"][i, t].double(), expected, atol=1e-5, rtol=0)
    # a non-firing content token of that sequence is untouched (clamp_positions="active")
    quiet = (~fire[i] & batch.content_mask[i]).nonzero()
    if len(quiet):
        q = int(quiet[0])
        assert torch.equal(cache["blocks.1.hook_resid_pre"][i, q], bare[HOOK][i, q])


# ================================================================================================= (1) identity


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("clamp_positions", ["active", "all"])
def test_tau_inf_is_bit_identical(kind, path, clamp_positions):
    model = _tiny.tiny_model()
    bare = run(model, SEQS, bs=8)[3][0]
    g = make(kind, tau=float("inf"), path=path, clamp_positions=clamp_positions)
    _, _, gates, guarded, _ = run(model, SEQS, guardrail=g, bs=8)
    assert not gates.any()
    assert torch.equal(guarded[0], bare)


def test_tau_inf_bit_identical_without_set_batch():
    model = _tiny.tiny_model()
    tokens = torch.tensor([s[:5] for s in SEQS if len(s) >= 5])
    with torch.no_grad():
        bare = model(tokens)
        with make("standard", tau=float("inf")).attach(model):
            guarded = model(tokens)
    assert torch.equal(guarded, bare)


# ================================================================================================= (2) mixed batch


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("clamp_positions", ["active", "all"])
def test_ungated_rows_untouched_gated_rows_change(kind, path, clamp_positions):
    model = _tiny.tiny_model()
    bare = run(model, SEQS, bs=8)[3][0]
    _, _, gates, guarded, _ = run(model, SEQS, guardrail=make(kind, path=path, clamp_positions=clamp_positions))
    guarded = guarded[0]
    assert gates.sum() == 4  # setup() puts tau between the 4th and 5th rho
    for i in range(len(SEQS)):
        if gates[i]:
            assert (guarded[i] - bare[i]).abs().max() > 1e-3
        else:
            assert torch.equal(guarded[i], bare[i])


# ================================================================================================= (3) invariance


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_batch_size_and_padding_side_invariance(kind, path):
    g = make(kind, path=path)
    ref_logits, ref_rho, ref_gate, _, _ = run(_tiny.tiny_model(), SEQS, guardrail=g, bs=1)
    assert ref_gate.any() and not ref_gate.all()
    for bs in (1, 3, 8):
        for side in ("left", "right"):
            logits, rhos, gates, _, _ = run(_tiny.tiny_model(), SEQS, guardrail=g, bs=bs, side=side)
            torch.testing.assert_close(rhos, ref_rho, atol=1e-5, rtol=0)
            assert torch.equal(gates, ref_gate), (bs, side)
            for i in range(len(SEQS)):
                torch.testing.assert_close(logits[i], ref_logits[i], atol=1e-5, rtol=0)


def test_rho_matches_direct_computation():
    sae, latents, _ = setup("standard")
    model = _tiny.tiny_model()
    _, rhos, _, _, _ = run(model, SEQS, guardrail=make("standard"), bs=3, side="left")
    for i, s in enumerate(SEQS):
        keep = torch.tensor([t not in SPECIAL for t in s])
        with torch.no_grad():
            a = sae.encode(_tiny.hook_acts(_tiny.tiny_model(), s))[keep][:, latents]
        assert rhos[i].item() == pytest.approx((a > 0).any(-1).float().mean().item(), abs=1e-6)


def test_gate_mask_restricts_rho_but_not_clamping():
    """With gate_lengths, rho counts only the first tokens; clamping still covers every firing content token."""
    sae, latents, _ = setup("standard")
    batch = pad_batch(SEQS, PAD, special_ids=SPECIAL, padding_side="left", gate_lengths=[4] * len(SEQS))
    model = _tiny.tiny_model()
    with make("standard", mode="static").attach(model) as handle:
        handle.set_batch(batch)
        with torch.no_grad():
            _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    for i, s in enumerate(SEQS):
        with torch.no_grad():
            a = sae.encode(_tiny.hook_acts(_tiny.tiny_model(), s))[1:4][:, latents]  # tokens 1-3 (after BOS)
        fired = (a > 0).any(-1)
        assert handle.last_rho[i].item() == pytest.approx(fired.float().mean().item(), abs=1e-6)
    fire = cache["blocks.0.dsg.hook_fire"]
    assert (fire & ~batch.gate_mask).any()  # fires beyond the gate window are still clamp positions
    assert torch.equal(fire & ~batch.content_mask, torch.zeros_like(fire))


# ================================================================================================= (4) fast == reference


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clamp_positions", ["active", "all"])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_fast_path_equals_reference_path(kind, clamp_positions, mode):
    fast = make(kind, path="fast", clamp_positions=clamp_positions, mode=mode)
    ref = make(kind, path="reference", clamp_positions=clamp_positions, mode=mode)
    assert fast.path == "fast" and ref.path == "reference"
    lf, rf, gf, _, cf = run(_tiny.tiny_model(), SEQS, guardrail=fast, side="left", cache=True)
    lr, rr, gr, _, cr = run(_tiny.tiny_model(), SEQS, guardrail=ref, side="left", cache=True)
    assert gf.any()
    assert torch.equal(gf, gr)
    torch.testing.assert_close(rf, rr, atol=1e-6, rtol=0)
    torch.testing.assert_close(cf["blocks.0.dsg.hook_latents"], cr["blocks.0.dsg.hook_latents"], atol=1e-5, rtol=0)
    torch.testing.assert_close(cf["blocks.1.hook_resid_pre"], cr["blocks.1.hook_resid_pre"], atol=1e-5, rtol=0)
    for a, b in zip(lf, lr):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ================================================================================================= (5) TopK


def test_topk_falls_back_to_reference_path():
    sae, latents, tau = setup("topk")
    with pytest.raises(ValueError):
        LatentSlice.from_sae(sae, latents)
    g = Guardrail.from_selection(sae, latents, tau=tau, c=C, path="fast")
    assert g.path == "reference" and g.slice is None
    assert g.with_(tau=0.0).path == "reference"
    # the hook computes decode(a') + (h - decode(a)) with the full TopK encoding
    model = _tiny.tiny_model()
    batch = pad_batch(SEQS, PAD, special_ids=SPECIAL)
    with torch.no_grad():
        _, bare = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=HOOK)
        h = bare[HOOK]
        static = g.with_(mode="static")
        module = GuardrailModule(static)
        module.set_batch(batch)
        out = module(h)
        a = sae.encode(h)
        fire = (a[..., latents] > 0).any(-1) & batch.content_mask
        a2 = a.clone()
        for i, t in fire.nonzero().tolist():
            a2[i, t, latents] = -C
        expected = sae.decode(a2) + (h - sae.decode(a))
    assert fire.any()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # and attached to a model it changes gated sequences only
    bare_logits = run(model, SEQS)[3][0]
    _, _, gates, guarded, _ = run(model, SEQS, guardrail=g)
    assert gates.any() and not gates.all()
    for i in range(len(SEQS)):
        assert torch.equal(guarded[0][i], bare_logits[i]) != bool(gates[i])


# ================================================================================================= (6) hooks removed


def _assert_clean(model):
    hp = model.hook_dict[HOOK]
    assert hp.fwd_hooks == [], hp.fwd_hooks
    assert len(hp._forward_hooks) == 0
    assert not hasattr(model.blocks[0], "dsg")
    assert not any(".dsg." in name for name in model.hook_dict)


def test_hooks_removed_after_with_block():
    model = _tiny.tiny_model()
    bare = run(model, SEQS)[3][0]
    g = make("standard", mode="static")
    with g.attach(model):
        assert len(model.hook_dict[HOOK].fwd_hooks) == 1
        assert hasattr(model.blocks[0], "dsg")
        assert "blocks.0.dsg.hook_rho" in model.hook_dict
    _assert_clean(model)
    assert torch.equal(run(model, SEQS)[3][0], bare)


def test_hooks_removed_after_exception():
    model = _tiny.tiny_model()
    g = make("standard", mode="static")
    with pytest.raises(RuntimeError, match="boom"), g.attach(model):
        raise RuntimeError("boom")
    _assert_clean(model)


def test_attach_twice_at_once_refused():
    model = _tiny.tiny_model()
    g = make("standard")
    with g.attach(model), pytest.raises(RuntimeError), g.attach(model):
        pass


@pytest.mark.parametrize("hook", ["blocks.0.hook_nonexistent", "blocks.7.hook_resid_post", "nothing"])
def test_attach_to_missing_hook_raises(hook):
    model = _tiny.tiny_model()
    g = make("standard")
    g = Guardrail(hook_name=hook, gate_latents=g.gate_latents, tau=g.tau, c=C, sae=g.sae)
    with pytest.raises(KeyError), g.attach(model):
        pass
    _assert_clean(model)


# ================================================================================================= (7) cache


def test_run_with_cache_returns_guardrail_hooks():
    g = make("jumprelu", clamp_latents=torch.tensor([1, 5]))
    union = g.union_latents
    logits, _, gates, _, cache = run(_tiny.tiny_model(), SEQS, guardrail=g, cache=True)
    b, p = len(SEQS), max(len(s) for s in SEQS)
    for name in DSG_HOOKS:
        assert f"blocks.0.dsg.{name}" in cache
    assert cache["blocks.0.dsg.hook_rho"].shape == (b,)
    assert cache["blocks.0.dsg.hook_gate"].shape == (b,) and cache["blocks.0.dsg.hook_gate"].dtype == torch.bool
    assert cache["blocks.0.dsg.hook_fire"].shape == (b, p) and cache["blocks.0.dsg.hook_fire"].dtype == torch.bool
    assert cache["blocks.0.dsg.hook_latents"].shape == (b, p, len(union)) == (b, p, 5)
    assert cache["blocks.0.dsg.hook_clamped"].shape == (b, p, 5)
    assert torch.equal(cache["blocks.0.dsg.hook_gate"], gates)
    assert HOOK in cache and "blocks.1.hook_resid_post" in cache  # the model's own activations are still there
    # fire / rho are consistent with the cached latents
    batch = pad_batch(SEQS, PAD, special_ids=SPECIAL)
    gate_cols = torch.searchsorted(union, g.gate_latents)
    fire = (cache["blocks.0.dsg.hook_latents"][..., gate_cols] > 0).any(-1) & batch.content_mask
    assert torch.equal(cache["blocks.0.dsg.hook_fire"], fire)
    torch.testing.assert_close(cache["blocks.0.dsg.hook_rho"], rho_fn(fire, batch.content_mask))


# ================================================================================================= (8) save / load


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_save_load_round_trip(tmp_path, kind, path):
    sae, _, _ = setup(kind)
    g = make(kind, path=path, clamp_positions="all", meta={"note": "x"})
    out = g.save(tmp_path / "g")
    assert sorted(p.name for p in out.iterdir()) == ["guardrail.json", "guardrail.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no temporary directories left behind
    for f in out.iterdir():
        assert not f.read_bytes().startswith(b"\x80")  # no pickle
    spec = json.loads((out / "guardrail.json").read_text())
    assert spec["tau"] == g.tau and spec["c"] == C and spec["mode"] == "dynamic" and spec["meta"] == {"note": "x"}

    ref_logits = run(_tiny.tiny_model(), SEQS, guardrail=g)[3][0]
    with_sae = Guardrail.load(out, sae=sae)
    without = Guardrail.load(out)
    assert with_sae.path == path and without.path == "fast" and without.sae is None
    for loaded in (with_sae, without):
        assert torch.equal(loaded.gate_latents, g.gate_latents) and loaded.clamp_latents is None
        assert (loaded.tau, loaded.c, loaded.mode, loaded.clamp_positions) == (g.tau, C, "dynamic", "all")
        assert loaded.meta == {"note": "x"}
    assert torch.equal(run(_tiny.tiny_model(), SEQS, guardrail=with_sae)[3][0], ref_logits)
    got = run(_tiny.tiny_model(), SEQS, guardrail=without)[3][0]
    if path == "fast":
        assert torch.equal(got, ref_logits)
    else:
        torch.testing.assert_close(got, ref_logits, atol=1e-5, rtol=0)


def test_save_load_clamp_latents_and_infinite_tau(tmp_path):
    g = make("standard", tau=float("inf"), clamp_latents=torch.tensor([7, 3]), mode="static")
    loaded = Guardrail.load(g.save(tmp_path / "g"))
    assert loaded.tau == float("inf") and loaded.mode == "static"
    assert loaded.clamp_latents.tolist() == [7, 3]
    assert torch.equal(run(_tiny.tiny_model(), SEQS, guardrail=loaded)[3][0],
                       run(_tiny.tiny_model(), SEQS, guardrail=g)[3][0])
    # saving over an existing directory replaces it
    g.with_(tau=0.5).save(tmp_path / "g")
    assert Guardrail.load(tmp_path / "g").tau == 0.5


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Guardrail.load(tmp_path / "missing")
    out = make("standard").save(tmp_path / "g")
    spec = json.loads((out / "guardrail.json").read_text())
    spec["format_version"] = 99
    (out / "guardrail.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError):
        Guardrail.load(out)
    # a TopK guardrail has no slice: it cannot be loaded without its SAE
    sae, latents, tau = setup("topk")
    topk_dir = Guardrail.from_selection(sae, latents, tau=tau, c=C).save(tmp_path / "topk")
    with pytest.raises(ValueError):
        Guardrail.load(topk_dir)
    assert Guardrail.load(topk_dir, sae=sae).path == "reference"


def test_loaded_without_sae_cannot_silently_change_latents(tmp_path):
    """A slice-only guardrail cannot re-derive its slice; new latents must be refused, not read off wrong columns."""
    loaded = Guardrail.load(make("standard", clamp_latents=torch.tensor([1])).save(tmp_path / "g"))
    assert loaded.slice.latents.tolist() == sorted([1, *setup("standard")[1].tolist()])
    with pytest.raises(ValueError):
        loaded.with_(gate_latents=torch.tensor([10, 20]))  # latents 10 and 20 are not in the saved slice


# ================================================================================================= (10) static mode


@pytest.mark.parametrize("kind", KINDS)
def test_static_mode_clamps_when_rho_below_tau(kind):
    bare = run(_tiny.tiny_model(), SEQS)[3][0]
    for tau in (1.0, float("inf")):
        dynamic = run(_tiny.tiny_model(), SEQS, guardrail=make(kind, tau=tau))[3][0]
        assert torch.equal(dynamic, bare)  # rho <= 1 <= tau: the dynamic gate never fires
        _, rhos, gates, guarded, _ = run(_tiny.tiny_model(), SEQS, guardrail=make(kind, tau=tau, mode="static"))
        assert gates.all() and (rhos <= tau).all() and (rhos > 0).sum() >= 6
        for i in range(len(SEQS)):
            if rhos[i] > 0:  # something fired, so something was clamped
                assert (guarded[0][i] - bare[i]).abs().max() > 1e-3


# ================================================================================================= (11) random control


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_clamp_latents_differ_from_gate_latents(kind, path):
    sae, latents, _ = setup(kind)
    control = torch.tensor([j for j in range(20, 64) if j not in latents.tolist()][:3])
    g = make(kind, clamp_latents=control, path=path)
    assert torch.equal(g.clamp, control)
    assert g.union_latents.tolist() == sorted(latents.tolist() + control.tolist())
    _, _, gates, _, cache = run(_tiny.tiny_model(), SEQS, guardrail=g, cache=True)
    batch = pad_batch(SEQS, PAD, special_ids=SPECIAL)
    lat, clamped = cache["blocks.0.dsg.hook_latents"], cache["blocks.0.dsg.hook_clamped"]
    fire = cache["blocks.0.dsg.hook_fire"]
    gidx = torch.searchsorted(g.union_latents, latents)
    cidx = torch.searchsorted(g.union_latents, control)
    where = fire & gates[:, None]
    assert where.any()
    assert torch.equal(clamped[..., gidx], lat[..., gidx])  # the gate latents themselves are not clamped
    assert (clamped[..., cidx][where] == -C).all()
    assert torch.equal(clamped[..., cidx][~where], lat[..., cidx][~where])
    # the residual moved by sum over the control latents of (-c - a_j) W_dec[j] at those positions only
    model = _tiny.tiny_model()
    with torch.no_grad():
        _, bare = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=HOOK)
        h = bare[HOOK]
        a = sae.encode(h)[..., control]
        delta = torch.where(where[..., None], -C - a, torch.zeros_like(a)) @ sae.W_dec[control]
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], h + delta, atol=1e-5, rtol=0)


# ================================================================================================= construction


def test_construction_validates():
    sae, latents, tau = setup("standard")
    with pytest.raises(ValueError):
        Guardrail.from_selection(sae, latents, tau=tau, c=C, mode="sometimes")
    with pytest.raises(ValueError):
        Guardrail.from_selection(sae, latents, tau=tau, c=C, clamp_positions="everywhere")
    with pytest.raises(ValueError):
        Guardrail(hook_name=HOOK, gate_latents=latents, tau=tau, c=C)
    slice_ = LatentSlice.from_sae(sae, latents)
    with pytest.raises(ValueError):
        Guardrail(hook_name=HOOK, gate_latents=latents, tau=tau, c=C, path="reference", slice=slice_)
    g = Guardrail(hook_name=HOOK, gate_latents=latents, tau=tau, c=C, slice=slice_)
    assert g.path == "fast" and g.sae is None


def test_with_rederives_slice_and_from_selection():
    sae, latents, tau = setup("jumprelu")
    g = Guardrail.from_selection(sae, latents.int(), tau=tau, c=C)
    assert g.hook_name == HOOK and g.gate_latents.dtype == torch.long and g.c == C
    g2 = g.with_(gate_latents=torch.tensor([9, 4]))
    assert g2.slice.latents.tolist() == [4, 9]
    assert torch.equal(g2.slice.W_dec, sae.W_dec[[4, 9]])
    assert torch.equal(g2.slice.threshold, sae.threshold[[4, 9]])
    g3 = g.with_(clamp_latents=torch.tensor([1]))
    assert g3.slice.latents.tolist() == sorted([1, *latents.tolist()])
    assert g.with_(tau=0.1).slice is g.slice


@pytest.mark.parametrize("kind", KINDS)
def test_latent_slice_encode_matches_sae(kind):
    sae, latents, _ = setup(kind)
    s = LatentSlice.from_sae(sae, latents)
    h = torch.randn(2, 5, _tiny.D_MODEL, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(checked(LatentSlice.encode)(s, h), sae.encode(h)[..., latents], atol=1e-6, rtol=0)
    with pytest.raises(TYPE_ERRORS):
        checked(LatentSlice.encode)(s, torch.ones(2, 5, _tiny.D_MODEL, dtype=torch.long))  # not a float tensor


def test_set_batch_shape_mismatch_raises():
    model = _tiny.tiny_model()
    with make("standard").attach(model) as handle:
        handle.set_batch(pad_batch(SEQS[:2], PAD, special_ids=SPECIAL))
        with pytest.raises(ValueError, match="set_batch"):
            model(torch.tensor([SEQS[0]]))


def test_gate_and_fire_type_checked():
    g = make("standard")
    fn = checked(Guardrail.gate_and_fire)
    a = torch.tensor([[[0.0, 1.0], [0.0, 0.0], [2.0, 0.0]]])  # 1 sequence, 3 positions, 2 latents
    mask = torch.tensor([[False, True, True]])
    fire, r, gated = fn(g, a, mask, mask)
    assert fire.tolist() == [[False, False, True]] and r.tolist() == [0.5]
    assert gated.tolist() == [0.5 > g.tau]
    with pytest.raises(TYPE_ERRORS):
        fn(g, a, mask, torch.tensor([[False, True]]))
    with pytest.raises(TYPE_ERRORS):
        fn(g, a[0], mask, mask)


# ================================================================================================= calibrate


def test_sequence_rho_and_calibrate():
    sae, latents, _ = setup("standard")
    model = _tiny.tiny_model(tokenizer=True)
    g = make("standard", tau=0.0, mode="static")  # the probe ignores both
    r3 = sequence_rho(model, g, SEQS, batch_size=3)
    r8 = sequence_rho(_tiny.tiny_model(tokenizer=True), g, SEQS, batch_size=8)
    torch.testing.assert_close(r3, r8, atol=1e-6, rtol=0)
    direct = []
    for s in SEQS:  # in the caller's order, although sequence_rho sorts by length internally
        keep = torch.tensor([t not in SPECIAL for t in s])
        with torch.no_grad():
            a = sae.encode(_tiny.hook_acts(model, s))[keep][:, latents]
        direct.append((a > 0).any(-1).float().mean())
    torch.testing.assert_close(r3, torch.stack(direct), atol=1e-6, rtol=0)

    cal, held, forget = SEQS[:4], SEQS[4:6], SEQS[6:]
    tuned, report, rhos = calibrate(_tiny.tiny_model(tokenizer=True), g, calibration=cal, heldout=held,
                                    forget=forget, p_dyn=50, batch_size=2)
    assert tuned.tau == pytest.approx(percentile(torch.stack(direct[:4]), 50))
    assert tuned.mode == "static" and torch.equal(tuned.gate_latents, latents)
    assert report.tau == tuned.tau and report.alpha == pytest.approx(0.5)
    assert (report.n_calibration, report.n_heldout, report.n_forget) == (4, 2, 2)
    assert report.retain_fpr == pytest.approx(float((torch.stack(direct[4:6]) > tuned.tau).float().mean()))
    assert report.forget_tpr == pytest.approx(float((torch.stack(direct[6:]) > tuned.tau).float().mean()))
    assert set(rhos) == {"calibration", "heldout_retain", "forget"}


@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("clamp", [None, [1, 2]])
def test_hook_on_clamped_activations_takes_effect(path, clamp):
    """Without a hook on hook_clamped only (a' - a) is decoded; with one, the hooked (edited) activations are used.
    Undoing the clamp in the hook gives back h exactly at the clamped positions' coordinates."""
    sae = toy_sae()
    out_plain, _ = toy_apply(sae, [0, 1, 2], clamp=clamp, path=path, tau=0.0)
    g = Guardrail.from_selection(sae, torch.tensor([0, 1, 2]), tau=0.0, c=2.0, path=path,
                                 clamp_latents=None if clamp is None else torch.tensor(clamp))
    m = GuardrailModule(g)
    seen = {}

    def observe(x, hook):
        seen["clamped"] = x.clone()
        return x

    m.hook_clamped.add_hook(observe)
    with torch.no_grad():
        out_observed = m(toy_h())[..., :4]
    assert torch.allclose(out_observed, out_plain, atol=1e-6)  # observing changes nothing
    assert (seen["clamped"] == -2.0).any()
    m.hook_clamped.remove_hooks()
    m.hook_latents.add_hook(lambda x, hook: seen.__setitem__("latents", x.clone()))
    m.hook_clamped.add_hook(lambda x, hook: seen["latents"])  # undo the clamp
    with torch.no_grad():
        out_undone = m(toy_h())
    assert torch.allclose(out_undone, toy_h(), atol=1e-6)
    assert not torch.allclose(out_plain, toy_h()[..., :4])
