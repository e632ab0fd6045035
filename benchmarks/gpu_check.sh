#!/usr/bin/env bash
# The GPU check in one call: measure every configuration on this machine's GPU (bench.py speed,
# default and --low-memory), predict the same on its CPU (bench.py memory), and write both side
# by side (OUTPUT_DIR/gpu-check.md). About 8 minutes on an H100-class GPU for the UNet models;
# CONFIGS=wan-480-33,wan-480-81 measures Wan instead (in a call of its own: it takes longer);
# CONFIGS=wan22-5b-704-49,wan22-5b-704-121 Wan2.2 TI2V-5B (one 24 GB card is the goal), and
# CONFIGS=wan22a14b-480-33 Wan2.2 A14B on one card (the high-noise expert visits from CPU memory;
# 60 GB of host RAM for the two experts), and CONFIGS=wan-480-33-vr,wan-480-81-vr,modelscope-256-vr the
# VideoReward step (Qwen2-VL-2B at real size, random weights; the goals are a 16 and a 24 GB card).
# SHARD_GPUS=N (a machine with N >= 2 GPUs) also measures Wan2.1 14B under --shard on N processes
# (speed-wan14b-*-shardN.json, every rank's peak) beside bench.py memory's per-process prediction
# for N (memory-wan14b-*-ranks.json).
#     bash benchmarks/gpu_check.sh [OUTPUT_DIR]
# On a machine without diffusers or open_clip and without a network, put their wheels (and
# those they need) in .whl/ first: pip download -d .whl diffusers open_clip_torch
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-check}
configs=${CONFIGS:-modelscope-256,modelscope-384,modelscope-256-k5,zeroscope-576,animatediff-512}
mkdir -p "$out"
python -c "import diffusers, open_clip" 2>/dev/null ||
  python -m pip install --quiet --no-index --find-links .whl diffusers open_clip_torch
# The predictions run on the CPU while the GPU measures; 6 DDIM steps are enough for the peak
# (it does not depend on the no-grad steps) and let K = 5 keep its meaning.
(python bench.py memory --config "$configs" --num-steps 6 --output-dir "$out" > "$out/memory.log" 2>&1 &&
 python bench.py memory --config "$configs" --num-steps 6 --low-memory --output-dir "$out" >> "$out/memory.log" 2>&1) &
predict=$!
python bench.py speed --config "$configs" --repeats 1 --output-dir "$out"
python bench.py speed --config "$configs" --repeats 1 --low-memory --output-dir "$out"
wait "$predict" || { cat "$out/memory.log"; exit 1; }
python bench.py compare --output-dir "$out"
if [ "${SHARD_GPUS:-0}" -gt 1 ]; then
  torchrun --standalone --nproc_per_node="$SHARD_GPUS" bench.py speed --config wan14b-480-33,wan14b-480-81 --shard \
    --repeats 1 --output-dir "$out"
  python bench.py memory --config wan14b-480-33,wan14b-480-81 --num-steps 6 --ranks "$SHARD_GPUS" \
    --output-dir "$out" >> "$out/memory.log" 2>&1
  grep -h '"step_peak_gb_per_rank"' -A "$SHARD_GPUS" "$out"/speed-wan14b-*-shard*.json
  tail -n 30 "$out/memory.log"
fi
