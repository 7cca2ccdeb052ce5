"""Comparing unlearning methods: each method's best point under a retain-accuracy floor, the Pareto plot of every
method's sweep, and the cost (wall time, peak memory) of each method's unlearning phase measured side by side."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from dsg_tl.baselines.common import measure
from dsg_tl.plotting import forget_retain_axes, pyplot, save_figure


def best_under_retain(points: Sequence[dict], base_retain: float, ratio: float = 0.98) -> dict | None:
    """The point with the lowest forget accuracy among those with retain >= ratio * base_retain (ties: the higher
    retain, then the earlier point); None when no point keeps retain above the floor."""
    floor = ratio * base_retain
    ok = [(p["forget"], -p["retain"], i) for i, p in enumerate(points) if p["retain"] >= floor - 1e-12]
    return dict(points[min(ok)[2]]) if ok else None


def pareto_front(points: Sequence[dict]) -> list[dict]:
    """Points not dominated by another (another has retain >= and forget <=, one strictly), by increasing retain."""
    front = []
    for p in points:
        dominated = any(q["retain"] >= p["retain"] and q["forget"] <= p["forget"]
                        and (q["retain"] > p["retain"] or q["forget"] < p["forget"]) for q in points)
        if not dominated:
            front.append(dict(p))
    return sorted(front, key=lambda p: p["retain"])


def methods_plot(sweeps: dict[str, Sequence[dict]], base: dict, path: Path, title: str, ratio: float = 0.98) -> Path:
    """Forget vs retain accuracy of every sweep point of every method (Pareto front joined), the base model, and the
    retain floor ``ratio * base retain``."""
    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 5))
    markers = "o^sDvP<>X"
    for i, (name, pts) in enumerate(sweeps.items()):
        if not pts:
            continue
        line = ax.scatter([p["retain"] for p in pts], [p["forget"] for p in pts], marker=markers[i % len(markers)],
                          alpha=0.55, label=f"{name} ({len(pts)} pts)")
        front = pareto_front(pts)
        ax.plot([p["retain"] for p in front], [p["forget"] for p in front], "-", color=line.get_facecolor()[0],
                lw=1.2)
    ax.plot(base["retain"], base["forget"], "k*", markersize=14, label="base")
    ax.axvline(ratio * base["retain"], color="grey", ls="--", lw=1, label=f"retain = {ratio:g} x base")
    forget_retain_axes(ax, title)
    return save_figure(fig, path)


def measure_phase(fn: Callable[[], object], repeats: int = 1, device: str = "cpu") -> dict:
    """Run ``fn`` ``repeats`` times under :func:`measure`; wall time and peak memory of each run and their medians."""
    runs = []
    for _ in range(repeats):
        with measure(device) as cost:
            fn()
        runs.append({"wall_s": cost["wall_s"], "peak_mem_mb": cost["peak_mem_mb"]})
    walls = sorted(r["wall_s"] for r in runs)
    mems = sorted(r["peak_mem_mb"] for r in runs)
    return {"wall_s": walls[len(walls) // 2], "peak_mem_mb": mems[len(mems) // 2], "runs": runs,
            "meter": cost["meter"]}


__all__ = ["best_under_retain", "pareto_front", "methods_plot", "measure_phase"]
