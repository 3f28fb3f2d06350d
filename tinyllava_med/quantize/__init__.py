"""Post-training quantization (bitsandbytes nf4 / int8, CPU dynamic int8) and memory measurement.

- `export.quantize_checkpoint(src, dst, method=...)`: write a quantized served checkpoint.
- `runtime.load_weights`: what `model.load.load_model` calls to load (or quantize while loading).
- `cpu_int8`: dynamic int8 linears and their int8-only safetensors format.
- `skip`: which modules stay in higher precision, matched as transformers 5 matches them.
- `memory.measure_memory`: measured static and dynamic bytes of a loaded model.
- `estimate.computed_memory` + `shapes`: bytes computed from the real architectures' shapes.
- `table.paper_table`: the paper's six variants plus cpu-int8 (JSON, Markdown, PNG); with
  `device="cuda"` its rows are measured on the GPU by `device_rows.measure_rows`.
- `commands`: what the CLI's `quantize` and `memory` verbs call.
"""
