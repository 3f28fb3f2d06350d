#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA machine:
#   bash bench/gpu_check.sh [quant] [serve] [serve-real] [serve-warm]
# (default quant and serve; quant about 4 minutes on an H200). Outputs go to $OUT (default ./gpu-out):
#   env.txt                      GPU, driver, torch, transformers, bitsandbytes versions
# quant (the quantization issue), most important first:
#   memory_table_cuda.{json,md,png}  the paper table with every CUDA row measured
#   phantomvqa_cuda.{json,md}    PhantomVQA accuracy of the demo model and its quantized variants
#                                (nf4 with the tower in LLM.int8 last), bitsandbytes' CUDA kernels
#   quant_speed_cpu_host.md      cpu-int8 vs fp32 on that machine's CPU (bonus; time-boxed)
# serve (the server issue):
#   metrics_cuda.txt             one question on the GPU, then the GPU series of /metrics
#   serve_load_cuda.{json,md}    bench/serve_load.py with the server on the GPU
# serve-real (the server issue, the cost of a real model per request):
#   serve_load_cuda_tl15b.{json,md}  the same with TinyLLaVA-1.5B's shape, random fp16 weights
# serve-warm (the server issue: does a batch size's first use cost seconds on a GPU?):
#   first_batch_cuda_{demo,tl15b}.{json,md}  first generate of each batch size 1..16 vs later
#   serve_load_cuda_tl15b_warm.{json,md}     serve-real's run with the server's warm-up (on by
#                                            default on a GPU since 2026-11-27)
#
# Inputs (prepared on a machine with the project installed):
# (`python bench/gpu_prepare.py` makes them all, into .gpu and .whl, and says their size):
#   $DATA/demo      the trained demo model (`make serve` trains it: ./data/models/demo),
#                   copied here to $DATA/data/models/demo for `serve`
#   $DATA/ph        PhantomVQA: tinyllava-med data phantom --out ph --n 500 --seed 98765,
#                   train.json + test.json merged into all.json
#   $DATA/site      python packages missing on the GPU image (bitsandbytes with its CUDA 13
#                   library), PYTHONPATH-ready; $WHEELS/*.whl installed on top (pydantic,
#                   transformers; for `serve` the server extra's packages as cp312 wheels)
set -u
STAGES=${*:-quant serve}
DATA=${DATA:-.gpu}
WHEELS=${WHEELS:-.whl}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT" /tmp/site "$DATA/data/models"
[ -d "$DATA/data/models/demo" ] || cp -r "$DATA/demo" "$DATA/data/models/demo"
cp -r "$DATA"/site/* /tmp/site/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
stamp() { echo "== $1 at +$(($(date +%s) - T0)) s"; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    lscpu | grep -E "Model name|^CPU\(s\)"
    echo "int8/bf16 flags: $(grep -o -w -E 'avx2|avx512f|avx512_vnni|avx512_bf16|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    python3 -c "import torch, transformers, bitsandbytes as b; print('torch', torch.__version__, 'cuda', torch.version.cuda); print('transformers', transformers.__version__); print('bitsandbytes', b.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ " $STAGES " == *" quant "* ]]; then

stamp "memory table on CUDA"
python3 -m tinyllava_med.quantize.table --device cuda --json "$OUT/memory_table_cuda.json" \
    --md "$OUT/memory_table_cuda.md" --png "$OUT/memory_table_cuda.png" 2>&1 |
    grep -v -E "Loading weights|Writing model shards"

stamp "PhantomVQA on CUDA"
Q=/tmp/q
python3 -m tinyllava_med.cli quantize "$DATA/demo" $Q/demo-nf4-tower --method nf4 \
    --skip model.multi_modal_projector lm_head &&
python3 -m tinyllava_med.cli quantize "$DATA/demo" $Q/demo-int8-tower --method int8 \
    --skip model.multi_modal_projector lm_head &&
TOWER8=$Q/demo-nf4-tower8 &&  # new on 2026-11-28: a failure here must not cost the other rows
{ python3 -m tinyllava_med.cli quantize "$DATA/demo" $TOWER8 --method nf4 \
    --int8 model.vision_tower || TOWER8=; } &&
python3 -m tinyllava_med.cli eval compare --device cuda \
    --variants "$DATA/demo" "$DATA/demo:8bit" "$DATA/demo:4bit" $Q/demo-nf4-tower $Q/demo-int8-tower \
    $TOWER8 \
    --questions "$DATA/ph/all.json" --images "$DATA/ph/images" --out-dir $Q/acc \
    --batch-size 64 --max-new-tokens 8 2>&1 | grep -v "Loading weights"
cp $Q/acc/compare.json "$OUT/phantomvqa_cuda.json"
cp $Q/acc/compare.md "$OUT/phantomvqa_cuda.md"

stamp "cpu-int8 vs fp32 on this machine's CPU (time-boxed)"
timeout "${CPU_BENCH_S:-100}" python3 bench/quant_speed.py --variants fp32,cpu-int8,cpu-int8-fast \
    --repeats 1 --no-micro --md "$OUT/quant_speed_cpu_host.md" 2>&1 | tail -15
fi

if [[ " $STAGES " == *" serve "* ]]; then
stamp "the server on the GPU: one question, /metrics"
python3 -c "import uvicorn, httptools, uvloop, tinyllava_med.server.app, tinyllava_med.server.db.migrate" || exit 1
TINYLLAVA_MED_DATA_DIR="$DATA/data" python3 bench/gpu_serve_check.py --out "$OUT/metrics_cuda.txt"

stamp "serve_load with the server on the GPU"
TINYLLAVA_MED_DATA_DIR="$DATA/data" timeout "${SERVE_LOAD_S:-300}" python3 bench/serve_load.py \
    --requests "${SERVE_REQUESTS:-240}" --rounds "${SERVE_ROUNDS:-2}" --out "$OUT/serve_load_cuda"
fi

if [[ " $STAGES " == *" serve-real "* ]]; then
stamp "serve_load with the TinyLLaVA-1.5B shape on the GPU"
python3 bench/real_shape_model.py /tmp/tl15 --device cuda --dtype float16 2>&1 |
    grep -v "Writing model shards"
timeout "${REAL_LOAD_S:-300}" python3 bench/serve_load.py --model /tmp/tl15 \
    --requests "${REAL_REQUESTS:-64}" --rounds 1 --out "$OUT/serve_load_cuda_tl15b"
fi
if [[ " $STAGES " == *" serve-warm "* ]]; then
stamp "first use of each batch size on the GPU"
timeout 60 python3 bench/first_batch.py --model "$DATA/demo" --device cuda \
    --md "$OUT/first_batch_cuda_demo.md" 2>&1 | grep -v "Loading weights"
[ -d /tmp/tl15 ] || python3 bench/real_shape_model.py /tmp/tl15 --device cuda --dtype float16 2>&1 |
    grep -v "Writing model shards"
timeout 240 python3 bench/first_batch.py --model /tmp/tl15 --device cuda \
    --md "$OUT/first_batch_cuda_tl15b.md" 2>&1 | grep -v "Loading weights"
stamp "serve_load with the TinyLLaVA-1.5B shape, warm-up on"
timeout "${REAL_LOAD_S:-300}" python3 bench/serve_load.py --model /tmp/tl15 \
    --requests "${REAL_REQUESTS:-64}" --rounds 1 --out "$OUT/serve_load_cuda_tl15b_warm"
fi
stamp done
