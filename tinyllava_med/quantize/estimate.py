"""Memory computed from shapes: bytes per parameter per quantization scheme, KV cache, activations.

Static bytes are exact for what the loaders build (tests check them against measured tiny
models): every parameter of a skipped or non-linear module in the float dtype (fp16 on CUDA,
fp32 on CPU), buffers as built, and per quantized `nn.Linear` of n = out x in weights:

- `4bit` (bitsandbytes nf4, double quant, blocksize 64): n/2 packed bytes + n/64 uint8 absmax
  + ceil(n/64/256) fp32 second-level absmax + 256 fp32 second-level code + 16 fp32 nf4 code
  + 1 fp32 offset, bias in the 16-bit compute dtype (bitsandbytes casts it at the first call).
  On a CPU with AVX-512-bf16 bitsandbytes repacks, at the first call, each 4-bit linear whose
  shape its kernel takes (`runtime.cpu_repackable`): the double quantization is undone
  into n/64 bf16 absmax, and the second-level state goes (`runtime.make_4bit_inputs_contiguous`
  keeps the other shapes on the generic kernel);
- `8bit` (LLM.int8): n int8 + out fp32 row scales (SCB), bias in the float dtype;
- `cpu-int8`: n int8 + out float64 scales + out int64 zero points, bias fp32.

`int8` names modules of a 4-bit model given LLM.int8 instead (`quantize --int8`): `8bit` bytes.

Dynamic bytes = static + KV cache (2 x layers x kv_heads x head_dim x tokens x batch x bytes)
+ an activation estimate for the prefill, the larger of the tower's and one decoder layer's
working set, plus the prompt embeddings, fp32 last-token logits and, for bitsandbytes 4-bit on
CUDA, one weight dequantized to fp16. The activation part is an estimate, the rest exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from tinyllava_med.quantize.runtime import cpu_repackable
from tinyllava_med.quantize.shapes import Arch, meta_model
from tinyllava_med.quantize.skip import is_skipped, skip_list

TEXT_TOKENS = 48  # system prompt + question + role tags, as the served templates render them
NF4_BLOCK = 64
NESTED_BLOCK = 256


def cpu_repacks_4bit() -> bool:
    """Whether bitsandbytes repacks 4-bit weights for its AVX-512-bf16 kernel on this CPU."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return bool(bnb.functional.has_avx512bf16())


def quantized_linear_bytes(
    out_features: int, in_features: int, quant: str, *, cpu_repack: bool = False
) -> int:
    """Bytes of one quantized linear's weight and quantization state (bias not included);
    `cpu_repack`: as bitsandbytes holds a 4-bit weight after repacking it for AVX-512-bf16."""
    n = out_features * in_features
    if quant == "4bit":
        blocks = math.ceil(n / NF4_BLOCK)
        if cpu_repack and cpu_repackable(out_features, in_features, NF4_BLOCK):
            return (n + 1) // 2 + 2 * blocks + 4 * (16 + 1)
        return (n + 1) // 2 + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * (256 + 16 + 1)
    if quant == "8bit":
        return n + 4 * out_features
    if quant == "cpu-int8":
        return n + 16 * out_features
    raise ValueError(f"not a quantized scheme: {quant!r}")


def static_breakdown(
    model: nn.Module,
    quant: str,
    *,
    float_bytes: int,
    skip: Sequence[str] | None = None,
    cpu_repack: bool = False,
    int8: Sequence[str] = (),
) -> dict[str, int]:
    """Static bytes of `model` (any device, meta included) per top-level part and in total."""
    skip = skip_list(skip)
    parts: dict[str, int] = {}
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        linear = quant != "none" and type(module) is nn.Linear
        scheme = "8bit" if linear and int8 and is_skipped(name, int8) else quant
        quantized = linear and (scheme != quant or not is_skipped(name, skip))
        size = 0
        for pname, p in own:
            if quantized and pname == "weight":
                size += quantized_linear_bytes(
                    p.shape[0], p.shape[1], scheme, cpu_repack=cpu_repack
                )
            elif quantized and scheme == "4bit":
                size += p.numel() * 2
            elif quantized and scheme == "cpu-int8":
                size += p.numel() * 4
            else:
                size += p.numel() * float_bytes
        size += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
        key = _part(name)
        parts[key] = parts.get(key, 0) + size
    parts["total"] = sum(parts.values())
    return parts


def _part(name: str) -> str:
    for part in ("vision_tower", "multi_modal_projector", "language_model"):
        if name.startswith(f"model.{part}"):
            return part
    return "lm_head" if name.startswith("lm_head") else "other"


def kv_cache_bytes(text_config: Any, tokens: int, batch: int, dtype_bytes: int) -> int:
    head_dim = getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // text_config.num_attention_heads
    )
    layers, kv_heads = text_config.num_hidden_layers, text_config.num_key_value_heads
    return 2 * layers * kv_heads * head_dim * tokens * batch * dtype_bytes


def activation_bytes(
    model: nn.Module, quant: str, *, prompt: int, batch: int, float_bytes: int, cuda: bool
) -> int:
    config: Any = model.config
    vc, tc = config.vision_config, config.text_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    vision = n_img * (4 * vc.hidden_size + vc.intermediate_size) * float_bytes
    layer = prompt * (4 * tc.hidden_size + 3 * tc.intermediate_size) * float_bytes
    embeds = prompt * tc.hidden_size * float_bytes
    logits = 2 * tc.vocab_size * 4
    dequant = 0
    if quant == "4bit" and cuda:
        dequant = max(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) * 2
    return batch * (max(vision, layer) + embeds + logits) + dequant


def computed_memory(
    arch_or_config: Arch | PretrainedConfig,
    quant: str,
    *,
    device: str = "cuda",
    batch: int = 1,
    new_tokens: int = 32,
    text_tokens: int = TEXT_TOKENS,
    skip: Sequence[str] | None = None,
    int8: Sequence[str] = (),
) -> dict[str, Any]:
    """Static and dynamic bytes under `quant`, computed from shapes (meta device is enough)."""
    model = meta_model(arch_or_config)
    cuda = device.startswith("cuda")
    if quant == "cpu-int8" and cuda:
        raise ValueError("cpu-int8 runs on the CPU only")
    float_bytes = 2 if cuda else 4
    repack = not cuda and quant == "4bit" and cpu_repacks_4bit()  # as on this machine's CPU
    parts = static_breakdown(
        model, quant, float_bytes=float_bytes, skip=skip, cpu_repack=repack, int8=int8
    )
    config: Any = model.config
    vc = config.vision_config
    prompt = (vc.image_size // vc.patch_size) ** 2 + text_tokens
    kv = kv_cache_bytes(config.text_config, prompt + new_tokens, batch, float_bytes)
    act = activation_bytes(
        model, quant, prompt=prompt, batch=batch, float_bytes=float_bytes, cuda=cuda
    )
    return {
        "static_bytes": parts["total"],
        "dynamic_bytes": parts["total"] + kv + act,
        "kv_cache_bytes": kv,
        "activation_bytes": act,
        "prompt_tokens": prompt,
        "static_parts": parts,
        "float_dtype": "fp16" if cuda else "fp32",
    }


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
