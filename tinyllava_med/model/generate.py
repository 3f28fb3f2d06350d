"""Answer generation: batched (left padding), greedy by default, with a per-token callback.

The functions here know nothing about HTTP: they take PIL images and question strings, build
each variant's prompt, run one `generate` for the whole batch and return `Answer`s. A token
callback (row, text delta) makes streaming (SSE) and cancellation possible for callers.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from queue import Queue
from typing import Any, Literal, Protocol

import torch
from PIL import Image
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_layers import GradientCheckpointingLayer

from tinyllava_med.model.load import LoadedModel
from tinyllava_med.model.processor import batch_inputs, pixel_values
from tinyllava_med.model.prompts import build_prompt, clean_answer, stop_strings


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

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


class PrefixStore(Protocol):
    """Where `generate` keeps the attention cache of prompts up to their image (a `ByteLRU`)."""

    def get(self, key: Hashable, *, count_miss: bool = False) -> Any | None: ...
    def put(self, key: Hashable, value: Any) -> None: ...
    def __contains__(self, key: Hashable) -> bool: ...


def cache_bytes(cache: DynamicCache) -> int:
    """What a prompt prefix's attention cache holds, in bytes."""
    tensors = (getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values"))
    return sum(t.element_size() * t.nelement() for t in tensors if isinstance(t, torch.Tensor))


def _concat(lm: LoadedModel, caches: Sequence[DynamicCache]) -> DynamicCache:
    """The caches' rows as one batch (new tensors: the given caches stay as they are)."""
    out = DynamicCache(config=lm.model.config.get_text_config())
    for i in range(len(caches[0].layers)):
        layers: list[Any] = [c.layers[i] for c in caches]  # DynamicLayer: keys, values
        out.update(torch.cat([x.keys for x in layers]), torch.cat([x.values for x in layers]), i)
    return out


def _prefix_caches(
    lm: LoadedModel,
    prefixes: Sequence[torch.Tensor],
    pixels: torch.Tensor | None,
    keys: Sequence[Hashable | None],
    store: PrefixStore,
) -> list[DynamicCache]:
    """The attention cache of each row's prefix (token ids of one length, ending with the image
    when `pixels` are given), from `store`; the missing ones computed in one forward (vision
    tower included) and stored. The prefix's tokens are part of the key: another template
    never shares it."""
    full_keys = [(key, tuple(p.tolist())) for key, p in zip(keys, prefixes, strict=True)]
    found: dict[Hashable, DynamicCache] = {}
    missing: dict[Hashable, int] = {}  # each missing prefix once: key -> its first row
    for row, key in enumerate(full_keys):
        if key in found or key in missing:
            continue
        if (hit := store.get(key, count_miss=True)) is not None:
            found[key] = hit
        else:
            missing[key] = row
    if missing:
        batch = DynamicCache(config=lm.model.config.get_text_config())
        ids = torch.stack([prefixes[row] for row in missing.values()])
        images = None if pixels is None else pixels[list(missing.values())]
        with torch.inference_mode():
            lm.model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=images,
                cache=batch,
                use_cache=True,
                logits_to_keep=1,
            )
        layers: list[Any] = batch.layers  # DynamicLayer: keys, values
        for j, new_key in enumerate(missing):
            one = DynamicCache(config=lm.model.config.get_text_config())
            for i, layer in enumerate(layers):
                one.update(layer.keys[j : j + 1].clone(), layer.values[j : j + 1].clone(), i)
            found[new_key] = one
            store.put(new_key, one)
    return [found[key] for key in full_keys]


# The default size of a prefix cache on a CPU: TinyLLaVA-1.5B's prompt up to its image is 34 MB
# in fp32 (22 layers x 765 tokens x 2 x 256 values), so this keeps the last 7 images. Prompts
# are cached up to their image only where that pays (`image_prefixes_pay`); smaller towers share
# only the template's opening (the demo's system prompt: 32 of 68 prompt tokens), computed once.
PREFIX_CACHE_MB = 256

# Caching prompts up to their image pays for towers of at least this many image tokens: a miss
# costs one more forward call, nothing beside a real prefill (TinyLLaVA-1.5B's 729 image tokens:
# 13-17 s on 2 CPU cores) but a quarter of the bundled demo's (16 image tokens: 17 -> 22 ms
# alone, 47 -> 57 ms for 16 rows).
PREFIX_MIN_IMAGE_TOKENS = 256


def prefix_cache_size_mb(lm: LoadedModel, asked: int | None = None) -> int:
    """The prefix cache's size in MB: `asked`, or by default `PREFIX_CACHE_MB` on a CPU and
    nothing on a GPU, whose memory is scarcer."""
    if asked is not None:
        return asked
    return PREFIX_CACHE_MB if lm.device.type == "cpu" else 0


def image_prefixes_pay(lm: LoadedModel) -> bool:
    """Whether questions about one image should share its prompt's cache up to the image (else
    only the template's opening is worth sharing)."""
    return int(getattr(lm.model.config, "image_seq_length", 0)) >= PREFIX_MIN_IMAGE_TOKENS


# A template's own opening (system prompt, example exchange) is cached only from this many
# tokens: TinyLLaVA's v1/phi system prompt is about 32, LLaVA-Med v1.0's with its example
# exchange about 60, LLaVA-Med v1.5's `[INST]` 3 (not worth a cache).
MIN_TEMPLATE_PREFIX = 16

_template_prefixes: weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def template_prefix(lm: LoadedModel) -> torch.Tensor:
    """The token ids every prompt of `lm`'s template starts with, before any question or image:
    the longest common start of two prompts that differ only in their question, cut before the
    image. Computed once per tokenizer and template."""
    tok = lm.processor.tokenizer
    known = _template_prefixes.setdefault(tok, {})
    if lm.template not in known:
        a, b = (tok(build_prompt(lm.template, q))["input_ids"] for q in ("a", "b"))
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
        image_id = lm.model.config.image_token_index
        n = min([n] + [i for i, t in enumerate(a) if t == image_id])
        known[lm.template] = torch.tensor(a[:n], dtype=torch.long)
    return known[lm.template]


def _with_prefixes(
    lm: LoadedModel,
    inputs: Any,
    keys: Sequence[Hashable | None] | None,
    store: PrefixStore,
) -> dict[str, Any] | None:
    """`generate`'s inputs with each row's prompt prefix taken from `store` (computed and stored
    on a miss): the prefixes' attention caches stacked as the cache, each row laid out as
    prefix, padding, own words.

    With every row's image named in `keys`, the prefix runs up to and including the image, and
    the rows need no pixel values (the tower's work is in the cache): every question about an
    image shares it (system prompt, turn opening, image), so a follow-up computes only its own
    words; on a CPU that prefix is most of the work (TinyLLaVA-1.5B: 765 of 774 tokens and the
    tower). Otherwise, or when the rows' images sit at different places (LLaVA-Med v1.0 puts the
    image after the question), the prefix is the template's own opening (`template_prefix`),
    which every question shares. None when neither applies."""
    image_id = lm.model.config.image_token_index
    masks = inputs["attention_mask"].bool()
    rows = [r[m] for r, m in zip(inputs["input_ids"], masks, strict=True)]
    ends = {
        int((row == image_id).nonzero().max()) + 1 if (row == image_id).any() else 0 for row in rows
    }
    opening = template_prefix(lm)
    names: list[Hashable | None] = list(keys or [])
    by_image = bool(names) and None not in names and len(ends) == 1 and 0 not in ends
    if by_image:
        n = ends.pop()
    elif len(opening) >= MIN_TEMPLATE_PREFIX and all(
        torch.equal(row[: len(opening)], opening) for row in rows
    ):
        n, names = len(opening), [None] * len(rows)
    else:
        return None
    pixels = inputs["pixel_values"] if by_image else None
    caches = _prefix_caches(lm, [row[:n] for row in rows], pixels, names, store)
    width = max(len(row) for row in rows) - n  # the longest row's own words
    pad = lm.processor.tokenizer.pad_token_id or 0
    ids, mask = [], []
    for row in rows:  # position ids follow the mask: each row's own words go on from n
        gap = width - (len(row) - n)
        ids.append(torch.cat([row[:n], row.new_full((gap,), pad), row[n:]]))
        mask.append(torch.cat([row.new_ones(n), row.new_zeros(gap), row.new_ones(len(row) - n)]))
    out = {
        "input_ids": torch.stack(ids),
        "attention_mask": torch.stack(mask).to(inputs["attention_mask"].dtype),
        "cache": _concat(lm, caches),  # generate appends to it; `store` keeps its own
    }
    if not by_image:  # the images are in the rows' own words
        out["pixel_values"] = inputs["pixel_values"]
    return out


def image_prefix_shared(lm: LoadedModel) -> bool:
    """Whether every question about an image shares `lm`'s prompt up to the image: the image
    comes before the question (all templates but LLaVA-Med v1.0's)."""
    token = lm.processor.image_token
    a, b = (build_prompt(lm.template, q) for q in ("a", "b"))
    return a.split(token)[0] == b.split(token)[0]


@contextmanager
def _stoppable(model: torch.nn.Module, should_stop: Callable[[], bool] | None) -> Iterator[None]:
    """While inside, each layer of `model` (the vision tower's and the LLM's) first asks
    `should_stop`, and raises `GenerationCancelled` if it says so: a long forward gives way
    between layers."""
    if should_stop is None:
        yield
        return

    def check(module: torch.nn.Module, args: Any) -> None:
        if should_stop():
            raise GenerationCancelled()

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    handles = [layer.register_forward_pre_hook(check) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def prefill_image(
    lm: LoadedModel,
    pixels: torch.Tensor,
    image_key: Hashable,
    store: PrefixStore,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> bool:
    """Compute the attention cache of `lm`'s prompt up to and including an image (`pixels`, its
    `prepare_image`) and keep it in `store`, where a question about the image named `image_key`
    finds it (`_with_prefixes`): the first question then computes only its own words, as a
    follow-up does. Done ahead, while the reader looks at the image, this takes the prefill out
    of the first answer's time (TinyLLaVA-1.5B on a CPU: the tower and 765 of 774 prompt tokens).

    False, computing nothing, where `store` holds it already. Only for templates where
    questions share it (`image_prefix_shared`). `should_stop` is asked before each layer;
    when it says so, `GenerationCancelled` is raised and nothing is stored."""
    image_id = lm.model.config.image_token_index
    prompts = [build_prompt(lm.template, q) for q in ("a", "b")]
    inputs = batch_inputs(lm.processor, prompts, [pixels, pixels])
    rows = [r[m.bool()] for r, m in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)]
    ends = {int((row == image_id).nonzero().max()) + 1 for row in rows}
    n = ends.pop()
    if ends or not torch.equal(rows[0][:n], rows[1][:n]):
        raise ValueError(f"questions do not share the {lm.template} prompt up to the image")
    if (image_key, tuple(rows[0][:n].tolist())) in store:
        return False
    images = inputs["pixel_values"][:1].to(lm.model.dtype)
    with _stoppable(lm.model, should_stop):
        _prefix_caches(lm, [rows[0][:n]], images, [image_key], store)
    return True


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

    `prefixes`: rows reuse stored attention caches of their prompts' start (`_with_prefixes`):
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

    eos_ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen_eos = lm.model.generation_config.eos_token_id
    eos_ids |= set(
        gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
    )
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
        gen_inputs = _with_prefixes(lm, inputs, image_keys, prefixes) or gen_inputs
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
