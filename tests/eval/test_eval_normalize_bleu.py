"""LLaVA-Med's `normalize_word` quirks and nltk-equivalent BLEU, against hand-computed values."""

import math
import sys

import pytest

from tinyllava_med.eval.bleu import sentence_bleu
from tinyllava_med.eval.normalize import normalize_word

MIN = sys.float_info.min


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The X-ray.", "x ray"),  # article dropped, '-' replaced by a space, final period deleted
        ("x-ray - chest", "xray chest"),  # '-' next to a space somewhere: every '-' deleted
        ("1,000 cells/mm", "1000 cellsmm"),  # digit-comma-digit: every punctuation mark deleted
        ("None", "0"),  # "none" is a number word
        ("two nodules", "2 nodules"),
        ("dont know", "don't know"),  # contraction table
        ("e.g. 3.5 cm.", "eg 3.5 cm"),  # periods before a digit kept
        ("answer: yes", "answer: yes"),  # ':' is not in the punctuation list
        ("Yes and no!", "yes and no"),
        ("", ""),
    ],
)
def test_normalize_word(text: str, expected: str) -> None:
    assert normalize_word(text) == expected


def test_normalize_deletes_only_32_periods() -> None:
    # The original passes re.UNICODE (32) as re.sub's count.
    assert normalize_word("." * 40 + "a") == "." * 8 + "a"


def test_bleu_hand_computed_short_hypothesis() -> None:
    ref, hyp = ["tumor", "is", "in", "left", "lung"], ["tumor", "in", "left", "lung"]
    bp = math.exp(1 - 5 / 4)
    assert sentence_bleu(ref, hyp, (1, 0, 0, 0)) == pytest.approx(bp * 1.0, rel=1e-12)
    assert sentence_bleu(ref, hyp, (0, 1, 0, 0)) == pytest.approx(bp * 2 / 3, rel=1e-12)
    assert sentence_bleu(ref, hyp, (0, 0, 1, 0)) == pytest.approx(bp * 1 / 2, rel=1e-12)
    # No 4-gram match: nltk's method0 puts sys.float_info.min in its place.
    expected = bp * (1.0 * (2 / 3) * (1 / 2) * MIN) ** 0.25
    assert sentence_bleu(ref, hyp) == pytest.approx(expected, rel=1e-9)
    assert 0 < sentence_bleu(ref, hyp) < 1e-70


def test_bleu_longer_hypothesis_has_no_penalty_and_clips_counts() -> None:
    ref, hyp = ["left", "lung"], ["left", "lung", "left"]
    assert sentence_bleu(ref, hyp, (1, 0, 0, 0)) == pytest.approx(2 / 3, rel=1e-12)
    assert sentence_bleu(ref, hyp, (0, 1, 0, 0)) == pytest.approx(1 / 2, rel=1e-12)
    assert sentence_bleu(ref, hyp, (0, 0, 1, 0)) == pytest.approx(MIN, rel=1e-9)


def test_bleu_exact_one_word_answer_is_almost_zero() -> None:
    assert sentence_bleu(["lung"], ["lung"], (1, 0, 0, 0)) == 1.0
    assert sentence_bleu(["lung"], ["lung"]) == pytest.approx(MIN**0.75, rel=1e-9)


def test_bleu_brevity_penalty_only_when_not_longer() -> None:
    ref, hyp = ["left", "lower", "lobe"], ["left", "lobe"]
    assert sentence_bleu(ref, hyp, (1, 0, 0, 0)) == pytest.approx(math.exp(-0.5), rel=1e-12)


@pytest.mark.parametrize(
    ("ref", "hyp"), [("left lung", "right kidney"), ("left lung", ""), ("", "lung")]
)
def test_bleu_no_unigram_match_is_exactly_zero(ref: str, hyp: str) -> None:
    for w in [(0.25,) * 4, (1, 0, 0, 0), (0, 1, 0, 0)]:
        assert sentence_bleu(ref.split(), hyp.split(), w) == 0.0
