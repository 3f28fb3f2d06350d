"""Measured memory of a loaded model: static (weights and buffers) and dynamic (peak in generate).

- Static: `model.get_memory_footprint()` plus what it cannot see: bitsandbytes quantization
  state (nf4 absmax and codes, LLM.int8 row scales) and, for cpu-int8, the packed int8 weights.
- Dynamic: peak bytes while one warmed-up `generate` of `batch` x (image + question) runs.
  CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`. CPU: static +
  the growth of the process's resident peak (`VmHWM` after writing `5` to
  `/proc/self/clear_refs`, freed heap returned first with `malloc_trim`), so that both devices
  count tensors and not the interpreter; the raw process peak is reported too.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tinyllava_med.quantize.cpu_int8 import packed_params_bytes

QUESTION = "Is there a nodule in the left lung?"


def quant_state_bytes(model: torch.nn.Module) -> int:
    """bitsandbytes state that `get_memory_footprint` misses (it counts parameters only)."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)  # nf4: Params4bit.quant_state
        if state is not None:
            for t in (state.absmax, state.code, state.offset):
                add(t)
            if state.nested:
                add(state.state2.absmax)
                add(state.state2.code)
        add(getattr(weight, "SCB", None))  # LLM.int8 row scales: on the weight until the
        add(getattr(getattr(module, "state", None), "SCB", None))  # first forward, then here
    return total


def static_memory_bytes(model: Any) -> int:
    """Weights and buffers as loaded: bitsandbytes-aware, packed int8 weights for cpu-int8."""
    return int(model.get_memory_footprint()) + quant_state_bytes(model) + packed_params_bytes(model)


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_freed_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: freed heap may stay counted
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _inputs(lm: Any, batch: int) -> tuple[list[Image.Image], list[str]]:
    side = int(lm.model.config.vision_config.image_size)
    grey = Image.linear_gradient("L").resize((side, side)).convert("RGB")
    return [grey] * batch, [QUESTION] * batch


class _RssSampler(threading.Thread):
    """Fallback where /proc/self/clear_refs is not writable: poll VmRSS every 2 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _proc_status_bytes("VmRSS")
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, _proc_status_bytes("VmRSS"))


def _cpu_peak(run: Any) -> tuple[Any, int, int, str]:
    """(result of run(), RSS before, peak RSS during, how the peak was found)."""
    _release_freed_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        sampler = _RssSampler()
        before = sampler.peak
        sampler.start()
        out = run()
        sampler.done.set()
        sampler.join()
        return out, before, sampler.peak, "VmRSS polled every 2 ms"
    before = _proc_status_bytes("VmRSS")
    out = run()
    return out, before, _proc_status_bytes("VmHWM"), "VmHWM after clear_refs=5"


def measure_memory(
    lm_or_path: Any,
    *,
    quant: str | None = None,
    batch: int = 1,
    new_tokens: int = 32,
    device: str | None = None,
) -> dict[str, Any]:
    """Static and dynamic bytes of a model (a `LoadedModel`, folder or variant) as JSON."""
    from tinyllava_med.model.generate import SamplingParams, generate
    from tinyllava_med.model.load import LoadedModel, load_model

    if isinstance(lm_or_path, LoadedModel):
        lm = lm_or_path
        if quant not in (None, lm.quantization):
            raise ValueError(f"the model is loaded as {lm.quantization}, not {quant}")
    else:
        lm = load_model(str(lm_or_path), quant=quant, device=device)
    if batch < 1 or new_tokens < 1:
        raise ValueError(f"batch and new_tokens must be >= 1, got {batch} and {new_tokens}")
    images, questions = _inputs(lm, batch)
    params = SamplingParams(max_new_tokens=new_tokens)
    generate(lm, images, questions, SamplingParams(max_new_tokens=2))  # warm-up
    static = static_memory_bytes(lm.model)
    cuda = lm.device.type == "cuda"
    result: dict[str, Any] = {
        "variant": lm.variant or lm.name,
        "model": lm.name,
        "quantization": lm.quantization,  # the scheme, as the computed rows take it
        "quantization_label": lm.quantization_label,
        "device": str(lm.device),
        "dtype": str(lm.model.dtype).removeprefix("torch."),
        "batch": batch,
        "new_tokens": new_tokens,
        "static_bytes": static,
        "source": "measured",
    }
    start = time.perf_counter()
    if cuda:
        torch.cuda.synchronize(lm.device)
        torch.cuda.reset_peak_memory_stats(lm.device)
        answers = generate(lm, images, questions, params)
        torch.cuda.synchronize(lm.device)
        result["dynamic_bytes"] = int(torch.cuda.max_memory_allocated(lm.device))
        how = "torch.cuda.max_memory_allocated during generate (weights included)"
    else:
        answers, before, peak, found = _cpu_peak(lambda: generate(lm, images, questions, params))
        result["dynamic_bytes"] = static + max(peak - before, 0)
        result["process_rss_before_bytes"] = before
        result["process_peak_bytes"] = peak
        how = f"static + (peak RSS - RSS before) around generate ({found}; malloc_trim first)"
    result["generated_tokens"] = sum(a.new_tokens for a in answers)
    result["generate_seconds"] = round(time.perf_counter() - start, 3)
    result["method"] = {
        "static": "get_memory_footprint + bitsandbytes quant state + cpu-int8 packed weights",
        "dynamic": how,
        "warm_up": "one generate of 2 tokens on the same inputs",
    }
    return result
