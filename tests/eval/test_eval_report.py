"""ScoreReport JSON / Markdown and the files `write_report` writes."""

import json
from pathlib import Path

from tinyllava_med.eval.metrics import score
from tinyllava_med.eval.report import CLOSED_METRICS, OPEN_METRICS, write_report


def _gt(qid, answer, answer_type, question_type):
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}]
    return {
        "id": qid,
        "conversations": turns,
        "answer_type": answer_type,
        "question_type": question_type,
    }


GT = [
    _gt("a", "yes", "CLOSED", "PRES"),
    _gt("b", "left lung", "OPEN", "POS"),
    _gt("c", "no", "CLOSED", "ABN"),
]
PREDS = [
    {"question_id": "a", "text": "yes", "metadata": {"finish_reason": "length"}},  # cut, scored
    {"question_id": "b", "text": "left lung", "metadata": {"failed": True}},
    {"question_id": "zz", "text": "no"},
]


def test_to_dict_and_markdown_list_everything(tmp_path: Path) -> None:
    report = score(GT, PREDS)
    data = report.to_dict()
    assert data["missing"] == ["c"] and data["extra"] == ["zz"] and data["failed"] == ["b"]
    assert data["cut_short"] == ["a"]  # the token limit stopped it: a longer one may differ
    assert set(data["by_answer_type"]["CLOSED"]) == {"n", *CLOSED_METRICS}
    assert set(data["by_answer_type"]["OPEN"]) == {"n", *OPEN_METRICS}
    assert data["by_answer_type"]["CLOSED"] == {
        "n": 1,
        "accuracy": 1.0,
        "strict_accuracy": 1.0,
        "substring_accuracy": 1.0,
    }
    assert data["by_question_type"]["POS"]["OPEN"]["recall"] == 0.0
    assert "items" not in data and len(report.to_dict(include_items=True)["items"]) == 2

    md = report.to_markdown()
    assert "## CLOSED (n=1)" in md and "## OPEN (n=1)" in md
    assert "| accuracy (LLaVA-Med yes/no accuracy) | 100.00 |" in md
    assert "| open accuracy (candidate set) | - |" in md
    assert "**missing** (1): c" in md and "**extra** (1): zz" in md and "**failed** (1): b" in md
    assert "**cut_short** (1): a" in md
    assert "| PRES | 1 | 100.00 | 100.00 |" in md

    write_report(report, tmp_path / "out" / "scores.json", tmp_path / "out" / "scores.md")
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == json.loads(
        json.dumps(data)
    )
    assert (tmp_path / "out" / "scores.md").read_text() == md
