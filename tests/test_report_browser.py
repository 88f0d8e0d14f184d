"""The HTML report in a real browser: headless Chromium loads it with no console error, every
image decodes, the summary numbers equal results.json, and a screenshot is taken.

Needs Debian's ``chromium`` (``make test`` installs it when apt is available); skipped with the
reason where it cannot be installed. ``FLOWPRUNE_SCREENSHOT_DIR=DIR`` keeps the screenshot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from flowprune.report import merge_reports
from test_report import RUNS, check_summary_matches, make_runs

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium); "
                                                          "the browser check cannot run here")

# Injected at the top of <head> of a copy of the page: records JS errors, console.error calls and
# resources that fail to load, then writes them and every image's decoded size into the DOM.
PROBE = """<script>
window.__fp=[];
window.addEventListener('error',function(e){window.__fp.push(e.message||('failed to load: '+
  (e.target&&(e.target.src||e.target.href))))},true);
var __ce=console.error;console.error=function(){window.__fp.push('console.error: '+
  Array.prototype.join.call(arguments,' '));__ce.apply(console,arguments)};
window.addEventListener('load',function(){var p=document.createElement('pre');p.id='fp-probe';
  p.textContent=JSON.stringify({errors:window.__fp,images:Array.prototype.map.call(document.images,
  function(i){return {ok:i.complete,w:i.naturalWidth,h:i.naturalHeight}})});document.body.appendChild(p)});
</script>"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--no-first-run", "--disable-extensions", "--enable-logging=stderr", "--v=0"]


def _chromium(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(tmp_path)}  # a fresh profile, nothing from the user's
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=90, env=env)


def _console_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


def test_report_renders_in_chromium(tmp_path):
    dirs = make_runs(tmp_path / "runs")
    order = ["prune", "route", "idap", "compare", "hfsweep"]
    page = merge_reports([dirs[n] for n in order], tmp_path / "report.html")
    html = page.read_text()

    # 1. screenshot of the page as a person sees it (no probe injected)
    shot = tmp_path / "report.png"
    p = _chromium(["--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()], tmp_path)
    assert shot.exists() and shot.stat().st_size > 20_000, p.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _console_lines(p.stderr) == []
    if os.environ.get("FLOWPRUNE_SCREENSHOT_DIR"):
        shutil.copy(shot, os.environ["FLOWPRUNE_SCREENSHOT_DIR"])

    # 2. the same page with the probe: no error of any kind, every image decoded at its size
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("<head>", "<head>" + PROBE, 1))
    p = _chromium(["--virtual-time-budget=5000", "--dump-dom", probed.as_uri()], tmp_path)
    m = re.search(r'<pre id="fp-probe">(.*?)</pre>', p.stdout, re.S)
    assert m, f"the page did not finish loading: {p.stderr[-2000:]}"
    probe = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe["errors"] == []
    assert _console_lines(p.stderr) == []
    n_img = html.count("<img ")
    assert len(probe["images"]) == n_img >= 6
    assert all(i["ok"] and i["w"] > 100 and i["h"] > 100 for i in probe["images"]), probe["images"]

    # 3. the summary the browser shows equals results.json
    dom = p.stdout
    assert check_summary_matches(dom, [RUNS[n] for n in order]) >= 10
