"""Weights of original checkpoints: reading them, renaming every key exactly once, fixing the vocabulary.

Owns the table-driven key mapping used by `convert`: each format is a list of
(source prefix -> served prefix) rules, first match wins. A key no rule claims, a served weight
nothing provides, or a shape that does not fit fails loudly with the key names. Buffers that
transformers recomputes at load time (RoPE `inv_freq`, `position_ids`) are dropped on purpose,
which also keeps RoPE in fp32 whatever the weights' dtype.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

VISION = "<vision>"  # rule target: the key belongs to the checkpoint's own vision tower
DERIVED_SUFFIXES = (".rotary_emb.inv_freq", "embeddings.position_ids")
TOWER_OTHER_PARTS = (
    "text_model.",
    "logit_scale",
    "logit_bias",
    "visual_projection.",
    "text_projection.",
)
SERVED_VISION = "model.vision_tower."
EMBED_KEY = "model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


class ConversionError(ValueError):
    """An original checkpoint does not convert exactly; the message names the offending keys."""


def _listing(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ---------------------------------------------------------------------------------------------
# Reading


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder: safetensors first, then `pytorch_model*.bin`."""
    folder = Path(folder)
    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (folder / index).is_file():
            names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise ConversionError(f"{folder / index} lists missing shards: {_listing(missing)}")
            return [folder / n for n in names]
        if (folder / single).is_file():
            return [folder / single]
    shards = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not shards:
        raise ConversionError(
            f"no weights in {folder}: expected model*.safetensors or pytorch_model*.bin"
        )
    return shards


def _read_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch.save format cannot be mmapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path} does not hold a state dict")
    return dict(state)


def read_state_dict(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    """All tensors of `files`; a key stored twice fails."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        part = _read_one(path)
        twice = state.keys() & part.keys()
        if twice:
            raise ConversionError(f"keys stored twice (again in {path.name}): {_listing(twice)}")
        state.update(part)
    return state


def dominant_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most parameters (the checkpoint's dtype)."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    return max(sizes, key=lambda d: sizes[d]) if sizes else torch.float32


# ---------------------------------------------------------------------------------------------
# Renaming


@dataclass
class MappedCheckpoint:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # served name -> tensor
    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # tower-internal name -> tensor
    derived: list[str] = field(default_factory=list)  # recomputed buffers, dropped
    sources: dict[str, str] = field(default_factory=dict)  # served name -> checkpoint name


def map_keys(
    state: Mapping[str, torch.Tensor], rules: Iterable[tuple[str, str]]
) -> MappedCheckpoint:
    """Rename every key by the first rule whose source prefix it starts with.

    Keys no rule claims (other than recomputed buffers) fail, named in the error.
    """
    rules = list(rules)
    out = MappedCheckpoint()
    unclaimed = []
    for key, tensor in state.items():
        if key.endswith(DERIVED_SUFFIXES):
            out.derived.append(key)
            continue
        for source, target in rules:
            if key.startswith(source):
                rest = key[len(source) :]
                if target == VISION:
                    out.vision[rest] = tensor
                else:
                    out.tensors[target + rest] = tensor
                    out.sources[target + rest] = key
                break
        else:
            unclaimed.append(key)
    if unclaimed:
        raise ConversionError(
            f"{len(unclaimed)} checkpoint weight(s) have no place in the served model: "
            f"{_listing(unclaimed)}"
        )
    return out


def read_tower_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Vision weights of a CLIP / SigLIP model folder, named inside the tower (`embeddings.*`, ...).

    Text tower, logit scale and projections of a full CLIP/SigLIP model are not vision weights;
    any other key fails.
    """
    state = read_state_dict(weight_files(folder))
    vision: dict[str, torch.Tensor] = {}
    other = []
    for key, tensor in state.items():
        if key.endswith(DERIVED_SUFFIXES) or key.startswith(TOWER_OTHER_PARTS):
            continue
        name = key.removeprefix("vision_model.")
        if name.startswith(
            ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "head.")
        ):
            vision[name] = tensor
        else:
            other.append(key)
    if other:
        raise ConversionError(f"unexpected keys in the vision tower at {folder}: {_listing(other)}")
    return vision


def count_layers(vision: Mapping[str, torch.Tensor]) -> int:
    found = [int(m.group(1)) for key in vision if (m := _LAYER.match(key))]
    return max(found) + 1 if found else 0


def keep_first_layers(vision: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The tower without its layers from index `layers` on and without the pooling head."""
    kept = {}
    for key, tensor in vision.items():
        m = _LAYER.match(key)
        if (m and int(m.group(1)) >= layers) or key.startswith("head."):
            continue
        kept[key] = tensor
    return kept


def served_vision(vision: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {SERVED_VISION + key: tensor for key, tensor in vision.items()}


# ---------------------------------------------------------------------------------------------
# Fixes the served model needs


def linear_projector(tensors: dict[str, torch.Tensor], text_hidden: int) -> list[str]:
    """A single-linear projector (LLaVA v1.0) as Llava's linear_1 -> identity act -> linear_2 = I.

    With `projector_hidden_act="linear"` and an identity `linear_2` (zero bias) this is exact.
    Returns the names of the weights made up here.
    """
    dtype = tensors["model.multi_modal_projector.linear_1.weight"].dtype
    tensors["model.multi_modal_projector.linear_2.weight"] = torch.eye(text_hidden, dtype=dtype)
    tensors["model.multi_modal_projector.linear_2.bias"] = torch.zeros(text_hidden, dtype=dtype)
    return [
        "model.multi_modal_projector.linear_2.weight",
        "model.multi_modal_projector.linear_2.bias",
    ]


def pad_vocabulary(tensors: dict[str, torch.Tensor], needed: int, multiple: int = 64) -> int:
    """Grow embeddings (and an untied LM head) to hold `needed` tokens, rounded up to `multiple`.

    New rows are the mean of the existing rows (as transformers' LLaVA converter does, without its
    small random noise), so a new token's logit is the average logit and never wins greedy decoding.
    Returns the number of rows.
    """
    rows = tensors[EMBED_KEY].shape[0]
    if needed <= rows:
        return rows
    new_rows = math.ceil(needed / multiple) * multiple
    for key in (EMBED_KEY, LM_HEAD_KEY):
        if key not in tensors:
            continue
        old = tensors[key]
        if old.shape[0] != rows:
            raise ConversionError(f"{key} has {old.shape[0]} rows but the embeddings have {rows}")
        mean = old.float().mean(dim=0, keepdim=True).to(old.dtype)
        tensors[key] = torch.cat([old, mean.expand(new_rows - rows, -1)], dim=0)
    return new_rows


def check_shapes(
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    sources: Mapping[str, str] | None = None,
) -> None:
    """Every served weight provided once, nothing extra, shapes equal; otherwise name the keys
    (as the checkpoint names them, when `sources` knows)."""
    sources = sources or {}

    def name(key: str) -> str:
        return f"{sources[key]} (-> {key})" if key in sources else key

    missing = expected.keys() - tensors.keys()
    extra = [name(k) for k in tensors.keys() - expected.keys()]
    wrong = [
        f"{name(k)} {tuple(tensors[k].shape)} != {tuple(expected[k])}"
        for k in expected.keys() & tensors.keys()
        if tuple(tensors[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing weight(s): {_listing(missing)}")
    if extra:
        problems.append(f"leftover weight(s) with no place in the served model: {_listing(extra)}")
    if wrong:
        problems.append(f"shape mismatch: {_listing(wrong)}")
    if problems:
        raise ConversionError("; ".join(problems))
