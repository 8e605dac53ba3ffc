#!/usr/bin/env bash
# GPU check, one call on a fresh machine without network (about 5 minutes on an H100):
# SD 2.1-base layout with random weights, 512 px, batch 8, all three stages;
# `fast` with the default and low memory presets against `reference` (the released code's
# approach) in bf16, and `reference` in fp32 (how the released code runs without an
# accelerate config). Writes $OUT/bench_bf16.{json,md}, $OUT/bench_fp32_ref.{json,md}.
#
# Packages missing there travel as wheels in .whl/ (see scripts/download_wheels.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import diffusers, omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
low_flags=""
python3 -c "import bitsandbytes" 2>/dev/null || low_flags="--no_8bit"  # low preset without 8-bit AdamW then
export PYTHONUNBUFFERED=1
python3 scripts/benchmark.py --layout sd21 --device cuda --precision bf16 --batch_size 8 \
  --variants reference,fast,fast+cl --presets default,low $low_flags --warmup 2 --steps 5 --repeats 1 \
  --views 8 --out "$OUT/bench_bf16.json" 2>&1 | grep -v "it/s" | tee "$OUT/bench_bf16.log"
python3 scripts/benchmark.py --layout sd21 --device cuda --precision fp32 --batch_size 8 \
  --variants reference --warmup 1 --steps 3 --repeats 1 --views 8 \
  --out "$OUT/bench_fp32_ref.json" 2>&1 | grep -v "it/s" | tee "$OUT/bench_fp32_ref.log"
