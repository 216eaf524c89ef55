#!/usr/bin/env bash
# The GPU checks and measurements of mixmim in one command, under ten minutes on one H100:
#   1. FlexAttention and the fast path against the release's maths (outputs and gradients, fp32);
#   2. the golden case on CUDA, every attention path (fp32, TF32 off);
#   3. 30 steps of mixmim_base at 224 in bf16 on the bundled photos: the loss must fall;
#   4. the measured bf16 matmul peak (MFU's denominator);
#   5. pretraining throughput (bf16): mixmim_base at batches 64 and 128 for the release's maths,
#      fast, flex, auto and fast + torch.compile, and SimMIM on the same encoder; MixMIM, SimMIM,
#      MAE and MixedAE on ViT-B; MixMIM vs SimMIM on Swin-B, PVT v2-b2 and ResNet-50;
#   6. everything written to benchmarks/results/cuda_<device>_*.json and the table printed.
# Usage: bash benchmarks/gpu_suite.sh            (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then PY=python3; fi

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_suite: needs a CUDA GPU and torch.cuda.is_available() is False here; nothing was run" >&2
    exit 2
fi

DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
SLUG=$(echo "$DEVICE" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9\n' '_' | sed 's/__*/_/g; s/_$//')
OUT=benchmarks/results
mkdir -p "$OUT"
echo "gpu_suite on: $DEVICE (results: $OUT/cuda_${SLUG}_*.json)"
STATUS=0

echo "== 1. FlexAttention / fast vs reference (fp32)"
"$PY" benchmarks/check_flex_cuda.py --tol 1e-4 --json "$OUT/cuda_${SLUG}_flex_check.json" || STATUS=1

echo "== 2-4. golden case on CUDA, 30 bf16 training steps, bf16 peak"
"$PY" benchmarks/cuda_checks.py golden train peak --device cuda --model mixmim_base --img-size 224 --steps 30 \
    --batch 64 --amp bf16 --json "$OUT/cuda_${SLUG}_checks.json" || STATUS=1
PEAK=$("$PY" -c "import json; print(json.load(open('$OUT/cuda_${SLUG}_checks.json'))['peak']['tflops'])")

echo "== 5. throughput (bf16), peak $PEAK TFLOP/s"
"$PY" benchmarks/pretrain_throughput.py --models mixmim_base --batch-sizes 64 128 --img-size 224 --steps 20 \
    --warmup 5 --amp bf16 --device cuda --threads 8 --peak-tflops "$PEAK" \
    --variants reference fast flex auto fast+compile simmim --json "$OUT/cuda_${SLUG}_mixmim_base.json" || STATUS=1
"$PY" benchmarks/pretrain_throughput.py --models vit_base --batch-sizes 128 --img-size 224 --steps 20 --warmup 5 \
    --amp bf16 --device cuda --threads 8 --peak-tflops "$PEAK" --variants mixmim simmim mae mixedae \
    --json "$OUT/cuda_${SLUG}_vit_base.json" || STATUS=1
"$PY" benchmarks/pretrain_throughput.py --models swin_base pvt_v2_b2 resnetv2_50 --batch-sizes 64 --img-size 224 \
    --steps 10 --warmup 3 --amp bf16 --device cuda --threads 8 --peak-tflops "$PEAK" --variants mixmim simmim \
    --json "$OUT/cuda_${SLUG}_encoders.json" || STATUS=1

echo "== 6. summary"
"$PY" benchmarks/summarize_results.py "$OUT"/cuda_"${SLUG}"_*.json
exit $STATUS
