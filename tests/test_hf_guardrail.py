"""The guardrail on a plain Hugging Face model (dsg_tl.hf_guardrail) matches the TransformerLens path.

GPT-2 and Llama stand-ins (random weights, saved with save_pretrained) are loaded twice: as a Hugging Face causal LM
and through ``dsg_tl.models.load_model`` (TransformerLens, no weight processing). A guardrail built on a JumpReLU
stand-in SAE is saved, loaded back without its SAE and attached to both; logits must agree at every real token.
"""

from __future__ import annotations

import pytest
import standins
import torch

from dsg_tl.batching import pad_batch
from dsg_tl.guardrail import Guardrail
from dsg_tl.hf_guardrail import HFGuardrail, content_mask_from_ids, guarded_forward, hf_module_for_hook
from dsg_tl.models import ModelSpec, load_model

torch.set_num_threads(1)

TEXTS = ["The cat sat on the mat.", "Proteins fold into shapes in the cell.", "Paris is the capital of France.",
         "Computer security covers networks and passwords.", "The dog ran in the park.", "Rome is the capital."]
C = 8.0
ATOL = 1e-4


class Setup:
    """One stand-in loaded as HF and as TransformerLens, plus a padded batch and the bare logits of both."""

    def __init__(self, model_dir):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.dir = model_dir
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        self.tl = load_model(ModelSpec(name=str(model_dir))).eval()
        bos, eos = self.tok.bos_token_id, self.tok.eos_token_id
        seqs = [[bos, *self.tok(t, add_special_tokens=False)["input_ids"]] for t in TEXTS]
        seqs[1] = [*seqs[1], eos]  # one sequence ends with EOS (excluded from the content mask)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else eos
        self.batch = pad_batch(seqs, pad, special_ids=(bos, eos))
        self.real = self.batch.attention_mask.bool()
        with torch.no_grad():
            self.hf_bare = self.hf_logits()
            self.tl_bare = self.tl_logits()

    def hf_logits(self) -> torch.Tensor:
        with torch.no_grad():
            return self.hf(input_ids=self.batch.tokens, attention_mask=self.batch.attention_mask).logits

    def tl_logits(self, guardrail: Guardrail | None = None) -> torch.Tensor:
        with torch.no_grad():
            if guardrail is None:
                return self.tl(self.batch.tokens, attention_mask=self.batch.attention_mask)
            with guardrail.attach(self.tl) as handle:
                handle.set_batch(self.batch)
                out = self.tl(self.batch.tokens, attention_mask=self.batch.attention_mask)
                self.tl_gate = handle.last_gate.clone()
                return out

    def max_diff(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b)[self.real].abs().max())


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, tmp_path_factory):
    return Setup(standins.cached(request.param, tmp_path_factory))


def _sae(tmp_path, hook_name: str):
    from sae_lens import SAE

    return SAE.load_from_disk(str(standins.build_sae(tmp_path / "sae", d_in=standins.D_MODEL, hook_name=hook_name,
                                                     threshold=0.05))).eval()


def _pick_latent_and_tau(s: Setup, sae) -> tuple[torch.Tensor, float]:
    """The latent whose rho varies most across the batch, and a tau that gates some sequences but not all."""
    hook = sae.cfg.metadata.hook_name
    with torch.no_grad():
        _, cache = s.tl.run_with_cache(s.batch.tokens, attention_mask=s.batch.attention_mask, names_filter=hook)
        fire = (sae.encode(cache[hook]) > 0) & s.batch.content_mask[..., None]  # [batch, pos, d_sae]
    rho = fire.sum(1).float() / s.batch.content_mask.sum(1, keepdim=True).float()  # [batch, d_sae]
    n_distinct = torch.tensor([len(torch.unique(rho[:, j])) for j in range(rho.shape[1])])
    j = int((n_distinct * 10 + rho.std(0)).argmax())
    values = torch.unique(rho[:, j])
    assert len(values) >= 2, "no latent separates the sequences"
    mid = len(values) // 2
    return torch.tensor([j]), float((values[mid - 1] + values[mid]) / 2)


@pytest.mark.parametrize("hook_name", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
def test_hf_guardrail_matches_transformer_lens(setup, tmp_path, hook_name):
    s = setup
    assert s.max_diff(s.hf_bare, s.tl_bare) < ATOL  # the two loaders agree before any guardrail
    sae = _sae(tmp_path, hook_name)
    latent, tau = _pick_latent_and_tau(s, sae)
    kind = s.dir.name
    for label, t in (("ungated", float("inf")), ("gated", tau)):
        g = Guardrail.from_selection(sae, latent, tau=t, c=C)
        hf_g = HFGuardrail.load(g.save(tmp_path / f"g_{label}"))  # no SAE: the saved latent slice
        assert hf_g.guardrail.sae is None and hf_g.guardrail.path == "fast"
        tl_out = s.tl_logits(Guardrail.load(tmp_path / f"g_{label}"))
        with hf_g.attach(s.hf, s.tok) as handle:
            hf_auto = s.hf_logits()  # masks derived from the call's ids and attention mask
            gate = handle.last_gate.clone()
            handle.set_batch(s.batch)  # explicit masks give the same result
            hf_explicit = s.hf_logits()
            handle.set_batch(None)
            hf_call = handle(s.batch.tokens, s.batch.attention_mask).logits
        hf_once = guarded_forward(s.hf, hf_g, s.batch.tokens, s.batch.attention_mask, tokenizer=s.tok).logits
        for other in (hf_explicit, hf_call, hf_once):
            assert torch.equal(other, hf_auto)
        assert torch.equal(gate, s.tl_gate)
        diff = s.max_diff(hf_auto, tl_out)
        rows = gate[:, None] & s.real
        diff_gated = float((hf_auto - tl_out)[rows].abs().max()) if rows.any() else float("nan")
        change = float((hf_auto - s.hf_bare)[rows].abs().max()) if rows.any() else 0.0
        print(f"\n{kind} {hook_name} {label}: max |dlogit| HF vs TL = {diff:.2e} (gated rows {diff_gated:.2e}); "
              f"gated {gate.tolist()}; max change vs bare {change:.2e}")
        assert diff < ATOL
        if label == "ungated":
            assert not gate.any()
            assert torch.equal(hf_auto, s.hf_bare)  # ungated: exactly the bare model
        else:
            assert gate.any() and not gate.all()
            per_seq = ((hf_auto - s.hf_bare).abs() * s.real[..., None]).amax((1, 2))
            assert (per_seq[gate] > 1e-2).all()  # gated sequences changed
            assert (per_seq[~gate] == 0).all()  # the others are untouched


def test_resid_post_is_layer_output(setup):
    """TL's blocks.L.hook_resid_post (no processing) is HF's output of layer L, the last layer included."""
    s = setup
    n = s.tl.cfg.n_layers
    names = [f"blocks.{L}.hook_resid_post" for L in range(n)] + [f"blocks.{L}.hook_resid_pre" for L in range(n)]
    with torch.no_grad():
        _, cache = s.tl.run_with_cache(s.batch.tokens, attention_mask=s.batch.attention_mask,
                                       names_filter=lambda x: x in names)
    seen, removables = {}, []
    for name in names:
        module, kind = hf_module_for_hook(s.hf, name)
        if kind == "output":
            removables.append(module.register_forward_hook(
                lambda m, a, out, name=name: seen.__setitem__(name, out[0] if isinstance(out, tuple) else out)))
        else:
            removables.append(module.register_forward_pre_hook(
                lambda m, a, kw, name=name: seen.__setitem__(name, a[0] if a else kw["hidden_states"]),
                with_kwargs=True))
    try:
        with torch.no_grad():
            hidden = s.hf(input_ids=s.batch.tokens, attention_mask=s.batch.attention_mask,
                          output_hidden_states=True).hidden_states
    finally:
        for r in removables:
            r.remove()
    for name in names:
        assert float((seen[name] - cache[name])[s.real].abs().max()) < 1e-4, name
    # hidden_states[L + 1] is layer L's output except for the last layer, where the final norm is applied
    assert float((hidden[1] - cache["blocks.0.hook_resid_post"])[s.real].abs().max()) < 1e-4
    assert float((hidden[-1] - cache[f"blocks.{n - 1}.hook_resid_post"])[s.real].abs().max()) > 1e-2


def _counts(model) -> tuple[int, ...]:
    return tuple(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_after_exception(setup, tmp_path):
    s = setup
    sae = _sae(tmp_path, "blocks.0.hook_resid_post")
    hf_g = HFGuardrail(Guardrail.from_selection(sae, torch.tensor([0, 1]), tau=0.0, c=C, mode="static",
                                                clamp_positions="all"))
    before = _counts(s.hf)
    with pytest.raises(RuntimeError, match="boom"), hf_g.attach(s.hf, s.tok):
        assert _counts(s.hf) != before
        changed = s.hf_logits()
        raise RuntimeError("boom")
    assert _counts(s.hf) == before
    module, _ = hf_module_for_hook(s.hf, "blocks.0.hook_resid_post")
    assert not hasattr(module, "_dsg_hf_guardrail")
    assert not torch.equal(changed, s.hf_bare)
    assert torch.equal(s.hf_logits(), s.hf_bare)
    # attaching twice at once is refused, and the refused attach leaves the first one working
    with hf_g.attach(s.hf, s.tok):
        with pytest.raises(RuntimeError, match="already attached"), hf_g.attach(s.hf, s.tok):
            pass
        assert torch.equal(s.hf_logits(), changed)
    assert _counts(s.hf) == before


def test_mask_errors(setup, tmp_path):
    s = setup
    hf_g = HFGuardrail(Guardrail.from_selection(_sae(tmp_path, "blocks.0.hook_resid_post"), torch.tensor([0]),
                                                tau=0.0, c=C, mode="static"))
    with hf_g.attach(s.hf, s.tok) as handle:
        handle.set_batch(pad_batch([[5, 6, 7]], 0))
        with pytest.raises(ValueError, match="set_batch"):
            s.hf_logits()
        handle.set_batch(None)
        # one KV-cache decoding step (the new token only, the full attention mask) is refused
        with pytest.raises(RuntimeError, match="KV cache"), torch.no_grad():
            s.hf(input_ids=s.batch.tokens[:, -1:], attention_mask=s.batch.attention_mask)
    assert torch.equal(content_mask_from_ids(s.batch.tokens, s.batch.attention_mask,
                                             [s.tok.bos_token_id, s.tok.eos_token_id]), s.batch.content_mask)


def test_hook_mapping_errors(setup):
    s = setup
    layers = s.hf.transformer.h if hasattr(s.hf, "transformer") else s.hf.model.layers
    assert hf_module_for_hook(s.hf, "blocks.1.hook_resid_post") == (layers[1], "output")
    assert hf_module_for_hook(s.hf, "blocks.0.hook_resid_pre") == (layers[0], "input")
    with pytest.raises(ValueError, match="unsupported hook name"):
        hf_module_for_hook(s.hf, "blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match="2 decoder layers"):
        hf_module_for_hook(s.hf, "blocks.2.hook_resid_post")
    with pytest.raises(ValueError, match="unsupported architecture"):
        hf_module_for_hook(torch.nn.Linear(2, 2), "blocks.0.hook_resid_post")


def test_slice_with_extra_latents(setup, tmp_path):
    """A loaded slice may hold more latents than the guardrail uses (``with_`` to a subset): columns by latent id."""
    s = setup
    sae = _sae(tmp_path, "blocks.0.hook_resid_post")
    hook = "blocks.0.hook_resid_post"
    with torch.no_grad():
        _, cache = s.tl.run_with_cache(s.batch.tokens, attention_mask=s.batch.attention_mask, names_filter=hook)
        counts = ((sae.encode(cache[hook]) > 0) & s.batch.content_mask[..., None]).sum((0, 1))
    top = torch.sort(counts.argsort(descending=True)[:3]).values  # three latents that fire, sorted
    assert (counts[top] > 0).all()
    saved = Guardrail.from_selection(sae, top, tau=0.0, c=C).save(tmp_path / "g")
    subset = Guardrail.load(saved).with_(gate_latents=top[-1:])  # the last column of the saved slice
    assert subset.slice.latents.tolist() == top.tolist()
    fresh = Guardrail.from_selection(sae, top[-1:], tau=0.0, c=C)
    outs = [guarded_forward(s.hf, g, s.batch.tokens, s.batch.attention_mask, tokenizer=s.tok).logits
            for g in (subset, fresh)]
    assert not torch.equal(outs[1], s.hf_bare)
    assert torch.equal(outs[0], outs[1])
