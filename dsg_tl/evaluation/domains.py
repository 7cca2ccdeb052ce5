"""Per-domain MCQ evaluation on the world: forget (hazard), retain (pooled retain domains), adjacent."""

from __future__ import annotations

from collections.abc import Sequence

from dsg_tl.data.types import MCQItem
from dsg_tl.evaluation.mcq import GateScope, MCQResult, ScoringMode, evaluate_mcq
from dsg_tl.world.facts import RETAIN_DOMAINS, World

GROUPS = ("forget", "retain", "adjacent")


def domain_groups(world: World, split: str, forget_domain: str = "hazard",
                  retain_domains: Sequence[str] = RETAIN_DOMAINS) -> dict[str, list[MCQItem]]:
    items = world.mcq[split]
    return {
        "forget": list(items[forget_domain]),
        "retain": [it for d in retain_domains for it in items[d]],
        "adjacent": list(items["adjacent"]),
    }


def evaluate_groups(model, groups: dict[str, Sequence[MCQItem]], *, mode: ScoringMode = "cloze",
                    guardrail=None, batch_size: int = 64, gate_scope: GateScope = "question") -> dict[str, MCQResult]:
    return {name: evaluate_mcq(model, items, mode, guardrail=guardrail, batch_size=batch_size, gate_scope=gate_scope)
            for name, items in groups.items()}


def summarize(results: dict[str, MCQResult]) -> dict[str, dict]:
    return {name: r.summary() for name, r in results.items()}
