"""Ablation sweeps of DSG on the world: a typed grid, one point function, a resumable local runner, plots.

A grid point sets some of (n_features, c, p_ratio, p_dyn, sae_layer, forget_fraction) on top of a ``DemoConfig``;
an axis left empty in the grid keeps the config's value. ``PointRunner`` (the point function) fits DSG at the point
(statistics cached by ``pipeline.cached_stats``; selection and calibration redone; the last fit is reused while only
c changes), evaluates forget / retain / adjacent MCQ accuracy with the demo's evaluation code, and writes
``points/<point-id>/result.json`` atomically together with that point's W&B run. The same function runs under the
local runner (``run_sweep``) and under ``wandb agent`` (``run_agent_point``), so both compute the same numbers.

Base-relative accuracy of group g at a point:  acc_rel(g) = acc_guarded(g) / acc_base(g)   (1.0 = untouched).
Pareto front (forget vs retain): point i is on the front iff no point j has retain_j >= retain_i and
forget_j <= forget_i with at least one strict inequality (higher retain and lower forget are better).
Sensitivity of metric m to parameter p: for each value v of p, the median (and quartiles) of m over all points with
p = v, i.e. the other parameters marginalised by the median.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dsg_tl.config import ConfigError, config_hash, field, override, save_config, to_dict
from dsg_tl.config import dataclass as config_dataclass
from dsg_tl.demo import DemoConfig
from dsg_tl.plotting import pyplot
from dsg_tl.utils import atomic_dir

# Axis name -> dotted key in DemoConfig. Order = nesting order of the grid (c innermost, so a fit is reused).
AXES: dict[str, str] = {
    "sae_layer": "world.sae.layer",
    "forget_fraction": "dsg.forget_fraction",
    "p_ratio": "dsg.p_ratio",
    "n_features": "dsg.n_features",
    "p_dyn": "dsg.p_dyn",
    "c": "dsg.c",
}
SHORT = {"sae_layer": "L", "forget_fraction": "ff", "p_ratio": "pr", "n_features": "N", "p_dyn": "pd", "c": "c"}
GROUP_METRICS = ("forget", "retain", "adjacent")
POINT_FILE = "result.json"


def _checks() -> dict[str, tuple[Callable[[float], bool], str]]:
    return {
        "n_features": (lambda v: v > 0, "must be > 0"),
        "c": (lambda v: v > 0, "must be > 0"),
        "p_ratio": (lambda v: 0 <= v <= 100, "must be a percentile in [0, 100]"),
        "p_dyn": (lambda v: 0 <= v <= 100, "must be a percentile in [0, 100]"),
        "sae_layer": (lambda v: v >= 0, "must be >= 0"),
        "forget_fraction": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    }


@config_dataclass(frozen=True)
class SweepGrid:
    """Values per axis; the grid is their cartesian product. An empty list keeps the base config's value.

    ``sae_layer`` points need an SAE at that layer: ``build_or_load_world`` trains it once (cached) when missing.
    """

    n_features: tuple[int, ...] = ()
    c: tuple[float, ...] = ()
    p_ratio: tuple[float, ...] = ()
    p_dyn: tuple[float, ...] = ()
    sae_layer: tuple[int, ...] = ()
    forget_fraction: tuple[float, ...] = ()
    name: str = field(default="sweep", metadata={"check": (lambda v: v.replace("-", "").replace("_", "").isalnum(),
                                                           "must be letters, digits, '-' or '_'")})

    def __post_init__(self) -> None:
        for axis, (pred, msg) in _checks().items():
            values = getattr(self, axis)
            bad = [v for v in values if isinstance(v, bool) or not pred(v)]
            if bad:
                raise ConfigError(f"{axis}: {bad[0]!r} {msg}")
            if len(set(values)) != len(values):
                raise ConfigError(f"{axis}: repeated values in {list(values)}")

    def swept(self) -> list[str]:
        """Axes given more than one value."""
        return [a for a in AXES if len(getattr(self, a)) > 1]

    def resolved(self, base: DemoConfig) -> dict[str, tuple]:
        """Every axis with its values; empty axes take the base config's single value."""
        out = {}
        for axis, key in AXES.items():
            values = getattr(self, axis)
            out[axis] = tuple(values) if values else (_get(base, key),)
        return out

    def points(self, base: DemoConfig) -> list[dict]:
        """The cartesian product, each point a dict over all axes (c varies fastest)."""
        axes = self.resolved(base)
        return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]

    def __len__(self) -> int:
        return math.prod(max(1, len(getattr(self, a))) for a in AXES)


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def point_config(base: DemoConfig, point: dict) -> DemoConfig:
    """The base config with the point's axis values set (validated like YAML values)."""
    unknown = sorted(set(point) - set(AXES))
    if unknown:
        raise ConfigError(f"sweep point: unknown axis '{unknown[0]}' (axes: {list(AXES)})")
    return override(base, {AXES[a]: v for a, v in point.items()})


def point_values(cfg: DemoConfig) -> dict:
    """The axis values of a (point) config."""
    return {a: _get(cfg, key) for a, key in AXES.items()}


def point_id(cfg: DemoConfig) -> str:
    """Readable prefix + hash of everything that determines the point's numbers (world, dsg, eval, forget domain)."""
    v = point_values(cfg)
    prefix = "_".join(f"{SHORT[a]}{v[a]:g}" for a in AXES)
    return f"{prefix}-{config_hash(cfg.world, cfg.dsg, cfg.eval, cfg.forget_domain, length=10)}"


def default_group(base: DemoConfig, grid: SweepGrid) -> str:
    """W&B group of a sweep: the grid's name plus a hash of the base config and the grid (stable across resumes)."""
    return f"{grid.name}-{config_hash(base, grid, length=8)}"


def _seeds(cfg: DemoConfig) -> dict:
    return {"world": cfg.world.facts.seed, "model": cfg.world.model.seed, "sae": cfg.world.sae.seed,
            "dsg": cfg.dsg.seed}


class PointRunner:
    """The point function: ``runner(point) -> metrics`` for one grid point (a dict over some of ``AXES``).

    A point whose ``points/<id>/result.json`` exists is not recomputed (its stored metrics are returned). Otherwise
    the point is fitted and evaluated, and its directory (result.json and, unless given a run, its own offline W&B
    run) is written under a temporary name and renamed into place: an interrupted point leaves nothing behind.
    Keeps loaded worlds, the last fit and base accuracies in memory across points.
    """

    def __init__(self, base: DemoConfig, out_dir: str | Path, cache_dir: str | Path, *, group: str,
                 echo: Callable[[str], None] = print) -> None:
        self.base = base
        self.out = Path(out_dir)
        self.cache = Path(cache_dir)
        self.group = group
        self.echo = echo
        self.computed: list[str] = []  # ids evaluated by this runner (not loaded from disk)
        self._worlds: dict[str, object] = {}
        self._fit: tuple[str, object] | None = None
        self._base_acc: dict[str, dict] = {}

    def point_dir(self, pid: str) -> Path:
        return self.out / "points" / pid

    def __call__(self, point: dict, *, run=None) -> dict:
        cfg = point_config(self.base, point)
        pid = point_id(cfg)
        final = self.point_dir(pid)
        if (final / POINT_FILE).is_file():
            return json.loads((final / POINT_FILE).read_text())["metrics"]
        t0 = time.perf_counter()
        metrics, detail = self.evaluate(cfg)
        metrics["seconds"] = time.perf_counter() - t0
        values = point_values(cfg)
        record = {"id": pid, "point": values, "metrics": metrics, "group": self.group, **detail}
        with atomic_dir(final) as tmp:
            if run is not None:  # under `wandb agent`: the agent's run
                _log_into_run(run, metrics)
                record["wandb_run_dir"] = str(Path(run.dir).parent)
            elif self.base.wandb:
                from dsg_tl.tracking import log_wandb_run

                run_dir = log_wandb_run(tmp, project=self.base.wandb_project, name=pid, group=self.group,
                                        config={**values, "point_id": pid, "demo": to_dict(cfg)}, metrics=metrics)
                record["wandb_run_dir"] = str(Path(run_dir).relative_to(tmp)) if run_dir else None
            from dsg_tl.tracking import write_results

            write_results(tmp / POINT_FILE, record, config=to_dict(cfg), seeds=_seeds(cfg))
        self.computed.append(pid)
        return metrics

    # ------------------------------------------------------------------ computation
    def world(self, cfg: DemoConfig):
        from dsg_tl.world.build import build_or_load_world

        key = config_hash(cfg.world)
        if key not in self._worlds:
            self._worlds[key] = build_or_load_world(cfg.world, self.cache)
        return self._worlds[key]

    def evaluate(self, cfg: DemoConfig) -> tuple[dict, dict]:
        """Fit DSG at the point and evaluate it on the main split; metrics (flat floats) and detail."""
        from dsg_tl.demo import base_correct_subset
        from dsg_tl.evaluation.domains import domain_groups, evaluate_groups, summarize
        from dsg_tl.pipeline import fit_world

        torch.manual_seed(cfg.dsg.seed)
        art = self.world(cfg)
        fit_key = config_hash(cfg.world, override(cfg, {"dsg.c": 1.0}).dsg, cfg.forget_domain)
        if self._fit is None or self._fit[0] != fit_key:
            self._fit = (fit_key, fit_world(art, cfg.dsg, cfg.forget_domain, self.cache, progress=False)[1])
        fit = self._fit[1]
        guardrail = fit.guardrail.with_(c=cfg.dsg.c)
        split = cfg.eval.splits[0]
        groups = domain_groups(art.world, split, cfg.forget_domain)
        if cfg.eval.correct_subset:
            groups = {k: base_correct_subset(art.model, v, cfg.eval.mode, cfg.eval.batch_size, self.cache,
                                             art.model_id) for k, v in groups.items()}
        base_key = config_hash(str(art.path), split, cfg.forget_domain, cfg.eval)
        if base_key not in self._base_acc:
            self._base_acc[base_key] = summarize(evaluate_groups(art.model, groups, mode=cfg.eval.mode,
                                                                 batch_size=cfg.eval.batch_size))
        base = self._base_acc[base_key]
        res = summarize(evaluate_groups(art.model, groups, mode=cfg.eval.mode, guardrail=guardrail,
                                        batch_size=cfg.eval.batch_size, gate_scope=cfg.eval.gate_scope))
        metrics = relative_metrics({g: res[g]["accuracy"] for g in GROUP_METRICS},
                                   {g: base[g]["accuracy"] for g in GROUP_METRICS})
        for g in GROUP_METRICS:
            metrics[f"{g}_gate_rate"] = res[g].get("gate_rate", float("nan"))
        metrics.update({"tau": fit.gate.tau, "retain_fpr": fit.gate.retain_fpr, "forget_tpr": fit.gate.forget_tpr,
                        "n_selected": int(len(fit.selection.latents))})
        detail = {"split": split, "groups": res, "base_groups": base, "latents": fit.selection.latents.tolist(),
                  "gate": fit.gate.to_dict(), "world": {"path": str(art.path), "sae_path": str(art.sae_path),
                                                        "hook_name": art.hook_name}}
        return metrics, detail


def relative_metrics(acc: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """acc_g, base_g, acc_rel_g = acc_g / base_g (nan when base_g = 0), and retain_rel - forget_rel."""
    out: dict[str, float] = {}
    for g, a in acc.items():
        out[g] = float(a)
        out[f"base_{g}"] = float(base[g])
        out[f"{g}_rel"] = float(a) / float(base[g]) if base[g] > 0 else float("nan")
    if "forget_rel" in out and "retain_rel" in out:
        out["retain_minus_forget"] = out["retain_rel"] - out["forget_rel"]
    return out


def _log_into_run(run, metrics: dict) -> None:
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            run.summary[k] = v


# ---------------------------------------------------------------------- analysis of the records
def pareto_front(records: list[dict], x: str = "retain_rel", y: str = "forget_rel") -> list[int]:
    """Indices of the non-dominated records (maximise x, minimise y), sorted by x."""
    pts = [(r["metrics"][x], r["metrics"][y]) for r in records]
    front = []
    for i, (xi, yi) in enumerate(pts):
        if any(math.isnan(v) for v in (xi, yi)):
            continue
        dominated = any(xj >= xi and yj <= yi and (xj > xi or yj < yi) for j, (xj, yj) in enumerate(pts) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: pts[i])


def _quantile(values: list[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


def sensitivity(records: list[dict], axis: str, metric: str) -> list[dict]:
    """Per value v of ``axis``: median, first and third quartile of ``metric`` over the records with axis = v."""
    rows = []
    for v in sorted({r["point"][axis] for r in records}):
        vals = [r["metrics"][metric] for r in records if r["point"][axis] == v and not math.isnan(r["metrics"][metric])]
        if vals:
            rows.append({"value": v, "median": _quantile(vals, 0.5), "q1": _quantile(vals, 0.25),
                         "q3": _quantile(vals, 0.75), "n": len(vals)})
    return rows


def _plt():
    plt = pyplot()

    return plt


def plot_pareto(records: list[dict], path: str | Path, title: str) -> Path:
    """Forget vs retain accuracy (base-relative) of every point, the Pareto front highlighted (paper Fig. 3 style)."""
    plt = _plt()
    front = pareto_front(records)
    xs = [r["metrics"]["retain_rel"] for r in records]
    ys = [r["metrics"]["forget_rel"] for r in records]
    cs = [math.log10(r["point"]["c"]) for r in records]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    sc = ax.scatter(xs, ys, c=cs, cmap="viridis", s=28, alpha=0.8, edgecolors="none", label="grid points")
    fig.colorbar(sc, ax=ax, label="log10 c")
    fx, fy = [xs[i] for i in front], [ys[i] for i in front]
    ax.step(fx, fy, where="pre", color="crimson", lw=1.5, zorder=3)
    ax.scatter(fx, fy, s=80, facecolors="none", edgecolors="crimson", lw=1.5, zorder=4, label="Pareto front")
    for k, i in enumerate(front):  # labels alternate right-below / left-above of the point
        p = records[i]["point"]
        ax.annotate(f"N={p['n_features']} c={p['c']:g} pd={p['p_dyn']:g}", (xs[i], ys[i]), fontsize=6,
                    xytext=(5, -9) if k % 2 == 0 else (-5, 5), ha="left" if k % 2 == 0 else "right",
                    textcoords="offset points", color="crimson")
    ax.plot([1.0], [1.0], "k*", markersize=12, label="base model")
    base_forget = records[0]["metrics"].get("base_forget", 0.0) if records else 0.0
    if base_forget > 0:
        ax.axhline(0.25 / base_forget, color="grey", ls=":", lw=1, label="chance (4 options)")
    ax.set_xlabel("retain accuracy / base (higher is better)")
    ax.set_ylabel("forget accuracy / base (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_sensitivity(records: list[dict], axes: list[str], path: str | Path, title: str) -> Path:
    """One panel per swept axis: median (line) and interquartile band of each group's base-relative accuracy."""
    plt = _plt()
    axes = axes or [a for a in AXES if len({r["point"][a] for r in records}) > 1] or ["c"]
    fig, panels = plt.subplots(1, len(axes), figsize=(3.6 * len(axes), 3.4), squeeze=False)
    colors = {"forget": "tab:red", "retain": "tab:blue", "adjacent": "tab:green"}
    for ax, axis in zip(panels[0], axes, strict=True):
        for g, color in colors.items():
            rows = sensitivity(records, axis, f"{g}_rel")
            v = [r["value"] for r in rows]
            ax.plot(v, [r["median"] for r in rows], "o-", color=color, label=g, ms=4)
            ax.fill_between(v, [r["q1"] for r in rows], [r["q3"] for r in rows], color=color, alpha=0.15)
        if axis == "c":
            ax.set_xscale("log")
            ax.minorticks_off()
        values = sorted({r["point"][axis] for r in records})
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.set_xlabel(axis)
        ax.set_ylim(-0.02, 1.1)
        ax.grid(alpha=0.3)
    panels[0][0].set_ylabel("accuracy / base (median, IQR)")
    panels[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def summarize_sweep(records: list[dict], grid: SweepGrid) -> dict:
    """sweep.json content: every point, the Pareto front and the sensitivity tables."""
    front = pareto_front(records)
    swept = grid.swept() or [a for a in AXES if len({r["point"][a] for r in records}) > 1]
    return {
        "grid": to_dict(grid),
        "swept_axes": swept,
        "n_points": len(records),
        "points": [{"id": r["id"], "point": r["point"], "metrics": r["metrics"]} for r in records],
        "pareto_front": [records[i]["id"] for i in front],
        "sensitivity": {a: {f"{g}_rel": sensitivity(records, a, f"{g}_rel") for g in GROUP_METRICS} for a in swept},
    }


def draw_plots(summary: dict, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """pareto.png and sensitivity.png of a sweep summary (as in sweep.json)."""
    out_dir = Path(out_dir)
    recs = summary["points"]
    title = title or f"DSG sweep: {summary['n_points']} points"
    return {"pareto": plot_pareto(recs, out_dir / "pareto.png", title),
            "sensitivity": plot_sensitivity(recs, summary["swept_axes"], out_dir / "sensitivity.png", title)}


def redraw(sweep_dir: str | Path, which: tuple[str, ...] = ("pareto", "sensitivity")) -> dict[str, Path]:
    """Redraw the plots of a finished sweep from its sweep.json."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dsg-tl sweep --out {sweep_dir}` first")
    summary = json.loads(path.read_text())
    title = (f"DSG sweep {summary.get('group', '')} ({summary.get('split', '?')}, "
             f"forget={summary.get('forget_domain', '?')})")
    recs = summary["points"]
    out = {}
    if "pareto" in which:
        out["pareto"] = plot_pareto(recs, sweep_dir / "pareto.png", title)
    if "sensitivity" in which:
        out["sensitivity"] = plot_sensitivity(recs, summary["swept_axes"], sweep_dir / "sensitivity.png", title)
    return out


# ---------------------------------------------------------------------- runners
def _clear_partial(points_dir: Path) -> int:
    """Remove temporary point directories left by a killed run (atomic_dir names them '.<id>.tmp-*')."""
    n = 0
    if points_dir.is_dir():
        for p in points_dir.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


class _TermAsInterrupt:
    """Turn SIGTERM (e.g. from `timeout`) into KeyboardInterrupt so the point in progress is cleaned up."""

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            self._old = None
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


def run_sweep(cfg: DemoConfig, grid: SweepGrid, out_dir: str | Path, cache_dir: str | Path | None = None, *,
              group: str | None = None, echo: Callable[[str], None] = print,
              point_fn: PointRunner | None = None) -> dict:
    """Run every grid point (finished points are skipped), then write sweep.json, pareto.png and sensitivity.png.

    Returns the summary (as written to sweep.json) plus ``computed`` (ids evaluated now) and ``skipped``.
    """
    from tqdm.auto import tqdm

    from dsg_tl.world.build import default_cache_dir

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    group = group or default_group(cfg, grid)
    runner = point_fn or PointRunner(cfg, out, cache, group=group, echo=echo)
    points = grid.points(cfg)
    configs = [point_config(cfg, p) for p in points]  # validates every point before any work
    ids = [point_id(c) for c in configs]
    if len(set(ids)) != len(ids):
        raise ConfigError("sweep grid: two points resolve to the same configuration")
    n_partial = _clear_partial(out / "points")
    done = {i for i in ids if (runner.point_dir(i) / POINT_FILE).is_file()}
    echo(f"sweep {group}: {len(points)} points, {len(done)} already done"
         + (f", removed {n_partial} partial point(s)" if n_partial else "") + f"; out {out}")
    save_config(cfg, out / "config.yaml")
    save_config(grid, out / "grid.yaml")
    t0 = time.perf_counter()
    with _TermAsInterrupt():
        try:
            for point in tqdm(points, desc="sweep", unit="point"):
                runner(point)
        except KeyboardInterrupt:
            n_done = sum((runner.point_dir(i) / POINT_FILE).is_file() for i in ids)
            echo(f"sweep interrupted: {n_done} of {len(points)} points complete in {out}; the same command resumes")
            raise
    elapsed = time.perf_counter() - t0
    records = [json.loads((runner.point_dir(i) / POINT_FILE).read_text()) for i in ids]
    summary = summarize_sweep(records, grid)
    summary.update({"group": group, "wandb_project": cfg.wandb_project, "seconds": elapsed,
                    "computed": len(runner.computed), "skipped": len(points) - len(runner.computed),
                    "split": cfg.eval.splits[0], "forget_domain": cfg.forget_domain,
                    "base": {g: records[0]["metrics"][f"base_{g}"] for g in GROUP_METRICS} if records else {}})
    plots = draw_plots(summary, out, f"DSG sweep {group} ({cfg.eval.splits[0]}, forget={cfg.forget_domain})")
    summary["plots"] = {k: str(p.name) for k, p in plots.items()}
    from dsg_tl.tracking import write_results

    write_results(out / "sweep.json", summary, config=to_dict(cfg), seeds=_seeds(cfg))
    n_runs = sum(1 for i in ids if any((runner.point_dir(i) / "wandb").glob("offline-run-*")))
    echo(f"sweep done: {len(points)} points ({summary['computed']} computed, {summary['skipped']} skipped) in "
         f"{elapsed:.0f} s; {n_runs} W&B offline runs; front: {len(summary['pareto_front'])} points; wrote "
         f"{out / 'sweep.json'}, {plots['pareto']}, {plots['sensitivity']}")
    return summary


def run_agent_point(cfg: DemoConfig, grid: SweepGrid, out_dir: str | Path, cache_dir: str | Path | None = None, *,
                    group: str | None = None, config_defaults: dict | None = None,
                    echo: Callable[[str], None] = print) -> dict:
    """One point under ``wandb agent``: the agent's run config holds the point; the same PointRunner evaluates it.

    ``config_defaults`` are passed to ``wandb.init`` (the sweep overrides them); tests use them to stand in for the
    agent.
    """
    from dsg_tl.tracking import default_offline_env
    from dsg_tl.world.build import default_cache_dir

    default_offline_env()
    import wandb

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    group = group or default_group(cfg, grid)
    run = wandb.init(project=cfg.wandb_project, group=group, dir=str(out), config=config_defaults or {},
                     job_type="sweep-point")
    try:
        given = dict(run.config.as_dict())
        point = {a: given[a] for a in AXES if a in given}
        if not point:
            raise ConfigError(f"--agent: the W&B run config has none of the sweep axes {list(AXES)}")
        runner = PointRunner(cfg, out, cache_dir if cache_dir is not None else default_cache_dir(), group=group,
                             echo=echo)
        metrics = runner(point, run=run)
        _log_into_run(run, metrics)  # also when the point was already on disk
    finally:
        run.finish()
    echo(f"agent point {point}: forget_rel {metrics['forget_rel']:.3f} retain_rel {metrics['retain_rel']:.3f}")
    return metrics


def wandb_sweep_config(grid: SweepGrid, command: list[str]) -> dict:
    """A W&B sweep definition (method grid) over the grid's non-empty axes; the command runs ``dsg-tl sweep --agent``
    (no ``${args}``: the agent's run reads the point from ``wandb.config``). ``WANDB_MODE=online`` is set in the
    command because dsg-tl defaults W&B to offline, and an offline run would not report back to the sweep."""
    params = {a: {"values": list(getattr(grid, a))} for a in AXES if getattr(grid, a)}
    if not params:
        raise ConfigError("sweep grid: no axis has values to sweep")
    return {
        "name": grid.name,
        "program": "dsg-tl",
        "method": "grid",
        "metric": {"name": "retain_minus_forget", "goal": "maximize"},
        "parameters": params,
        "command": ["${env}", "WANDB_MODE=online", *command],
    }


def emit_wandb_sweep_config(grid: SweepGrid, path: str | Path, *, command: list[str] | None = None) -> Path:
    """Write the W&B sweep YAML (``wandb sweep FILE`` then ``wandb agent SWEEP_ID`` run it)."""
    import yaml

    command = command or ["dsg-tl", "sweep", "--agent"]
    if "--agent" not in command:
        raise ValueError("the sweep command must contain --agent")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("# W&B sweep over the DSG grid: `wandb sweep THIS_FILE`, then `wandb agent SWEEP_ID`.\n"
            "# Each agent run calls `dsg-tl sweep --agent`, which reads the point from wandb.config.\n")
    path.write_text(text + yaml.safe_dump(wandb_sweep_config(grid, command), sort_keys=False), encoding="utf-8")
    return path


__all__ = ["SweepGrid", "AXES", "PointRunner", "point_config", "point_id", "relative_metrics", "pareto_front",
           "sensitivity", "plot_pareto", "plot_sensitivity", "run_sweep", "run_agent_point", "wandb_sweep_config",
           "emit_wandb_sweep_config", "redraw", "default_group"]
