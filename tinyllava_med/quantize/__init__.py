"""Post-training quantization (bitsandbytes nf4 / int8, CPU dynamic int8) and memory measurement."""
