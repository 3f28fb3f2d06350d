"""Load a served-format checkpoint (folder, registry variant or hub id) for inference.

One entry point, `load_model`, returns a `LoadedModel`: the transformers model and processor
plus everything a stored answer must record (name, variant, quantization, template, version,
and the digest of the weights).
Quantization at load time (`8bit`, `4bit`, `cpu-int8`) is delegated to `tinyllava_med.quantize`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from tinyllava_med import __version__
from tinyllava_med.model.meta import ServedMeta, weights_digest
from tinyllava_med.model.registry import QUANTS, VARIANTS, Variant, get_variant, is_variant_name

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    """The name is neither a folder, a known variant with a local checkpoint, nor reachable."""


class CheckpointError(ValueError):
    """The folder is a checkpoint that cannot be loaded: a file missing or damaged."""


# the modules the default recipe keeps in 16/32 bits, by the name a quantization label gives
# them when a checkpoint quantizes them too
_KEPT_BY_DEFAULT = (
    ("model.vision_tower", "tower"),
    ("model.multi_modal_projector", "projector"),
    ("lm_head", "lm_head"),
)


def _holds_quantized(model: nn.Module, path: str) -> bool:
    """Whether the module at `path` is, or holds, a quantized linear layer (bitsandbytes', or
    PyTorch's dynamic int8 of the cpu-int8 format)."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return False
    return any(
        type(m).__module__.startswith(("bitsandbytes", "torch.ao.nn.quantized"))
        for m in module.modules()
    )


@dataclass
class LoadedModel:
    model: Any  # LlavaForConditionalGeneration (possibly quantized)
    processor: Any  # LlavaProcessor
    name: str
    path: str
    variant: str | None
    quantization: str
    template: str
    device: torch.device
    dtype: torch.dtype
    meta: ServedMeta = field(default_factory=ServedMeta)
    weights: str | None = None  # sha256 of the weight files as loaded (`meta.weights_digest`)

    @cached_property
    def quantization_label(self) -> str:
        """The quantization a reader is told: the scheme, and what it also quantized that the
        default recipe keeps in 16/32 bits (`quantize.skip.DEFAULT_SKIP_MODULES`): `+tower`,
        `+projector`, `+lm_head`. So `quantize --method cpu-int8` gives `cpu-int8+tower+lm_head`
        where its output check put them in int8 (`--quant cpu-int8` at load time: `cpu-int8`),
        and nf4 with the tower in nf4 `4bit+tower`. nf4 with modules in LLM.int8 is `4bit+int8`
        (`quantize --int8`; which ones: the folder's `tinyllava_med.json`)."""
        if self.quantization == "4bit" and self.meta.int8_modules:
            return "4bit+int8"
        if self.quantization == "none" or not isinstance(self.model, nn.Module):
            return self.quantization
        also = [short for path, short in _KEPT_BY_DEFAULT if _holds_quantized(self.model, path)]
        return "+".join([self.quantization, *also])

    @property
    def info(self) -> dict[str, Any]:
        """What every stored answer records about the model that produced it."""
        return {
            "model": self.name,
            "variant": self.variant or self.name,
            "quantization": self.quantization_label,
            "template": self.template,
            "model_version": self.meta.version,
            "model_weights": self.weights,
            "server_version": __version__,
        }


def default_data_dir() -> Path:
    return Path(os.environ.get("TINYLLAVA_MED_DATA_DIR", "./data"))


def variant_dir(variant: Variant, data_dir: Path | None = None) -> Path:
    """Where a variant's served-format base checkpoint lives under the data directory."""
    return (data_dir or default_data_dir()) / "models" / variant.base


def check_quant(quant: str) -> None:
    """ValueError for a quantization this project does not know."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; known: {', '.join(QUANTS)}")


def pick_device(device: str | None = None) -> torch.device:
    """`device` (auto: a CUDA GPU when there is one); ValueError for one torch does not know
    or this machine does not have."""
    if not device or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if picked.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {device!r}: this machine (or this torch build) has no CUDA GPU"
            )
        if picked.index is not None and picked.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA GPU(s)")
    elif picked.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: this machine has no Apple GPU (MPS)")
    elif picked.type not in ("cpu", "mps"):
        raise ValueError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return picked


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype and dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}, auto")
        return DTYPES[dtype]
    return torch.float16 if device.type == "cuda" else torch.float32


def _attn_implementation(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def resolve(name_or_path: str, data_dir: Path | None = None) -> tuple[str, Variant | None]:
    """Map a user's `--model` to (folder or hub id, variant). Folders win over variant names."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser()), None
    if is_variant_name(name_or_path):
        variant = get_variant(name_or_path)
        folder = variant_dir(variant, data_dir)
        if not folder.is_dir():
            if variant.name == "demo":
                raise ModelNotFoundError(
                    f"the demo model is not built yet at {folder}; run `tinyllava-med demo-model`"
                )
            how = (
                f"`tinyllava-med convert <downloaded {variant.source}> {folder}`"
                if variant.source
                else f"`tinyllava-med train ...` with its output at {folder}"
            )
            raise ModelNotFoundError(
                f"variant {variant.name!r} has no served checkpoint at {folder}; make it with {how}"
            )
        return str(folder), variant
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        return name_or_path, None  # a hub id: from_pretrained fetches it when the hub is reachable
    raise ModelNotFoundError(
        f"model {name_or_path!r} is neither a folder nor a known variant "
        f"(known variants: {', '.join(sorted(VARIANTS))})"
    )


def load_model(
    name_or_path: str,
    *,
    quant: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    data_dir: Path | None = None,
) -> LoadedModel:
    """Load model + processor. `quant=None` takes the variant's (or the folder's) own setting."""
    path, variant = resolve(name_or_path, data_dir)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise CheckpointError(
            f"{path} is not a checkpoint folder (it has no config.json): name the model's own "
            "folder, e.g. ./data/models/demo"
        )
    meta = ServedMeta.load(path) if Path(path).is_dir() else None
    meta = meta or ServedMeta()
    weights = weights_digest(path) if Path(path).is_dir() else None
    if quant is None:
        quant = variant.quantization if variant else "none"
    check_quant(quant)
    stored_quant = meta.quantization
    if stored_quant != "none" and quant not in ("none", stored_quant):
        raise ValueError(
            f"{path} is already quantized ({stored_quant}); it cannot be loaded as {quant}"
        )
    effective_quant = stored_quant if stored_quant != "none" else quant

    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    from safetensors import SafetensorError

    from tinyllava_med.quantize.runtime import load_weights

    try:
        processor = AutoProcessor.from_pretrained(path, backend="pil")  # PIL bicubic = originals
        model = load_weights(
            path,
            quant=effective_quant,
            stored_quant=stored_quant,
            device=dev,
            dtype=torch_dtype,
            attn_implementation=_attn_implementation(dev),
            int8_modules=meta.int8_modules if stored_quant == "4bit" else (),
        )
    except (OSError, SafetensorError) as e:  # a file missing or cut short
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = (
            "a file is missing or damaged; convert, train or copy it again"
            if Path(path).is_dir()
            else "a hub id needs the hub, or its files in the cache (HF_HUB_OFFLINE)"
        )
        raise CheckpointError(
            f"the checkpoint at {path} cannot be loaded ({type(e).__name__}: {first}): {why}"
        ) from e
    if getattr(processor.tokenizer, "pad_token_id", None) is None:
        raise CheckpointError(
            f"the checkpoint at {path} has a tokenizer without a padding token (is "
            "tokenizer_config.json missing?); convert, train or copy it again"
        )
    processor.tokenizer.padding_side = "left"
    model.eval()
    name = variant.name if variant else (meta.name or meta.variant or Path(path).name)
    log.info("loaded model %s (%s, %s) on %s", name, effective_quant, torch_dtype, dev)
    return LoadedModel(
        model=model,
        processor=processor,
        name=name,
        path=path,
        variant=variant.name if variant else meta.variant,
        quantization=effective_quant,
        template=variant.template if variant else meta.template,
        device=dev,
        dtype=torch_dtype,
        meta=meta,
        weights=weights,
    )


def load_plain(path: str, *, device: torch.device, dtype: torch.dtype, **kwargs: Any) -> Any:
    """`from_pretrained` for an unquantized served checkpoint."""
    return AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, device_map={"": str(device)} if device.type != "cpu" else None, **kwargs
    )
