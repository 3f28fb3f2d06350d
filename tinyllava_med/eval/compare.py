"""`eval compare`: generate + score several model variants on one dataset, one table.

Each variant is `NAME_OR_PATH[:QUANT]` (e.g. `demo`, `demo:4bit`, `./q/demo-cpu-int8`). For each,
answers are generated (resumable) and scored with LLaVA-Med's metrics; the table puts accuracy
next to the model's static memory, and each variant after the first is paired with the first,
question by question (`paired`: answers changed, right to wrong, wrong to right, McNemar's exact
p). Writes `compare.json`, `compare.md` and `compare.png`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from tinyllava_med.eval.generate import generate_answers, read_questions
from tinyllava_med.eval.metrics import score_files
from tinyllava_med.eval.paired import paired
from tinyllava_med.eval.report import ScoreReport
from tinyllava_med.model.generate import SamplingParams
from tinyllava_med.model.load import check_quant, load_model, resolve


def _split(spec: str) -> tuple[str, str | None]:
    name, _, quant = spec.partition(":")
    return name, (quant or None)


def static_bytes(lm: Any) -> int:
    """Weights and buffers as loaded (bitsandbytes-aware; packed int8 for cpu-int8)."""
    try:
        from tinyllava_med.quantize.memory import static_memory_bytes

        return int(static_memory_bytes(lm.model))
    except ImportError:
        return int(lm.model.get_memory_footprint())


def compare_variants(
    variants: list[str],
    *,
    questions: str | Path,
    images: str | Path,
    out_dir: Path,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    device: str | None = "cpu",
) -> Path:
    for spec in variants:  # every spec is checked before the first variant answers anything
        name, quant = _split(spec)
        if quant is not None:
            check_quant(quant)
        resolve(name)  # ModelNotFoundError for a name that is no model here
    read_questions(questions)
    if not Path(images).is_dir():
        raise NotADirectoryError(20, "Not a directory", str(images))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    reference: ScoreReport | None = None
    slugs: list[str] = []
    for spec in variants:
        name, quant = _split(spec)
        lm = load_model(name, quant=quant, device=device)
        base = f"{Path(name).name}-{lm.quantization_label}".replace("/", "_")
        # folders of one name (runs/a/demo, runs/b/demo): each its own file, in list order
        slug = base + (f"-{slugs.count(base) + 1}" if base in slugs else "")
        slugs.append(base)
        answers = out_dir / f"{slug}.answers.jsonl"
        t0 = time.perf_counter()
        generate_answers(
            lm,
            questions,
            images,
            answers,
            limit=limit,
            batch_size=batch_size,
            params=SamplingParams(max_new_tokens=max_new_tokens),
            progress=False,
        )
        seconds = time.perf_counter() - t0
        scored = score_files(questions, answers)
        report = scored.to_dict()
        by_type = report["by_answer_type"]
        rows.append(
            {
                "variant": spec,
                "model": lm.name,
                "quantization": lm.quantization_label,
                "closed_accuracy": by_type["CLOSED"]["accuracy"],
                "closed_strict_accuracy": by_type["CLOSED"]["strict_accuracy"],
                "open_recall": by_type["OPEN"]["recall"],
                "open_strict_exact_match": by_type["OPEN"]["strict_exact_match"],
                "n_closed": by_type["CLOSED"]["n"],
                "n_open": by_type["OPEN"]["n"],
                "missing": len(report["missing"]),
                "failed": len(report["failed"]),
                "cut_short": len(report["cut_short"]),  # answers the token limit stopped
                "static_memory_bytes": static_bytes(lm),
                "generate_seconds": round(seconds, 2),
                "against_reference": None
                if reference is None
                else paired(reference, scored, variants[0]).to_dict(),
            }
        )
        if reference is None:
            reference = scored
        del lm
    (out_dir / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = out_dir / "compare.md"
    md.write_text(markdown_table(rows))
    bar_chart(rows, out_dir / "compare.png")
    return md


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _against(r: dict[str, Any]) -> str:
    """The paired columns: answers changed, right -> wrong, wrong -> right, McNemar p."""
    p = r.get("against_reference")
    if not p:
        return "- | - | - | -"
    return f"{p['changed']} | {p['right_to_wrong']} | {p['wrong_to_right']} | {p['mcnemar_p']:.3g}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | quantization | closed acc. % | closed strict % | open recall % | "
        "open strict EM % | static memory MB | questions (closed/open) | cut by the limit | "
        "answers changed | right to wrong | wrong to right | McNemar p |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['quantization']} | {_pct(r['closed_accuracy'])} | "
            f"{_pct(r['closed_strict_accuracy'])} | {_pct(r['open_recall'])} | "
            f"{_pct(r['open_strict_exact_match'])} | {r['static_memory_bytes'] / 1e6:.2f} | "
            f"{r['n_closed']}/{r['n_open']} | {r.get('cut_short', '-')} | {_against(r)} |"
        )
    if len(rows) > 1:
        lines += [
            "",
            f"Paired with `{rows[0]['variant']}` question by question: an answer is right when "
            "its answer type's headline metric is full (closed accuracy 1, open recall 1); "
            "McNemar p is the exact two-sided test on the right-to-wrong and wrong-to-right "
            "counts.",
        ]
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Closed accuracy and open recall per variant, as grouped bars (Pillow, no matplotlib)."""
    w, h, pad = 120 + 140 * len(rows), 320, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 10), "PhantomVQA: closed accuracy (blue) / open recall (orange), %", fill="black")
    base = h - pad
    d.line((pad, base, w - pad, base), fill="black")
    for i, r in enumerate(rows):
        x = pad + 20 + i * 140
        for j, (key, color) in enumerate(
            (("closed_accuracy", "#1f77b4"), ("open_recall", "#ff7f0e"))
        ):
            v = r[key] or 0.0
            top = base - int(v * (h - 2 * pad - 20))
            d.rectangle((x + j * 45, top, x + j * 45 + 40, base), fill=color)
            d.text((x + j * 45, top - 12), f"{100 * v:.0f}", fill="black")
        d.text((x, base + 5), str(r["variant"])[:20], fill="black")
    img.save(path)
