"""Quantized loading: turn a served checkpoint into an 8-bit, 4-bit or CPU-int8 model.

Either the folder is stored quantized (`tinyllava_med.json` says `4bit` / `8bit` / `cpu-int8`,
written by `quantize.export`) or an unquantized folder is quantized while loading, as the paper
did. The vision tower, the projector and `lm_head` stay in higher precision by default
(`quantize.skip`). On CPUs with AVX-512-bf16, bitsandbytes' 4-bit kernel ignores input strides,
so every `Linear4bit` gets a pre-hook making its inputs contiguous, and one whose shape that
kernel's weight repacking cannot take keeps the generic kernel. A stored 4-bit checkpoint
records fp16 compute; on the CPU its linears are switched to bf16 compute, as when quantizing
while loading (fp16 matmuls on the CPU are slow and, for the tower, less accurate). A 4-bit
folder may name modules stored in 16 bits that get LLM.int8 when loaded (`int8_modules`, the
vision tower of `quantize --method nf4 --int8 model.vision_tower`): bitsandbytes quantizes an
int8 weight from its 16-bit values, as it does for `--quant 8bit`, so the result is the same.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tinyllava_med.quantize.cpu_int8 import load_cpu_int8, quantize_cpu_int8
from tinyllava_med.quantize.skip import DEFAULT_SKIP_MODULES, is_skipped, skip_list

__all__ = ["DEFAULT_SKIP_MODULES", "bnb_config", "load_weights", "make_4bit_inputs_contiguous"]


def bnb_config(
    quant: str,
    device: torch.device | None = None,
    skip: Sequence[str] | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
) -> Any:
    """bitsandbytes settings of the paper: nf4 + double quant (fp16 compute on CUDA), LLM.int8."""
    from transformers import BitsAndBytesConfig

    skip = skip_list(skip)
    if quant == "4bit":
        if compute_dtype is None:
            cuda = device is None or device.type == "cuda"
            compute_dtype = torch.float16 if cuda else torch.bfloat16
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"not a bitsandbytes quantization: {quant!r}")


def _contiguous_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


# bitsandbytes' AVX-512-bf16 path repacks a 4-bit weight in blocks of 32 output rows and of its
# quantization block along the input: a linear of other sizes (the tiny test models' 32-wide
# layers) fails there with a reshape error, so it keeps the generic 4-bit path
_PACK_ROWS = 32


def cpu_repackable(out_features: int, in_features: int, block: int = 64) -> bool:
    """Whether bitsandbytes' AVX-512-bf16 path can repack a 4-bit weight of this shape."""
    return out_features % _PACK_ROWS == 0 and in_features % block == 0


def make_4bit_inputs_contiguous(model: nn.Module) -> int:
    """Register the stride fix on every bitsandbytes 4-bit linear, and keep those whose shape
    the AVX-512-bf16 repacking cannot take on the generic kernel; returns how many linears."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    keep_unpackable_on_generic_kernel(model)
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not getattr(module, "_tlm_contig", False):
            module.register_forward_pre_hook(_contiguous_inputs)
            module._tlm_contig = True  # type: ignore[assignment]
            n += 1
    return n


def keep_unpackable_on_generic_kernel(model: nn.Module) -> int:
    """4-bit linears of a shape the AVX-512-bf16 repacking cannot take use the generic kernel;
    returns how many."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            block = getattr(getattr(module.weight, "quant_state", None), "blocksize", 64)
            if not cpu_repackable(module.out_features, module.in_features, block):
                module.support_avx512bf16_for_cpu = False
                n += 1
    return n


def unify_float_params(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every floating parameter (the unquantized ones) to `dtype`; returns how many.

    transformers 5 loads a stored bitsandbytes checkpoint with its 16-bit weights as stored but
    biases in the requested dtype, which breaks e.g. the fp16-stored tower on a fp32 CPU.
    """
    n = 0
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            n += 1
    return n


def _not_cast_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quiet_bnb_warnings() -> None:
    """bitsandbytes 8-bit logs a cast warning on every call on CPU: keep it out of the logs."""
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _not_cast_notice not in logger.filters:
        logger.addFilter(_not_cast_notice)


def set_4bit_compute_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """Compute every bitsandbytes 4-bit linear in `dtype` (its bias follows at the first call)."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.compute_dtype != dtype:
            module.compute_dtype = dtype
            n += 1
    return n


def quantize_8bit_modules(model: nn.Module, patterns: Sequence[str]) -> int:
    """Give the plain linears that `patterns` match (as skip patterns match) bitsandbytes
    LLM.int8 weights, quantized from their float values where they are, with the outlier threshold
    of `--quant 8bit`; returns how many."""
    import bitsandbytes as bnb

    threshold = bnb_config("8bit").llm_int8_threshold
    n = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not is_skipped(name, patterns):
            continue
        device = module.weight.device
        int8 = bnb.nn.Linear8bitLt(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            has_fp16_weights=False,
            threshold=threshold,
            device="meta",
        )
        # bitsandbytes quantizes a weight when it moves from the CPU to a device (the CPU too)
        int8.weight = bnb.nn.Int8Params(
            module.weight.data.cpu(), requires_grad=False, has_fp16_weights=False
        )
        int8.bias = module.bias
        model.set_submodule(name, int8.to(device))
        n += 1
    return n


def load_weights(
    path: str,
    *,
    quant: str,
    stored_quant: str,
    device: torch.device,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    int8_modules: Sequence[str] = (),
) -> Any:
    """Load the transformers model from `path` with the requested (or stored) quantization;
    `int8_modules` (4-bit only) get LLM.int8 once loaded."""
    from tinyllava_med.model.load import load_plain

    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    if quant in ("4bit", "8bit"):
        quiet_bnb_warnings()
        if stored_quant == "none":
            kwargs["quantization_config"] = bnb_config(quant, device)
        compute = torch.float16 if device.type == "cuda" else torch.float32
        model = load_plain(path, device=device, dtype=compute, **kwargs)
        unify_float_params(model, compute)
        make_4bit_inputs_contiguous(model)
        if quant == "4bit":
            set_4bit_compute_dtype(model, bnb_config(quant, device).bnb_4bit_compute_dtype)
            quantize_8bit_modules(model, int8_modules)
        return model
    if quant == "cpu-int8":
        if device.type != "cpu":
            raise ValueError("cpu-int8 runs on the CPU only; use --quant 8bit or 4bit on a GPU")
        if stored_quant == "cpu-int8":
            return load_cpu_int8(path, attn_implementation=attn_implementation)
        model = load_plain(path, device=device, dtype=torch.float32, **kwargs)
        return quantize_cpu_int8(model)
    return load_plain(path, device=device, dtype=dtype, **kwargs)
