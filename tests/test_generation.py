"""Guarded generation (dsg_tl.evaluation.generation) and the guardrail's generation sessions on a tiny model.

Semantics under test: at step t the gate is over prompt + generated tokens so far (rho_t > tau), the newest token is
clamped iff gated_t, earlier positions keep the decision of their own step. The KV-cache loop, the no-cache loop and
an independent no-cache reference written here (plain hook, full SAE encode/decode) must agree step by step.
"""

from __future__ import annotations

import functools

import _tiny
import pytest
import torch
from _tiny import BOS, EOS, HOOK, PAD, SPECIAL

from dsg_tl.batching import TokenBatch, pad_batch
from dsg_tl.evaluation.generation import guarded_generate, left_align
from dsg_tl.guardrail import Guardrail

SEQS = _tiny.random_seqs(8, seed=0, eos_every=3)  # for choosing gate latents, as in test_guardrail
PROMPTS = [[BOS, 5, 6, 7], [BOS, 8, 9, 10, 11, 12, 13, 14], [BOS, 20, 21, 22, 23, 24]]  # 3 lengths
STEPS = 12
C = 3.0
KINDS = ["standard", "jumprelu"]


def prompt_batch(prompts=PROMPTS, side="left") -> TokenBatch:
    return pad_batch(prompts, PAD, special_ids=SPECIAL, padding_side=side)


@functools.cache
def setup(kind: str):
    """(sae, 3 gate latents firing on 10-30 % of content tokens)."""
    sae = {"standard": _tiny.standard_sae, "jumprelu": _tiny.jumprelu_sae}[kind](seed=0)
    model = _tiny.tiny_model()
    with torch.no_grad():
        acts = [sae.encode(_tiny.hook_acts(model, s))[torch.tensor([t not in SPECIAL for t in s])] for s in SEQS]
    freq = (torch.cat(acts) > 0).float().mean(0)
    latents = [j for j in range(_tiny.D_SAE) if 0.1 <= freq[j] <= 0.3][:3]
    assert len(latents) == 3
    return sae, torch.tensor(latents)


def make(kind: str, tau: float, **kw) -> Guardrail:
    sae, latents = setup(kind)
    return Guardrail.from_selection(sae, latents, tau=tau, c=C, **kw)


@functools.cache
def flip_tau(kind: str) -> float:
    """A tau at which some sequence is ungated on its prompt and becomes gated while generating.

    Under tau = inf nothing is clamped; take a row whose running rho first rises above everything before it at step
    k >= 1 and put tau between. Up to step k that row is ungated under tau too (so it generates the same tokens as
    under tau = inf, and its rho follows the same path), and at step k it is gated: a guaranteed False -> True flip.
    """
    res = guarded_generate(_tiny.tiny_model(), make(kind, float("inf")), prompt_batch(), STEPS, stop_at_eos=False)
    rho = torch.stack(res.rho_history, 1)
    for row in rho:
        for k in range(1, len(row)):
            before = float(row[:k].max())
            if float(row[k]) > before:
                return (before + float(row[k])) / 2
    raise AssertionError("no rising rho trajectory: pick other prompts")


# ------------------------------------------------------------------------------------------ independent reference


@torch.no_grad()
def reference_generate(model, kind: str, tau: float, mode: str, clamp_positions: str, prompt: TokenBatch, steps: int):
    """No-cache greedy loop with the per-step semantics, written from the definition with the full SAE.

    Each step runs the whole sequence; at the hook: a = SAE.encode(h), fire = any gate latent > 0 on content tokens,
    rho over all content tokens so far, d_t = rho > tau (or True); positions are clamped under their own step's
    decision (prompt: d_0, generated token j: d_j), h' = SAE.decode(a') + (h - SAE.decode(a)) there, h elsewhere.
    """
    sae, latents = setup(kind)
    tokens, attn, content = prompt.tokens, prompt.attention_mask, prompt.content_mask
    b, width = tokens.shape
    past_gate = torch.zeros(b, 0, dtype=torch.bool)
    decisions, rhos, logits_out, special = [], [], [], torch.tensor(SPECIAL)
    for _ in range(steps):
        seen = {}

        def hook(h, hook, content=content, past_gate=past_gate, seen=seen):
            a = sae.encode(h)
            fire = (a[..., latents] > 0).any(-1) & content
            r = (fire & content).sum(-1).float() / content.sum(-1).clamp(min=1).float()
            d = r > tau if mode == "dynamic" else torch.ones(b, dtype=torch.bool)
            pos = torch.cat([past_gate, d[:, None].expand(-1, h.shape[1] - past_gate.shape[1])], 1)
            where = (fire if clamp_positions == "active" else content) & pos
            a2 = a.clone()
            a2[..., latents] = torch.where(where[..., None], torch.full_like(a[..., latents], -C), a[..., latents])
            seen.update(d=d, r=r, pos=pos)
            return torch.where(pos[..., None], sae.decode(a2) + (h - sae.decode(a)), h)

        logits = model.run_with_hooks(tokens, attention_mask=attn, fwd_hooks=[(HOOK, hook)])
        decisions.append(seen["d"])
        rhos.append(seen["r"])
        past_gate = seen["pos"]
        last = logits[:, -1]
        logits_out.append(last)
        nxt = last.argmax(-1)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        attn = torch.cat([attn, torch.ones(b, 1, dtype=attn.dtype)], 1)
        content = torch.cat([content, ~torch.isin(nxt, special)[:, None]], 1)
    return tokens, decisions, rhos, torch.stack(logits_out, 1)


@torch.no_grad()
def plain_loop(model, prompt: TokenBatch, steps: int, guardrail: Guardrail | None = None):
    """No-cache greedy loop, no session: every forward is gated on its own (whole) sequence via set_batch."""
    tokens, attn, content = prompt.tokens, prompt.attention_mask, prompt.content_mask
    logits_out = []
    ctx = guardrail.attach(model) if guardrail is not None else None
    handle = ctx.__enter__() if ctx is not None else None
    try:
        for _ in range(steps):
            if handle is not None:
                handle.set_batch(TokenBatch(tokens, attn, content))
            last = model(tokens, attention_mask=attn)[:, -1]
            logits_out.append(last)
            nxt = last.argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
            content = torch.cat([content, ~torch.isin(nxt, torch.tensor(SPECIAL))[:, None]], 1)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return tokens, torch.stack(logits_out, 1)


# ============================================================================================ dynamic: step by step


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("clamp_positions", ["active", "all"])
def test_kv_cache_matches_no_cache_step_by_step(kind, path, clamp_positions):
    tau = flip_tau(kind)
    g = make(kind, tau, path=path, clamp_positions=clamp_positions)
    prompt = prompt_batch()
    model = _tiny.tiny_model()
    kv = guarded_generate(model, g, prompt, STEPS, use_kv_cache=True, stop_at_eos=False, return_logits=True)
    nc = guarded_generate(model, g, prompt, STEPS, use_kv_cache=False, stop_at_eos=False, return_logits=True)
    ref_tokens, ref_d, ref_rho, ref_logits = reference_generate(model, kind, tau, "dynamic", clamp_positions,
                                                                prompt, STEPS)
    assert kv.new_tokens.shape == (3, STEPS) and len(kv.gate_history) == STEPS
    gated = kv.gated
    assert (~gated[:, :-1] & gated[:, 1:]).any(), "the constructed tau must flip some sequence to gated"
    # the three loops: same tokens, same decisions, same logits
    assert torch.equal(kv.tokens, nc.tokens) and torch.equal(kv.tokens, ref_tokens)
    assert torch.equal(gated, nc.gated) and torch.equal(gated, torch.stack(ref_d, 1))
    torch.testing.assert_close(torch.stack(kv.rho_history, 1), torch.stack(ref_rho, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(kv.logits, nc.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(kv.logits, ref_logits, atol=1e-5, rtol=0)
    # at every step: the gate recomputed without cache on the whole sequence so far (set_batch, no session)
    width = prompt.tokens.shape[1]
    with g.attach(model) as handle, torch.no_grad():
        for t in range(STEPS):
            content = torch.cat([prompt.content_mask, kv.new_content[:, :t]], 1)
            seq = TokenBatch(kv.tokens[:, : width + t], torch.ones_like(content, dtype=torch.long), content)
            seq.attention_mask[:, :width] = prompt.attention_mask
            handle.set_batch(seq)
            model(seq.tokens, attention_mask=seq.attention_mask)
            assert torch.equal(handle.last_gate, kv.gate_history[t]), t
            assert torch.equal(handle.last_gate, handle.last_rho > tau)
            torch.testing.assert_close(handle.last_rho, kv.rho_history[t], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_gate_can_switch_off_while_generating(kind):
    """Some tau gates a sequence and later ungates it; KV and no-cache still agree (True -> False flips)."""
    model = _tiny.tiny_model()
    prompt = prompt_batch()
    rho = torch.stack(guarded_generate(model, make(kind, float("inf")), prompt, STEPS, stop_at_eos=False).rho_history)
    values = sorted(set(rho.flatten().tolist()))
    for lo, hi in zip(values, values[1:]):
        g = make(kind, (lo + hi) / 2)
        kv = guarded_generate(model, g, prompt, STEPS, stop_at_eos=False)
        if (kv.gated[:, :-1] & ~kv.gated[:, 1:]).any():
            break
    else:
        pytest.fail("no tau switches a sequence off")
    nc = guarded_generate(model, g, prompt, STEPS, use_kv_cache=False, stop_at_eos=False)
    ref_tokens, ref_d, _, _ = reference_generate(model, kind, g.tau, "dynamic", "active", prompt, STEPS)
    assert torch.equal(kv.tokens, nc.tokens) and torch.equal(kv.tokens, ref_tokens)
    assert torch.equal(kv.gated, nc.gated) and torch.equal(kv.gated, torch.stack(ref_d, 1))


# ============================================================================ never / always gated: bit-equal tokens


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_tau_inf_is_plain_greedy(kind, path):
    model = _tiny.tiny_model()
    prompt = prompt_batch()
    plain = guarded_generate(model, None, prompt, STEPS, stop_at_eos=False, return_logits=True)
    g = make(kind, float("inf"), path=path)
    for kv in (True, False):
        res = guarded_generate(model, g, prompt, STEPS, use_kv_cache=kv, stop_at_eos=False, return_logits=True)
        assert not res.gated.any()
        if kv:
            assert torch.equal(res.tokens, plain.tokens) and torch.equal(res.logits, plain.logits)
        ref_tokens, ref_logits = plain_loop(model, prompt, STEPS)
        assert torch.equal(res.tokens, ref_tokens)
        torch.testing.assert_close(res.logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("clamp_positions", ["active", "all"])
def test_static_mode_matches_per_forward_guardrail(kind, path, clamp_positions):
    """Static mode: always gated, so the session semantics coincide with gating each full forward on its own."""
    model = _tiny.tiny_model()
    prompt = prompt_batch()
    g = make(kind, float("inf"), mode="static", path=path, clamp_positions=clamp_positions)
    ref_tokens, ref_logits = plain_loop(model, prompt, STEPS, g)
    plain = guarded_generate(model, None, prompt, STEPS, stop_at_eos=False, return_logits=True)
    for kv in (True, False):
        res = guarded_generate(model, g, prompt, STEPS, use_kv_cache=kv, stop_at_eos=False, return_logits=True)
        assert res.gated.all()
        assert torch.equal(res.tokens, ref_tokens)
        torch.testing.assert_close(res.logits, ref_logits, atol=1e-5, rtol=0)
    assert (res.logits - plain.logits).abs().max() > 1e-3  # the clamp does something


# ==================================================================================== padding, EOS, plain greedy


@pytest.mark.parametrize("kv", [True, False])
def test_batched_left_padding_equals_one_by_one(kv):
    model = _tiny.tiny_model()
    g = make("jumprelu", flip_tau("jumprelu"))
    batched = guarded_generate(model, g, prompt_batch(), STEPS, use_kv_cache=kv, stop_at_eos=False,
                               return_logits=True)
    right = guarded_generate(model, g, prompt_batch(side="right"), STEPS, use_kv_cache=kv, stop_at_eos=False)
    assert torch.equal(right.tokens, batched.tokens)  # a right-padded TokenBatch is left-aligned first
    assert torch.equal(right.prompt.content_mask, batched.prompt.content_mask)
    for i, p in enumerate(PROMPTS):
        one = guarded_generate(model, g, prompt_batch([p]), STEPS, use_kv_cache=kv, stop_at_eos=False,
                               return_logits=True)
        assert torch.equal(one.new_tokens[0], batched.new_tokens[i])
        assert torch.equal(one.gated[0], batched.gated[i])
        torch.testing.assert_close(one.logits[0], batched.logits[i], atol=1e-5, rtol=0)
    # pad positions never count: the prompt's counted tokens are its content tokens
    with torch.no_grad(), g.attach(model) as handle, handle.generation(prompt_batch()):
        model(prompt_batch().tokens, attention_mask=prompt_batch().attention_mask)
        state = handle.generation_state
    assert state.counted.tolist() == [len(p) - 1 for p in PROMPTS]


def test_left_align():
    b = prompt_batch(side="right")
    b.gate_mask = b.content_mask.clone()
    b.gate_mask[:, -1] = False
    out = left_align(b)
    ref = prompt_batch(side="left")
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.attention_mask, ref.attention_mask)
    assert torch.equal(out.content_mask, ref.content_mask)
    assert out.gate_mask.sum() == b.gate_mask.sum()
    assert left_align(ref) is ref


@pytest.mark.parametrize("kv", [True, False])
def test_stop_at_eos_per_sequence(kv):
    model = _tiny.tiny_model()
    prompt = prompt_batch()
    plain = guarded_generate(model, None, prompt, STEPS, stop_at_eos=False)
    eos = int(plain.new_tokens[1, 2])  # pretend the third token of sequence 1 is EOS
    g = make("standard", flip_tau("standard"))
    free = guarded_generate(model, g, prompt, STEPS, use_kv_cache=kv, stop_at_eos=False)
    with g.attach(model) as handle:
        res = guarded_generate(model, handle, prompt, STEPS, use_kv_cache=kv, eos_token_id=eos, pad_token_id=PAD)
        state = handle.generation_state
    first = [int((row == eos).nonzero()[0]) + 1 if (row == eos).any() else None for row in free.new_tokens]
    assert first[1] is not None and first[1] <= 3
    n = res.new_tokens.shape[1]
    assert n == (STEPS if None in first else max(first)) and n > first[1]  # the batch ran on
    assert len(res.gate_history) == n
    for i, f in enumerate(first):
        stop = f or n
        assert int(res.lengths[i]) == stop
        assert torch.equal(res.new_tokens[i, :stop], free.new_tokens[i, :stop])  # same tokens up to EOS
        assert torch.equal(res.gated[i, :stop], free.gated[i, :stop])
        assert (res.new_tokens[i, stop:] == PAD).all()
        if f is not None:  # the EOS and what follows it are not content
            assert res.new_tokens[i, f - 1] == eos and not res.new_content[i, f - 1 :].any()
            assert res.new_content[i, : f - 1].all()
    # EOS and everything after it never counted; pads never counted
    assert state.counted.tolist() == (prompt.content_mask.sum(-1) + res.new_content[:, :-1].sum(-1)).tolist()


@pytest.mark.parametrize("kv", [True, False])
def test_plain_guarded_generate_equals_transformer_lens_greedy(kv):
    model = _tiny.tiny_model(tokenizer=True)
    prompt = torch.tensor([PROMPTS[1]])
    tl = model.generate(prompt, max_new_tokens=10, do_sample=False, use_past_kv_cache=kv, verbose=False)
    ours = guarded_generate(model, None, TokenBatch(prompt, torch.ones_like(prompt), prompt != BOS), 10,
                            use_kv_cache=kv)
    assert ours.gate_history == [] and ours.texts is None  # the stand-in tokenizer cannot decode
    assert torch.equal(ours.tokens, tl)


def test_session_works_with_transformer_lens_generate():
    """handle.generation() + model.generate(use_past_kv_cache=True): every new token counts (no set_step_masks)."""
    model = _tiny.tiny_model(tokenizer=True)
    model.tokenizer.padding_side = "left"  # how model.generate reads padding of a token tensor
    prompt = prompt_batch()
    g = make("standard", flip_tau("standard"))
    ours = guarded_generate(model, g, prompt, STEPS, stop_at_eos=False)
    assert ours.new_content.all()  # no special token generated, so the default masks are the right ones
    with g.attach(model) as handle, handle.generation(prompt):
        tl = model.generate(prompt.tokens, max_new_tokens=STEPS, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(tl, ours.tokens)
    assert torch.equal(torch.stack(handle.gate_history, 1), ours.gated)


class CharTokenizer:
    bos_token_id, eos_token_id, pad_token_id, padding_side = BOS, EOS, PAD, "right"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(ch) - ord("a") for ch in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i - 3) for i in ids if not (skip_special_tokens and i in SPECIAL + (PAD,)))


def test_text_prompts_and_texts():
    model = _tiny.tiny_model()
    model.tokenizer = CharTokenizer()
    res = guarded_generate(model, make("standard", flip_tau("standard")), ["abc", "hello", "xy"], 6)
    ids = [[BOS, *CharTokenizer()(t)["input_ids"]] for t in ["abc", "hello", "xy"]]
    again = guarded_generate(model, make("standard", flip_tau("standard")), prompt_batch(ids), 6)
    assert torch.equal(res.tokens, again.tokens) and res.texts == again.texts
    assert res.texts == [CharTokenizer().decode(r[: int(n)].tolist()) for r, n in zip(res.new_tokens, res.lengths)]


# ===================================================================================== session API / no leakage


def test_outside_a_session_behaviour_is_unchanged():
    model = _tiny.tiny_model()
    g = make("standard", flip_tau("standard"))
    batch = prompt_batch()
    with g.attach(model) as handle, torch.no_grad():
        handle.set_batch(batch)
        before = model(batch.tokens, attention_mask=batch.attention_mask)
        gate_before = handle.last_gate
        with handle.generation(batch):
            model(batch.tokens, attention_mask=batch.attention_mask)
            assert handle.session is not None
        assert handle.session is None and len(handle.gate_history) == 1
        after = model(batch.tokens, attention_mask=batch.attention_mask)
        assert torch.equal(before, after) and torch.equal(handle.last_gate, gate_before)
        assert len(handle.gate_history) == 1  # forwards outside a session are not recorded


def test_session_errors():
    model = _tiny.tiny_model()
    g = make("standard", 0.3)
    batch = prompt_batch()
    with g.attach(model) as handle:
        with pytest.raises(RuntimeError, match="session"):
            handle.set_step_masks(torch.ones(3, 1, dtype=torch.bool))
        with handle.generation(batch):
            with pytest.raises(RuntimeError, match="already active"), handle.generation(batch):
                pass
            with pytest.raises(ValueError, match="prompt"):
                model(batch.tokens[:, 1:])
        with handle.generation(batch, kv_cache=False):
            model(batch.tokens, attention_mask=batch.attention_mask)
            with pytest.raises(ValueError, match="already seen"):
                model(batch.tokens, attention_mask=batch.attention_mask)  # no new token
        with handle.generation(batch):
            model(batch.tokens, attention_mask=batch.attention_mask)
            handle.set_step_masks(torch.ones(3, 2, dtype=torch.bool))
            with pytest.raises(ValueError, match="set_step_masks"):
                model(torch.full((3, 1), 5))
    with pytest.raises(ValueError, match="max_new_tokens"):
        guarded_generate(model, None, batch, 0)
    with pytest.raises(ValueError, match="n_ctx"):
        guarded_generate(model, None, batch, 40, eos_token_id=EOS)
    with pytest.raises(ValueError, match="eos"):
        guarded_generate(model, None, batch, 3)  # no tokenizer, no eos_token_id
