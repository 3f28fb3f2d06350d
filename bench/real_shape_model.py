"""Write a served-format checkpoint of a paper architecture with random weights.

    python bench/real_shape_model.py OUT [--arch tinyllava-1.5b] [--dtype float16] [--device cuda]

For benchmarks that need the real model's cost per request (`serve_load.py --model OUT`), not
its answers: the weights are N(0, 0.02) (`quantize.shapes.random_model`), the tokenizer is the
small local one of `quantize.shapes`, and the folder's `tinyllava_med.json` says so in `notes`.
`--layers N` cuts the tower and the LLM to N layers (real widths) for a quick try on a CPU.
"""

from __future__ import annotations

import argparse

import torch

from tinyllava_med.model.meta import ServedMeta
from tinyllava_med.model.tiny import save_served
from tinyllava_med.quantize.shapes import ARCHS, real_shape_lm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--arch", choices=ARCHS, default="tinyllava-1.5b")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--device", default="cpu", help="where the random weights are drawn")
    ap.add_argument("--layers", type=int, default=None)
    args = ap.parse_args(argv)
    lm = real_shape_lm(
        args.arch, dtype=getattr(torch, args.dtype), device=args.device, layers=args.layers
    )
    note = f"random weights at the {args.arch} shape: for benchmarks only, its answers mean nothing"
    meta = ServedMeta(template=lm.template, name=f"{args.arch}-random", notes=note)
    save_served(lm.model, lm.processor, args.out, meta)
    print(f"wrote {args.out}: {args.arch}, {args.dtype}, layers {args.layers or 'all'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
