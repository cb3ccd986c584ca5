#!/usr/bin/env bash
# Quality benchmark (a) of issue 4: a procedural 360-style scene (synthetic.generate, kind
# '360', its default 64 views of 128x96, every 8th view held out for testing), the 'cpu'
# preset, MINUTES (default 10) of training on this machine, then
# test-view PSNR / SSIM / LPIPS. Target: PSNR >= 28 dB within 10 minutes on 2 CPU cores.
#
#   benchmarks/quality_cpu.sh [OUT_DIR [key=value ...]]   (THREADS=1 when sharing the CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/common.sh
OUT=${1:-results/benchmarks/quality_cpu}
shift || true
MINUTES=${MINUTES:-10}
SCENE=${SCENE:-$OUT/scene}

if [ ! -d "$SCENE/sparse" ]; then
  python3 -c "from mipnerf360 import synthetic; synthetic.generate('$SCENE', kind='360', seed=0)"
fi

# The 'cpu' preset as it is (mipnerf360/configs.py: _preset_cpu holds its sizes and schedule);
# BATCH / WIDTH override its batch size / NeRF MLP width when set.
OVERRIDES=(--preset cpu)
if [ -n "${BATCH:-}" ]; then OVERRIDES+=("train.batch_size=$BATCH"); fi
if [ -n "${WIDTH:-}" ]; then OVERRIDES+=("model.nerf_mlp.net_width=$WIDTH"); fi
quality_run "$SCENE" "$OUT" "$((MINUTES * 60))" "${OVERRIDES[@]}" "$@"
