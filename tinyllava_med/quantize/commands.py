"""What the `quantize` and `memory` verbs of the CLI do: thin calls with printed results.

tinyllava-med quantize ./data/models/tinyllava-med-f ./data/models/tinyllava-med-fq4 --method nf4
tinyllava-med quantize tinyllava-med-f ./fq4-tower8 --method nf4 --int8 model.vision_tower
tinyllava-med memory --model tinyllava-med-fq4 --json fq4.json
tinyllava-med memory --paper-table --json t.json --markdown t.md --png t.png  # ~4 min (CPU)
tinyllava-med memory --paper-table --device cuda --json t.json   # every CUDA row measured
tinyllava-med memory --paper-table --computed-only                 # seconds
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tinyllava_med.quantize.export import Method, quantize_checkpoint

GIB = 1024**3


def quantize_command(
    src: str,
    dst: str,
    *,
    method: Method,
    skip_modules: Sequence[str] | None = None,
    check_questions: str | None = None,
    check_images: str | None = None,
    check_prompts: int = 8,
    int8_modules: Sequence[str] = (),
) -> int:
    from tinyllava_med.quantize.check import CHECK_FILE, file_prompts, phantom_prompts

    try:
        if check_prompts < 1:
            raise ValueError("--check-prompts must be at least 1")
        checked = method == "cpu-int8" and skip_modules is None
        if (check_questions or check_images) and not checked:
            raise ValueError(
                "the output check (--check-questions, --check-images) runs only for "
                "--method cpu-int8 with the default skip list (no --skip)"
            )
        if check_questions and check_images:
            prompts = file_prompts(check_questions, check_images, check_prompts)
            name = Path(check_questions).name
        elif check_questions or check_images:
            raise ValueError("--check-questions and --check-images go together")
        elif checked:
            prompts, name = phantom_prompts(check_prompts), "PhantomVQA"
        else:
            prompts, name = None, ""
        out = quantize_checkpoint(
            src,
            dst,
            method=method,
            skip_modules=skip_modules,
            check_prompts=prompts,
            check_prompts_name=name,
            int8_modules=int8_modules,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (out / CHECK_FILE).is_file():  # written by this run (an earlier one's is removed)
        report = json.loads((out / CHECK_FILE).read_text())
        print(report["summary"])
        print(f"int8 beyond the default: {', '.join(report['int8_extra']) or 'nothing'}")
        if not report["default_ok"]:
            print(
                "warning: the default cpu-int8 recipe itself changed answers of the check "
                "(see the first score); compare this model with the unquantized one "
                "(`eval compare`) before serving it",
                file=sys.stderr,
            )
    print(f"{method} checkpoint written to {out}")
    return 0


def memory_command(
    *,
    model: str | None,
    quant: str | None = None,
    device: str | None = None,
    batch: int = 1,
    new_tokens: int = 32,
    paper_table: bool = False,
    measure: bool = True,
    json_path: str | None = None,
    md_path: str | None = None,
    png_path: str | None = None,
) -> int:
    """`memory --model M --quant Q` (one measurement) or `memory --paper-table` (the table)."""
    if paper_table:
        import torch

        from tinyllava_med.quantize.table import markdown, write_table
        from tinyllava_med.quantize.table import paper_table as build

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        table = build(measure=measure, batch=batch, new_tokens=new_tokens, device=device)
        write_table(table, json_path=json_path, md_path=md_path, png_path=png_path)
        print(markdown(table))
        return 0
    if not model:
        print("error: give --model (or --paper-table)", file=sys.stderr)
        return 2
    from tinyllava_med.quantize.memory import measure_memory

    try:
        result = measure_memory(
            model, quant=quant, batch=batch, new_tokens=new_tokens, device=device
        )
    except (ValueError, FileNotFoundError) as e:  # ModelNotFoundError is a FileNotFoundError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{result['variant']} ({result['quantization']}, {result['device']}): "
        f"static {result['static_bytes'] / GIB:.3f} GiB, "
        f"dynamic {result['dynamic_bytes'] / GIB:.3f} GiB "
        f"(batch {batch}, {new_tokens} new tokens)"
    )
    return 0
