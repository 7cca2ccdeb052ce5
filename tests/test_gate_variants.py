"""Gate variants (dsg_tl.gate): windowed, per-turn and hybrid statistics on hand-computed toys; their use in the
guardrail (batch / padding invariance, save / load, the fraction gate unchanged) and their calibration."""

from __future__ import annotations

import json

import _tiny
import pytest
import torch
from _tiny import PAD, SPECIAL

from dsg_tl.batching import pad_batch
from dsg_tl.calibrate import (
    _windows,
    calibrate,
    sequence_fire,
    sequence_gate_stats,
    sequence_rho,
    stats_from_fire,
)
from dsg_tl.gate import (
    GateSpec,
    calibrate_hybrid,
    fired_count,
    gate_decision,
    gate_report,
    gate_statistic,
    per_turn_rho,
    rho,
    turn_ids,
    windowed_rho,
)
from dsg_tl.guardrail import Guardrail

T, F = True, False
SEP = 7  # separator token id in the per-turn toys


def b(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ================================================================================================ statistics (toys)


def test_windowed_hand_computed():
    # BOS, then 6 counted tokens firing 1 1 0 0 1 0; windows of 3: 2/3, 1/3, 1/3, 1/3 -> 2/3; plain rho = 3/6
    fire = b([[F, T, T, F, F, T, F]])
    mask = b([[F, T, T, T, T, T, T]])
    assert windowed_rho(fire, mask, 3).tolist() == pytest.approx([2 / 3])
    assert windowed_rho(fire, mask, 1).tolist() == pytest.approx([1.0])
    assert windowed_rho(fire, mask, 6).tolist() == pytest.approx([0.5])
    # fewer counted tokens than the window: the plain fraction (also when the window exceeds the row width)
    assert windowed_rho(fire, mask, 7).tolist() == pytest.approx([0.5])
    assert windowed_rho(fire, mask, 50).tolist() == pytest.approx([0.5])
    assert rho(fire, mask).tolist() == pytest.approx([0.5])


def test_windowed_skips_uncounted_positions_and_padding_side():
    # counted tokens 1 _ 1 0 with an uncounted firing token in between: counted sequence 1 1 0 -> window 2: 1.0
    fire = b([[F, T, T, T, F]])
    mask = b([[F, T, F, T, T]])
    assert windowed_rho(fire, mask, 2).tolist() == pytest.approx([1.0])
    # the same rows, left- and right-padded, and an all-masked row (0)
    fire = b([[F, F, F, T, T, F], [F, T, T, F, F, F], [T, T, T, T, T, T]])
    mask = b([[F, F, T, T, T, T], [F, T, T, T, T, F], [F, F, F, F, F, F]])
    # row 0: counted 0 1 1 0 -> w=2: 1.0; row 1: counted 1 1 0 0 -> 1.0; row 2: nothing counted -> 0
    assert windowed_rho(fire, mask, 2).tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert windowed_rho(fire, mask, 3).tolist() == pytest.approx([2 / 3, 2 / 3, 0.0])
    with pytest.raises(ValueError, match="window"):
        windowed_rho(fire, mask, 0)


def test_per_turn_hand_computed():
    # BOS a b SEP c d e SEP f : fires on a, c and on the separators (never counted in a turn)
    tokens = torch.tensor([[0, 10, 11, SEP, 12, 13, 14, SEP, 15]])
    fire = b([[F, T, F, T, T, F, F, T, F]])
    mask = b([[F, T, T, T, T, T, T, T, T]])
    turns, sep = turn_ids(tokens, (SEP,))
    assert turns.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 2]]
    assert sep.tolist() == [[F, F, F, T, F, F, F, T, F]]
    # turn 0: a b -> 1/2; turn 1: c d e -> 1/3; turn 2: f -> 0  => max 1/2
    assert per_turn_rho(fire, mask, turns, sep).tolist() == pytest.approx([0.5])
    stat, count = gate_statistic(GateSpec("per_turn", separator_ids=(SEP,)), fire, mask, tokens)
    assert stat.tolist() == pytest.approx([0.5]) and count.tolist() == [4]
    # the fraction gate on the same sequence counts the separators: 4 of 8
    assert gate_statistic(GateSpec(), fire, mask, tokens)[0].tolist() == pytest.approx([0.5])
    # without a separator the per-turn statistic is the plain fraction
    tokens2 = torch.tensor([[0, 10, 11, 12]])
    fire2, mask2 = b([[F, T, F, F]]), b([[F, T, T, T]])
    spec = GateSpec("per_turn", separator_ids=(SEP,))
    assert gate_statistic(spec, fire2, mask2, tokens2)[0].tolist() == pytest.approx([1 / 3])
    with pytest.raises(ValueError, match="token ids"):
        gate_statistic(spec, fire2, mask2, None)


def test_per_turn_padding_sides_agree():
    seqs = [[0, 10, SEP, 11, 12], [0, 13, 14]]
    for side in ("left", "right"):
        batch = pad_batch(seqs, PAD, special_ids=SPECIAL, padding_side=side)
        fire = (batch.tokens == 10) | (batch.tokens == 14) | (batch.tokens == PAD)
        stat, _ = gate_statistic(GateSpec("per_turn", separator_ids=(SEP,)), fire, batch.rho_mask, batch.tokens)
        # row 0: turn [10] -> 1, turn [11, 12] -> 0 => 1; row 1: [13, 14] -> 1/2
        assert stat.tolist() == pytest.approx([1.0, 0.5])


def test_hybrid_decision_and_count():
    fire = b([[F, T, T, F, F, F, F, F, F, F]])
    mask = b([[F, T, T, T, T, T, T, T, T, T]])
    spec = GateSpec("hybrid", k_min=2)
    stat, count = gate_statistic(spec, fire, mask)
    assert stat.tolist() == pytest.approx([2 / 9]) and count.tolist() == [2]
    assert fired_count(fire, mask).tolist() == [2]
    assert gate_decision(spec, 0.5, stat, count).tolist() == [True]  # count 2 >= 2 although rho < tau
    assert gate_decision(GateSpec("hybrid", k_min=3), 0.5, stat, count).tolist() == [False]
    assert gate_decision(GateSpec("hybrid", k_min=3), 0.2, stat, count).tolist() == [True]  # 2/9 > 0.2
    assert gate_decision(GateSpec("hybrid"), 0.5, stat, count).tolist() == [False]  # uncalibrated: fraction only


def test_calibrate_hybrid_hand_computed():
    counts = torch.tensor([0, 0, 1, 1, 2, 3, 0, 0, 0, 5])
    stat = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.5, 0.6, 0.05, 0.0, 0.15, 0.9])
    # alpha 0.2, n 10: the count test may fire on floor(10 * 0.1) = 1 -> k_min = 4 (only count 5 reaches it);
    # the fraction test on floor(2) - 1 = 1 more: tau = 2nd largest rho outside {count >= 4} = 0.5
    k, tau = calibrate_hybrid(stat, counts, alpha=0.2)
    assert (k, tau) == (4, pytest.approx(0.5))
    gated = gate_decision(GateSpec("hybrid", k_min=k), tau, stat, counts)
    assert gated.tolist() == [F, F, F, F, F, T, F, F, F, T] and gated.float().mean() <= 0.2
    with pytest.raises(ValueError):
        calibrate_hybrid(torch.tensor([]), torch.tensor([], dtype=torch.long), alpha=0.1)


@pytest.mark.parametrize("seed", range(5))
def test_calibrate_hybrid_fpr_at_most_alpha(seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 6, (200,), generator=g)
    stat = torch.rand(200, generator=g)
    for alpha in (0.05, 0.1, 0.3):
        k, tau = calibrate_hybrid(stat, counts, alpha)
        fpr = gate_decision(GateSpec("hybrid", k_min=k), tau, stat, counts).float().mean()
        assert fpr <= alpha + 1e-9
        assert (counts >= k).float().mean() <= alpha / 2 + 1e-9


def test_gate_spec_validation_and_dict_round_trip():
    for spec in (GateSpec(), GateSpec("windowed", window=8), GateSpec("per_turn", separator_ids=(201,)),
                 GateSpec("hybrid", k_min=3)):
        assert GateSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert GateSpec.from_dict(None) == GateSpec("fraction")
    with pytest.raises(ValueError, match="kind"):
        GateSpec("max")
    with pytest.raises(ValueError, match="separator"):
        GateSpec("per_turn")
    with pytest.raises(ValueError, match="window"):
        GateSpec("windowed", window=0)
    with pytest.raises(ValueError, match="k_min"):
        GateSpec("hybrid", k_min=0)
    with pytest.raises(ValueError, match="unknown"):
        GateSpec.from_dict({"kind": "fraction", "tau": 1})


def test_gate_report_for_variants():
    held, forget = torch.tensor([0.1, 0.6]), torch.tensor([0.2, 0.7, 0.9])
    rep = gate_report(0.5, 90, 10, held, forget, spec=GateSpec("hybrid", k_min=3),
                      heldout_count=torch.tensor([3, 0]), forget_count=torch.tensor([0, 0, 0]))
    assert rep.retain_fpr == pytest.approx(1.0) and rep.forget_tpr == pytest.approx(2 / 3)
    assert rep.to_dict()["gate"] == "hybrid" and rep.to_dict()["k_min"] == 3
    assert "gate" not in gate_report(0.5, 90, 10, held, forget).to_dict()  # the fraction report is unchanged


# ================================================================================================ in the guardrail

SEQS = _tiny.random_seqs(10, seed=1, min_len=6, max_len=20, eos_every=4)


TAU = {"fraction": 0.3, "windowed": 0.6, "per_turn": 0.3, "hybrid": 0.4}


def _guardrail(spec: GateSpec, tau: float | None = None) -> Guardrail:
    tau = TAU[spec.kind] if tau is None else tau
    sae = _tiny.standard_sae(seed=0)
    return Guardrail.from_selection(sae, torch.tensor([2, 23, 45]), tau=tau, c=3.0, gate=spec)


def _run(g: Guardrail, seqs, bs: int, side: str):
    model = _tiny.tiny_model()
    stats, gates, outs = [], [], []
    with g.attach(model) as handle, torch.no_grad():
        for start in range(0, len(seqs), bs):
            batch = pad_batch(seqs[start : start + bs], PAD, special_ids=SPECIAL, padding_side=side)
            handle.set_batch(batch)
            out = model(batch.tokens, attention_mask=batch.attention_mask)
            stats.append(handle.last_rho)
            gates.append(handle.last_gate)
            outs += [out[i][batch.attention_mask[i].bool()] for i in range(len(batch.tokens))]
    return torch.cat(stats), torch.cat(gates), outs


SPECS = [GateSpec(), GateSpec("windowed", window=4), GateSpec("per_turn", separator_ids=(SEP,)),
         GateSpec("hybrid", k_min=3)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_variants_invariant_to_batch_size_and_padding_side(spec):
    g = _guardrail(spec)
    ref_stat, ref_gate, ref_out = _run(g, SEQS, 1, "right")
    assert ref_gate.any() and not ref_gate.all()  # the toy gate splits the sequences
    for bs, side in ((4, "right"), (10, "left"), (3, "left")):
        stat, gate, out = _run(g, SEQS, bs, side)
        torch.testing.assert_close(stat, ref_stat, atol=1e-6, rtol=0)
        assert torch.equal(gate, ref_gate)
        for a, r in zip(out, ref_out, strict=True):
            torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


def test_fraction_variant_is_the_old_gate():
    """rho = #(fire & mask) / #mask and gated = rho > tau, with outputs equal to a guardrail with no gate field."""
    sae = _tiny.standard_sae(seed=0)
    latents = torch.tensor([2, 23, 45])
    explicit = _guardrail(GateSpec("fraction"))
    default = Guardrail.from_selection(sae, latents, tau=0.3, c=3.0)  # no gate argument
    assert default.gate == GateSpec("fraction")
    s1, g1, o1 = _run(explicit, SEQS, 4, "left")
    s0, g0, o0 = _run(default, SEQS, 4, "left")
    assert torch.equal(s1, s0) and torch.equal(g1, g0) and all(torch.equal(a, b_) for a, b_ in zip(o1, o0, strict=True))
    model = _tiny.tiny_model()
    for i, s in enumerate(SEQS):  # the old formula, by hand from the SAE
        keep = torch.tensor([t not in SPECIAL for t in s])
        with torch.no_grad():
            fire = (sae.encode(_tiny.hook_acts(model, s))[keep][:, latents] > 0).any(-1)
        assert s0[i].item() == pytest.approx(fire.float().mean().item(), abs=1e-6)
        assert bool(g0[i]) == bool(fire.float().mean() > 0.3)


def test_save_load_round_trip_and_old_files(tmp_path):
    for spec in SPECS:
        g = _guardrail(spec)
        loaded = Guardrail.load(g.save(tmp_path / spec.kind))
        assert loaded.gate == spec and loaded.tau == g.tau
        s0, g0, _ = _run(g, SEQS, 5, "right")
        s1, g1, _ = _run(loaded, SEQS, 5, "right")
        torch.testing.assert_close(s0, s1) and torch.equal(g0, g1)
    # a file written before gate variants existed (no "gate" key) loads as the fraction gate
    spec_path = tmp_path / "fraction" / "guardrail.json"
    d = json.loads(spec_path.read_text())
    d.pop("gate")
    spec_path.write_text(json.dumps(d))
    assert Guardrail.load(tmp_path / "fraction").gate == GateSpec("fraction")


def test_sessions_refuse_other_variants():
    from dsg_tl.batching import pad_batch as pb

    prompt = pb(SEQS[:2], PAD, special_ids=SPECIAL)
    for spec in SPECS[1:]:
        with _guardrail(spec).attach(_tiny.tiny_model()) as handle:
            with pytest.raises(NotImplementedError, match="fraction"), handle.generation(prompt):
                pass
    with _guardrail(SPECS[0]).attach(_tiny.tiny_model()) as handle, handle.generation(prompt):
        pass


def test_per_turn_without_tokens_fails_loudly():
    model = _tiny.tiny_model()
    with _guardrail(SPECS[2]).attach(model) as handle, pytest.raises(ValueError, match="token ids"):
        handle.set_batch(None)
        model(torch.tensor([SEQS[0]]))


# ================================================================================================ calibration


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_calibration_fpr_at_most_alpha_on_calibration_set(spec):
    cal = _tiny.random_seqs(40, seed=2, min_len=4, max_len=20, eos_every=5)
    held, forget = SEQS[:5], SEQS[5:]
    g = _guardrail(GateSpec(spec.kind, window=spec.window, separator_ids=spec.separator_ids))
    tuned, report, stats = calibrate(_tiny.tiny_model(tokenizer=True), g, calibration=cal, heldout=held,
                                     forget=forget, p_dyn=80, batch_size=7)
    stat, count = sequence_gate_stats(_tiny.tiny_model(tokenizer=True), tuned, cal)
    torch.testing.assert_close(stat, stats["calibration"])
    fpr = float(gate_decision(tuned.gate, tuned.tau, stat, count).float().mean())
    assert fpr <= 0.2 + 1e-6
    assert report.gate == spec.kind and tuned.gate.kind == spec.kind
    if spec.kind == "hybrid":
        assert tuned.gate.k_min is not None and report.k_min == tuned.gate.k_min
    # hook_rho carries the variant's statistic: the probe agrees with gate_statistic on the hook's firing vector
    assert torch.equal(sequence_rho(_tiny.tiny_model(tokenizer=True), tuned, cal), stat)


def test_long_sequences_go_through_windows():
    n, ctx = 70, 32  # the tiny model's n_ctx is 32
    spans = _windows(n, ctx)
    covered = [p for start, end, first_new in spans for p in range(first_new, end)]
    assert covered == list(range(1, n)) and all(end - start <= ctx for start, end, _ in spans)
    assert all(end - (start if start == 0 else start - 1) <= ctx for start, end, _ in spans)
    long = _tiny.random_seqs(3, seed=3, min_len=n, max_len=n, eos_every=0)
    short = [s[:ctx] for s in long]
    g = _guardrail(GateSpec())
    model = _tiny.tiny_model(tokenizer=True)
    stat_long, count_long = sequence_gate_stats(model, g, long)
    stat_short, count_short = sequence_gate_stats(model, g, short)
    assert (count_long >= count_short).all()  # the first window is the short sequence itself
    counted = torch.tensor([len(s) - 1 for s in long], dtype=torch.float)  # BOS never counts
    torch.testing.assert_close(stat_long, count_long.float() / counted, atol=1e-6, rtol=0)
    # forcing windows on sequences that fit: the statistic stays a fraction of the same counted tokens
    s2, c2 = sequence_gate_stats(model, g, short, context=16)
    torch.testing.assert_close(s2, c2.float() / (ctx - 1), atol=1e-6, rtol=0)
    # a windowed gate sees the windows too: the max window fraction is at least the whole-sequence fraction
    w_stat, _ = sequence_gate_stats(model, _guardrail(GateSpec("windowed", window=8)), long)
    assert (w_stat >= stat_long - 1e-6).all()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_stats_from_fire_match_the_hook(spec):
    """Firing vectors computed once give every variant's statistic, equal to the hook's (short and long sequences)."""
    seqs = SEQS + _tiny.random_seqs(2, seed=4, min_len=50, max_len=60, eos_every=0)
    gl = [max(2, len(s) - 3) for s in seqs]
    g = _guardrail(spec)
    model = _tiny.tiny_model(tokenizer=True)
    fm = sequence_fire(model, g, seqs, gate_lengths=gl, batch_size=4)
    assert [len(f) for f, _ in fm] == [len(s) for s in seqs] and not any(m[0] for _, m in fm)
    stat, count = stats_from_fire(g.gate, seqs, fm)
    ref_stat, ref_count = sequence_gate_stats(model, g, seqs, gate_lengths=gl, batch_size=3)
    torch.testing.assert_close(stat, ref_stat, atol=1e-6, rtol=0)
    assert torch.equal(count, ref_count)


# ================================================================================================ Hugging Face path


def test_hf_guardrail_variants_match_transformer_lens(tmp_path_factory, tmp_path):
    """Every gate variant gives the same statistic and decisions through plain HF hooks as through TransformerLens."""
    import standins
    from test_hf_guardrail import Setup, _sae

    from dsg_tl.hf_guardrail import HFGuardrail

    s = Setup(standins.cached("gpt2", tmp_path_factory))
    sae = _sae(tmp_path, "blocks.0.hook_resid_post")
    sep = int(s.batch.tokens[0, 3])
    latents = torch.arange(8)
    for spec in (GateSpec("windowed", window=3), GateSpec("per_turn", separator_ids=(sep,)),
                 GateSpec("hybrid", k_min=4)):
        g = Guardrail.from_selection(sae, latents, tau=0.5, c=8.0, gate=spec)
        tl_out = s.tl_logits(g)
        tl_gate = s.tl_gate
        with HFGuardrail(Guardrail.load(g.save(tmp_path / spec.kind))).attach(s.hf, s.tok) as handle:
            hf_out = s.hf_logits()
            assert torch.equal(handle.last_gate, tl_gate), spec.kind
            hf_stat = handle.last_rho.clone()
        stat, _ = sequence_gate_stats(s.tl, g, [row[m].tolist() for row, m in zip(s.batch.tokens, s.real, strict=True)])
        torch.testing.assert_close(hf_stat, stat, atol=1e-5, rtol=0)
        assert s.max_diff(hf_out, tl_out) < 1e-4
