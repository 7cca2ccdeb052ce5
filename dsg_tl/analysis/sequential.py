"""Sequential unlearning: several forget requests one after the other (e.g. ``hazard``, then ``exploits``).

How DSG combines requests (our decision; the guardrail module allows one guardrail per hook point and raises "a
guardrail is already attached" for a second one). Each request is fitted on its own (its own statistics against the
retain corpus, its own selection, its own tau), and the requests are combined in one of two ways, both measured:

``stacked`` (:class:`StackedGuardrails`): one guardrail per request, each with its own selection and its own gate,
applied one after the other inside ONE hook at the shared hook point (request k's guardrail reads the output of
request k-1's). Each gate keeps its own level alpha, so the false-positive rate of the stack is at most k * alpha.

``union`` (:func:`merge_guardrails`): after request k the deployed guardrail is the MERGED UNION of requests 1..k:
  gate latents  S = S_1 u ... u S_k          clamp latents  C = C_1 u ... u C_k
  rho(x)        = fraction of counted tokens of x where any latent of S fires  (>= each request's own rho(x))
  tau           = recalibrated: the p_dyn percentile of the merged rho over the retain calibration sequences
so the merged gate is again a level-alpha test of H0 = retain (one false-positive budget for all requests, not one per
request), and on a gated input every union latent that fires is clamped. It is a plain :class:`Guardrail`: it saves,
loads and attaches like any other. The price: the union's rho fires more often on retain text than either part, so
its tau is at least as high as each request's own tau, and a request whose latents fire on few tokens can lose recall.

Baselines (RMU, GradDiff) are applied one after the other: request k edits the model request k-1 returned, with that
model as the frozen reference.

After every request each domain's accuracy is measured; ``retain`` is the pooled accuracy over the retain domains
(never a domain that has been requested for forgetting).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dsg_tl.baselines.graddiff import WORLD_GRADDIFF, GradDiffConfig, apply_graddiff
from dsg_tl.baselines.rmu import WORLD_RMU, RMUConfig, apply_rmu
from dsg_tl.calibrate import calibrate, encode_texts
from dsg_tl.config import dataclass as config_dataclass
from dsg_tl.config import field
from dsg_tl.evaluation.mcq import evaluate_mcq
from dsg_tl.gate import GateReport
from dsg_tl.guardrail import Guardrail, GuardrailModule
from dsg_tl.pipeline import Corpora, DSGConfig, DSGFit, fit_world
from dsg_tl.plotting import pyplot, save_figure
from dsg_tl.world.facts import DOMAINS, FORGET_DOMAINS, RETAIN_DOMAINS, World

COMPOSITIONS: tuple[str, ...] = ("union", "stacked")


@config_dataclass(frozen=True)
class SequentialConfig:
    """Requests in order, the MCQ split evaluated, and the baselines' settings (world-scaled)."""

    requests: tuple[str, ...] = ("hazard", "exploits")
    mcq_split: Literal["train_frames", "heldout_frames"] = "train_frames"
    rmu: RMUConfig = field(default_factory=lambda: WORLD_RMU)
    graddiff: GradDiffConfig = field(default_factory=lambda: WORLD_GRADDIFF)
    baselines: tuple[str, ...] = ("rmu", "graddiff")

    def __post_init__(self) -> None:
        bad = [r for r in self.requests if r not in FORGET_DOMAINS]
        if not self.requests or bad or len(set(self.requests)) != len(self.requests):
            raise ValueError(f"requests must be distinct forget domains {FORGET_DOMAINS}, got {self.requests}")
        wrong = [b for b in self.baselines if b not in ("rmu", "graddiff")]
        if wrong:
            raise ValueError(f"baselines must be a subset of ('rmu', 'graddiff'), got {self.baselines}")


def union_latents(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sorted union of latent index tensors."""
    if not parts:
        raise ValueError("union of no latent sets")
    return torch.unique(torch.cat([p.long().flatten() for p in parts]))


def merge_guardrails(model, guardrails: Sequence[Guardrail], *, calibration: Sequence[Sequence[int]],
                     heldout: Sequence[Sequence[int]], forget: Sequence[Sequence[int]], p_dyn: float
                     ) -> tuple[Guardrail, GateReport]:
    """One guardrail for several requests: union of gate and of clamp latents, tau recalibrated at level
    1 - p_dyn/100 on ``calibration`` (retain sequences). ``forget`` (any requests' forget sequences) only feeds the
    reported TPR. All parts must share the hook, c, mode, clamp positions and gate variant."""
    if not guardrails:
        raise ValueError("merge_guardrails needs at least one guardrail")
    first = guardrails[0]
    for g in guardrails[1:]:
        for attr in ("hook_name", "c", "mode", "clamp_positions", "gate"):
            if getattr(g, attr) != getattr(first, attr):
                raise ValueError(f"cannot merge guardrails that differ in {attr}: {getattr(first, attr)!r} vs "
                                 f"{getattr(g, attr)!r}")
    sae = next((g.sae for g in guardrails if g.sae is not None), None)
    if sae is None:
        raise ValueError("merging guardrails needs the full SAE (a saved latent slice covers only its own latents)")
    gate = union_latents([g.gate_latents for g in guardrails])
    clamp = union_latents([g.clamp for g in guardrails])
    meta = {"merged_from": [dict(g.meta) for g in guardrails], "composition": "union, tau recalibrated"}
    merged = first.with_(gate_latents=gate, clamp_latents=None if torch.equal(clamp, gate) else clamp, sae=sae,
                         slice=None, tau=float("inf"), meta=meta)
    merged, report, _ = calibrate(model, merged, calibration=calibration, heldout=heldout, forget=forget,
                                  p_dyn=p_dyn)
    return merged, report


class _StackHandle:
    """What ``StackedGuardrails.attach`` yields: the handle interface evaluate_mcq uses (set_batch, last_gate)."""

    def __init__(self, modules: list[GuardrailModule]):
        self.modules = modules

    def set_batch(self, batch) -> None:
        for m in self.modules:
            m.set_batch(batch)

    @property
    def last_gate(self) -> torch.Tensor | None:
        gates = [m.last_gate for m in self.modules if m.last_gate is not None]
        return torch.stack(gates).any(0) if gates else None  # gated by any request

    @property
    def last_rho(self) -> torch.Tensor | None:
        rhos = [m.last_rho for m in self.modules if m.last_rho is not None]
        return torch.stack(rhos).max(0).values if rhos else None


@dataclass(frozen=True)
class StackedGuardrails:
    """Several guardrails at one hook point, applied in order in one hook: h -> g_k(...g_2(g_1(h))), each with its
    own gate latents, tau and clamp. Attach like a Guardrail: ``with stack.attach(model) as handle: ...``."""

    guardrails: tuple[Guardrail, ...]

    def __post_init__(self) -> None:
        if not self.guardrails:
            raise ValueError("StackedGuardrails needs at least one guardrail")
        hooks = {g.hook_name for g in self.guardrails}
        if len(hooks) != 1:
            raise ValueError(f"stacked guardrails must share one hook point, got {sorted(hooks)}")

    @property
    def hook_name(self) -> str:
        return self.guardrails[0].hook_name

    @contextmanager
    def attach(self, model) -> Iterator[_StackHandle]:
        """Hooks are removed on exit (TransformerLens ``model.hooks``), also on exceptions."""
        if self.hook_name not in model.hook_dict:
            raise KeyError(f"hook point {self.hook_name!r} does not exist in this model")
        modules = [GuardrailModule(g) for g in self.guardrails]

        def hook(act: torch.Tensor, hook=None) -> torch.Tensor:
            for m in modules:
                act = m(act)
            return act

        with model.hooks(fwd_hooks=[(self.hook_name, hook)]):
            yield _StackHandle(modules)


def domain_accuracies(model, world: World, split: str, *, guardrail: Guardrail | None = None,
                      retain_domains: Sequence[str] = RETAIN_DOMAINS, mode: str = "cloze", batch_size: int = 64,
                      gate_scope: str = "sequence") -> dict[str, float]:
    """Accuracy on every domain's items, plus ``retain`` pooled over ``retain_domains`` (item-weighted)."""
    out, right, total = {}, 0.0, 0
    for d in DOMAINS:
        r = evaluate_mcq(model, world.mcq[split][d], mode, guardrail=guardrail, batch_size=batch_size,
                         gate_scope=gate_scope)
        out[d] = r.accuracy
        if d in retain_domains:
            right += float(r.correct.sum())
            total += len(r.correct)
    out["retain"] = right / total if total else float("nan")
    return out


@dataclass
class SequentialResult:
    """``stages[method][k]``: domain accuracies after k requests (k = 0: the base model)."""

    stages: dict[str, list[dict[str, float]]]
    gates: list[dict]  # per request: that request's own gate report and the merged one
    latents: list[dict]
    costs: dict[str, list[dict]]
    wall_s: float

    def drift(self) -> dict[str, list[float]]:
        """Retain accuracy after each request minus the base model's."""
        return {m: [s["retain"] - st[0]["retain"] for s in st] for m, st in self.stages.items()}

    def to_dict(self) -> dict:
        return {"stages": self.stages, "gates": self.gates, "latents": self.latents, "costs": self.costs,
                "drift": self.drift(), "wall_s": self.wall_s}


def run_sequential(art, dsg_cfg: DSGConfig, cfg: SequentialConfig, *, cache_dir: Path | None, mode: str = "cloze",
                   batch_size: int = 64, gate_scope: str = "sequence", progress: bool = True,
                   log: Callable[[str], Any] = lambda _s: None) -> SequentialResult:
    """Forget ``cfg.requests`` in order with DSG (merged union guardrail) and each baseline (applied in sequence)."""
    t0 = time.perf_counter()
    model, world = art.model, art.world
    retain = [d for d in RETAIN_DOMAINS if d not in cfg.requests]

    def acc(m, g=None) -> dict[str, float]:
        return domain_accuracies(m, world, cfg.mcq_split, guardrail=g, retain_domains=retain, mode=mode,
                                 batch_size=batch_size, gate_scope=gate_scope)

    base = acc(model)
    stages: dict[str, list[dict[str, float]]] = {f"dsg_{c}": [base] for c in COMPOSITIONS}
    stages.update({b: [base] for b in cfg.baselines})
    costs: dict[str, list[dict]] = {b: [] for b in cfg.baselines}
    fits: list[tuple[Corpora, DSGFit]] = []
    gates: list[dict] = []
    latents: list[dict] = []
    edited = {b: model for b in cfg.baselines}
    tok = model.tokenizer
    enc = lambda texts: encode_texts(tok, texts, dsg_cfg.calibration_max_len)  # noqa: E731
    for k, domain in enumerate(cfg.requests):
        corpora, fit = fit_world(art, dsg_cfg, domain, cache_dir, progress=progress)
        fits.append((corpora, fit))
        if k == 0:
            g, report = fit.guardrail, fit.gate
        else:
            g, report = merge_guardrails(
                model, [f.guardrail for _, f in fits], calibration=enc(corpora.calibration),
                heldout=enc(corpora.heldout_retain), forget=enc([s for c, _ in fits for s in c.forget_eval]),
                p_dyn=dsg_cfg.p_dyn)
        gates.append({"request": domain, "own": fit.gate.to_dict(), "deployed": report.to_dict()})
        latents.append({"request": domain, "own": fit.selection.latents.tolist(),
                        "deployed_gate": g.gate_latents.tolist()})
        stages["dsg_union"].append(acc(model, g))
        stages["dsg_stacked"].append(acc(model, StackedGuardrails(tuple(f.guardrail for _, f in fits))))
        for c in COMPOSITIONS:
            log(f"after {domain}: dsg_{c} " + _fmt(stages[f"dsg_{c}"][-1]))
        for b in cfg.baselines:
            fn, bcfg = (apply_rmu, cfg.rmu) if b == "rmu" else (apply_graddiff, cfg.graddiff)
            res = fn(edited[b], corpora.forget, corpora.retain, bcfg, progress=progress)
            edited[b] = res.model
            costs[b].append({"request": domain, **res.summary()})
            stages[b].append(acc(edited[b]))
            log(f"after {domain}: {b} " + _fmt(stages[b][-1]))
    return SequentialResult(stages, gates, latents, costs, time.perf_counter() - t0)


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in acc.items())


def retain_bar(result: SequentialResult, method: str = "dsg_union", ratio: float = 0.97) -> dict:
    """The issue's bar: pooled retain accuracy after the last request >= ratio x the base model's."""
    st = result.stages[method]
    return {"method": method, "base_retain": st[0]["retain"], "final_retain": st[-1]["retain"],
            "ratio": st[-1]["retain"] / st[0]["retain"], "passes": st[-1]["retain"] >= ratio * st[0]["retain"]}


def sequential_plot(result: SequentialResult, requests: Sequence[str], path: str | Path) -> Path:
    """One panel per method: each domain's accuracy after 0..k requests."""
    plt = pyplot()

    methods = list(result.stages)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 3.8), squeeze=False, sharey=True)
    labels = ["base", *[f"-{r}" for r in requests]]
    for ax, m in zip(axes[0], methods, strict=True):
        for d in (*DOMAINS, "retain"):
            ys = [s[d] for s in result.stages[m]]
            ax.plot(range(len(ys)), ys, "o-" if d != "retain" else "s--", label=d,
                    lw=2.5 if d == "retain" else 1.2)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(m)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MCQ accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("sequential unlearning: accuracy after each request")
    return save_figure(fig, path)


__all__ = ["COMPOSITIONS", "SequentialConfig", "StackedGuardrails", "union_latents", "merge_guardrails", "domain_accuracies", "SequentialResult",
           "run_sequential", "retain_bar", "sequential_plot"]
