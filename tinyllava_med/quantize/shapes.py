"""The two real architectures of the paper, built from configs (random weights or meta device).

Memory and speed depend on shapes, not on values, so `memory` and `bench/` use these instead of
the (undownloadable here) checkpoints:

- `tinyllava-1.5b`: TinyLlama-1.1B (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632,
  vocab 32000) + SigLIP so400m-384 (hidden 1152, MLP 4304, patch 14, 384 px) served with 26 of
  its 27 layers and no head (TinyLLaVA deletes the last layer): 729 image tokens, template `v1`.
- `llava-med-7b`: Mistral-7B (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab
  32000) + CLIP ViT-L/14-336 (hidden 1024, 24 layers, MLP 4096), layer -2 without CLS: 576
  image tokens, template `mistral_instruct`.

Both use the `mlp2x_gelu` projector. The tokenizer is a small local one (the model's vocabulary
keeps its real 32000 rows; prompts are ~10% longer in tokens than with the real tokenizers).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    PretrainedConfig,
    SiglipVisionConfig,
)

Arch = Literal["tinyllava-1.5b", "llava-med-7b"]
ARCHS: tuple[Arch, ...] = ("tinyllava-1.5b", "llava-med-7b")
# Registry variant family -> architecture.
ARCH_OF_FAMILY: dict[str, Arch] = {"tinyllava-med": "tinyllava-1.5b", "llava-med": "llava-med-7b"}
TEMPLATE: dict[Arch, str] = {"tinyllava-1.5b": "v1", "llava-med-7b": "mistral_instruct"}
VISION: dict[Arch, Literal["siglip", "clip"]] = {
    "tinyllava-1.5b": "siglip",
    "llava-med-7b": "clip",
}
IMAGE_SIZE: dict[Arch, int] = {"tinyllava-1.5b": 384, "llava-med-7b": 336}
PATCH_SIZE = 14
VOCAB = 32000
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _text_config(arch: Arch) -> Any:
    if arch == "tinyllava-1.5b":
        return LlamaConfig(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    return MistralConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=VOCAB,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _vision_config(arch: Arch) -> Any:
    if arch == "tinyllava-1.5b":
        return SiglipVisionConfig(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=26,
            num_attention_heads=16,
            image_size=384,
            patch_size=PATCH_SIZE,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
            vision_use_head=False,
        )
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=PATCH_SIZE,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
    )


def image_tokens(arch: Arch) -> int:
    return (IMAGE_SIZE[arch] // PATCH_SIZE) ** 2


def real_config(arch: Arch, image_token_index: int = VOCAB - 1) -> LlavaConfig:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    siglip = arch == "tinyllava-1.5b"
    return LlavaConfig(
        vision_config=_vision_config(arch),
        text_config=_text_config(arch),
        image_token_index=image_token_index,
        projector_hidden_act="gelu",
        vision_feature_layer=-1 if siglip else -2,
        vision_feature_select_strategy="full" if siglip else "default",
        multimodal_projector_bias=True,
        image_seq_length=image_tokens(arch),
        tie_word_embeddings=False,
    )


def meta_model(arch_or_config: Arch | PretrainedConfig) -> LlavaForConditionalGeneration:
    """The architecture with every tensor on the meta device (shapes and dtypes only)."""
    config: Any = arch_or_config
    if not isinstance(config, PretrainedConfig):
        config = real_config(config)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def random_model(
    config: LlavaConfig, *, dtype: torch.dtype, seed: int = 0, device: str | torch.device = "cpu"
) -> Any:
    """Build on the meta device, then fill: N(0, 0.02) matrices, unit norms, zero biases.

    Four times faster than transformers' own initialisation (~15 s instead of ~60 s for 1.5 B
    parameters on 2 cores); buffers (RoPE, position ids) are computed as usual. With `device`
    a GPU, parameters are drawn there (seconds for 7 B) and buffers moved there.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = LlavaForConditionalGeneration(config)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in list(model.named_parameters()):
        value = torch.empty(param.shape, dtype=dtype, device=device)
        if param.ndim > 1:
            value.normal_(0.0, 0.02, generator=gen)
        else:
            value.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, torch.nn.Parameter(value, requires_grad=False))
    torch.nn.Module.to(model, device)  # buffers (built on the CPU) join the parameters
    return model.eval()


def real_shape_lm(
    arch: Arch,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    layers: int | None = None,
    device: str | torch.device = "cpu",
) -> Any:
    """A `LoadedModel` of the real shape with random weights, unquantized (CPU by default).

    `layers` cuts both the tower and the LLM to that many layers (real widths): smoke tests.
    """
    from tinyllava_med.model.load import LoadedModel
    from tinyllava_med.model.processor import build_processor
    from tinyllava_med.model.prompts import V1_SYSTEM
    from tinyllava_med.model.tiny import build_tokenizer

    texts = [V1_SYSTEM, "USER: ASSISTANT: [INST] [/INST] Is there a nodule in the left lung?"]
    tokenizer = build_tokenizer(texts, vocab_size=1000)
    processor = build_processor(
        tokenizer,
        template=TEMPLATE[arch],
        vision=VISION[arch],
        image_size=IMAGE_SIZE[arch],
        patch_size=PATCH_SIZE,
    )
    config: Any = real_config(arch, int(tokenizer.convert_tokens_to_ids("<image>")))  # type: ignore[arg-type]
    config.text_config.update({k: getattr(tokenizer, k) for k in _TOKEN_IDS})
    if layers is not None:
        config.text_config.num_hidden_layers = config.vision_config.num_hidden_layers = layers
    model = random_model(config, dtype=dtype, seed=seed, device=device)
    return LoadedModel(
        model=model,
        processor=processor,
        name=arch,
        path=f"<random {arch}>",
        variant=None,
        quantization="none",
        template=TEMPLATE[arch],
        device=torch.device(device),
        dtype=dtype,
    )
