"""Score results: per-question and aggregated types, their JSON / Markdown, and the files.

`metrics.score` fills a `ScoreReport`; `write_report` writes it as JSON and Markdown (one table
per answer type, then per question type when the ground truth has `question_type`). Metric values
are fractions in [0, 1] in JSON and percentages in Markdown, like LLaVA-Med's printed table.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "CLOSED_METRICS",
    "OPEN_METRICS",
    "AnswerType",
    "GroupScores",
    "ItemScore",
    "ScoreReport",
    "aggregate",
    "write_json",
    "write_report",
]

AnswerType = Literal["OPEN", "CLOSED"]

# name -> label; the first of each is LLaVA-Med's headline metric for that answer type.
CLOSED_METRICS = {
    "accuracy": "accuracy (LLaVA-Med yes/no accuracy)",
    "strict_accuracy": "strict accuracy (normalised exact match)",
    "substring_accuracy": "substring hit (run_eval_batch.py)",
}
OPEN_METRICS = {
    "recall": "recall (LLaVA-Med open metric)",
    "precision": "precision",
    "f1": "F1",
    "exact_match": "exact match (LLaVA-Med definition)",
    "strict_exact_match": "strict exact match (normalised)",
    "bleu": "BLEU (default 4-gram)",
    "bleu_1": "BLEU-1 (unigram precision x BP)",
    "bleu_2": "BLEU-2 (bigram precision x BP)",
    "bleu_3": "BLEU-3 (trigram precision x BP)",
    "substring_accuracy": "substring hit (run_eval_batch.py)",
    "open_accuracy": "open accuracy (candidate set)",
}
_METRICS: dict[AnswerType, dict[str, str]] = {"CLOSED": CLOSED_METRICS, "OPEN": OPEN_METRICS}


@dataclass(frozen=True)
class ItemScore:
    """One paired question: normalised texts and its metric values."""

    question_id: str
    answer_type: AnswerType
    question_type: str | None
    reference: str
    prediction: str
    failed: bool
    scores: dict[str, float]


@dataclass(frozen=True)
class GroupScores:
    """Means over `n` questions of one answer type; None where a metric has no value
    (no questions, or `open_accuracy` without a candidate file)."""

    n: int
    metrics: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, **self.metrics}


def _group(items: list[ItemScore], kind: AnswerType, has_candidates: bool) -> GroupScores:
    rows = [i for i in items if i.answer_type == kind]
    names = [m for m in _METRICS[kind] if m != "open_accuracy" or has_candidates]
    means: dict[str, float | None] = dict.fromkeys(_METRICS[kind])
    for m in names:
        means[m] = sum(r.scores[m] for r in rows) / len(rows) if rows else None
    return GroupScores(len(rows), means)


@dataclass
class ScoreReport:
    """What `metrics.score` found: per answer type, per question type, and every id that was
    not scored normally (`missing`, `extra`, `failed`, `duplicates`, `unreadable_lines`), or
    whose answer the token limit cut (`cut_short`: scored as cut, but a longer limit may score
    it differently)."""

    by_answer_type: dict[AnswerType, GroupScores]
    by_question_type: dict[str, dict[AnswerType, GroupScores]]
    n_gt: int
    n_pred: int
    missing: list[str]
    extra: list[str]
    failed: list[str]
    duplicates: list[str]
    has_candidates: bool
    items: list[ItemScore] = field(default_factory=list, repr=False)
    unreadable_lines: list[int] = field(default_factory=list)
    cut_short: list[str] = field(default_factory=list)
    answered_by: list[dict[str, Any]] = field(default_factory=list)  # `metrics.answered_by`

    def to_dict(self, include_items: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scale": "fraction",
            "n_gt": self.n_gt,
            "n_pred": self.n_pred,
            "n_scored": len(self.items),
            "by_answer_type": {k: g.to_dict() for k, g in self.by_answer_type.items()},
            "by_question_type": {
                q: {k: g.to_dict() for k, g in groups.items()}
                for q, groups in self.by_question_type.items()
            },
            "missing": self.missing,
            "extra": self.extra,
            "failed": self.failed,
            "duplicates": self.duplicates,
            "unreadable_lines": self.unreadable_lines,
            "cut_short": self.cut_short,
            "answered_by": self.answered_by,
        }
        if include_items:
            out["items"] = [asdict(i) for i in self.items]
        return out

    def to_markdown(self) -> str:
        lines = [
            "# VQA scores",
            "",
            f"Scored {len(self.items)} of {self.n_gt} ground-truth questions ({self.n_pred} predictions).",
        ]
        if len(self.answered_by) > 1:
            lines.append(f"- **answers of {len(self.answered_by)} models are mixed**:")
        lines += [f"- answered by {_who(w)}" for w in self.answered_by]
        for name in ("missing", "extra", "failed", "duplicates", "unreadable_lines", "cut_short"):
            ids = getattr(self, name)
            if ids:
                shown = ", ".join(str(i) for i in ids[:20]) + (" ..." if len(ids) > 20 else "")
                lines.append(f"- **{name}** ({len(ids)}): {shown}")
        for kind, group in self.by_answer_type.items():
            lines += ["", f"## {kind} (n={group.n})", "", "| metric | % |", "| --- | ---: |"]
            lines += [f"| {_METRICS[kind][m]} | {_pct(v)} |" for m, v in group.metrics.items()]
        if self.by_question_type:
            lines += _question_type_tables(self.by_question_type)
        return "\n".join(lines) + "\n"


def _who(w: dict[str, Any]) -> str:
    """One model of `answered_by`: `demo (variant demo, cpu-int8, weights sha256:7acec375...,
    template v1): 41 answers`."""
    details = [f"variant {w['variant']}" if w.get("variant") else ""]
    details.append(str(w.get("quantization") or ""))
    weights = str(w.get("model_weights") or "")
    details.append(f"weights {weights[:15]}..." if weights else "")
    details.append(f"template {w['template']}" if w.get("template") else "")
    shown = ", ".join(d for d in details if d)
    return f"{w.get('model')}" + (f" ({shown})" if shown else "") + f": {w['answers']} answers"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _question_type_tables(by_qtype: dict[str, dict[AnswerType, GroupScores]]) -> list[str]:
    lines: list[str] = []
    for kind in ("CLOSED", "OPEN"):
        cols = (
            ["accuracy", "strict_accuracy"]
            if kind == "CLOSED"
            else ["recall", "f1", "strict_exact_match"]
        )
        header = " | ".join(_METRICS[kind][c] for c in cols)
        lines += ["", f"## {kind} by question type", "", f"| question type | n | {header} |"]
        lines.append("| --- | ---: |" + " ---: |" * len(cols))
        for qtype, groups in sorted(by_qtype.items()):
            g = groups[kind]
            if g.n:
                lines.append(
                    f"| {qtype} | {g.n} | " + " | ".join(_pct(g.metrics[c]) for c in cols) + " |"
                )
    return lines


def aggregate(
    items: list[ItemScore],
    *,
    n_gt: int,
    n_pred: int,
    missing: list[str],
    extra: list[str],
    duplicates: list[str],
    has_candidates: bool,
    cut_short: list[str] | None = None,
) -> ScoreReport:
    """Build the report from per-question scores."""
    kinds: tuple[AnswerType, AnswerType] = ("CLOSED", "OPEN")
    qtypes = sorted({i.question_type for i in items if i.question_type is not None})
    by_qtype = {
        q: {k: _group([i for i in items if i.question_type == q], k, has_candidates) for k in kinds}
        for q in qtypes
    }
    return ScoreReport(
        by_answer_type={k: _group(items, k, has_candidates) for k in kinds},
        by_question_type=by_qtype,
        n_gt=n_gt,
        n_pred=n_pred,
        missing=missing,
        extra=extra,
        failed=[i.question_id for i in items if i.failed],
        duplicates=duplicates,
        has_candidates=has_candidates,
        items=items,
        cut_short=cut_short or [],
    )


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (a temporary file, then rename), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    report: ScoreReport,
    json_path: str | Path | None = None,
    markdown_path: str | Path | None = None,
    *,
    include_items: bool = False,
) -> None:
    """Write `report.to_dict()` to `json_path` and `report.to_markdown()` to `markdown_path`."""
    if json_path is not None:
        write_json(json_path, report.to_dict(include_items=include_items))
    if markdown_path is not None:
        md = Path(markdown_path)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(report.to_markdown(), encoding="utf-8")
