"""docs/render_dashboard.py: the Grafana dashboard's layout as HTML and a PNG (real headless
Chromium, as the web client tests use it; no Grafana). The page must name every panel and show
every PromQL expression; the PNG must be a real image of the page's size, small enough for the
README. No pixel comparison: fonts differ between machines."""

from __future__ import annotations

import html
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "docs" / "render_dashboard.py"
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "tinyllava-med.json"
CHROMIUM = "/usr/bin/chromium"


def _all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_all_panels(p.get("panels") or []))
    return out


def test_renders_every_panel_as_html_and_png(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: this test needs it (it does not skip). "
            "`.ci/run` installs it: apt-get install -y chromium"
        )
    page, png = tmp_path / "layout.html", tmp_path / "layout.png"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--html", str(page), "--png", str(png)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr

    text = page.read_text()
    panels = _all_panels(json.loads(DASHBOARD.read_text())["panels"])
    assert len(panels) >= 20
    for p in panels:
        assert f">{html.escape(p['title'])}<" in text, f"panel {p['title']!r} is missing"
        for t in p.get("targets") or []:
            assert html.escape(t["expr"]) in text, f"{p['title']!r}: {t['expr']!r} is missing"
    assert "not a live Grafana" in text
    assert "http://" not in text and "https://" not in text  # self-contained

    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        width, height = im.size
    assert width == 1440, f"the page is 1440 px wide, the PNG {width}"
    # every grid unit is 30 px plus an 8 px gap, and a header sits above: not a clipped page
    units = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    assert units * 38 < height < units * 38 + 400, (units, height)
    assert 20_000 < png.stat().st_size < 200_000
    assert f"{len(panels)} panels -> {png}" in done.stderr
