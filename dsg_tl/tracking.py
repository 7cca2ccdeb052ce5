"""Experiment tracking: Weights & Biases (offline unless the user is online) plus a local results.json."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dsg_tl.utils import versions, write_json


def default_offline_env() -> None:
    """Default W&B to offline when the user has not chosen a mode (no account or network needed)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def log_wandb_run(
    out_dir: str | Path, *, project: str, name: str, config: dict, metrics: dict, images: dict[str, Path] | None = None,
    group: str | None = None, tables: dict[str, tuple[list[str], list[list]]] | None = None,
) -> Path | None:
    """One W&B run holding the config, flattened metrics (summary), images and tables. Returns the run directory."""
    default_offline_env()
    import wandb

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, name=name, group=group, dir=str(out_dir), config=config, reinit="create_new")
    try:
        flat = flatten(metrics)
        for k, v in flat.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                run.summary[k] = v
        payload = {}
        for key, path in (images or {}).items():
            payload[key] = wandb.Image(str(path))
        for key, (columns, rows) in (tables or {}).items():
            payload[key] = wandb.Table(columns=columns, data=rows)
        if payload:
            run.log(payload)
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    return run_dir


def write_results(path: str | Path, results: dict, *, config: dict, seeds: dict | None = None) -> None:
    """results.json: the results plus the config, seeds and package versions that produced them."""
    write_json(path, {**results, "config": config, "seeds": seeds or {}, "versions": versions()})
