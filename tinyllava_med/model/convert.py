"""`tinyllava-med convert`: original LLaVA-Med / TinyLLaVA / TinyLLaVA_Factory checkpoints -> served format.

The served format is a transformers `LlavaForConditionalGeneration` folder with its processor
and `tinyllava_med.json` (`ServedMeta`). A converted model gives the same next-token logits as
the original code on the same weights, image and question (FIDELITY.md); nothing is patched at
load time. Formats (`SOURCE_FORMATS`): `llava_mistral` (LLaVA-Med v1.5), `llava` (LLaVA-Med v1.0
and LLaVA on LLaMA), `tiny_llava` (legacy TinyLLaVA, TinyLLaVA-Med-F), `tinyllava`
(TinyLLaVA_Factory). Format knowledge lives in `convert_formats`, weight handling in
`convert_weights`, tokenizers in `convert_tokenizer`, the processor in `processor`.

    tinyllava-med convert ./llava-med-v1.5-mistral-7b ./data/models/llava-med
    tinyllava-med convert ./TinyLLaVA-Med-F ./data/models/tinyllava-med-f --vision-tower ./siglip-so400m-patch14-384
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from tinyllava_med.model import convert_weights as cw
from tinyllava_med.model.convert_formats import (
    SOURCE_FORMATS,
    SourcePlan,
    format_of_config,
    plan_conversion,
    read_config,
    served_vision_config,
)
from tinyllava_med.model.convert_tokenizer import TOKENIZER_FILES, load_source_tokenizer
from tinyllava_med.model.convert_weights import ConversionError
from tinyllava_med.model.meta import ServedMeta, hash_files, publish_modes
from tinyllava_med.model.processor import add_image_token, build_processor, image_token_count
from tinyllava_med.model.prompts import IMAGE_TOKEN

__all__ = ["SOURCE_FORMATS", "ConversionError", "convert_checkpoint", "detect_format"]

log = logging.getLogger(__name__)

VisionWeights = Literal["checkpoint", "tower"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def detect_format(src: str | Path) -> str:
    """The format of the checkpoint folder `src`: one of `SOURCE_FORMATS`, or "served"."""
    return format_of_config(read_config(Path(src)))


def _vision_weights(
    plan: SourcePlan,
    from_checkpoint: dict[str, torch.Tensor],
    choice: VisionWeights,
) -> tuple[dict[str, torch.Tensor], str, str]:
    """The tower weights to serve, where they came from, and a note on what was done to them."""
    layers_in_config = int(plan.vision_config["num_hidden_layers"])
    keep = layers_in_config - 1 if plan.drop_last_layer else layers_in_config
    if choice == "checkpoint" and from_checkpoint:
        vision, source = from_checkpoint, "checkpoint"
        found = cw.count_layers(vision)
        if found != keep:
            raise ConversionError(
                f"the checkpoint's vision tower has {found} layers, expected {keep} "
                f"(tower config: {layers_in_config} layers"
                f"{', the original drops the last one' if plan.drop_last_layer else ''})"
            )
    else:
        if plan.tower_folder is None:
            raise ConversionError(
                f"the vision weights must come from the tower {plan.tower_ref!r} "
                f"({'requested' if choice == 'tower' else 'the checkpoint holds none'}), "
                "but it is not a local folder: pass vision_tower_path / --vision-tower"
            )
        vision, source = cw.read_tower_folder(plan.tower_folder), "tower"
        if plan.drop_last_layer:
            vision = cw.keep_first_layers(vision, keep)
    note = f"vision tower from the {source} ({cw.count_layers(vision)} layers"
    note += (
        f" of {layers_in_config}: the original deletes the last)" if plan.drop_last_layer else ")"
    )
    return vision, source, note


def _served_weights(
    plan: SourcePlan, state: dict[str, torch.Tensor], vision_weights: VisionWeights
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor], str, list[str]]:
    """Checkpoint weights under served names (+ the tower's), their source names, the tower
    weights, where the tower came from, and notes on everything not copied one to one."""
    mapped = cw.map_keys(state, plan.rules)
    tensors = mapped.tensors
    vision, vision_source, vision_note = _vision_weights(plan, mapped.vision, vision_weights)
    tensors.update(cw.served_vision(vision))
    notes = [vision_note]
    if mapped.derived:
        notes.append(f"dropped {len(mapped.derived)} recomputed buffer(s) (RoPE, position_ids)")
    notes += [f"dropped {key}" for key in _drop_zero_lm_head_bias(tensors)]
    if plan.projector == "linear":
        cw.linear_projector(tensors, plan.text_config.hidden_size)
        notes.append("single-linear projector served as linear_1 -> identity -> linear_2 = I")
    return tensors, mapped.sources, vision, vision_source, notes


def _llava_config(
    plan: SourcePlan,
    vision: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    rows: int,
    image_token_id: int,
    tied: bool,
) -> LlavaConfig:
    text_config = plan.text_config
    text_config.vocab_size = rows
    text_config.pad_token_id = tokenizer.pad_token_id
    text_config.bos_token_id = tokenizer.bos_token_id
    text_config.eos_token_id = tokenizer.eos_token_id
    has_head = any(k.startswith("head.") for k in vision)
    return LlavaConfig(
        vision_config=served_vision_config(plan, cw.count_layers(vision), use_head=has_head),
        text_config=text_config,
        image_token_index=image_token_id,
        projector_hidden_act="gelu" if plan.projector == "mlp2x_gelu" else "linear",
        vision_feature_layer=plan.feature_layer,
        vision_feature_select_strategy=plan.strategy,
        multimodal_projector_bias=True,
        image_seq_length=image_token_count(
            plan.image_size,
            plan.patch_size,
            cls_token=plan.image_spec.cls_token,
            strategy=plan.strategy,
        ),
        tie_word_embeddings=tied,
    )


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def _drop_zero_lm_head_bias(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Phi's HF LM head has a bias that LlavaForConditionalGeneration cannot hold: drop it only if zero."""
    bias = tensors.get("lm_head.bias")
    if bias is None:
        return []
    if torch.count_nonzero(bias):
        raise ConversionError(
            "lm_head.bias is non-zero, and LlavaForConditionalGeneration's LM head has no bias: "
            "this checkpoint cannot be served with exact logits"
        )
    del tensors["lm_head.bias"]
    return ["lm_head.bias (all zeros)"]


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    source_format: str | None = None,
    vision_tower_path: str | Path | None = None,
    vision_weights: VisionWeights = "checkpoint",
    dtype: str = "auto",
    template: str | None = None,
    tokenizer_path: str | Path | None = None,
) -> Path:
    """Convert the original checkpoint folder `src` into a served-format folder `dst`.

    `vision_weights="checkpoint"` serves the checkpoint's own tower weights when it holds them
    (the tower may have been fine-tuned) and otherwise reads the tower folder
    (`vision_tower_path`, else the config's `mm_vision_tower` when it is a local folder);
    `"tower"` always reads the folder, as the original code did at inference. `dtype="auto"`
    keeps the checkpoint's dtype; "fp32" / "fp16" / "bf16" cast. `template` overrides the prompt
    template; `tokenizer_path` the tokenizer folder (default: `src`). Returns `dst`.
    """
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if vision_weights not in ("checkpoint", "tower"):
        raise ValueError(f"vision_weights must be 'checkpoint' or 'tower', not {vision_weights!r}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: auto, {', '.join(DTYPES)}")
    config = read_config(src)
    fmt = source_format or format_of_config(config)
    if fmt == "served":
        raise ConversionError(
            f"{src} is already in the served format (LlavaForConditionalGeneration)"
        )
    plan = plan_conversion(fmt, config, src, vision_tower_path=vision_tower_path, template=template)

    files = cw.weight_files(src)
    state = cw.read_state_dict(files)
    target_dtype = DTYPES[dtype] if dtype != "auto" else cw.dominant_dtype(state)
    tensors, sources, vision, vision_source, notes = _served_weights(plan, state, vision_weights)
    if fmt == "llava" and config.get("mm_use_im_start_end"):
        notes.append(
            "LLaVA-Med v1.0 prompt: the original put the image after the question as "
            "<im_start><image><im_end> (tokens kept in the vocabulary); the template must do the same"
        )

    tokenizer = load_source_tokenizer(tokenizer_path or src)
    image_token_id = add_image_token(tokenizer, IMAGE_TOKEN)
    rows_before = tensors[cw.EMBED_KEY].shape[0]
    rows = cw.pad_vocabulary(tensors, len(tokenizer))
    if rows != rows_before:
        notes.append(f"vocabulary {rows_before} -> {rows} rows (<image> added, mean-initialised)")
    tied = bool(getattr(plan.text_config, "tie_word_embeddings", False))
    if tied:
        tensors[cw.LM_HEAD_KEY] = tensors[cw.EMBED_KEY]

    llava_config = _llava_config(plan, vision, tokenizer, rows, image_token_id, tied)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    cw.check_shapes(tensors, expected, sources)
    model.load_state_dict(_cast(tensors, target_dtype), strict=True, assign=True)
    if tied:
        model.tie_weights()
    model.config.dtype = target_dtype

    processor = build_processor(
        tokenizer,
        template=plan.template,
        vision=plan.image_spec,
        image_size=plan.image_size,
        patch_size=plan.patch_size,
        vision_feature_select_strategy=plan.strategy,
        pad=plan.pad,
    )

    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    processor.save_pretrained(dst)
    hashed = [
        *files,
        src / "config.json",
        *(src / n for n in TOKENIZER_FILES if (src / n).is_file()),
    ]
    ServedMeta(
        template=plan.template,
        source_format=fmt,
        source_hash=hash_files(sorted(set(hashed))),
        vision_weights=vision_source,
        notes="; ".join(notes),
    ).save(dst)
    publish_modes(dst)
    log.info("converted %s (%s) -> %s: %s", src, fmt, dst, "; ".join(notes))
    return dst
