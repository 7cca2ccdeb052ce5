"""Redraw the Pareto front (forget vs retain accuracy relative to the base model, paper Fig. 3 style) of a sweep.

    python analyses/pareto.py --out runs/sweep      # reads runs/sweep/sweep.json, writes runs/sweep/pareto.png

Run the sweep first: dsg-tl sweep --grid configs/sweep_world.yaml --out runs/sweep
"""

from __future__ import annotations

import json
from pathlib import Path

from dsg_tl.cli import analysis_args
from dsg_tl.sweep import redraw


def main() -> None:
    args = analysis_args(__doc__, "runs/sweep")
    path = redraw(args.out, which=("pareto",))["pareto"]
    summary = json.loads((Path(args.out) / "sweep.json").read_text())
    front = {p["id"]: p for p in summary["points"]}
    print(f"{summary['n_points']} points; Pareto front ({len(summary['pareto_front'])}):")
    for pid in summary["pareto_front"]:
        m = front[pid]["metrics"]
        print(f"  {pid:<48} forget_rel {m['forget_rel']:.3f}  retain_rel {m['retain_rel']:.3f}  "
              f"adjacent_rel {m['adjacent_rel']:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
