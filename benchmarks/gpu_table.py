"""The table of benchmarks/gpu.sh from the files its sections left in OUT_DIR.

    python benchmarks/gpu_table.py OUT_DIR [--train-seconds 180]

Reads OUT_DIR/<section>.out (one `mipnerf360 bench` line each), bird_train/summary.json,
bird_metrics/metrics.json and profile.out; prints Markdown. A section that failed or timed
out shows as such instead of a number.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mipnerf360.bench import read_result

# Dense peak TFLOP/s per precision (NVIDIA data sheets; tensor cores for tf32/bf16, the
# CUDA cores for fp32; the sheets' "with sparsity" figures are twice these). H200 has the
# H100 SXM's compute.
PEAK_TFLOPS = {
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "H100": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}
SECTIONS = [
    ("eager_fp32", "fp32", "off"),
    ("eager_tf32", "tf32", "off"),
    ("eager_bf16", "bf16", "off"),
    ("compiled_fp32", "fp32", "on"),
    ("compiled_tf32", "tf32", "on"),
    ("compiled_bf16", "bf16", "on"),
]


def peak_for(device: str) -> dict | None:
    for name, peaks in PEAK_TFLOPS.items():  # the more specific names come first
        if name in device:
            return peaks
    return None


def load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--train-seconds", type=float, default=180)
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    env = (out / "env.out").read_text().strip() if (out / "env.out").exists() else ""
    lines = ["# benchmarks/gpu.sh", "", "```", env, "```", ""]
    rows = {name: read_result(out / f"{name}.out") for name, _, _ in SECTIONS}
    mflop = next(
        (float(r["mflop"]) for r in rows.values() if isinstance(r, dict) and r["mflop"]), None
    )
    lines += [
        "| mode | compile | rays/s | ms/step | peak memory (MB) | % of dense peak |",
        "|---|---|---|---|---|---|",
    ]
    best = None
    for name, prec, comp in SECTIONS:
        r = rows[name]
        if not isinstance(r, dict):
            lines.append(f"| {prec} | {comp} | {r} | | | |")
            continue
        rays = float(r["rays"])
        peaks = peak_for(r["device"])
        frac = "n/a"
        if peaks and mflop:
            frac = f"{100 * mflop * 1e6 * rays / (peaks[prec] * 1e12):.2f} %"
        lines.append(f"| {prec} | {comp} | {rays:,.0f} | {r['ms']} | {r['mem']} | {frac} |")
        if best is None or rays > best[0]:
            best = (rays, int(r["batch"]), f"{prec}, compile {comp}")
    lines.append("")
    if mflop:
        lines.append(f"Matmul FLOPs per ray (forward + backward, FlopCounterMode): {mflop:.1f} M")
    if best:
        hours = 250_000 * best[1] / best[0] / 3600
        lines.append(
            f"Fastest mode: {best[2]}, {best[0]:,.0f} rays/s -> a 250k-step scene at batch "
            f"{best[1]} in {hours:.1f} h"
        )
    summary = load_json(out / "bird_train" / "summary.json")
    metrics = load_json(out / "bird_metrics" / "metrics.json")
    lines.append("")
    if summary:
        sps = summary.get("steps_per_s") or 0
        hours = 250_000 / sps / 3600 if sps else float("nan")
        lines.append(
            f"Bird (360 preset, {args.train_seconds:.0f} s of training): "
            f"{summary.get('steps')} steps at batch {summary.get('batch_size')}, "
            f"{summary.get('rays_per_s', 0):,.0f} rays/s (compilation included) -> "
            f"projected {hours:.1f} h for 250k steps"
        )
    else:
        lines.append("Bird training: failed or not run (see train.out)")
    if metrics and "psnr" in metrics:
        n = metrics.get("num_images", "?")
        lines.append(f"Bird test PSNR: {metrics['psnr']:.2f} dB ({n} test views)")
    else:
        lines.append("Bird test PSNR: not available (see render.out / evaluate.out)")
    prof = out / "profile.out"
    if prof.exists():
        text = prof.read_text()
        table = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("bench ")]
        lines += ["", "Top-10 kernels (torch.profiler, fastest mode):", "```", *table[-16:], "```"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
