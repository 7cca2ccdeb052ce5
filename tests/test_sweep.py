"""Sweeps: grid validation, point ids, formulas (relative accuracy, Pareto front, sensitivity), the resumable runner
with one W&B run per point, interruption, the agent path, and the emitted W&B sweep YAML (micro world)."""

import dataclasses
import json
import math

import pytest
import yaml

from dsg_tl.config import ConfigError, from_dict, load_config
from dsg_tl.demo import DemoConfig, EvalConfig
from dsg_tl.pipeline import DSGConfig
from dsg_tl.sweep import (
    PointRunner,
    SweepGrid,
    emit_wandb_sweep_config,
    pareto_front,
    point_config,
    point_id,
    relative_metrics,
    run_agent_point,
    run_sweep,
    sensitivity,
)


# ---------------------------------------------------------------- grid, ids, formulas (no model)
def test_grid_is_the_cartesian_product_with_c_fastest_and_base_values_for_empty_axes():
    base = DemoConfig()
    grid = SweepGrid(n_features=(10, 20), c=(1.0, 5.0, 9.0))
    pts = grid.points(base)
    assert len(pts) == len(grid) == 6
    assert [(p["n_features"], p["c"]) for p in pts] == [(10, 1.0), (10, 5.0), (10, 9.0), (20, 1.0), (20, 5.0),
                                                        (20, 9.0)]
    assert all(p["p_dyn"] == base.dsg.p_dyn and p["sae_layer"] == base.world.sae.layer for p in pts)
    assert grid.swept() == ["n_features", "c"]
    cfg = point_config(base, pts[4])
    assert (cfg.dsg.n_features, cfg.dsg.c, cfg.world.sae.layer) == (20, 5.0, base.world.sae.layer)


@pytest.mark.parametrize("data, key", [
    ({"c": [5.0, -1.0]}, "c"),
    ({"p_dyn": [101]}, "p_dyn"),
    ({"forget_fraction": [0.0]}, "forget_fraction"),
    ({"n_features": [10, 10]}, "repeated"),
    ({"n_features": [1.5]}, "n_features[0]"),
    ({"n_features": 10}, "expected a list"),
    ({"layer": [1]}, "unknown key 'layer'"),
    ({"name": "a b"}, "name"),
])
def test_grid_validation_errors_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        from_dict(SweepGrid, data, where="grid.yaml")


def test_grid_file_and_point_errors(tmp_path):
    bad = tmp_path / "g.yaml"
    bad.write_text("c: [1.0, 0.0]\n")
    with pytest.raises(ConfigError, match="g.yaml"):
        load_config(bad, SweepGrid)
    with pytest.raises(ConfigError, match="sae.layer"):  # the default world has 4 layers
        point_config(DemoConfig(), {"sae_layer": 7})
    with pytest.raises(ConfigError, match="unknown axis 'lr'"):
        point_config(DemoConfig(), {"lr": 0.1})


def test_default_grid_file_is_valid_and_has_at_least_24_points():
    grid = load_config("configs/sweep_world.yaml", SweepGrid)
    assert len(grid) >= 24 and not grid.sae_layer


def test_point_id_is_a_stable_hash_of_the_point_config():
    base = DemoConfig()
    a = point_id(point_config(base, {"n_features": 10, "c": 5.0}))
    assert a == point_id(point_config(base, {"c": 5.0, "n_features": 10}))
    assert a != point_id(point_config(base, {"n_features": 10, "c": 10.0}))
    other_world = point_config(base, {"n_features": 10, "c": 5.0})
    other_world = dataclasses.replace(other_world, forget_domain="exploits")
    assert a != point_id(other_world)
    assert a.startswith("L1_ff1_pr90_N10_pd95_c5-")


def test_relative_metrics_toy_values():
    m = relative_metrics({"forget": 0.3, "retain": 0.9, "adjacent": 0.0}, {"forget": 0.6, "retain": 1.0,
                                                                           "adjacent": 0.0})
    assert m["forget_rel"] == pytest.approx(0.5) and m["retain_rel"] == pytest.approx(0.9)
    assert m["retain_minus_forget"] == pytest.approx(0.4)
    assert math.isnan(m["adjacent_rel"]) and m["base_forget"] == pytest.approx(0.6)


def _rec(i, retain, forget, **point):
    return {"id": f"p{i}", "point": point, "metrics": {"retain_rel": retain, "forget_rel": forget}}


def test_pareto_front_toy_values():
    recs = [_rec(0, 0.90, 0.30), _rec(1, 0.95, 0.50), _rec(2, 0.85, 0.40),  # 2 dominated by 0
            _rec(3, 1.00, 0.90), _rec(4, 0.95, 0.60),  # 4 dominated by 1 (same retain, higher forget)
            _rec(5, 0.80, 0.30), _rec(6, 0.99, float("nan"))]  # 5 dominated by 0 (same forget, lower retain)
    assert pareto_front(recs) == [0, 1, 3]
    assert pareto_front([_rec(0, 0.9, 0.3), _rec(1, 0.9, 0.3)]) == [0, 1]  # equal points dominate neither


def test_sensitivity_medians_and_quartiles_toy_values():
    recs = [{"id": str(i), "point": {"c": c}, "metrics": {"forget_rel": v}}
            for i, (c, v) in enumerate([(1, 0.1), (1, 0.2), (1, 0.3), (1, 0.4), (5, 0.9), (5, float("nan"))])]
    rows = sensitivity(recs, "c", "forget_rel")
    assert [r["value"] for r in rows] == [1, 5]
    # values 0.1..0.4: median 0.25, q1 = 0.1 + 0.75*0.1 = 0.175, q3 = 0.325 (linear interpolation)
    assert rows[0]["median"] == pytest.approx(0.25) and rows[0]["q1"] == pytest.approx(0.175)
    assert rows[0]["q3"] == pytest.approx(0.325) and rows[0]["n"] == 4
    assert rows[1]["median"] == pytest.approx(0.9) and rows[1]["n"] == 1  # nan ignored


# ---------------------------------------------------------------- runs on the micro world
@pytest.fixture(scope="module")
def micro(micro_world, micro_world_config):
    cfg = DemoConfig(world=micro_world_config, dsg=DSGConfig(n_features=4, p_ratio=80.0, c=5.0, chunk_len=16),
                     eval=EvalConfig(batch_size=32, splits=("train_frames",)))
    return cfg, micro_world.path.parent


GRID = SweepGrid(n_features=(2, 4), c=(2.0, 8.0), name="micro")


def _runs(out):
    return sorted(out.glob("points/*/wandb/offline-run-*"))


def test_sweep_runs_every_point_logs_one_wandb_run_each_and_resumes(micro, tmp_path):
    cfg, cache = micro
    out = tmp_path / "sweep"
    summary = run_sweep(cfg, GRID, out, cache, echo=lambda s: None)
    points = sorted(p for p in (out / "points").iterdir())
    assert summary["n_points"] == 4 and summary["computed"] == 4 and len(points) == 4
    assert len(_runs(out)) == 4 and all(len(list((p / "wandb").glob("offline-run-*"))) == 1 for p in points)
    for p in points:
        res = json.loads((p / "result.json").read_text())
        m = res["metrics"]
        assert res["id"] == p.name and res["group"] == summary["group"]
        assert {"config", "seeds", "versions"} <= set(res)
        assert 0 <= m["forget"] <= 1 and m["forget_rel"] == pytest.approx(m["forget"] / m["base_forget"])
        assert m["n_selected"] == res["point"]["n_features"]
    sw = json.loads((out / "sweep.json").read_text())
    assert sw["swept_axes"] == ["n_features", "c"] and set(sw["pareto_front"]) <= {p.name for p in points}
    assert (out / "pareto.png").stat().st_size > 0 and (out / "sensitivity.png").stat().st_size > 0
    mtimes = {p.name: (p / "result.json").stat().st_mtime_ns for p in points}

    runner = PointRunner(cfg, out, cache, group=summary["group"])
    again = run_sweep(cfg, GRID, out, cache, echo=lambda s: None, point_fn=runner)
    assert runner.computed == [] and again["skipped"] == 4 and again["computed"] == 0
    assert {p.name: (p / "result.json").stat().st_mtime_ns for p in points} == mtimes
    assert len(_runs(out)) == 4
    assert again["points"] == sw["points"]


class _Interrupting(PointRunner):
    """Raises KeyboardInterrupt while writing the k-th computed point (after its W&B run was created)."""

    def __init__(self, *a, k: int, **kw):
        super().__init__(*a, **kw)
        self.k, self.calls = k, 0

    def evaluate(self, cfg):
        self.calls += 1
        metrics, detail = super().evaluate(cfg)
        if self.calls == self.k:
            detail["bomb"] = _Bomb()  # write_results fails on it, inside the point's temporary directory
        return metrics, detail


class _Bomb:
    def __str__(self):
        raise KeyboardInterrupt("interrupted while writing the point")


def test_interrupted_sweep_leaves_complete_points_only_and_rerun_finishes(micro, tmp_path):
    cfg, cache = micro
    out = tmp_path / "sweep"
    runner = _Interrupting(cfg, out, cache, group="g", k=3, echo=lambda s: None)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, GRID, out, cache, group="g", echo=lambda s: None, point_fn=runner)
    entries = sorted((out / "points").iterdir())
    assert len(entries) == 2 and all((p / "result.json").is_file() for p in entries)  # no temp dir, no half point
    assert len(_runs(out)) == 2 and not (out / "sweep.json").exists()
    (out / "points" / ".stale.tmp-x1").mkdir()  # what a SIGKILL would leave behind

    rerun = PointRunner(cfg, out, cache, group="g")
    summary = run_sweep(cfg, GRID, out, cache, group="g", echo=lambda s: None, point_fn=rerun)
    assert len(rerun.computed) == 2 and summary["n_points"] == 4 and summary["skipped"] == 2
    assert len(list((out / "points").iterdir())) == 4 and len(_runs(out)) == 4


def test_agent_point_runs_the_same_point_function(micro, tmp_path):
    cfg, cache = micro
    local = PointRunner(cfg, tmp_path / "local", cache, group="g")
    expected = local({"n_features": 2, "c": 8.0})
    got = run_agent_point(cfg, GRID, tmp_path / "agent", cache, group="g",
                          config_defaults={"n_features": 2, "c": 8.0}, echo=lambda s: None)
    drop = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert drop(got) == drop(expected)
    pid = point_id(point_config(cfg, {"n_features": 2, "c": 8.0}))
    res = json.loads((tmp_path / "agent" / "points" / pid / "result.json").read_text())
    assert "offline-run-" in res["wandb_run_dir"] and list((tmp_path / "agent" / "wandb").glob("offline-run-*"))
    with pytest.raises(ConfigError, match="none of the sweep axes"):
        run_agent_point(cfg, GRID, tmp_path / "agent2", cache, config_defaults={"lr": 1}, echo=lambda s: None)


def test_emitted_wandb_sweep_yaml(tmp_path):
    grid = SweepGrid(n_features=(10, 20), c=(2.5, 5.0), p_dyn=(95.0,), name="w")
    path = emit_wandb_sweep_config(grid, tmp_path / "sweep.yaml",
                                   command=["dsg-tl", "sweep", "--agent", "--config", "c.yaml"])
    y = yaml.safe_load(path.read_text())
    assert y["method"] == "grid" and y["program"] == "dsg-tl" and y["name"] == "w"
    assert y["parameters"] == {"p_dyn": {"values": [95.0]}, "n_features": {"values": [10, 20]},
                               "c": {"values": [2.5, 5.0]}}
    assert y["command"] == ["${env}", "WANDB_MODE=online", "dsg-tl", "sweep", "--agent", "--config", "c.yaml"]
    assert y["metric"] == {"name": "retain_minus_forget", "goal": "maximize"}
    n = 1
    for spec in y["parameters"].values():
        n *= len(spec["values"])
    assert n == len(grid) == 4
    with pytest.raises(ValueError, match="--agent"):
        emit_wandb_sweep_config(grid, tmp_path / "x.yaml", command=["dsg-tl", "sweep"])
    with pytest.raises(ConfigError, match="no axis"):
        emit_wandb_sweep_config(SweepGrid(), tmp_path / "x.yaml")


def test_cli_sweep_emit_and_run(micro, tmp_path, capsys):
    from conftest import MICRO_WORLD

    from dsg_tl.cli import main

    cfg_path = tmp_path / "micro.yaml"
    cfg_path.write_text(yaml.safe_dump({"world": MICRO_WORLD, "dsg": {"n_features": 4, "p_ratio": 80.0,
                                                                       "chunk_len": 16},
                                        "eval": {"batch_size": 32, "splits": ["train_frames"]}}))
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text("name: cli\nc: [2.0, 8.0]\n")
    cache, out = str(micro[1]), str(tmp_path / "out")
    common = ["sweep", "--config", str(cfg_path), "--grid", str(grid_path), "--cache", cache, "--out", out]
    assert main([*common, "--emit-wandb-sweep", str(tmp_path / "w.yaml")]) == 0
    y = yaml.safe_load((tmp_path / "w.yaml").read_text())
    cmd = y["command"]
    assert cmd[:5] == ["${env}", "WANDB_MODE=online", "dsg-tl", "sweep", "--agent"]
    assert cmd[cmd.index("--grid") + 1] == str(grid_path)
    assert cmd[cmd.index("--config") + 1] == str(cfg_path) and cmd[cmd.index("--out") + 1] == out
    assert not (tmp_path / "out" / "points").exists()  # emitting runs nothing
    assert main(common) == 0
    assert "sweep done: 2 points (2 computed, 0 skipped)" in capsys.readouterr().out
    assert main(common) == 0
    assert "(0 computed, 2 skipped)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("c: [0]\n")
    assert main(["sweep", "--config", str(cfg_path), "--grid", str(bad), "--out", out]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_sae_layer_axis_uses_an_sae_at_that_layer(micro, tmp_path):
    cfg, cache = micro
    assert cfg.world.sae.layer == 0
    runner = PointRunner(cfg, tmp_path / "layers", cache, group="g")
    m1 = runner({"sae_layer": 1, "n_features": 2})  # trains (once, cached) the micro SAE at blocks.1
    pid = point_id(point_config(cfg, {"sae_layer": 1, "n_features": 2}))
    res = json.loads((tmp_path / "layers" / "points" / pid / "result.json").read_text())
    assert pid.startswith("L1_") and res["world"]["hook_name"] == "blocks.1.hook_resid_post"
    assert res["config"]["world"]["sae"]["layer"] == 1 and 0 <= m1["forget"] <= 1
