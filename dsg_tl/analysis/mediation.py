"""Causal-mediation checks of a latent selection: do the selected latents carry the forget knowledge?

- ``ablation_effects``: change in mean next-token loss on forget / retain sequences when latents are ablated (set to
  0, or clamped to -c) by a *static* guardrail at the positions where they fire, jointly and one latent at a time.
  The guardrail's own hook does the ablation (``guardrail.with_(mode="static", ...)``), so this measures exactly the
  intervention DSG applies.
- ``compare_selections``: Fisher E[a^2] selection vs frequency-matched random latents vs frequency-based selection
  (SAEBench / Farrell et al.) vs the (E[a])^2 "mean_squared" selection: loss deltas and MCQ accuracy under the clamp.
- ``attribution_scores``: attribution patching (grad of the forget loss wrt each latent times its activation, summed
  over content positions) through an SAE splice; ``spearman`` compares it with the measured ablation effects.
  Zeroing latent j changes it by -a_j, so the first-order estimate of the zero-ablation loss change is -attribution.

Loss convention everywhere: sequences are BOS + tokens (truncated to the model's context), right-padded with
``pad_batch``; the loss is the mean next-token negative log-likelihood over all content target tokens (BOS, EOS and
padding excluded), pooled over the texts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from dsg_tl.batching import TokenBatch, pad_batch
from dsg_tl.guardrail import Guardrail
from dsg_tl.plotting import pyplot, save_figure
from dsg_tl.selection import frequency_matched_random, select_features, top_by_score
from dsg_tl.stats import LatentStats

AblationMode = Literal["zero", "clamp"]


# ------------------------------------------------------------------------------------------------------- token data


def encode_sequences(model, texts: Sequence[str], max_len: int | None = None) -> list[list[int]]:
    """BOS + tokens of each text, truncated to ``max_len`` (default: the model's context length)."""
    tok = model.tokenizer
    max_len = max_len or model.cfg.n_ctx
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return [(bos + list(tok(t, add_special_tokens=False)["input_ids"]))[:max_len] for t in texts]


def _batches(model, seqs: Sequence[Sequence[int]], batch_size: int) -> Iterator[TokenBatch]:
    tok = model.tokenizer
    special = [i for i in (tok.bos_token_id, tok.eos_token_id) if i is not None]
    device = next(model.parameters()).device
    for i in range(0, len(seqs), batch_size):
        yield pad_batch(seqs[i : i + batch_size], tok.pad_token_id, special_ids=special).to(device)


def _nll_sum(logits: Tensor, batch: TokenBatch) -> tuple[Tensor, Tensor]:
    """Sum of next-token NLL over content targets, and their number."""
    logp = logits[:, :-1].float().log_softmax(-1)
    targets = batch.tokens[:, 1:]
    mask = batch.content_mask[:, 1:]
    nll = -logp.gather(-1, targets[..., None])[..., 0]
    return torch.where(mask, nll, torch.zeros_like(nll)).sum(), mask.sum()


@torch.no_grad()
def mean_loss(model, seqs: Sequence[Sequence[int]], guardrail: Guardrail | None = None, *,
              batch_size: int = 32) -> float:
    """Mean next-token loss over content targets, with ``guardrail`` attached (and told each batch's masks)."""
    total, count = 0.0, 0
    ctx = guardrail.attach(model) if guardrail is not None else contextlib.nullcontext(None)
    with ctx as handle:
        for batch in _batches(model, seqs, batch_size):
            if handle is not None:
                handle.set_batch(batch)
            logits = model(batch.tokens, attention_mask=batch.attention_mask, return_type="logits")
            s, n = _nll_sum(logits, batch)
            total += float(s)
            count += int(n)
    return total / count if count else float("nan")


# -------------------------------------------------------------------------------------------------------- ablation


def ablation_guardrail(guardrail: Guardrail, latents: Tensor, mode: AblationMode) -> Guardrail:
    """The static guardrail that ablates ``latents`` where they fire: to 0 ("zero") or to -c ("clamp")."""
    if mode not in ("zero", "clamp"):
        raise ValueError(f"mode must be 'zero' or 'clamp', got {mode!r}")
    c = 0.0 if mode == "zero" else guardrail.c
    return guardrail.with_(mode="static", gate_latents=torch.as_tensor(latents).long().flatten(), clamp_latents=None,
                           c=c, clamp_positions="active")


def ablation_effects(model, guardrail: Guardrail, texts_forget: Sequence[str], texts_retain: Sequence[str],
                     latents: Tensor, *, mode: AblationMode = "zero", joint: bool = True, per_latent: bool = True,
                     batch_size: int = 32) -> dict:
    """Change in mean next-token loss (ablated - base) on forget and retain texts when ``latents`` are ablated.

    Returns ``{"mode", "c", "latents", "base": {"forget", "retain"}, "joint": {"d_forget", "d_retain"} | None,
    "per_latent": [{"latent", "d_forget", "d_retain"}, ...] | None}``.
    """
    latents = torch.as_tensor(latents).long().flatten()
    seqs = {"forget": encode_sequences(model, texts_forget), "retain": encode_sequences(model, texts_retain)}
    base = {k: mean_loss(model, s, batch_size=batch_size) for k, s in seqs.items()}

    def delta(ls: Tensor) -> dict:
        g = ablation_guardrail(guardrail, ls, mode)
        return {f"d_{k}": mean_loss(model, s, g, batch_size=batch_size) - base[k] for k, s in seqs.items()}

    out = {"mode": mode, "c": 0.0 if mode == "zero" else guardrail.c, "latents": latents.tolist(), "base": base,
           "joint": None, "per_latent": None}
    if joint and latents.numel():
        out["joint"] = delta(latents)
    if per_latent:
        out["per_latent"] = [{"latent": j, **delta(latents[i : i + 1])} for i, j in enumerate(latents.tolist())]
    return out


# ------------------------------------------------------------------------------------------------------- selections


def frequency_selection(forget_stats: LatentStats, retain_stats: LatentStats, n: int,
                        max_retain_freq: float = 0.01) -> Tensor:
    """SAEBench / Farrell et al. rule: the top-n latents by forget firing frequency among those firing on retain
    tokens with frequency below ``max_retain_freq`` (and firing on forget at all); ties -> lower index first."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    candidates = (retain_stats.freq < max_retain_freq) & (forget_stats.freq > 0)
    return top_by_score(forget_stats.freq, candidates, n)


def _selection_texts(corpora_texts) -> tuple[list[str], list[str]]:
    """(forget, retain) texts from a mapping with "forget"/"retain" or a pipeline Corpora (held-out sets)."""
    if isinstance(corpora_texts, Mapping):
        return list(corpora_texts["forget"]), list(corpora_texts["retain"])
    return list(corpora_texts.forget_eval), list(corpora_texts.heldout_retain)


def compare_selections(model, sae, fit, corpora_texts, *, n: int, seed: int = 0, groups: Mapping | None = None,
                       mode: AblationMode = "clamp", mcq_mode: str = "cloze", max_retain_freq: float = 0.01,
                       batch_size: int = 32) -> list[dict]:
    """One row per selection method (fisher, random, frequency, mean_squared) with the joint-ablation loss deltas
    and, when ``groups`` (e.g. ``domain_groups(world, "train_frames")``) is given, MCQ accuracy per group under the
    static clamp (``fit.guardrail`` with mode "static" and the method's latents; its c and clamp positions).

    ``corpora_texts``: {"forget": [...], "retain": [...]} or a ``Corpora`` (its forget_eval / heldout_retain).
    ``sae`` must be the SAE of ``fit.guardrail`` (kept in the signature for symmetry with the other analyses).
    """
    from dsg_tl.evaluation.domains import evaluate_groups

    forget_texts, retain_texts = _selection_texts(corpora_texts)
    fs, rs = fit.forget_stats, fit.retain_stats
    p_ratio = fit.selection.p_ratio
    fisher = select_features(fs, rs, n_features=n, p_ratio=p_ratio, formula="fisher").latents
    methods = {
        "fisher": fisher,
        "random": frequency_matched_random(fs.freq, fisher, seed=seed),
        "frequency": frequency_selection(fs, rs, n, max_retain_freq),
        "mean_squared": select_features(fs, rs, n_features=n, p_ratio=p_ratio, formula="mean_squared").latents,
    }
    base_acc = {}
    if groups is not None:
        base_acc = {k: r.accuracy for k, r in evaluate_groups(model, groups, mode=mcq_mode,
                                                               batch_size=batch_size).items()}
    rows = []
    for name, latents in methods.items():
        row = {"method": name, "latents": latents.tolist(), "n_latents": int(latents.numel()),
               "d_forget_loss": float("nan"), "d_retain_loss": float("nan")}
        for k, v in base_acc.items():
            row[f"base_{k}_acc"] = v
            row[f"{k}_acc"] = float("nan")
        if latents.numel():
            eff = ablation_effects(model, fit.guardrail, forget_texts, retain_texts, latents, mode=mode,
                                   joint=True, per_latent=False, batch_size=batch_size)
            row["d_forget_loss"], row["d_retain_loss"] = eff["joint"]["d_forget"], eff["joint"]["d_retain"]
            row["base_forget_loss"], row["base_retain_loss"] = eff["base"]["forget"], eff["base"]["retain"]
            if groups is not None:
                g = fit.guardrail.with_(mode="static", gate_latents=latents, clamp_latents=None)
                res = evaluate_groups(model, groups, mode=mcq_mode, guardrail=g, batch_size=batch_size)
                row.update({f"{k}_acc": r.accuracy for k, r in res.items()})
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------- attribution


def attribution_scores(model, sae, hook_name: str, texts: Sequence[str], latents: Tensor, *,
                       batch_size: int = 64) -> Float[Tensor, " k"]:
    """Attribution patching: for each latent j, sum over content positions of dL/da_j * a_j, where L is the mean
    next-token loss on ``texts`` (pooled over all of them) and a = sae.encode(h) is spliced in at ``hook_name`` as
    h' = sae.decode(a) + (h - sae.decode(a)).detach() (so h' = h and the forward is unchanged).

    One forward + backward per batch of ``batch_size`` texts (one in all when the texts fit a batch).
    """
    latents = torch.as_tensor(latents).long().flatten()
    seqs = encode_sequences(model, texts)
    n_targets = sum(int(b.content_mask[:, 1:].sum()) for b in _batches(model, seqs, batch_size))
    if n_targets == 0:
        raise ValueError("the texts have no content tokens")
    scores = torch.zeros(latents.numel(), dtype=torch.float64)
    store: dict[str, Tensor] = {}

    def splice(h: Tensor, hook) -> Tensor:
        x = h.detach().to(sae.dtype)
        a = sae.encode(x).detach().requires_grad_(True)
        rec = sae.decode(a)
        store["a"] = a
        return (rec + (x - rec).detach()).to(h.dtype)

    for batch in _batches(model, seqs, batch_size):
        with torch.enable_grad(), model.hooks(fwd_hooks=[(hook_name, splice)]):
            logits = model(batch.tokens, attention_mask=batch.attention_mask, return_type="logits")
            s, _ = _nll_sum(logits, batch)
            (grad,) = torch.autograd.grad(s / n_targets, store["a"])
        a = store["a"].detach()
        contrib = (grad * a)[..., latents.to(a.device)]  # [batch, pos, k]
        contrib = torch.where(batch.content_mask[..., None], contrib, torch.zeros_like(contrib))
        scores += contrib.sum((0, 1)).double().cpu()
    return scores.float()


def _ranks(x: Tensor) -> Tensor:
    """Ranks 1..n, ties get their average rank."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); nan when either side is constant."""
    x, y = torch.as_tensor(x).double().flatten(), torch.as_tensor(y).double().flatten()
    if x.numel() != y.numel():
        raise ValueError(f"spearman needs equal lengths, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum()) / den if den > 0 else float("nan")


def attribution_vs_ablation(model, sae, guardrail: Guardrail, texts_forget: Sequence[str],
                            texts_retain: Sequence[str], latents: Tensor) -> dict:
    """Per-latent attribution estimate (-attribution = first-order zero-ablation effect) vs the measured
    zero-ablation change in forget loss, and their Spearman correlation."""
    latents = torch.as_tensor(latents).long().flatten()
    attr = attribution_scores(model, sae, guardrail.hook_name, texts_forget, latents)
    eff = ablation_effects(model, guardrail, texts_forget, texts_retain, latents, mode="zero", joint=True,
                           per_latent=True)
    measured = [r["d_forget"] for r in eff["per_latent"]]
    return {"latents": latents.tolist(), "attribution": attr.tolist(), "estimated_d_forget": (-attr).tolist(),
            "measured_d_forget": measured, "spearman": spearman(-attr, torch.tensor(measured)), "ablation": eff}


# ------------------------------------------------------------------------------------------------------------ plot


def mediation_plot(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Grouped bars of the joint-ablation change in forget and retain loss per selection method."""
    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [r["method"] for r in rows]
    x = torch.arange(len(rows)).numpy()
    w = 0.38
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(x - w / 2, [r["d_forget_loss"] for r in rows], w, label="delta forget loss", color="tab:red")
    ax.bar(x + w / 2, [r["d_retain_loss"] for r in rows], w, label="delta retain loss", color="tab:blue")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylabel("change in mean next-token loss (nats)")
    ax.set_title("Joint ablation of each selection")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


__all__ = ["ablation_effects", "ablation_guardrail", "compare_selections", "frequency_selection",
           "attribution_scores", "attribution_vs_ablation", "spearman", "mediation_plot", "mean_loss",
           "encode_sequences"]
