"""What each original checkpoint format means: its config fields, key names, tower and prompt.

`plan_conversion` reads an original `config.json` and returns a `SourcePlan`: the LLM config,
the vision tower (kind, config, where its weights and preprocessing come from), the key-rename
rules, the projector, which tower layer feeds the projector, the prompt template and the image
preprocessing. The facts come from the original code (see FIDELITY.md and the report):

| format | original code | projector | tower features |
| --- | --- | --- | --- |
| `llava_mistral` | LLaVA-Med v1.5 `llava_arch.py`, `clip_encoder.py` | `mm_projector.{0,2}` | CLIP `hidden_states[select_layer]`, CLS dropped |
| `llava` | LLaVA-Med v1.0 `llava/model/llava.py` (and LLaVA v1.5 on LLaMA) | `mm_projector` (linear) or `{0,2}` | as above |
| `tiny_llava` | TinyLLaVABench `siglip_encoder.py` | `mm_projector.{0,2}` | SigLIP minus last layer, last hidden state, no post-LN |
| `tinyllava` | TinyLLaVA_Factory `vision_tower/base.py` | `connector._connector.{0,2}` | `hidden_states[vision_feature_layer]`, first token dropped if `patch` |
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import AutoConfig, CLIPVisionConfig, PretrainedConfig, SiglipVisionConfig

from tinyllava_med.model.convert_weights import VISION, ConversionError
from tinyllava_med.model.processor import (
    CLIP_SPEC,
    SIGLIP_SPEC,
    ImageProcessorSpec,
    SelectStrategy,
)
from tinyllava_med.model.prompts import TEMPLATES

SourceFormat = Literal["llava_mistral", "llava", "tiny_llava", "tinyllava"]
SOURCE_FORMATS: tuple[str, ...] = ("llava_mistral", "llava", "tiny_llava", "tinyllava")
VisionKind = Literal["clip", "siglip"]

# Key renames, first match wins. `VISION` collects the checkpoint's own tower weights.
_LLAVA_VISION = ("model.vision_tower.vision_tower.vision_model.", VISION)
_LLAVA_LLM = (("model.", "model.language_model."), ("lm_head.", "lm_head."))
LLAVA_RULES = {
    "mlp2x_gelu": (
        _LLAVA_VISION,
        ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
        ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
        *_LLAVA_LLM,
    ),
    "linear": (
        _LLAVA_VISION,
        ("model.mm_projector.", "model.multi_modal_projector.linear_1."),
        *_LLAVA_LLM,
    ),
}
_FACTORY_VISION = ("vision_tower._vision_tower.vision_model.", VISION)
_FACTORY_LLM = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)
FACTORY_RULES = {
    "mlp2x_gelu": (
        _FACTORY_VISION,
        ("connector._connector.0.", "model.multi_modal_projector.linear_1."),
        ("connector._connector.2.", "model.multi_modal_projector.linear_2."),
        *_FACTORY_LLM,
    ),
    "linear": (
        _FACTORY_VISION,
        ("connector._connector.", "model.multi_modal_projector.linear_1."),
        *_FACTORY_LLM,
    ),
}

# Towers the originals name by hub id, for when no local tower folder is given.
_CLIP_L14: dict[str, Any] = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {**_CLIP_L14, "image_size": 336},
    "openai/clip-vit-large-patch14": {**_CLIP_L14, "image_size": 224},
    "google/siglip-so400m-patch14-384": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    },
}

# Legacy TinyLLaVA model_type -> LLM model_type; StableLM-epoch config names -> transformers'.
TINY_LLAVA_LLMS = {
    "tiny_llava": "llama",
    "tiny_llava_phi": "phi",
    "tiny_llava_stablelm": "stablelm",
}
CONFIG_RENAMES = {"rope_pct": "partial_rotary_factor", "norm_eps": "layer_norm_eps"}
LEGACY_CONFIG_KEYS = {"rope_theta", "rope_scaling", "partial_rotary_factor"}
# Prompt template per LLM family when the format does not fix it (TinyLLaVA / Factory).
# TinyLLaVA_Factory's `qwen2_base` template is `phi`'s text and end of turn; its `gemma`, that text
# with Gemma's `<eos>`.
FAMILY_TEMPLATES = {
    "llama": "v1",
    "phi": "phi",
    "stablelm": "phi",
    "qwen2": "phi",
    "gemma": "gemma",
}
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


@dataclass
class SourcePlan:
    source_format: str
    llm_type: str
    text_config: PretrainedConfig
    vision_kind: VisionKind
    vision_config: dict[str, Any]  # the tower's config as the original built it (all its layers)
    tower_ref: str | None  # `mm_vision_tower` / `vision_model_name_or_path` as written
    tower_folder: Path | None  # a local folder holding that tower
    rules: tuple[tuple[str, str], ...]
    projector: Literal["mlp2x_gelu", "linear"]
    feature_layer: int  # served `vision_feature_layer`
    strategy: SelectStrategy
    drop_last_layer: bool  # TinyLLaVA's SigLIP wrapper deletes the tower's last layer
    template: str
    pad: bool
    image_spec: ImageProcessorSpec
    image_size: int

    @property
    def patch_size(self) -> int:
        return int(self.vision_config["patch_size"])


def read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not src.is_dir():
        raise ConversionError(f"{src}: no such folder (the downloaded checkpoint's folder)")
    if not path.is_file():
        raise ConversionError(f"{src} has no config.json: not a checkpoint folder")
    return json.loads(path.read_text())


def format_of_config(config: dict[str, Any]) -> str:
    """The source format a config.json describes ("served" for an already converted folder)."""
    model_type = str(config.get("model_type", ""))
    if model_type == "llava_mistral":
        return "llava_mistral"
    if model_type == "tinyllava":
        return "tinyllava"
    if model_type.startswith("tiny_llava"):
        return "tiny_llava"
    if model_type == "llava" and "text_config" in config and "vision_config" in config:
        return "served"
    if model_type in ("llava", "llava_llama") and "mm_vision_tower" in config:
        return "llava"
    raise ConversionError(
        f"unrecognised checkpoint (model_type={model_type!r}); known formats: "
        f"{', '.join(SOURCE_FORMATS)} (config.json model_type llava_mistral, llava, tiny_llava*, tinyllava)"
    )


def text_config_from(fields: dict[str, Any], llm_type: str) -> PretrainedConfig:
    """The LLM's transformers config from an original config (LLaVA's mm_* fields are dropped)."""
    config_class = AutoConfig.for_model(llm_type).__class__
    known = {f.name for f in dataclasses.fields(config_class)} | LEGACY_CONFIG_KEYS
    known -= {"architectures", "dtype", "transformers_version"}
    renamed = {CONFIG_RENAMES.get(k, k): v for k, v in fields.items()}
    return AutoConfig.for_model(llm_type, **{k: v for k, v in renamed.items() if k in known})


def _tower_folder(explicit: str | Path | None, ref: str | None, src: Path) -> Path | None:
    if explicit is not None:
        folder = Path(explicit).expanduser()
        if not (folder / "config.json").is_file():
            raise ConversionError(f"vision tower folder {folder} has no config.json")
        return folder
    for candidate in [Path(ref).expanduser(), src / ref] if ref else []:
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _tower_config(
    folder: Path | None, ref: str | None, embedded: dict[str, Any] | None
) -> dict[str, Any]:
    if embedded:
        return dict(embedded)
    if folder is not None:
        config = json.loads((folder / "config.json").read_text())
        return dict(config.get("vision_config") or config)
    # A hub id, or the authors' own path to a hub tower (".../siglip-so400m-patch14-384").
    known = {name.split("/")[-1]: config for name, config in KNOWN_TOWERS.items()}
    name = str(ref or "").rstrip("/").split("/")[-1]
    if ref in KNOWN_TOWERS or name in known:
        return dict(KNOWN_TOWERS.get(str(ref)) or known[name])
    raise ConversionError(
        f"the vision tower {ref!r} is not a local folder and not one of {', '.join(KNOWN_TOWERS)}: "
        "pass the folder of the original vision tower (vision_tower_path / --vision-tower)"
    )


def _image_spec(
    kind: VisionKind, folder: Path | None, image_size: int, read_folder: bool
) -> tuple[ImageProcessorSpec, int]:
    """How the original preprocessed images, and the final square size."""
    spec = CLIP_SPEC if kind == "clip" else SIGLIP_SPEC
    path = folder / "preprocessor_config.json" if folder is not None else None
    if not read_folder or path is None or not path.is_file():
        return spec, image_size
    pre = json.loads(path.read_text())
    size = pre.get("crop_size") if spec.center_crop else pre.get("size")
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    spec = dataclasses.replace(
        spec,
        image_mean=tuple(pre.get("image_mean", spec.image_mean)),
        image_std=tuple(pre.get("image_std", spec.image_std)),
        resample=int(pre.get("resample", spec.resample)),
    )
    return spec, int(size or image_size)


def _projector(kind: str | None, source: str) -> Literal["mlp2x_gelu", "linear"]:
    if kind in (None, "linear"):
        return "linear"
    if kind == "mlp2x_gelu":
        return "mlp2x_gelu"
    raise ConversionError(
        f"projector {kind!r} of this {source} checkpoint is not supported (mlp2x_gelu, linear)"
    )


def _strategy(value: str, what: str) -> SelectStrategy:
    if value not in SELECT_FEATURE:
        raise ConversionError(f"{what}={value!r} is not supported ({', '.join(SELECT_FEATURE)})")
    return SELECT_FEATURE[value]  # type: ignore[return-value]


def plan_conversion(
    source_format: str,
    config: dict[str, Any],
    src: Path,
    *,
    vision_tower_path: str | Path | None = None,
    template: str | None = None,
) -> SourcePlan:
    """Everything about one original checkpoint that the conversion needs, from its config."""
    if source_format not in SOURCE_FORMATS:
        raise ConversionError(
            f"unknown source format {source_format!r}; known: {', '.join(SOURCE_FORMATS)}"
        )
    factory = source_format == "tinyllava"
    if factory:
        text_fields = dict(config.get("text_config") or {})
        llm_type = str(text_fields.get("model_type") or "")
        if not llm_type:
            name = str(config.get("llm_model_name_or_path", "")).lower()
            llm_type = next(
                (t for t in ("phi", "stablelm", "qwen2", "gemma") if t in name), "llama"
            )
        tower_ref = config.get("vision_model_name_or_path") or None
        embedded = config.get("vision_config")
        projector = _projector(config.get("connector_type"), "TinyLLaVA_Factory")
        rules = FACTORY_RULES[projector]
        layer = int(config.get("vision_feature_layer", -2))
        strategy = _strategy(
            config.get("vision_feature_select_strategy", "patch"), "vision_feature_select_strategy"
        )
    else:
        text_fields = dict(config)
        if source_format == "llava_mistral":
            llm_type = "mistral"
        elif source_format == "llava":
            llm_type = "llama"
        elif config.get("model_type") in TINY_LLAVA_LLMS:
            llm_type = TINY_LLAVA_LLMS[config["model_type"]]
        else:
            raise ConversionError(
                f"TinyLLaVA model_type {config.get('model_type')!r} is not supported "
                f"({', '.join(TINY_LLAVA_LLMS)})"
            )
        tower_ref = config.get("mm_vision_tower") or config.get("vision_tower")
        embedded = None
        projector = _projector(config.get("mm_projector_type"), "LLaVA")
        rules = LLAVA_RULES[projector]
        layer = int(config.get("mm_vision_select_layer", -1 if source_format == "llava" else -2))
        strategy = _strategy(
            config.get("mm_vision_select_feature", "patch"), "mm_vision_select_feature"
        )
    if tower_ref is not None:
        tower_ref = str(tower_ref).split(":")[-1] if factory else str(tower_ref)
    if config.get("mm_use_im_start_end") and not (
        source_format == "llava" and projector == "linear"
    ):
        raise ConversionError(
            "mm_use_im_start_end=true is only supported for LLaVA-Med v1.0 (`llava`, linear projector)"
        )

    folder = _tower_folder(vision_tower_path, tower_ref, src)
    vision_config = _tower_config(folder, tower_ref, embedded)
    vision_type = str(vision_config.get("model_type", ""))
    if vision_type.startswith("siglip") or (not vision_type and "siglip" in str(tower_ref).lower()):
        kind: VisionKind = "siglip"
    elif vision_type.startswith("clip") or not vision_type:
        kind = "clip"
    else:
        raise ConversionError(f"vision tower type {vision_type!r} is not supported (CLIP, SigLIP)")

    # TinyLLaVA's SigLIP wrapper: last layer deleted, last hidden state, no post-LN, all 729 tokens.
    drop_last = source_format == "tiny_llava" and kind == "siglip"
    if drop_last:
        layer, strategy = -1, "full"
    read_folder = kind == "clip" or factory  # legacy TinyLLaVA hard-codes SigLIP preprocessing
    spec, image_size = _image_spec(kind, folder, int(vision_config["image_size"]), read_folder)
    if image_size != int(vision_config["image_size"]):
        raise ConversionError(
            f"the tower's preprocessor makes {image_size} px images but the tower expects "
            f"{vision_config['image_size']} px"
        )

    if template is None:
        if source_format == "llava_mistral":
            template = "mistral_instruct"
        elif source_format == "llava":
            linear_med = projector == "linear" and config.get("mm_use_im_start_end", False)
            template = "llava_v1_med" if linear_med else "v1"
        elif llm_type in FAMILY_TEMPLATES:
            template = FAMILY_TEMPLATES[llm_type]
        else:
            raise ConversionError(f"no prompt template known for a {llm_type} LLM: pass template=")
    if template not in TEMPLATES:
        raise ConversionError(
            f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}"
        )

    return SourcePlan(
        source_format=source_format,
        llm_type=llm_type,
        text_config=text_config_from(text_fields, llm_type),
        vision_kind=kind,
        vision_config=vision_config,
        tower_ref=tower_ref,
        tower_folder=folder,
        rules=rules,
        projector=projector,
        feature_layer=layer,
        strategy=strategy,
        drop_last_layer=drop_last,
        template=template,
        pad=config.get("image_aspect_ratio") == "pad",
        image_spec=spec,
        image_size=image_size,
    )


def served_vision_config(plan: SourcePlan, layers: int, use_head: bool) -> PretrainedConfig:
    """The served tower config: the original's, with the layer count the served weights have."""
    config_class = CLIPVisionConfig if plan.vision_kind == "clip" else SiglipVisionConfig
    known = {f.name for f in dataclasses.fields(config_class)} - {
        "architectures",
        "dtype",
        "transformers_version",
    }
    fields = {k: v for k, v in plan.vision_config.items() if k in known}
    fields["num_hidden_layers"] = layers
    if plan.vision_kind == "siglip":
        fields["vision_use_head"] = use_head
    return config_class(**fields)
