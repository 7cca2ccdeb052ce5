"""Where does the forgetting come from? Clamp strength vs specificity, and the gate's ceiling.

For each clamp value c and each guardrail (DSG, the frequency-matched random control, static clamping of the selected
latents, static clamping of the random latents), MCQ accuracy per group. For the dynamic guardrails also the gate's
true-positive rate on the forget questions and the forget accuracy split by the gate decision:

    forget_acc = tpr * acc(gated forget items) + (1 - tpr) * acc(ungated forget items)

so the best forget accuracy a dynamic guardrail can reach with a perfect clamp (gated items at chance) is
``(1 - tpr) * acc(ungated) + tpr * chance`` (``gate_floor``). The selection is specific at c when the random control
removes at most half of DSG's drop: ``control_share = (base - random) / (base - dsg) <= 0.5``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from dsg_tl.data.types import MCQItem
from dsg_tl.evaluation.mcq import evaluate_mcq
from dsg_tl.guardrail import Guardrail
from dsg_tl.plotting import pyplot, save_figure


def _split(res) -> dict:
    g = res.gated
    out = {"gated_fraction": float(g.float().mean()) if len(g) else float("nan")}
    ok = res.correct
    out["acc_gated"] = float(ok[g].float().mean()) if bool(g.any()) else float("nan")
    out["acc_ungated"] = float(ok[~g].float().mean()) if bool((~g).any()) else float("nan")
    return out


def clamp_scan(model, groups: Mapping[str, Sequence[MCQItem]], guardrails: Mapping[str, Guardrail],
               cs: Sequence[float], *, mode: str = "cloze", gate_scope: str = "sequence", batch_size: int = 64,
               chance: float | None = None) -> dict:
    """Accuracy of every guardrail at every c; ``groups`` must contain "forget" (and usually "retain", "adjacent")."""
    if "forget" not in groups:
        raise ValueError(f"groups must contain 'forget', got {sorted(groups)}")
    if not cs:
        raise ValueError("cs must hold at least one clamp value")
    base = {k: evaluate_mcq(model, v, mode, batch_size=batch_size).accuracy for k, v in groups.items()}
    n_choices = len(groups["forget"][0].choices) if groups["forget"] else 4
    chance = 1.0 / n_choices if chance is None else chance
    rows = []
    for c in cs:
        for name, g in guardrails.items():
            res = {k: evaluate_mcq(model, v, mode, guardrail=g.with_(c=float(c)), batch_size=batch_size,
                                   gate_scope=gate_scope) for k, v in groups.items()}
            row = {"method": name, "c": float(c), "mode": g.mode, **{k: r.accuracy for k, r in res.items()}}
            if g.mode == "dynamic":
                s = _split(res["forget"])
                row.update({"forget_" + k: v for k, v in s.items()})
                ung = s["acc_ungated"] if s["acc_ungated"] == s["acc_ungated"] else 0.0
                row["gate_floor"] = (1 - s["gated_fraction"]) * ung + s["gated_fraction"] * chance
                for k in groups:
                    if k != "forget":
                        row[f"{k}_gated_fraction"] = _split(res[k])["gated_fraction"]
            rows.append(row)
    # the random control's share of DSG's drop, per c (pairs "<x>" with "random_control" / "static" with
    # "static_random" when present)
    pairs = [("dsg", "random_control"), ("static", "static_random")]
    for c in cs:
        by = {r["method"]: r for r in rows if r["c"] == float(c)}
        for sel, rnd in pairs:
            if sel in by and rnd in by:
                drop = base["forget"] - by[sel]["forget"]
                by[sel]["control_share"] = (base["forget"] - by[rnd]["forget"]) / drop if drop > 0 else float("nan")
    return {"base": base, "chance": chance, "rows": rows, "gate_scope": gate_scope}


def clamp_scan_plot(scan: dict, path: str | Path, title: str = "") -> Path:
    """Forget and retain accuracy vs c, one line per guardrail."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    methods = list(dict.fromkeys(r["method"] for r in scan["rows"]))
    for ax, group in zip(axes, ("forget", "retain"), strict=True):
        for m in methods:
            rs = [r for r in scan["rows"] if r["method"] == m]
            ax.plot([r["c"] for r in rs], [r[group] for r in rs], "o-", label=m)
        ax.axhline(scan["base"][group], color="k", ls="--", lw=1, label="base")
        if group == "forget":
            ax.axhline(scan["chance"], color="grey", ls=":", lw=1, label="chance")
            dsg = [r for r in scan["rows"] if r["method"] == "dsg" and "gate_floor" in r]
            if dsg:
                ax.plot([r["c"] for r in dsg], [r["gate_floor"] for r in dsg], "k:", lw=1,
                        label="DSG floor (gate TPR, perfect clamp)")
        ax.set_xscale("log")
        cs = sorted({r["c"] for r in scan["rows"]})
        ax.set_xticks(cs, [f"{c:g}" for c in cs])
        ax.minorticks_off()
        ax.set_xlabel("clamp value c")
        ax.set_ylabel(f"{group} accuracy")
        ax.set_title(f"{group}")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


__all__ = ["clamp_scan", "clamp_scan_plot"]
