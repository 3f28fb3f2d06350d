"""LLaVA-Med's VQA metrics (VQA-RAD / SLAKE / PathVQA), reproduced exactly, plus a strict variant.

Owns the per-question metric functions and `score` / `score_files`, which pair ground truth and
predictions BY QUESTION ID (LLaVA-Med's `run_eval.py` zips the two lists by position after
asserting equal id lists). The result types and their JSON / Markdown live in `report.py`.

Sources (LLaVA-Med v1.0, commit b9a98a7, "fix closed accuracy calculation"):
`llava/eval/run_eval.py::evaluate`, `llava/eval/eval_metrics/evaluate_metrics.py`
(`calculate_exactmatch`, `calculate_f1score`, `calculate_appearance_with_normalization`,
`similarity_candidate_prediction`), `llava/eval/eval_metrics/utils.py::split_sentence`,
`llava/eval/eval_metrics/glossary.py::normalize_word`, and nltk's `sentence_bleu`. Each quirk is
documented on the function that reproduces it.

Pipeline per question, as in `evaluate`: ground truth and prediction are lowercased and passed
through `normalize_word`; the exact-match, F1 and candidate functions normalise them a second
time (a no-op except past 32 periods, see `normalize.py`); BLEU splits the once-normalised text
on whitespace. Values are fractions in [0, 1]; the original prints them times 100.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tinyllava_med.eval.bleu import sentence_bleu
from tinyllava_med.eval.normalize import normalize_word
from tinyllava_med.eval.report import (
    AnswerType,
    ItemScore,
    ScoreReport,
    aggregate,
)

__all__ = [
    "closed_hit",
    "exact_match",
    "f1_score",
    "index_predictions",
    "load_candidates",
    "load_ground_truth",
    "load_predictions",
    "normalize_word",
    "score",
    "score_files",
    "strict_match",
    "substring_hit",
    "CandidateSet",
]

log = logging.getLogger(__name__)

_ANSWER_TYPES: dict[str, AnswerType] = {
    "CLOSED": "CLOSED",
    "YES/NO": "CLOSED",  # PathVQA naming, accepted by run_eval_pvqa.py
    "OPEN": "OPEN",
    "OTHER": "OPEN",
    "NUMBER": "OPEN",
}


def _words(text: str) -> Counter[str]:
    """`split_sentence(text, 1)`: whitespace tokens of the lowercased text, with counts."""
    return Counter(text.lower().split())


def exact_match(prediction: str, reference: str) -> float:
    """LLaVA-Med's "exact match" (`calculate_exactmatch`). NOT an exact match.

    Quirk: the number of *distinct* reference words that occur in the prediction, divided by the
    number of prediction tokens *with repetition*; 0 for an empty prediction. "left lung" vs
    "left lung is affected" scores 2/4; "lung" vs "lung lung" scores 1/2.
    """
    pred, ref = _words(normalize_word(prediction)), _words(normalize_word(reference))
    total = sum(pred.values())
    return sum(1 for w in ref if w in pred) / total if total else 0.0


def f1_score(prediction: str, reference: str) -> tuple[float, float, float]:
    """LLaVA-Med's `calculate_f1score`: (f1, precision, recall) over whitespace tokens.

    Quirks: true positives count the prediction's occurrences of shared words (not the clipped
    minimum), so repeating a right word raises recall: "left lung" vs "left left left" gives
    recall 3/4. All three are 0 when either side is empty or nothing is shared. This recall is
    the "recall" LLaVA-Med reports as open-question accuracy.
    """
    pred, ref = _words(normalize_word(prediction)), _words(normalize_word(reference))
    if not pred or not ref:
        return 0.0, 0.0, 0.0
    tp = sum(c for w, c in pred.items() if w in ref)
    fp = sum(c for w, c in pred.items() if w not in ref)
    fn = sum(c for w, c in ref.items() if w not in pred)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def closed_hit(prediction: str, reference: str) -> float:
    """LLaVA-Med's closed-question ("yes/no accuracy") hit, on normalised strings.

    Quirks of `run_eval.py::evaluate` (after the b9a98a7 fix, which added the missing 0 when
    yes/no is present but the answer is not; before it such questions were silently dropped):
    - a hit needs the *substring* "yes" or "no" somewhere in the prediction ("normal", "nodule",
      "not", "unknown" all contain "no"), and
    - the ground truth as a *substring* of the prediction: "yes and no" is a hit for both
      answers, "no" is hit by "nodule", "yes" by "eyes".
    - A closed question whose answer is not yes/no ("axial", "left lung") scores 0 unless the
      prediction also happens to contain "yes" or "no" ("axial, not coronal" is a hit).
    """
    if "yes" not in prediction and "no" not in prediction:
        return 0.0
    return 1.0 if reference in prediction else 0.0


def substring_hit(prediction: str, reference: str) -> float:
    """`run_eval_batch.py`'s hit for both answer types: ground truth is a substring of the
    prediction (no yes/no condition). Rewards hedging ("yes and no") like `closed_hit`."""
    return 1.0 if reference in prediction else 0.0


def strict_match(prediction: str, reference: str) -> float:
    """Strict variant (ours): the normalised prediction equals the normalised ground truth."""
    return 1.0 if normalize_word(prediction) == normalize_word(reference) else 0.0


class CandidateSet:
    """The `--candidate` answer list, normalised once (`calculate_appearance_with_normalization`).

    Quirks: each candidate's similarity is the number of distinct prediction words found in the
    candidate divided by the candidate's distinct word count (so any candidate fully contained
    in a long prediction scores 1); the FIRST candidate with the highest similarity is the
    prediction, including when every similarity is 0 (then the first candidate in the file);
    it is a hit when that candidate string equals the normalised ground truth. Integer
    candidates are turned into strings, as in the original.
    """

    def __init__(self, answers: Sequence[Any]):
        if not answers:
            raise ValueError("candidate answer list is empty; expected at least one answer")
        self.answers = [normalize_word(str(a)) for a in answers]
        self._words = [_words(a) for a in self.answers]

    def accuracy(self, prediction: str, reference: str) -> float:
        pred_words = _words(normalize_word(prediction))
        best, best_sim = 0, -1.0
        for i, cand in enumerate(self._words):
            sim = sum(1 for w in pred_words if w in cand) / len(cand) if cand else 0.0
            if sim > best_sim:
                best, best_sim = i, sim
        return 1.0 if self.answers[best] == normalize_word(reference) else 0.0


def _score_item(
    pred: str, ref: str, kind: AnswerType, cands: CandidateSet | None
) -> dict[str, float]:
    if kind == "CLOSED":
        return {
            "accuracy": closed_hit(pred, ref),
            "strict_accuracy": strict_match(pred, ref),
            "substring_accuracy": substring_hit(pred, ref),
        }
    f1, precision, recall = f1_score(pred, ref)
    hyp, refs = pred.split(), ref.split()
    out = {
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "exact_match": exact_match(pred, ref),
        "strict_exact_match": strict_match(pred, ref),
        "bleu": sentence_bleu(refs, hyp),
        "bleu_1": sentence_bleu(refs, hyp, (1, 0, 0, 0)),
        "bleu_2": sentence_bleu(refs, hyp, (0, 1, 0, 0)),
        "bleu_3": sentence_bleu(refs, hyp, (0, 0, 1, 0)),
        "substring_accuracy": substring_hit(pred, ref),
    }
    if cands is not None:
        out["open_accuracy"] = cands.accuracy(pred, ref)
    return out


def _answer_type(entry: Mapping[str, Any]) -> AnswerType:
    raw = str(entry.get("answer_type", "")).strip().upper()
    if raw not in _ANSWER_TYPES:
        raise ValueError(
            f"ground-truth entry {entry.get('id')!r}: answer_type {entry.get('answer_type')!r}, "
            f"expected one of OPEN, CLOSED (or PathVQA's yes/no, other, number)"
        )
    return _ANSWER_TYPES[raw]


def _gt_answer(entry: Mapping[str, Any]) -> str:
    """Answer of the first gpt turn (the original reads turn index 1, the same on these files)."""
    turns = entry.get("conversations", entry.get("conversatons"))
    if not isinstance(turns, list):
        raise ValueError(f"ground-truth entry {entry.get('id')!r} has no conversations list")
    for turn in turns:
        if turn.get("from") in ("gpt", "assistant"):
            return str(turn.get("value", ""))
    raise ValueError(f"ground-truth entry {entry.get('id')!r} has no gpt turn")


def index_predictions(
    preds: Iterable[Mapping[str, Any]],
) -> tuple[dict[str, Mapping[str, Any]], list[str]]:
    """Predictions by id. A resumed answer file may repeat an id (a failed line, then the
    retry): the last successful line wins, else the last line. The ids answered more than once
    (two successful lines: which one counts is a guess) are returned; a retried failure is not
    one of them."""
    by_id: dict[str, Mapping[str, Any]] = {}
    answered: Counter[str] = Counter()
    for p in preds:
        if "question_id" not in p:
            raise ValueError(f"prediction without question_id: keys {sorted(p)}")
        qid = str(p["question_id"])
        answered[qid] += not _failed(p)
        if qid not in by_id or not _failed(p) or _failed(by_id[qid]):
            by_id[qid] = p
    return by_id, [q for q, c in answered.items() if c > 1]


def _failed(pred: Mapping[str, Any]) -> bool:
    meta = pred.get("metadata")
    return isinstance(meta, Mapping) and bool(meta.get("failed"))


def _cut(pred: Mapping[str, Any]) -> bool:
    """Whether the answer stopped at its token limit (`eval generate` records why it stopped)."""
    meta = pred.get("metadata")
    return isinstance(meta, Mapping) and meta.get("finish_reason") == "length"


def score(
    gt_entries: Sequence[Mapping[str, Any]],
    pred_entries: Iterable[Mapping[str, Any]],
    candidates: Sequence[Any] | CandidateSet | None = None,
) -> ScoreReport:
    """Score predictions against ground truth, paired by id (gt `id` <-> pred `question_id`,
    compared as strings). Ids only in gt are `missing`, only in predictions `extra`; a prediction
    with `metadata.failed` scores 0 on every metric and is listed in `failed`; one whose answer
    the token limit cut (`metadata.finish_reason` "length") is scored and listed in `cut_short`.
    Averages are over the paired questions. `candidates` enables `open_accuracy`."""
    cands = candidates
    if cands is not None and not isinstance(cands, CandidateSet):
        cands = CandidateSet(cands)
    preds, duplicates = index_predictions(pred_entries)
    items: list[ItemScore] = []
    missing: list[str] = []
    cut_short: list[str] = []
    gt_ids: set[str] = set()
    for entry in gt_entries:
        qid = str(entry.get("id"))
        if qid in gt_ids:
            raise ValueError(f"ground truth repeats id {qid!r}")
        gt_ids.add(qid)
        kind, answer = _answer_type(entry), _gt_answer(entry)
        qtype = entry.get("question_type")
        pred = preds.get(qid)
        if pred is None:
            missing.append(qid)
            continue
        ref_norm = normalize_word(answer.lower())
        pred_norm = normalize_word(str(pred.get("text") or "").lower())
        failed = _failed(pred)
        if _cut(pred) and not failed:
            cut_short.append(qid)
        scores = _score_item(pred_norm, ref_norm, kind, cands)
        if failed:
            scores = dict.fromkeys(scores, 0.0)
        items.append(
            ItemScore(
                qid,
                kind,
                None if qtype is None else str(qtype),
                ref_norm,
                pred_norm,
                failed,
                scores,
            )
        )
    return aggregate(
        items,
        n_gt=len(gt_ids),
        n_pred=len(preds),
        missing=missing,
        extra=[q for q in preds if q not in gt_ids],
        duplicates=duplicates,
        has_candidates=cands is not None,
        cut_short=cut_short,
    )


def load_ground_truth(path: str | Path) -> list[dict[str, Any]]:
    """A LLaVA conversation json (a list of entries), e.g. LLaVA-Med's VQA-RAD `test.json`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a JSON list of conversation entries, got {type(data).__name__}"
        )
    return data


def load_predictions(path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Answer jsonl lines, and the numbers of unreadable lines (a line cut by a crash)."""
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(n)
            continue
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if bad:
        log.warning("%s: %d unreadable line(s), first at line %d", path, len(bad), bad[0])
    return rows, bad


def load_candidates(path: str | Path) -> list[Any]:
    """The `--candidate` file: LLaVA-Med's `{"0": [answers...]}` (the original reads key "0"),
    or a plain JSON list of answers."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    answers = data.get("0") if isinstance(data, dict) else data
    if not isinstance(answers, list):
        raise ValueError(f'{path}: expected {{"0": [answers]}} or a JSON list of answers')
    return answers


def score_files(
    gt_path: str | Path, pred_path: str | Path, candidates_path: str | Path | None = None
) -> ScoreReport:
    """`score` on files: gt conversation json, answers jsonl, optional candidate json."""
    preds, bad_lines = load_predictions(pred_path)
    cands = load_candidates(candidates_path) if candidates_path is not None else None
    report = score(load_ground_truth(gt_path), preds, cands)
    report.unreadable_lines = bad_lines
    report.answered_by = answered_by(preds)
    return report


# what says which model answered, in each answer line's metadata (`eval generate`)
PROVENANCE = ("model", "variant", "quantization", "model_weights", "template", "decoding")


def answered_by(preds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The models that wrote the answers, each with how many it wrote, most first: one, unless
    files of several were put together. A line without our metadata (LLaVA-Med's own answer
    files) says its `model_id` only."""
    seen: dict[str, dict[str, Any]] = {}
    for row in preds:
        meta = row.get("metadata")
        who = (
            {k: meta.get(k) for k in PROVENANCE if k in meta}
            if isinstance(meta, dict)
            else {"model": row.get("model_id")}
        )
        key = json.dumps(who, sort_keys=True, default=str)
        seen.setdefault(key, {**who, "answers": 0})["answers"] += 1
    return sorted(seen.values(), key=lambda w: -w["answers"])
