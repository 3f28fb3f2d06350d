"""A variant's answers against a reference variant's on the same questions (`eval compare`).

Accuracy alone hides how a quantized model differs from the one it was made from: two answers
that turn wrong and two that turn right leave the score where it was. Paired by question, this
counts the answers whose (normalised) text changed, the questions that went from right to wrong
and from wrong to right, and gives McNemar's exact test on those discordant pairs: the chance,
if the variant were no worse and no better than the reference, of a split at least as uneven.

"Right" is each answer type's headline metric at its full value: closed accuracy 1, open recall
1 (every word of the reference answer given). Questions that either side failed or did not
answer are left out of the pairs and counted as `unpaired`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import comb
from typing import Any

from tinyllava_med.eval.report import ItemScore, ScoreReport

HEADLINE = {"CLOSED": "accuracy", "OPEN": "recall"}


@dataclass(frozen=True)
class Paired:
    """How one variant's answers differ from the reference's, question by question."""

    reference: str
    n_paired: int
    unpaired: int
    changed: int  # normalised answer text differs
    right_to_wrong: int
    wrong_to_right: int
    mcnemar_p: float  # exact two-sided; 1.0 when nothing is discordant
    right_to_wrong_ids: list[str]
    wrong_to_right_ids: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for `b` and `c` discordant pairs (a binomial test of
    min(b, c) in b + c trials with p = 1/2, doubled and capped at 1)."""
    if b < 0 or c < 0:
        raise ValueError("counts must be non-negative")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def _right(item: ItemScore) -> bool:
    return item.scores[HEADLINE[item.answer_type]] >= 1.0


def paired(reference: ScoreReport, variant: ScoreReport, reference_name: str) -> Paired:
    """Pair `variant`'s scored answers with `reference`'s by question id."""
    ref = {i.question_id: i for i in reference.items if not i.failed}
    var = {i.question_id: i for i in variant.items if not i.failed}
    both = [q for q in ref if q in var]
    scored = {i.question_id for i in (*reference.items, *variant.items)}
    worse = [q for q in both if _right(ref[q]) and not _right(var[q])]
    better = [q for q in both if not _right(ref[q]) and _right(var[q])]
    return Paired(
        reference=reference_name,
        n_paired=len(both),
        unpaired=len(scored) - len(both),
        changed=sum(ref[q].prediction != var[q].prediction for q in both),
        right_to_wrong=len(worse),
        wrong_to_right=len(better),
        mcnemar_p=mcnemar_exact(len(worse), len(better)),
        right_to_wrong_ids=sorted(worse),
        wrong_to_right_ids=sorted(better),
    )
