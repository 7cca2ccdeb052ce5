"""Can any SAE latent tell the forget domain's knowledge apart? Firing rates at entity-name tokens, per domain.

A gate built from latents can only be as selective as the latents are. This measures, over each domain's MCQ
questions (the text the gate sees at evaluation):

- per latent, the fraction of *entity-name* tokens at which it fires (the subject of the knowledge: the only place a
  question names which domain it is about), and the fraction of the other tokens;
- the best single latent for the forget domain: highest forget-entity firing rate minus the highest rate at any other
  domain's entity tokens;
- for a latent set (the selection), the fraction of tokens at which *any* of them fires, per domain and position kind:
  the union that the gate's rho counts, so each latent's few false firings add up.

A latent "fires" when its activation is > 0, as in the gate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from dsg_tl.batching import pad_batch
from dsg_tl.data.types import MCQItem
from dsg_tl.stats import sae_input


def entity_mask(tokenizer, question: str, entity: str) -> tuple[list[int], Bool[Tensor, " seq"]]:
    """Token ids of ``question`` (BOS first) and a mask of the tokens that overlap the entity name's characters."""
    start = question.index(entity)
    end = start + len(entity)
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    mask = [False] + [s < end and e > start for s, e in enc["offset_mapping"]]
    return [tokenizer.bos_token_id, *enc["input_ids"]], torch.tensor(mask)


def _entity_of(question: str, entities: Sequence[str]) -> str:
    found = [e for e in entities if e in question]
    if not found:
        raise ValueError(f"no entity of the domain occurs in {question!r}")
    return max(found, key=len)


@torch.no_grad()
def entity_firing(model, sae, hook_name: str, items: Mapping[str, Sequence[MCQItem]],
                  entities: Mapping[str, Sequence[str]], selected: Tensor | None = None) -> dict[str, dict]:
    """Per domain: each latent's firing rate at entity tokens and at the other real tokens (BOS excluded), and, for
    ``selected``, the fraction of entity / other tokens at which any selected latent fires."""
    out = {}
    for domain, qs in items.items():
        fire_ent = torch.zeros(sae.cfg.d_sae)
        fire_oth = torch.zeros(sae.cfg.d_sae)
        any_ent = any_oth = n_ent = n_oth = 0
        for it in qs:
            ids, ent = entity_mask(model.tokenizer, it.question, _entity_of(it.question, entities[domain]))
            h = sae_input(model, pad_batch([ids], model.tokenizer.pad_token_id), hook_name)
            fired: Bool[Tensor, "seq d_sae"] = sae.encode(h[0]) > 0
            other = ~ent
            other[0] = False  # BOS
            fire_ent += fired[ent].float().sum(0)
            fire_oth += fired[other].float().sum(0)
            n_ent += int(ent.sum())
            n_oth += int(other.sum())
            if selected is not None:
                hit = fired[:, selected].any(-1)
                any_ent += int(hit[ent].sum())
                any_oth += int(hit[other].sum())
        res: dict = {"entity": fire_ent / max(n_ent, 1), "other": fire_oth / max(n_oth, 1),
                     "n_entity_tokens": n_ent, "n_other_tokens": n_oth}
        if selected is not None:
            res["selected_any_entity"] = any_ent / max(n_ent, 1)
            res["selected_any_other"] = any_oth / max(n_oth, 1)
        out[domain] = res
    return out


def best_latent(firing: Mapping[str, dict], forget_domain: str) -> dict:
    """The latent whose forget-entity firing rate most exceeds its highest rate at any other domain's entity tokens."""
    f: Float[Tensor, " d_sae"] = firing[forget_domain]["entity"]
    others = torch.stack([v["entity"] for d, v in firing.items() if d != forget_domain]).max(0).values
    i = int(torch.argmax(f - others))
    return {"latent": i, "forget_entity_rate": float(f[i]), "max_other_entity_rate": float(others[i]),
            "margin": float(f[i] - others[i])}


def separability_summary(firing: Mapping[str, dict], forget_domain: str) -> dict:
    """JSON-ready: the best latent, and per domain the token counts and the selection's union firing rates."""
    per_domain = {d: {k: v for k, v in r.items() if not isinstance(v, Tensor)} for d, r in firing.items()}
    return {"best_latent": best_latent(firing, forget_domain), "domains": per_domain}
