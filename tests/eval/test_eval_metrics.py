"""LLaVA-Med metric quirks, the strict variant, and pairing by question id."""

import json
import random
from pathlib import Path

import pytest

from tinyllava_med.eval.metrics import (
    CandidateSet,
    closed_hit,
    exact_match,
    f1_score,
    score,
    score_files,
    strict_match,
)
from tinyllava_med.eval.normalize import normalize_word


def _closed(gt: str, pred: str) -> float:
    return closed_hit(normalize_word(pred.lower()), normalize_word(gt.lower()))


@pytest.mark.parametrize(
    ("gt", "pred", "llava_med", "strict"),
    [
        ("yes", "Yes and no.", 1.0, 0.0),  # hedging is rewarded by LLaVA-Med, not by strict
        ("no", "yes and no", 1.0, 0.0),
        ("no", "Normal", 1.0, 0.0),  # substring: "no" in "normal"
        ("yes", "no", 0.0, 0.0),
        ("Yes", "yes.", 1.0, 1.0),
        ("axial", "Axial", 0.0, 1.0),  # non yes/no answer: no "yes"/"no" in the prediction
        ("axial", "axial, not coronal", 1.0, 0.0),  # ... unless "not" supplies a "no"
        ("no", "There is none", 0.0, 0.0),  # "none" normalises to "0"
    ],
)
def test_closed_accuracy_quirks(gt: str, pred: str, llava_med: float, strict: float) -> None:
    assert _closed(gt, pred) == llava_med
    assert strict_match(pred.lower(), gt.lower()) == strict


def test_open_recall_precision_f1_over_tokens() -> None:
    f1, precision, recall = f1_score("left lung is enlarged", "left lung")
    assert (precision, recall) == (0.5, 1.0)
    assert f1 == pytest.approx(2 / 3)
    # tp counts the prediction's repeats: recall 3/4 though "lung" is missing
    f1, precision, recall = f1_score("left left left", "left lung")
    assert (precision, recall) == (1.0, 0.75)
    assert f1 == pytest.approx(2 * 0.75 / 1.75)


@pytest.mark.parametrize(
    ("pred", "ref"), [("", "left lung"), ("left lung", ""), ("kidney", "lung")]
)
def test_f1_edge_cases_are_zero(pred: str, ref: str) -> None:
    assert f1_score(pred, ref) == (0.0, 0.0, 0.0)


def test_exact_match_is_llava_meds_ratio() -> None:
    assert exact_match("left lung is affected", "left lung") == 0.5
    assert exact_match("lung lung", "lung") == 0.5
    assert exact_match("left left left", "left lung") == pytest.approx(1 / 3)
    assert exact_match("", "lung") == 0.0


def test_candidate_accuracy_takes_first_best_candidate() -> None:
    cands = CandidateSet(["lung", "left lung", 3])
    assert cands.answers == ["lung", "left lung", "3"]
    assert cands.accuracy("left lung", "left lung") == 0.0  # "lung" ties at 1.0 and comes first
    assert cands.accuracy("left lung", "lung") == 1.0
    assert cands.accuracy("kidney", "lung") == 1.0  # no overlap at all: the first candidate
    assert cands.accuracy("three", "3") == 1.0


def _gt(qid, answer, answer_type, question_type=None, key="conversations"):
    entry = {
        "id": qid,
        "image": f"{qid}.jpg",
        key: [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": answer}],
        "answer_type": answer_type,
    }
    if question_type:
        entry["question_type"] = question_type
    return entry


def _pred(qid, text, failed=False):
    meta = {"failed": True, "error": "image unreadable"} if failed else {}
    return {
        "question_id": qid,
        "prompt": "q?",
        "text": text,
        "answer_id": "x",
        "model_id": "m",
        "metadata": meta,
    }


GT = [
    _gt(1, "yes", "CLOSED", "PRES"),
    _gt(2, "no", "CLOSED", "ABN", key="conversatons"),
    _gt(3, "left lung", "OPEN", "POS"),
    _gt(4, "ct", "OPEN", "MODALITY"),
    _gt(5, "axial", "CLOSED", "PLANE"),
]
PREDS = [
    _pred("1", "Yes, there is."),
    _pred("2", "yes and no"),
    _pred("3", "The left lung is enlarged."),
    _pred("4", "CT"),
    _pred("5", "axial"),
]


def _item_scores(report):
    return {i.question_id: i.scores for i in report.items}


def test_score_aggregates_by_answer_and_question_type() -> None:
    report = score(GT, PREDS)
    closed, open_ = report.by_answer_type["CLOSED"], report.by_answer_type["OPEN"]
    assert (closed.n, open_.n) == (3, 2)
    assert closed.metrics["accuracy"] == pytest.approx(2 / 3)  # 1 and 2 hit, 5 misses
    assert closed.metrics["strict_accuracy"] == pytest.approx(1 / 3)  # only "axial"
    assert open_.metrics["recall"] == 1.0
    assert open_.metrics["strict_exact_match"] == 0.5
    assert open_.metrics["exact_match"] == pytest.approx((0.5 + 1.0) / 2)
    assert open_.metrics["open_accuracy"] is None  # no candidate file
    assert report.by_question_type["PLANE"]["CLOSED"].metrics["accuracy"] == 0.0
    assert report.by_question_type["POS"]["OPEN"].n == 1
    assert report.missing == report.extra == report.failed == report.duplicates == []


def test_pairing_is_by_id_and_survives_a_skipped_question() -> None:
    full = _item_scores(score(GT, PREDS))
    shuffled = PREDS[:]
    random.Random(0).shuffle(shuffled)
    assert _item_scores(score(GT, shuffled)) == full
    skipped = score(GT, [p for p in PREDS if p["question_id"] != "2"] + [_pred("99", "yes")])
    assert skipped.missing == ["2"]
    assert skipped.extra == ["99"]
    assert _item_scores(skipped) == {k: v for k, v in full.items() if k != "2"}
    assert skipped.by_answer_type["CLOSED"].n == 2


def test_failed_prediction_counts_as_wrong() -> None:
    preds = [*PREDS[:2], _pred("3", "left lung", failed=True), *PREDS[3:]]
    report = score(GT, preds, candidates=["left lung", "ct"])
    assert report.failed == ["3"]
    assert set(_item_scores(report)["3"].values()) == {0.0}
    assert report.by_answer_type["OPEN"].metrics["open_accuracy"] == 0.5


def test_retry_line_of_a_resumed_file_wins_over_the_failed_one() -> None:
    preds = [_pred("1", "", failed=True), *PREDS]
    report = score(GT, preds)
    assert report.duplicates == []  # a retried failure is not a duplicate answer
    assert report.failed == []
    assert _item_scores(report) == _item_scores(score(GT, PREDS))
    # two answers to one question are: which one counts is a guess
    twice = score(GT, [*PREDS, _pred("1", "something else")])
    assert twice.duplicates == ["1"]


def test_bad_input_is_refused_with_the_id() -> None:
    with pytest.raises(ValueError, match="answer_type 'MAYBE'"):
        score([_gt(7, "x", "MAYBE")], [])
    with pytest.raises(ValueError, match="repeats id '1'"):
        score([GT[0], GT[0]], PREDS)


def test_score_files(tmp_path: Path) -> None:
    gt_path, pred_path, cand_path = (
        tmp_path / "test.json",
        tmp_path / "answers.jsonl",
        tmp_path / "cand.json",
    )
    gt_path.write_text(json.dumps(GT))
    lines = [json.dumps(p) for p in PREDS]
    pred_path.write_text("\n".join([*lines[:2], '{"question_id": "3", "te', *lines[2:]]) + "\n")
    cand_path.write_text(json.dumps({"0": ["left lung", "ct", "mri"]}))
    report = score_files(gt_path, pred_path, cand_path)
    assert report.unreadable_lines == [3]
    assert report.by_answer_type["OPEN"].metrics["open_accuracy"] == 1.0
    assert report.to_dict()["n_scored"] == 5
