"""The peaked tiny model's cases, and comparing a quantized model with fp32 on them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from PIL import Image

from tinyllava_med.model.generate import SamplingParams, generate
from tinyllava_med.model.prompts import build_prompt

QUESTION = "Which organ is shown?"
CASES = [
    ((0, 0, 0), " left lung"),
    ((255, 255, 255), " right knee"),
    ((220, 20, 20), " head ct"),
    ((20, 20, 220), " chest x-ray"),
]


@contextmanager
def one_thread() -> Iterator[None]:
    """Two torch threads on two shared cores make every small op wait for the busy core
    (measured: 120 training steps of the tiny model 209 s with 2 threads, 3 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def case_images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 40), colour) for colour, _ in CASES]


def teacher_forced_batch(processor, answers: list[str]) -> dict[str, torch.Tensor]:
    """Prompt + answer + </s> for each case (left padded); labels only on the answers."""
    tok = processor.tokenizer
    rows, labels, pixels = [], [], []
    for image, answer in zip(case_images(), answers, strict=True):
        enc = processor(images=[image], text=[build_prompt("v1", QUESTION)], return_tensors="pt")
        prompt = enc["input_ids"][0].tolist()
        target = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
        pixels.append(enc["pixel_values"][0])
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    return {
        "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        "labels": torch.tensor(
            [[-100] * (width - len(r)) + lab for r, lab in zip(rows, labels, strict=True)]
        ),
        "pixel_values": torch.stack(pixels),
    }


def answer_logits(lm) -> torch.Tensor:
    """Logits at every answer position of the cases (teacher forced), as float32."""
    batch = teacher_forced_batch(lm.processor, [a for _, a in CASES])
    labels = batch.pop("labels")
    batch["pixel_values"] = batch["pixel_values"].to(lm.model.dtype)
    with torch.inference_mode():
        logits = lm.model(**batch).logits.float()
    return logits[:, :-1][labels[:, 1:] != -100]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The worst position's cosine between two sets of logits, each centred first.

    Softmax ignores a constant shift, and a flattened cosine of raw logits is dominated by what
    every position shares (the learned "not these tokens" floor: 0.99 even when half the answers
    are wrong). Per position and centred, a scrambled projector scores 0.81 and different
    images' first answer tokens 0.79, while working quantization scores above 0.999.
    """
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()


def answers(lm) -> list[str]:
    out = generate(lm, case_images(), [QUESTION] * len(CASES), SamplingParams(max_new_tokens=8))
    return [a.text for a in out]
