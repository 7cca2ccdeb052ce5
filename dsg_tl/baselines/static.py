"""Static SAE clamping (Farrell et al. 2024): the DSG guardrail with the gate removed.

On every input, at every token where any selected latent is active, all selected latents are set to -c. This is
``Guardrail.with_(mode="static")`` of a DSG fit (see :func:`dsg_tl.pipeline.method_guardrails`); only the latent count
N (a re-selection from the fit's statistics) and c may differ from the fit.
"""

from __future__ import annotations

from dsg_tl.baselines.common import check_fields
from dsg_tl.config import POSITIVE, field
from dsg_tl.config import dataclass as config_dataclass
from dsg_tl.guardrail import Guardrail
from dsg_tl.pipeline import DSGFit, method_guardrails
from dsg_tl.selection import select_features


@config_dataclass(frozen=True)
class StaticConfig:
    """N latents (None: the fit's selection) clamped to -c (None: the fit's c) wherever active, on every input."""

    n_features: int | None = field(default=None, metadata=POSITIVE)
    c: float | None = field(default=None, metadata=POSITIVE)

    def __post_init__(self) -> None:
        check_fields(self)


# Farrell et al. / the DSG paper sweep the clamp value and N; the world grid is scaled like the DSG sweep.
PAPER_GRID: dict[str, tuple] = {"n_features": (10, 20, 30), "c": (10.0, 50.0, 100.0, 500.0)}
WORLD_GRID: dict[str, tuple] = {"n_features": (20, 40), "c": (5.0, 20.0)}


def static_guardrail(fit: DSGFit, cfg: StaticConfig | None = None) -> Guardrail:
    """The static-clamp guardrail of ``fit`` (optionally with another N and c)."""
    cfg = cfg or StaticConfig()
    g = method_guardrails(fit)["static"]
    if cfg.n_features is not None and cfg.n_features != len(fit.selection.latents):
        sel = select_features(fit.forget_stats, fit.retain_stats, n_features=cfg.n_features,
                              p_ratio=fit.selection.p_ratio, formula=fit.selection.formula)
        g = g.with_(gate_latents=sel.latents, clamp_latents=None)
    if cfg.c is not None:
        g = g.with_(c=cfg.c)
    return g


__all__ = ["StaticConfig", "static_guardrail", "PAPER_GRID", "WORLD_GRID"]
