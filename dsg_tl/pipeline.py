"""The DSG method on the world, as functions of typed values: statistics -> selection -> calibration -> guardrails.

Used by ``dsg-tl select / calibrate / evaluate / demo`` and by the analyses; nothing here prints or plots.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from dsg_tl.calibrate import calibrate, encode_texts
from dsg_tl.config import FRACTION, PERCENT, POSITIVE, config_hash, field
from dsg_tl.config import dataclass as config_dataclass
from dsg_tl.data.corpora import chunk_token_ids
from dsg_tl.gate import GateReport, GateSpec
from dsg_tl.guardrail import Guardrail
from dsg_tl.selection import FeatureSelection, ScoreFormula, frequency_matched_random, select_features
from dsg_tl.stats import LatentStats, accumulate_stats
from dsg_tl.world.facts import RETAIN_DOMAINS, World


@config_dataclass(frozen=True)
class DSGConfig:
    """Hyperparameters of Dynamic SAE Guardrails (paper defaults where they make sense on the world)."""

    n_features: int = field(default=20, metadata=POSITIVE)
    p_ratio: float = field(default=90.0, metadata=PERCENT)
    p_dyn: float = field(default=95.0, metadata=PERCENT)
    c: float = field(default=5.0, metadata=POSITIVE)
    formula: Literal["fisher", "mean_squared"] = "fisher"
    clamp_positions: Literal["active", "all"] = "active"
    chunk_len: int = field(default=64, metadata={"check": (lambda v: v >= 4, "must be >= 4")})
    forget_fraction: float = field(default=1.0, metadata=FRACTION)
    stats_batch_size: int = field(default=16, metadata=POSITIVE)
    calibration_max_len: int = field(default=128, metadata=POSITIVE)
    calibration_unit: Literal["document", "sentence"] = "sentence"  # world only: what one gate sequence is
    seed: int = 0
    # gate variant (dsg_tl.gate.GateSpec): the statistic the gate thresholds; calibrated at the same alpha
    gate: Literal["fraction", "windowed", "per_turn", "hybrid"] = "fraction"
    gate_window: int = field(default=16, metadata=POSITIVE)  # windowed: counted tokens per window
    gate_separator: str = "\n"  # per_turn: the marker string between turns (must be one token)


@dataclass(frozen=True)
class Corpora:
    """Texts for one unlearning request: forget and retain corpora, and gate calibration / held-out sets."""

    forget: list[str]
    retain: list[str]
    calibration: list[str]
    heldout_retain: list[str]
    forget_eval: list[str]


def sentences(docs: list[str]) -> list[str]:
    """Split documents into sentences (the world's sentences end with '. ')."""
    return [s if s.endswith(".") else s + "." for d in docs for s in d.split(". ") if s.strip()]


def world_corpora(world: World, forget_domain: str = "hazard", retain_domains=RETAIN_DOMAINS, seed: int = 0,
                  calibration_unit: Literal["document", "sentence"] = "sentence") -> Corpora:
    """Split the world's documents: half of the retain documents for statistics, a quarter each for calibration and
    held-out false-positive measurement; forget documents for statistics, a held-out quarter for the gate's TPR.

    Gate sequences are single sentences by default: one stated fact, like the MCQ prompts the gate will see.
    """
    rng = random.Random(seed)
    retain = [d for dom in retain_domains for d in world.documents[dom]]
    rng.shuffle(retain)
    forget = list(world.documents[forget_domain])
    rng.shuffle(forget)
    h = len(retain) // 2
    q = len(retain) // 4
    fq = len(forget) // 4
    unit = sentences if calibration_unit == "sentence" else list
    return Corpora(forget=forget[fq:], retain=retain[:h], calibration=unit(retain[h : h + q]),
                   heldout_retain=unit(retain[h + q :]), forget_eval=unit(forget[:fq]))


def corpus_stats(model, sae, texts: list[str], cfg: DSGConfig, desc: str, progress: bool = True) -> LatentStats:
    tok = model.tokenizer
    docs = (tok(t, add_special_tokens=False)["input_ids"] for t in texts)
    chunks = chunk_token_ids(docs, cfg.chunk_len, tok.bos_token_id, tok.eos_token_id)
    return accumulate_stats(model, sae, chunks, batch_size=cfg.stats_batch_size, desc=desc, progress=progress)


def cached_stats(model, sae, texts: list[str], cfg: DSGConfig, desc: str, cache_dir: Path | None,
                 model_id: str, progress: bool = True) -> LatentStats:
    """Statistics keyed by a hash of (model id, SAE hook/width, chunking, texts)."""
    if cache_dir is None:
        return corpus_stats(model, sae, texts, cfg, desc, progress)
    key = config_hash(model_id, sae.cfg.metadata.hook_name, sae.cfg.d_sae, cfg.chunk_len, texts)
    path = Path(cache_dir) / f"stats-{desc}-{key}.safetensors"
    if path.is_file():
        try:
            return LatentStats.load(path)
        except Exception:  # a corrupted cache file is recomputed
            path.unlink()
    stats = corpus_stats(model, sae, texts, cfg, desc, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    stats.save(tmp)
    tmp.replace(path)
    return stats


@dataclass
class DSGFit:
    """Everything the unlearning phase produces."""

    forget_stats: LatentStats
    retain_stats: LatentStats
    selection: FeatureSelection
    guardrail: Guardrail
    gate: GateReport
    rhos: dict[str, torch.Tensor]
    random_latents: torch.Tensor
    timings_s: dict[str, float]


def fit_dsg(model, sae, corpora: Corpora, cfg: DSGConfig, *, cache_dir: Path | None = None,
            model_id: str = "model", progress: bool = True) -> DSGFit:
    """Statistics, selection and calibration: the whole unlearning phase of DSG."""
    timings = {}
    t0 = time.perf_counter()
    forget = corpora.forget[: max(1, int(len(corpora.forget) * cfg.forget_fraction))]
    fs = cached_stats(model, sae, forget, cfg, "forget", cache_dir, model_id, progress)
    rs = cached_stats(model, sae, corpora.retain, cfg, "retain", cache_dir, model_id, progress)
    timings["stats"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    selection = select_features(fs, rs, n_features=cfg.n_features, p_ratio=cfg.p_ratio, formula=cfg.formula)
    timings["selection"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok = model.tokenizer
    enc = lambda texts: encode_texts(tok, texts, cfg.calibration_max_len)  # noqa: E731
    g = Guardrail.from_selection(sae, selection.latents, tau=float("inf"), c=cfg.c,
                                 clamp_positions=cfg.clamp_positions, gate=gate_spec(cfg, tok),
                                 meta={"formula": cfg.formula, "n_features": cfg.n_features, "p_ratio": cfg.p_ratio,
                                       "p_dyn": cfg.p_dyn})
    g, report, rhos = calibrate(model, g, calibration=enc(corpora.calibration),
                                heldout=enc(corpora.heldout_retain), forget=enc(corpora.forget_eval), p_dyn=cfg.p_dyn)
    timings["calibration"] = time.perf_counter() - t0
    rand = frequency_matched_random(fs.freq, selection.latents, seed=cfg.seed)
    return DSGFit(fs, rs, selection, g, report, rhos, rand, timings)


def gate_spec(cfg: DSGConfig, tokenizer) -> GateSpec:
    """The (uncalibrated) gate variant of ``cfg``; per_turn separates turns at the token of ``cfg.gate_separator``."""
    sep: tuple[int, ...] = ()
    if cfg.gate == "per_turn":
        ids = tokenizer(cfg.gate_separator, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"dsg.gate_separator {cfg.gate_separator!r} must be exactly one token for a per_turn "
                             f"gate; this tokenizer gives {ids}")
        sep = (int(ids[0]),)
    return GateSpec(kind=cfg.gate, window=cfg.gate_window, separator_ids=sep)


def fit_world(art, cfg: DSGConfig, forget_domain: str, cache_dir: Path | None,
              progress: bool = True) -> tuple[Corpora, DSGFit]:
    """The world's corpora for ``forget_domain`` and the DSG fit on them (statistics cached under ``cache_dir``)."""
    corpora = world_corpora(art.world, forget_domain, seed=cfg.seed, calibration_unit=cfg.calibration_unit)
    fit = fit_dsg(art.model, art.sae, corpora, cfg, cache_dir=cache_dir, model_id=art.model_id, progress=progress)
    return corpora, fit


def method_guardrails(fit: DSGFit) -> dict[str, Guardrail]:
    """The guardrails compared in the demo: DSG, static clamping, and the random-latent control (same gate and clamp
    positions, N frequency-matched random latents clamped instead of the selected ones)."""
    g = fit.guardrail
    return {
        "dsg": g,
        "static": g.with_(mode="static"),
        "random_control": g.with_(clamp_latents=fit.random_latents),
    }


__all__ = ["DSGConfig", "Corpora", "world_corpora", "fit_dsg", "fit_world", "DSGFit", "method_guardrails",
           "ScoreFormula"]
