"""Paper-table rows measured on one device in one process: the GPU run of `memory --paper-table`.

Per architecture, one random-weight fp16 checkpoint of the real shape is built on the device and
saved once; every row then loads it the way that row's variant is made and is measured by
`measure_memory` (static: footprint + bitsandbytes state; dynamic: allocator peak in a warmed-up
generate); a row whose making or measuring fails carries its `error` instead. Paper rows
quantize while loading, as the paper did; `tower` rows go through
`quantize_checkpoint` with the vision tower quantized too (nf4, or LLM.int8 for `tower8`), then
load the stored checkpoint, which is the `quantize` -> `serve` path.

On CUDA the rows share one process: before each load the allocator must be back to (near) zero,
and what is still allocated then is recorded and subtracted from the peak, so a leak shows in the
row instead of inflating it. On the CPU (tests, smoke runs) the same code measures RSS growth.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# nf4 for the LLM and the tower; only the projector and `lm_head` stay fp16.
TOWER_SKIP: tuple[str, ...] = ("model.multi_modal_projector", "lm_head")
# ... and the tower in LLM.int8 instead (`quantize --method nf4 --int8 model.vision_tower`)
TOWER_INT8: tuple[str, ...] = ("model.vision_tower",)
METHOD_OF_QUANT = {"4bit": "nf4", "8bit": "int8", "cpu-int8": "cpu-int8"}


@dataclass(frozen=True)
class RowSpec:
    """One row: a registry variant, its quantization and how it is made."""

    variant: str
    quant: str  # none, 4bit, 8bit
    skip: tuple[str, ...] | None = None  # None: the default skip list, quantized while loading
    name: str = ""  # shown name; the variant's when empty
    int8: tuple[str, ...] = ()  # 4-bit rows: modules in LLM.int8 instead (with `skip` only)

    @property
    def shown(self) -> str:
        return self.name or self.variant


def _free(device: torch.device) -> int:
    """Collect garbage; bytes still held by the CUDA allocator (0 on the CPU)."""
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return int(torch.cuda.memory_allocated(device))


def _measure(
    path: str, quant: str | None, device: torch.device, *, batch: int, new_tokens: int
) -> dict[str, Any]:
    from tinyllava_med.model.load import load_model
    from tinyllava_med.quantize.memory import measure_memory

    baseline = _free(device)
    t0 = time.perf_counter()
    lm = load_model(path, quant=quant, device=str(device))
    load_s = time.perf_counter() - t0
    allocated = _free(device) - baseline if device.type == "cuda" else None
    result = measure_memory(lm, batch=batch, new_tokens=new_tokens)
    del lm
    result["load_seconds"] = round(load_s, 2)
    if device.type == "cuda":
        result["baseline_allocated_bytes"] = baseline
        result["allocated_after_load_bytes"] = allocated
        result["dynamic_bytes"] -= baseline
    _free(device)
    return result


def measure_rows(
    specs: Sequence[RowSpec],
    build: Callable[[str], Any],
    *,
    arch_of: Callable[[str], str],
    device: str | torch.device,
    batch: int = 1,
    new_tokens: int = 32,
    workdir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Measure each spec; `build(arch)` gives the fp16 `LoadedModel` saved as that arch's source."""
    from tinyllava_med.model.meta import ServedMeta
    from tinyllava_med.model.tiny import save_served
    from tinyllava_med.quantize.export import quantize_checkpoint

    device = torch.device(device)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tlm-rows-", dir=workdir) as tmp:
        for arch in dict.fromkeys(arch_of(s.variant) for s in specs):
            source = Path(tmp) / arch
            t0 = time.perf_counter()
            lm = build(arch)
            save_served(lm.model, lm.processor, source, ServedMeta(template=lm.template, name=arch))
            del lm
            _free(device)
            build_s = round(time.perf_counter() - t0, 1)
            for spec in (s for s in specs if arch_of(s.variant) == arch):
                path, how = str(source), "quantized while loading"
                quant: str | None = spec.quant
                method: Any = METHOD_OF_QUANT.get(spec.quant)
                if spec.quant == "none":
                    how = "fp16 as loaded"
                elif spec.skip is not None:
                    path = str(Path(tmp) / f"{arch}-{spec.quant}-{len(results)}")
                    quant, how = None, f"quantize --method {method} --skip {' '.join(spec.skip)}"
                    if spec.int8:
                        how += f" --int8 {' '.join(spec.int8)}"
                try:
                    if quant is None:
                        quantize_checkpoint(
                            source,
                            path,
                            method=method,
                            skip_modules=spec.skip,
                            int8_modules=spec.int8,
                        )
                        _free(device)
                    row = _measure(path, quant, device, batch=batch, new_tokens=new_tokens)
                except Exception as e:  # a GPU run is rare: one failing row must not cost the rest
                    log.exception("measuring %s failed", spec.shown)
                    _free(device)
                    row = {"error": f"{type(e).__name__}: {e}"}
                row.update(
                    quantization=spec.quant,  # as the table computes it (int8_modules beside)
                    variant=spec.shown,
                    arch=arch,
                    how=how,
                    skip_modules=list(spec.skip) if spec.skip is not None else None,
                    int8_modules=list(spec.int8),
                    source_build_seconds=build_s,
                )
                results.append(row)
    return results
