"""Open an HTML report in headless Chromium and check that every <img> rendered (naturalWidth > 0).

    python analyses/check_report.py runs/sweep/report.html [--screenshot report.png]

A copy of the report with a small inline script is loaded; after the page's load event the script writes the image
check (count, natural widths, failures) into the DOM, which ``chromium --dump-dom`` prints. ``--screenshot`` also
renders the page itself to a PNG. Exit status 0 when all images rendered, 1 when some did not, 2 when no Chromium is
found (set $CHROMIUM to its path).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]
CHECK_ID = "dsg-img-check"
CHECK_SCRIPT = f"""<script>
(function () {{
  function check() {{
    var imgs = Array.prototype.slice.call(document.images);
    var out = {{n: imgs.length, widths: imgs.map(function (i) {{ return i.naturalWidth; }}),
               failed: imgs.filter(function (i) {{ return !(i.complete && i.naturalWidth > 0); }})
                           .map(function (i) {{ return i.alt || i.src.slice(0, 40); }}),
               tables: document.querySelectorAll('table').length}};
    var pre = document.createElement('pre');
    pre.id = '{CHECK_ID}';
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }}
  if (document.readyState === 'complete') check(); else window.addEventListener('load', check);
}})();
</script>"""


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _run(binary: str, args: list[str], profile: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def check_report(report: str | Path, screenshot: str | Path | None = None, *, binary: str | None = None,
                 window: str = "1280,2400", timeout: float = 120.0) -> dict:
    """Load ``report`` in headless Chromium; returns {"n", "widths", "failed", "tables", "ok"} (and the screenshot)."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium binary found (apt-get install chromium, or set $CHROMIUM)")
    report = Path(report).resolve()
    text = report.read_text(encoding="utf-8")
    probe = text.replace("</body>", CHECK_SCRIPT + "</body>") if "</body>" in text else text + CHECK_SCRIPT
    with tempfile.TemporaryDirectory(prefix="check-report-") as tmp:
        tmp = Path(tmp)
        page = tmp / "probe.html"
        page.write_text(probe, encoding="utf-8")
        proc = _run(binary, ["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], tmp / "profile-dom",
                    timeout)
        m = re.search(rf'<pre id="{CHECK_ID}">(.*?)</pre>', proc.stdout, re.S)
        if not m:
            raise RuntimeError(f"Chromium printed no image check (exit {proc.returncode}): {proc.stderr[-2000:]}")
        result = json.loads(html.unescape(m.group(1)))
        if screenshot is not None:
            shot = Path(screenshot).resolve()
            shot.parent.mkdir(parents=True, exist_ok=True)
            proc = _run(binary, [f"--screenshot={shot}", f"--window-size={window}", "--virtual-time-budget=10000",
                                 report.as_uri()], tmp / "profile-shot", timeout)
            if not shot.is_file():
                raise RuntimeError(f"Chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
            result["screenshot"] = str(shot)
    result["ok"] = result["n"] > 0 and not result["failed"] and all(w > 0 for w in result["widths"])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", help="HTML file written by `dsg-tl report`")
    p.add_argument("--screenshot", default=None, help="also save a PNG screenshot of the page")
    p.add_argument("--window-size", default="1280,2400", help="screenshot size W,H (default 1280,2400)")
    args = p.parse_args()
    try:
        result = check_report(args.report, args.screenshot, window=args.window_size)
    except FileNotFoundError as e:
        print(f"check_report: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    status = "all rendered" if result["ok"] else f"NOT rendered: {result['failed'] or 'no images'}"
    print(f"{result['n']} images, {result['tables']} tables: {status}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
