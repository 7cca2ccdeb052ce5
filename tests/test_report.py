"""The HTML report: self-contained (figures as data URIs), tables and config present, demo and sweep directories,
the offline W&B Report message, and the headless-Chromium image check (skipped without a Chromium binary)."""

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsg_tl.demo import DemoConfig, EvalConfig
from dsg_tl.pipeline import DSGConfig
from dsg_tl.report import build_report, collect, create_wandb_report
from dsg_tl.sweep import SweepGrid, run_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep_dir(micro_world, micro_world_config, tmp_path_factory):
    cfg = DemoConfig(world=micro_world_config, dsg=DSGConfig(n_features=4, p_ratio=80.0, c=5.0, chunk_len=16),
                     eval=EvalConfig(batch_size=32, splits=("train_frames",)))
    out = tmp_path_factory.mktemp("report") / "sweep"
    run_sweep(cfg, SweepGrid(n_features=(2, 4), c=(8.0,), name="rep"), out, micro_world.path.parent,
              echo=lambda s: None)
    return out


def _png(path: Path, color) -> Path:
    from PIL import Image

    Image.new("RGB", (40, 30), color).save(path)
    return path


@pytest.fixture()
def demo_dir(tmp_path):
    d = tmp_path / "demo"
    d.mkdir()
    _png(d / "pareto.png", "red")
    _png(d / "extra_plot.png", "blue")
    acc = lambda f, r, a: {"forget": f, "retain": r, "adjacent": a}  # noqa: E731
    detail = {g: {"accuracy": 0.5, "margin": 1.25, "n": 10, "gate_rate": 0.3} for g in ("forget", "retain", "adjacent")}
    results = {
        "methods": {"base": acc(0.96, 0.98, 0.98), "dsg": acc(0.4321, 0.97, 0.93)},
        "methods_detail": {"train_frames": {"base": detail, "dsg": detail}},
        "gate": {"tau": 0.6, "alpha": 0.05, "retain_fpr": 0.043, "forget_tpr": 0.67},
        "selection": {"latents": [5, 7], "formula": "fisher", "p_ratio": 90.0,
                      "top": [{"rank": 0, "latent": 5, "forget_score": 1.0, "retain_score": 0.0, "ratio": 1e9}]},
        "sweep": [{"n_features": 10, "c": 5.0, "tau": 0.6, "forget": 0.5, "retain": 0.9, "adjacent": 0.8}],
        "timings_s": {"total": 12.5}, "main_split": "train_frames", "formula_variant": "fisher",
        "config": {"forget_domain": "hazard", "dsg": {"n_features": 20, "c": 5.0}},
        "seeds": {"dsg": 0}, "versions": {"torch": "2.13.0+cpu"},
    }
    (d / "results.json").write_text(json.dumps(results))
    return d


def _img_srcs(text: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', text)


def test_sweep_report_is_self_contained_with_figures_and_tables(sweep_dir):
    path = build_report(sweep_dir)
    text = path.read_text()
    pngs = sorted(sweep_dir.glob("*.png"))
    assert {p.name for p in pngs} == {"pareto.png", "sensitivity.png"}
    srcs = _img_srcs(text)
    assert len(srcs) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in srcs)
    for src, png in zip(srcs, pngs, strict=True):  # figures in file-name order, byte-identical
        assert base64.b64decode(src.split(",", 1)[1]) == png.read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', text)  # no external references
    sw = json.loads((sweep_dir / "sweep.json").read_text())
    for title in ("Pareto front", "Sensitivity to n_features", "All points", "Versions", "Config"):
        assert title in text
    assert all(p["id"] in text for p in sw["points"])
    assert "Sensitivity to c" not in text  # c is not swept here
    assert text.count("<table>") >= 5 and "forget_domain: hazard" in text and "transformer-lens" in text


def test_demo_report_tables_and_figures(demo_dir):
    c = collect(demo_dir)
    assert c.kind == "demo" and [n for n, _ in c.figures] == ["extra_plot", "pareto"]
    text = build_report(demo_dir, demo_dir / "out" / "r.html").read_text()
    assert len(_img_srcs(text)) == 2 and all(s.startswith("data:image/png;base64,") for s in _img_srcs(text))
    assert "Accuracy by method (train_frames)" in text and "<td class=\"num\">0.4321</td>" in text
    assert "margin +1.25, gated 0.30" in text and "Gate (Neyman-Pearson calibration)" in text
    assert "2.13.0+cpu" in text and "n_features: 20" in text


def test_report_of_a_directory_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither sweep.json"):
        build_report(tmp_path)


def test_wandb_report_offline_says_why_and_does_not_fail(demo_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    msg = create_wandb_report(demo_dir)
    assert "skipped" in msg and "WANDB_MODE=offline" in msg


def test_cli_report(demo_dir, capsys):
    from dsg_tl.cli import main

    assert main(["report", str(demo_dir), "--wandb-report"]) == 0
    out = capsys.readouterr().out
    assert "report.html" in out and "W&B Report" in out
    assert (demo_dir / "report.html").is_file()


def _chromium():
    sys.path.insert(0, str(ROOT / "analyses"))
    try:
        import check_report
    finally:
        sys.path.pop(0)
    return check_report


def test_report_renders_in_headless_chromium(sweep_dir, tmp_path):
    if _chromium().find_chromium() is None:
        pytest.skip("no Chromium binary (apt-get install chromium)")
    report = build_report(sweep_dir)
    shot = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(ROOT / "analyses" / "check_report.py"), str(report),
                           "--screenshot", str(shot), "--window-size", "800,1200"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["n"] == 2 and all(w > 0 for w in result["widths"]) and result["tables"] >= 5
    from PIL import Image

    assert Image.open(shot).size == (800, 1200)


def test_chromium_check_detects_a_broken_image(tmp_path):
    mod = _chromium()
    if mod.find_chromium() is None:
        pytest.skip("no Chromium binary (apt-get install chromium)")
    page = tmp_path / "broken.html"
    good = base64.b64encode(_png(tmp_path / "ok.png", "green").read_bytes()).decode()
    page.write_text(f'<!DOCTYPE html><html><body><img alt="ok" src="data:image/png;base64,{good}">'
                    '<img alt="bad" src="data:image/png;base64,bm90IGEgcG5n"></body></html>')
    result = mod.check_report(page)
    assert not result["ok"] and result["failed"] == ["bad"] and result["widths"] == [40, 0]
