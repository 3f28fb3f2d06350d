"""A horizontal bar chart of static and dynamic memory per row, drawn with Pillow alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

STATIC_COLOUR = (52, 101, 164)
DYNAMIC_COLOUR = (245, 121, 0)
GIB = 1024**3


def bar_chart(rows: list[dict[str, Any]], path: str | Path, *, title: str) -> Path:
    """One pair of bars (static, dynamic; GiB) per row, labelled with `row["label"]`."""
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    left, right, top, bar, gap = 330, 170, 60, 14, 14
    width = 1100
    height = top + len(rows) * (2 * bar + gap) + 50
    top_value = max([r["dynamic_bytes"] for r in rows] + [r["static_bytes"] for r in rows]) / GIB
    scale = (width - left - right) / (top_value or 1.0)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black", font=font)
    for i, (name, colour) in enumerate((("static", STATIC_COLOUR), ("dynamic", DYNAMIC_COLOUR))):
        x = left + i * 110
        draw.rectangle((x, 36, x + 12, 48), fill=colour)
        draw.text((x + 18, 34), name, fill="black", font=small)
    y = top
    for row in rows:
        draw.text((10, y + bar // 2), row["label"], fill="black", font=small)
        for key, colour in (("static_bytes", STATIC_COLOUR), ("dynamic_bytes", DYNAMIC_COLOUR)):
            gib = row[key] / GIB
            text = f"{gib:.2f} GiB"
            change = row.get(key.replace("_bytes", "_reduction_pct"))
            if change:
                text += f" ({-change:+.1f}%)"
            draw.rectangle((left, y, left + max(1, int(gib * scale)), y + bar - 2), fill=colour)
            draw.text((left + int(gib * scale) + 6, y), text, fill="black", font=small)
            y += bar
        y += gap
    axis_y = y + 4
    draw.line((left, top - 4, left, axis_y), fill="black")
    for tick in range(int(top_value) + 1):
        x = left + int(tick * scale)
        draw.line((x, axis_y, x, axis_y + 4), fill="black")
        if tick % max(1, int(top_value) // 8 or 1) == 0:
            draw.text((x - 4, axis_y + 6), str(tick), fill="black", font=small)
    draw.text((width - right + 10, axis_y + 6), "GiB", fill="black", font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
