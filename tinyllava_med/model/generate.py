"""Answer generation: batched (left padding), greedy by default, with a per-token callback.

The functions here know nothing about HTTP: they take PIL images and question strings, build
each variant's prompt, run one `generate` for the whole batch and return `Answer`s. A token
callback (row, text delta) makes streaming (SSE) and cancellation possible for callers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from queue import Queue
from typing import Any, Literal

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from tinyllava_med.model.load import LoadedModel
from tinyllava_med.model.prefixes import PrefixStore, with_prefixes
from tinyllava_med.model.processor import batch_inputs, pixel_values
from tinyllava_med.model.prompts import build_prompt, clean_answer, stop_strings

# Temperatures below this sample as greedy decoding does (vLLM's `_SAMPLING_EPS`): dividing the
# logits by 1e-300 overflows them to inf, and sampling from that fails.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy; so is anything below MIN_TEMPERATURE
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)

    def key(self) -> tuple[float, float]:
        """Requests with the same key can share one `generate` call."""
        return (self.temperature, self.top_p)


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    new_tokens: int
    latency_ms: float
    finish_reason: Literal["stop", "length", "cancelled"]


class GenerationCancelled(Exception):
    pass


TokenCallback = Callable[[int, str], None]  # (row, text delta)


def _visible(template: str, text: str, stops: tuple[str, ...], final: bool) -> str:
    """What of `text` (decoded so far) the final answer will certainly start with: cut at a stop
    string, cleaned as `clean_answer` does, holding back what may still change (a partial stop
    string, trailing whitespace, a partial role prefix)."""
    text, hit = _cut_at_stop(text, stops)
    if final or hit:
        return clean_answer(template, text)
    for s in stops:  # a stop string may be starting at the end
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                text = text[:-k]
                break
    stripped = text.strip()
    if template == "llava_v1_med" and "Assistant:".startswith(stripped):
        return ""
    return clean_answer(template, text)


class _RowStreamer(BaseStreamer):
    """Fans the batch's new tokens out per row as text deltas whose concatenation is the row's
    final answer text (cut at its own token limit and at stop strings, cleaned); can stop
    generation."""

    def __init__(
        self,
        tokenizer: Any,
        n_rows: int,
        eos_ids: set[int],
        on_token: TokenCallback,
        should_stop: Callable[[], bool] | None,
        template: str = "v1",
        stops: tuple[str, ...] = (),
        limits: list[int] | None = None,
        text_rows: list[bool] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.ids: list[list[int]] = [[] for _ in range(n_rows)]
        self.sent: list[str] = [""] * n_rows
        self.done = [False] * n_rows
        self.eos_ids = eos_ids
        self.on_token = on_token
        self.should_stop = should_stop
        self.prompt_seen = False
        self.template = template
        self.stops = stops
        self.limits = limits or [2**31] * n_rows
        # rows nobody reads as text get one empty delta at their first token (for time-to-first-
        # token) and are never decoded: decoding every row at every step is most of the cost
        self.text_rows = text_rows or [True] * n_rows

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt ids
            self.prompt_seen = True
            return
        if self.should_stop is not None and self.should_stop():
            raise GenerationCancelled()
        for row, tok in enumerate(value.reshape(len(self.ids), -1)[:, -1].tolist()):
            if self.done[row]:
                continue
            if tok in self.eos_ids:
                self.done[row] = True
                continue
            self.ids[row].append(tok)
            if len(self.ids[row]) >= self.limits[row]:
                self.done[row] = True
            if self.text_rows[row]:
                self._emit(row, final=False)
            elif len(self.ids[row]) == 1:
                self.on_token(row, "")

    def _emit(self, row: int, *, final: bool) -> None:
        text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait
            return
        visible = _visible(self.template, text, self.stops, final)
        if not visible.startswith(self.sent[row]):
            return  # cannot happen for the templates we know; never send text twice
        delta, self.sent[row] = visible[len(self.sent[row]) :], visible
        if delta:
            self.on_token(row, delta)
        if _cut_at_stop(text, self.stops)[1]:
            self.done[row] = True  # a stop string ended the answer

    def end(self) -> None:
        for row in range(len(self.ids)):
            if self.text_rows[row]:
                self._emit(row, final=True)


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def eos_token_ids(lm: LoadedModel) -> set[int]:
    """The ids that end an answer: the tokenizer's end of sequence and the generation
    config's (one id or a list)."""
    tok_eos = lm.processor.tokenizer.eos_token_id
    gen_eos = lm.model.generation_config.eos_token_id
    ids = {tok_eos} if tok_eos is not None else set()
    return ids | set(
        gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
    )


def prepare_image(lm: LoadedModel, image: Image.Image) -> torch.Tensor:
    """`image` as `lm`'s vision tower sees it ([3, H, W], the model's dtype, on the CPU): the
    per-image work of `generate`, which callers may do ahead (and cache) and pass instead."""
    return pixel_values(lm.processor, image).to(lm.model.dtype)


def generate(
    lm: LoadedModel,
    images: Sequence[Image.Image | torch.Tensor],
    questions: list[str],
    params: SamplingParams | list[SamplingParams] = SamplingParams(),
    *,
    on_token: TokenCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    histories: list[Sequence[tuple[str, str]]] | None = None,
    text_rows: list[bool] | None = None,
    prefixes: PrefixStore | None = None,
    image_keys: Sequence[Hashable | None] | None = None,
) -> list[Answer]:
    """One answer per (image, question), generated in one batch. An image may be given as
    `prepare_image`'s pixel values.

    `prefixes`: rows reuse stored attention caches of their prompts' start (`with_prefixes`):
    up to their image where `image_keys` name every image's content, else the template's
    opening. They answer as without them.

    `histories` holds each row's earlier (question, answer) turns about the same image.
    `text_rows`: which rows `on_token` wants text deltas for (default all); the others get one
    empty delta at their first token.

    `params` may differ per row in `max_new_tokens` only (each row is cut to its own limit);
    rows that share one call must share temperature and top-p.
    """
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images but {len(questions)} questions")
    if not images:
        return []
    per_row = params if isinstance(params, list) else [params] * len(images)
    if len({p.key() for p in per_row}) != 1:
        raise ValueError("rows of one batch must share temperature and top_p")
    first = per_row[0]
    max_new = max(p.max_new_tokens for p in per_row)

    tok = lm.processor.tokenizer
    prompts = [
        build_prompt(lm.template, q, list(histories[i]) if histories else None)
        for i, q in enumerate(questions)
    ]
    pixels = [im if isinstance(im, torch.Tensor) else prepare_image(lm, im) for im in images]
    inputs = batch_inputs(lm.processor, prompts, pixels).to(lm.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(lm.model.dtype)
    prompt_lens = inputs["attention_mask"].sum(dim=1).tolist()

    eos_ids = eos_token_ids(lm)
    stops = tuple(s for s in stop_strings(lm.template) if s not in (tok.eos_token,))
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new,
        do_sample=first.temperature > 0,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_token_id=sorted(eos_ids) or None,
    )
    if first.temperature > 0:
        kwargs.update(temperature=first.temperature, top_p=first.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stops:
        kwargs.update(stop_strings=list(stops), tokenizer=tok)
    if on_token is not None or should_stop is not None:
        kwargs["streamer"] = _RowStreamer(
            tok,
            len(images),
            eos_ids,
            on_token or (lambda r, d: None),
            should_stop,
            template=lm.template,
            stops=stops,
            limits=[p.max_new_tokens for p in per_row],
            text_rows=text_rows,
        )

    start = time.perf_counter()
    gen_inputs = dict(inputs)
    if prefixes is not None:
        gen_inputs = with_prefixes(lm, inputs, image_keys, prefixes) or gen_inputs
    with torch.inference_mode():
        out = lm.model.generate(**gen_inputs, **kwargs)
    latency_ms = (time.perf_counter() - start) * 1000.0

    new = out[:, inputs["input_ids"].shape[1] :].tolist()
    answers = []
    for row, ids in enumerate(new):
        limit = per_row[row].max_new_tokens
        finish: Literal["stop", "length", "cancelled"] = "length"
        kept: list[int] = []
        for t in ids[:limit]:
            if t in eos_ids:
                finish = "stop"
                break
            kept.append(t)
        text = tok.decode(kept, skip_special_tokens=True)
        text, hit = _cut_at_stop(text, stops)
        if hit:
            finish = "stop"
        answers.append(
            Answer(
                text=clean_answer(lm.template, text),
                prompt_tokens=int(prompt_lens[row]),
                new_tokens=len(kept),
                latency_ms=latency_ms,
                finish_reason=finish,
            )
        )
    return answers


def stream(
    lm: LoadedModel,
    image: Image.Image,
    question: str,
    params: SamplingParams = SamplingParams(),
) -> Iterator[str | Answer]:
    """Yield text deltas as they are generated, then the final `Answer`."""
    q: Queue[tuple[str, Any]] = Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            ans = generate(
                lm,
                [image],
                [question],
                params,
                on_token=lambda _row, delta: q.put(("delta", delta)),
                should_stop=stop.is_set,
            )[0]
            q.put(("answer", ans))
        except BaseException as e:  # handed to the consumer, re-raised there
            q.put(("error", e))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "delta":
                yield value
            elif kind == "answer":
                yield value
                return
            else:
                raise value
    finally:
        stop.set()
        thread.join()
