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
- a module joins the int8 set only if no prompt's answer changes that the default recipe kept,
  and the worst cosine stays at or above `MIN_COSINE`; otherwise its fp32 weights are put back.

Random weights fail it (their answers are ties among near-equal logits), as they should.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tinyllava_med.model.generate import prepare_image
from tinyllava_med.model.load import LoadedModel
from tinyllava_med.model.processor import batch_inputs
from tinyllava_med.model.prompts import build_prompt

# Optional int8 modules, tried in this order, each on top of what was accepted before.
OPTIONAL_INT8: tuple[str, ...] = ("model.vision_tower", "lm_head")
# Working int8 scores above 0.999 on trained models; a scrambled projector scores about 0.8.
MIN_COSINE = 0.99
CHECK_SEED = 20261128  # not a seed the demo model trains or is scored on
CHECK_FILE = "quantize_check.json"
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
    """The first `n` questions of a VQA question file (the formats `eval` reads)."""
    from tinyllava_med.eval.generate import read_questions

    out = []
    for q in read_questions(questions)[:n]:
        with Image.open(Path(images) / q.image) as im:
            out.append(Prompt(im.convert("RGB"), q.text))
    if not out:
        raise ValueError(f"{questions} holds no questions")
    return out


def _centred_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per position, the cosine of two logit rows after removing each row's mean (softmax
    ignores a shift; a raw cosine is dominated by the shared floor of unlikely tokens)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


class Reference:
    """The fp32 model's greedy answers to the prompts, and its logits at every answer token."""

    def __init__(self, lm: LoadedModel, prompts: Sequence[Prompt], max_new_tokens: int = 8):
        self.lm = lm
        pixels = [prepare_image(lm, p.image) for p in prompts]
        texts = [build_prompt(lm.template, p.question) for p in prompts]
        inputs = batch_inputs(lm.processor, texts, pixels)
        inputs["pixel_values"] = inputs["pixel_values"].to(lm.model.dtype)
        eos = lm.model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        with torch.inference_mode():
            out = lm.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
        steps = torch.stack(out.logits, dim=1).float()  # [rows, steps, vocab]
        new = out.sequences[:, inputs["input_ids"].shape[1] :]
        self.answers: list[list[int]] = []
        self.logits: list[torch.Tensor] = []
        for row, ids in enumerate(new.tolist()):
            ends = [i for i, t in enumerate(ids) if t in eos_ids]
            length = ends[0] + 1 if ends else len(ids)
            self.answers.append(ids[:length])
            self.logits.append(steps[row, :length])
        self.prompt_ids = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
        ]
        self.pixel_values = inputs["pixel_values"]

    def score(self, model: Any, int8_extra: list[str]) -> Score:
        """`model` on the reference's own sequences (prompt + fp32 answer), teacher forced."""
        pad = self.lm.processor.tokenizer.pad_token_id or 0
        rows = [p + a for p, a in zip(self.prompt_ids, self.answers, strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        longest = max(len(a) for a in self.answers)
        with torch.inference_mode():
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                pixel_values=self.pixel_values,
                logits_to_keep=longest + 1,
                use_cache=False,
            ).logits.float()
        kept, cosines = [], []
        for row, answer in enumerate(self.answers):
            # the position before each answer token predicts it; the last position predicts
            # nothing that was generated
            got = logits[row, longest - len(answer) : longest]
            kept.append(got.argmax(-1).tolist() == answer)
            cosines.append(_centred_cosines(got, self.logits[row]).min().item())
        return Score(list(int8_extra), kept, float(np.min(cosines)))


def accepts(trial: Score, before: Score) -> bool:
    """No answer the model before kept is changed, and no answer position drifts too far."""
    lost = any(b and not t for b, t in zip(before.answers_kept, trial.answers_kept, strict=True))
    return not lost and trial.min_cosine >= MIN_COSINE


def quantize_checked(
    lm: LoadedModel, skip: Sequence[str], prompts: Sequence[Prompt], prompts_name: str
) -> tuple[list[str], CheckReport]:
    """Quantize fp32 `lm.model` to cpu-int8 in place: the `skip` list, then each optional module
    that passes the check. Returns the final skip list and the scores."""
    from tinyllava_med.quantize.cpu_int8 import quantize_cpu_int8

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
        saved = copy.deepcopy(lm.model.get_submodule(module))
        trial_skip = [s for s in skip if s != module]
        quantize_cpu_int8(lm.model, trial_skip)
        trial = reference.score(lm.model, [*extra, module])
        if accepts(trial, before):
            trial = Score(trial.int8_extra, trial.answers_kept, trial.min_cosine, True)
            skip, extra, before = trial_skip, [*extra, module], trial
        else:
            trial = Score(trial.int8_extra, trial.answers_kept, trial.min_cosine, False)
            lm.model.set_submodule(module, saved)
        report.scores.append(trial)
    lm.model.cpu_int8_skip_modules = skip
    return skip, report
