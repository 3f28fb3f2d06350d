"""Render the Grafana dashboard's panel layout from its JSON: an HTML page and a PNG screenshot.

    .venv/bin/python docs/render_dashboard.py         # -> docs/screenshots/dashboard-layout.png
    .venv/bin/python docs/render_dashboard.py --html /tmp/layout.html --png /tmp/layout.png

This is a picture of the layout, not of a live Grafana: no Grafana, no Prometheus, no data. Each
panel of `docker/grafana/dashboards/tinyllava-med.json` (rows, and the panels inside collapsed
rows) is placed on Grafana's 24-column grid by its `gridPos` (x, y, w, h; a grid unit is 30 px
high with 8 px gaps, as in Grafana) and shows its title, type, unit and the PromQL of its
targets. The page is self-contained (inline CSS, no scripts, no external resources).

The screenshot is taken by Debian's headless Chromium (`/usr/bin/chromium`) through Playwright
with an explicit executable path, as `tests/server/test_web_client.py` does (`playwright
install` is never used), and saved as a palette PNG so the README's copy stays small.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "tinyllava-med.json"
PNG = REPO / "docs" / "screenshots" / "dashboard-layout.png"

GRID_COLUMNS = 24  # Grafana's grid
GRID_UNIT_PX = 30
GRID_GAP_PX = 8
PAGE_WIDTH_PX = 1440
MAX_PNG_BYTES = 200_000  # README screenshots stay under 200 KB

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [  # the flags tests/server/test_web_client.py launches Chromium with
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass(frozen=True)
class Panel:
    title: str
    type: str
    x: int
    y: int
    w: int
    h: int
    exprs: tuple[tuple[str, str], ...]  # (legendFormat, PromQL) per target
    unit: str | None = None


def panels_of(dashboard: dict[str, Any]) -> list[Panel]:
    """Every panel in reading order (top to bottom, left to right), rows included; a collapsed
    row's own panels are listed after it."""
    found: list[Panel] = []

    def visit(raw: dict[str, Any]) -> None:
        pos = raw.get("gridPos") or {}
        missing = [k for k in ("x", "y", "w", "h") if not isinstance(pos.get(k), int)]
        if missing:
            raise ValueError(f"panel {raw.get('title')!r}: gridPos lacks {', '.join(missing)}")
        targets = raw.get("targets") or []
        found.append(
            Panel(
                title=str(raw.get("title") or "(untitled)"),
                type=str(raw.get("type") or "?"),
                x=pos["x"],
                y=pos["y"],
                w=pos["w"],
                h=pos["h"],
                exprs=tuple(
                    (str(t.get("legendFormat") or ""), str(t["expr"]))
                    for t in targets
                    if t.get("expr")
                ),
                unit=((raw.get("fieldConfig") or {}).get("defaults") or {}).get("unit"),
            )
        )
        for child in raw.get("panels") or []:  # a collapsed row keeps its panels inside it
            visit(child)

    for raw in dashboard.get("panels") or []:
        visit(raw)
    for p in found:
        if not (p.x >= 0 and p.w >= 1 and p.x + p.w <= GRID_COLUMNS):
            raise ValueError(
                f"panel {p.title!r}: x={p.x}, w={p.w} leaves the {GRID_COLUMNS}-column grid"
            )
    return sorted(found, key=lambda p: (p.y, p.x))


CSS = f"""
* {{ box-sizing: border-box; }}
body {{ margin: 0; padding: 16px; width: {PAGE_WIDTH_PX}px; background: #111217; color: #ccccdc;
  font: 13px/1.35 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }}
header {{ display: flex; align-items: baseline; gap: 16px; margin-bottom: 6px; }}
h1 {{ font-size: 20px; margin: 0; color: #fff; font-weight: 500; }}
.note {{ color: #ff9830; font-size: 12px; }}
.meta {{ color: #8e8e8e; font-size: 12px; margin-bottom: 12px; }}
.meta span {{ background: #22252b; border: 1px solid #34373d; border-radius: 2px;
  padding: 1px 6px; margin-right: 6px; color: #ccccdc; }}
.grid {{ display: grid; grid-template-columns: repeat({GRID_COLUMNS}, 1fr);
  grid-auto-rows: {GRID_UNIT_PX}px; gap: {GRID_GAP_PX}px; }}
.panel {{ background: #181b1f; border: 1px solid #2c3235; border-radius: 2px; padding: 6px 8px;
  overflow: hidden; display: flex; flex-direction: column; gap: 4px; }}
.panel h2 {{ font-size: 13px; margin: 0; color: #fff; font-weight: 500; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }}
.badge {{ font-size: 10px; color: #8e8e8e; margin-left: 6px; font-weight: 400; }}
.target {{ font: 10.5px/1.3 ui-monospace, "DejaVu Sans Mono", monospace; color: #73bf69;
  word-break: break-all; }}
.legend {{ color: #8ab8ff; }}
.row {{ background: none; border: none; border-bottom: 1px solid #2c3235; padding: 4px 0 0;
  justify-content: flex-end; }}
.row h2 {{ font-size: 15px; }}
"""


def render_html(dashboard: dict[str, Any], *, source: str = "") -> str:
    """The layout as one self-contained HTML page."""
    esc = html.escape
    cells = []
    for p in panels_of(dashboard):
        area = f"grid-column: {p.x + 1} / span {p.w}; grid-row: {p.y + 1} / span {p.h};"
        if p.type == "row":
            cells.append(
                f'<section class="panel row" style="{area}"><h2>{esc(p.title)}</h2></section>'
            )
            continue
        badge = esc(p.type + (f" · {p.unit}" if p.unit else ""))
        lines = "".join(
            '<div class="target">'
            + (f'<span class="legend">{esc(legend)}</span> ' if legend else "")
            + f"{esc(expr)}</div>"
            for legend, expr in p.exprs
        )
        cells.append(
            f'<section class="panel" style="{area}">'
            f'<h2>{esc(p.title)}<span class="badge">{badge}</span></h2>{lines}</section>'
        )
    variables = " ".join(
        f"<span>${esc(str(v.get('name')))}</span>"
        for v in (dashboard.get("templating") or {}).get("list") or []
    )
    time_range = dashboard.get("time") or {}
    meta = (
        f"variables {variables} time <span>{esc(str(time_range.get('from', '')))} to "
        f"{esc(str(time_range.get('to', '')))}</span> refresh "
        f"<span>{esc(str(dashboard.get('refresh', '')))}</span>"
    )
    title = esc(str(dashboard.get("title") or "dashboard"))
    note = "Panel layout rendered from the dashboard JSON, not a live Grafana" + (
        f" ({esc(source)})" if source else ""
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}: layout</title><style>{CSS}</style></head><body>"
        f'<header><h1>{title}</h1><div class="note">{note}</div></header>'
        f'<div class="meta">{meta}</div><main class="grid">{"".join(cells)}</main>'
        "</body></html>\n"
    )


def screenshot(page_html: str, png: Path) -> None:
    """A full-page PNG of `page_html` by headless Chromium, saved with a palette (< 200 KB)."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise SystemExit(f"Chromium is missing at {CHROMIUM}: apt-get install -y chromium")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(Path(tmp) / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": PAGE_WIDTH_PX, "height": 900},
            device_scale_factor=1,
        )
        try:
            page = context.new_page()
            page.set_content(page_html, wait_until="load")
            raw = Path(tmp) / "raw.png"
            page.screenshot(path=str(raw), full_page=True)
        finally:
            context.close()
        rgb = Image.open(raw).convert("RGB")
        for colours in (128, 64, 32):  # fewer colours if the image is too large
            rgb.quantize(colours, dither=Image.Dither.NONE).save(png, optimize=True)
            if png.stat().st_size < MAX_PNG_BYTES:
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--png", type=Path, default=PNG, help=f"default: {PNG.relative_to(REPO)}")
    parser.add_argument("--html", type=Path, default=None, help="also keep the HTML page here")
    args = parser.parse_args(argv)
    dashboard = json.loads(args.dashboard.read_text())
    try:
        source = str(args.dashboard.resolve().relative_to(REPO))
    except ValueError:
        source = args.dashboard.name
    page_html = render_html(dashboard, source=source)
    if args.html is not None:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(page_html)
    screenshot(page_html, args.png)
    print(f"{len(panels_of(dashboard))} panels -> {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
