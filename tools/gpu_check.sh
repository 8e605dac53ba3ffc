#!/usr/bin/env bash
# GPU check, one call on a fresh machine without network (about 8 minutes on an H100).
# SD 2.1-base layout with random weights, 512 px, batch 8, all three stages:
#   bench_bf16      `fast` and `fast+cl` with the default and low memory presets against `reference`
#                   (the released code's approach), bf16 autocast
#   bench_fp32_ref  `reference` in fp32 (how the released code runs without an accelerate config)
#   infer           infer.py, 4 images x 50 steps, fp16, with and without --attention_maps
#   tiny_bf16       the trainer end to end on CUDA (tiny model): bf16, validation grids, fp16 pipeline,
#                   then infer.py in fp16 with attention maps and --stage 2
#   tiny_fp16_low   fp16 autocast with the gradient scaler, low preset (checkpointing + 8-bit AdamW),
#                   channels_last
#   bench_compile   `fast+compile` (channels_last + torch.compile), default preset, stage 3
#   tiny_compile    the trainer with torch.compile and validation grids (sampled eagerly)
#   bench_sdxl      SDXL-base layout, 1024 px, batch 4, bf16, `fast`: LoRA with half-precision frozen weights,
#                   LoRA, low, default (full weights last: it may not fit; an out-of-memory ends the step)
#   tiny_sdxl       the trainer on the tiny SDXL model with LoRA stages, bf16 and half-precision frozen
#                   weights, validation grids, then infer.py with attention maps
#   speed_*         the MLPerf comparison (ONLY=speed_eager,...; about 10 minutes): SD 2.1-base, 512 px, batch 8,
#                   stage 3, in priority order: eager (`fast+cl`), `regional` cold then warm (a second process on
#                   the kept compile cache), `full` cold then warm, `cuda_graph`, `cuda_graph` + regional, all
#                   bf16; then fp16 with the gradient scaler for eager and regional (cuda_graph refuses fp16)
# (The SDXL part alone: ONLY=bench_sdxl,tiny_sdxl.) Each step gets at most its cap and the time left of
# BUDGET_S (default 440), logs to
# RESULTS/<step>.log and a line in RESULTS/summary.txt; a failing step does not stop the others.
# RESULTS/gpu_results.md gathers the tables; with $OUT set, RESULTS is packed to
# $OUT/gpu_results.tgz after every step.
# Packages missing there travel as wheels in .whl/ (see tools/download_wheels.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-gpu_out}
BUDGET_S=${BUDGET_S:-440}
RUNS=$(mktemp -d)
mkdir -p "$RESULTS"
: > "$RESULTS/summary.txt"
if [ -d .whl ] && ! python3 -c "import diffusers, omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  python3 -m compileall -q -j 0 /tmp/site > /dev/null  # bytecode, as a normal install has: imports are not timed
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
# DEVICE=cpu LAYOUT=small: the same steps on a CPU, to check the script before a GPU session (the CUDA-only
# rows then stop at once with their one line)
DEVICE=${DEVICE:-cuda}
LAYOUT=${LAYOUT:-sd21}
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/gpu.txt"
else
  echo "no nvidia-smi: $DEVICE" | tee "$RESULTS/gpu.txt"
fi
python3 -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" \
  | tee -a "$RESULTS/gpu.txt"
low_flags=""
python3 -c "import bitsandbytes" 2>/dev/null || low_flags="--no_8bit"  # low preset without 8-bit AdamW then
start=$SECONDS

step() {  # step NAME CAP_S COMMAND...: run with at most CAP_S and the time left, log, record the exit status
  local name=$1 left=$((BUDGET_S - (SECONDS - start))) t0=$SECONDS rc
  [ "$2" -lt "$left" ] && left=$2
  shift 2
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi  # ONLY=a,b runs those steps alone
  if [ "$left" -lt 30 ]; then
    echo "$name: skipped, budget spent" | tee -a "$RESULTS/summary.txt"
    return
  fi
  timeout "$left" "$@" > "$RESULTS/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo ', timed out')" | tee -a "$RESULTS/summary.txt"
  [ $rc = 0 ] || tail -n 25 "$RESULTS/$name.log"
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu_results.tgz" -C "$RESULTS" .; fi
}

bench="python3 scripts/benchmark.py --layout $LAYOUT --device $DEVICE --batch_size 8 --views 8 --repeats 1"
tiny="python3 train_attndreambooth.py --config configs/tiny.yaml stages.stage1.steps=20 stages.stage2.steps=20 \
  stages.stage3.steps=40"
cache="$RUNS/compile_cache"  # kept between the cold and the warm process of a mode
speed="$bench --stages stage3 --warmup 3 --steps 10 --count_ops --compile_cache $cache"
step speed_eager 60 $speed --precision bf16 --variants fast+cl --out "$RESULTS/speed_eager.json"
step speed_regional_cold 150 $speed --precision bf16 --variants fast+regional --out "$RESULTS/speed_regional_cold.json"
step speed_regional_warm 60 $speed --precision bf16 --variants fast+regional --out "$RESULTS/speed_regional_warm.json"
step speed_full_cold 240 $speed --precision bf16 --variants fast+compile --out "$RESULTS/speed_full_cold.json"
step speed_full_warm 90 $speed --precision bf16 --variants fast+compile --out "$RESULTS/speed_full_warm.json"
step speed_graph 90 $speed --precision bf16 --variants fast+graph --out "$RESULTS/speed_graph.json"
step speed_graph_regional 90 $speed --precision bf16 --variants fast+graph+regional --out "$RESULTS/speed_graph_regional.json"
step speed_fp16 120 $speed --precision fp16 --variants fast+cl,fast+regional --out "$RESULTS/speed_fp16.json"
step bench_bf16 200 $bench --precision bf16 --variants reference,fast,fast+cl --presets default,low $low_flags \
  --warmup 2 --steps 5 --out "$RESULTS/bench_bf16.json"
step bench_fp32_ref 90 $bench --precision fp32 --variants reference --warmup 1 --steps 3 \
  --out "$RESULTS/bench_fp32_ref.json"
step infer 100 python3 scripts/benchmark_infer.py --layout sd21 --device cuda --dtype fp16 --out "$RESULTS/infer.json"
step tiny_bf16 90 bash -c "$tiny output_dir=$RUNS/bf16 runtime.mixed_precision=bf16 validation.every_steps=20 \
  runtime.pipeline_dtype=fp16 && python3 infer.py $RUNS/bf16 --prompt 'a {} on the beach' --attention_maps \
  --num_images 2 && python3 infer.py $RUNS/bf16 --stage 2 --prompt 'a {} in the snow' --num_images 2 \
  --out $RUNS/bf16/samples_stage2 && cp $RUNS/bf16/validation/stage3_00040.png $RESULTS/tiny_validation.png \
  && cp $RUNS/bf16/samples/*/attention.png $RESULTS/tiny_attention.png"
step tiny_fp16_low 80 $tiny output_dir="$RUNS/fp16_low" runtime.mixed_precision=fp16 runtime.memory=low \
  runtime.optimizer_8bit="$([ -z "$low_flags" ] && echo true || echo false)" runtime.channels_last=true
step bench_compile 200 $bench --precision bf16 --variants fast+compile --presets default --stages stage3 \
  --warmup 2 --steps 5 --out "$RESULTS/bench_compile.json"  # stage 3 alone: one compilation fits the lease
step tiny_compile 150 $tiny output_dir="$RUNS/compile" runtime.mixed_precision=bf16 runtime.compile=regional \
  validation.every_steps=40
step bench_sdxl 240 python3 scripts/benchmark.py --layout sdxl --device cuda --batch_size 4 --views 4 --repeats 1 \
  --precision bf16 --variants fast --presets lora_half,lora,low,default $low_flags --warmup 2 --steps 3 \
  --out "$RESULTS/bench_sdxl.json"
step tiny_sdxl 90 bash -c "$tiny model.pretrained=tiny-sdxl output_dir=$RUNS/sdxl runtime.mixed_precision=bf16 \
  stages.stage2.lora_rank=8 stages.stage3.lora_rank=8 runtime.half_frozen_weights=true validation.every_steps=20 \
  && python3 infer.py $RUNS/sdxl --prompt 'a {} on the beach' --attention_maps --num_images 2"

{
  echo "# GPU check: $(head -n 2 "$RESULTS/gpu.txt" | tail -n 1)"
  echo
  echo '```'; cat "$RESULTS/gpu.txt" "$RESULTS/summary.txt"; echo '```'
  for t in speed_eager speed_regional_cold speed_regional_warm speed_full_cold speed_full_warm speed_graph \
      speed_graph_regional speed_fp16 bench_bf16 bench_fp32_ref bench_compile infer bench_sdxl; do
    [ -f "$RESULTS/$t.md" ] && { echo; echo "## $t"; echo; cat "$RESULTS/$t.md"; }
  done
} > "$RESULTS/gpu_results.md"
if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu_results.tgz" -C "$RESULTS" .; fi
cat "$RESULTS/gpu_results.md"
