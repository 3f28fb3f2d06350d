"""Training data: LLaVA conversation files -> token ids, labels and pixel values.

Reads the LLaVA format (`{"id", "image", "conversations": [{"from": "human"|"gpt", ...}]}`, also
the misspelt `conversatons` key of public files), loads images lazily from an image folder with
the served processor (the same pad-to-square preprocessing as serving), and supervises only the
assistant's answers: every other label is -100.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from tinyllava_med.model.prompts import IMAGE_TOKEN, conversation_segments

IGNORE_INDEX = -100


def read_conversations(path: str | Path) -> list[dict[str, Any]]:
    """Entries of a LLaVA json (list) or jsonl file, with `conversations` normalised."""
    text = Path(path).read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        entries = json.loads(text)
    else:
        entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    for e in entries:
        if "conversations" not in e and "conversatons" in e:
            e["conversations"] = e.pop("conversatons")
        if "conversations" not in e:
            raise ValueError(f"entry {e.get('id')!r} of {path} has no 'conversations'")
    return entries


def turns_of(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(question, answer) pairs of an entry; a trailing unanswered question is dropped."""
    convs = entry["conversations"]
    turns = []
    for i in range(0, len(convs) - 1, 2):
        h, g = convs[i], convs[i + 1]
        if h.get("from") not in ("human", "user") or g.get("from") not in ("gpt", "assistant"):
            raise ValueError(
                f"entry {entry.get('id')!r}: expected human/gpt turns, got "
                f"{h.get('from')!r}/{g.get('from')!r} at {i}"
            )
        turns.append((h["value"], g["value"]))
    return turns


def group_by_image(
    entries: Sequence[dict[str, Any]], turns_per_sample: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Merge single-question entries of the same image into multi-turn conversations.

    One image encode then trains several questions; questions are shuffled per image so no
    fixed order can be learned.
    """
    rng = random.Random(seed)
    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in entries:
        by_image[e["image"]].append(e)
    out = []
    for image, group in by_image.items():
        group = list(group)
        rng.shuffle(group)
        for i in range(0, len(group), turns_per_sample):
            chunk = group[i : i + turns_per_sample]
            convs = []
            for j, e in enumerate(chunk):
                for k, msg in enumerate(e["conversations"]):
                    value = msg["value"]
                    if j > 0 and k == 0:
                        value = value.replace(IMAGE_TOKEN, "").strip()
                    convs.append({"from": msg["from"], "value": value})
            out.append({"id": chunk[0]["id"], "image": image, "conversations": convs})
    rng.shuffle(out)
    return out


def leading_ids(tokenizer: Any) -> list[int]:
    """The special ids the tokenizer puts before a text, as the processor's call does at
    inference: Llama's BOS; none for Phi-2's and StableLM-2's, whose BOS is defined but never
    added (the original LLaVA / TinyLLaVA code trains without it too)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


def split_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """The ids of `"".join(texts)` (no special tokens added), cut where each text ends.

    The joined text is tokenized once, as the server tokenizes a prompt, so each piece has the
    ids it has in context: tokenized alone, a piece after `</s>` or a space-led answer would get
    a dummy prefix the whole text does not have. A token that spans two texts goes to the later.
    """
    whole: list[int] = tokenizer("".join(texts), add_special_tokens=False)["input_ids"]
    cuts, text = [0], ""
    for piece in texts[:-1]:
        text += piece
        upto = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = next((i for i, (a, b) in enumerate(zip(upto, whole, strict=False)) if a != b), None)
        cuts.append(max(cuts[-1], len(upto) if n is None else n))
    cuts.append(len(whole))
    return [whole[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def encode_conversation(
    tokenizer: Any,
    template: str,
    turns: list[tuple[str, str]],
    num_image_tokens: int,
    max_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels (answers only) for one conversation with one image: the ids are
    the server's for the same text (`split_ids`)."""
    ids: list[int] = leading_ids(tokenizer)
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    segments = conversation_segments(template, list(turns))
    texts = [text.replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens) for text, _ in segments]
    for piece, (_, is_answer) in zip(split_ids(tokenizer, texts), segments, strict=True):
        ids += piece
        labels += piece if is_answer else [IGNORE_INDEX] * len(piece)
    if max_length is not None and len(ids) > max_length:
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if ids[:max_length].count(image_id) != num_image_tokens:
            raise ValueError(f"max_length {max_length} cuts into the image tokens")
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def encode_packed(
    tokenizer: Any,
    template: str,
    turns: list[tuple[str, str]],
    num_image_tokens: int,
) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """Several questions about one image as one sequence with the maths of single turns.

    The shared prefix (system text, image tokens, the newline after them) is followed by each
    question and answer as its own segment. Returns ids, labels, segment ids (0 = prefix, k =
    question k) and position ids (each segment restarts right after the prefix); the collator
    turns the segments into a block-diagonal causal mask, so a question sees the prefix and
    itself only, exactly as at inference. Each question's ids are those of its own single-turn
    prompt. Returns None when the template does not put the image first, or when a question's
    prompt does not start with the same prefix ids (then train on separate samples).
    """
    marker = IMAGE_TOKEN + "\n"
    bos = leading_ids(tokenizer)
    prefix_ids: list[int] | None = None
    ids: list[int] = []
    labels: list[int] = []
    segs: list[int] = []
    pos: list[int] = []
    for k, (q, a) in enumerate(turns, start=1):
        (user, _), (answer, _) = conversation_segments(template, [(q, a)])
        cut = user.find(marker)
        if cut < 0:
            return None
        prefix, rest = user[: cut + len(marker)], user[cut + len(marker) :]
        expand = prefix.replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens)
        head, rest_ids, answer_ids = split_ids(tokenizer, [expand, rest, answer])
        if prefix_ids is None:
            prefix_ids = bos + head
            ids, labels = list(prefix_ids), [IGNORE_INDEX] * len(prefix_ids)
            segs, pos = [0] * len(prefix_ids), list(range(len(prefix_ids)))
        elif bos + head != prefix_ids:
            return None
        n = len(rest_ids) + len(answer_ids)
        ids += rest_ids + answer_ids
        labels += [IGNORE_INDEX] * len(rest_ids) + answer_ids
        segs += [k] * n
        pos += list(range(len(prefix_ids), len(prefix_ids) + n))
    return ids, labels, segs, pos


class ConversationDataset(Dataset):
    """Lazy dataset over LLaVA conversation entries; images are read when an item is asked for."""

    def __init__(
        self,
        entries: Sequence[dict[str, Any]],
        image_folder: str | Path,
        processor: Any,
        template: str,
        max_length: int | None = 2048,
        cache: bool = False,
        pack: bool = False,
    ) -> None:
        self.pack = pack
        self.entries = list(entries)
        self._cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache else None
        self.image_folder = Path(image_folder)
        self.processor = processor
        self.template = template
        self.max_length = max_length
        self.num_image_tokens = num_image_tokens(processor)

    def __len__(self) -> int:
        return len(self.entries)

    def preload(self) -> None:
        """Encode every item now (with `cache=True`), so training steps only collate."""
        if self._cache is None:
            raise ValueError("preload needs cache=True")
        for i in range(len(self)):
            self[i]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        item = self._encode(i)
        if self._cache is not None:
            self._cache[i] = item
        return item

    def _encode(self, i: int) -> dict[str, torch.Tensor]:
        e = self.entries[i]
        tok, turns = self.processor.tokenizer, turns_of(e)
        with Image.open(self.image_folder / e["image"]) as im:
            pixels = self.processor.image_processor(im.convert("RGB"), return_tensors="pt")
        item = {"pixel_values": pixels["pixel_values"][0]}
        packed = None
        if self.pack and len(turns) > 1:
            packed = encode_packed(tok, self.template, turns, self.num_image_tokens)
        if packed is not None:
            ids, labels, segs, pos = packed
            item["segment_ids"] = torch.tensor(segs)
            item["position_ids"] = torch.tensor(pos)
        else:
            ids, labels = encode_conversation(
                tok, self.template, turns, self.num_image_tokens, self.max_length
            )
        item["input_ids"] = torch.tensor(ids)
        item["labels"] = torch.tensor(labels)
        return item


def num_image_tokens(processor: Any) -> int:
    """How many `<image>` tokens the processor expands one image into."""
    ip = processor.image_processor
    size = ip.crop_size if getattr(ip, "do_center_crop", False) else ip.size
    h = size.get("height") or size.get("shortest_edge")
    w = size.get("width") or size.get("shortest_edge")
    n = (h // processor.patch_size) * (w // processor.patch_size)
    n += processor.num_additional_image_tokens
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


class Collator:
    """Right-pads a batch; pads get label -100 and attention mask 0.

    Packed items (with `segment_ids`) get a 4D boolean mask instead: causal, and a token of
    question k attends to the shared prefix and to question k only.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        n = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for r, it in enumerate(items):
            k = len(it["input_ids"])
            ids[r, :k], labels[r, :k], mask[r, :k] = it["input_ids"], it["labels"], 1
        batch = {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        }
        if any("segment_ids" in it for it in items):
            segs = torch.full((len(items), n), -1, dtype=torch.long)
            pos = torch.zeros((len(items), n), dtype=torch.long)
            for r, it in enumerate(items):
                k = len(it["input_ids"])
                segs[r, :k] = it.get("segment_ids", torch.zeros(k, dtype=torch.long))
                pos[r, :k] = it.get("position_ids", torch.arange(k))
            same = (segs[:, :, None] == segs[:, None, :]) | (segs[:, None, :] == 0)
            causal = torch.ones((n, n), dtype=torch.bool).tril()
            valid = (segs >= 0)[:, None, :] & (segs >= 0)[:, :, None]
            # a padded query row keeps one key (itself) so attention has no empty row
            allowed = (same & causal & valid) | torch.eye(n, dtype=torch.bool)
            batch["attention_mask"] = allowed[:, None, :, :]
            batch["position_ids"] = pos
        return batch
