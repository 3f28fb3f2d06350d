"""Attention caches of prompt prefixes, which questions share so each computes only its own words.

- Up to and including the image (`with_prefixes` with image keys): every question about one
  image shares it; on a CPU it is most of an answer's work for a real vision tower
  (`image_prefixes_pay`). `prefill_image` computes it ahead, before the first question.
- The template's opening (`template_prefix`: system prompt, example exchange): every question
  shares it.

The caches live in a `PrefixStore` (the server's `ByteLRU`), keyed by the image's name and the
prefix's tokens. `generate` takes them through `with_prefixes`; nothing here knows about HTTP.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from transformers import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer

from tinyllava_med.model.load import LoadedModel
from tinyllava_med.model.processor import batch_inputs
from tinyllava_med.model.prompts import build_prompt


class PrefillStopped(Exception):
    """`prefill_image` was told to stop (`should_stop`); nothing was stored."""


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


def _image_end(row: torch.Tensor, image_id: int) -> int:
    """Where `row`'s image tokens end (0: it has none)."""
    at = (row == image_id).nonzero()
    return int(at.max()) + 1 if len(at) else 0


def with_prefixes(
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
    ends = {_image_end(row, image_id) for row in rows}
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
    `should_stop`, and raises `PrefillStopped` if it says so: a long forward gives way
    between layers."""
    if should_stop is None:
        yield
        return

    def check(module: torch.nn.Module, args: Any) -> None:
        if should_stop():
            raise PrefillStopped()

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
    finds it (`with_prefixes`): the first question then computes only its own words, as a
    follow-up does. Done ahead, while the reader looks at the image, this takes the prefill out
    of the first answer's time (TinyLLaVA-1.5B on a CPU: the tower and 765 of 774 prompt tokens).

    False, computing nothing, where `store` holds it already. Only for templates where
    questions share it (`image_prefix_shared`). `should_stop` is asked before each layer;
    when it says so, `PrefillStopped` is raised and nothing is stored."""
    image_id = lm.model.config.image_token_index
    prompts = [build_prompt(lm.template, q) for q in ("a", "b")]
    inputs = batch_inputs(lm.processor, prompts, [pixels, pixels])
    rows = [r[m.bool()] for r, m in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)]
    ends = {_image_end(row, image_id) for row in rows}
    n = ends.pop()
    if ends or not torch.equal(rows[0][:n], rows[1][:n]):
        raise ValueError(f"questions do not share the {lm.template} prompt up to the image")
    if (image_key, tuple(rows[0][:n].tolist())) in store:
        return False
    images = inputs["pixel_values"][:1].to(lm.model.dtype)
    with _stoppable(lm.model, should_stop):
        _prefix_caches(lm, [rows[0][:n]], images, [image_key], store)
    return True
