"""Data efficiency of DSG's selection on the world: forget-set size sweep (fraction of the forget corpus from 100% down
to 5%, then a few documents) and zero-shot selection from a handful of domain-describing prompts with tau set by hand.

    python analyses/data_efficiency.py [--config configs/demo.yaml] [--out runs/data_efficiency]
                                       [--fractions 1 0.5 0.25 0.1 0.05] [--n-docs 1 3 10] [--taus 0.1 0.2 0.3 0.5]
"""

from __future__ import annotations

from pathlib import Path

from dsg_tl.analysis.data_efficiency import DataEfficiencyConfig, data_efficiency_plot, size_sweep, zero_shot
from dsg_tl.cli import analysis_args, world_fit
from dsg_tl.config import to_dict
from dsg_tl.evaluation.domains import domain_groups, evaluate_groups, summarize
from dsg_tl.tracking import log_wandb_run, write_results
from dsg_tl.world.build import default_cache_dir

DEFAULT = DataEfficiencyConfig()
COLS = ("n_docs", "overlap_with_full", "tau", "gate_fpr", "gate_tpr", "forget", "retain", "adjacent")


def _extra(p) -> None:
    p.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT.fractions))
    p.add_argument("--n-docs", type=int, nargs="*", default=list(DEFAULT.n_docs))
    p.add_argument("--taus", type=float, nargs="+", default=list(DEFAULT.zero_shot_taus), help="zero-shot taus")


def _line(r: dict) -> str:
    cells = "".join(f"{r[c]:>10.3f}" if isinstance(r.get(c), float) else f"{r.get(c, '-')!s:>10}" for c in COLS)
    return f"{r['point']:<34}{cells}"


def main() -> None:
    args = analysis_args(__doc__, "runs/data_efficiency", extra=_extra)
    dcfg = DataEfficiencyConfig(fractions=tuple(args.fractions), n_docs=tuple(args.n_docs),
                                zero_shot_taus=tuple(args.taus))
    cfg, art, corpora, fit = world_fit(args)
    split = cfg.eval.splits[0]
    groups = domain_groups(art.world, split, cfg.forget_domain)
    ev = {"mode": cfg.eval.mode, "batch_size": cfg.eval.batch_size, "gate_scope": cfg.eval.gate_scope}
    base = {k: v["accuracy"] for k, v in summarize(evaluate_groups(art.model, groups, mode=ev["mode"],
                                                                   batch_size=ev["batch_size"])).items()}
    print("base: " + " ".join(f"{k} {v:.3f}" for k, v in base.items()) + f"   ({split})")
    print(f"{'point':<34}" + "".join(f"{c[:10]:>10}" for c in COLS))
    sweep = size_sweep(art, corpora, fit, cfg.dsg, dcfg, groups, cache_dir=Path(args.cache or default_cache_dir()),
                       eval_kw=ev, progress=lambda r: print(_line(r), flush=True))
    zs = zero_shot(art, corpora, fit, cfg.dsg, dcfg, groups, eval_kw=ev,
                   progress=lambda r: print(_line({**r, "point": "zero-shot " + r["point"]}), flush=True))
    out = Path(args.out)
    plot = data_efficiency_plot(sweep, zs, base, out / "data_efficiency.png")
    config = {"demo": to_dict(cfg), "data_efficiency": to_dict(dcfg)}
    write_results(out / "data_efficiency.json", {"base": base, "split": split, "size_sweep": sweep, "zero_shot": zs,
                                                 "n_forget_docs": len(corpora.forget)},
                  config=config, seeds={"dsg": cfg.dsg.seed})
    if cfg.wandb:
        rows = [[r["point"], *[r.get(c) for c in COLS]] for r in sweep + zs["rows"]]
        log_wandb_run(out, project=cfg.wandb_project, name="data_efficiency", group="robustness", config=config,
                      metrics={"zero_shot_overlap_with_full": zs["overlap_with_full"],
                               "smallest_point": {k: sweep[-1][k] for k in ("forget", "retain", "adjacent")}},
                      images={"data_efficiency": plot}, tables={"points": (["point", *COLS], rows)})
    print(f"zero-shot prompts ({len(zs['prompts'])}, {zs['n_prompt_tokens']} tokens):")
    for p in zs["prompts"]:
        print(f"  - {p}")
    print(f"zero-shot selection overlap with the full-data selection: {zs['overlap_with_full']:.2f}")
    print(f"wrote {out / 'data_efficiency.json'} and {plot}")


if __name__ == "__main__":
    main()
