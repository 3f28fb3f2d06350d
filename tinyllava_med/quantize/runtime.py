"""Quantized loading: turn a served checkpoint into an 8-bit, 4-bit or CPU-int8 model.

The vision tower, the projector and `lm_head` stay in higher precision by default (transformers 5
module paths: a bare `multi_modal_projector` would silently match nothing). On CPU, bitsandbytes'
4-bit kernel ignores input strides, so every `Linear4bit` gets a pre-hook making inputs contiguous.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Module paths (transformers 5 LLaVA) kept out of quantization: small, and quality-critical.
DEFAULT_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
CPU_INT8_FILE = "cpu_int8_state.pt"


def bnb_config(quant: str, device: torch.device, skip: list[str] | None = None) -> Any:
    from transformers import BitsAndBytesConfig

    skip = list(DEFAULT_SKIP_MODULES if skip is None else skip)
    if quant == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
            llm_int8_skip_modules=skip,
        )
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"not a bitsandbytes quantization: {quant!r}")


def _contiguous_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def make_4bit_inputs_contiguous(model: nn.Module) -> int:
    """Register the stride fix on every bitsandbytes 4-bit linear; returns how many."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not getattr(module, "_tlm_contig", False):
            module.register_forward_pre_hook(_contiguous_inputs)
            module._tlm_contig = True  # type: ignore[assignment]
            n += 1
    return n


def quantize_cpu_int8(model: Any) -> Any:
    """PyTorch dynamic int8 on the language model's linears (weights int8, activations fp32)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = model.model.language_model
        model.model.language_model = torch.ao.quantization.quantize_dynamic(
            lm, {nn.Linear}, dtype=torch.qint8
        )
    return model


def load_weights(
    path: str,
    *,
    quant: str,
    stored_quant: str,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
) -> Any:
    """Load the transformers model from `path` with the requested (or stored) quantization."""
    from tinyllava_med.model.load import load_plain

    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    if quant in ("4bit", "8bit"):
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
        warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
        if stored_quant == "none":
            kwargs["quantization_config"] = bnb_config(quant, device)
        compute = torch.float16 if device.type == "cuda" else torch.float32
        model = load_plain(path, device=device, dtype=compute, **kwargs)
        make_4bit_inputs_contiguous(model)
        return model
    if quant == "cpu-int8":
        if device.type != "cpu":
            raise ValueError("cpu-int8 runs on the CPU only; use --quant 8bit or 4bit on a GPU")
        model = load_plain(path, device=device, dtype=torch.float32, **kwargs)
        model = quantize_cpu_int8(model)
        if stored_quant == "cpu-int8":
            state = torch.load(Path(path) / CPU_INT8_FILE, weights_only=False)
            model.model.language_model.load_state_dict(state)  # type: ignore[union-attr]
        return model
    return load_plain(path, device=device, dtype=dtype, **kwargs)
