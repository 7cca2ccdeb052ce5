"""`dsg-tl demo`: the whole DSG method on the world, with baselines, a control, a sweep, a plot and a W&B run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch

from dsg_tl.calibrate import calibrate, encode_texts
from dsg_tl.config import POSITIVE, config_hash, dataclass, field, save_config, to_dict
from dsg_tl.evaluation.domains import GROUPS, domain_groups, evaluate_groups, summarize
from dsg_tl.evaluation.mcq import evaluate_mcq
from dsg_tl.pipeline import DSGConfig, DSGFit, fit_world, method_guardrails
from dsg_tl.plotting import forget_retain_axes, pyplot, save_figure
from dsg_tl.selection import select_features
from dsg_tl.utils import write_json
from dsg_tl.world.build import WorldConfig, build_or_load_world, default_cache_dir
from dsg_tl.world.facts import DOMAINS


@dataclass(frozen=True)
class EvalConfig:
    mode: Literal["cloze", "letter"] = "cloze"
    splits: tuple[str, ...] = ("train_frames", "heldout_frames")
    correct_subset: bool = False
    batch_size: int = field(default=64, metadata=POSITIVE)
    gate_scope: Literal["question", "sequence"] = "sequence"  # cloze: what the gate's rho counts

    def __post_init__(self) -> None:
        bad = [s for s in self.splits if s not in ("train_frames", "heldout_frames")]
        if bad or not self.splits:
            raise ValueError(f"eval.splits must be a non-empty subset of train_frames/heldout_frames, got {self.splits}")


@dataclass(frozen=True)
class SweepConfig:
    c: tuple[float, ...] = (2.5, 5.0, 10.0, 20.0)
    n_features: tuple[int, ...] = (10, 20, 40)


@dataclass(frozen=True)
class DemoConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    dsg: DSGConfig = field(default_factory=DSGConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    forget_domain: Literal["hazard", "exploits"] = "hazard"
    wandb_project: str = "dsg-tl"
    wandb: bool = True

    def __post_init__(self) -> None:
        if self.forget_domain not in DOMAINS:
            raise ValueError(f"forget_domain must be one of {DOMAINS}")


def base_correct_subset(model, items, mode, batch_size, cache_dir: Path, model_id: str):
    """Items the base model answers correctly under all 24 option orders (cloze scoring is order-free, so one pass).

    Cached by a hash of the model id, the items and the scoring settings.
    """
    import json

    from dsg_tl.evaluation.protocol import correct_subset

    key = config_hash(model_id, [it.to_record() for it in items], mode)
    path = cache_dir / f"subset-{key}.json"
    if path.is_file():
        keep = set(json.loads(path.read_text()))
        return [it for i, it in enumerate(items) if i in keep]
    if mode == "cloze":
        ok = evaluate_mcq(model, items, mode, batch_size=batch_size).correct
        keep = [i for i in range(len(items)) if ok[i]]
    else:
        kept = correct_subset(lambda xs: evaluate_mcq(model, xs, mode, batch_size=batch_size).correct, items)
        ids = {id(x) for x in kept}
        keep = [i for i, it in enumerate(items) if id(it) in ids]
    write_json(path, keep)
    return [items[i] for i in keep]


def _eval_methods(model, groups, guardrails, ecfg: EvalConfig) -> dict:
    out = {"base": summarize(evaluate_groups(model, groups, mode=ecfg.mode, batch_size=ecfg.batch_size))}
    for name, g in guardrails.items():
        out[name] = summarize(evaluate_groups(model, groups, mode=ecfg.mode, guardrail=g, batch_size=ecfg.batch_size,
                                              gate_scope=ecfg.gate_scope))
    return out


def _accuracies(summary: dict) -> dict:
    return {k: summary[k]["accuracy"] for k in GROUPS}


def sweep_points(model, sae, fit: DSGFit, corpora, groups, cfg: DemoConfig, progress=None) -> list[dict]:
    """DSG over a grid of (N, c): selection reuses the statistics; tau is recalibrated for each N."""
    points = []
    tok = model.tokenizer
    enc = lambda texts: encode_texts(tok, texts, cfg.dsg.calibration_max_len)  # noqa: E731
    calib, held, forget = enc(corpora.calibration), enc(corpora.heldout_retain), enc(corpora.forget_eval)
    for n in cfg.sweep.n_features:
        sel = select_features(fit.forget_stats, fit.retain_stats, n_features=n, p_ratio=cfg.dsg.p_ratio,
                              formula=cfg.dsg.formula)
        g0 = fit.guardrail.with_(gate_latents=sel.latents)
        g, report, _ = calibrate(model, g0, calibration=calib, heldout=held, forget=forget, p_dyn=cfg.dsg.p_dyn)
        for c in cfg.sweep.c:
            res = summarize(evaluate_groups(model, groups, mode=cfg.eval.mode, guardrail=g.with_(c=c),
                                            batch_size=cfg.eval.batch_size, gate_scope=cfg.eval.gate_scope))
            points.append({"n_features": n, "c": c, "tau": g.tau, **_accuracies(res)})
            if progress:
                progress(points[-1])
    return points


def pareto_plot(points: list[dict], methods: dict, path: Path, title: str) -> Path:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ns = sorted({p["n_features"] for p in points})
    for n in ns:
        ps = [p for p in points if p["n_features"] == n]
        ax.plot([p["retain"] for p in ps], [p["forget"] for p in ps], "o-", label=f"DSG N={n} (c sweep)")
        for p in ps:
            ax.annotate(f"c={p['c']:g}", (p["retain"], p["forget"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    markers = {"base": "k*", "static": "rs", "random_control": "gx", "dsg": "b^"}
    for name, acc in methods.items():
        ax.plot(acc["retain"], acc["forget"], markers.get(name, "m+"), markersize=10, label=name)
    forget_retain_axes(ax, title)
    return save_figure(fig, path)


def format_table(methods: dict, splits: list[str]) -> str:
    lines = [f"{'method':<22}" + "".join(f"{s[:5] + ':' + g:>16}" for s in splits for g in GROUPS)]
    for name in methods[splits[0]]:
        row = f"{name:<22}"
        for s in splits:
            for g in GROUPS:
                r = methods[s][name][g]
                row += f"{r['accuracy']:>9.3f} ({r['margin']:+.1f})"[:16].rjust(16)
        lines.append(row)
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, out_dir: str | Path, cache_dir: str | Path | None = None, *, echo=print) -> dict:
    """Build/load the world, fit DSG, evaluate base / DSG / static / random control, sweep, plot, log."""
    torch.manual_seed(cfg.dsg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    art = build_or_load_world(cfg.world, cache)
    timings["world"] = time.perf_counter() - t0
    model, sae, world = art.model, art.sae, art.world
    model_id = art.model_id
    echo(f"world: {art.path} (SAE {sae.cfg.architecture()} d_sae={sae.cfg.d_sae} at {art.hook_name}; "
         f"FVE {art.metrics['sae']['fve']:.3f})")

    t0 = time.perf_counter()
    corpora, fit = fit_world(art, cfg.dsg, cfg.forget_domain, cache)
    timings.update({f"fit_{k}": v for k, v in fit.timings_s.items()})
    timings["fit_total"] = time.perf_counter() - t0
    echo(f"selected {len(fit.selection.latents)} latents ({cfg.dsg.formula}); tau={fit.gate.tau:.4f} "
         f"alpha={fit.gate.alpha:.3f} retain FPR={fit.gate.retain_fpr:.3f} forget TPR={fit.gate.forget_tpr:.3f}")

    t0 = time.perf_counter()
    guardrails = method_guardrails(fit)
    other = "all" if cfg.dsg.clamp_positions == "active" else "active"
    guardrails[f"dsg@{other}"] = fit.guardrail.with_(clamp_positions=other)
    guardrails[f"random_control@{other}"] = guardrails["random_control"].with_(clamp_positions=other)
    methods: dict[str, dict] = {}
    for split in cfg.eval.splits:
        groups = domain_groups(world, split, cfg.forget_domain)
        if cfg.eval.correct_subset:
            groups = {k: base_correct_subset(model, v, cfg.eval.mode, cfg.eval.batch_size, cache, model_id)
                      for k, v in groups.items()}
        methods[split] = _eval_methods(model, groups, guardrails, cfg.eval)
    timings["evaluation"] = time.perf_counter() - t0
    echo(format_table(methods, list(cfg.eval.splits)))

    t0 = time.perf_counter()
    main_split = cfg.eval.splits[0]
    groups = domain_groups(world, main_split, cfg.forget_domain)
    points = sweep_points(model, sae, fit, corpora, groups, cfg)
    timings["sweep"] = time.perf_counter() - t0
    plot = pareto_plot(points, {k: _accuracies(v) for k, v in methods[main_split].items()
                                if k in ("base", "dsg", "static", "random_control")},
                       out / "pareto.png", f"DSG on the world ({main_split}); forget={cfg.forget_domain}")
    timings["total"] = time.perf_counter() - t_all

    main = methods[main_split]
    results = {
        "methods": {k: _accuracies(v) for k, v in main.items()},
        "methods_detail": methods,
        "gate": fit.gate.to_dict(),
        "selection": {**fit.selection.summary(), "random_control_latents": fit.random_latents.tolist()},
        "sweep": points,
        "world": {"path": str(art.path), "sae_path": str(art.sae_path), "sae": art.metrics["sae"],
                  "hook_name": art.hook_name},
        "timings_s": timings,
        "formula_variant": cfg.dsg.formula,
        "main_split": main_split,
    }
    from dsg_tl.tracking import log_wandb_run, write_results

    save_config(cfg, out / "config.yaml")
    fit.guardrail.save(out / "guardrail")
    write_results(out / "results.json", results, config=to_dict(cfg),
                  seeds={"world": cfg.world.facts.seed, "model": cfg.world.model.seed, "sae": cfg.world.sae.seed,
                         "dsg": cfg.dsg.seed})
    if cfg.wandb:
        run_dir = log_wandb_run(
            out, project=cfg.wandb_project, name="demo", group="demo", config=to_dict(cfg),
            metrics={"methods": results["methods"], "gate": results["gate"], "timings_s": timings},
            images={"pareto": plot},
            tables={"sweep": (list(points[0].keys()), [list(p.values()) for p in points])} if points else None,
        )
        results["wandb_run_dir"] = str(run_dir)
        write_results(out / "results.json", results, config=to_dict(cfg),
                      seeds={"world": cfg.world.facts.seed, "model": cfg.world.model.seed,
                             "sae": cfg.world.sae.seed, "dsg": cfg.dsg.seed})
    echo(f"wrote {out / 'results.json'}, {plot}" + (f", W&B run {results.get('wandb_run_dir')}" if cfg.wandb else ""))
    return results


__all__ = ["DemoConfig", "EvalConfig", "SweepConfig", "run_demo"]
