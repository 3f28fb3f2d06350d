"""LLaVA-Med's GPT-4 judge protocol: prompt, score parsing and the relative-score summary.

Reproduces LLaVA-Med v1.5 (`llava/eval/eval_multimodal_chat_gpt_score.py`: `INSTRUCT_PROMPT`,
`conv_to_str`, `compare_messages_gen`; `llava/eval/summarize_gpt_review.py`: `get_domain`,
`main`). Quirks kept so scores stay comparable with published ones:

- The system prompt starts with a stray apostrophe: `'You are a helpful and precise ...`.
- The instruction's second and third lines are indented by two spaces (v1.0 used four).
- `Figure Context` is the Python `str()` of the qa50 `in_text_mention` field, which is a list
  of dicts, so the judge sees `[{'tokens': '...', 'entities': [...]}]`.
- The question is the qa50 `text` as is, including its trailing `\\n<image>` (v1.0 cut the
  last 8 characters).
- Assistant 1 is the reference (the qa50 `gpt4_answer`), Assistant 2 the model under test.
- Scores: the reply is stripped, its first line split on single spaces; exactly two values,
  each parsed with `float`. Anything else is malformed (the original crashed on it; here it
  is retried). A zero reference score (a division by zero in the original) and non-finite
  values are malformed too.
- Relative score = mean over questions of (score 2 / score 1) x 100, a mean of ratios, per
  question `type`, per domain and overall. The domain is the FIRST true flag in the order
  chest_xray, mri, histology, gross, ct_scan (8 qa50 questions are both histology and gross:
  they count as histology); a question with no flag has no domain group (the original grouped
  it under `None`, which its table then dropped).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "DOMAINS",
    "INSTRUCT_PROMPT",
    "SYSTEM_PROMPT",
    "MalformedJudgement",
    "build_messages",
    "get_domain",
    "parse_scores",
    "summarize",
]

SYSTEM_PROMPT = "'You are a helpful and precise assistant for checking the quality of the answer."
INSTRUCT_PROMPT = (
    "We would like to request your feedback on the performance of two AI assistants in response"
    " to the user question displayed above. The user asks the question on observing an image."
    " For your reference, the visual content in the image is represented with caption"
    " describing the same image.\n"
    "  Please rate the helpfulness, relevance, accuracy, level of details of their responses."
    " Each assistant receives an overall score on a scale of 1 to 10, where a higher score"
    " indicates better overall performance.\n"
    "  Please first output a single line containing only two values indicating the scores for"
    " Assistant 1 and 2, respectively. The two scores are separated by a space. In the"
    " subsequent line, please provide a comprehensive explanation of your evaluation, avoiding"
    " any potential bias and ensuring that the order in which the responses were presented does"
    " not affect your judgment."
)
ROLE = "Assistant"
DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")


class MalformedJudgement(ValueError):
    """The judge's reply does not start with a line of two scores."""


def build_messages(
    question: Mapping[str, Any], reference: str, answer: str
) -> list[dict[str, str]]:
    """System + user message for one qa50 question (`compare_messages_gen`)."""
    content = (
        f"[Context]\n"
        f"Figure Caption:\n{question.get('fig_label', '')}: {question.get('fig_caption', '')}\n\n"
        f"Figure Context:\n\t- {question.get('in_text_mention', '')}\n\n"
        f"[Question]\n{question.get('text', '')}\n\n"
        f"[{ROLE} 1]\n{reference}\n\n[End of {ROLE} 1]\n\n"
        f"[{ROLE} 2]\n{answer}\n\n[End of {ROLE} 2]\n\n"
        f"[System]\n{INSTRUCT_PROMPT}\n\n"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def parse_scores(reply: str) -> tuple[float, float]:
    """(reference score, answer score) from the reply's first line, as the original parses it."""
    parts = reply.strip().split("\n")[0].split(" ")
    if len(parts) != 2:
        raise MalformedJudgement(f"first line has {len(parts)} space-separated values, expected 2")
    try:
        s1, s2 = float(parts[0]), float(parts[1])
    except ValueError as e:
        raise MalformedJudgement(f"scores are not numbers: {parts!r}") from e
    if not (math.isfinite(s1) and math.isfinite(s2)) or s1 == 0:
        raise MalformedJudgement(f"scores must be finite and the first non-zero, got {parts!r}")
    return s1, s2


def get_domain(question: Mapping[str, Any]) -> str | None:
    """First true domain flag in LLaVA-Med's order, or None."""
    flags = question.get("domain") or {}
    return next((d for d in DOMAINS if flags.get(d)), None)


def _stats(pairs: list[tuple[float, float]]) -> dict[str, float | int]:
    n = len(pairs)
    return {
        "reference_score": sum(s1 for s1, _ in pairs) / n,
        "pred_score": sum(s2 for _, s2 in pairs) / n,
        "pred_relative_score": sum(s2 / s1 for s1, s2 in pairs) / n * 100,
        "data_size": n,
    }


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Scores by question type, by domain and overall, over rows that carry `scores`.

    `reference_score` is the original's `gpt4_score` (Assistant 1)."""
    by_type: dict[str, list[tuple[float, float]]] = {}
    by_domain: dict[str, list[tuple[float, float]]] = {d: [] for d in DOMAINS}
    overall: list[tuple[float, float]] = []
    for row in rows:
        if row.get("scores") is None:
            continue
        pair = (float(row["scores"][0]), float(row["scores"][1]))
        overall.append(pair)
        if row.get("type") is not None:
            by_type.setdefault(str(row["type"]), []).append(pair)
        domain = get_domain(row)
        if domain is not None:
            by_domain[domain].append(pair)
    return {
        "by_type": {t: _stats(p) for t, p in by_type.items()},
        "by_domain": {d: _stats(p) for d, p in by_domain.items() if p},
        "overall": _stats(overall) if overall else None,
    }
