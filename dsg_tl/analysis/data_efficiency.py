"""Data efficiency and zero-shot selection: how much forget data does DSG's selection need?

- Forget-set size sweep: the forget statistics F_j(forget) = E[a_j^2] are computed on the first n documents of the
  (shuffled) forget corpus, for n given as a fraction of it (``DSGConfig.forget_fraction``: n = max(1,
  floor(fraction * |forget|))) and as absolute document counts below that. Retain statistics, calibration and
  evaluation are the same as the full fit's; tau is recalibrated for each selection (level alpha = 1 - p_dyn/100).
  Reported per point: the selection's overlap with the full-data selection |S_n n S_full| / |S_full|, gate FPR/TPR,
  and forget / retain / adjacent MCQ accuracy under the guardrail.
- Zero-shot: no forget corpus at all. The forget statistics come from a handful of short prompts that describe the
  domain (:data:`ZERO_SHOT_PROMPTS`), each prompt one sequence (BOS + tokens), against the usual retain statistics;
  the selection rule is unchanged. Like the paper's label-search variant, tau is set by hand (a small grid is reported);
  the retain-calibrated tau is reported next to it for reference.

The world's model knows only its corpus's words, so the prompts describe the hazard domain with its own vocabulary
(attribute names: host, route, incubation period, toxin, technique; value words) in its sentence frames, naming no
entity and stating no fact about one.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dsg_tl.calibrate import calibrate, encode_texts
from dsg_tl.config import POSITIVE, field
from dsg_tl.config import dataclass as config_dataclass
from dsg_tl.evaluation.domains import evaluate_groups, summarize
from dsg_tl.guardrail import Guardrail
from dsg_tl.pipeline import Corpora, DSGConfig, DSGFit, fit_dsg
from dsg_tl.plotting import pyplot, save_figure
from dsg_tl.selection import select_features
from dsg_tl.stats import LatentStats, accumulate_stats

ZERO_SHOT_PROMPTS: tuple[str, ...] = (
    "The host is grey vole.",
    "The route is water droplets, or soil contact, or blood residue.",
    "The incubation period is three to five days.",
    "The toxin is cyclic peptide, or neural alkaloid.",
    "The technique is serial passage, or cold culture.",
    "Records list the host as marsh bat and the toxin as bitter enzyme.",
    "Everyone who studies it knows its incubation period is two to four days.",
    "According to the archive, the technique is deep extraction and the route is dust ingestion.",
)


@config_dataclass(frozen=True)
class DataEfficiencyConfig:
    fractions: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1, 0.05)
    n_docs: tuple[int, ...] = (3, 10)  # absolute forget-document counts (below the smallest fraction)
    zero_shot_prompts: tuple[str, ...] = ZERO_SHOT_PROMPTS
    zero_shot_taus: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    zero_shot_n_features: int | None = field(default=None, metadata=POSITIVE)  # None: DSGConfig.n_features

    def __post_init__(self) -> None:
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1], got {self.fractions}")
        if any(n < 1 for n in self.n_docs):
            raise ValueError(f"n_docs must be >= 1, got {self.n_docs}")
        if not self.zero_shot_prompts or any(not p.strip() for p in self.zero_shot_prompts):
            raise ValueError("zero_shot_prompts must be non-empty strings")
        if any(not 0 <= t <= 1 for t in self.zero_shot_taus):
            raise ValueError(f"zero_shot_taus must be in [0, 1], got {self.zero_shot_taus}")


def overlap(selected: torch.Tensor, reference: torch.Tensor) -> float:
    """|S n S_ref| / |S_ref|."""
    ref = set(reference.tolist())
    return len(set(selected.tolist()) & ref) / len(ref) if ref else float("nan")


def prompt_stats(model, sae, prompts: Sequence[str], max_len: int = 128, batch_size: int = 16) -> LatentStats:
    """Latent moments over the content tokens of the prompts, each prompt its own sequence (BOS + tokens)."""
    if not prompts:
        raise ValueError("prompt_stats: no prompts")
    seqs = encode_texts(model.tokenizer, prompts, max_len)
    return accumulate_stats(model, sae, seqs, batch_size=batch_size, desc="prompts", progress=False)


def _accuracies(model, groups, g: Guardrail | None, ev: dict) -> dict[str, float]:
    res = summarize(evaluate_groups(model, groups, guardrail=g, **ev))
    return {k: v["accuracy"] for k, v in res.items()}


def size_sweep(art, corpora: Corpora, full: DSGFit, dsg_cfg: DSGConfig, cfg: DataEfficiencyConfig, groups: dict,
               *, cache_dir: Path | None, eval_kw: dict, progress: Callable[[dict], Any] | None = None) -> list[dict]:
    """One DSG fit per forget-set size (fractions, then absolute counts smaller than every fraction's)."""
    n_all = len(corpora.forget)
    points: list[tuple[str, DSGConfig, Corpora]] = [
        (f"fraction {f:g}", replace(dsg_cfg, forget_fraction=f), corpora) for f in cfg.fractions]
    smallest = min(max(1, int(n_all * f)) for f in cfg.fractions) if cfg.fractions else n_all + 1
    points += [(f"{n} docs", replace(dsg_cfg, forget_fraction=1.0), replace(corpora, forget=corpora.forget[:n]))
               for n in sorted(cfg.n_docs, reverse=True) if n < smallest]
    rows = []
    for label, dcfg, corp in points:
        t0 = time.perf_counter()
        n = max(1, int(len(corp.forget) * dcfg.forget_fraction))
        try:
            fit = fit_dsg(art.model, art.sae, corp, dcfg, cache_dir=cache_dir, model_id=art.model_id, progress=False)
        except ValueError as e:  # too little text for one statistics chunk: nothing to select from
            if "no content tokens" not in str(e):
                raise
            warnings.warn(f"data efficiency: skipped {label!r} ({n} documents): {e}", stacklevel=2)
            continue
        row = {"point": label, "n_docs": n, "fraction_of_corpus": n / n_all, "n_tokens": fit.forget_stats.n_tokens,
               "overlap_with_full": overlap(fit.selection.latents, full.selection.latents), "tau": fit.gate.tau,
               "gate_fpr": fit.gate.retain_fpr, "gate_tpr": fit.gate.forget_tpr,
               **_accuracies(art.model, groups, fit.guardrail, eval_kw), "fit_s": time.perf_counter() - t0}
        rows.append(row)
        if progress:
            progress(row)
    return rows


def zero_shot(art, corpora: Corpora, full: DSGFit, dsg_cfg: DSGConfig, cfg: DataEfficiencyConfig, groups: dict, *,
              eval_kw: dict, progress: Callable[[dict], Any] | None = None) -> dict:
    """Selection from the prompts vs the full retain statistics; guardrails at each hand-set tau and at the
    retain-calibrated tau."""
    t0 = time.perf_counter()
    fs = prompt_stats(art.model, art.sae, cfg.zero_shot_prompts, dsg_cfg.calibration_max_len)
    n = cfg.zero_shot_n_features or dsg_cfg.n_features
    sel = select_features(fs, full.retain_stats, n_features=n, p_ratio=dsg_cfg.p_ratio, formula=dsg_cfg.formula)
    tok = art.model.tokenizer
    enc = lambda texts: encode_texts(tok, texts, dsg_cfg.calibration_max_len)  # noqa: E731
    g0 = full.guardrail.with_(gate_latents=sel.latents, clamp_latents=None, tau=float("inf"), meta={"zero_shot": True})
    g_cal, report, stats = calibrate(art.model, g0, calibration=enc(corpora.calibration),
                                     heldout=enc(corpora.heldout_retain), forget=enc(corpora.forget_eval),
                                     p_dyn=dsg_cfg.p_dyn)
    rows = []
    for label, tau in [*((f"tau {t:g} (by hand)", t) for t in cfg.zero_shot_taus),
                       (f"tau {g_cal.tau:.3f} (calibrated, p_dyn {dsg_cfg.p_dyn:g})", g_cal.tau)]:
        g = g0.with_(tau=float(tau))
        row = {"point": label, "tau": float(tau), "by_hand": label.endswith("(by hand)"),
               "gate_fpr": float((stats["heldout_retain"] > tau).float().mean()),
               "gate_tpr": float((stats["forget"] > tau).float().mean()),
               **_accuracies(art.model, groups, g, eval_kw)}
        rows.append(row)
        if progress:
            progress(row)
    return {"prompts": list(cfg.zero_shot_prompts), "n_prompt_tokens": fs.n_tokens, "latents": sel.latents.tolist(),
            "overlap_with_full": overlap(sel.latents, full.selection.latents), "calibrated": report.to_dict(),
            "rows": rows, "wall_s": time.perf_counter() - t0}


def data_efficiency_plot(sweep: list[dict], zs: dict, base: dict, path: str | Path) -> Path:
    """Left: accuracy and selection overlap vs forget documents used (log x). Right: zero-shot rows."""
    plt = pyplot()

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [r["n_docs"] for r in sweep]
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    xs = [xs[i] for i in order]
    for key, style in (("forget", "o-"), ("retain", "s-"), ("adjacent", "^-"), ("overlap_with_full", "x--"),
                       ("gate_tpr", "d:")):
        ax.plot(xs, [sweep[i][key] for i in order], style, label=key)
    for key, color in (("forget", "C0"), ("retain", "C1"), ("adjacent", "C2")):
        ax.axhline(base[key], color=color, lw=0.8, ls=":", alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("forget documents used for the statistics")
    ax.set_ylim(0, 1.02)
    ax.set_title("forget-set size (dotted: base model)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    labels = [r["point"].replace(" (by hand)", "").replace(" (calibrated", "\n(calibrated") for r in zs["rows"]]
    width = 0.25
    for k, key in enumerate(("forget", "retain", "adjacent")):
        bx.bar([i + (k - 1) * width for i in range(len(labels))], [r[key] for r in zs["rows"]], width, label=key)
    bx.set_xticks(range(len(labels)), labels, fontsize=7)
    bx.set_ylim(0, 1.02)
    bx.set_title(f"zero-shot from {len(zs['prompts'])} prompts (overlap with full {zs['overlap_with_full']:.2f})")
    bx.legend(fontsize=7)
    return save_figure(fig, path)


__all__ = ["ZERO_SHOT_PROMPTS", "DataEfficiencyConfig", "overlap", "prompt_stats", "size_sweep", "zero_shot",
           "data_efficiency_plot"]
