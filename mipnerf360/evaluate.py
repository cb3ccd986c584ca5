"""``mipnerf360 render`` and ``mipnerf360 evaluate``: test-view renders and their metrics.

Counterpart of multinerf's ``eval.py`` (reference spec, section 11): views rendered
deterministically in chunks of ``eval.chunk_size`` rays with ``train_frac = step /
max_steps``; metrics on renders quantised to 8 bit against the 8-bit ground truth / 255,
scene score = mean of the per-image metrics.

render OUT_DIR layout::

    color/<name>.png   8-bit render (color/<name>.npy float too when eval.quantize_metrics
                       is false, so unquantised metrics stay possible)
    gt/<name>.png      8-bit ground truth;  gt/<name>.npy  float ground truth [H,W,3]
    depth/<name>.npy   raw ``distance_median`` (metric distance along the ray, t units)
    depth/<name>.png   colour-mapped inverse depth (turbo), weighted by accumulation
    acc/<name>.png     accumulated opacity (8-bit grey)
    renders.json       names, split, step, per-image and total timing
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np
import torch

from mipnerf360 import configs
from mipnerf360.io import write_bytes as atomic_write_bytes
from mipnerf360.io import write_csv, write_json
from mipnerf360.runs import load_trained, resolve_device

DEPTH_KEY = "distance_median"
LPIPS_MIN_SIZE = 32  # AlexNet's two max-pools before relu5 need >= 31 pixels per side


# ----------------------------------------------------------------------------- images


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[H,W,(C)] float in [0,1] -> uint8 with round(x * 255) (the metric quantisation)."""
    return np.clip(np.round(np.asarray(img, np.float64) * 255.0), 0, 255).astype(np.uint8)


def write_png(path: str, img: np.ndarray) -> None:
    """Atomic PNG write of a uint8 [H,W] or [H,W,3] array (float arrays go through to_uint8)."""
    import imageio.v3 as iio

    arr = img if img.dtype == np.uint8 else to_uint8(img)
    atomic_write_bytes(path, iio.imwrite("<bytes>", arr, extension=".png"))


def write_npy(path: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


def read_png(path: str) -> np.ndarray:
    """PNG -> float32 [H,W,3] in [0,1]."""
    import imageio.v3 as iio

    try:
        img = iio.imread(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot read image: {e}") from None
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return img[..., :3].astype(np.float32) / 255.0


def read_npy(path: str) -> np.ndarray:
    try:
        return np.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"array not found: {path}") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot read array: {e}") from None


def colorize_depth(
    depth: np.ndarray, acc: np.ndarray | None = None, lo: float = 1.0, hi: float = 99.0
) -> np.ndarray:
    """[H,W] distance -> [H,W,3] float turbo colour map of the inverse distance.

    Bounds are the lo/hi percentiles of the inverse distance (over pixels with acc > 0.5
    when ``acc`` is given); pixels are blended to white by ``1 - acc``.
    """
    from matplotlib import colormaps

    inv = 1.0 / np.maximum(np.asarray(depth, np.float64), 1e-6)
    valid = inv[acc > 0.5] if acc is not None and np.any(acc > 0.5) else inv.ravel()
    vmin, vmax = np.percentile(valid, [lo, hi]) if valid.size else (0.0, 1.0)
    x = np.clip((inv - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    rgb = colormaps["turbo"](x)[..., :3]
    if acc is not None:
        a = np.clip(acc, 0.0, 1.0)[..., None]
        rgb = rgb * a + (1.0 - a)
    return rgb.astype(np.float32)


# ----------------------------------------------------------------------------- render


def _numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def render_views(
    train_dir: str,
    scene_dir: str,
    out_dir: str,
    split: str = "test",
    device: str = "auto",
) -> dict:
    """Render the ``split`` views of ``scene_dir`` with the model in ``train_dir``."""
    from mipnerf360 import datasets
    from mipnerf360 import model as model_lib

    dev = resolve_device(device)
    model, cfg, saved = load_trained(train_dir, dev)
    scene = datasets.load_scene(scene_dir, cfg.data)
    indices = [int(i) for i in (scene.i_test if split == "test" else scene.i_train)]
    if cfg.eval.max_test_images > 0:
        indices = indices[: cfg.eval.max_test_images]
    if not indices:
        raise ValueError(f"{scene_dir}: the {split} split is empty")
    train_frac = float(saved.get("train_frac", 1.0))
    for sub in ("color", "gt", "depth", "acc"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)

    names, timings = [], []
    t_all = time.perf_counter()
    for idx in indices:
        name = os.path.splitext(os.path.basename(str(scene.names[idx])))[0]
        rays = datasets.image_rays(scene, idx)  # render_image moves chunks to the device
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model_lib.render_image(model, rays, cfg.eval.chunk_size, train_frac=train_frac)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        timings.append(time.perf_counter() - t0)
        rgb = np.clip(_numpy(out["rgb"]), 0.0, 1.0)
        acc = _numpy(out["acc"])
        depth = _numpy(out[DEPTH_KEY])
        gt = _numpy(scene.images[idx]).astype(np.float32)[..., :3]
        write_png(os.path.join(out_dir, "color", f"{name}.png"), rgb)
        if not cfg.eval.quantize_metrics:
            write_npy(os.path.join(out_dir, "color", f"{name}.npy"), rgb.astype(np.float32))
        write_png(os.path.join(out_dir, "gt", f"{name}.png"), gt)
        write_npy(os.path.join(out_dir, "gt", f"{name}.npy"), gt)
        write_npy(os.path.join(out_dir, "depth", f"{name}.npy"), depth.astype(np.float32))
        write_png(os.path.join(out_dir, "depth", f"{name}.png"), colorize_depth(depth, acc))
        write_png(os.path.join(out_dir, "acc", f"{name}.png"), acc)
        names.append(name)
        print(f"rendered {name} ({timings[-1]:.1f} s)", file=sys.stderr)
    info = {
        "names": names,
        "split": split,
        "scene_dir": os.path.abspath(scene_dir),
        "train_dir": os.path.abspath(train_dir),
        "step": saved.get("step"),
        "train_frac": train_frac,
        "width": int(scene.width),
        "height": int(scene.height),
        "depth": f"{DEPTH_KEY} (raw distance along the ray, t units)",
        "device": str(dev),
        "seconds_per_image": timings,
        "mean_seconds_per_image": float(np.mean(timings)),
        "total_seconds": time.perf_counter() - t_all,
    }
    write_json(os.path.join(out_dir, "renders.json"), info)
    return info


def render_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mipnerf360 render", description="Render the test views of a trained model."
    )
    p.add_argument("train_dir", help="training folder with model.pt")
    p.add_argument("scene_dir", help="scene folder")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = p.parse_args(argv)
    render_views(args.train_dir, args.scene_dir, args.out_dir, args.split, args.device)
    return 0


# ----------------------------------------------------------------------------- evaluate


def evaluate_renders(
    render_dir: str,
    out_dir: str,
    *,
    lpips: bool = True,
    lpips_nets: list[str] | tuple[str, ...] = ("alex", "vgg"),
    quantize: bool = True,
    crop_borders: int = 0,
) -> dict:
    """Per-image and per-scene metrics of a render folder; writes metrics.json / .csv."""
    from mipnerf360 import metrics

    info_path = os.path.join(render_dir, "renders.json")
    try:
        with open(info_path) as f:
            names = json.load(f)["names"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{info_path} not found: run `mipnerf360 render` first") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{info_path}: not a renders.json (expected 'names'): {e}") from None
    nets = list(lpips_nets) if lpips else []
    images = []
    for name in names:
        npy = os.path.join(render_dir, "color", f"{name}.npy")
        if not quantize and os.path.exists(npy):
            pred = read_npy(npy).astype(np.float32)
        else:
            pred = read_png(os.path.join(render_dir, "color", f"{name}.png"))
        gt = read_npy(os.path.join(render_dir, "gt", f"{name}.npy")).astype(np.float32)
        if pred.shape != gt.shape:
            raise ValueError(
                f"{render_dir}: {name}: render {pred.shape} vs ground truth {gt.shape}"
            )
        if nets and min(gt.shape[:2]) < LPIPS_MIN_SIZE:
            raise ValueError(
                f"{render_dir}: {name} is {gt.shape[1]}x{gt.shape[0]} pixels; LPIPS (AlexNet / "
                f"VGG features) needs at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE}: switch it off "
                "with --no-lpips or eval.lpips=false"
            )
        m = metrics.compute_metrics(
            pred,
            gt,
            quantize=quantize,
            lpips_nets=nets,
            crop_borders=crop_borders,
        )
        row = {"name": name}
        for k in ("psnr", "ssim", "lpips_alex", "lpips_vgg"):
            v = m.get(k)
            row[k] = None if v is None else float(v)
        images.append(row)
        print(
            f"{name}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "name" and v is not None),
            file=sys.stderr,
        )

    def mean(key):
        vals = [r[key] for r in images if r[key] is not None]
        return float(np.mean(vals)) if vals and len(vals) == len(images) else None

    result = {
        "num_images": len(images),
        "psnr": mean("psnr"),
        "ssim": mean("ssim"),
        "lpips_alex": mean("lpips_alex"),
        "lpips_vgg": mean("lpips_vgg"),
        "lpips": "on" if nets else "off",
        "lpips_nets": nets,
        "quantized": quantize,
        "crop_borders": crop_borders,
        "render_dir": os.path.abspath(render_dir),
        "images": images,
    }
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "metrics.json"), result)
    write_csv(os.path.join(out_dir, "metrics.csv"), images)
    return result


def evaluate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mipnerf360 evaluate", description="PSNR / SSIM / LPIPS of rendered views."
    )
    p.add_argument("render_dir", help="folder written by `mipnerf360 render`")
    p.add_argument("out_dir", help="output folder for metrics.json / metrics.csv")
    p.add_argument("--no-lpips", action="store_true", help="switch LPIPS off")
    p.add_argument("--lpips-nets", default=None, help="comma-separated: alex,vgg")
    p.add_argument("--config", default=None, help="the training config.yaml (eval settings)")
    args = p.parse_args(argv)
    try:
        cfg = configs.load_config(args.config) if args.config else configs.Config()
    except configs.ConfigError as e:
        print(f"mipnerf360 evaluate: config error: {e}", file=sys.stderr)
        return 2
    nets = cfg.eval.lpips_nets
    if args.lpips_nets:
        nets = [n.strip() for n in args.lpips_nets.split(",") if n.strip()]
        bad = sorted(set(nets) - {"alex", "vgg"})
        if bad:
            print(
                f"mipnerf360 evaluate: unknown LPIPS net(s) {bad}; use alex, vgg", file=sys.stderr
            )
            return 2
    result = evaluate_renders(
        args.render_dir,
        args.out_dir,
        lpips=cfg.eval.lpips and not args.no_lpips,
        lpips_nets=nets,
        quantize=cfg.eval.quantize_metrics,
        crop_borders=cfg.eval.crop_borders,
    )
    summary = {k: v for k, v in result.items() if k != "images"}
    print(json.dumps(summary, indent=2))
    return 0
