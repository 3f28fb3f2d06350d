"""The output check of `quantize --method cpu-int8`: may the vision tower and `lm_head` be int8?

The default skip list keeps the tower, the projector and `lm_head` in fp32. Int8 for the tower
and `lm_head` as well makes a CPU model about 1.5x faster end to end at the TinyLLaVA-1.5B shape
(bench/results/quant_speed_cpu.md), but whether a tower survives int8 depends on its weights and
activations, which only the checkpoint being quantized can tell. So `quantize` measures it there:

- calibration prompts (an image and a question each: PhantomVQA phantoms by default, or the
  site's own question file) go through the fp32 model, whose greedy answers and their logits
  are the reference;
- each later model is scored on the same sequences, teacher forced: at how many prompts every
  answer token is still the argmax (that prompt's greedy answer is unchanged), and the worst
  answer position's centred logit cosine against fp32;
- a module joins the int8 set only if no prompt whose answer the recipe so far kept changes
  (its first `ANSWER_TOKENS` tokens, or up to the end of sequence), and the worst cosine stays at
  or above `MIN_COSINE`; otherwise its own fp32 linears are put back (the same objects: a tied
  `lm_head` stays tied). A tied `lm_head` is not tried: int8 beside the fp32 embedding it shares
  would add memory, not save it.

What it can say is limited: 8 prompts that all keep their answers still allow a module that
changes up to 31% of answers (95% bound), so it catches a tower that int8 breaks, not a small
loss; `--check-prompts` buys more. When the default recipe itself changes answers, the report
says so (`default_ok`) and `quantize` warns. Random weights fail it (their answers are ties among
near-equal logits), as they should.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tinyllava_med.model.generate import eos_token_ids, prepare_image
from tinyllava_med.model.load import LoadedModel
from tinyllava_med.model.processor import batch_inputs
from tinyllava_med.model.prompts import build_prompt

# Optional int8 modules, tried in this order, each on top of what was accepted before.
OPTIONAL_INT8: tuple[str, ...] = ("model.vision_tower", "lm_head")
# Working int8 scored above 0.999 on the trained tiny models here (vocabularies of 400 and 629),
# a scrambled projector about 0.8; real vocabularies (32k) were not available to calibrate on.
MIN_COSINE = 0.99
CHECK_SEED = 20261128  # not a seed the demo model trains or is scored on
CHECK_FILE = "quantize_check.json"
ANSWER_TOKENS = 8  # the reference answers' length at most
CHUNK = 8  # prompts per forward pass: memory stays that of 8 prompts whatever --check-prompts
_QUESTION_TYPES = ("finding", "organ", "modality", "presence", "abnormal", "side", "count")


@dataclass(frozen=True)
class Prompt:
    image: Image.Image
    question: str


@dataclass(frozen=True)
class Score:
    """One model against the fp32 reference on the calibration prompts."""

    int8_extra: list[str]  # optional modules in int8 in the model scored
    answers_kept: list[bool]  # per prompt: every answer token still the argmax
    min_cosine: float
    accepted: bool | None = None  # None: the default recipe, which is not up for a vote

    @property
    def kept(self) -> int:
        return sum(self.answers_kept)


@dataclass
class CheckReport:
    prompts: str
    n_prompts: int
    min_cosine_required: float
    scores: list[Score] = field(default_factory=list)

    @property
    def default_ok(self) -> bool:
        """Whether the default recipe itself kept every answer, above `MIN_COSINE`."""
        first = self.scores[0]
        return first.kept == len(first.answers_kept) and first.min_cosine >= MIN_COSINE

    @property
    def int8_extra(self) -> list[str]:
        accepted = [s for s in self.scores if s.accepted]
        return accepted[-1].int8_extra if accepted else []

    def summary(self) -> str:
        parts = []
        for s in self.scores:
            what = "default" if s.accepted is None else "+" + s.int8_extra[-1]
            verdict = "" if s.accepted is None else (" kept" if s.accepted else " refused")
            parts.append(
                f"{what}: {s.kept}/{len(s.answers_kept)} answers as fp32, worst cosine "
                f"{s.min_cosine:.4f}{verdict}"
            )
        return f"output check on {self.n_prompts} {self.prompts} prompts: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for s, d in zip(self.scores, out["scores"], strict=True):
            d["kept"] = s.kept
        out["int8_extra"] = self.int8_extra
        out["default_ok"] = self.default_ok
        out["summary"] = self.summary()
        return out


def phantom_prompts(n: int = 8, seed: int = CHECK_SEED, image_size: int = 128) -> list[Prompt]:
    """`n` PhantomVQA phantoms of `seed`, one question each, the question types taken in turn."""
    from tinyllava_med.training.phantom import image_rng, make_questions, render_case, sample_case

    out = []
    for i in range(n):
        rng = image_rng(seed, i)
        case = sample_case(rng, i)
        pixels, _ = render_case(case, image_size)
        questions = {q.question_type: q for q in make_questions(case, rng)}
        wanted = [t for t in _QUESTION_TYPES[i % len(_QUESTION_TYPES) :] if t in questions]
        question = questions[(wanted or list(questions))[0]].question
        out.append(Prompt(Image.fromarray(pixels).convert("RGB"), question))
    return out


def file_prompts(questions: str | Path, images: str | Path, n: int) -> list[Prompt]:
    """`n` questions of a VQA question file (the formats `eval` reads), spread evenly over it.
    Images are read as the server reads them (DICOM, 16-bit PNG, the same pixel limits)."""
    from tinyllava_med.eval.generate import read_questions
    from tinyllava_med.imaging import ImagingError, load_image_file

    try:
        listed = read_questions(questions)
    except (KeyError, StopIteration, json.JSONDecodeError) as e:
        raise ValueError(f"{questions} is not a question file eval reads ({e!r})") from e
    if not listed:
        raise ValueError(f"{questions} holds no questions")
    picked = [listed[i] for i in np.unique(np.linspace(0, len(listed) - 1, n).round().astype(int))]
    out = []
    for q in picked:
        try:
            image = load_image_file(Path(images) / q.image)
        except ImagingError as e:
            raise ValueError(f"{q.image}: {e}") from e
        out.append(Prompt(image, q.text))
    return out


def _centred_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per position, the cosine of two logit rows after removing each row's mean (softmax
    ignores a shift; a raw cosine is dominated by the shared floor of unlikely tokens)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


class Reference:
    """The fp32 model's greedy answers to the prompts, and its logits at every answer token
    (`CHUNK` prompts per pass)."""

    def __init__(self, lm: LoadedModel, prompts: Sequence[Prompt]):
        self.lm = lm
        eos_ids = eos_token_ids(lm)
        self.prompt_ids: list[list[int]] = []
        self.pixels: list[torch.Tensor] = []
        self.answers: list[list[int]] = []
        self.logits: list[torch.Tensor] = []
        for start in range(0, len(prompts), CHUNK):
            chunk = prompts[start : start + CHUNK]
            pixels = [prepare_image(lm, p.image) for p in chunk]
            texts = [build_prompt(lm.template, p.question) for p in chunk]
            inputs = batch_inputs(lm.processor, texts, pixels)
            inputs["pixel_values"] = inputs["pixel_values"].to(lm.model.dtype)
            with torch.inference_mode():
                out = lm.model.generate(
                    **inputs,
                    max_new_tokens=ANSWER_TOKENS,
                    do_sample=False,
                    return_dict_in_generate=True,
                    output_logits=True,
                )
            steps = torch.stack(out.logits, dim=1).float()  # [rows, steps, vocab]
            new = out.sequences[:, inputs["input_ids"].shape[1] :]
            for row, ids in enumerate(new.tolist()):
                ends = [i for i, t in enumerate(ids) if t in eos_ids]
                length = ends[0] + 1 if ends else len(ids)
                self.answers.append(ids[:length])
                self.logits.append(steps[row, :length])
                mask = inputs["attention_mask"][row].bool()
                self.prompt_ids.append(inputs["input_ids"][row][mask].tolist())
                self.pixels.append(inputs["pixel_values"][row])

    def score(self, model: Any, int8_extra: list[str]) -> Score:
        """`model` on the reference's own sequences (prompt + fp32 answer), teacher forced."""
        kept: list[bool] = []
        cosines: list[float] = []
        for got, ref, answer in self.forced(model):
            kept.append(got.argmax(-1).tolist() == answer)
            cosines.append(_centred_cosines(got, ref).min().item())
        return Score(list(int8_extra), kept, float(np.min(cosines)))

    def forced(self, model: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        """Per prompt: `model`'s logits at each token of the fp32 answer (teacher forced), the
        fp32 model's there, and the answer."""
        pad = self.lm.processor.tokenizer.pad_token_id
        pad = pad if pad is not None else 0  # masked out: any id does
        for start in range(0, len(self.answers), CHUNK):
            answers = self.answers[start : start + CHUNK]
            prompts = self.prompt_ids[start : start + CHUNK]
            rows = [p + a for p, a in zip(prompts, answers, strict=True)]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            longest = max(len(a) for a in answers)
            with torch.inference_mode():
                logits = model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    pixel_values=torch.stack(self.pixels[start : start + CHUNK]),
                    logits_to_keep=longest + 1,
                    use_cache=False,
                ).logits.float()
            for row, answer in enumerate(answers):
                # the position before each answer token predicts it; the last position predicts
                # nothing that was generated
                yield logits[row, longest - len(answer) : longest], self.logits[start + row], answer


def accepts(trial: Score, before: Score) -> bool:
    """No answer the model before kept is changed, and no answer position drifts too far."""
    lost = any(b and not t for b, t in zip(before.answers_kept, trial.answers_kept, strict=True))
    return not lost and trial.min_cosine >= MIN_COSINE


def _tied_head(model: Any) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def quantize_checked(
    lm: LoadedModel, skip: Sequence[str], prompts: Sequence[Prompt], prompts_name: str
) -> tuple[list[str], CheckReport]:
    """Quantize fp32 `lm.model` to cpu-int8 in place: the `skip` list, then each optional module
    that passes the check. Returns the final skip list and the scores."""
    from tinyllava_med.quantize.cpu_int8 import quantize_cpu_int8
    from tinyllava_med.quantize.skip import quantizable_linears

    reference = Reference(lm, prompts)
    report = CheckReport(prompts_name, len(prompts), MIN_COSINE)
    skip = list(skip)
    quantize_cpu_int8(lm.model, skip)
    before = reference.score(lm.model, [])
    report.scores.append(before)
    extra: list[str] = []
    present = {name for name, _ in lm.model.named_modules()}
    for module in OPTIONAL_INT8:
        if module not in skip or module not in present:
            continue
        if module == "lm_head" and _tied_head(lm.model):
            continue
        trial_skip = [s for s in skip if s != module]
        originals = {
            n: lm.model.get_submodule(n) for n in quantizable_linears(lm.model, trial_skip)
        }
        quantize_cpu_int8(lm.model, trial_skip)
        trial = reference.score(lm.model, [*extra, module])
        trial = replace(trial, accepted=accepts(trial, before))
        if trial.accepted:
            skip, extra, before = trial_skip, [*extra, module], trial
        else:
            for name, linear in originals.items():  # the same objects (and tied weights) back
                del linear.qconfig
                lm.model.set_submodule(name, linear)
        report.scores.append(trial)
    lm.model.cpu_int8_skip_modules = skip
    return skip, report
