# Shared steps of the quality benchmarks (sourced by quality_cpu.sh and quality_bird.sh).
#
# quality_run SCENE_DIR OUT_DIR SECONDS [key=value ...]
#   1. calibrate: a 40-step run measures steps/s for this config on this machine;
#   2. train for SECONDS of wall time with train.max_steps (90 % of the calibrated rate, the
#      rate drops when the CPU is shared) sized so the learning-rate schedule
#      (and the proposal annealing) finish at about that time, train.time_limit_s as a guard;
#   3. render the test views and evaluate them (PSNR, SSIM, LPIPS alex+vgg, 8-bit protocol);
#   4. print one summary line and write OUT_DIR/result.json.
# Environment: THREADS (torch CPU threads, default: all cores), DEVICE (default cpu).

set -euo pipefail

if [ -z "${TORCH_HOME:-}" ] && [ -d "$(dirname "${BASH_SOURCE[0]}")/../../shared/torch-home" ]; then
  export TORCH_HOME="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../shared/torch-home" && pwd)"
fi

quality_run() {
  local scene=$1 out=$2 seconds=$3
  shift 3
  local threads=${THREADS:-$(nproc)} device=${DEVICE:-cpu}
  export OMP_NUM_THREADS=$threads
  mkdir -p "$out"
  echo "== calibrate ($threads threads, $device)"
  rm -rf "$out/calibrate"
  python3 -m mipnerf360 train "$scene" "$out/calibrate" --no-progress --device "$device" \
    --threads "$threads" "$@" train.max_steps=40 train.log_every=20 train.checkpoint_every=1000 \
    >/dev/null
  local sps
  sps=$(python3 -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1]))); print(r[-1]['steps_per_s'])" \
    "$out/calibrate/metrics.csv")
  local steps
  steps=$(python3 -c "import sys; print(max(100, int(0.9 * float(sys.argv[1]) * float(sys.argv[2]))))" \
    "$seconds" "$sps")
  echo "   $sps steps/s -> train.max_steps=$steps for ${seconds} s"
  rm -rf "$out/calibrate" "$out/train"
  echo "== train"
  python3 -m mipnerf360 train "$scene" "$out/train" --no-progress --device "$device" \
    --threads "$threads" "$@" "train.max_steps=$steps" "train.time_limit_s=$seconds" \
    >"$out/train.log"
  echo "== render"
  rm -rf "$out/renders"
  python3 -m mipnerf360 render "$out/train" "$scene" "$out/renders" --device "$device" \
    2>"$out/render.log"
  echo "== evaluate"
  python3 -m mipnerf360 evaluate "$out/renders" "$out/metrics" \
    --config "$out/train/config.yaml" 2>"$out/evaluate.log" >/dev/null
  python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
m = json.load(open(os.path.join(out, "metrics", "metrics.json")))
s = json.load(open(os.path.join(out, "train", "summary.json")))
r = {k: m[k] for k in ("num_images", "psnr", "ssim", "lpips_alex", "lpips_vgg")}
r.update({k: s[k] for k in ("steps", "wall_time_s", "steps_per_s", "rays_per_s", "num_params",
                            "batch_size", "final_train_psnr", "stop_reason")})
tmp = os.path.join(out, ".result.json.tmp")
with open(tmp, "w") as f:
    json.dump(r, f, indent=2)
os.replace(tmp, os.path.join(out, "result.json"))
print(f"RESULT test PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, LPIPS alex "
      f"{r['lpips_alex']}, vgg {r['lpips_vgg']} ({r['num_images']} test views); "
      f"{r['steps']} steps x {r['batch_size']} rays in {r['wall_time_s']:.0f} s, "
      f"{r['num_params']} params")
PY
}
