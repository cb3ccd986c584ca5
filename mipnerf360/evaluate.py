"""``mipnerf360 evaluate``: the metrics of a folder of rendered test views.

    mipnerf360 evaluate RENDER_DIR OUT_DIR [--config CONFIG.yaml]
                        [--lpips-nets alex,vgg | --no-lpips] [--cc] [eval.key=value ...]

The scoring half of multinerf's ``eval.py``: every metric of ``metrics.select(...)``
(``metrics.METRICS`` defines them) on each view of a ``mipnerf360 render`` folder, the
render quantised to 8 bit (``eval.quantize_metrics``) against the float ground truth,
``eval.crop_borders`` pixels cropped; with ``--cc`` also the metrics of the
colour-corrected render (multinerf's ``metric_cc_*``). Scene score = mean of the per-image
metrics (multinerf ``scripts/generate_tables.ipynb``).

Writes OUT_DIR/metrics.json (per-scene means, settings, per-image rows) and
OUT_DIR/metrics.csv (one row per image).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from mipnerf360 import configs, io
from mipnerf360.errors import ConfigError, UserError

LPIPS_MIN_SIZE = 32  # AlexNet's two max-pools before relu5 need >= 31 pixels per side


# ----------------------------------------------------------------------------- settings


def parse_eval_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """``['eval.chunk_size=4096', ...]`` -> ``{'eval': {...}}``; any key outside ``eval.``
    is a ConfigError naming it (render and evaluate take evaluation settings only)."""
    parsed = configs.parse_overrides(list(overrides))
    other = sorted(k for k in parsed if k != "eval")
    if other:
        bad = next(o for o in overrides if o.split("=", 1)[0].split(".")[0] == other[0])
        raise ConfigError(
            f"{bad.split('=', 1)[0]}: only eval.* settings can be changed here "
            "(data, model and train settings belong to the training run)"
        )
    if "eval" in parsed and not isinstance(parsed["eval"], dict):
        raise ConfigError("eval: give eval.<key>=value, not eval=value")
    return parsed


def apply_eval_overrides(
    cfg: configs.Config, overrides: list[str] | tuple[str, ...] | dict = ()
) -> configs.Config:
    """``cfg`` with ``eval.key=value`` overrides applied and validated (in place)."""
    parsed = overrides if isinstance(overrides, dict) else parse_eval_overrides(overrides)
    configs.update(cfg, parsed)
    return configs.validate(cfg)


def parse_lpips_nets(text: str) -> list[str]:
    """'alex,vgg' -> ['alex', 'vgg'], each one of configs.LPIPS_NETS (ConfigError else)."""
    nets = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in nets if n not in configs.LPIPS_NETS]
    if bad or not nets:
        raise ConfigError(
            f"--lpips-nets {text!r}: unknown LPIPS net(s) {bad}; "
            f"use a comma-separated subset of {','.join(configs.LPIPS_NETS)}"
        )
    return nets


# ----------------------------------------------------------------------------- reading


def read_png(path: str) -> np.ndarray:
    """PNG -> float32 [H,W,3] in [0,1]; a missing or unreadable file is a UserError."""
    import imageio.v3 as iio

    try:
        img = iio.imread(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except Exception as e:
        raise UserError(f"{path}: cannot read image: {e}") from None
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return img[..., :3].astype(np.float32) / 255.0


def read_npy(path: str) -> np.ndarray:
    """.npy -> array; a missing or unreadable file is a UserError."""
    try:
        return np.load(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except Exception as e:
        raise UserError(f"{path}: cannot read array: {e}") from None


def read_names(render_dir: str) -> list[str]:
    """The view names of a render folder (its renders.json)."""
    path = os.path.join(render_dir, "renders.json")
    if not os.path.exists(path):
        raise UserError(f"{path}: not found; run `mipnerf360 render` first")
    info = io.read_json(path)
    names = info.get("names") if isinstance(info, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"{path}: not a renders.json (expected 'names': a list of view names)")
    if not names:
        raise UserError(f"{path}: no views were rendered")
    return names


# ----------------------------------------------------------------------------- evaluate


def evaluate_renders(
    render_dir: str,
    out_dir: str,
    *,
    lpips: bool = True,
    lpips_nets: list[str] | tuple[str, ...] = configs.LPIPS_NETS,
    quantize: bool = True,
    crop_borders: int = 0,
    color_correct: bool = False,
) -> dict:
    """Per-image and per-scene metrics of a render folder; writes metrics.json / .csv.

    metrics.json holds every metric of ``metrics.METRICS`` (None where not computed),
    ``num_images``, the settings used and ``images`` (one row per view).
    """
    from mipnerf360 import metrics

    names = read_names(render_dir)
    nets = list(lpips_nets) if lpips else []
    selected = metrics.select(nets, color_correct)
    cc_inputs = set()  # "float" / "8-bit png": what colour correction started from
    images = []
    for name in names:
        png = os.path.join(render_dir, "color", f"{name}.png")
        npy = os.path.join(render_dir, "color", f"{name}.npy")
        gt_path = os.path.join(render_dir, "gt", f"{name}.npy")
        # The float render when there is one and the protocol reads floats (no
        # quantisation, or multinerf's colour correction of the float render).
        use_float = (not quantize or color_correct) and os.path.exists(npy)
        pred = read_npy(npy).astype(np.float32) if use_float else read_png(png)
        if color_correct:
            cc_inputs.add("float" if use_float else "8-bit png")
        gt = read_npy(gt_path).astype(np.float32)
        if pred.shape != gt.shape:
            raise UserError(
                f"{npy if use_float else png}: render is {pred.shape[1]}x{pred.shape[0]} "
                f"(shape {pred.shape}) but the ground truth {gt_path} is "
                f"{gt.shape[1]}x{gt.shape[0]} (shape {gt.shape})"
            )
        if nets and min(gt.shape[:2]) - 2 * crop_borders < LPIPS_MIN_SIZE:
            raise UserError(
                f"{gt_path}: {name} is {gt.shape[1]}x{gt.shape[0]} pixels (after cropping "
                f"{crop_borders}); LPIPS (AlexNet / VGG features) needs at least "
                f"{LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE}: switch it off with --no-lpips or "
                "eval.lpips=false"
            )
        m = metrics.compute_metrics(
            pred,
            gt,
            quantize=quantize,
            lpips_nets=nets,
            crop_borders=crop_borders,
            color_correct=color_correct,
        )
        row = {"name": name, **{k: m.get(k) for k in metrics.METRICS}}
        images.append(row)
        print(
            f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()),
            file=sys.stderr,
        )

    result: dict = {"num_images": len(images)}
    for key in metrics.METRICS:
        vals = [r[key] for r in images]
        result[key] = float(np.mean(vals)) if all(v is not None for v in vals) else None
    result.update(
        {
            "metrics": [m.name for m in selected],
            "lpips": "on" if nets else "off",
            "lpips_nets": nets,
            "quantized": quantize,
            "crop_borders": crop_borders,
            "color_correct": color_correct,
            "color_correct_input": " + ".join(sorted(cc_inputs)) or None,
            "render_dir": os.path.abspath(render_dir),
            "images": images,
        }
    )
    io.write_json(os.path.join(out_dir, "metrics.json"), result)
    io.write_csv(os.path.join(out_dir, "metrics.csv"), images)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mipnerf360 evaluate",
        description="The metrics of rendered views (PSNR / SSIM / LPIPS; colour-corrected "
        "PSNR / SSIM with --cc).",
    )
    p.add_argument("render_dir", help="folder written by `mipnerf360 render`")
    p.add_argument("out_dir", help="output folder for metrics.json / metrics.csv")
    p.add_argument("--config", default=None, help="the training config.yaml (eval settings)")
    p.add_argument("--no-lpips", action="store_true", help="switch LPIPS off")
    p.add_argument(
        "--lpips-nets",
        default=None,
        help=f"comma-separated LPIPS nets (default eval.lpips_nets: "
        f"{','.join(configs.LPIPS_NETS)})",
    )
    p.add_argument(
        "--cc",
        action="store_true",
        help="also colour-corrected PSNR / SSIM (cc_psnr, cc_ssim; multinerf's metric_cc_*)",
    )
    p.add_argument("overrides", nargs="*", help="eval.key=value settings")
    args = p.parse_intermixed_args(argv)
    if args.no_lpips and args.lpips_nets:
        raise ConfigError("--no-lpips and --lpips-nets contradict each other; give one")
    nets = parse_lpips_nets(args.lpips_nets) if args.lpips_nets is not None else None
    eval_updates = parse_eval_overrides(args.overrides)
    cfg = configs.load_config(args.config) if args.config else configs.Config()
    cfg = apply_eval_overrides(cfg, eval_updates)
    result = evaluate_renders(
        args.render_dir,
        args.out_dir,
        # An explicit --lpips-nets switches LPIPS on whatever the config says.
        lpips=not args.no_lpips and (nets is not None or cfg.eval.lpips),
        lpips_nets=nets if nets is not None else cfg.eval.lpips_nets,
        quantize=cfg.eval.quantize_metrics,
        crop_borders=cfg.eval.crop_borders,
        color_correct=args.cc or cfg.eval.color_correct,
    )
    summary = {k: v for k, v in result.items() if k != "images"}
    print(json.dumps(summary, indent=2))
    return 0
