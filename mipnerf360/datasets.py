"""Scene loading (mip-NeRF 360 / COLMAP, LLFF, Blender) and ray batches.

Counterpart of multinerf ``internal/datasets.py`` (``LLFF`` and ``Blender`` loaders), as
described in /work/shared/reference/mipnerf360-spec.md §2 (poses, intrinsics, splits) and
§3 (rays); the code is our own. Differences from the reference, by design:

* every image keeps its own intrinsics and distortion (the reference uses camera 1 for all
  images); scenes with one shared camera load exactly as in the reference;
* missing ``images_{f}/`` folders are created from ``images/`` (area filter) and cached;
* one ``Scene`` holds all images with ``i_train`` / ``i_test`` index arrays (the reference
  builds one dataset object per split);
* Blender scenes get an orbit render path (the reference renders their test poses).

Rays for training are made by ``RaySampler`` on the training device in batch (torch);
``image_rays`` / ``pose_rays`` build full-image rays in numpy float64 like the reference
and return float32 torch tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from mipnerf360 import camera, colmap
from mipnerf360.configs import DataConfig
from mipnerf360.errors import UserError

__all__ = [
    "DatasetError",
    "IMAGE_EXTENSIONS",
    "RaySampler",
    "Scene",
    "downsample_image",
    "ensure_downsampled",
    "image_rays",
    "image_rays_np",
    "load_scene",
    "pose_rays",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
RAY_KEYS = ("origins", "directions", "viewdirs", "radii", "near", "far")


class DatasetError(UserError, ValueError):
    """A scene on disk is incomplete or inconsistent (the message names the file)."""


@dataclass
class Scene:
    """A loaded scene; all per-image arrays are indexed like ``names``.

    Shapes: N images of H x W pixels. Poses are camera-to-world in the normalised world
    (OpenGL axes); ``pixtocams`` are float32 like the reference's, per image and already
    scaled by the downsampling factor.
    """

    name: str
    dataset_type: str
    path: str
    images: np.ndarray  # float32 [N,H,W,3] in [0,1]
    names: list[str]  # [N]; sorted for colmap/llff, json order (train then test) for blender
    camtoworlds: np.ndarray  # float64 [N,3,4]
    pixtocams: np.ndarray  # float32 [N,3,3]
    distortion: np.ndarray | None  # float64 [N,6] (camera.DISTORTION_KEYS) or None
    camtype: str  # 'perspective' or 'fisheye'
    width: int
    height: int
    near: float
    far: float
    forward_facing: bool
    pixtocam_ndc: np.ndarray | None  # float32 [3,3] (forward-facing) or None
    i_train: np.ndarray  # int64 [N_train]
    i_test: np.ndarray  # int64 [N_test]
    colmap_to_world_transform: np.ndarray  # float64 [4,4]: world = T @ data coordinates
    render_poses: np.ndarray  # float64 [F,3,4]
    render_pixtocam: np.ndarray  # float64 [3,3]
    bounds: np.ndarray | None = None  # float64 [N,2] near/far per image in world units (LLFF)
    extras: dict = field(default_factory=dict)

    @property
    def focals(self) -> np.ndarray:
        """Per-image focal length in pixels (x), [N]."""
        # float32 reciprocal of the float32 pixtocam, as the reference's ``focal``
        return (np.float32(1) / self.pixtocams[:, 0, 0]).astype(np.float64)

    @property
    def focal(self) -> float:
        """Focal length of the render path (median of the images')."""
        return float(np.median(self.focals))


# ---------------------------------------------------------------------------
# Images


def _list_images(folder: Path) -> list[str]:
    return sorted(
        f
        for f in os.listdir(folder)
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
    )


def _read_image_u8(path: Path) -> np.ndarray:
    """uint8 [H,W,C] (C = 3 or 4) from an 8-bit image file."""
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    try:
        with PILImage.open(path) as im:
            if im.mode not in ("RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.mode else "RGB")
            arr = np.asarray(im)
    except (OSError, SyntaxError) as e:  # PIL raises these for unreadable/corrupt files
        raise DatasetError(f"{path}: cannot read image ({e})") from e
    return arr


def _to_float(u8: np.ndarray) -> np.ndarray:
    # As the reference: x / 255. in float64, stored as float32.
    return (u8 / 255.0).astype(np.float32)


def _downsampled_size(width: int, height: int, factor: int) -> tuple[int, int]:
    # ImageMagick `-resize 25%` rounds to the nearest pixel.
    return max(1, int(width / factor + 0.5)), max(1, int(height / factor + 0.5))


def downsample_image(u8: np.ndarray, factor: int) -> np.ndarray:
    """Area-filter uint8 [H,W,C] by ``factor``.

    Divisible sizes: the exact mean of each ``factor x factor`` block, rounded half up
    (PIL ``Image.reduce``); otherwise PIL's box resize to the rounded size.
    """
    h, w = u8.shape[:2]
    nw, nh = _downsampled_size(w, h, factor)
    out = []
    # One 'L' image per channel: PIL would weight RGBA colours by alpha.
    for c in range(u8.shape[-1]):
        im = PILImage.fromarray(np.ascontiguousarray(u8[..., c]), "L")
        if h % factor == 0 and w % factor == 0:
            out.append(np.asarray(im.reduce(factor)))
        else:
            out.append(np.asarray(im.resize((nw, nh), PILImage.Resampling.BOX)))
    return np.stack(out, -1)


def ensure_downsampled(scene_dir: Path, factor: int) -> Path:
    """``scene_dir/images_{factor}``, created from ``images/`` when missing.

    Built in a temporary folder next to it and renamed into place, so concurrent or
    interrupted runs never leave a half-written folder. Output files are PNG (lossless)
    with the source file's stem, which keeps the sorted order of ``images/``.
    """
    target = scene_dir / f"images_{factor}"
    if target.is_dir():
        return target
    source = scene_dir / "images"
    if not source.is_dir():
        raise DatasetError(f"{target}: missing, and {source} to create it from does not exist")
    files = _list_images(source)
    if not files:
        raise DatasetError(f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    stems = [os.path.splitext(f)[0] for f in files]
    if len(set(stems)) != len(stems):
        raise DatasetError(
            f"{source}: image names differ only by extension; cannot create {target}"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".images_{factor}.tmp", dir=scene_dir))
    try:
        for f, stem in zip(files, stems, strict=True):
            small = downsample_image(_read_image_u8(source / f), factor)
            PILImage.fromarray(small).save(tmp / f"{stem}.png")
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # someone else won the race otherwise
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_image_stack(paths: list[Path], what: str) -> np.ndarray:
    """uint8 [N,H,W,C] (C = 3, or 4 when any image has alpha; missing alpha = 255)."""
    rgbs, shape0 = [], None
    for p in paths:
        u8 = _read_image_u8(p)
        if shape0 is None:
            shape0 = (u8.shape[:2], paths[0])
        elif u8.shape[:2] != shape0[0]:
            raise DatasetError(
                f"{p}: image size {u8.shape[1]}x{u8.shape[0]} differs from "
                f"{shape0[0][1]}x{shape0[0][0]} of {shape0[1]} ({what} images must share one size)"
            )
        rgbs.append(u8)
    if any(u.shape[-1] == 4 for u in rgbs):
        opaque = np.full(shape0[0] + (1,), 255, np.uint8)
        rgbs = [u if u.shape[-1] == 4 else np.concatenate([u, opaque], -1) for u in rgbs]
    return np.stack(rgbs)


def _rgb_float(u8: np.ndarray) -> np.ndarray:
    """float32 [N,H,W,3] from uint8 [N,H,W,C] (alpha dropped), one image at a time."""
    out = np.empty(u8.shape[:3] + (3,), np.float32)
    for i in range(len(u8)):
        out[i] = _to_float(u8[i, ..., :3])
    return out


# ---------------------------------------------------------------------------
# COLMAP cameras


def _colmap_intrinsics(cam: colmap.Camera, where: Path):
    """(K [3,3], distortion [6] or None, camtype) of one COLMAP camera (spec §2.1)."""
    p = np.asarray(cam.params, np.float64)
    dist = np.zeros(len(camera.DISTORTION_KEYS))
    ki = {k: i for i, k in enumerate(camera.DISTORTION_KEYS)}
    m = cam.model
    if m in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        fx = fy = p[0]
        cx, cy = p[1], p[2]
    elif m in ("PINHOLE", "OPENCV", "OPENCV_FISHEYE"):
        fx, fy, cx, cy = p[:4]
    else:
        raise DatasetError(
            f"{where}: camera {cam.id} uses COLMAP model {m}, which the loader does not support "
            "(supported: SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV, OPENCV_FISHEYE)"
        )
    camtype = "perspective"
    if m in ("SIMPLE_PINHOLE", "PINHOLE"):
        d = None
    elif m == "SIMPLE_RADIAL":
        dist[ki["k1"]] = p[3]
        d = dist
    elif m == "RADIAL":
        dist[ki["k1"]], dist[ki["k2"]] = p[3], p[4]
        d = dist
    elif m == "OPENCV":
        dist[ki["k1"]], dist[ki["k2"]], dist[ki["p1"]], dist[ki["p2"]] = p[4:8]
        d = dist
    else:  # OPENCV_FISHEYE: k1..k4, fisheye projection (as the reference)
        dist[:4] = p[4:8]
        d = dist
        camtype = "fisheye"
    return camera.intrinsic_matrix(fx, fy, cx, cy), d, camtype


def _pixtocam_from_K(K: np.ndarray, factor: int) -> np.ndarray:
    # Reference: inv(K) @ diag(factor, factor, 1), stored as float32.
    f = max(int(factor), 1)
    return (np.linalg.inv(K) @ np.diag([f, f, 1.0])).astype(np.float32)


def _combine_intrinsics(per_image, where: Path):
    """Stack per-image (K, dist, camtype) -> (Ks [N,3,3], dist [N,6] | None, camtype)."""
    Ks = np.stack([k for k, _, _ in per_image])
    types = {t for _, _, t in per_image}
    if len(types) > 1:
        raise DatasetError(f"{where}: mixes fisheye and perspective cameras (unsupported)")
    if all(d is None for _, d, _ in per_image):
        dist = None
    else:
        dist = np.stack([np.zeros(6) if d is None else d for _, d, _ in per_image])
    return Ks, dist, types.pop()


def _read_colmap_model(model_dir: Path):
    if not model_dir.is_dir():
        raise DatasetError(f"{model_dir}: COLMAP model folder not found")
    try:
        return colmap.read_model(model_dir)
    except FileNotFoundError as e:
        raise DatasetError(str(e)) from e


def _colmap_poses(images: dict) -> tuple[list[str], np.ndarray, list[int]]:
    """Names, OpenGL camera-to-world [N,3,4] and camera ids in the model's image order."""
    names, w2c, cam_ids = [], [], []
    for im in images.values():
        m = np.eye(4)
        m[:3, :3] = colmap.qvec2rotmat(im.qvec)
        m[:3, 3] = im.tvec
        w2c.append(m)
        names.append(im.name)
        cam_ids.append(im.camera_id)
    c2w = np.linalg.inv(np.stack(w2c))[:, :3, :4]
    poses = c2w @ np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV -> OpenGL
    return names, poses, cam_ids


# ---------------------------------------------------------------------------
# Loaders


def _image_dir(scene_dir: Path, factor: int) -> Path:
    if factor > 1:
        return ensure_downsampled(scene_dir, factor)
    d = scene_dir / "images"
    if not d.is_dir():
        raise DatasetError(f"{d}: image folder not found")
    return d


def _resolve_image_paths(scene_dir: Path, names: list[str], factor: int, listed_in: Path):
    """Paths of the images to load for COLMAP names (sorted), as the reference maps them.

    The reference pairs the sorted listings of images/ and images_{f}/ by position.
    """
    full_dir = scene_dir / "images"
    if full_dir.is_dir():
        for n in names:
            if not (full_dir / n).is_file():
                raise DatasetError(
                    f"{full_dir / n}: image listed in {listed_in} is missing from {full_dir}"
                )
    image_dir = _image_dir(scene_dir, factor)
    if image_dir == full_dir:
        return [full_dir / n for n in names]
    if full_dir.is_dir():
        full_files = _list_images(full_dir)
        small_files = _list_images(image_dir)
        if len(full_files) != len(small_files):
            raise DatasetError(
                f"{image_dir}: has {len(small_files)} images but {full_dir} has "
                f"{len(full_files)}; they are matched by sorted position, so counts must agree"
            )
        mapping = dict(zip(full_files, small_files, strict=True))
        return [image_dir / mapping[n] for n in names]
    for n in names:
        if not (image_dir / n).is_file():
            raise DatasetError(f"{image_dir / n}: image listed in {listed_in} is missing")
    return [image_dir / n for n in names]


def _check_size(images: np.ndarray, Ks: np.ndarray, factor: int, first: Path, where: Path):
    h, w = images.shape[1:3]
    f = max(factor, 1)
    # Principal points near the centre: the camera size must agree with the images.
    cw, ch = 2 * Ks[:, 0, 2] / f, 2 * Ks[:, 1, 2] / f
    if np.any(np.abs(cw - w) > 0.25 * w) or np.any(np.abs(ch - h) > 0.25 * h):
        raise DatasetError(
            f"{first}: images are {w}x{h} but the cameras in {where} imply about "
            f"{np.median(cw):.0f}x{np.median(ch):.0f} at factor {f}"
        )


def _load_bounds(scene_dir: Path, n: int | None) -> np.ndarray | None:
    path = scene_dir / "poses_bounds.npy"
    if not path.is_file():
        return None
    try:
        arr = np.load(path)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e
    if arr.ndim != 2 or arr.shape[1] != 17:
        raise DatasetError(f"{path}: expected shape [N,17], got {list(arr.shape)}")
    if n is not None and arr.shape[0] != n:
        raise DatasetError(f"{path}: has {arr.shape[0]} rows but the scene has {n} images")
    return arr.astype(np.float64)


def _finish_llff_like(
    scene_dir, cfg, dataset_type, names, poses, images, pixtocams, dist, camtype, bounds
) -> Scene:
    """Normalise poses, build render path and split (spec §2.4-2.6)."""
    n = len(names)
    transform = np.eye(4)
    pixtocam_ndc = None
    bounds_world = None
    if cfg.forward_facing:
        if bounds is None:
            raise DatasetError(
                f"{scene_dir / 'poses_bounds.npy'}: forward-facing scenes need near/far bounds"
            )
        pixtocam_ndc = pixtocams[0]
        scale = 1.0 / (bounds.min() * 0.75)
        poses = poses.copy()
        poses[:, :3, 3] *= scale
        transform = np.diag([scale] * 3 + [1.0])
        bounds = bounds * scale
        poses, recenter = camera.recenter_poses(poses)
        transform = recenter @ transform
        render_poses = camera.generate_spiral_path(poses, bounds, n_frames=cfg.render_path_frames)
        bounds_world = bounds if bounds.shape[0] == n else None
    else:
        poses, transform = camera.transform_poses_pca(poses)
        render_poses = camera.generate_ellipse_path(
            poses,
            n_frames=cfg.render_path_frames,
            z_variation=cfg.z_variation,
            z_phase=cfg.z_phase,
        )
    all_indices = np.arange(n)
    hold = max(int(cfg.llffhold), 1)
    h, w = images.shape[1:3]
    focal = float(np.median(np.float32(1) / pixtocams[:, 0, 0]))
    return Scene(
        name=scene_dir.name,
        dataset_type=dataset_type,
        path=str(scene_dir),
        images=images,
        names=list(names),
        camtoworlds=poses,
        pixtocams=pixtocams,
        distortion=dist,
        camtype=camtype,
        width=w,
        height=h,
        near=float(cfg.near),
        far=float(cfg.far),
        forward_facing=bool(cfg.forward_facing),
        pixtocam_ndc=pixtocam_ndc,
        i_train=all_indices[all_indices % hold != 0],
        i_test=all_indices[all_indices % hold == 0],
        colmap_to_world_transform=transform,
        render_poses=render_poses,
        render_pixtocam=camera.get_pixtocam(focal, w, h),
        bounds=bounds_world,
    )


def _load_colmap(scene_dir: Path, cfg: DataConfig) -> Scene:
    model_dir = scene_dir / "sparse" / "0"
    cameras, ims, _ = _read_colmap_model(model_dir)
    if not ims:
        raise DatasetError(f"{model_dir}: the COLMAP model has no registered images")
    images_file = model_dir / (
        "images.bin" if (model_dir / "images.bin").is_file() else "images.txt"
    )
    cams_file = images_file.with_name("cameras" + images_file.suffix)
    names, poses, cam_ids = _colmap_poses(ims)
    order = np.argsort(names)  # load_alphabetical
    names = [names[i] for i in order]
    poses = poses[order]
    cam_ids = [cam_ids[i] for i in order]
    per_image = []
    for nm, cid in zip(names, cam_ids, strict=True):
        if cid not in cameras:
            raise DatasetError(
                f"{images_file}: image {nm} refers to camera {cid}, not in {cams_file}"
            )
        per_image.append(_colmap_intrinsics(cameras[cid], cams_file))
    Ks, dist, camtype = _combine_intrinsics(per_image, cams_file)
    factor = max(int(cfg.factor), 1)
    paths = _resolve_image_paths(scene_dir, names, factor, images_file)
    images = _rgb_float(_load_image_stack(paths, "scene"))
    _check_size(images, Ks, factor, paths[0], cams_file)
    pixtocams = np.stack([_pixtocam_from_K(K, factor) for K in Ks])
    arr = _load_bounds(scene_dir, None)
    bounds = None if arr is None else arr[:, -2:]
    if bounds is None and cfg.forward_facing:
        bounds = np.array([0.01, 1.0])  # reference default without poses_bounds.npy
    return _finish_llff_like(
        scene_dir, cfg, "colmap", names, poses, images, pixtocams, dist, camtype, bounds
    )


def _load_llff(scene_dir: Path, cfg: DataConfig) -> Scene:
    """LLFF layout: poses_bounds.npy rows = images in sorted name order."""
    factor = max(int(cfg.factor), 1)
    full_dir = scene_dir / "images"
    if full_dir.is_dir():
        names = _list_images(full_dir)
    else:
        names = _list_images(_image_dir(scene_dir, factor))
    pb_path = scene_dir / "poses_bounds.npy"
    if not pb_path.is_file():
        raise DatasetError(f"{pb_path}: not found (needed for dataset_type 'llff')")
    arr = _load_bounds(scene_dir, len(names))
    poses_llff = arr[:, :15].reshape(-1, 3, 5)
    bounds = arr[:, 15:17]
    hwf = poses_llff[:, :, 4]
    # LLFF stores camera axes [down, right, back]; OpenGL is [right, up, back].
    poses = np.concatenate(
        [poses_llff[:, :, 1:2], -poses_llff[:, :, 0:1], poses_llff[:, :, 2:4]], axis=-1
    )
    image_dir = _image_dir(scene_dir, factor)
    small = _list_images(image_dir)
    if len(small) != len(names):
        raise DatasetError(f"{image_dir}: has {len(small)} images, {full_dir} has {len(names)}")
    paths = [image_dir / s for s in small]
    images = _rgb_float(_load_image_stack(paths, "scene"))

    per_image = None
    model_dir = scene_dir / "sparse" / "0"
    if model_dir.is_dir():
        # A COLMAP model next to poses_bounds.npy: take its per-image intrinsics.
        cameras, ims, _ = _read_colmap_model(model_dir)
        by_name = {im.name: im for im in ims.values()}
        if all(n in by_name for n in names):
            per_image = [
                _colmap_intrinsics(cameras[by_name[n].camera_id], model_dir) for n in names
            ]
    if per_image is None:
        # As LLFF: intrinsics from hwf (principal point at the image centre).
        per_image = [
            (camera.intrinsic_matrix(f, f, w_ * 0.5, h_ * 0.5), None, "perspective")
            for h_, w_, f in hwf
        ]
    Ks, dist, camtype = _combine_intrinsics(per_image, pb_path)
    _check_size(images, Ks, factor, paths[0], pb_path)
    pixtocams = np.stack([_pixtocam_from_K(K, factor) for K in Ks])
    return _finish_llff_like(
        scene_dir, cfg, "llff", names, poses, images, pixtocams, dist, camtype, bounds
    )


def _load_blender(scene_dir: Path, cfg: DataConfig) -> Scene:
    """Blender synthetic layout (spec §2.7): transforms_{train,test}.json + RGBA PNGs."""
    factor = max(int(cfg.factor), 1)
    all_images, all_poses, names, split_idx, focals = [], [], [], {}, []
    shape = None
    for split in ("train", "test"):
        jpath = scene_dir / f"transforms_{split}.json"
        if not jpath.is_file():
            raise DatasetError(f"{jpath}: not found")
        try:
            meta = json.loads(jpath.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{jpath}: invalid JSON ({e})") from e
        frames = meta.get("frames") if isinstance(meta, dict) else None
        if not frames:
            raise DatasetError(f"{jpath}: no 'frames' (the file lists no images)")
        if "camera_angle_x" not in meta:
            raise DatasetError(f"{jpath}: missing 'camera_angle_x'")
        paths = []
        for k, fr in enumerate(frames):
            if "file_path" not in fr or "transform_matrix" not in fr:
                raise DatasetError(f"{jpath}: frame {k} lacks 'file_path' or 'transform_matrix'")
            p = scene_dir / fr["file_path"]
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                p = p.with_name(p.name + ".png")
            paths.append(p)
            all_poses.append(np.asarray(fr["transform_matrix"], np.float64)[:3, :4])
            names.append(os.path.normpath(fr["file_path"]))
        u8 = _load_image_stack(paths, f"{split}-split")
        if shape is not None and u8.shape[1:3] != shape:
            raise DatasetError(
                f"{paths[0]}: {split} images are {u8.shape[2]}x{u8.shape[1]}, other split "
                f"{shape[1]}x{shape[0]}"
            )
        shape = u8.shape[1:3]
        img = u8 / 255.0  # float64, as the reference
        if img.shape[-1] == 4:
            bg = 1.0 if cfg.white_background else 0.0
            img = img[..., :3] * img[..., 3:] + bg * (1.0 - img[..., 3:])
        if factor > 1:
            n_, h, w = img.shape[:3]
            if h % factor or w % factor:
                raise DatasetError(f"{paths[0]}: size {w}x{h} is not divisible by factor {factor}")
            img = img.reshape(n_, h // factor, factor, w // factor, factor, 3).mean(axis=(2, 4))
        start = len(all_images)
        all_images.extend(img.astype(np.float32))
        split_idx[split] = np.arange(start, len(all_images))
        w_small = img.shape[2]
        focals.append(0.5 * w_small / np.tan(0.5 * float(meta["camera_angle_x"])))
    images = np.stack(all_images)
    h, w = images.shape[1:3]
    pixtocams = np.stack(
        [
            camera.get_pixtocam(focals[0 if i in split_idx["train"] else 1], w, h)
            for i in range(len(images))
        ]
    ).astype(np.float32)
    poses = np.stack(all_poses)
    return Scene(
        name=scene_dir.name,
        dataset_type="blender",
        path=str(scene_dir),
        images=images,
        names=names,
        camtoworlds=poses,
        pixtocams=pixtocams,
        distortion=None,
        camtype="perspective",
        width=w,
        height=h,
        near=float(cfg.near),
        far=float(cfg.far),
        forward_facing=False,
        pixtocam_ndc=None,
        i_train=split_idx["train"],
        i_test=split_idx["test"],
        colmap_to_world_transform=np.eye(4),
        render_poses=camera.generate_orbit_path(poses, n_frames=cfg.render_path_frames),
        render_pixtocam=camera.get_pixtocam(focals[1], w, h),
    )


def load_scene(path, data_cfg: DataConfig) -> Scene:
    """Load the scene in folder ``path`` as ``data_cfg.dataset_type`` describes."""
    scene_dir = Path(path)
    if not scene_dir.is_dir():
        raise DatasetError(f"{scene_dir}: scene folder not found")
    kind = data_cfg.dataset_type
    if kind == "colmap":
        return _load_colmap(scene_dir, data_cfg)
    if kind == "llff":
        return _load_llff(scene_dir, data_cfg)
    if kind == "blender":
        return _load_blender(scene_dir, data_cfg)
    raise DatasetError(f"{scene_dir}: unknown dataset_type {kind!r} (colmap, llff or blender)")


# ---------------------------------------------------------------------------
# Rays


def image_rays_np(scene: Scene, index: int) -> dict[str, np.ndarray]:
    """float64 numpy rays [H,W,k] of image ``index`` (as the reference's ray batches)."""
    x, y = camera.pixel_coordinates(scene.width, scene.height)
    dist = None
    if scene.distortion is not None:
        dist = dict(zip(camera.DISTORTION_KEYS, scene.distortion[index], strict=True))
    o, d, v, r, _ = camera.pixels_to_rays(
        x,
        y,
        scene.pixtocams[index].astype(np.float64),
        scene.camtoworlds[index],
        dist,
        scene.pixtocam_ndc,  # float32 like the reference (its 1/pixtocam[0,2] is float32)
        scene.camtype,
    )
    ones = np.ones_like(r)
    return {
        "origins": o,
        "directions": d,
        "viewdirs": v,
        "radii": r,
        "near": ones * scene.near,
        "far": ones * scene.far,
    }


def image_rays(scene: Scene, index: int) -> dict[str, torch.Tensor]:
    """Rays and colours of image ``index`` (full sorted list): float32 torch [H,W,k] (CPU)."""
    rays = image_rays_np(scene, int(index))
    out = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in rays.items()}
    out["rgb"] = torch.from_numpy(np.ascontiguousarray(scene.images[int(index)]))
    return out


def pose_rays(scene: Scene, camtoworld, pixtocam, width: int, height: int):
    """Rays [H,W,k] (float32 torch, CPU) of an ideal pinhole camera, e.g. a render-path frame."""
    x, y = camera.pixel_coordinates(int(width), int(height))
    o, d, v, r, _ = camera.pixels_to_rays(
        x,
        y,
        np.asarray(pixtocam, np.float64),
        np.asarray(camtoworld, np.float64)[:3, :4],
        None,
        scene.pixtocam_ndc,
        "perspective",
    )
    ones = np.ones_like(r)
    rays = {"origins": o, "directions": d, "viewdirs": v, "radii": r}
    rays["near"], rays["far"] = ones * scene.near, ones * scene.far
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in rays.items()}


class RaySampler:
    """Random training rays drawn on ``device``.

    batching='all_images': every ray picks a training image and a pixel uniformly;
    'single_image': one training image per batch (pixels uniform within it). Images,
    poses and intrinsics live on the device; rays are computed there in one batched call.
    Deterministic for a seed; ``get_state``/``set_state`` resume the exact sequence.
    """

    def __init__(self, scene: Scene, batch_size: int, device, seed: int = 0, batching="all_images"):
        if batching not in ("all_images", "single_image"):
            raise ValueError(f"batching must be 'all_images' or 'single_image', got {batching!r}")
        if len(scene.i_train) == 0:
            raise DatasetError(f"{scene.path}: the scene has no training images")
        self.scene = scene
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.batching = batching
        idx = np.asarray(scene.i_train)
        dev = self.device
        self.images = torch.from_numpy(np.ascontiguousarray(scene.images[idx])).to(dev)
        self.camtoworlds = torch.as_tensor(scene.camtoworlds[idx], dtype=torch.float32).to(dev)
        self.pixtocams = torch.as_tensor(scene.pixtocams[idx], dtype=torch.float32).to(dev)
        self.distortion = None
        if scene.distortion is not None:
            self.distortion = torch.as_tensor(scene.distortion[idx], dtype=torch.float32).to(dev)
        self.pixtocam_ndc = None
        if scene.pixtocam_ndc is not None:
            self.pixtocam_ndc = torch.as_tensor(scene.pixtocam_ndc, dtype=torch.float32).to(dev)
        self.generator = torch.Generator(device=dev)
        self.generator.manual_seed(int(seed))
        self.num_sampled = 0

    def get_state(self) -> dict:
        return {"generator": self.generator.get_state(), "num_sampled": self.num_sampled}

    def set_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())
        self.num_sampled = int(state["num_sampled"])

    def rays_for(self, cam, pix_x, pix_y) -> dict[str, torch.Tensor]:
        """Rays [B,k] for training-image indices ``cam`` (into i_train) and pixels."""
        dist = None if self.distortion is None else self.distortion[cam]
        o, d, v, r, _ = camera.pixels_to_rays(
            pix_x,
            pix_y,
            self.pixtocams[cam],
            self.camtoworlds[cam],
            dist,
            self.pixtocam_ndc,
            self.scene.camtype,
            xnp=torch,
        )
        ones = torch.ones_like(r)
        return {
            "origins": o.contiguous(),
            "directions": d,
            "viewdirs": v,
            "radii": r,
            "near": ones * self.scene.near,
            "far": ones * self.scene.far,
            "rgb": self.images[cam, pix_y, pix_x],
        }

    def sample(self) -> dict[str, torch.Tensor]:
        n, b, g, dev = self.images.shape[0], self.batch_size, self.generator, self.device
        if self.batching == "all_images":
            cam = torch.randint(0, n, (b,), generator=g, device=dev)
        else:
            cam = torch.randint(0, n, (1,), generator=g, device=dev).expand(b)
        pix_x = torch.randint(0, self.scene.width, (b,), generator=g, device=dev)
        pix_y = torch.randint(0, self.scene.height, (b,), generator=g, device=dev)
        self.num_sampled += 1
        return self.rays_for(cam, pix_x, pix_y)
