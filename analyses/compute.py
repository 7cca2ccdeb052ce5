"""Cost of each method's unlearning phase on the world, measured side by side in one run on one machine: wall time
and peak memory (extra resident memory over the phase; CUDA: max allocated) of

  DSG      statistics + selection + calibration from scratch (fit_dsg with no cache),
  static   statistics + selection (static clamping needs no calibration),
  RMU, GradDiff, NPO   training at their world settings (the hyperparameters of their points in analyses/baselines.py).

Methods are interleaved within each repeat so that a change in machine load hits all of them alike; the fastest
repeat's wall time (the least disturbed by other load) and the largest peak are reported, with each phase's time as
a multiple of DSG's. On glibc the mmap threshold is fixed at 64 KiB first, so freed buffers go back to the OS and one
phase's freed memory does not hide the next phase's peak. Writes compute.json (config, seeds, versions).

    python analyses/compute.py [--config configs/demo.yaml] [--set KEY=VALUE] [--cache DIR] [--out runs/compute]
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from dsg_tl.baselines.graddiff import WORLD_GRADDIFF, apply_graddiff
from dsg_tl.baselines.npo import WORLD_NPO, apply_npo
from dsg_tl.baselines.report import measure_phase
from dsg_tl.baselines.rmu import WORLD_RMU, apply_rmu
from dsg_tl.cli import analysis_args, load_demo_config
from dsg_tl.config import to_dict
from dsg_tl.pipeline import corpus_stats, fit_dsg, world_corpora
from dsg_tl.selection import select_features
from dsg_tl.tracking import write_results
from dsg_tl.world.build import build_or_load_world

REPEATS = 3


def fixed_mmap_threshold(nbytes: int = 65536) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, nbytes)``: larger allocations are mmapped and unmapped on free, so the
    resident set size follows live memory (the default threshold adapts upwards and keeps freed buffers)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, nbytes))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def main() -> None:
    args = analysis_args(__doc__, "runs/compute")
    fixed_threshold = fixed_mmap_threshold()
    cfg = load_demo_config(args)
    art = build_or_load_world(cfg.world, args.cache)
    model, sae, d = art.model, art.sae, cfg.dsg
    corpora = world_corpora(art.world, cfg.forget_domain, seed=d.seed, calibration_unit=d.calibration_unit)
    torch.manual_seed(d.seed)

    def static_phase():
        fs = corpus_stats(model, sae, corpora.forget, d, "forget", progress=False)
        rs = corpus_stats(model, sae, corpora.retain, d, "retain", progress=False)
        return select_features(fs, rs, n_features=d.n_features, p_ratio=d.p_ratio, formula=d.formula)

    phases = {
        "dsg": lambda: fit_dsg(model, sae, corpora, d, cache_dir=None, model_id=art.model_id, progress=False),
        "static": static_phase,
        "rmu": lambda: apply_rmu(model, corpora.forget, corpora.retain, WORLD_RMU, progress=False),
        "graddiff": lambda: apply_graddiff(model, corpora.forget, corpora.retain, WORLD_GRADDIFF, progress=False),
        "npo": lambda: apply_npo(model, corpora.forget, corpora.retain, WORLD_NPO, progress=False),
    }
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {k: [] for k in phases}
    for rep in range(REPEATS):
        for name, fn in phases.items():
            m = measure_phase(fn)
            runs[name].append(m["runs"][0])
            print(f"repeat {rep + 1}/{REPEATS} {name:<9} {m['wall_s']:8.2f} s  peak +{m['peak_mem_mb']:7.1f} MB",
                  flush=True)
    load_after = os.getloadavg()

    table = {k: {"wall_s": min(r["wall_s"] for r in v), "peak_mem_mb": max(r["peak_mem_mb"] for r in v),
                 "runs": v} for k, v in runs.items()}
    dsg = table["dsg"]["wall_s"]
    for v in table.values():
        v["x_dsg_time"] = v["wall_s"] / dsg
    print(f"\n{'phase':<10}{'wall s (fastest)':>17}{'peak MB (max)':>15}{'x DSG time':>12}")
    for k, v in table.items():
        print(f"{k:<10}{v['wall_s']:>17.2f}{v['peak_mem_mb']:>15.1f}{v['x_dsg_time']:>12.2f}")
    ratio = table["rmu"]["wall_s"] / dsg
    print(f"RMU / DSG wall time: {ratio:.1f}x ({'meets' if ratio >= 20 else 'misses'} the 20x bar); "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} CPUs")

    out = Path(args.out)
    results = {"phases": table, "rmu_over_dsg": ratio, "repeats": REPEATS,
               "machine": {"cpu_count": os.cpu_count(), "fixed_mmap_threshold": fixed_threshold, "torch_threads": torch.get_num_threads(),
                           "loadavg_before": load_before, "loadavg_after": load_after,
                           "device": str(next(model.parameters()).device)},
               "what": {"dsg": "statistics + selection + calibration (fit_dsg, cache_dir=None)",
                        "static": "statistics + selection", "rmu": "apply_rmu(WORLD_RMU)",
                        "graddiff": "apply_graddiff(WORLD_GRADDIFF)", "npo": "apply_npo(WORLD_NPO)"}}
    write_results(out / "compute.json", results,
                  config={"demo": to_dict(cfg), "rmu": to_dict(WORLD_RMU), "graddiff": to_dict(WORLD_GRADDIFF),
                          "npo": to_dict(WORLD_NPO)},
                  seeds={"dsg": d.seed, "rmu": WORLD_RMU.seed, "graddiff": WORLD_GRADDIFF.seed, "npo": WORLD_NPO.seed})
    print(f"wrote {out / 'compute.json'}")


if __name__ == "__main__":
    main()
