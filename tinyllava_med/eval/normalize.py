"""LLaVA-Med's answer normaliser: `normalize_word`, reproduced behaviour for behaviour.

The original is `normalize_word` in LLaVA-Med's `llava/eval/eval_metrics/glossary.py` (itself
adapted from the VQA challenge evaluation script). Its quirks are kept, because the published
VQA-RAD / SLAKE / PathVQA numbers were computed with them:

- Punctuation (`; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`) is *deleted* when that character
  stands next to a space anywhere in the text, or when the text contains a digit-comma-digit
  (`1,000`) anywhere; otherwise it is *replaced by a space*. So `"x-ray"` -> `"x ray"` but
  `"x-ray - chest"` -> `"xray  chest"`, and in `"1,000 cells/mm"` every `/` is deleted too.
  `:` and `'` are not in the list and survive.
- Periods not followed by a digit are deleted (`"e.g."` -> `"eg"`, `"3.5"` kept). The
  original regex is `(?!<=\\d)(\\.)(?!\\d)`: its "lookbehind" is really a negative lookahead for
  the text `<=digit`, which never matches at a period, so it equals `\\.(?!\\d)`. It is called as
  `period_strip.sub("", text, re.UNICODE)`, which passes `re.UNICODE` (32) as the *count*:
  only the first 32 such periods are deleted.
- After lowercasing and splitting on whitespace: number words zero..ten become digits,
  and **"none" becomes "0"**; the articles a / an / the are dropped; the VQA contraction table
  maps e.g. `dont` -> `don't` (its capitalised keys such as `Im` can never match, the text being
  lowercased first, so they are left out here). Remaining commas are removed at the end.
- The original mutates its number table (`manual_map.setdefault(word, word)`); harmless, and
  not reproduced.
"""

from __future__ import annotations

import re

__all__ = ["normalize_word"]

_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<"]
_PUNCT += ["@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_COUNT = int(re.UNICODE)  # the original's accidental `count` argument: 32
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4"}
_NUMBERS |= {"five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}

# The VQA evaluation contraction table, lowercase keys only (see the module docstring).
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've
itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't
notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've
twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't
whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've
wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
"""
_CONTRACTIONS = dict(pair.split("=") for pair in _CONTRACTION_PAIRS.split())


def normalize_word(text: str) -> str:
    """LLaVA-Med's `normalize_word` (glossary.py): same output for every input string."""
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCT:
        # Tested against the *original* text, as in the original.
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=_PERIOD_COUNT)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")
