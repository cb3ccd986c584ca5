"""Scene loading (mip-NeRF 360 / COLMAP, LLFF, Blender), image reading, full-image rays.

Counterpart of multinerf ``internal/datasets.py`` (``LLFF`` and ``Blender`` loaders) and
``internal/image.py`` (``downsample``); the code is our own. Differences from the reference,
by design:

* every image keeps its own intrinsics and distortion (the reference uses camera 1 for all
  images); scenes with one shared camera load exactly as in the reference;
* a missing ``images_{f}/`` is made from ``images/`` (area filter) in a cache folder of
  ours, never in the scene folder (see ``ensure_downsampled``);
* 16-bit PNGs load scaled to [0, 1] (the reference divides every image by 255);
* one ``Scene`` holds all images with ``i_train`` / ``i_test`` index arrays (the reference
  builds one dataset object per split);
* Blender scenes get an orbit render path (the reference renders their test poses).

Each data set type is one entry of ``LOADERS`` (precheck, load, whether it reads
pre-downsampled ``images_{f}/``); ``load_scene``, ``mipnerf360 prepare`` and the workflow's
config schema (``DATASET_TYPES``) all read that table, so a new type is one change here.

``image_rays`` / ``pose_rays`` build full-image rays in numpy float64 like the reference
and return float32 torch tensors. ``scene_fingerprint`` hashes what a loader loaded.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from mipnerf360 import camera, colmap, io
from mipnerf360.configs import DataConfig
from mipnerf360.errors import UserError

__all__ = [
    "DATASET_TYPES",
    "DatasetError",
    "IMAGE_EXTENSIONS",
    "LOADERS",
    "Loader",
    "Scene",
    "cache_root",
    "downsample_folder",
    "downsample_image",
    "ensure_downsampled",
    "image_rays",
    "image_rays_np",
    "load_scene",
    "pose_rays",
    "precheck",
    "read_image",
    "scene_fingerprint",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
EXIF_ORIENTATION = 0x0112  # EXIF tag: 1 = stored upright; 2-8 = viewer should flip/rotate
CACHE_ENV = "MIPNERF360_CACHE"  # root of our cache folder (default ~/.cache/mipnerf360)
STAMP_FILE = ".mipnerf360-source.json"  # in a downsampled folder: what it was made from


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


# Pillow modes of 16-bit single-channel images (PNG bit depth 16, grayscale)
_MODES_16BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def read_image(path: str | os.PathLike, rotated: list | None = None) -> np.ndarray:
    """The pixels of an image file in their stored (raw) order.

    Returns uint8 [H,W,3|4] for 8-bit files (grayscale replicated to RGB, palette and
    grayscale+alpha expanded) or uint16 [H,W,1] for 16-bit grayscale PNGs. 16-bit colour
    PNGs come as uint8: Pillow's decoder keeps their high byte (error < 1/255 after
    scaling). The EXIF orientation tag is not applied -- COLMAP and the reference read the
    raw pixel order too -- but ``(path, tag)`` is appended to ``rotated`` when it asks for a
    rotation, so the caller can warn.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    try:
        with PILImage.open(path) as im:
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            if im.mode in _MODES_16BIT:
                arr = np.asarray(im)
                if arr.dtype != np.uint16:  # mode 'I' (int32) holding 16-bit values
                    arr = np.clip(arr, 0, 65535).astype(np.uint16)
                arr = arr[..., None]
            elif im.mode in ("RGB", "RGBA"):
                arr = np.asarray(im)
            else:
                alpha = "A" in im.mode or "transparency" in im.info
                arr = np.asarray(im.convert("RGBA" if alpha else "RGB"))
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as e:
        # Pillow raises these for unreadable, truncated or corrupt files
        raise DatasetError(f"{path}: cannot read image ({e})") from None
    if rotated is not None and orientation not in (1, None):
        rotated.append((path, orientation))
    return arr


def _warn_rotated(rotated: list) -> None:
    """One line on stderr when images carry an EXIF rotation (they are used as stored)."""
    if rotated:
        path, tag = rotated[0]
        more = f" (and {len(rotated) - 1} more image(s))" if len(rotated) > 1 else ""
        print(
            f"warning: {path}{more}: EXIF orientation {tag} is ignored; pixels are used in "
            "their stored order, as COLMAP uses them",
            file=sys.stderr,
        )


def _downsampled_size(width: int, height: int, factor: int) -> tuple[int, int]:
    # ImageMagick `-resize 25%` rounds to the nearest pixel.
    return max(1, int(width / factor + 0.5)), max(1, int(height / factor + 0.5))


def downsample_image(img: np.ndarray, factor: int) -> np.ndarray:
    """Area-downsample an image [H,W,C] by ``factor`` (the one downsampler of the package).

    * float: the mean of each ``factor x factor`` block, as multinerf
      ``internal/image.py: downsample`` (H and W must be divisible by ``factor``);
    * uint8 / uint16 (what ``images_{f}/`` folders store): with H and W divisible, the
      exact block mean rounded half up (PIL ``Image.reduce``); otherwise PIL's box filter
      to the rounded size (as ImageMagick's ``-resize``). Same dtype out.
    """
    factor = int(factor)
    h, w = img.shape[:2]
    if np.issubdtype(img.dtype, np.floating):
        if h % factor or w % factor:
            raise ValueError(f"image size {w}x{h} is not divisible by factor {factor}")
        return img.reshape(h // factor, factor, w // factor, factor, -1).mean(axis=(1, 3))
    if img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"downsample_image: unsupported dtype {img.dtype}")
    nw, nh = _downsampled_size(w, h, factor)
    out = []
    # One single-channel image per channel: PIL would weight RGBA colours by alpha.
    for c in range(img.shape[-1]):
        ch = np.ascontiguousarray(img[..., c])
        im = PILImage.fromarray(ch if img.dtype == np.uint8 else ch.astype(np.int32))
        if h % factor == 0 and w % factor == 0:
            out.append(np.asarray(im.reduce(factor)))
        else:
            out.append(np.asarray(im.resize((nw, nh), PILImage.Resampling.BOX)))
    return np.stack(out, -1).astype(img.dtype)


def _write_image(path: Path, img: np.ndarray) -> None:
    """PNG file of uint8 [H,W,C] or uint16 [H,W,1] (16-bit grayscale: ``io.write_png``
    takes 8-bit images only)."""
    if img.dtype == np.uint8:
        io.write_png(path, img)
        return
    import io as bytes_io

    buf = bytes_io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(img[..., 0])).save(buf, format="PNG")
    io.write_bytes(path, buf.getvalue())


def _source_stamp(source: Path, factor: int) -> dict:
    """What a downsampled folder is made from: the source folder and its images' sizes and
    modification times (a changed source makes a cached copy stale)."""
    files = []
    for f in _list_images(source):
        st = (source / f).stat()
        files.append([f, st.st_size, st.st_mtime_ns])
    return {"source": str(source.resolve()), "factor": int(factor), "files": files}


def _stamp_matches(folder: Path, stamp: dict) -> bool:
    try:
        return io.read_json(folder / STAMP_FILE) == stamp
    except UserError:
        return False


def downsample_folder(source: str | os.PathLike, target: str | os.PathLike, factor: int) -> Path:
    """Make ``target`` from the images in ``source``, area-downsampled by ``factor``.

    Output files are PNG (lossless; 16-bit grayscale stays 16-bit) named with the source
    file's stem, which keeps the sorted order of ``source``, plus ``STAMP_FILE`` recording
    what they were made from. The folder is built under a temporary name and renamed into
    place (``io.atomic_dir``), so interrupted or concurrent builders never leave a half
    folder; a builder that finds a complete, current ``target`` when done keeps it.
    """
    source, target, factor = Path(source), Path(target), int(factor)
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
    stamp = _source_stamp(source, factor)
    rotated: list = []

    class _Built(Exception):
        pass

    try:
        with io.atomic_dir(target) as tmp:
            for f, stem in zip(files, stems, strict=True):
                small = downsample_image(read_image(source / f, rotated), factor)
                _write_image(tmp / f"{stem}.png", small)
            io.write_json(tmp / STAMP_FILE, stamp)
            if target.is_dir() and _stamp_matches(target, stamp):
                raise _Built  # a concurrent builder finished first: keep its folder
    except _Built:
        pass
    _warn_rotated(rotated)
    return target


def cache_root() -> Path:
    """Our cache folder: ``$MIPNERF360_CACHE``, else ``$XDG_CACHE_HOME/mipnerf360``, else
    ``~/.cache/mipnerf360``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mipnerf360"


def _cache_folder(source: Path, factor: int) -> Path:
    """``<cache_root>/images/<scene>-images_<f>-<hash of the resolved source and factor>``."""
    key = f"{source.resolve()}\0{int(factor)}".encode()
    digest = hashlib.blake2b(key, digest_size=8).hexdigest()
    return cache_root() / "images" / f"{source.resolve().parent.name}-images_{factor}-{digest}"


def ensure_downsampled(scene_dir: str | os.PathLike, factor: int) -> Path:
    """The folder of the scene's images at ``factor`` (> 1).

    The scene's own ``images_{factor}/`` when it has one (the data sets ship them, and
    ``mipnerf360 prepare`` makes one in its prepared scene); otherwise a copy made from
    ``images/`` in our cache folder (``cache_root()/images/...``), rebuilt when the source
    images change. The scene folder itself is never written to (it may be read-only or a
    user's only copy of the data).
    """
    scene_dir = Path(scene_dir)
    own = scene_dir / f"images_{factor}"
    if own.is_dir():
        return own
    source = scene_dir / "images"
    if not source.is_dir():
        raise DatasetError(f"{own}: missing, and {source} to create it from does not exist")
    target = _cache_folder(source, factor)
    if target.is_dir() and _stamp_matches(target, _source_stamp(source, factor)):
        return target
    print(f"making {target} from {source} (factor {factor})", file=sys.stderr)
    try:
        return downsample_folder(source, target, factor)
    except DatasetError:
        raise
    except UserError as e:  # the cache folder is not writable
        raise DatasetError(
            f"{e} (the scene has no {own.name}/; set {CACHE_ENV} to a writable folder for "
            "our copy, or run `mipnerf360 prepare`)"
        ) from None


def _load_image_stack(paths: list[Path], what: str) -> tuple[np.ndarray, float]:
    """Images of one size as (uint8 or uint16 [N,H,W,C], full-scale value 255 or 65535).

    C = 4 when any image has alpha (missing alpha = opaque), else 3; 16-bit grayscale
    images promote the stack to uint16 (8-bit values x 257, exact).
    """
    imgs, shape0, rotated = [], None, []
    for p in paths:
        img = read_image(p, rotated)
        if shape0 is None:
            shape0 = (img.shape[:2], paths[0])
        elif img.shape[:2] != shape0[0]:
            raise DatasetError(
                f"{p}: image size {img.shape[1]}x{img.shape[0]} differs from "
                f"{shape0[0][1]}x{shape0[0][0]} of {shape0[1]} ({what} images must share one size)"
            )
        imgs.append(np.repeat(img, 3, -1) if img.shape[-1] == 1 else img)
    _warn_rotated(rotated)
    scale = 255.0
    if any(u.dtype == np.uint16 for u in imgs):
        scale = 65535.0
        imgs = [u if u.dtype == np.uint16 else u.astype(np.uint16) * 257 for u in imgs]
    if any(u.shape[-1] == 4 for u in imgs):
        opaque = np.full(shape0[0] + (1,), scale, imgs[0].dtype)
        imgs = [u if u.shape[-1] == 4 else np.concatenate([u, opaque], -1) for u in imgs]
    return np.stack(imgs), scale


def _rgb_float(stack: np.ndarray, scale: float) -> np.ndarray:
    """float32 [N,H,W,3] in [0,1] from [N,H,W,C] integers (alpha dropped), one image at a
    time. As the reference: x / 255. in float64, stored as float32."""
    out = np.empty(stack.shape[:3] + (3,), np.float32)
    for i in range(len(stack)):
        out[i] = (stack[i, ..., :3] / scale).astype(np.float32)
    return out


# ---------------------------------------------------------------------------
# COLMAP cameras


def _colmap_intrinsics(cam: colmap.Camera, where: Path):
    """(K [3,3], distortion [6] or None, camtype) of one COLMAP camera, as multinerf
    ``datasets.py: NeRFSceneManager.process`` reads each COLMAP camera model."""
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


def _read_colmap_model(model_dir: Path):
    if not model_dir.is_dir():
        raise DatasetError(f"{model_dir}: COLMAP model folder not found")
    try:
        return colmap.read_model(model_dir)
    except FileNotFoundError as e:
        raise DatasetError(str(e)) from None


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


def _camera_arrays(per_image, images: np.ndarray, factor: int, first: Path, where: Path):
    """Per-image (K, dist, camtype) -> (pixtocams float32 [N,3,3], dist [N,6] | None,
    camtype), after checking that the cameras agree with the images' size."""
    Ks = np.stack([k for k, _, _ in per_image])
    types = {t for _, _, t in per_image}
    if len(types) > 1:
        raise DatasetError(f"{where}: mixes fisheye and perspective cameras (unsupported)")
    if all(d is None for _, d, _ in per_image):
        dist = None
    else:
        dist = np.stack([np.zeros(6) if d is None else d for _, d, _ in per_image])
    h, w = images.shape[1:3]
    f = max(int(factor), 1)
    # Principal points near the centre: the camera size must agree with the images.
    cw, ch = 2 * Ks[:, 0, 2] / f, 2 * Ks[:, 1, 2] / f
    if np.any(np.abs(cw - w) > 0.25 * w) or np.any(np.abs(ch - h) > 0.25 * h):
        raise DatasetError(
            f"{first}: images are {w}x{h} but the cameras in {where} imply about "
            f"{np.median(cw):.0f}x{np.median(ch):.0f} at factor {f}"
        )
    # Reference: inv(K) @ diag(factor, factor, 1), stored as float32.
    pixtocams = (np.linalg.inv(Ks) @ np.diag([f, f, 1.0])).astype(np.float32)
    return pixtocams, dist, types.pop()


# ---------------------------------------------------------------------------
# Image folders and poses_bounds.npy


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


NPY_MAGIC = b"\x93NUMPY"


def _load_bounds(scene_dir: Path, n: int | None) -> np.ndarray | None:
    """LLFF ``poses_bounds.npy`` as float64 [N,17], or None when the scene has none."""
    path = scene_dir / "poses_bounds.npy"
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            magic = f.read(len(NPY_MAGIC))
        if magic != NPY_MAGIC:
            raise DatasetError(
                f"{path}: not a NumPy .npy file (expected LLFF's [N,17] float array of "
                "poses and bounds, as written by np.save)"
            )
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot read the .npy array ({e.__class__.__name__})") from None
    if arr.ndim != 2 or arr.shape[1] != 17 or arr.dtype.kind not in "fiu":
        raise DatasetError(
            f"{path}: expected a numeric array of shape [N,17], got {arr.dtype} {list(arr.shape)}"
        )
    if n is not None and arr.shape[0] != n:
        raise DatasetError(f"{path}: has {arr.shape[0]} rows but the scene has {n} images")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise DatasetError(f"{path}: contains NaN or infinite values")
    return arr


# ---------------------------------------------------------------------------
# The loaders' shared tail


def _make_scene(
    scene_dir: Path,
    cfg: DataConfig,
    dataset_type: str,
    names: list[str],
    images: np.ndarray,
    poses: np.ndarray,
    pixtocams: np.ndarray,
    dist: np.ndarray | None = None,
    camtype: str = "perspective",
    *,
    bounds: np.ndarray | None = None,
    split: tuple[np.ndarray, np.ndarray] | None = None,
    render_focal: float | None = None,
    normalize: bool = True,
) -> Scene:
    """Normalise poses, make the render path and split, and build the ``Scene``.

    ``normalize`` (COLMAP, LLFF): as multinerf ``datasets.py: LLFF._load_renderings``, for
    forward-facing scenes rescale by the near bound and recenter
    (``camera_utils.recenter_poses``) with a spiral render path, else align with the
    cameras' principal axes (``camera_utils.transform_poses_pca``) with an ellipse path;
    the split holds out every ``llffhold``-th image. Without (Blender): poses as stored, an
    orbit path, the given ``split``.
    """
    n = len(names)
    transform, pixtocam_ndc, bounds_world = np.eye(4), None, None
    forward_facing = bool(cfg.forward_facing) and normalize
    if not normalize:
        render_poses = camera.generate_orbit_path(poses, n_frames=cfg.render_path_frames)
    elif forward_facing:
        if bounds is None:
            raise DatasetError(
                f"{scene_dir / 'poses_bounds.npy'}: forward-facing scenes need near/far bounds"
            )
        if bounds.min() <= 0:
            raise DatasetError(
                f"{scene_dir / 'poses_bounds.npy'}: near bounds must be positive for a "
                f"forward-facing scene, got {bounds.min()}"
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
    if split is None:
        all_indices = np.arange(n)
        hold = max(int(cfg.llffhold), 1)
        split = (all_indices[all_indices % hold != 0], all_indices[all_indices % hold == 0])
    h, w = images.shape[1:3]
    if render_focal is None:
        render_focal = float(np.median(np.float32(1) / pixtocams[:, 0, 0]))
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
        forward_facing=forward_facing,
        pixtocam_ndc=pixtocam_ndc,
        i_train=split[0],
        i_test=split[1],
        colmap_to_world_transform=transform,
        render_poses=render_poses,
        render_pixtocam=camera.get_pixtocam(render_focal, w, h),
        bounds=bounds_world,
    )


# ---------------------------------------------------------------------------
# Loaders


def _precheck_images(scene_dir: Path, cfg: DataConfig) -> None:
    f = int(cfg.factor)
    if not (scene_dir / "images").is_dir() and not (f > 1 and (scene_dir / f"images_{f}").is_dir()):
        raise DatasetError(f"{scene_dir / 'images'}: not found (the scene has no images/ folder)")


def _precheck_colmap(scene_dir: Path, cfg: DataConfig) -> None:
    if not (scene_dir / "sparse" / "0").is_dir():
        raise DatasetError(f"{scene_dir / 'sparse' / '0'}: not found (COLMAP poses are missing)")
    _precheck_images(scene_dir, cfg)


def _precheck_llff(scene_dir: Path, cfg: DataConfig) -> None:
    if not (scene_dir / "poses_bounds.npy").is_file():
        raise DatasetError(f"{scene_dir / 'poses_bounds.npy'}: not found (LLFF poses are missing)")
    _precheck_images(scene_dir, cfg)


def _precheck_blender(scene_dir: Path, cfg: DataConfig) -> None:
    for split in ("train", "test"):
        f = scene_dir / f"transforms_{split}.json"
        if not f.is_file():
            raise DatasetError(f"{f}: not found (Blender scenes need transforms_*.json)")


def _load_colmap(scene_dir: Path, cfg: DataConfig) -> Scene:
    """mip-NeRF 360 layout: ``sparse/0`` (COLMAP), ``images/``, ``images_{f}/``."""
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
    factor = max(int(cfg.factor), 1)
    paths = _resolve_image_paths(scene_dir, names, factor, images_file)
    images = _rgb_float(*_load_image_stack(paths, "scene"))
    pixtocams, dist, camtype = _camera_arrays(per_image, images, factor, paths[0], cams_file)
    arr = _load_bounds(scene_dir, None)
    bounds = None if arr is None else arr[:, -2:]
    if bounds is None and cfg.forward_facing:
        bounds = np.array([0.01, 1.0])  # reference default without poses_bounds.npy
    return _make_scene(
        scene_dir, cfg, "colmap", names, images, poses, pixtocams, dist, camtype, bounds=bounds
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
    images = _rgb_float(*_load_image_stack(paths, "scene"))

    per_image = None
    model_dir = scene_dir / "sparse" / "0"
    if model_dir.is_dir():
        # A COLMAP model next to poses_bounds.npy: take its per-image intrinsics.
        cameras, ims, _ = _read_colmap_model(model_dir)
        by_name = {im.name: im for im in ims.values()}
        if all(n in by_name and by_name[n].camera_id in cameras for n in names):
            per_image = [
                _colmap_intrinsics(cameras[by_name[n].camera_id], model_dir) for n in names
            ]
    if per_image is None:
        # As LLFF: intrinsics from hwf (principal point at the image centre).
        per_image = [
            (camera.intrinsic_matrix(f, f, w_ * 0.5, h_ * 0.5), None, "perspective")
            for h_, w_, f in hwf
        ]
    pixtocams, dist, camtype = _camera_arrays(per_image, images, factor, paths[0], pb_path)
    return _make_scene(
        scene_dir, cfg, "llff", names, images, poses, pixtocams, dist, camtype, bounds=bounds
    )


def _blender_frames(jpath: Path) -> tuple[list[dict], float]:
    """Frames and camera_angle_x of one ``transforms_<split>.json``, checked."""
    meta = io.read_json(jpath)
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not frames or not isinstance(frames, list):
        raise DatasetError(f"{jpath}: no 'frames' (the file lists no images)")
    angle = meta.get("camera_angle_x")
    if angle is None:
        raise DatasetError(f"{jpath}: missing 'camera_angle_x'")
    if isinstance(angle, bool) or not isinstance(angle, (int, float)) or not 0 < angle < np.pi:
        raise DatasetError(f"{jpath}: 'camera_angle_x' must be an angle in (0, pi), got {angle!r}")
    for k, fr in enumerate(frames):
        if not isinstance(fr, dict) or "file_path" not in fr or "transform_matrix" not in fr:
            raise DatasetError(f"{jpath}: frame {k} lacks 'file_path' or 'transform_matrix'")
        try:
            m = np.asarray(fr["transform_matrix"], np.float64)
        except (TypeError, ValueError):
            m = None
        if m is None or m.shape not in ((4, 4), (3, 4)) or not np.isfinite(m).all():
            raise DatasetError(f"{jpath}: frame {k}: 'transform_matrix' is not a 4x4 matrix")
    return frames, float(angle)


def _load_blender(scene_dir: Path, cfg: DataConfig) -> Scene:
    """Blender synthetic layout (multinerf ``datasets.py: Blender``):
    ``transforms_{train,test}.json`` + RGBA PNGs composited on the background colour."""
    factor = max(int(cfg.factor), 1)
    all_images, all_poses, names, split_idx, focals = [], [], [], {}, []
    shape = None
    for split in ("train", "test"):
        jpath = scene_dir / f"transforms_{split}.json"
        if not jpath.is_file():
            raise DatasetError(f"{jpath}: not found")
        frames, camera_angle_x = _blender_frames(jpath)
        paths = []
        for fr in frames:
            p = scene_dir / fr["file_path"]
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                p = p.with_name(p.name + ".png")
            paths.append(p)
            all_poses.append(np.asarray(fr["transform_matrix"], np.float64)[:3, :4])
            names.append(os.path.normpath(fr["file_path"]))
        stack, scale = _load_image_stack(paths, f"{split}-split")
        if shape is not None and stack.shape[1:3] != shape:
            raise DatasetError(
                f"{paths[0]}: {split} images are {stack.shape[2]}x{stack.shape[1]}, other split "
                f"{shape[1]}x{shape[0]}"
            )
        shape = stack.shape[1:3]
        img = stack / scale  # float64, as the reference
        if img.shape[-1] == 4:
            bg = 1.0 if cfg.white_background else 0.0
            img = img[..., :3] * img[..., 3:] + bg * (1.0 - img[..., 3:])
        if factor > 1:
            n_, h, w = img.shape[:3]
            if h % factor or w % factor:
                raise DatasetError(f"{paths[0]}: size {w}x{h} is not divisible by factor {factor}")
            img = np.stack([downsample_image(im, factor) for im in img])
        start = len(all_images)
        all_images.extend(img.astype(np.float32))
        split_idx[split] = np.arange(start, len(all_images))
        w_small = img.shape[2]
        focals.append(0.5 * w_small / np.tan(0.5 * camera_angle_x))
    images = np.stack(all_images)
    h, w = images.shape[1:3]
    pixtocams = np.stack(
        [
            camera.get_pixtocam(focals[0 if i in split_idx["train"] else 1], w, h)
            for i in range(len(images))
        ]
    ).astype(np.float32)
    return _make_scene(
        scene_dir,
        cfg,
        "blender",
        names,
        images,
        np.stack(all_poses),
        pixtocams,
        split=(split_idx["train"], split_idx["test"]),
        render_focal=focals[1],
        normalize=False,
    )


@dataclass(frozen=True)
class Loader:
    """One data set type: how to check, load and (maybe) pre-downsample a scene folder."""

    precheck: Callable[[Path, DataConfig], None]  # fast file checks, DatasetError naming one
    load: Callable[[Path, DataConfig], Scene]  # the scene (after precheck)
    needs_downsampled_images: bool  # factor > 1 reads images_<factor>/ (made from images/)


LOADERS: dict[str, Loader] = {
    "colmap": Loader(_precheck_colmap, _load_colmap, True),
    "llff": Loader(_precheck_llff, _load_llff, True),
    "blender": Loader(_precheck_blender, _load_blender, False),
}
DATASET_TYPES: tuple[str, ...] = tuple(LOADERS)


def _loader(scene_dir: Path, dataset_type: str) -> Loader:
    if dataset_type not in LOADERS:
        raise DatasetError(
            f"{scene_dir}: unknown dataset_type {dataset_type!r} ({', '.join(DATASET_TYPES)})"
        )
    if not scene_dir.is_dir():
        raise DatasetError(f"{scene_dir}: scene folder not found")
    return LOADERS[dataset_type]


def precheck(path: str | os.PathLike, data_cfg: DataConfig) -> None:
    """Fast checks that folder ``path`` holds a ``data_cfg.dataset_type`` scene (the files
    the loader needs exist); raises DatasetError naming the first missing one."""
    scene_dir = Path(path)
    _loader(scene_dir, data_cfg.dataset_type).precheck(scene_dir, data_cfg)


def load_scene(path: str | os.PathLike, data_cfg: DataConfig) -> Scene:
    """Load the scene in folder ``path`` as ``data_cfg.dataset_type`` describes."""
    scene_dir = Path(path)
    loader = _loader(scene_dir, data_cfg.dataset_type)
    loader.precheck(scene_dir, data_cfg)
    return loader.load(scene_dir, data_cfg)


def scene_fingerprint(scene: Scene) -> str:
    """A content hash (blake2b, 32 hex digits) of what the loader loaded.

    Covers the images (float32 pixel values), camera poses, intrinsics, distortion and
    camera type, the train/test split and near/far -- not file names, paths or times, so a
    copied or re-linked scene keeps its fingerprint and changed data changes it. Float
    pose and intrinsic arrays are rounded to 1e-9 first, so last-bit differences of the
    linear algebra between machines do not change it. ``mipnerf360 prepare`` records it in
    the manifest; training can compute it from the scene it loaded and get the same value.
    """
    h = hashlib.blake2b(digest_size=16)

    def add(name: str, arr) -> None:
        a = np.ascontiguousarray(arr)
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.data)

    def stable(arr) -> np.ndarray:  # -0.0 -> 0.0 so that signed zeros do not matter
        return np.round(np.asarray(arr, np.float64), 9) + 0.0

    # Images: one digest per image, hashed in threads (hashlib releases the GIL), then
    # combined in order; the bulk of the bytes.
    images = np.asarray(scene.images)
    h.update(f"images:{images.dtype.str}:{images.shape};".encode())

    def digest(i: int) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(images[i]).data, digest_size=16).digest()

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for d in pool.map(digest, range(len(images))):
            h.update(d)
    add("camtoworlds", stable(scene.camtoworlds))
    add("pixtocams", stable(scene.pixtocams))
    if scene.distortion is not None:
        add("distortion", stable(scene.distortion))
    add("i_train", np.asarray(scene.i_train, np.int64))
    add("i_test", np.asarray(scene.i_test, np.int64))
    add("near_far", np.array([scene.near, scene.far], np.float64))
    h.update(f"camtype:{scene.camtype}".encode())
    return h.hexdigest()


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
