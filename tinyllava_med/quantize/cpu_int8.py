"""CPU int8: PyTorch dynamic int8 linears, and a safetensors format that stores only int8 weights.

`quantize_cpu_int8` swaps every `nn.Linear` outside the skip list for a
`torch.ao.nn.quantized.dynamic.Linear` (weights qint8, symmetric per output channel; activations
quantized per tensor at run time): the fastest CPU path measured (ENVIRONMENT.md).

Such a model cannot go through `save_pretrained` (packed params are not tensors), and a
fp32 copy would defeat the purpose. `save_cpu_int8` writes `cpu_int8.safetensors` with, per
quantized linear `P`: `P.qweight` (int8), `P.scales` (float64), `P.zero_points` (int64) and
`P.bias`; every other tensor under its state-dict name. `load_cpu_int8` builds the model from
its config with parameters on the meta device (buffers real), creates the quantized linears
directly from the stored integers, and assigns the rest: no fp32 weight is ever materialised,
and the loaded model computes exactly what the saved one did.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.ao.quantization import per_channel_dynamic_qconfig

from tinyllava_med.quantize.skip import quantizable_linears, skip_list

CPU_INT8_FILE = "cpu_int8.safetensors"
FORMAT = "tinyllava-med/cpu-int8"
FORMAT_VERSION = "1"
_PARTS = ("qweight", "scales", "zero_points", "bias")


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.ao's deprecation warnings (the API still works in torch 2.13)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        yield


def quantized_linears(model: nn.Module) -> Iterator[tuple[str, DynamicLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, DynamicLinear):
            yield name, module


def quantize_cpu_int8(model: Any, skip_modules: Sequence[str] | None = None) -> Any:
    """Swap the model's linears (outside `skip_modules`) for dynamic int8 ones, in place."""
    skip = skip_list(skip_modules)
    with _quiet():
        for name in quantizable_linears(model, skip):
            linear = model.get_submodule(name)
            if linear.weight.dtype != torch.float32:
                linear.float()
            linear.qconfig = per_channel_dynamic_qconfig
            model.set_submodule(name, DynamicLinear.from_float(linear))
    model.cpu_int8_skip_modules = skip
    return model


def _linear_tensors(module: DynamicLinear) -> dict[str, torch.Tensor]:
    weight, bias = module._weight_bias()
    if weight.qscheme() not in (torch.per_channel_affine, torch.per_channel_symmetric):
        raise ValueError(f"expected per-channel int8 weights, got {weight.qscheme()}")
    assert weight.q_per_channel_axis() == 0
    out = {
        "qweight": weight.int_repr().contiguous(),
        "scales": weight.q_per_channel_scales().contiguous(),
        "zero_points": weight.q_per_channel_zero_points().contiguous(),
    }
    if bias is not None:
        out["bias"] = bias.detach().contiguous()
    return out


def cpu_int8_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What `save_cpu_int8` stores: tensors (quantized linears as integers) and aliases."""
    tensors: dict[str, torch.Tensor] = {}
    quantized = []
    for name, module in quantized_linears(model):
        quantized.append(name)
        tensors.update({f"{name}.{k}": v for k, v in _linear_tensors(module).items()})
    prefixes = tuple(f"{name}." for name in quantized)
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefixes) or not isinstance(value, torch.Tensor):
            continue
        ident = (
            value.untyped_storage().data_ptr(),
            int(value.storage_offset()),
            tuple(int(d) for d in value.shape),
        )
        if ident in seen:  # tied weights (safetensors refuses shared storage)
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach().contiguous()
    return tensors, {"quantized_modules": json.dumps(quantized), "aliases": json.dumps(aliases)}


def packed_params_bytes(model: nn.Module) -> int:
    """Bytes of the quantized linears' weights, scales, zero points and biases."""
    return sum(
        t.numel() * t.element_size()
        for _, module in quantized_linears(model)
        for t in _linear_tensors(module).values()
    )


def save_cpu_int8(model: nn.Module, folder: str | Path) -> Path:
    tensors, meta = cpu_int8_tensors(model)
    skip = getattr(model, "cpu_int8_skip_modules", None)
    meta.update(
        format="pt",
        tinyllava_med_format=FORMAT,
        version=FORMAT_VERSION,
        scheme="weights qint8 symmetric per output channel; activations quint8 per tensor, dynamic",
        skip_modules=json.dumps(skip),
    )
    path = Path(folder) / CPU_INT8_FILE
    save_file(tensors, str(path), metadata=meta)
    return path


def _empty_model(folder: Path, attn_implementation: str) -> Any:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):  # parameters on meta; RoPE etc. buffers real
        model = AutoModelForImageTextToText.from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def _new_linear(tensors: dict[str, torch.Tensor]) -> DynamicLinear:
    qweight = tensors["qweight"]
    out_features, in_features = qweight.shape
    bias = tensors.get("bias")
    module = DynamicLinear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
    weight = torch._make_per_channel_quantized_tensor(
        qweight, tensors["scales"], tensors["zero_points"], 0
    )
    module.set_weight_bias(weight, bias)
    return module


def load_cpu_int8(folder: str | Path, *, attn_implementation: str = "sdpa") -> Any:
    """Rebuild a model saved by `save_cpu_int8` (CPU, fp32 activations)."""
    folder = Path(folder)
    path = folder / CPU_INT8_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} says cpu-int8 but has no {CPU_INT8_FILE}")
    model = _empty_model(folder, attn_implementation)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("tinyllava_med_format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file (metadata: {meta})")
        quantized = json.loads(meta["quantized_modules"])
        prefixes = tuple(f"{name}." for name in quantized)
        keys = set(f.keys())
        rest = {k: f.get_tensor(k) for k in keys if not k.startswith(prefixes)}
        for alias, key in json.loads(meta["aliases"]).items():
            rest[alias] = rest[key]  # tied weights: one tensor under both names
        # The rest first, while the linears to quantize are still empty `nn.Linear`s.
        missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
        missing = [k for k in missing if not k.startswith(prefixes)]
        if missing or unexpected:
            raise ValueError(f"{path}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
        with _quiet():
            for name in quantized:
                parts = {s: f.get_tensor(f"{name}.{s}") for s in _PARTS if f"{name}.{s}" in keys}
                model.set_submodule(name, _new_linear(parts))
    on_meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if on_meta:
        raise ValueError(f"{path}: no values for {on_meta[:5]}")
    model.cpu_int8_skip_modules = json.loads(meta.get("skip_modules", "null"))
    return model
