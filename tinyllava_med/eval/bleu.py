"""Sentence BLEU computed exactly as nltk's `sentence_bleu` (nltk 3.6-3.9) with no smoothing.

LLaVA-Med's `run_eval.py` calls `nltk.translate.bleu_score.sentence_bleu` with one reference
and the default `smoothing_function=None`, which nltk turns into `SmoothingFunction().method0`:

- modified n-gram precision p_n = clipped matches / max(1, hypothesis n-grams);
- if there is no unigram match at all the score is exactly 0;
- otherwise every p_n with zero matches is replaced by `sys.float_info.min` (a warning in
  nltk), so `log(p_n)` is about -708 and any n-gram order with a non-zero weight and no match
  drives the score to a denormal-small positive number (~1e-308), not to 0. An n-gram order with
  zero weight contributes `0 * log(p_n) = 0`. So the default 4-gram BLEU of a one- to
  three-word answer is ~0 even when it is exactly right (`min ** 0.75` ~ 1e-231 for one word);
- brevity penalty: 1 if the hypothesis is longer than the reference, else exp(1 - r / c);
- score = BP * exp(fsum(w_n * log(p_n))).

LLaVA-Med's "bleu_score_1/2/3" use weights (1,0,0,0), (0,1,0,0), (0,0,1,0): each is the
*individual* n-gram precision times BP, not the cumulative BLEU-n.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Sequence

__all__ = ["DEFAULT_WEIGHTS", "sentence_bleu"]

DEFAULT_WEIGHTS = (0.25, 0.25, 0.25, 0.25)


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _modified_precision(
    reference: Sequence[str], hypothesis: Sequence[str], n: int
) -> tuple[int, int]:
    counts = _ngrams(hypothesis, n)
    ref_counts = _ngrams(reference, n)
    numerator = sum(min(c, ref_counts[g]) for g, c in counts.items())
    return numerator, max(1, sum(counts.values()))


def sentence_bleu(
    reference: Sequence[str], hypothesis: Sequence[str], weights: Sequence[float] = DEFAULT_WEIGHTS
) -> float:
    """nltk `sentence_bleu([reference], hypothesis, weights)` for one reference, no smoothing."""
    precisions = [_modified_precision(reference, hypothesis, n) for n in range(1, len(weights) + 1)]
    c, r = len(hypothesis), len(reference)
    bp = 1.0 if c > r else (0.0 if c == 0 else math.exp(1 - r / c))
    if precisions[0][0] == 0:
        return 0.0
    p_n = [num / den if num != 0 else sys.float_info.min for num, den in precisions]
    return bp * math.exp(math.fsum(w * math.log(p) for w, p in zip(weights, p_n, strict=True)))
