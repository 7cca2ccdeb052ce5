"""The ``dsg-tl`` command line. Thin: parse arguments, load a config, call library functions, print."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = "configs/demo.yaml"


def _offline_defaults(hub: bool) -> None:
    """Default W&B to offline, and the Hugging Face hub to offline for commands that need no hub (the world ones),
    whenever the user has not chosen. ``dsg-tl paper`` leaves the hub variables alone so hub names load."""
    defaults = [("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("TOKENIZERS_PARALLELISM", "false")]
    if not hub:
        defaults += [("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                     ("HF_HUB_DISABLE_TELEMETRY", "1")]
    for k, v in defaults:
        os.environ.setdefault(k, v)


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def load_demo_config(args):
    from dsg_tl.config import load_config, override
    from dsg_tl.demo import DemoConfig

    path = Path(args.config)
    if args.config == DEFAULT_CONFIG and not path.is_file():
        cfg = DemoConfig()  # running outside the repository: built-in defaults
    else:
        cfg = load_config(path, DemoConfig)
    if args.set:
        pairs = {}
        for item in args.set:
            if "=" not in item:
                raise SystemExit(f"--set expects key=value, got {item!r}")
            k, v = item.split("=", 1)
            pairs[k.strip()] = _parse_value(v)
        cfg = override(cfg, pairs)
    return cfg


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set dsg.c=40 --set world.model.steps=100 (repeatable)")
    p.add_argument("--cache", default=None, help="cache directory (default: $DSG_TL_CACHE or ./.dsg_cache)")


def cmd_world_build(args) -> None:
    from dsg_tl.world.build import build_or_load_world

    cfg = load_demo_config(args)
    art = build_or_load_world(cfg.world, args.cache, rebuild=args.rebuild)
    m = art.metrics
    print(f"world at {art.path}")
    print("build timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in m["timings_s"].items()))
    s = m["sae"]
    print(f"LM final loss {m['lm_final_loss']:.3f}; SAE {art.sae.cfg.architecture()} d_sae={art.sae.cfg.d_sae} at "
          f"{art.hook_name}: FVE {s['fve']:.3f}, L0 {s['l0']:.1f}, dead {s['dead_fraction']:.3f}, "
          f"CE {s['ce_clean']:.3f} -> {s['ce_spliced']:.3f} (+{s['ce_increase']:.3f})")


def cmd_world_eval(args) -> None:
    from dsg_tl.evaluation.mcq import evaluate_mcq
    from dsg_tl.world.build import build_or_load_world
    from dsg_tl.world.facts import DOMAINS

    cfg = load_demo_config(args)
    art = build_or_load_world(cfg.world, args.cache)
    splits = ("train_frames", "heldout_frames")
    print(f"{'domain':<12}" + "".join(f"{s:>28}" for s in splits))
    rows = {}
    for d in DOMAINS:
        cells = []
        for s in splits:
            r = evaluate_mcq(art.model, art.world.mcq[s][d], cfg.eval.mode, batch_size=cfg.eval.batch_size)
            rows.setdefault(d, {})[s] = r.summary()
            cells.append(f"acc {r.accuracy:.3f} margin {r.mean_margin:+.2f}")
        print(f"{d:<12}" + "".join(f"{c:>28}" for c in cells))
    if args.out:
        from dsg_tl.utils import write_json

        write_json(Path(args.out), {"world": str(art.path), "mode": cfg.eval.mode, "accuracy": rows})


def world_fit(args):
    """Config, world, corpora and DSG fit for a command or analysis script with the common arguments."""
    from dsg_tl.pipeline import fit_world
    from dsg_tl.world.build import build_or_load_world, default_cache_dir

    cfg = load_demo_config(args)
    art = build_or_load_world(cfg.world, args.cache)
    corpora, fit = fit_world(art, cfg.dsg, cfg.forget_domain, Path(args.cache or default_cache_dir()))
    return cfg, art, corpora, fit


def analysis_args(doc: str, default_out: str, extra=None) -> argparse.Namespace:
    """Arguments of an analyses/ script: the common ones plus --out (and ``extra(parser)``'s); applies the offline
    defaults."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    _common(p)
    p.add_argument("--out", default=default_out)
    if extra is not None:
        extra(p)
    args = p.parse_args()
    _offline_defaults(hub=False)
    return args


def cmd_select(args) -> None:
    from dsg_tl.config import save_config
    from dsg_tl.utils import write_json

    cfg, art, _, fit = world_fit(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "selection.json", {**fit.selection.summary(), "explain": fit.selection.explain()})
    fit.forget_stats.save(out / "forget_stats.safetensors")
    fit.retain_stats.save(out / "retain_stats.safetensors")
    save_config(cfg, out / "config.yaml")
    print(f"{'rank':>4} {'latent':>6} {'forget E[a^2]':>14} {'retain E[a^2]':>14} {'ratio':>10}")
    for r in fit.selection.explain():
        print(f"{r['rank']:>4} {r['latent']:>6} {r['forget_score']:>14.4f} {r['retain_score']:>14.4f} {r['ratio']:>10.3g}")
    print(f"wrote {out / 'selection.json'}")


def cmd_calibrate(args) -> None:
    from dsg_tl.config import save_config
    from dsg_tl.utils import write_json

    cfg, art, _, fit = world_fit(args)
    out = Path(args.out)
    fit.guardrail.save(out / "guardrail")
    write_json(out / "gate.json", fit.gate.to_dict())
    save_config(cfg, out / "config.yaml")
    g = fit.gate
    print(f"tau={g.tau:.4f} (p_dyn={cfg.dsg.p_dyn}, alpha={g.alpha:.3f}); held-out retain FPR={g.retain_fpr:.3f}; "
          f"forget TPR={g.forget_tpr:.3f}\nguardrail saved to {out / 'guardrail'}")


def cmd_evaluate(args) -> None:
    from dsg_tl.evaluation.domains import domain_groups, evaluate_groups, summarize
    from dsg_tl.guardrail import Guardrail
    from dsg_tl.utils import write_json
    from dsg_tl.world.build import build_or_load_world

    cfg = load_demo_config(args)
    art = build_or_load_world(cfg.world, args.cache)
    g = Guardrail.load(args.guardrail, sae=art.sae)
    results = {}
    for split in cfg.eval.splits:
        groups = domain_groups(art.world, split, cfg.forget_domain)
        results[split] = {
            "base": summarize(evaluate_groups(art.model, groups, mode=cfg.eval.mode)),
            "guardrail": summarize(evaluate_groups(art.model, groups, mode=cfg.eval.mode, guardrail=g,
                                                   gate_scope=cfg.eval.gate_scope)),
        }
        for name, r in results[split].items():
            print(f"{split:<15} {name:<10} " + "  ".join(f"{k} {v['accuracy']:.3f}" for k, v in r.items()))
    if args.out:
        write_json(Path(args.out) / "evaluation.json", results)


def cmd_demo(args) -> None:
    from dsg_tl.demo import run_demo

    cfg = load_demo_config(args)
    run_demo(cfg, args.out, args.cache)


def cmd_doctor(args) -> None:
    """Check a (model, SAE, layer) triple: the world's by default, or --model/--sae (hub names or local dirs)."""
    from dsg_tl.models import ModelSpec, SAESpec, doctor, load_model, load_sae

    if args.model or args.sae:
        if not (args.model and args.sae):
            raise SystemExit("dsg-tl doctor: give both --model and --sae (or neither, for the world)")
        from dsg_tl.data.corpora import load_texts

        model = load_model(ModelSpec(name=args.model, device=args.device, dtype=args.dtype))
        sae_spec = (SAESpec(path=args.sae, device=args.device, dtype=args.dtype) if Path(args.sae).exists()
                    else SAESpec(release=args.sae.split(":", 1)[0], sae_id=args.sae.split(":", 1)[1],
                                 device=args.device, dtype=args.dtype))
        sae = load_sae(sae_spec, model)  # fails loudly when d_in or the hook does not fit the model
        if not args.texts:
            raise SystemExit("dsg-tl doctor: --texts FILE (jsonl/raw lines) is needed with --model/--sae")
        texts = load_texts(args.texts, max_docs=64)
        c = args.c
    else:
        from dsg_tl.world.build import build_or_load_world

        cfg = load_demo_config(args)
        art = build_or_load_world(cfg.world, args.cache)
        model, sae = art.model, art.sae
        texts = list(art.world.documents["geography"][:64])
        c = args.c if args.c is not None else cfg.dsg.c
    report = doctor(model, sae, texts, c=c if c is not None else 500.0)
    for k, v in report.to_dict().items():
        print(f"{k:>14}: {v}")


def cmd_bench(args) -> None:
    from dsg_tl.bench import run_bench
    from dsg_tl.world.build import build_or_load_world

    cfg = load_demo_config(args)
    art = None if args.skip_world else build_or_load_world(cfg.world, args.cache)
    res = run_bench(art, args.out, repeats=args.repeats, seq_len=args.seq_len, batch=args.batch,
                    gemma_layers=args.gemma_layers, full_depth=args.full_depth, device=args.device,
                    gemma=not args.skip_gemma, threads=args.threads)
    for name, r in res.items():
        line = (f"{name:<18} base {r['base_ms']:8.2f} ms  reference {r['reference_ms']:8.2f} ms "
                f"({100 * r['reference_overhead']:+.1f}%)  fast {r['fast_ms']:8.2f} ms ({100 * r['fast_overhead']:+.1f}%)")
        if "fast_overhead_per_layer_equiv" in r:
            line += (f"  per layer-equivalent of {r['layer_equivalent_full_depth']} layers: reference "
                     f"{100 * r['reference_overhead_per_layer_equiv']:+.2f}%, fast {100 * r['fast_overhead_per_layer_equiv']:+.2f}%")
        print(line)
    print(f"wrote {Path(args.out) / 'bench.json'}")


def cmd_paper(args) -> None:
    from dsg_tl.config import load_config, override
    from dsg_tl.paper import PaperConfig, run_paper

    cfg = load_config(args.config, PaperConfig)
    if args.set:
        cfg = override(cfg, {k.strip(): _parse_value(v) for k, v in (i.split("=", 1) for i in args.set)})
    res = run_paper(cfg, args.out, args.cache)
    print(f"wrote {Path(args.out) / 'results.json'}")
    for name, r in (res.get("methods") or {}).items():
        print(f"{name:<16} {r}")


DEFAULT_SWEEP_GRID = "configs/sweep_world.yaml"


def cmd_sweep(args) -> None:
    """Run a grid sweep locally (resumable), emit a W&B sweep YAML, or evaluate one point under `wandb agent`."""
    from dsg_tl.config import load_config
    from dsg_tl.sweep import SweepGrid, emit_wandb_sweep_config, run_agent_point, run_sweep

    cfg = load_demo_config(args)
    if args.grid == DEFAULT_SWEEP_GRID and not Path(args.grid).is_file():
        raise SystemExit(f"dsg-tl sweep: {args.grid} not found (run inside the repository or pass --grid FILE)")
    grid = load_config(args.grid, SweepGrid)
    if args.emit_wandb_sweep:
        command = ["dsg-tl", "sweep", "--agent", "--config", args.config, "--grid", args.grid, "--out", args.out]
        for item in args.set or []:
            command += ["--set", item]
        if args.cache:
            command += ["--cache", args.cache]
        if args.group:
            command += ["--group", args.group]
        path = emit_wandb_sweep_config(grid, args.emit_wandb_sweep, command=command)
        print(f"wrote {path} ({len(grid)} points); run it with: wandb sweep {path}  then  wandb agent SWEEP_ID")
        return
    if args.agent:
        run_agent_point(cfg, grid, args.out, args.cache, group=args.group)
        return
    run_sweep(cfg, grid, args.out, args.cache, group=args.group)


def cmd_report(args) -> None:
    from dsg_tl.report import build_report, create_wandb_report

    path = build_report(args.dir, args.out)
    print(f"wrote {path}")
    if args.wandb_report:
        print(create_wandb_report(args.dir))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsg-tl", description="Dynamic SAE Guardrails on TransformerLens + sae-lens.")
    sub = p.add_subparsers(dest="command", required=True)

    world = sub.add_parser("world", help="the fictional-knowledge world")
    wsub = world.add_subparsers(dest="world_command", required=True)
    wb = wsub.add_parser("build", help="build (or load from cache) the world: tokenizer, tiny model, SAE")
    _common(wb)
    wb.add_argument("--rebuild", action="store_true", help="rebuild even when a valid cache exists")
    wb.set_defaults(func=cmd_world_build)
    we = wsub.add_parser("eval", help="base-model MCQ accuracy per domain, as a table")
    _common(we)
    we.add_argument("--out", default=None, help="also write the table as JSON to this file")
    we.set_defaults(func=cmd_world_eval)

    s = sub.add_parser("select", help="streaming statistics and Fisher feature selection")
    _common(s)
    s.add_argument("--out", default="runs/select")
    s.set_defaults(func=cmd_select)
    c = sub.add_parser("calibrate", help="select, then calibrate the gate threshold tau; save the guardrail")
    _common(c)
    c.add_argument("--out", default="runs/calibrate")
    c.set_defaults(func=cmd_calibrate)
    e = sub.add_parser("evaluate", help="per-domain MCQ accuracy with and without a saved guardrail")
    _common(e)
    e.add_argument("--guardrail", required=True, help="directory written by `dsg-tl calibrate`")
    e.add_argument("--out", default=None)
    e.set_defaults(func=cmd_evaluate)
    d = sub.add_parser("demo", help="the whole method on the world: DSG vs static vs random control, sweep, plot, W&B")
    _common(d)
    d.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    d.set_defaults(func=cmd_demo)
    pp = sub.add_parser("paper", help="the paper's protocol on a real model + SAE (configs/wmdp_*_gemma2_2b.yaml, muse)")
    pp.add_argument("--config", required=True, help="a PaperConfig YAML, e.g. configs/wmdp_bio_gemma2_2b.yaml")
    pp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    pp.add_argument("--cache", default=None, help="cache directory for statistics")
    pp.add_argument("--out", default="runs/paper")
    pp.set_defaults(func=cmd_paper)
    b = sub.add_parser("bench", help="time bare vs reference- vs fast-guarded forwards (world, Gemma-2-2B widths)")
    _common(b)
    b.add_argument("--out", default="runs/bench")
    b.add_argument("--repeats", type=int, default=20)
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--batch", type=int, default=4)
    b.add_argument("--gemma-layers", type=int, default=2, help="layers of the Gemma-width model on CPU")
    b.add_argument("--full-depth", action="store_true", help="all 26 Gemma-2-2B layers (for a GPU)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--skip-world", action="store_true", help="only the Gemma-width setting")
    b.add_argument("--skip-gemma", action="store_true", help="only the world setting")
    b.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 gives stable timings on a shared machine")
    b.set_defaults(func=cmd_bench)
    dr = sub.add_parser("doctor", help="check the (model, SAE, layer) triple: FVE, CE increase, norms vs c")
    _common(dr)
    dr.add_argument("--model", help="hub name or local Hugging Face directory (default: the world's model)")
    dr.add_argument("--sae", help="local sae-lens directory, or RELEASE:SAE_ID (e.g. "
                                  "gemma-scope-2b-pt-res:layer_3/width_16k/average_l0_142)")
    dr.add_argument("--texts", help="texts to check on (jsonl with 'text' or raw lines), with --model/--sae")
    dr.add_argument("--c", type=float, default=None, help="clamp value to compare with activation norms")
    dr.add_argument("--device", default="cpu")
    dr.add_argument("--dtype", default="float32")
    dr.set_defaults(func=cmd_doctor)
    sw = sub.add_parser("sweep", help="ablation grid over N, c, p_ratio, p_dyn, SAE layer, forget fraction "
                                      "(resumable; one offline W&B run per point; Pareto and sensitivity plots)")
    _common(sw)
    sw.add_argument("--grid", default=DEFAULT_SWEEP_GRID, help=f"SweepGrid YAML (default: {DEFAULT_SWEEP_GRID})")
    sw.add_argument("--out", default="runs/sweep", help="sweep directory (default: runs/sweep); reruns resume")
    sw.add_argument("--group", default=None, help="W&B group (default: grid name + hash of config and grid)")
    sw.add_argument("--emit-wandb-sweep", metavar="FILE", default=None,
                    help="only write a W&B sweep YAML whose agent runs call `dsg-tl sweep --agent`")
    sw.add_argument("--agent", action="store_true", help="evaluate the one point in wandb.config (under wandb agent)")
    sw.set_defaults(func=cmd_sweep)
    rp = sub.add_parser("report", help="one self-contained HTML report of a demo or sweep directory")
    rp.add_argument("dir", help="a `dsg-tl demo` or `dsg-tl sweep` output directory")
    rp.add_argument("--out", default=None, help="HTML file (default: DIR/report.html)")
    rp.add_argument("--wandb-report", action="store_true",
                    help="also create a W&B Report (only when W&B is online and wandb_workspaces is installed)")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _offline_defaults(hub=args.command == "paper")
    from dsg_tl.config import ConfigError

    try:
        args.func(args)
    except ConfigError as e:
        print(f"dsg-tl: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
