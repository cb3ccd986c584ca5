#!/usr/bin/env bash
# Training-step throughput on the CPU (issue 12's CPU target), printed as a table and written
# to OUT_DIR/table.md: the small 360-style model of the issue (PropMLP 2x64, NerfMLP 4x128,
# 32/32/16 samples, batch 1024) in fp32 and bf16, eager and compiled, on all cores; eager on
# one core; the 360 preset (batch 256) eager on all cores. Each row is one
# `mipnerf360 bench` run (OUT_DIR/<row>.out); compile times are those of an empty inductor
# cache (OUT_DIR/inductor-cache is emptied first).
#
#   benchmarks/cpu.sh [OUT_DIR]      (default results/benchmarks/cpu; about 15 min on 2 cores)
#
# Environment: STEPS (timed steps, default 10), WARMUP (default 2), THREADS (default: nproc).
# Run it on an otherwise idle machine: wall-clock rates are what it measures.
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in -h | --help) sed -n '2,13p' "$0"; exit 0 ;; esac
OUT=${1:-results/benchmarks/cpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export TORCHINDUCTOR_CACHE_DIR=$OUT/inductor-cache
rm -rf "$TORCHINDUCTOR_CACHE_DIR"
PY=${PYTHON:-python3}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
THREADS=${THREADS:-$(nproc)}
SMALL=(--preset 360 --batch-size 1024 model.prop_mlp.net_depth=2 model.prop_mlp.net_width=64
  model.nerf_mlp.net_depth=4 model.nerf_mlp.net_width=128 model.num_prop_samples=32
  model.num_nerf_samples=16)

run() {  # run NAME THREADS [bench args]: one row
  local name=$1 threads=$2
  shift 2
  echo "[$name] $threads threads: $*"
  "$PY" -m mipnerf360 bench --device cpu --threads "$threads" --steps "$STEPS" \
    --warmup "$WARMUP" "$@" >"$OUT/$name.out" 2>&1
  tail -n 1 "$OUT/$name.out"
}

: >"$OUT/rows.txt"
row() { echo "$1" >>"$OUT/rows.txt"; run "$@"; }
row small_fp32_eager "$THREADS" "${SMALL[@]}" --precision fp32 --compile off --flops
row small_fp32_compiled "$THREADS" "${SMALL[@]}" --precision fp32 --compile on
row small_bf16_eager "$THREADS" "${SMALL[@]}" --precision bf16 --compile off
row small_bf16_compiled "$THREADS" "${SMALL[@]}" --precision bf16 --compile on
row small_fp32_eager_1t 1 "${SMALL[@]}" --precision fp32 --compile off
row small_bf16_eager_1t 1 "${SMALL[@]}" --precision bf16 --compile off
row 360_fp32_eager "$THREADS" --preset 360 --batch-size 256 --precision fp32 --compile off

"$PY" benchmarks/cpu_table.py "$OUT" | tee "$OUT/table.md"
echo "table written to $OUT/table.md (total ${SECONDS} s)"
