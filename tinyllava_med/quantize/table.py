"""`memory --paper-table`: the paper's six variants plus cpu-int8, at real shapes.

Without a GPU, rows for CUDA (fp16, bitsandbytes) are computed from shapes
(`quantize.estimate`); rows this machine can hold are measured on the CPU, each in a fresh
process (a random-weight model of the real shape, `measure_memory`), next to their computed
values as a cross-check. With `device="cuda"` every CUDA row is measured on the GPU
(`quantize.device_rows`), plus the `+tower` rows (the vision tower in nf4 too) and the
`+tower8` rows (the tower in LLM.int8, the LLM in nf4), each beside its computed value; without
a GPU those rows are computed like the paper's. The CPU `cpu-int8+tower` row is what
`quantize --method cpu-int8` writes when its output check accepts the tower and `lm_head`
(`quantize.check`): only the projector in fp32.
Reductions are against LLaVA-Med fp16 (measured on the GPU, else computed), beside
the paper's (FQ4 -90% static / -89% dynamic; Q4 -67% / -65%). Output: a dict (JSON), a Markdown
table and a PNG bar chart.

    python -m tinyllava_med.quantize.table --json t.json --md t.md --png t.png     # measures
    python -m tinyllava_med.quantize.table --device cuda --json t.json             # on a GPU
    python -m tinyllava_med.quantize.table --computed-only --md t.md               # seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tinyllava_med.model.registry import VARIANTS
from tinyllava_med.quantize.device_rows import TOWER_INT8, TOWER_SKIP, RowSpec
from tinyllava_med.quantize.estimate import computed_memory
from tinyllava_med.quantize.shapes import ARCH_OF_FAMILY, Arch

PAPER_VARIANTS = (
    "tinyllava-med-f",
    "tinyllava-med-fq8",
    "tinyllava-med-fq4",
    "llava-med",
    "llava-med-q8",
    "llava-med-q4",
)
PAPER_REDUCTION_PCT = {"tinyllava-med-fq4": (90.0, 89.0), "llava-med-q4": (67.0, 65.0)}
REFERENCE = "llava-med"
CPU_VARIANT = {"none": "tinyllava-med-f", "8bit": "tinyllava-med-fq8", "4bit": "tinyllava-med-fq4"}
# Ours: the 4-bit variants with the vision tower in nf4 as well (projector and lm_head fp16).
TOWER_ROWS = {"tinyllava-med-fq4": "tinyllava-med-fq4+tower", "llava-med-q4": "llava-med-q4+tower"}
# ... and with the tower in LLM.int8 instead: -92% static for TinyLLaVA, computed
TOWER8_ROWS = {
    "tinyllava-med-fq4": "tinyllava-med-fq4+tower8",
    "llava-med-q4": "llava-med-q4+tower8",
}
# cpu-int8 with the tower and lm_head in int8 too, as the output check of `quantize` may choose.
CPU_TOWER_ROW = "tinyllava-med-f+tower"
CPU_TOWER_SKIP: tuple[str, ...] = ("model.multi_modal_projector",)
GIB = 1024**3


def arch_of(variant: str) -> Arch:
    return ARCH_OF_FAMILY[VARIANTS[variant.split("+")[0]].family]


def _row(variant: str, quant: str, device: str, source: str, mem: dict[str, Any]) -> dict[str, Any]:
    arch = arch_of(variant)
    dtype = "fp16" if device == "cuda" else "fp32"
    label = f"{variant} ({quant}, {device}, {source})"
    return {
        "variant": variant,
        "label": label,
        "arch": arch,
        "quantization": quant,
        "device": device,
        "float_dtype": dtype,
        "source": source,
        "static_bytes": int(mem["static_bytes"]),
        "dynamic_bytes": int(mem["dynamic_bytes"]),
    }


def measure_real_shape(
    arch: Arch,
    quant: str,
    *,
    batch: int = 1,
    new_tokens: int = 32,
    skip: Sequence[str] | None = None,
) -> dict:
    """Measure one random-weight real-shape model on the CPU (call in a fresh process).
    `skip`: the cpu-int8 skip list (default: the default list)."""
    from tinyllava_med.model.load import load_model
    from tinyllava_med.model.meta import ServedMeta
    from tinyllava_med.model.tiny import save_served
    from tinyllava_med.quantize.cpu_int8 import quantize_cpu_int8
    from tinyllava_med.quantize.memory import measure_memory
    from tinyllava_med.quantize.shapes import real_shape_lm

    if quant in ("4bit", "8bit"):  # bitsandbytes quantizes while loading a checkpoint
        import torch

        lm = real_shape_lm(arch, dtype=torch.float16)
        with tempfile.TemporaryDirectory(prefix="tlm-real-") as tmp:
            save_served(lm.model, lm.processor, tmp, ServedMeta(template=lm.template, name=arch))
            del lm
            loaded = load_model(tmp, quant=quant, device="cpu")
            return measure_memory(loaded, quant=quant, batch=batch, new_tokens=new_tokens)
    lm = real_shape_lm(arch)
    if quant == "cpu-int8":
        quantize_cpu_int8(lm.model, skip)
        lm.quantization = "cpu-int8"
    return measure_memory(lm, quant=quant, batch=batch, new_tokens=new_tokens)


def _measure_in_child(
    arch: Arch, quant: str, batch: int, new_tokens: int, skip: Sequence[str] | None = None
) -> dict[str, Any]:
    code = (
        "import json, sys; from tinyllava_med.quantize.table import measure_real_shape as m; "
        "print(json.dumps(m(sys.argv[1], sys.argv[2], batch=int(sys.argv[3]), "
        "new_tokens=int(sys.argv[4]), skip=json.loads(sys.argv[5]))))"
    )
    args = [arch, quant, str(batch), str(new_tokens), json.dumps(None if skip is None else skip)]
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_specs() -> list[RowSpec]:
    """The six paper variants (quantized while loading), the `+tower` and `+tower8` rows.

    `measure_rows` groups them by architecture: f, fq8, fq4, fq4+tower, fq4+tower8, then the
    LLaVA-Med rows.
    """
    specs = [RowSpec(name, VARIANTS[name].quantization) for name in PAPER_VARIANTS]
    specs += [RowSpec(v, "4bit", TOWER_SKIP, name=shown) for v, shown in TOWER_ROWS.items()]
    return specs + [
        RowSpec(v, "4bit", TOWER_SKIP, name=shown, int8=TOWER_INT8)
        for v, shown in TOWER8_ROWS.items()
    ]


def _cuda_rows(batch: int, new_tokens: int) -> list[dict[str, Any]]:
    import torch

    from tinyllava_med.quantize.device_rows import measure_rows
    from tinyllava_med.quantize.shapes import real_shape_lm

    def build(arch: str) -> Any:
        return real_shape_lm(arch, dtype=torch.float16, device="cuda")  # type: ignore[arg-type]

    measured = measure_rows(
        cuda_specs(), build, arch_of=arch_of, device="cuda", batch=batch, new_tokens=new_tokens
    )
    rows = []
    for m in measured:
        computed = computed_memory(
            m["arch"],
            m["quantization"],
            batch=batch,
            new_tokens=new_tokens,
            skip=m["skip_modules"],
            int8=m.get("int8_modules") or (),
        )
        if "error" in m:  # the computed row, saying why it is not measured
            row = _row(m["variant"], m["quantization"], "cuda", "computed", computed)
            row["measurement_error"] = m["error"]
        else:
            row = _row(m["variant"], m["quantization"], "cuda", "measured", m)
        row["computed_static_bytes"] = computed["static_bytes"]
        row["computed_dynamic_bytes"] = computed["dynamic_bytes"]
        for key in (
            "how",
            "skip_modules",
            "int8_modules",
            "generate_seconds",
            "generated_tokens",
            "load_seconds",
            "allocated_after_load_bytes",
            "baseline_allocated_bytes",
        ):
            row[key] = m.get(key)
        rows.append(row)
    return rows


def paper_table(
    *,
    measure: bool = True,
    measure_quants: Sequence[str] = ("none", "cpu-int8"),
    batch: int = 1,
    new_tokens: int = 32,
    device: str = "cpu",
) -> dict[str, Any]:
    """The table as a JSON-able dict: `rows`, the reference, and how each number was found.

    `device="cuda"` measures the CUDA rows on the GPU; the CPU rows are then computed only.
    """
    on_gpu = measure and device.startswith("cuda")
    rows = []
    if on_gpu:
        rows = _cuda_rows(batch, new_tokens)
    else:
        for spec in cuda_specs():
            mem = computed_memory(
                arch_of(spec.variant),
                spec.quant,
                batch=batch,
                new_tokens=new_tokens,
                skip=spec.skip,
                int8=spec.int8,
            )
            rows.append(_row(spec.shown, spec.quant, "cuda", "computed", mem))
            if spec.skip is not None:
                rows[-1].update(skip_modules=list(spec.skip), int8_modules=list(spec.int8))
    ref = next(r for r in rows if r["variant"] == REFERENCE)
    cpu_quants = list(dict.fromkeys(["none", "cpu-int8", *measure_quants]))
    cpu_rows: list[tuple[str, str, Sequence[str] | None]] = [
        (CPU_VARIANT.get(q, "tinyllava-med-f"), q, None) for q in cpu_quants
    ]
    cpu_rows.insert(cpu_quants.index("cpu-int8") + 1, (CPU_TOWER_ROW, "cpu-int8", CPU_TOWER_SKIP))
    for variant, quant, skip in cpu_rows:
        arch = arch_of(variant)
        computed = computed_memory(
            arch, quant, device="cpu", batch=batch, new_tokens=new_tokens, skip=skip
        )
        if measure and not on_gpu and quant in measure_quants:
            measured = _measure_in_child(arch, quant, batch, new_tokens, skip)
            row = _row(variant, quant, "cpu", "measured", measured)
            row["computed_static_bytes"] = computed["static_bytes"]
            row["computed_dynamic_bytes"] = computed["dynamic_bytes"]
            row["generate_seconds"] = measured.get("generate_seconds")
        else:
            row = _row(variant, quant, "cpu", "computed", computed)
        if skip is not None:
            row["skip_modules"] = list(skip)
        rows.append(row)
    for row in rows:
        for key in ("static", "dynamic"):
            row[f"{key}_reduction_pct"] = round(
                100.0 * (1 - row[f"{key}_bytes"] / ref[f"{key}_bytes"]), 1
            )
        paper = PAPER_REDUCTION_PCT.get(row["variant"].split("+")[0])
        paper = paper if row["device"] == "cuda" else None
        row["paper_static_reduction_pct"] = paper[0] if paper else None
        row["paper_dynamic_reduction_pct"] = paper[1] if paper else None
    return {
        "reference": f"{REFERENCE} (fp16, cuda, {ref['source']})",
        "batch": batch,
        "new_tokens": new_tokens,
        "rows": rows,
        "method": {
            "computed": "quantize.estimate: exact bytes per parameter per scheme (bitsandbytes "
            "nf4 blocksize-64 absmax + double-quant state, LLM.int8 row scales, skipped modules "
            "in fp16) + KV cache + an activation estimate",
            "measured": "quantize.memory.measure_memory on a random-weight real-shape model: "
            + (
                "CUDA, one process, allocator peak minus what was allocated before the load "
                "(quantize.device_rows)"
                if on_gpu
                else "CPU, one process per row"
            ),
            "skip_modules": "model.vision_tower, model.multi_modal_projector, lm_head; "
            f"+tower rows: {', '.join(TOWER_SKIP)} (4-bit), {', '.join(CPU_TOWER_SKIP)} "
            f"(cpu-int8); +tower8 rows: as +tower with {', '.join(TOWER_INT8)} in LLM.int8",
        },
    }


def _gib(n: int | None) -> str:
    return "" if n is None else f"{n / GIB:.2f}"


def _pct(reduction: float) -> str:
    return f"{-reduction or 0.0:+.1f}%"


def markdown(table: dict[str, Any]) -> str:
    lines = [
        f"Memory at real shapes, batch {table['batch']}, {table['new_tokens']} new tokens; "
        f"reductions vs {table['reference']}.",
        "",
        "| variant | quant | device | source | static GiB | dynamic GiB | static vs ref | "
        "dynamic vs ref | paper static / dynamic | computed static / dynamic GiB |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table["rows"]:
        paper = (
            f"-{r['paper_static_reduction_pct']:.0f}% / -{r['paper_dynamic_reduction_pct']:.0f}%"
            if r["paper_static_reduction_pct"] is not None
            else ""
        )
        check = (
            f"{_gib(r['computed_static_bytes'])} / {_gib(r['computed_dynamic_bytes'])}"
            if "computed_static_bytes" in r
            else ""
        )
        lines.append(
            f"| {r['variant']} | {r['quantization']} | {r['device']} ({r['float_dtype']}) | "
            f"{r['source']} | {_gib(r['static_bytes'])} | {_gib(r['dynamic_bytes'])} | "
            f"{_pct(r['static_reduction_pct'])} | {_pct(r['dynamic_reduction_pct'])} | "
            f"{paper} | {check} |"
        )
    lines += ["", *(f"- {k}: {v}" for k, v in table["method"].items())]
    return "\n".join(lines) + "\n"


def write_table(
    table: dict[str, Any],
    *,
    json_path: str | Path | None = None,
    md_path: str | Path | None = None,
    png_path: str | Path | None = None,
) -> None:
    from tinyllava_med.quantize.chart import bar_chart

    if json_path:
        Path(json_path).write_text(json.dumps(table, indent=2) + "\n")
    if md_path:
        Path(md_path).write_text(markdown(table))
    if png_path:
        bar_chart(
            table["rows"], png_path, title=f"Static and dynamic memory ({table['reference']})"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--computed-only", action="store_true", help="compute every row, measure none")
    p.add_argument("--measure-quants", default="none,cpu-int8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cuda: measure the CUDA rows on the GPU")
    p.add_argument("--json")
    p.add_argument("--md")
    p.add_argument("--png")
    a = p.parse_args(argv)
    table = paper_table(
        measure=not a.computed_only,
        measure_quants=[q for q in a.measure_quants.split(",") if q],
        batch=a.batch,
        new_tokens=a.new_tokens,
        device=a.device,
    )
    write_table(table, json_path=a.json, md_path=a.md, png_path=a.png)
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
