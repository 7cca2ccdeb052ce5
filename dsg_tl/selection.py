"""Fisher-score feature selection.

forget score  F_j = E_forget[a_j^2]   ("fisher", the paper's Theorem 1; default)
           or F_j = (E_forget[a_j])^2 ("mean_squared", the official code)
ratio         R_j = F_j(forget) / (F_j(retain) + eps)
Keep latents with R_j >= the p_ratio-th percentile of R (linear interpolation, as numpy) and F_j(forget) > 0, then the
top N by forget score (ties broken by the lower latent index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from dsg_tl.stats import LatentStats

ScoreFormula = Literal["fisher", "mean_squared"]
EPS = 1e-8


def forget_score(stats: LatentStats, formula: ScoreFormula) -> Float[Tensor, " d_sae"]:
    if formula == "fisher":
        return stats.mean_sq.clone()
    if formula == "mean_squared":
        return stats.mean**2
    raise ValueError(f"unknown score formula {formula!r} (use 'fisher' or 'mean_squared')")


def percentile(x: Tensor, q: float) -> float:
    """The q-th percentile of x with linear interpolation (numpy's default)."""
    if x.numel() == 0:
        raise ValueError("percentile of an empty tensor")
    return float(torch.quantile(x.double().flatten(), q / 100.0))


def top_by_score(scores: Tensor, candidates: Tensor, n: int) -> Int[Tensor, " n"]:
    """Indices of the n highest ``scores`` among ``candidates`` (bool mask); ties -> lower index first."""
    idx = candidates.nonzero().flatten()
    order = torch.argsort(-scores[idx].double(), stable=True)
    return idx[order[:n]]


@dataclass(frozen=True)
class FeatureSelection:
    latents: Int[Tensor, " n"]
    forget_scores: Float[Tensor, " d_sae"]
    retain_scores: Float[Tensor, " d_sae"]
    ratios: Float[Tensor, " d_sae"]
    ratio_threshold: float
    formula: ScoreFormula
    n_features: int
    p_ratio: float

    def explain(self, k: int | None = None) -> list[dict]:
        """One row per selected latent: its scores and rank, for tables and analyses."""
        rows = []
        for rank, j in enumerate(self.latents.tolist()[:k]):
            rows.append({"rank": rank, "latent": j, "forget_score": float(self.forget_scores[j]),
                         "retain_score": float(self.retain_scores[j]), "ratio": float(self.ratios[j])})
        return rows

    def summary(self) -> dict:
        return {"latents": self.latents.tolist(), "formula": self.formula, "n_features": self.n_features,
                "p_ratio": self.p_ratio, "ratio_threshold": self.ratio_threshold, "top": self.explain(5)}


def select_features(
    forget: LatentStats, retain: LatentStats, *, n_features: int, p_ratio: float, formula: ScoreFormula = "fisher"
) -> FeatureSelection:
    if forget.mean.shape != retain.mean.shape:
        raise ValueError(f"forget and retain stats have different widths: {forget.mean.shape} vs {retain.mean.shape}")
    if n_features <= 0:
        raise ValueError(f"n_features must be > 0, got {n_features}")
    f = forget_score(forget, formula)
    r = forget_score(retain, formula)
    ratios = f / (r + EPS)
    thr = percentile(ratios, p_ratio)
    candidates = (ratios >= thr) & (f > 0)
    latents = top_by_score(f, candidates, n_features)
    return FeatureSelection(latents, f, r, ratios, thr, formula, n_features, p_ratio)


def frequency_matched_random(
    freq: Float[Tensor, " d_sae"], selected: Tensor, *, seed: int = 0, exclude: Tensor | None = None
) -> Int[Tensor, " n"]:
    """For each selected latent, a distinct random latent of the closest firing frequency (rank-neighbourhood draw)."""
    gen = torch.Generator().manual_seed(seed)
    banned = set(selected.tolist()) | (set(exclude.tolist()) if exclude is not None else set())
    alive = [j for j in torch.argsort(freq).tolist() if j not in banned and freq[j] > 0]
    alive_freq = freq[torch.tensor(alive, dtype=torch.long)].contiguous()
    chosen: list[int] = []
    for s in selected.tolist():
        # nearest-frequency neighbourhood of 10 candidates, one drawn at random
        pos = int(torch.searchsorted(alive_freq, freq[s]))
        lo, hi = max(0, pos - 5), min(len(alive), pos + 5)
        pool = [alive[i] for i in range(lo, hi) if alive[i] not in chosen]
        if not pool:
            pool = [j for j in alive if j not in chosen]
        chosen.append(pool[int(torch.randint(len(pool), (1,), generator=gen))])
    return torch.tensor(chosen, dtype=torch.long)
