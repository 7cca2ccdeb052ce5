"""Relearning attack on the world (the paper's Figs. 5 and 10): fine-tune on documents about half of the forget
domain's entities, measure MCQ accuracy on the other half's facts after each epoch, at two learning rates, for
test-time DSG, train-time DSG, RMU (the world-scaled config) and the undefended base model.

    python analyses/relearn.py [--config configs/demo.yaml] [--out runs/relearn] [--lrs 3e-4 1e-3] [--epochs 4]
                               [--adapter full|lora] [--doc-fraction 1.0]
"""

from __future__ import annotations

from pathlib import Path

from dsg_tl.attacks.relearn import (
    CONDITIONS,
    RelearnConfig,
    RelearnStudyConfig,
    bar_check,
    relearn_plot,
    relearn_study,
)
from dsg_tl.baselines.rmu import WORLD_RMU, apply_rmu
from dsg_tl.cli import analysis_args, world_fit
from dsg_tl.config import to_dict
from dsg_tl.tracking import log_wandb_run, write_results
from dsg_tl.world.facts import RETAIN_DOMAINS

DEFAULT = RelearnStudyConfig()


def _extra(p) -> None:
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT.lrs), help="attack learning rates")
    p.add_argument("--epochs", type=int, default=DEFAULT.attack.epochs)
    p.add_argument("--adapter", choices=("full", "lora"), default=DEFAULT.attack.adapter)
    p.add_argument("--doc-fraction", type=float, default=DEFAULT.attack.doc_fraction,
                   help="fraction of the attacker's documents used")


def main() -> None:
    args = analysis_args(__doc__, "runs/relearn", extra=_extra)
    scfg = RelearnStudyConfig(lrs=tuple(args.lrs), attack=RelearnConfig(
        epochs=args.epochs, adapter=args.adapter, doc_fraction=args.doc_fraction, lr=args.lrs[0]))
    cfg, art, corpora, fit = world_fit(args)
    rmu = apply_rmu(art.model, corpora.forget, corpora.retain, WORLD_RMU)
    res = relearn_study(art.model, fit.guardrail, rmu.model, art.world, scfg, forget_domain=cfg.forget_domain,
                        retain_domains=RETAIN_DOMAINS, mcq_mode=cfg.eval.mode, batch_size=cfg.eval.batch_size,
                        gate_scope=cfg.eval.gate_scope)
    curves = res["curves"]
    lrs = [str(lr) for lr in scfg.lrs]
    bars = {lr: bar_check(curves, lr) for lr in lrs}
    out = Path(args.out)
    plot = relearn_plot(curves, out / "relearn.png",
                        f"relearning attack on {cfg.forget_domain}: held-out entities' facts ({scfg.mcq_split})")
    results = {**res, "bar": bars, "gate": fit.gate.to_dict(), "rmu": rmu.summary()}
    config = {"demo": to_dict(cfg), "study": to_dict(scfg), "rmu": to_dict(WORLD_RMU)}
    write_results(out / "relearn.json", results, config=config,
                  seeds={"dsg": cfg.dsg.seed, "attack": scfg.attack.seed, "split": scfg.seed, "rmu": WORLD_RMU.seed})
    rows = [[c, float(lr), e, curves[c][lr]["forget"][e], curves[c][lr]["retain"][e]]
            for c in CONDITIONS for lr in lrs for e in range(len(curves[c][lr]["forget"]))]
    if cfg.wandb:
        log_wandb_run(out, project=cfg.wandb_project, name="relearn", group="robustness", config=config,
                      metrics={"bar": {lr: {k: float(b[k]) for k in ("below_at_every_attack_epoch",
                                                                      "below_at_every_epoch_incl_0")}
                                       for lr, b in bars.items()}},
                      images={"relearn": plot},
                      tables={"curves": (["condition", "lr", "epoch", "heldout_forget_acc", "retain_acc"], rows)})
    print(f"attacker: {res['n_attack_docs']} documents about {len(res['split']['attacker'])} entities; "
          f"evaluation: {res['n_heldout_items']} items about {len(res['split']['heldout'])} held-out entities; "
          f"retain sample {res['n_retain_items']} items")
    for lr in lrs:
        print(f"\nlr {lr}: held-out forget accuracy (retain accuracy) by epoch, epoch 0 = before the attack")
        for c in CONDITIONS:
            f, r = curves[c][lr]["forget"], curves[c][lr]["retain"]
            print(f"  {c:<15}" + " ".join(f"{a:.3f}({b:.3f})" for a, b in zip(f, r, strict=True)))
        b = bars[lr]
        print(f"  bar: test-time DSG below RMU at every attack epoch 1..k: {b['below_at_every_attack_epoch']}; "
              f"also before the attack (epoch 0): {b['epochs_below'][0]}")
    print(f"\nwrote {out / 'relearn.json'} and {plot}")


if __name__ == "__main__":
    main()
