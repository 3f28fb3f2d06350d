"""A follow-up question about the same image, with and without the prefix cache, on a CPU.

TinyLLaVA-1.5B's shape (random weights, seed 0), fp32 and cpu-int8, one 384 px image, batch 1,
greedy, exactly `--new-tokens` tokens. Per variant, in one process: a question with no cache,
the first question with an empty cache (it stores the prompt up to the image), then a different
question about the same image (it reuses that); then, with another empty cache, the image
prepared ahead (`prefill_image`, what the server does when a viewer opens the image) and the
first question about it.

    python bench/prefix_cache_cpu.py --md bench/results/prefix_cache_cpu.md   # ~4 min, 2 cores
    python bench/prefix_cache_cpu.py --layers 2 --md /tmp/p.md                # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
from machine import cpu_name
from PIL import Image

from tinyllava_med.model.generate import SamplingParams, generate, prepare_image
from tinyllava_med.model.prefixes import cache_bytes, prefill_image
from tinyllava_med.quantize.cpu_int8 import quantize_cpu_int8
from tinyllava_med.quantize.shapes import real_shape_lm
from tinyllava_med.server.lru import ByteLRU

FIRST, FOLLOW_UP = "Is there a nodule in the left lung?", "Which organ is shown?"


def timed(lm, question: str, params: SamplingParams, **kw) -> tuple[float, float, str, int]:
    """(seconds to the first token, seconds to the whole answer, its text, prompt tokens)."""
    first: list[float] = []
    start = time.perf_counter()
    answer = generate(
        lm,
        [IMAGE],
        [question],
        params,
        on_token=lambda row, delta: first.append(time.perf_counter()),
        text_rows=[False],
        **kw,
    )[0]
    return first[0] - start, time.perf_counter() - start, answer.text, answer.prompt_tokens


rng = np.random.default_rng(0)
IMAGE = Image.fromarray((rng.random((384, 384, 3)) * 255).astype("uint8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None, help="cut to N layers (smoke test)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--md", type=Path, required=True)
    args = ap.parse_args()
    params = SamplingParams(max_new_tokens=args.new_tokens)
    lm = real_shape_lm("tinyllava-1.5b", layers=args.layers)
    rows = []
    for name in ("fp32", "cpu-int8"):
        if name == "cpu-int8":  # in place: fp32 is done with the model
            lm = dataclasses.replace(lm, model=quantize_cpu_int8(lm.model))
        timed(lm, "warm up", SamplingParams(max_new_tokens=1))
        runs = []
        for _ in range(args.rounds):  # each with an empty cache; the best of each is kept
            store = ByteLRU(1 << 30, cache_bytes)
            plain = timed(lm, FOLLOW_UP, params)
            first = timed(lm, FIRST, params, prefixes=store, image_keys=["img"])
            follow = timed(lm, FOLLOW_UP, params, prefixes=store, image_keys=["img"])
            store = ByteLRU(1 << 30, cache_bytes)
            start = time.perf_counter()
            assert prefill_image(lm, prepare_image(lm, IMAGE), "img", store)
            ahead = time.perf_counter() - start
            prepared = timed(lm, FIRST, params, prefixes=store, image_keys=["img"])
            assert (store.misses, store.hits) == (1, 1), "the question did not find the prefill"
            runs.append((plain, first, follow, prepared + (ahead,)))
            print(name, runs[-1], flush=True)
        best = [min(r[i] for r in runs) for i in range(4)]
        rows.append((name, *best, store.bytes))
    load = os.getloadavg()
    lines = [
        "# A follow-up question with the prefix cache, CPU, TinyLLaVA-1.5B shape",
        "",
        f"Command: `python bench/prefix_cache_cpu.py --new-tokens {args.new_tokens} "
        f"--rounds {args.rounds} --md {args.md}`"
        + (f" (cut to {args.layers} layers)" if args.layers else ""),
        f"Machine: {cpu_name()}, {os.cpu_count()} cores; load average at the end "
        f"{load[0]:.2f}. One 384 px image, batch 1, greedy, {args.new_tokens} new tokens, best "
        f"of {args.rounds} rounds (each: no cache, first question, follow-up, first question "
        "about an image prepared ahead), "
        "random weights (their answers decode to empty text, so the equality of cached and "
        "uncached answers is tested on the tiny models instead: tests/model/test_convert.py).",
        "",
        "Seconds to the first token / to the whole answer:",
        "",
        "| variant | prompt tokens | no cache | first question (stores the prefix) "
        "| follow-up (reuses it) | follow-up x faster (first token, answer) "
        "| first question, image prepared ahead (preparing s) | cache MB per image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, plain, first, follow, ahead, size in rows:
        lines.append(
            f"| {name} | {plain[3]} | {plain[0]:.2f} / {plain[1]:.2f} | "
            f"{first[0]:.2f} / {first[1]:.2f} | {follow[0]:.2f} / {follow[1]:.2f} | "
            f"{plain[0] / follow[0]:.1f}x, {plain[1] / follow[1]:.1f}x | "
            f"{ahead[0]:.2f} / {ahead[1]:.2f} ({ahead[4]:.1f}) | {size / 2**20:.1f} |"
        )
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
