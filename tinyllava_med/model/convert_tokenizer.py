"""Tokenizers of original checkpoints, turned into the served (tokenizers-backed) tokenizer.

Owns three things `convert` needs and transformers 5 does not do on its own:

- reading a sentencepiece `tokenizer.model` (LLaVA-Med ships only that) with a small protobuf
  reader, so neither `sentencepiece` nor `protobuf` is needed; BPE merges are derived from the
  piece scores the way transformers' slow->fast converter did when the originals ran;
- the dummy prefix: the originals tokenized the prompt in chunks split at `<image>`
  (`tokenizer_image_token`), so every chunk started with `▁`. The served tokenizer sees the whole
  prompt at once, so sentencepiece-style tokenizers are rebuilt to put `▁` where the original
  did. A `legacy` original (LLaVA-Med) prepended it to every piece between special tokens:
  Metaspace `prepend_scheme="always"`. A `legacy: false` slow tokenizer (TinyLLaVA, TinyLLaVA-Med-F)
  prepended it once per chunk, so not after `</s>` inside one (a multi-turn prompt's
  `</s>USER`): a normalizer prepends it before the special tokens other than `<image>` are
  split off (they are "normalized" added tokens), and the tokenizer is saved as a plain
  `TokenizersBackend`, whose `tokenizer.json` transformers loads as written (a `LlamaTokenizer`
  rebuilds its pre-tokenizer from `legacy` on load);
- a pad token where the original had none (LLaVA's choice: `<unk>`, else EOS).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, pre_tokenizers
from transformers import (
    AutoTokenizer,
    LlamaTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

# sentencepiece_model.proto: SentencePiece.Type and TrainerSpec.ModelType values
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6
SP_UNIGRAM, SP_BPE = 1, 2

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


class TokenizerConversionError(ValueError):
    """The source tokenizer cannot be turned into a served tokenizer."""


@dataclass
class SentencePieceModel:
    """The fields of a sentencepiece `ModelProto` that tokenization depends on."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = SP_UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    add_dummy_prefix: bool = True


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of one protobuf message: ints for varints, bytes for the rest."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, i = _varint(buf, i)
            if value >= 1 << 63:  # negative int32/int64
                value -= 1 << 64
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i : i + length], i + length
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise TokenizerConversionError(
                f"unsupported protobuf wire type {wire} in tokenizer.model"
            )
        yield number, value


def read_sentencepiece_model(path: str | Path) -> SentencePieceModel:
    """Parse a sentencepiece `tokenizer.model` (ModelProto) without the sentencepiece package."""
    model = SentencePieceModel()
    for number, value in _fields(Path(path).read_bytes()):
        if number == 1:  # pieces
            piece, score, kind = "", 0.0, SP_NORMAL
            for n, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            model.pieces.append((piece, score, kind))
        elif number == 2:  # trainer_spec
            for n, v in _fields(value):
                if n == 3:
                    model.model_type = v
                elif n == 35:
                    model.byte_fallback = bool(v)
                elif n == 40:
                    model.unk_id = v
                elif n == 41:
                    model.bos_id = v
                elif n == 42:
                    model.eos_id = v
        elif number == 3:  # normalizer_spec
            for n, v in _fields(value):
                if n == 3:
                    model.add_dummy_prefix = bool(v)
    if not model.pieces:
        raise TokenizerConversionError(f"{path} holds no sentencepiece pieces")
    return model


def merges_from_scores(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """BPE merges of a sentencepiece BPE model: every split of a piece into two pieces, best score first.

    Sentencepiece merges the adjacent pair whose concatenation is the highest-scored piece; listing
    all such pairs by the merged piece's score reproduces it (as transformers' converter did).
    """
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    merges: list[tuple[str, str, float]] = []
    for piece, score, _ in pieces:
        local = [
            (piece[:k], piece[k:], score)
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: m[2], reverse=True)  # stable: ties keep the order above
    return [(left, right) for left, right, _ in merges]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    if value is None:
        return None
    return value["content"] if isinstance(value, dict) else str(value)


def _tokenizer_from_sentencepiece(folder: Path) -> PreTrainedTokenizerBase:
    """A `LlamaTokenizer` equal to the fast tokenizer the originals built from `tokenizer.model`."""
    sp = read_sentencepiece_model(folder / "tokenizer.model")
    if sp.model_type != SP_BPE:
        raise TokenizerConversionError(
            f"{folder / 'tokenizer.model'} is a sentencepiece model of type {sp.model_type} "
            "(only BPE models, as LLaMA / Mistral use, are read here); add a tokenizer.json to the folder"
        )
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")

    def special(name: str, sp_id: int, default: str) -> str:
        named = _token_text(config.get(name)) or _token_text(special_map.get(name))
        if named:
            return named
        return sp.pieces[sp_id][0] if 0 <= sp_id < len(sp.pieces) else default

    vocab = {piece: i for i, (piece, _, _) in enumerate(sp.pieces)}
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges_from_scores(sp.pieces),
        unk_token=special("unk_token", sp.unk_id, "<unk>"),
        bos_token=special("bos_token", sp.bos_id, "<s>"),
        eos_token=special("eos_token", sp.eos_id, "</s>"),
        add_bos_token=bool(config.get("add_bos_token", True)),
        add_eos_token=bool(config.get("add_eos_token", False)),
        legacy=True,
        add_prefix_space=True,
        model_max_length=config.get("model_max_length", int(1e30)),
    )
    # Control pieces other than unk/bos/eos are special; user-defined pieces are plain added tokens.
    control = [
        p
        for p, _, kind in sp.pieces
        if kind == SP_CONTROL and p not in tokenizer.all_special_tokens
    ]
    if control:
        tokenizer.add_tokens(
            [AddedToken(p, special=True, normalized=False) for p in control], special_tokens=True
        )
    user = [p for p, _, kind in sp.pieces if kind == SP_USER_DEFINED]
    if user:
        tokenizer.add_tokens([AddedToken(p, special=False, normalized=False) for p in user])

    # Tokens added on top of the sentencepiece vocabulary (tokenizer_config / added_tokens.json).
    extra: dict[int, tuple[str, bool]] = {}
    for token_id, token in (config.get("added_tokens_decoder") or {}).items():
        extra[int(token_id)] = (_token_text(token) or "", bool(token.get("special", True)))
    for text, token_id in _read_json(folder / "added_tokens.json").items():
        extra.setdefault(int(token_id), (text, True))
    for token_id in sorted(i for i in extra if i >= len(sp.pieces)):
        text, is_special = extra[token_id]
        tokenizer.add_tokens(
            [AddedToken(text, special=is_special, normalized=False)], special_tokens=is_special
        )
        got = tokenizer.convert_tokens_to_ids(text)
        if got != token_id:
            raise TokenizerConversionError(
                f"added token {text!r} should have id {token_id} but got {got}: "
                "the added tokens of tokenizer_config.json / added_tokens.json are not contiguous"
            )
    pad = _token_text(config.get("pad_token")) or _token_text(special_map.get("pad_token"))
    if pad and pad in tokenizer.get_vocab():
        tokenizer.pad_token = pad
    return tokenizer


def source_is_legacy(folder: Path) -> bool:
    """Whether the original sentencepiece tokenizer prepended `▁` after every special token:
    `legacy` unless its config says `"legacy": false` (transformers' default, with a warning)."""
    return _read_json(folder / "tokenizer_config.json").get("legacy") is not False


def use_dummy_prefix_per_chunk(
    tokenizer: PreTrainedTokenizerBase, *, legacy: bool = True
) -> PreTrainedTokenizerBase:
    """A sentencepiece-style `tokenizer` that puts `▁` where the original's chunked calls did.

    `legacy`: after every special token, not only at the start (Metaspace "always"). Not
    `legacy`: at the start of the text and after `<image>` (added later, not normalized), but not
    after another special token such as `</s>` (FIDELITY.md). Byte-level BPE (Phi-2,
    StableLM-2, Qwen) has no dummy prefix and is returned as it is.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "Metaspace":
        return tokenizer
    mark = pre.get("replacement", "▁")
    if legacy:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=mark, prepend_scheme="always", split=bool(pre.get("split", False))
        )
        # LlamaTokenizer rebuilds its pre-tokenizer from these on reload: keep them in the config.
        tokenizer.legacy = True  # type: ignore[attr-defined]
        tokenizer.init_kwargs["legacy"] = True
        tokenizer.init_kwargs["add_prefix_space"] = True
        if hasattr(tokenizer, "add_prefix_space"):
            tokenizer.add_prefix_space = True
        return tokenizer
    # The slow tokenizer prepended `▁` to the whole chunk, then split off the special tokens; a
    # special token that starts the chunk loses the `▁` before it. Special tokens are matched
    # after the normalizer here ("normalized"), which also normalizes their own text, hence the
    # last step; one holding a space would no longer match, so it stays split off first, as do
    # other added tokens (none in TinyLLaVA's): text after one of those starts with `▁`.
    specials = [
        a for a in spec.get("added_tokens", []) if a.get("special") and " " not in a["content"]
    ]
    steps: list[dict[str, Any]] = [
        {"type": "Prepend", "prepend": mark},
        {"type": "Replace", "pattern": {"String": " "}, "content": mark},
    ]
    if specials:
        texts = sorted((a["content"] for a in specials), key=len, reverse=True)
        ahead = "|".join(re.escape(t) for t in texts)
        steps.append(
            {"type": "Replace", "pattern": {"Regex": f"^{mark}(?={ahead})"}, "content": ""}
        )
    spec["normalizer"] = {"type": "Sequence", "normalizers": steps}
    spec["pre_tokenizer"] = None
    for token in specials:
        token["normalized"] = True
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
        pad_token=tokenizer.pad_token,
        model_max_length=tokenizer.model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def load_source_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The original checkpoint's tokenizer as a tokenizers-backed transformers tokenizer.

    A `tokenizer.json` is loaded by transformers; a sentencepiece `tokenizer.model` alone is read
    here. The result puts the dummy prefix where the original did and has a pad token.
    """
    folder = Path(folder)
    tokenizer: PreTrainedTokenizerBase
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except Exception as e:  # custom tokenizer classes (e.g. Arcade100k) need remote code
            raise TokenizerConversionError(
                f"could not load the tokenizer in {folder} with transformers: {e}. "
                "Pass a folder with a standard tokenizer.json (e.g. the base LLM's) as the tokenizer path"
            ) from e
    elif (folder / "tokenizer.model").is_file():
        tokenizer = _tokenizer_from_sentencepiece(folder)
    else:
        raise TokenizerConversionError(
            f"no tokenizer in {folder}: expected tokenizer.json or a sentencepiece tokenizer.model "
            "(TinyLLaVA_Factory folders may not carry one: pass the base LLM's folder as the tokenizer path)"
        )
    tokenizer = use_dummy_prefix_per_chunk(tokenizer, legacy=source_is_legacy(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = (
            tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        )
    tokenizer.padding_side = "left"
    return tokenizer
