"""Tiny LLaVA models built from configs: the demo model's architecture and the tests' stand-in.

`build_tokenizer` trains a byte-level BPE tokenizer locally (no download); `build_tiny_llava`
makes a served-format `LlavaForConditionalGeneration` (SigLIP-style tower, LLaMA-style LLM,
`mlp2x_gelu` projector) with its processor and writes it like any other served checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from tinyllava_med.model.meta import ServedMeta, publish_modes
from tinyllava_med.model.processor import build_processor

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


@dataclass(frozen=True)
class TinyShape:
    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    intermediate: int = 256
    vocab_size: int = 1024
    max_positions: int = 512
    initializer_range: float = 0.02


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with LLaMA's special tokens and `<image>`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def tiny_llava_config(shape: TinyShape, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = SiglipVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_hidden * 4,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        num_channels=3,
    )
    text = LlamaConfig(
        hidden_size=shape.text_hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=shape.max_positions,
        initializer_range=shape.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=int(tokenizer.convert_tokens_to_ids("<image>")),  # type: ignore[arg-type]
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
        image_seq_length=(shape.image_size // shape.patch_size) ** 2,
        tie_word_embeddings=False,
    )


def build_tiny_llava(
    texts: Iterable[str], shape: TinyShape = TinyShape(), seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LLaVA and its processor (template `v1`, greyscale-friendly)."""
    tokenizer = build_tokenizer(texts, shape.vocab_size)
    processor = build_processor(
        tokenizer,
        template="v1",
        vision="siglip",
        image_size=shape.image_size,
        patch_size=shape.patch_size,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(shape, tokenizer))
    model.eval()
    return model, processor


def save_served(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    out_dir: str | Path,
    meta: ServedMeta,
) -> Path:
    """Write a served-format folder: weights, processor and `tinyllava_med.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    meta.save(out)
    publish_modes(out)
    return out
