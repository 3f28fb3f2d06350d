"""The variant registry: the exact model names users may ask for, and what each one is.

A variant names where its original weights come from, how it is quantized when served, which
prompt template and image preprocessing it uses, and where its converted (served-format)
checkpoint lives under the data directory. Lookup is by exact name; a path is never a variant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

Quant = Literal["none", "8bit", "4bit", "cpu-int8"]
QUANTS: tuple[str, ...] = get_args(Quant)


@dataclass(frozen=True)
class Variant:
    name: str
    family: Literal["tinyllava-med", "llava-med", "demo"]
    description: str
    source: str | None  # original checkpoint (hub id), or None when built here
    source_format: str  # as `convert --from` names it
    base: str  # the served-format checkpoint this variant is (or is quantized from)
    quantization: Quant
    template: str
    image_preprocessing: str = "pad"  # LLaVA `image_aspect_ratio: pad`: pad to square, mean colour

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


_TINY_NOTE = (
    "TinyLLaVA-Med-F: TinyLLaVA-1.5B (TinyLlama-1.1B + SigLIP so400m-384) fine-tuned in three "
    "stages on LLaVA-Med data"
)
_LLAVA_MED_NOTE = "LLaVA-Med v1.5 (Mistral-7B + CLIP ViT-L/14-336)"

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant(
            "tinyllava-med-f",
            "tinyllava-med",
            _TINY_NOTE,
            None,
            "tiny_llava",
            "tinyllava-med-f",
            "none",
            "v1",
        ),
        Variant(
            "tinyllava-med-fq8",
            "tinyllava-med",
            _TINY_NOTE + ", LLM.int8",
            None,
            "tiny_llava",
            "tinyllava-med-f",
            "8bit",
            "v1",
        ),
        Variant(
            "tinyllava-med-fq4",
            "tinyllava-med",
            _TINY_NOTE + ", 4-bit NF4",
            None,
            "tiny_llava",
            "tinyllava-med-f",
            "4bit",
            "v1",
        ),
        Variant(
            "llava-med",
            "llava-med",
            _LLAVA_MED_NOTE,
            "microsoft/llava-med-v1.5-mistral-7b",
            "llava_mistral",
            "llava-med",
            "none",
            "mistral_instruct",
        ),
        Variant(
            "llava-med-q8",
            "llava-med",
            _LLAVA_MED_NOTE + ", LLM.int8",
            "microsoft/llava-med-v1.5-mistral-7b",
            "llava_mistral",
            "llava-med",
            "8bit",
            "mistral_instruct",
        ),
        Variant(
            "llava-med-q4",
            "llava-med",
            _LLAVA_MED_NOTE + ", 4-bit NF4",
            "microsoft/llava-med-v1.5-mistral-7b",
            "llava_mistral",
            "llava-med",
            "4bit",
            "mistral_instruct",
        ),
        Variant(
            "demo",
            "demo",
            "Bundled demo: a tiny LLaVA trained here on synthetic PhantomVQA images. "
            "Synthetic, not for clinical use.",
            None,
            "served",
            "demo",
            "none",
            "v1",
        ),
    ]
}


def get_variant(name: str) -> Variant:
    """The variant called exactly `name`; an unknown name fails with the list of known ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(
            f"unknown model variant {name!r}; known variants: {', '.join(sorted(VARIANTS))}"
        ) from None


def is_variant_name(name: str) -> bool:
    return name in VARIANTS
