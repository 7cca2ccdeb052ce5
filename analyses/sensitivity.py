"""Redraw the sensitivity plot of a sweep: each group's accuracy relative to the base model vs each swept parameter
(median and interquartile range over the other parameters).

    python analyses/sensitivity.py --out runs/sweep   # reads runs/sweep/sweep.json, writes runs/sweep/sensitivity.png

Run the sweep first: dsg-tl sweep --grid configs/sweep_world.yaml --out runs/sweep
"""

from __future__ import annotations

import json
from pathlib import Path

from dsg_tl.cli import analysis_args
from dsg_tl.sweep import redraw


def main() -> None:
    args = analysis_args(__doc__, "runs/sweep")
    path = redraw(args.out, which=("sensitivity",))["sensitivity"]
    summary = json.loads((Path(args.out) / "sweep.json").read_text())
    for axis, per_metric in summary["sensitivity"].items():
        print(f"{axis}:")
        for metric, rows in per_metric.items():
            print(f"  {metric:<13} " + "  ".join(f"{r['value']:g}: {r['median']:.3f}" for r in rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
