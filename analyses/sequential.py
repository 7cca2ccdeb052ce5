"""Sequential unlearning on the world: forget ``hazard``, then ``exploits``; after each request, every domain's accuracy
for DSG (one merged guardrail: union of the requests' latents, tau recalibrated on retain) and for RMU and GradDiff
applied one after the other (world-scaled configs).

    python analyses/sequential.py [--config configs/demo.yaml] [--out runs/sequential] [--requests hazard exploits]
"""

from __future__ import annotations

from pathlib import Path

from dsg_tl.analysis.sequential import SequentialConfig, retain_bar, run_sequential, sequential_plot
from dsg_tl.cli import analysis_args, load_demo_config
from dsg_tl.config import to_dict
from dsg_tl.tracking import log_wandb_run, write_results
from dsg_tl.world.build import build_or_load_world, default_cache_dir
from dsg_tl.world.facts import DOMAINS


def main() -> None:
    args = analysis_args(__doc__, "runs/sequential", extra=lambda p: p.add_argument(
        "--requests", nargs="+", default=list(SequentialConfig().requests), help="forget domains, in order"))
    cfg = load_demo_config(args)
    scfg = SequentialConfig(requests=tuple(args.requests), mcq_split=cfg.eval.splits[0])
    art = build_or_load_world(cfg.world, args.cache)
    res = run_sequential(art, cfg.dsg, scfg, cache_dir=Path(args.cache or default_cache_dir()), mode=cfg.eval.mode,
                         batch_size=cfg.eval.batch_size, gate_scope=cfg.eval.gate_scope, log=print)
    out = Path(args.out)
    plot = sequential_plot(res, scfg.requests, out / "sequential.png")
    bars = {m: retain_bar(res, m) for m in res.stages}
    config = {"demo": to_dict(cfg), "sequential": to_dict(scfg)}
    write_results(out / "sequential.json", {**res.to_dict(), "bar": bars}, config=config,
                  seeds={"dsg": cfg.dsg.seed, "rmu": scfg.rmu.seed, "graddiff": scfg.graddiff.seed})
    cols = [*DOMAINS, "retain"]
    rows = [[m, k, *[st[k][c] for c in cols]] for m, st in res.stages.items() for k in range(len(st))]
    if cfg.wandb:
        log_wandb_run(out, project=cfg.wandb_project, name="sequential", group="robustness", config=config,
                      metrics={"bar": {m: {"ratio": b["ratio"], "passes": float(b["passes"])} for m, b in bars.items()}},
                      images={"sequential": plot}, tables={"stages": (["method", "requests_done", *cols], rows)})
    stage_names = ["base", *[f"-{r}" for r in scfg.requests]]
    print(f"\n{'method':<9}{'after':<11}" + "".join(f"{c:>11}" for c in cols))
    for m, st in res.stages.items():
        for k, s in enumerate(st):
            print(f"{m:<9}{stage_names[k]:<11}" + "".join(f"{s[c]:>11.3f}" for c in cols))
    for g in res.gates:
        print(f"gate after -{g['request']}: own tau {g['own']['tau']:.3f} TPR {g['own']['forget_tpr']:.3f}; deployed "
              f"tau {g['deployed']['tau']:.3f} FPR {g['deployed']['retain_fpr']:.3f} TPR {g['deployed']['forget_tpr']:.3f}")
    for m, b in bars.items():
        print(f"{m}: retain after all requests {b['final_retain']:.3f} = {b['ratio']:.3f} x base "
              f"({'>=' if b['passes'] else '<'} 0.97)")
    print(f"wrote {out / 'sequential.json'} and {plot}")


if __name__ == "__main__":
    main()
