"""`quantize SRC DST --method {nf4,int8,cpu-int8}`: write a quantized served-format checkpoint.

The folder written loads with `load_model(DST)` and no flags: `tinyllava_med.json` records the
quantization (`4bit`, `8bit`, `cpu-int8`) and the processor files are copied unchanged.

- `nf4`: bitsandbytes 4-bit NF4 with double quantization and fp16 compute (the paper's
  TinyLLaVA-Med-FQ4 / LLaVA-Med-Q4; on CPU bitsandbytes computes in bf16). Saved before any
  forward pass: a 4-bit model saved after one is corrupt unless double quantization is on.
- `int8`: bitsandbytes LLM.int8 (FQ8 / Q8).
- `nf4` with `int8_modules` (`--int8 model.vision_tower`): those modules get LLM.int8 instead of
  nf4. transformers stores one bitsandbytes scheme per checkpoint, so they are stored in fp16
  and quantized when loaded (`runtime.quantize_8bit_modules`); `tinyllava_med.json` names them.
- `cpu-int8`: dynamic int8 linears for CPU-only sites, in the format of `quantize.cpu_int8`.

Modules in `skip_modules` (default `quantize.skip.DEFAULT_SKIP_MODULES`) keep 16-bit weights
(fp32 for cpu-int8, which computes in fp32); a pattern that matches no module is an error.
With the default list, `cpu-int8` also quantizes the vision tower and `lm_head` where the output
check of `quantize.check` finds this checkpoint's answers unchanged, and writes the scores to
`quantize_check.json`; an explicit `skip_modules` is used exactly as given.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from tinyllava_med import __version__
from tinyllava_med.model.meta import META_FILE, ServedMeta, publish_modes
from tinyllava_med.model.registry import VARIANTS
from tinyllava_med.quantize.check import (
    CHECK_FILE,
    CheckReport,
    Prompt,
    phantom_prompts,
    quantize_checked,
)
from tinyllava_med.quantize.cpu_int8 import CPU_INT8_FILE, quantize_cpu_int8, save_cpu_int8
from tinyllava_med.quantize.runtime import bnb_config, quiet_bnb_warnings
from tinyllava_med.quantize.skip import (
    check_skip_patterns,
    is_skipped,
    matched_by_both,
    skip_list,
)

Method = Literal["nf4", "int8", "cpu-int8"]
STORED_QUANT: dict[str, str] = {"nf4": "4bit", "int8": "8bit", "cpu-int8": "cpu-int8"}
# Written by the model's save_pretrained / our own format, never copied from the source.
_WEIGHT_FILES = ("config.json", "generation_config.json", META_FILE, CPU_INT8_FILE, CHECK_FILE)
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt")


# what the source folder measured of itself (the demo model's scores): not this copy's
_SOURCE_RESULTS = ("demo_eval.json",)
CARD = "README.md"


def _copy_processor_files(src: Path, dst: Path, note: str) -> None:
    """The source's tokenizer, processor and other files, without its weights and its own
    scores; its model card, headed by what this copy is."""
    for name in _SOURCE_RESULTS:
        (dst / name).unlink(missing_ok=True)
    for item in src.iterdir():
        weights = item.name in _WEIGHT_FILES or item.name.endswith(_WEIGHT_SUFFIXES)
        if not item.is_file() or weights or item.name in _SOURCE_RESULTS:
            continue
        if item.name == CARD:
            (dst / CARD).write_text(
                f"# Quantized copy\n\nThis folder was {note}, from `{src.name}`. The card below "
                "is the source model's: its scores and training times are the unquantized "
                f"model's (this copy's output check, where made: `{CHECK_FILE}`).\n\n"
                + item.read_text()
            )
        else:
            shutil.copy2(item, dst / item.name)


def _empty_model(src: Path) -> Any:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    with init_empty_weights():
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(src))


def _quantized_variant(meta: ServedMeta, quant: str) -> str | None:
    """The registry name of the quantized twin (`tinyllava-med-f` + 4bit -> `-fq4`), if any."""
    base = VARIANTS[meta.variant].base if meta.variant in VARIANTS else None
    match = [v.name for v in VARIANTS.values() if v.base == base and v.quantization == quant]
    return match[0] if base and match else meta.variant


def _new_folder(dst: Path) -> None:
    """Create `dst` once the model is made (a failed check leaves nothing), without what an
    earlier quantization into it left that this one may not write again."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (CHECK_FILE, CPU_INT8_FILE, "model.safetensors", "model.safetensors.index.json"):
        (dst / name).unlink(missing_ok=True)


def precision_note(skip: Sequence[str], int8: Sequence[str]) -> str:
    """What the note says of the modules not in the method's own format. An int8 pattern inside
    a kept one (the default `model.vision_tower` and `--int8 model.vision_tower.encoder`) is
    named as its exception, so the note does not seem to keep it in 16 bits and in int8 both."""
    kept = []
    for p in skip:
        inside = [i for i in int8 if i != p and is_skipped(i, [p])]
        kept.append(f"{p} except {' and '.join(inside)}" if inside else p)
    note = f"kept in higher precision: {', '.join(kept)}"
    return f"{note}; LLM.int8 when loaded: {', '.join(int8)}" if int8 else note


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    method: Method,
    skip_modules: Sequence[str] | None = None,
    check_prompts: Sequence[Prompt] | None = None,
    check_prompts_name: str = "site",
    int8_modules: Sequence[str] = (),
) -> Path:
    """Quantize the unquantized served checkpoint `src` (folder or variant name) into `dst`.

    `int8_modules` (nf4 only): module patterns given LLM.int8 instead of nf4.

    `check_prompts`: the calibration prompts of the cpu-int8 output check (default: 8 PhantomVQA
    phantoms); unused when `skip_modules` is given or for the bitsandbytes methods."""
    from transformers import AutoModelForImageTextToText

    from tinyllava_med.model.load import load_model, resolve

    if method not in STORED_QUANT:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(STORED_QUANT)}")
    src_path = Path(resolve(str(src))[0])
    dst_path = Path(dst)
    if dst_path.resolve() == src_path.resolve():
        raise ValueError("quantize writes a new folder: DST must differ from SRC")
    meta = ServedMeta.load(src_path) or ServedMeta(name=src_path.name)
    if meta.quantization != "none":
        raise ValueError(f"{src_path} is already quantized ({meta.quantization})")
    int8 = list(int8_modules)
    if int8 and method != "nf4":
        raise ValueError("int8 modules are for --method nf4 (the others quantize one way)")
    skip = skip_list(skip_modules)
    if skip_modules is None:  # the default list keeps the tower in fp16: int8 replaces that
        skip = [p for p in skip if p not in int8]
    empty = _empty_model(src_path)
    check_skip_patterns(empty, skip)
    check_skip_patterns(empty, int8)
    if skip_modules is not None and (both := matched_by_both(empty, skip, int8)):
        raise ValueError(
            f"{len(both)} linear layers (e.g. {both[0]}) would be kept in higher precision "
            "(--skip) and given int8 too (--int8); name each module in one list only"
        )
    quant = STORED_QUANT[method]

    report: CheckReport | None = None
    if method == "cpu-int8":
        lm = load_model(str(src_path), quant="none", device="cpu", dtype="fp32")
        if skip_modules is None:  # the default list: the output check may quantize more
            if check_prompts is None:
                check_prompts, check_prompts_name = phantom_prompts(), "PhantomVQA"
            skip, report = quantize_checked(lm, skip, check_prompts, check_prompts_name)
        else:
            quantize_cpu_int8(lm.model, skip)
        model = lm.model
        _new_folder(dst_path)
        model.config.save_pretrained(dst_path)
        model.generation_config.save_pretrained(dst_path)
        save_cpu_int8(model, dst_path)
    else:
        quiet_bnb_warnings()
        # int8 modules are stored in 16 bits, and given int8 when loaded
        config = bnb_config(quant, skip=skip + int8, compute_dtype=torch.float16)
        model = AutoModelForImageTextToText.from_pretrained(
            src_path, dtype=torch.float16, quantization_config=config
        )
        _new_folder(dst_path)
        model.save_pretrained(dst_path)  # before any forward pass (see the module docstring)

    note = f"quantized by tinyllava-med ({method}; {precision_note(skip, int8)})"
    _copy_processor_files(src_path, dst_path, note)
    if report is not None:
        (dst_path / CHECK_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        note = f"{note[:-1]}; {report.summary()})"
    out_meta = meta.model_copy(
        update={
            "quantization": quant,
            "int8_modules": int8,
            "variant": _quantized_variant(meta, quant),
            "notes": f"{meta.notes}; {note}" if meta.notes else note,
            "version": __version__,
        }
    )
    out_meta.save(dst_path)
    publish_modes(dst_path)
    return dst_path
