"""Does a batch size's first `generate` cost more than its later ones? One process, one model.

For each batch size, three batches of the same shape in a row: the first use against the median
of the next two. This is what the server's warm-up (`TINYLLAVA_MED_WARMUP`, on a GPU by default)
pays before it takes requests. Rows have questions of different lengths (padded as in service)
and distinct images; every answer runs to `--new-tokens` unless the model says EOS.

    python bench/first_batch.py --md bench/results/first_batch_cpu.md        # demo, ~1 min
    python bench/first_batch.py --model /tmp/tl15 --device cuda --md gpu-out/first_batch_cuda.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from machine import accelerator, cpu_name  # bench/, this script's folder
from PIL import Image

from tinyllava_med.model.generate import SamplingParams, generate
from tinyllava_med.model.load import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="variant name or served-format folder")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(range(1, 17)))
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--md", type=Path, required=True)
    args = ap.parse_args()

    lm = load_model(args.model, device=args.device)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray((rng.random((128, 128)) * 255).astype("uint8")).convert("RGB")
        for _ in range(max(args.sizes))
    ]
    params = SamplingParams(max_new_tokens=args.new_tokens)

    def batch_ms(n: int) -> float:
        questions = [f"Question {i}: is this normal?" + " Describe it." * (i % 3) for i in range(n)]
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate(lm, images[:n], questions, params)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000

    rows = []
    for n in args.sizes:
        first, *later = (batch_ms(n) for _ in range(3))
        rows.append({"size": n, "first_ms": first, "later_ms": later})
        print(rows[-1], flush=True)

    lines = [
        "# First use of a batch size: one `generate` per size, first against later",
        "",
        f"Command: `python bench/first_batch.py --model {args.model} --device {args.device} "
        f"--new-tokens {args.new_tokens} --md {args.md}`",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, {accelerator()}; model on "
        f"{lm.device}, {str(lm.dtype).removeprefix('torch.')}.",
        "",
        "| batch size | first ms | later ms (median of 2) | first / later |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        later = statistics.median(r["later_ms"])
        lines.append(
            f"| {r['size']} | {r['first_ms']:.1f} | {later:.1f} | {r['first_ms'] / later:.2f} |"
        )
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text("\n".join(lines) + "\n")
    args.md.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
