"""Clamp strength vs specificity on the world: DSG, the random-latent control, static clamping of the selected and of
random latents, over a range of c; gate TPR and the forget accuracy the gate allows with a perfect clamp; and how
well any single latent, and the selection's union, separates the forget domain's entity-name tokens from the other
domains' (`--skip-separability` to leave that out).

    python analyses/specificity.py [--config configs/demo.yaml] [--out runs/specificity] [--cs 2.5 5 10 20]
"""

from __future__ import annotations

from pathlib import Path

from dsg_tl.analysis.separability import entity_firing, separability_summary
from dsg_tl.analysis.specificity import clamp_scan, clamp_scan_plot
from dsg_tl.cli import analysis_args, world_fit
from dsg_tl.config import to_dict
from dsg_tl.evaluation.domains import domain_groups
from dsg_tl.pipeline import method_guardrails
from dsg_tl.tracking import write_results

DEFAULT_CS = (2.5, 5.0, 7.5, 10.0, 15.0, 20.0)


def main() -> None:
    def extra(p):
        p.add_argument("--cs", type=float, nargs="+", default=list(DEFAULT_CS), help="clamp values to scan")
        p.add_argument("--skip-separability", action="store_true", help="skip the entity-token firing rates")

    args = analysis_args(__doc__, "runs/specificity", extra=extra)
    cs = tuple(args.cs)
    cfg, art, _, fit = world_fit(args)
    groups = domain_groups(art.world, cfg.eval.splits[0], cfg.forget_domain)
    gs = method_guardrails(fit)
    gs["static_random"] = gs["random_control"].with_(mode="static")
    scan = clamp_scan(art.model, groups, gs, cs, mode=cfg.eval.mode, gate_scope=cfg.eval.gate_scope,
                      batch_size=cfg.eval.batch_size)
    out = Path(args.out)
    sep = None
    if not args.skip_separability:
        split = art.world.mcq[cfg.eval.splits[0]]
        firing = entity_firing(art.model, art.sae, art.hook_name, split,
                               {d: art.world.entities(d) for d in split}, selected=fit.selection.latents)
        sep = separability_summary(firing, cfg.forget_domain)
    plot = clamp_scan_plot(scan, out / "specificity.png", f"clamp strength vs specificity ({cfg.eval.splits[0]})")
    write_results(out / "specificity.json", {**scan, "gate": fit.gate.to_dict(), "split": cfg.eval.splits[0],
                                             "separability": sep},
                  config=to_dict(cfg), seeds={"dsg": cfg.dsg.seed})
    print("base " + " ".join(f"{k} {v:.3f}" for k, v in scan["base"].items()))
    print(f"{'method':<16}{'c':>6}{'forget':>8}{'retain':>8}{'adjacent':>9}{'gated':>7}{'acc|g':>7}{'floor':>7}"
          f"{'ctrl share':>11}")
    for r in scan["rows"]:
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in ("forget_gated_fraction", "forget_acc_gated", "gate_floor")]
        share = f"{r['control_share']:.3f}" if "control_share" in r else "-"
        print(f"{r['method']:<16}{r['c']:>6g}{r['forget']:>8.3f}{r['retain']:>8.3f}{r.get('adjacent', 0):>9.3f}"
              + "".join(f"{x:>7}" for x in cells) + f"{share:>11}")
    if sep is not None:
        b = sep["best_latent"]
        print(f"best single latent for {cfg.forget_domain} entity tokens: #{b['latent']} fires on "
              f"{b['forget_entity_rate']:.2f} of them and on up to {b['max_other_entity_rate']:.2f} of another "
              f"domain's entity tokens")
        print(f"{'domain':<12}{'tokens ent/other':>18}{'selection fires at entity':>27}{'at other tokens':>17}")
        for d, r in sep["domains"].items():
            print(f"{d:<12}{r['n_entity_tokens']:>9}/{r['n_other_tokens']:<8}{r['selected_any_entity']:>27.3f}"
                  f"{r['selected_any_other']:>17.3f}")
    print(f"wrote {out / 'specificity.json'} and {plot}")


if __name__ == "__main__":
    main()
