"""``mipnerf360 render``: render the test views of a trained model.

    mipnerf360 render TRAIN_DIR SCENE_DIR OUT_DIR [--split test|train] [--device D]
                      [--threads N] [eval.key=value ...]

The rendering half of multinerf's ``eval.py``: each view is rendered deterministically
(``rng=None``) in chunks of ``eval.chunk_size`` rays with the model's ``train_frac``, and
written with its ground truth so that ``mipnerf360 evaluate`` can score it without the
model. (``render.py`` is the volume-rendering maths; this module is the command.)

OUT_DIR layout::

    color/<name>.png   8-bit render (color/<name>.npy float too when eval.quantize_metrics
                       is false or eval.color_correct is true: unquantised metrics and
                       multinerf's colour correction of the float render stay possible)
    gt/<name>.png      8-bit ground truth;  gt/<name>.npy  float ground truth [H,W,3]
    depth/<name>.npy   raw ``distance_median`` (metric distance along the ray, t units)
    depth/<name>.png   colour-mapped inverse depth (turbo), weighted by accumulation
    acc/<name>.png     accumulated opacity (8-bit grey)
    renders.json       names, split, step, per-image and total timing; written last
    .lock              held by the rendering process (one writer per folder)

A render of a folder that held an older render removes that render's ``renders.json``
first (so a half-finished re-render is never taken for a finished one) and, at the end,
the views that are not part of the new render.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch

from mipnerf360 import io
from mipnerf360.errors import ConfigError, UserError
from mipnerf360.runs import load_trained, resolve_device, run_lock

DEPTH_KEY = "distance_median"
SUBDIRS = ("color", "gt", "depth", "acc")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` torch CPU threads inside the block (None: leave torch's default)."""
    if n is None:
        yield
        return
    if n < 1:
        raise ConfigError(f"--threads {n}: must be >= 1")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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


def _remove_stale(out_dir: str, names: list[str]) -> None:
    """Delete views of an earlier render that are not among ``names``."""
    keep = set(names)
    for sub in SUBDIRS:
        folder = os.path.join(out_dir, sub)
        if not os.path.isdir(folder):
            continue
        for fname in os.listdir(folder):
            if os.path.splitext(fname)[0] not in keep:
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(os.path.join(folder, fname))


def render_views(
    train_dir: str,
    scene_dir: str,
    out_dir: str,
    split: str = "test",
    device: str = "auto",
    overrides: list[str] | tuple[str, ...] = (),
) -> dict:
    """Render the ``split`` views of ``scene_dir`` with the model in ``train_dir``.

    ``overrides``: ``eval.key=value`` settings applied on top of the model's config
    (anything else is a ConfigError). Holds ``out_dir``'s run lock while it works.
    Returns the renders.json dict.
    """
    from mipnerf360 import datasets
    from mipnerf360 import model as model_lib
    from mipnerf360.evaluate import apply_eval_overrides, parse_eval_overrides

    # Bad settings, devices and models fail before the output folder is touched.
    eval_updates = parse_eval_overrides(overrides)
    dev = resolve_device(device)
    model, cfg, saved = load_trained(train_dir, dev)
    cfg = apply_eval_overrides(cfg, eval_updates)
    with run_lock(out_dir, "render"):
        scene = datasets.load_scene(scene_dir, cfg.data)
        indices = [int(i) for i in (scene.i_test if split == "test" else scene.i_train)]
        if cfg.eval.max_test_images > 0:
            indices = indices[: cfg.eval.max_test_images]
        if not indices:
            raise UserError(f"{scene_dir}: the {split} split is empty")
        train_frac = float(saved.get("train_frac", 1.0))
        save_float = not cfg.eval.quantize_metrics or cfg.eval.color_correct
        info_path = os.path.join(out_dir, "renders.json")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(info_path)  # an older render: not complete until this one finishes
        for sub in SUBDIRS:
            io.remove_temporaries(os.path.join(out_dir, sub))

        names, timings = [], []
        t_all = time.perf_counter()
        for idx in indices:
            name = os.path.splitext(os.path.basename(str(scene.names[idx])))[0]
            rays = datasets.image_rays(scene, idx)  # render_image moves chunks to the device
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model_lib.render_image(
                    model, rays, cfg.eval.chunk_size, train_frac=train_frac
                )
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            timings.append(time.perf_counter() - t0)
            rgb = np.clip(np.asarray(out["rgb"], np.float32), 0.0, 1.0)
            acc = np.asarray(out["acc"], np.float32)
            depth = np.asarray(out[DEPTH_KEY], np.float32)
            gt = np.asarray(scene.images[idx], np.float32)[..., :3]

            def path(sub, ext, name=name):
                return os.path.join(out_dir, sub, f"{name}.{ext}")

            io.write_png(path("color", "png"), rgb)
            if save_float:
                io.write_npy(path("color", "npy"), rgb)
            io.write_png(path("gt", "png"), gt)
            io.write_npy(path("gt", "npy"), gt)
            io.write_npy(path("depth", "npy"), depth)
            io.write_png(path("depth", "png"), colorize_depth(depth, acc))
            io.write_png(path("acc", "png"), acc)
            names.append(name)
            print(f"rendered {name} ({timings[-1]:.1f} s)", file=sys.stderr)
        _remove_stale(out_dir, names)
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
            "float_color": bool(save_float),
            "device": str(dev),
            "seconds_per_image": timings,
            "mean_seconds_per_image": float(np.mean(timings)),
            "total_seconds": time.perf_counter() - t_all,
        }
        io.write_json(info_path, info)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mipnerf360 render", description="Render the test views of a trained model."
    )
    p.add_argument("train_dir", help="training folder with model.pt")
    p.add_argument("scene_dir", help="scene folder")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (>= 1)")
    p.add_argument("overrides", nargs="*", help="eval.key=value settings (e.g. eval.chunk_size)")
    args = p.parse_intermixed_args(argv)
    with torch_threads(args.threads):
        render_views(
            args.train_dir, args.scene_dir, args.out_dir, args.split, args.device, args.overrides
        )
    return 0


if __name__ == "__main__":
    from mipnerf360 import cli

    sys.exit(cli.main(["render", *sys.argv[1:]]))
