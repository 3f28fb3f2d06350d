"""Tiny checkpoints in the exact on-disk formats of the original code, and the original arrangement by hand.

Builders write what LLaVA-Med v1.5 (`llava_mistral`), LLaVA-Med v1.0 (`llava`), legacy TinyLLaVA
(`tiny_llava`, on LLaMA / Phi / StableLM-epoch) and TinyLLaVA_Factory (`tinyllava`) saved: their
config.json fields, weight names, sharded safetensors / `pytorch_model*.bin`, the separate CLIP /
SigLIP tower folder, and their tokenizer files (a sentencepiece `tokenizer.model` written here as
protobuf, or a `tokenizer.json`). Nothing is downloaded.

`original_logits` runs the same weights the way the original code did, wired by hand: the tower's
encoder layers run one by one (no `hidden_states` machinery), the CLS / first token dropped where
the original dropped it, projector Linear -> exact GELU -> Linear, the image features spliced in
at the image position of the ids `tokenizer_image_token` made, then the LLM.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    PretrainedConfig,
    Qwen2Config,
    SiglipVisionConfig,
    SiglipVisionModel,
    StableLmConfig,
)

IMAGE_TOKEN_INDEX = -200  # the originals' placeholder id for the image inside input_ids
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CORPUS = [
    V1_SYSTEM,
    "USER: What is shown in this chest x-ray? ASSISTANT: A nodule in the left lung.",
    "[INST] Is there a fracture in the femur? [/INST] No fracture is seen.",
    "Describe the CT scan of the head. The ventricles are normal in size.",
    "Which organ is abnormal in this MRI of the knee? The meniscus is torn.",
    "###Human: Hi!###Assistant: Hi there!  How can I help you today?",
    "Is the lesion on the right or on the left side of the patient?",
]
V1_MED_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


# ---------------------------------------------------------------------------------------------
# Tokenizers: a sentencepiece tokenizer.model (protobuf, written by hand) and byte-level BPE


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _tag(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _tag(number, 0) + _varint(value)


def write_sentencepiece_model(path: Path, pieces: list[tuple[str, float, int]]) -> None:
    """A sentencepiece BPE ModelProto as `spm_train --model_type=bpe --byte_fallback` writes it."""
    out = b""
    for piece, score, kind in pieces:
        body = _bytes_field(1, piece.encode()) + _tag(2, 5) + struct.pack("<f", score)
        out += _bytes_field(1, body + _int_field(3, kind))
    trainer = (
        _int_field(3, 2)  # model_type BPE
        + _int_field(4, len(pieces))
        + _int_field(35, 1)  # byte_fallback
        + _int_field(40, 0)
        + _int_field(41, 1)
        + _int_field(42, 2)
        + _int_field(43, -1)  # pad_id: none
    )
    normalizer = (
        _bytes_field(1, b"identity") + _int_field(3, 1) + _int_field(4, 0) + _int_field(5, 1)
    )
    out += _bytes_field(2, trainer) + _bytes_field(3, normalizer)
    path.write_bytes(out)


def train_sentencepiece_pieces(vocab_size: int = 520) -> list[tuple[str, float, int]]:
    """LLaMA-layout pieces: <unk> <s> </s>, 256 byte pieces, merged pieces by rank, single characters."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer_tok.train_from_iterator(
        CORPUS * 4, trainers.BpeTrainer(vocab_size=vocab_size - 259, show_progress=False)
    )
    spec = json.loads(trainer_tok.to_str())["model"]
    merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in spec["merges"]]
    chars = [t for t in spec["vocab"] if len(t) == 1]
    pieces: list[tuple[str, float, int]] = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    pieces += [(p, -float(i), 1) for i, p in enumerate(merged)]
    pieces += [(c, -float(len(merged) + i), 1) for i, c in enumerate(chars)]
    return pieces


def sentencepiece_fast_tokenizer(
    pieces: list[tuple[str, float, int]], added: tuple[str, ...] = ()
) -> Tokenizer:
    """The fast tokenizer transformers 4.3x built from a LLaMA `tokenizer.model` (legacy): the
    normalizer prepends `▁` to every piece of text between special tokens; BPE with byte fallback;
    merges ranked by the score of the piece they make (sentencepiece BPE)."""
    ids = {p: i for i, (p, _, _) in enumerate(pieces)}
    ranked = []
    for piece, score, _ in pieces:
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        pairs = [pair for pair in pairs if pair[0] in ids and pair[1] in ids]
        ranked += [(-score, i, (ids[a], ids[b]), (a, b)) for i, (a, b) in enumerate(pairs)]
    ranked.sort(key=lambda r: (r[0], ids["".join(r[3])], r[2]))
    tok = Tokenizer(
        models.BPE(
            vocab=ids,
            merges=[r[3] for r in ranked],
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(
        [AddedToken(t, normalized=False) for t in ["<unk>", "<s>", "</s>", *added]]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def slow_legacy_false_encoder(folder: Path) -> Callable[[str], list[int]]:
    """What transformers 4.3x's slow `LlamaTokenizer` with `legacy: false` gave for one text (as
    TinyLLaVA called it, chunk by chunk), step by step as its `tokenize` and `_tokenize` did:
    `▁` prepended to the text once, the special tokens split off, each other piece
    sentencepiece-encoded with no dummy prefix of its own, a `▁` before a special token that
    starts the text dropped, BOS first. The pieces are encoded by `folder`'s own BPE."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    specials = {a["content"]: a["id"] for a in spec["added_tokens"] if a["special"]}
    bare = dict(spec, added_tokens=[], pre_tokenizer=None, post_processor=None)
    bare["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    model = Tokenizer.from_str(json.dumps(bare))
    split = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")
    space = model.token_to_id("▁")

    def encode(text: str) -> list[int]:
        text = "▁" + text.replace("▁", " ")
        ids: list[int] = []
        for part in (p for p in split.split(text) if p):
            if part in specials:
                ids.append(specials[part])
            else:
                ids += model.encode(part, add_special_tokens=False).ids
        if len(ids) > 1 and ids[0] == space and ids[1] in specials.values():
            ids = ids[1:]
        return [specials["<s>"], *ids]

    return encode


def write_sentencepiece_files(
    folder: Path,
    pieces: list[tuple[str, float, int]],
    *,
    legacy: bool,
    with_tokenizer_json: bool = False,
    added_tokens: dict[str, int] | None = None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_sentencepiece_model(folder / "tokenizer.model", pieces)
    config: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": legacy,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "padding_side": "right",
        "sp_model_kwargs": {},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    if added_tokens:
        (folder / "added_tokens.json").write_text(json.dumps(added_tokens))
    if with_tokenizer_json:
        sentencepiece_fast_tokenizer(pieces).save(str(folder / "tokenizer.json"))


def write_byte_level_tokenizer(folder: Path, tokenizer_class: str, vocab_size: int = 420) -> None:
    """A GPT-2-style byte-level BPE (Phi-2 / StableLM-2 tokenizers have this shape)."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(
        CORPUS * 4,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.save(str(folder / "tokenizer.json"))
    eot = "<|endoftext|>"
    config = {
        "tokenizer_class": tokenizer_class,
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
    }
    config |= {"add_prefix_space": False, "model_max_length": 2048}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def tokenizer_image_token(
    prompt: str, encode: Callable[[str], list[int]], bos_id: int | None
) -> list[int]:
    """The originals' `tokenizer_image_token`: tokenize the chunks around `<image>` separately,
    keep one BOS, put IMAGE_TOKEN_INDEX between the chunks."""
    chunks = [encode(chunk) for chunk in prompt.split("<image>")]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == bos_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


# ---------------------------------------------------------------------------------------------
# Weights on disk


def save_weights(
    folder: Path, state: dict[str, torch.Tensor], *, kind: str, shards: int = 1
) -> None:
    """Write `state` as the originals' trainers did: one file or shards + index json."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    keys = sorted(state)
    ext, stem = (".safetensors", "model") if kind == "safetensors" else (".bin", "pytorch_model")
    groups = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"{stem}{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}{ext}"
        part = {k: state[k] for k in group}
        if kind == "safetensors":
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
        weight_map |= dict.fromkeys(group, name)
    if shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / f"{stem}{ext}.index.json").write_text(json.dumps(index))


def tiny_clip_config(image_size: int = 16, layers: int = 3) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=4,
        projection_dim=16,
        hidden_act="quick_gelu",
    )


def tiny_siglip_config(layers: int = 3) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
    )


def _random_vision_state(config: PretrainedConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model_class = CLIPVisionModel if isinstance(config, CLIPVisionConfig) else SiglipVisionModel
    model = model_class(config)
    with torch.no_grad():  # make every weight matter (LayerNorms and biases are 1 / 0 at init)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_tower_folder(
    folder: Path, config: PretrainedConfig, seed: int
) -> dict[str, torch.Tensor]:
    """A full CLIP / SigLIP model folder (vision + text tower), as on the hub; returns the vision weights."""
    folder.mkdir(parents=True, exist_ok=True)
    vision = _random_vision_state(config, seed)
    clip = isinstance(config, CLIPVisionConfig)
    state = {f"vision_model.{k}": v for k, v in vision.items()}
    state["text_model.embeddings.token_embedding.weight"] = torch.randn(50, 16)
    state["text_model.final_layer_norm.weight"] = torch.ones(16)
    state["logit_scale"] = torch.tensor(2.6592)
    if clip:
        state["visual_projection.weight"] = torch.randn(16, 32)
        state["text_projection.weight"] = torch.randn(16, 16)
    else:
        state["logit_bias"] = torch.tensor(-10.0)
    save_weights(folder, state, kind="safetensors")
    model_type = "clip" if clip else "siglip"
    text = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 50}
    top = {"model_type": model_type, "architectures": ["CLIPModel" if clip else "SiglipModel"]}
    top |= {"vision_config": config.to_dict(), "text_config": text}
    (folder / "config.json").write_text(json.dumps(top, indent=2))
    if clip:  # the hub's CLIP towers carry an old feature-extractor config
        pre = {"feature_extractor_type": "CLIPFeatureExtractor", "size": config.image_size}
        pre |= {
            "crop_size": config.image_size,
            "do_center_crop": True,
            "do_resize": True,
            "do_normalize": True,
        }
        pre |= {"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3}
    else:
        pre = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 16, "width": 16}}
        pre |= {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3, "do_resize": True}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return vision


def _llm(config: PretrainedConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _projector(
    vision_hidden: int, text_hidden: int, seed: int, linear: bool
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if linear:
        return {
            "weight": torch.randn(text_hidden, vision_hidden, generator=g) * 0.2,
            "bias": torch.randn(text_hidden, generator=g) * 0.1,
        }
    return {
        "0.weight": torch.randn(text_hidden, vision_hidden, generator=g) * 0.2,
        "0.bias": torch.randn(text_hidden, generator=g) * 0.1,
        "2.weight": torch.randn(text_hidden, text_hidden, generator=g) * 0.2,
        "2.bias": torch.randn(text_hidden, generator=g) * 0.1,
    }


def _fine_tuned(vision: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v
        for k, v in vision.items()
    }


# ---------------------------------------------------------------------------------------------
# The originals


@dataclass
class Original:
    """One tiny original checkpoint on disk plus what is needed to run it the original way."""

    folder: Path
    fmt: str
    template: str
    llm: torch.nn.Module
    vision_kind: str
    vision_layers: int  # encoder layers that feed the projector
    drop_first_token: bool
    projector: dict[str, torch.Tensor]
    tower_folder: Path
    tower_from_folder: dict[str, torch.Tensor]
    tower_from_checkpoint: dict[str, torch.Tensor] | None
    tower_config: PretrainedConfig
    image_mean: tuple[float, ...]
    image_size: int
    center_crop: bool
    pad: bool
    encode: Callable[[str], list[int]]  # the original tokenizer on one chunk (adds BOS if it did)
    bos_id: int | None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def image_std(self) -> tuple[float, ...]:
        return CLIP_STD if self.vision_kind == "clip" else (0.5, 0.5, 0.5)


def _llm_config_dict(config: PretrainedConfig) -> dict[str, Any]:
    out = config.to_dict()
    for key in ("dtype", "transformers_version", "architectures", "model_type", "_name_or_path"):
        out.pop(key, None)
    rope = out.pop("rope_parameters", None) or {}
    out["rope_theta"] = rope.get("rope_theta", 10000.0)
    if "partial_rotary_factor" in rope:
        out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    out["torch_dtype"] = "float32"
    return out


def _sp_encoder(
    pieces: list[tuple[str, float, int]], added: tuple[str, ...] = ()
) -> Callable[[str], list[int]]:
    tok = sentencepiece_fast_tokenizer(pieces, added)
    return lambda text: tok.encode(text).ids


def build_llava_med_v15(root: Path) -> Original:
    """LLaVA-Med v1.5: `llava_mistral`, CLIP tower named by hub id, frozen tower weights in the
    checkpoint, 2 safetensors shards, sentencepiece tokenizer.model only."""
    pieces = train_sentencepiece_pieces()
    tower_cfg = tiny_clip_config()
    tower_dir = root / "clip-vit-tiny-patch4-16"
    vision = write_tower_folder(tower_dir, tower_cfg, seed=1)
    text_cfg = MistralConfig(
        vocab_size=len(pieces),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    llm = _llm(text_cfg, seed=2)
    projector = _projector(32, 32, seed=3, linear=False)
    folder = root / "llava-med-v1.5-mistral-tiny"
    state = {k: v for k, v in llm.state_dict().items()}
    state |= {f"model.mm_projector.{k}": v for k, v in projector.items()}
    state |= {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in vision.items()}
    save_weights(folder, state, kind="safetensors", shards=2)
    config = _llm_config_dict(text_cfg) | {
        "model_type": "llava_mistral",
        "architectures": ["LlavaMistralForCausalLM"],
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_hidden_size": 32,
        "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_projector_lr": None,
        "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "use_mm_proj": True,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "feature_outs": "encoder+decoder",
        "img_size": 640,
        "vision_backbone": "convnext-large",
        "segtok_posembed": "sincos",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_sentencepiece_files(folder, pieces, legacy=True)
    return Original(
        folder=folder,
        fmt="llava_mistral",
        template="mistral_instruct",
        llm=llm,
        vision_kind="clip",
        vision_layers=2,
        drop_first_token=True,
        projector=projector,
        tower_folder=tower_dir,
        tower_from_folder=vision,
        tower_from_checkpoint=vision,
        tower_config=tower_cfg,
        image_mean=CLIP_MEAN,
        image_size=16,
        center_crop=True,
        pad=True,
        encode=_sp_encoder(pieces),
        bos_id=1,
        config=config,
    )


def build_llava_med_v10(root: Path) -> Original:
    """LLaVA-Med v1.0: `llava` on LLaMA, single-linear projector, no tower weights in the
    checkpoint (the tower was a list attribute), `<im_patch>/<im_start>/<im_end>` added,
    persistent RoPE `inv_freq` buffers, one `pytorch_model.bin`, no image padding."""
    pieces = train_sentencepiece_pieces()
    added = {"<im_patch>": len(pieces), "<im_start>": len(pieces) + 1, "<im_end>": len(pieces) + 2}
    tower_cfg = tiny_clip_config(image_size=16)
    tower_dir = root / "clip-vit-tiny-patch4"
    vision = write_tower_folder(tower_dir, tower_cfg, seed=11)
    text_cfg = LlamaConfig(
        vocab_size=len(pieces) + 3,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    llm = _llm(text_cfg, seed=12)
    projector = _projector(32, 32, seed=13, linear=True)
    folder = root / "llava-med-v1.0-tiny"
    state = {k: v for k, v in llm.state_dict().items()}
    state |= {f"model.mm_projector.{k}": v for k, v in projector.items()}
    head_dim = 8
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    state |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq for i in range(2)}
    save_weights(folder, state, kind="bin")
    config = _llm_config_dict(text_cfg) | {
        "model_type": "llava",
        "architectures": ["LlavaLlamaForCausalLM"],
        "mm_vision_tower": str(tower_dir),
        "mm_hidden_size": 32,
        "mm_vision_select_layer": -2,
        "mm_use_im_start_end": True,
        "use_mm_proj": True,
        "tune_mm_mlp_adapter": False,
        "sep_image_conv_front": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_sentencepiece_files(folder, pieces, legacy=True, added_tokens=added)
    return Original(
        folder=folder,
        fmt="llava",
        template="llava_v1_med",
        llm=llm,
        vision_kind="clip",
        vision_layers=2,
        drop_first_token=True,
        projector=projector,
        tower_folder=tower_dir,
        tower_from_folder=vision,
        tower_from_checkpoint=None,
        tower_config=tower_cfg,
        image_mean=CLIP_MEAN,
        image_size=16,
        center_crop=True,
        pad=False,
        encode=_sp_encoder(pieces, tuple(added)),
        bos_id=1,
        config=config,
    )


def build_tiny_llava(root: Path, llm_family: str) -> Original:
    """Legacy TinyLLaVA (`tiny_llava*`): SigLIP tower folder with N layers, the checkpoint holds
    N-1 fine-tuned layers (TinyLLaVA-Med-F tunes the whole model) plus post_layernorm."""
    tower_cfg = tiny_siglip_config(layers=3)
    tower_dir = root / f"siglip-tiny-patch4-16-{llm_family}"
    vision = write_tower_folder(tower_dir, tower_cfg, seed=21)
    ckpt_vision = _fine_tuned(
        {k: v for k, v in vision.items() if not k.startswith(("head.", "encoder.layers.2."))},
        seed=22,
    )
    folder = root / f"tinyllava-{llm_family}"
    if llm_family == "llama":
        pieces = train_sentencepiece_pieces()
        write_sentencepiece_files(folder, pieces, legacy=False, with_tokenizer_json=True)
        vocab = len(pieces)
        encode, bos = _sp_encoder(pieces), 1
        text_cfg: PretrainedConfig = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )
        model_type, arch, template = "tiny_llava", "TinyLlavaLlamaForCausalLM", "v1"
    else:
        cls = "CodeGenTokenizer" if llm_family == "phi" else "GPT2Tokenizer"
        write_byte_level_tokenizer(folder, cls)
        source_tok = AutoTokenizer.from_pretrained(folder)
        vocab = (
            len(source_tok) + 20
        )  # embeddings padded beyond the tokenizer, as Phi-2 / StableLM-2
        encode, bos = (lambda text: source_tok(text).input_ids), source_tok.bos_token_id
        template = "phi"
        if llm_family == "phi":
            text_cfg = PhiConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=256,
                partial_rotary_factor=0.5,
                tie_word_embeddings=False,
                bos_token_id=0,
                eos_token_id=0,
            )
            model_type, arch = "tiny_llava_phi", "TinyLlavaPhiForCausalLM"
        else:
            text_cfg = StableLmConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                partial_rotary_factor=0.25,
                layer_norm_eps=1e-5,
                use_qkv_bias=True,
                tie_word_embeddings=False,
                bos_token_id=0,
                eos_token_id=0,
            )
            model_type, arch = "tiny_llava_stablelm", "TinyLlavaStablelmForCausalLM"
    llm = _llm(text_cfg, seed=23)
    if llm_family == "phi":  # TinyLLaVA's Phi LM head is Linear(bias=False)
        with torch.no_grad():
            llm.lm_head.bias.zero_()
    projector = _projector(32, 32, seed=24, linear=False)
    state = {k: v for k, v in llm.state_dict().items() if k != "lm_head.bias"}
    state |= {f"model.mm_projector.{k}": v for k, v in projector.items()}
    state |= {
        f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in ckpt_vision.items()
    }
    save_weights(folder, state, kind="bin", shards=2 if llm_family == "llama" else 1)
    config = _llm_config_dict(text_cfg)
    if llm_family == "stablelm":  # StableLM-epoch remote-code config names
        config = {
            k: v
            for k, v in config.items()
            if k
            not in (
                "partial_rotary_factor",
                "layer_norm_eps",
                "qk_layernorm",
                "use_parallel_residual",
                "hidden_dropout",
            )
        }
        config |= {"rope_pct": 0.25, "norm_eps": 1e-5, "use_qkv_bias": True}
    config |= {
        "model_type": model_type,
        "architectures": [arch],
        "mm_vision_tower": str(tower_dir),
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_hidden_size": 32,
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 2048,
        "use_mm_proj": True,
        "image_grid_pinpoints": None,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return Original(
        folder=folder,
        fmt="tiny_llava",
        template=template,
        llm=llm,
        vision_kind="siglip",
        vision_layers=2,
        drop_first_token=False,
        projector=projector,
        tower_folder=tower_dir,
        tower_from_folder=vision,
        tower_from_checkpoint=ckpt_vision,
        tower_config=tower_cfg,
        image_mean=(0.5, 0.5, 0.5),
        image_size=16,
        center_crop=False,
        pad=True,
        encode=encode,
        bos_id=bos,
        config=config,
    )


# TinyLLaVA_Factory's LLM families besides TinyLlama: its templates (`qwen2_base`, `gemma`), the
# hub id its config names, and the tokenizer class (a byte-level BPE stands in for each here)
FACTORY_FAMILIES = {
    "qwen2": ("phi", "Qwen/Qwen2-0.5B", "Qwen2Tokenizer"),
    "gemma": ("gemma", "google/gemma-2b-it", "PreTrainedTokenizerFast"),
}


def build_factory(root: Path, llm_family: str = "llama") -> Original:
    """TinyLLaVA_Factory (`tinyllava`): configs embedded, tower by hub id, full tower (N layers and
    head) in the checkpoint under `vision_tower._vision_tower`, connector `connector._connector`.
    `llm_family`: TinyLlama (a sentencepiece tokenizer, `legacy: false`), Qwen2 or Gemma."""
    folder = root / f"tinyllava-factory-{llm_family}"
    tower_cfg = tiny_siglip_config(layers=3)
    vision = _random_vision_state(tower_cfg, seed=31)
    shape = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    text_cfg: PretrainedConfig
    if llm_family == "llama":
        pieces = train_sentencepiece_pieces()
        write_sentencepiece_files(folder, pieces, legacy=False, with_tokenizer_json=True)
        vocab, template, hub = len(pieces), "v1", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
        encode, bos = _sp_encoder(pieces), 1
        text_cfg = LlamaConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, **shape)
        arch = "LlamaForCausalLM"
    else:
        template, hub, cls = FACTORY_FAMILIES[llm_family]
        write_byte_level_tokenizer(folder, cls)
        source_tok = AutoTokenizer.from_pretrained(folder)
        vocab = len(source_tok) + 12  # embeddings padded beyond the tokenizer, as Qwen2's
        encode, bos = (lambda text: source_tok(text).input_ids), None
        eos = source_tok.eos_token_id
        if llm_family == "qwen2":
            text_cfg = Qwen2Config(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, **shape)
            arch = "Qwen2ForCausalLM"
        else:
            text_cfg = GemmaConfig(
                vocab_size=vocab, head_dim=8, bos_token_id=eos, eos_token_id=eos, **shape
            )
            arch = "GemmaForCausalLM"
    llm = _llm(text_cfg, seed=32)
    projector = _projector(32, 32, seed=33, linear=False)
    state = {f"language_model.{k}": v for k, v in llm.state_dict().items()}
    state |= {f"connector._connector.{k}": v for k, v in projector.items()}
    state |= {f"vision_tower._vision_tower.vision_model.{k}": v for k, v in vision.items()}
    save_weights(folder, state, kind="safetensors")
    text = text_cfg.to_dict() | {"architectures": [arch]}
    vision_dict = tower_cfg.to_dict() | {"model_type": "siglip_vision_model"}
    config = {
        "model_type": "tinyllava",
        "architectures": ["TinyLlavaForConditionalGeneration"],
        "llm_model_name_or_path": hub,
        "tokenizer_name_or_path": hub,
        "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
        "vision_model_name_or_path2": "",
        "connector_type": "mlp2x_gelu",
        "text_config": text,
        "vision_config": vision_dict,
        "hidden_size": 32,
        "vocab_size": vocab,
        "vision_hidden_size": 32,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "patch",
        "image_aspect_ratio": "pad",
        "image_token_index": -200,
        "ignore_index": -100,
        "pad_token": "<unk>" if llm_family == "llama" else "<|endoftext|>",
        "pad_token_id": 0 if llm_family == "llama" else text_cfg.eos_token_id,
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 2048,
        "tokenizer_use_fast": False,
        "tune_type_llm": "full",
        "tune_type_connector": "full",
        "tune_type_vision_tower": "frozen",
        "tune_vision_tower_from_layer": 0,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return Original(
        folder=folder,
        fmt="tinyllava",
        template=template,
        llm=llm,
        vision_kind="siglip",
        vision_layers=2,
        drop_first_token=True,
        projector=projector,
        tower_folder=folder,
        tower_from_folder=vision,
        tower_from_checkpoint=vision,
        tower_config=tower_cfg,
        image_mean=(0.5, 0.5, 0.5),
        image_size=16,
        center_crop=False,
        pad=True,
        encode=encode,
        bos_id=bos,
        config=config,
    )


# ---------------------------------------------------------------------------------------------
# Running the originals by hand


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def original_pixels(orig: Original, image: Image.Image) -> torch.Tensor:
    return reference_pixels(
        image,
        orig.image_mean,
        orig.image_std,
        orig.image_size,
        center_crop=orig.center_crop,
        pad=orig.pad,
    )


def reference_pixels(
    image: Image.Image,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    size: int,
    *,
    center_crop: bool,
    pad: bool,
) -> torch.Tensor:
    """expand2square (when `image_aspect_ratio: pad`) + the tower's image processor, by hand."""
    image = image.convert("RGB")
    if pad:
        image = expand2square(image, tuple(int(m * 255) for m in mean))
    if center_crop:  # CLIPImageProcessor: shortest edge -> size, then centre crop
        width, height = image.size
        if width <= height:
            new = (size, int(size * height / width))
        else:
            new = (int(size * width / height), size)
        image = image.resize(new, Image.Resampling.BICUBIC)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    else:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1)).unsqueeze(0)


def original_image_features(orig: Original, pixels: torch.Tensor, tower: str) -> torch.Tensor:
    """Tower (its first `vision_layers` encoder layers, by hand) + token drop + projector."""
    weights = orig.tower_from_checkpoint if tower == "checkpoint" else orig.tower_from_folder
    assert weights is not None
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layers."))
    config = orig.tower_config.__class__(
        **{**orig.tower_config.to_dict(), "num_hidden_layers": layers}
    )
    if orig.vision_kind == "siglip":
        config.vision_use_head = any(k.startswith("head.") for k in weights)
    model_class = CLIPVisionModel if orig.vision_kind == "clip" else SiglipVisionModel
    vision = model_class(config).eval()
    vision.load_state_dict(weights, strict=True)
    with torch.no_grad():
        hidden = vision.embeddings(pixels)
        if orig.vision_kind == "clip":
            hidden = vision.pre_layrnorm(hidden)
        for layer in vision.encoder.layers[: orig.vision_layers]:
            hidden = layer(hidden, None)
        if orig.drop_first_token:
            hidden = hidden[:, 1:]
        p = orig.projector
        if "weight" in p:
            return F.linear(hidden, p["weight"], p["bias"])
        hidden = F.gelu(F.linear(hidden, p["0.weight"], p["0.bias"]))  # nn.GELU(): exact erf
        return F.linear(hidden, p["2.weight"], p["2.bias"])


def original_logits(
    orig: Original,
    ids: list[int],
    pixels: torch.Tensor,
    *,
    tower: str = "checkpoint",
    image_id: int = IMAGE_TOKEN_INDEX,
) -> torch.Tensor:
    """Next-token logits of the original arrangement: image features spliced in place of the
    image position(s) in `ids` (one IMAGE_TOKEN_INDEX, or a run of patch tokens for v1.0)."""
    features = original_image_features(orig, pixels, tower)[0]
    embed = orig.llm.get_input_embeddings()
    positions = [i for i, t in enumerate(ids) if t == image_id]
    with torch.no_grad():
        if image_id == IMAGE_TOKEN_INDEX:
            (at,) = positions
            before = embed(torch.tensor(ids[:at]))
            after = embed(torch.tensor(ids[at + 1 :]))
            inputs = torch.cat([before, features, after])
        else:  # LLaVA v1.0: the patch-token embeddings are replaced in place
            assert len(positions) == features.shape[0]
            inputs = embed(torch.tensor(ids)).clone()
            inputs[positions[0] : positions[-1] + 1] = features
        return orig.llm(inputs_embeds=inputs.unsqueeze(0)).logits[0, -1]
