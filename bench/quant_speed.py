"""CPU generation speed at the real TinyLLaVA-1.5B shape: fp32 vs cpu-int8 (and others), one run.

One image (384 px, 729 image tokens) + one question, batch 1, greedy, exactly N new tokens,
random weights with a fixed seed (speed depends on shapes, not values). Every variant is built
in this one process and runs on the same inputs, in rounds of alternating order; the best of the
rounds is reported (on a shared machine, interference only ever slows a run). Reported per variant: vision tower + projector seconds, prefill seconds (time to the
first token), decode tokens/s (after the first token), end-to-end tokens/s, and ratios to fp32.
A per-linear micro-benchmark (TinyLlama MLP shape, 774 tokens and 1 token) covers the
bitsandbytes and bf16 kernels, which are too slow on AVX2 CPUs to run whole in minutes.

    python bench/quant_speed.py --md bench/results/quant_speed_cpu.md     # ~10 min on 2 cores
    python bench/quant_speed.py --layers 2 --new-tokens 8                 # smoke test, ~1 min
    python bench/quant_speed.py --variants fp32,cpu-int8,bf16,nf4,int8    # all (slow here)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from tinyllava_med.model.prompts import build_prompt
from tinyllava_med.quantize.cpu_int8 import quantize_cpu_int8
from tinyllava_med.quantize.shapes import real_shape_lm

QUESTION = "Is there a nodule in the left lung?"
# cpu-int8 with only the projector in fp32: vision tower and lm_head int8 as well.
FAST_SKIP = ["model.multi_modal_projector"]
VARIANTS = {
    "fp32": "fp32, no quantization",
    "cpu-int8": "dynamic int8 linears in the LLM (default skip: tower, projector, lm_head fp32)",
    "cpu-int8-fast": "dynamic int8 everywhere but the projector (tower and lm_head int8 too)",
    "bf16": "bf16 weights and compute",
    "nf4": "bitsandbytes nf4 + double quant (default skip), CPU computes bf16",
    "int8": "bitsandbytes LLM.int8 (default skip)",
}


class Clock(BaseStreamer):
    """Timestamps of every `put` (the first one is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def end(self) -> None:
        pass


def _generate(model: Any, inputs: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    clock = Clock()
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            streamer=clock,
        )
    end, cpu_end = time.perf_counter(), time.process_time()
    first, last = clock.times[1], clock.times[-1]
    return {
        "prefill_s": first - start,
        "decode_tok_s": (new_tokens - 1) / (last - first) if new_tokens > 1 else None,
        "total_s": end - start,
        "tok_s": new_tokens / (end - start),
        "prefill_cpu_s": clock.cpu[1] - cpu_start,
        "decode_tok_per_cpu_s": (new_tokens - 1) / (clock.cpu[-1] - clock.cpu[1]),
        "tok_per_cpu_s": new_tokens / (cpu_end - cpu_start),
        "ids": out[0, inputs["input_ids"].shape[1] :].tolist(),
    }


def _vision_seconds(model: Any, pixel_values: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model.model.get_image_features(pixel_values=pixel_values)
    return time.perf_counter() - start


def _warm_up(model: Any, tokenizer: Any) -> None:
    ids = tokenizer("USER: hello ASSISTANT:", return_tensors="pt")
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=0)


def _bnb_model(lm: Any, method: str, tmp: str) -> Any:
    from tinyllava_med.model.load import load_model
    from tinyllava_med.model.meta import ServedMeta
    from tinyllava_med.model.tiny import save_served

    half = copy.deepcopy(lm.model).half()
    save_served(half, lm.processor, tmp, ServedMeta(template=lm.template, name="bench"))
    del half
    gc.collect()
    return load_model(tmp, quant={"nf4": "4bit", "int8": "8bit"}[method], device="cpu").model


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of the repeats per measure (interference on a shared machine only slows)."""
    best = {k: min(r[k] for r in rows) for k in ("vision_s", "prefill_s", "total_s")}
    best["prefill_cpu_s"] = min(r["prefill_cpu_s"] for r in rows)
    for k in ("decode_tok_s", "tok_s", "decode_tok_per_cpu_s", "tok_per_cpu_s"):
        best[k] = max(r[k] for r in rows)
    return {**best, "ids": rows[0]["ids"], "repeats": len(rows)}


def build_variant(name: str, lm: Any, tmp: str) -> Any:
    if name == "fp32":
        return lm.model
    if name == "bf16":
        return copy.deepcopy(lm.model).to(torch.bfloat16)
    if name in ("cpu-int8", "cpu-int8-fast"):
        skip = FAST_SKIP if name == "cpu-int8-fast" else None
        return quantize_cpu_int8(copy.deepcopy(lm.model), skip)
    if name in ("nf4", "int8"):
        return _bnb_model(lm, name, tmp)
    raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")


def linear_micro() -> dict[str, dict[str, float]]:
    """ms per call of one 2048 -> 5632 linear (TinyLlama gate/up), 774 tokens and 1 token."""
    import bitsandbytes as bnb
    from torch import nn

    from tinyllava_med.quantize.cpu_int8 import quantize_cpu_int8 as q8

    torch.manual_seed(0)
    fp32 = nn.Linear(2048, 5632, bias=False)
    w = fp32.weight.data
    dyn = q8(nn.Sequential(copy.deepcopy(fp32)), skip_modules=[])[0]
    l4 = bnb.nn.Linear4bit(2048, 5632, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4")._quantize("cpu")
    l8 = bnb.nn.Linear8bitLt(2048, 5632, bias=False, has_fp16_weights=False)
    l8.weight = bnb.nn.Int8Params(w.clone().half(), requires_grad=False, has_fp16_weights=False)
    l8.weight = l8.weight._quantize("cpu")
    kinds = {
        "fp32": (fp32, torch.float32),
        "cpu-int8": (dyn, torch.float32),
        "bf16": (copy.deepcopy(fp32).to(torch.bfloat16), torch.bfloat16),
        "nf4": (l4, torch.bfloat16),
        "int8": (l8, torch.float16),
    }
    out: dict[str, dict[str, float]] = {}
    for tokens, reps in ((774, 3), (1, 30)):
        x = torch.randn(1, tokens, 2048)
        for name, (module, dtype) in kinds.items():
            xi = x.to(dtype)
            with torch.inference_mode():
                module(xi)
                start = time.perf_counter()
                for _ in range(reps):
                    module(xi)
            ms = (time.perf_counter() - start) / reps * 1000
            out.setdefault(name, {})[f"{tokens}_tokens_ms"] = round(ms, 2)
    return out


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln), ""
    )
    flags = Path("/proc/cpuinfo").read_text()
    return {
        "cpu": model or platform.processor(),
        "cores": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
        "load_avg": [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="fp32,cpu-int8,cpu-int8-fast")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=None, help="cut to N layers (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="rounds over all variants; best kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--no-micro", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    names = [n for n in a.variants.split(",") if n]
    if a.threads:
        torch.set_num_threads(a.threads)
    info = {"command": " ".join(["python", *sys.argv]), "machine_start": machine()}
    lm = real_shape_lm("tinyllava-1.5b", seed=a.seed, layers=a.layers)
    image = Image.linear_gradient("L").resize((384, 384)).convert("RGB")
    inputs = dict(
        lm.processor(
            images=[image], text=[build_prompt(lm.template, QUESTION)], return_tensors="pt"
        )
    )
    info["prompt_tokens"] = int(inputs["input_ids"].shape[1])
    with tempfile.TemporaryDirectory(prefix="tlm-bench-") as tmp:
        models = {n: build_variant(n, lm, f"{tmp}/{n}") for n in dict.fromkeys(["fp32", *names])}
        for model in models.values():
            _warm_up(model, lm.processor.tokenizer)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
        for rep in range(a.repeats):  # rounds in alternating order: drift hits every variant
            order = list(models) if rep % 2 == 0 else list(reversed(models))
            for name in order:
                model = models[name]
                pixels = inputs["pixel_values"].to(model.dtype)
                row = {"vision_s": _vision_seconds(model, pixels)}
                row.update(_generate(model, {**inputs, "pixel_values": pixels}, a.new_tokens))
                runs[name].append(row)
                shown = {k: round(v, 3) for k, v in row.items() if k != "ids"}
                print(json.dumps({"round": rep, name: shown}), flush=True)
    results = {name: _best(rows) for name, rows in runs.items()}
    info["machine_end"] = machine()
    if not a.no_micro:
        info["linear_micro"] = linear_micro()
    report = {**info, "results": results, "runs": runs, "descriptions": VARIANTS}
    text = render(report, a.new_tokens)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    if a.md:
        Path(a.md).write_text(text)
    return 0


def render(report: dict[str, Any], new_tokens: int) -> str:
    res = report["results"]
    base = res["fp32"]
    m0, m1 = report["machine_start"], report["machine_end"]
    lines = [
        "# CPU generation speed, TinyLLaVA-1.5B shape (random weights)",
        "",
        f"Command: `{report['command']}`",
        f"Machine: {m0['cpu']}, {m0['cores']} threads, avx512_bf16={m0['avx512_bf16']}, "
        f"torch {m0['torch']} (quantized engine {m0['quantized_engine']}); load average "
        f"{m0['load_avg']} at start, {m1['load_avg']} at end (shared machine).",
        f"Input: one 384 px image + question = {report['prompt_tokens']} prompt tokens, "
        f"{new_tokens} new tokens, batch 1, greedy; best of {base['repeats']} rounds per variant "
        "(alternating order; per-round numbers below).",
        "",
        "| variant | vision+proj s | prefill s | decode tok/s | end-to-end tok/s | "
        "x fp32 end-to-end | x fp32 decode | x fp32 prefill | same tokens as fp32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in res.items():
        same = sum(x == y for x, y in zip(r["ids"], base["ids"], strict=True))
        lines.append(
            f"| {name} | {r['vision_s']:.1f} | {r['prefill_s']:.1f} | {r['decode_tok_s']:.2f} | "
            f"{r['tok_s']:.3f} | {r['tok_s'] / base['tok_s']:.2f} | "
            f"{r['decode_tok_s'] / base['decode_tok_s']:.2f} | "
            f"{base['prefill_s'] / r['prefill_s']:.2f} | {same}/{len(base['ids'])} |"
        )
    lines += [
        "",
        "The same per CPU-second of this process (robust to time lost to other processes):",
        "",
        "| variant | prefill CPU-s | decode tok/CPU-s | end-to-end tok/CPU-s | x fp32 end-to-end "
        "| x fp32 decode | x fp32 prefill |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in res.items():
        lines.append(
            f"| {name} | {r['prefill_cpu_s']:.1f} | {r['decode_tok_per_cpu_s']:.2f} | "
            f"{r['tok_per_cpu_s']:.3f} | {r['tok_per_cpu_s'] / base['tok_per_cpu_s']:.2f} | "
            f"{r['decode_tok_per_cpu_s'] / base['decode_tok_per_cpu_s']:.2f} | "
            f"{base['prefill_cpu_s'] / r['prefill_cpu_s']:.2f} |"
        )
    lines += ["", "Per round (prefill s / decode tok/s):", ""]
    for name, rows in report["runs"].items():
        rounds = ", ".join(f"{r['prefill_s']:.1f} / {r['decode_tok_s']:.2f}" for r in rows)
        lines.append(f"- {name}: {rounds}")
    if "linear_micro" in report:
        lines += [
            "",
            "Per-linear micro-benchmark, 2048 -> 5632 (ms per call):",
            "",
            "| kernel | 774 tokens (prefill) | 1 token (decode) |",
            "| --- | ---: | ---: |",
        ]
        for name, r in report["linear_micro"].items():
            lines.append(f"| {name} | {r['774_tokens_ms']} | {r['1_tokens_ms']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
