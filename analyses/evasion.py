"""Gate evasion on the world: dilution, turn splitting, paraphrase and benign look-alikes against every gate variant.

Every gate variant (fraction, windowed, per_turn, hybrid) of the DSG fit is calibrated at the same level alpha on the
same retain sentences; each attack is then run once and scored for every variant (dsg_tl.attacks.evasion). Writes
evasion.json (with config, seeds, versions), dilution.png (attack success and gate pass rate vs dilution length per
gate variant), an offline W&B run, and prints a table.

    python analyses/evasion.py [--config configs/demo.yaml] [--out runs/evasion] [--items 100]
        [--lengths 50,100,250,500,1000,2000] [--turns 3] [--windows 16]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from dsg_tl.attacks.evasion import EvasionConfig, EvasionReport, calibrated_variants, run_evasion
from dsg_tl.cli import analysis_args, world_fit
from dsg_tl.config import to_dict
from dsg_tl.plotting import pyplot, save_figure
from dsg_tl.tracking import log_wandb_run, write_results


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def own_args() -> argparse.Namespace:
    """This script's own options (the common ones are parsed by cli.analysis_args)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--items", type=int, default=100, help="items per group (forget, retain, adjacent)")
    p.add_argument("--lengths", type=_ints, default=(50, 100, 250, 500, 1000, 2000), help="dilution lengths")
    p.add_argument("--turns", type=_ints, default=(3,), help="turns a question is split over")
    p.add_argument("--windows", type=_ints, default=(16,), help="window sizes of the windowed gate")
    ours, rest = p.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    return ours


def dilution_plot(report: EvasionReport, path: Path) -> Path:
    plt = pyplot()

    forget = report.outcomes["forget"]
    names = [a.name for a in report.attacks if a.kind == "dilution"]
    lengths = [a.tokens for a in report.attacks if a.kind == "dilution"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label in report.gates:
        axes[0].plot(lengths, [forget[n][label].accuracy for n in names], marker="o", label=label)
        axes[1].plot(lengths, [forget[n][label].pass_rate for n in names], marker="o", label=label)
    base = [next(iter(forget[n].values())).base_accuracy for n in names]
    axes[0].plot(lengths, base, "k--", label="no guardrail")
    axes[0].axhline(report.chance, color="grey", ls=":", label="chance")
    none = forget.get("none", {})
    for ax, key, title in ((axes[0], "accuracy", "attack success (forget accuracy, guarded)"),
                           (axes[1], "pass_rate", "forget gate pass rate")):
        for o in none.values():
            ax.scatter([lengths[0] * 0.6], [getattr(o, key)], marker="x")
        ax.set_xscale("log")
        ax.set_xlabel(f"benign tokens before the question (model context {report.n_ctx}; x: no attack)")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def table_rows(report: EvasionReport) -> tuple[list[str], list[list]]:
    cols = ["group", "attack", "gate", "prompt_tokens", "base_accuracy", "accuracy", "gate_rate", "pass_rate"]
    rows = [[g, a, lab, o.prompt_tokens, o.base_accuracy, o.accuracy, o.gate_rate, o.pass_rate]
            for g, attacks in report.outcomes.items() for a, row in attacks.items() for lab, o in row.items()]
    return cols, rows


def main() -> None:
    ours = own_args()
    args = analysis_args(__doc__, "runs/evasion")
    cfg, art, corpora, fit = world_fit(args)
    ecfg = EvasionConfig(dilution_lengths=ours.lengths, split_turns=ours.turns, windows=ours.windows,
                         max_items=ours.items, gate_scope=cfg.eval.gate_scope, batch_size=cfg.eval.batch_size,
                         seed=cfg.dsg.seed)
    guardrails, infos = calibrated_variants(art.model, fit.guardrail, corpora, ecfg, p_dyn=cfg.dsg.p_dyn,
                                            max_len=cfg.dsg.calibration_max_len)
    report = run_evasion(art.model, guardrails, infos, art.world, forget_domain=cfg.forget_domain,
                         benign=corpora.heldout_retain, cfg=ecfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"demo": to_dict(cfg), "evasion": asdict(ecfg)}
    write_results(out / "evasion.json", report.to_dict(), config=config,
                  seeds={"world": cfg.world.facts.seed, "dsg": cfg.dsg.seed, "evasion": ecfg.seed})
    plot = dilution_plot(report, out / "dilution.png")
    print(report.table())
    if cfg.wandb:
        log_wandb_run(out / "wandb", project=cfg.wandb_project, name="evasion", config=config,
                      metrics=report.to_dict()["outcomes"], images={"dilution": plot},
                      tables={"evasion": table_rows(report)})
    print(f"wrote {out / 'evasion.json'} and {plot}")


if __name__ == "__main__":
    main()
