"""`eval.paired`: a variant's answers against the reference's, question by question."""

from __future__ import annotations

import pytest

from tinyllava_med.eval.metrics import score
from tinyllava_med.eval.paired import mcnemar_exact, paired


def _gt(qid: str, kind: str, answer: str) -> dict:
    return {
        "id": qid,
        "answer_type": kind,
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}],
    }


def _pred(qid: str, text: str, failed: bool = False) -> dict:
    return {"question_id": qid, "text": text, "metadata": {"failed": failed}}


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 0, 1.0),
        (3, 3, 1.0),
        (0, 5, 2 / 32),  # one split as uneven as all five one way, either way
        (9, 1, 22 / 1024),  # (C(10,0) + C(10,1)) / 2^10, doubled
        (1, 3, 10 / 16),
    ],
)
def test_mcnemar_exact_matches_the_binomial_tail(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p)
    assert mcnemar_exact(c, b) == pytest.approx(p)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_paired_counts_changes_and_each_direction():
    gt = [
        _gt("a", "CLOSED", "yes"),
        _gt("b", "CLOSED", "no"),
        _gt("c", "OPEN", "left kidney"),
        _gt("d", "OPEN", "liver"),
        _gt("e", "OPEN", "two"),
        _gt("f", "CLOSED", "yes"),
        _gt("g", "OPEN", "spleen"),
    ]
    ref = [
        _pred("a", "Yes"),
        _pred("b", "yes"),  # wrong
        _pred("c", "left kidney"),
        _pred("d", "the liver"),  # recall 1: right (the article is normalised away)
        _pred("e", "one"),
        _pred("f", "yes"),
        _pred("g", "spleen"),
    ]
    var = [
        _pred("a", "yes."),  # same after normalising: not a change
        _pred("b", "no"),  # wrong -> right
        _pred("c", "kidney"),  # recall 1/2: right -> wrong
        _pred("d", "liver lobe"),  # changed, still right
        _pred("e", "three"),  # changed, wrong both times
        _pred("f", "", failed=True),  # failed: not paired
        # g: not answered: not paired
    ]
    p = paired(score(gt, ref), score(gt, var), "fp32")
    assert p.reference == "fp32"
    assert p.n_paired == 5 and p.unpaired == 2
    assert p.changed == 4
    assert (p.right_to_wrong, p.wrong_to_right) == (1, 1)
    assert p.right_to_wrong_ids == ["c"] and p.wrong_to_right_ids == ["b"]
    assert p.mcnemar_p == 1.0


def test_paired_with_itself_changes_nothing():
    gt = [_gt(str(i), "CLOSED", "yes") for i in range(4)]
    preds = [_pred(str(i), "yes" if i % 2 else "no") for i in range(4)]
    p = paired(score(gt, preds), score(gt, preds), "ref")
    assert (p.n_paired, p.changed, p.right_to_wrong, p.wrong_to_right) == (4, 0, 0, 0)
    assert p.mcnemar_p == 1.0
