"""DSG against the unlearning baselines on the world: DSG's (N, c) sweep, static SAE clamping, RMU, GradDiff and
NPO over their world grids, every point evaluated like the demo (train-frame MCQs: forget domain, pooled retain
domains, adjacent). Writes baselines.json, pareto.png (every method's sweep), the table of each method's lowest
forget accuracy with retain >= 0.98 x base, and one offline W&B run per method.

    python analyses/baselines.py [--config configs/demo.yaml] [--set KEY=VALUE] [--cache DIR] [--out runs/baselines]
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dsg_tl.baselines import graddiff, npo, rmu, static
from dsg_tl.baselines.common import config_grid
from dsg_tl.baselines.report import best_under_retain, methods_plot
from dsg_tl.cli import analysis_args, world_fit
from dsg_tl.config import to_dict
from dsg_tl.demo import sweep_points
from dsg_tl.evaluation.domains import GROUPS, domain_groups, evaluate_groups, summarize
from dsg_tl.tracking import log_wandb_run, write_results

RETAIN_RATIO = 0.98
SPLIT = "train_frames"
FINETUNE = {
    "rmu": (rmu.apply_rmu, rmu.WORLD_RMU, rmu.WORLD_GRID),
    "graddiff": (graddiff.apply_graddiff, graddiff.WORLD_GRADDIFF, graddiff.WORLD_GRID),
    "npo": (npo.apply_npo, npo.WORLD_NPO, npo.WORLD_GRID),
}


def changed(cfg, base_cls) -> dict:
    """The fields of ``cfg`` that differ from ``base_cls()`` defaults (the paper defaults), for labels."""
    ref = to_dict(base_cls())
    return {k: v for k, v in to_dict(cfg).items() if ref.get(k) != v}


def main() -> None:
    args = analysis_args(__doc__, "runs/baselines")
    t_all = time.perf_counter()
    cfg, art, corpora, fit = world_fit(args)
    torch.manual_seed(cfg.dsg.seed)
    model = art.model
    groups = domain_groups(art.world, SPLIT, cfg.forget_domain)

    def evaluate(m, guardrail=None) -> dict:
        res = summarize(evaluate_groups(m, groups, mode=cfg.eval.mode, guardrail=guardrail,
                                        batch_size=cfg.eval.batch_size, gate_scope=cfg.eval.gate_scope))
        return {k: res[k]["accuracy"] for k in GROUPS}

    base = evaluate(model)
    print(f"base: forget {base['forget']:.3f} retain {base['retain']:.3f} adjacent {base['adjacent']:.3f}")
    sweeps: dict[str, list[dict]] = {}
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    sweeps["dsg"] = [{"method": "dsg", "params": {"n_features": p["n_features"], "c": p["c"], "tau": p["tau"]},
                      **{k: p[k] for k in GROUPS}}
                     for p in sweep_points(model, art.sae, fit, corpora, groups, cfg)]
    timings["dsg_sweep"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sweeps["static"] = []
    for scfg in config_grid(static.StaticConfig(), static.WORLD_GRID):
        g = static.static_guardrail(fit, scfg)
        sweeps["static"].append({"method": "static", "params": {"n_features": len(g.gate_latents), "c": g.c},
                                 **evaluate(model, g)})
    timings["static_sweep"] = time.perf_counter() - t0

    for name, (apply, world_cfg, grid) in FINETUNE.items():
        t0 = time.perf_counter()
        sweeps[name] = []
        for i, c in enumerate(config_grid(world_cfg, grid)):
            res = apply(model, corpora.forget, corpora.retain, c)
            acc = evaluate(res.model)
            sweeps[name].append({"method": name, "params": changed(c, type(world_cfg)), **acc, "wall_s": res.wall_s,
                                 "peak_mem_mb": res.peak_mem_mb, "loss_first": res.losses[0],
                                 "loss_last": res.losses[-1], "terms_last": {k: v[-1] for k, v in res.terms.items()},
                                 "config": to_dict(c)})
            print(f"{name} [{i + 1}] {changed(c, type(world_cfg))}: forget {acc['forget']:.3f} retain "
                  f"{acc['retain']:.3f} adjacent {acc['adjacent']:.3f} ({res.wall_s:.1f} s)")
        timings[f"{name}_sweep"] = time.perf_counter() - t0

    best = {name: best_under_retain(pts, base["retain"], RETAIN_RATIO) for name, pts in sweeps.items()}
    out = Path(args.out)
    plot = methods_plot(sweeps, base, out / "pareto.png",
                        f"Unlearning methods on the world ({SPLIT}); forget={cfg.forget_domain}", RETAIN_RATIO)
    timings["total"] = time.perf_counter() - t_all

    print(f"\nlowest forget accuracy with retain >= {RETAIN_RATIO} x base ({RETAIN_RATIO * base['retain']:.3f}):")
    print(f"{'method':<10}{'forget':>8}{'retain':>8}{'adjacent':>10}  hyperparameters")
    print(f"{'base':<10}{base['forget']:>8.3f}{base['retain']:>8.3f}{base['adjacent']:>10.3f}")
    for name, b in best.items():
        if b is None:
            print(f"{name:<10}{'-':>8}{'-':>8}{'-':>10}  no point keeps retain above the floor")
        else:
            print(f"{name:<10}{b['forget']:>8.3f}{b['retain']:>8.3f}{b['adjacent']:>10.3f}  {b['params']}")

    config = {"demo": to_dict(cfg), "split": SPLIT, "retain_ratio": RETAIN_RATIO,
              "grids": {"static": static.WORLD_GRID, "dsg": to_dict(cfg.sweep),
                        **{n: {"base": to_dict(c), "grid": g} for n, (_, c, g) in FINETUNE.items()}}}
    seeds = {"world": cfg.world.facts.seed, "model": cfg.world.model.seed, "sae": cfg.world.sae.seed,
             "dsg": cfg.dsg.seed, **{n: c.seed for n, (_, c, _) in FINETUNE.items()}}
    results = {"base": base, "sweeps": sweeps, "best": best, "timings_s": timings, "gate": fit.gate.to_dict(),
               "world": {"path": str(art.path), "hook_name": art.hook_name}, "plot": str(plot)}
    write_results(out / "baselines.json", results, config=config, seeds=seeds)
    if cfg.wandb:
        runs = {}
        for name, pts in sweeps.items():
            keys = sorted({k for p in pts for k in p["params"]})
            cols = [*keys, *GROUPS] + (["wall_s", "peak_mem_mb"] if name in FINETUNE else [])
            rows = [[p["params"].get(k) for k in keys] + [p.get(c) for c in cols[len(keys):]] for p in pts]
            runs[name] = str(log_wandb_run(
                out / "wandb", project=cfg.wandb_project, name=f"baseline-{name}", group="baselines",
                config={"method": name, "grid": config["grids"].get(name), "split": SPLIT},
                metrics={"base": base, "best": best[name] or {}, "n_points": len(pts)}, images={"pareto": plot},
                tables={"sweep": (cols, rows)}))
        results["wandb_run_dirs"] = runs
        write_results(out / "baselines.json", results, config=config, seeds=seeds)
    print(f"wrote {out / 'baselines.json'} and {plot} in {timings['total']:.0f} s")


if __name__ == "__main__":
    main()
