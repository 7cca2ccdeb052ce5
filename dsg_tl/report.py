"""`dsg-tl report DIR`: one self-contained HTML file from a demo or a sweep output directory.

The report holds every PNG of the directory as a base64 data URI, the results as HTML tables, the config (YAML) and
the package versions, so it can be mailed or archived alone. ``create_wandb_report`` builds a W&B Report from the
same content when W&B is online and ``wandb_workspaces`` is installed; otherwise it says why it did nothing.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from dsg_tl.utils import atomic_write_text


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list]
    note: str = ""


@dataclass
class ReportContent:
    """What a report shows, independent of the output format (HTML here, W&B Report blocks optionally)."""

    title: str
    kind: str  # "demo" | "sweep"
    source: Path
    summary: list[str] = field(default_factory=list)
    figures: list[tuple[str, Path]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    seeds: dict = field(default_factory=dict)


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _kv_table(title: str, d: dict, note: str = "") -> Table:
    return Table(title, ["key", "value"], [[k, v] for k, v in d.items() if not isinstance(v, dict)], note)


def _demo_content(run_dir: Path, res: dict) -> ReportContent:
    c = ReportContent(title=f"DSG demo: {run_dir.name}", kind="demo", source=run_dir)
    split = res.get("main_split", "")
    groups = ["forget", "retain", "adjacent"]
    c.summary = [f"forget domain: {res.get('config', {}).get('forget_domain', '?')}; main split: {split}; "
                 f"score formula: {res.get('formula_variant', '?')}"]
    c.tables.append(Table(f"Accuracy by method ({split})", ["method", *groups],
                          [[m, *(acc.get(g) for g in groups)] for m, acc in res.get("methods", {}).items()],
                          "MCQ accuracy (cloze or letter scoring as configured); lower forget and higher "
                          "retain / adjacent are better"))
    for s, methods in res.get("methods_detail", {}).items():
        rows = []
        for m, per in methods.items():
            rows.append([m, *(f"{_fmt(per[g]['accuracy'])} (margin {per[g]['margin']:+.2f}"
                              + (f", gated {per[g]['gate_rate']:.2f})" if "gate_rate" in per[g] else ")")
                              for g in groups)])
        c.tables.append(Table(f"Detail: {s}", ["method", *groups], rows))
    if "gate" in res:
        c.tables.append(_kv_table("Gate (Neyman-Pearson calibration)", res["gate"]))
    sel = res.get("selection", {})
    if sel.get("top"):
        cols = list(sel["top"][0])
        c.tables.append(Table(f"Selected latents (top {len(sel['top'])} of {len(sel.get('latents', []))}; "
                              f"{sel.get('formula', '')}, p_ratio {sel.get('p_ratio', '')})",
                              cols, [[r[k] for k in cols] for r in sel["top"]]))
    if res.get("sweep"):
        cols = list(res["sweep"][0])
        c.tables.append(Table("(N, c) sweep", cols, [[p.get(k) for k in cols] for p in res["sweep"]]))
    if res.get("timings_s"):
        c.tables.append(_kv_table("Timings (s)", res["timings_s"]))
    return c


def _sweep_content(run_dir: Path, sw: dict) -> ReportContent:
    c = ReportContent(title=f"DSG sweep: {sw.get('group', run_dir.name)}", kind="sweep", source=run_dir)
    base = sw.get("base", {})
    c.summary = [f"{sw['n_points']} grid points over {', '.join(sw.get('swept_axes', []))} "
                 f"({sw.get('computed', '?')} computed in the last run, {sw.get('skipped', '?')} resumed); "
                 f"split {sw.get('split', '?')}, forget domain {sw.get('forget_domain', '?')}; "
                 f"W&B group {sw.get('group', '?')} (project {sw.get('wandb_project', '?')})",
                 "base model accuracy: " + ", ".join(f"{g} {_fmt(v)}" for g, v in base.items()),
                 "*_rel = accuracy with the guardrail / base accuracy (1 = untouched)"]
    axes = list(sw["points"][0]["point"]) if sw["points"] else []
    metric_cols = ["forget_rel", "retain_rel", "adjacent_rel", "tau", "retain_fpr", "forget_tpr"]
    by_id = {p["id"]: p for p in sw["points"]}
    front = [by_id[i] for i in sw.get("pareto_front", []) if i in by_id]
    c.tables.append(Table("Pareto front (lowest forget for its retain)", ["id", *axes, *metric_cols],
                          [[p["id"], *(p["point"][a] for a in axes), *(p["metrics"].get(m) for m in metric_cols)]
                           for p in front]))
    for axis, per_metric in sw.get("sensitivity", {}).items():
        values = [r["value"] for r in next(iter(per_metric.values()), [])]
        rows = []
        for i, v in enumerate(values):
            rows.append([v, *(f"{_fmt(t[i]['median'])} [{_fmt(t[i]['q1'])}, {_fmt(t[i]['q3'])}]"
                              for t in per_metric.values())])
        c.tables.append(Table(f"Sensitivity to {axis}", [axis, *per_metric], rows,
                              "median [first, third quartile] over the other parameters"))
    c.tables.append(Table("All points", ["id", *axes, *metric_cols],
                          [[p["id"], *(p["point"][a] for a in axes), *(p["metrics"].get(m) for m in metric_cols)]
                           for p in sw["points"]]))
    if sw.get("grid"):
        c.tables.append(_kv_table("Grid", sw["grid"]))
    return c


def collect(run_dir: str | Path) -> ReportContent:
    """Read a sweep directory (sweep.json) or a demo directory (results.json) into report content."""
    run_dir = Path(run_dir)
    if (run_dir / "sweep.json").is_file():
        data = json.loads((run_dir / "sweep.json").read_text())
        content = _sweep_content(run_dir, data)
    elif (run_dir / "results.json").is_file():
        data = json.loads((run_dir / "results.json").read_text())
        content = _demo_content(run_dir, data)
    else:
        raise FileNotFoundError(f"{run_dir}: neither sweep.json (dsg-tl sweep) nor results.json (dsg-tl demo) found")
    content.config = data.get("config", {})
    content.versions = data.get("versions", {})
    content.seeds = data.get("seeds", {})
    content.figures = [(p.stem, p) for p in sorted(run_dir.glob("*.png"))]
    return content


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em} th,td{border:1px solid #ccc;padding:.25em .5em}
th{background:#f3f3f3;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0} img{max-width:100%;border:1px solid #eee} figcaption{font-size:.85em;color:#555}
.scroll{overflow-x:auto} pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em} .note{font-size:.85em;color:#555}
"""


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(col))}</th>" for col in t.columns)
    body = []
    for row in t.rows:
        cells = "".join(
            f'<td class="num">{html.escape(_fmt(v))}</td>' if isinstance(v, (int, float)) and not isinstance(v, bool)
            else f"<td>{html.escape(_fmt(v))}</td>" for v in row)
        body.append(f"<tr>{cells}</tr>")
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return (f'<h2>{html.escape(t.title)}</h2>{note}\n<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>'
            + "\n".join(body) + "</tbody></table></div>")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(c: ReportContent) -> str:
    """The report as one HTML document with no external references."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(c.title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(c.title)}</h1>",
             f'<p class="note">{c.kind} directory <code>{html.escape(c.source.name)}</code>; report generated {now}</p>']
    parts += [f"<p>{html.escape(s)}</p>" for s in c.summary]
    if c.figures:
        parts.append("<h2>Figures</h2>")
        for name, path in c.figures:
            parts.append(f'<figure><img alt="{html.escape(name)}" src="{data_uri(path)}">'
                         f"<figcaption>{html.escape(path.name)}</figcaption></figure>")
    parts += [_table_html(t) for t in c.tables]
    if c.seeds:
        parts.append(_table_html(_kv_table("Seeds", c.seeds)))
    if c.versions:
        parts.append(_table_html(_kv_table("Versions", c.versions)))
    if c.config:
        parts.append("<h2>Config</h2><pre>" + html.escape(yaml.safe_dump(c.config, sort_keys=False)) + "</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (or ``out``) for a demo or sweep directory; returns its path."""
    content = collect(run_dir)
    path = Path(out) if out else Path(run_dir) / "report.html"
    atomic_write_text(path, render_html(content))
    path.chmod(0o644)
    return path


def _markdown_table(t: Table) -> str:
    lines = [f"**{t.title}**", "", "| " + " | ".join(map(str, t.columns)) + " |",
             "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in t.rows]
    return "\n".join(lines)


def create_wandb_report(run_dir: str | Path, *, entity: str | None = None, project: str | None = None) -> str:
    """Create a W&B Report (text, tables, a panel grid over the project's runs) from the same content.

    Returns a message: the report URL, or why nothing was created (offline, not installed, not logged in). Never
    raises for those reasons, so offline use stays quiet.
    """
    mode = os.environ.get("WANDB_MODE", "online")
    if mode in ("offline", "disabled", "dryrun"):
        return (f"W&B Report skipped: WANDB_MODE={mode}. Set WANDB_MODE=online, log in (wandb login) and install "
                f"wandb-workspaces to create one; the HTML report has the same content.")
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        return "W&B Report skipped: wandb-workspaces is not installed (pip install wandb-workspaces)."
    content = collect(run_dir)
    project = project or content.config.get("wandb_project", "dsg-tl")
    blocks = [wr.H1(text=content.title), *(wr.P(text=s) for s in content.summary)]
    blocks += [wr.MarkdownBlock(text=_markdown_table(t)) for t in content.tables]
    panels = ([wr.ScatterPlot(x="retain_rel", y="forget_rel")] if content.kind == "sweep" else [])
    who = {"entity": entity} if entity else {}
    blocks.append(wr.PanelGrid(runsets=[wr.Runset(project=project, **who)], panels=panels))
    blocks.append(wr.MarkdownBlock(text="```yaml\n" + yaml.safe_dump(content.config, sort_keys=False) + "```"))
    try:
        report = wr.Report(project=project, **who, title=content.title,
                           description=f"{content.kind} report from {content.source.name}", blocks=blocks)
        report.save()
    except Exception as e:  # not logged in, no network, API change: say so, do not fail the command
        return f"W&B Report not created: {type(e).__name__}: {e}"
    return f"W&B Report: {report.url}"


__all__ = ["ReportContent", "Table", "collect", "render_html", "build_report", "create_wandb_report", "data_uri"]
