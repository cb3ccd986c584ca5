"""``mipnerf360 video TRAIN_DIR SCENE_DIR OUT.mp4``: the scene's render path as an mp4.

    mipnerf360 video TRAIN_DIR SCENE_DIR OUT.mp4 [--frames N] [--fps F] [--width W]
                     [--device D] [--threads N]

The path is the Scene's ``render_poses`` (multinerf ``camera_utils.generate_ellipse_path``
for 360 scenes, ``generate_spiral_path`` for forward-facing ones, an orbit for Blender)
with its ``render_pixtocam`` intrinsics. Each frame is colour and colour-mapped depth side
by side; the mp4 is written through imageio-ffmpeg to a temporary name and moved into place.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from mipnerf360.errors import ConfigError, UserError
from mipnerf360.io import make_temp, to_uint8
from mipnerf360.render_views import DEPTH_KEY, colorize_depth, torch_threads
from mipnerf360.runs import load_trained, resolve_device


def scaled_pixtocam(pixtocam: np.ndarray, scale: float) -> np.ndarray:
    """[3,3] inverse intrinsics for an image resized by ``scale`` (pixels = scale * old).

    Old pixel coordinates are new / scale, so pixtocam' = pixtocam @ diag(1/s, 1/s, 1).
    Pixel centres: multinerf adds 0.5 to integer pixel indices before applying pixtocam,
    and (i + 0.5) / s is the matching continuous coordinate, so no extra offset is needed.
    """
    return np.asarray(pixtocam, np.float64) @ np.diag([1.0 / scale, 1.0 / scale, 1.0])


def render_path_frames(
    train_dir: str,
    scene_dir: str,
    frames: int | None = None,
    width: int | None = None,
    device: str = "auto",
):
    """Yield [H, 2W, 3] uint8 frames (colour | depth) along the render path."""
    from mipnerf360 import datasets
    from mipnerf360 import model as model_lib

    dev = resolve_device(device)
    model, cfg, saved = load_trained(train_dir, dev)
    if frames:
        cfg.data.render_path_frames = int(frames)
    scene = datasets.load_scene(scene_dir, cfg.data)
    poses = np.asarray(scene.render_poses, np.float64)
    if len(poses) == 0:
        raise UserError(f"{scene_dir}: the scene has no render path")
    pixtocam = np.asarray(scene.render_pixtocam, np.float64)
    w0, h0 = int(scene.width), int(scene.height)
    if width:
        w = int(width) - int(width) % 2
        scale = w / w0
        h = int(round(h0 * scale))
        pixtocam = scaled_pixtocam(pixtocam, scale)
    else:
        w, h = w0, h0
    h -= h % 2  # H.264 with yuv420p needs even sizes (cropping the last row is harmless)
    w -= w % 2
    train_frac = float(saved.get("train_frac", 1.0))
    for i, c2w in enumerate(poses):
        t0 = time.perf_counter()
        rays = datasets.pose_rays(scene, c2w, pixtocam, w, h)  # chunks move to the device
        with torch.no_grad():
            out = model_lib.render_image(model, rays, cfg.eval.chunk_size, train_frac=train_frac)
        rgb = np.clip(np.asarray(out["rgb"]), 0, 1)
        depth = colorize_depth(np.asarray(out[DEPTH_KEY]), np.asarray(out["acc"]))
        print(f"frame {i + 1}/{len(poses)} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        yield to_uint8(np.concatenate([rgb, depth], axis=1))


def write_video(frames, path: str, fps: float = 30.0) -> int:
    """Write uint8 frames to an mp4 (H.264) atomically; returns the number of frames."""
    import imageio.v2 as imageio

    tmp = make_temp(os.path.abspath(path))
    n = 0
    try:
        writer = imageio.get_writer(
            tmp,
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            quality=8,
            macro_block_size=1,
            pixelformat="yuv420p",
        )
        try:
            for frame in frames:
                writer.append_data(frame)
                n += 1
        finally:
            writer.close()
        if n == 0:
            raise UserError(f"{path}: no frames to write")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{path}: cannot write: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mipnerf360 video", description="Render the camera path to mp4 (colour | depth)."
    )
    p.add_argument("train_dir", help="training folder with model.pt")
    p.add_argument("scene_dir", help="scene folder")
    p.add_argument("out", help="output .mp4")
    p.add_argument(
        "--frames", type=int, default=None, help="frames (default data.render_path_frames)"
    )
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--width", type=int, default=None, help="frame width of each half (pixels)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (>= 1)")
    args = p.parse_args(argv)
    if args.frames is not None and args.frames < 1:
        raise ConfigError(f"--frames {args.frames}: must be >= 1")
    if args.width is not None and args.width < 2:
        raise ConfigError(f"--width {args.width}: must be >= 2")
    if not args.fps > 0:
        raise ConfigError(f"--fps {args.fps}: must be > 0")
    with torch_threads(args.threads):
        frames = render_path_frames(
            args.train_dir, args.scene_dir, args.frames, args.width, args.device
        )
        n = write_video(frames, args.out, args.fps)
    print(f"wrote {args.out} ({n} frames)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from mipnerf360 import cli

    sys.exit(cli.main(["video", *sys.argv[1:]]))
