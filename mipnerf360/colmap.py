"""Reader and writer for COLMAP sparse models (``cameras``, ``images``, ``points3D``).

Both the binary (``.bin``) and the text (``.txt``) forms are supported. The file layouts
and the camera-model table follow COLMAP's documentation ("Output format" page,
colmap.github.io/format.html) and ``src/colmap/sensor/models.h``; the code is our own.

Binary layouts (little endian):

* cameras.bin: ``uint64 n``; per camera ``int32 id, int32 model_id, uint64 width,
  uint64 height, float64 params[num_params(model)]``.
* images.bin: ``uint64 n``; per image ``int32 id, float64 qvec[4] (w,x,y,z),
  float64 tvec[3], int32 camera_id, name (NUL-terminated), uint64 n2d``, then
  ``n2d x (float64 x, float64 y, int64 point3D_id)``.
* points3D.bin: ``uint64 n``; per point ``uint64 id, float64 xyz[3], uint8 rgb[3],
  float64 error, uint64 track_length``, then ``track_length x (int32 image_id,
  int32 point2D_idx)``.

Poses are world-to-camera (``x_cam = R(qvec) x_world + tvec``), OpenCV camera axes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mipnerf360 import io
from mipnerf360.errors import UserError

__all__ = [
    "CAMERA_MODELS",
    "CAMERA_MODEL_IDS",
    "CAMERA_MODEL_NAMES",
    "Camera",
    "ColmapError",
    "Image",
    "Point3D",
    "detect_model_format",
    "qvec2rotmat",
    "read_cameras_binary",
    "read_cameras_text",
    "read_images_binary",
    "read_images_text",
    "read_model",
    "read_points3D_binary",
    "read_points3D_text",
    "rotmat2qvec",
    "write_cameras_binary",
    "write_cameras_text",
    "write_images_binary",
    "write_images_text",
    "write_model",
    "write_points3D_binary",
    "write_points3D_text",
]


class ColmapError(UserError, ValueError):
    """A COLMAP model file is missing, truncated or malformed."""


@dataclass(frozen=True)
class CameraModel:
    model_id: int
    model_name: str
    num_params: int


# COLMAP's camera models (id, name, number of parameters), from colmap's models.h.
CAMERA_MODELS = (
    CameraModel(0, "SIMPLE_PINHOLE", 3),  # f, cx, cy
    CameraModel(1, "PINHOLE", 4),  # fx, fy, cx, cy
    CameraModel(2, "SIMPLE_RADIAL", 4),  # f, cx, cy, k
    CameraModel(3, "RADIAL", 5),  # f, cx, cy, k1, k2
    CameraModel(4, "OPENCV", 8),  # fx, fy, cx, cy, k1, k2, p1, p2
    CameraModel(5, "OPENCV_FISHEYE", 8),  # fx, fy, cx, cy, k1, k2, k3, k4
    CameraModel(6, "FULL_OPENCV", 12),  # fx, fy, cx, cy, k1, k2, p1, p2, k3, k4, k5, k6
    CameraModel(7, "FOV", 5),  # fx, fy, cx, cy, omega
    CameraModel(8, "SIMPLE_RADIAL_FISHEYE", 4),  # f, cx, cy, k
    CameraModel(9, "RADIAL_FISHEYE", 5),  # f, cx, cy, k1, k2
    CameraModel(10, "THIN_PRISM_FISHEYE", 12),  # fx, fy, cx, cy, k1, k2, p1, p2, k3, k4, sx1, sy1
)
CAMERA_MODEL_IDS = {m.model_id: m for m in CAMERA_MODELS}
CAMERA_MODEL_NAMES = {m.model_name: m for m in CAMERA_MODELS}


@dataclass
class Camera:
    """One COLMAP camera. ``model`` is the model name, ``params`` float64 [num_params]."""

    id: int
    model: str
    width: int
    height: int
    params: np.ndarray


@dataclass
class Image:
    """One registered image: world-to-camera pose, 2D keypoints [K,2] and their 3D ids [K]."""

    id: int
    qvec: np.ndarray
    tvec: np.ndarray
    camera_id: int
    name: str
    xys: np.ndarray
    point3D_ids: np.ndarray

    def qvec2rotmat(self) -> np.ndarray:
        return qvec2rotmat(self.qvec)


@dataclass
class Point3D:
    """One 3D point with its colour, reprojection error and track."""

    id: int
    xyz: np.ndarray
    rgb: np.ndarray
    error: float
    image_ids: np.ndarray
    point2D_idxs: np.ndarray


# ---------------------------------------------------------------------------
# Rotations


def qvec2rotmat(qvec) -> np.ndarray:
    """Unit quaternion (w, x, y, z) [4] -> rotation matrix [3,3] (Hamilton convention)."""
    w, x, y, z = np.asarray(qvec, dtype=np.float64)
    return np.array(
        [
            [1 - 2 * y * y - 2 * z * z, 2 * x * y - 2 * w * z, 2 * z * x + 2 * w * y],
            [2 * x * y + 2 * w * z, 1 - 2 * x * x - 2 * z * z, 2 * y * z - 2 * w * x],
            [2 * z * x - 2 * w * y, 2 * y * z + 2 * w * x, 1 - 2 * x * x - 2 * y * y],
        ]
    )


def rotmat2qvec(R) -> np.ndarray:
    """Rotation matrix [3,3] -> unit quaternion (w, x, y, z) [4] with w >= 0.

    Uses the eigenvector of the symmetric 4x4 matrix of Bar-Itzhack (2000), which is
    robust for every rotation.
    """
    R = np.asarray(R, dtype=np.float64)
    rxx, ryx, rzx, rxy, ryy, rzy, rxz, ryz, rzz = R.flat
    K = (
        np.array(
            [
                [rxx - ryy - rzz, 0, 0, 0],
                [ryx + rxy, ryy - rxx - rzz, 0, 0],
                [rzx + rxz, rzy + ryz, rzz - rxx - ryy, 0],
                [ryz - rzy, rzx - rxz, rxy - ryx, rxx + ryy + rzz],
            ]
        )
        / 3.0
    )
    eigvals, eigvecs = np.linalg.eigh(K)
    q = eigvecs[[3, 0, 1, 2], np.argmax(eigvals)]
    if q[0] < 0:
        q = -q
    return q


# ---------------------------------------------------------------------------
# Binary reading


class _Reader:
    """Bounds-checked little-endian reader over a whole file's bytes."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = path.read_bytes()
        except OSError as e:
            raise ColmapError(f"{path}: cannot read: {e.strerror or e}") from None
        self.pos = 0

    def read(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise ColmapError(
                f"{self.path}: file is truncated (reading {what} at byte {self.pos}, "
                f"needs {size} bytes, file has {len(self.data)})"
            )
        vals = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return vals

    def array(self, dtype, count: int, what: str) -> np.ndarray:
        dtype = np.dtype(dtype).newbyteorder("<")
        size = dtype.itemsize * count
        if self.pos + size > len(self.data):
            raise ColmapError(
                f"{self.path}: file is truncated (reading {what} at byte {self.pos}, "
                f"needs {size} bytes, file has {len(self.data)})"
            )
        arr = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += size
        return arr.astype(dtype.newbyteorder("="))

    def cstring(self, what: str) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise ColmapError(f"{self.path}: file is truncated (unterminated {what})")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ColmapError(f"{self.path}: {what} is not valid UTF-8: {raw!r}") from e

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise ColmapError(
                f"{self.path}: {len(self.data) - self.pos} unexpected trailing bytes "
                f"after byte {self.pos} (corrupt file?)"
            )


def _check_count(r: _Reader, n: int, min_bytes_each: int, what: str) -> None:
    # Guard against garbage counts (e.g. a text file read as binary) before allocating.
    if n * min_bytes_each > len(r.data) - r.pos:
        raise ColmapError(
            f"{r.path}: header says {n} {what} but the file has only "
            f"{len(r.data) - r.pos} bytes left (truncated or not a COLMAP binary file)"
        )


def _model_from_id(model_id: int, path: Path, cam_id: int) -> CameraModel:
    if model_id not in CAMERA_MODEL_IDS:
        known = ", ".join(f"{m.model_id}={m.model_name}" for m in CAMERA_MODELS)
        raise ColmapError(
            f"{path}: camera {cam_id} has unknown camera model id {model_id} ({known})"
        )
    return CAMERA_MODEL_IDS[model_id]


def read_cameras_binary(path) -> dict[int, Camera]:
    """Read ``cameras.bin`` -> {camera_id: Camera}."""
    r = _Reader(_existing(path))
    (n,) = r.read("Q", "number of cameras")
    _check_count(r, n, 24, "cameras")
    cameras = {}
    for _ in range(n):
        cam_id, model_id, width, height = r.read("iiQQ", "camera header")
        model = _model_from_id(model_id, r.path, cam_id)
        params = r.array(np.float64, model.num_params, f"parameters of camera {cam_id}")
        cameras[cam_id] = Camera(cam_id, model.model_name, int(width), int(height), params)
    r.finish()
    return cameras


def read_images_binary(path) -> dict[int, Image]:
    """Read ``images.bin`` -> {image_id: Image}."""
    r = _Reader(_existing(path))
    (n,) = r.read("Q", "number of images")
    _check_count(r, n, 70, "images")
    images = {}
    for _ in range(n):
        vals = r.read("i7di", "image header")
        image_id, qvec, tvec, cam_id = vals[0], np.array(vals[1:5]), np.array(vals[5:8]), vals[8]
        name = r.cstring(f"name of image {image_id}")
        (n2d,) = r.read("Q", f"number of 2D points of image {image_id}")
        _check_count(r, n2d, 24, f"2D points of image {image_id}")
        pts = r.array(
            np.dtype([("x", "<f8"), ("y", "<f8"), ("id", "<i8")]), n2d, f"points of {name}"
        )
        xys = np.stack([pts["x"], pts["y"]], axis=-1).astype(np.float64).reshape(-1, 2)
        ids = pts["id"].astype(np.int64)
        images[image_id] = Image(image_id, qvec, tvec, cam_id, name, xys, ids)
    r.finish()
    return images


def read_points3D_binary(path) -> dict[int, Point3D]:
    """Read ``points3D.bin`` -> {point3D_id: Point3D}."""
    r = _Reader(_existing(path))
    (n,) = r.read("Q", "number of points")
    _check_count(r, n, 43, "points")
    points = {}
    for _ in range(n):
        vals = r.read("Q3d3BdQ", "point record")
        pid = vals[0]
        xyz = np.array(vals[1:4])
        rgb = np.array(vals[4:7], dtype=np.uint8)
        error, track_len = vals[7], vals[8]
        _check_count(r, track_len, 8, f"track entries of point {pid}")
        track = r.array(np.int32, 2 * track_len, f"track of point {pid}").reshape(-1, 2)
        points[pid] = Point3D(
            pid, xyz, rgb, float(error), track[:, 0].astype(np.int64), track[:, 1].astype(np.int64)
        )
    r.finish()
    return points


# ---------------------------------------------------------------------------
# Text reading


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ColmapError(
            f"{path}: not a COLMAP text file (not UTF-8 text at byte {e.start})"
        ) from None
    except OSError as e:
        raise ColmapError(f"{path}: cannot read: {e.strerror or e}") from None


def _text_lines(path: Path):
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#"):
            yield lineno, s


def _parse(path: Path, lineno: int, what: str, fn, token):
    try:
        return fn(token)
    except ValueError as e:
        raise ColmapError(f"{path}:{lineno}: bad {what} {token!r}") from e


def read_cameras_text(path) -> dict[int, Camera]:
    """Read ``cameras.txt`` -> {camera_id: Camera}."""
    path = _existing(path)
    cameras = {}
    for lineno, line in _text_lines(path):
        tok = line.split()
        if len(tok) < 4:
            raise ColmapError(f"{path}:{lineno}: expected 'ID MODEL WIDTH HEIGHT PARAMS...'")
        cam_id = _parse(path, lineno, "camera id", int, tok[0])
        if tok[1] not in CAMERA_MODEL_NAMES:
            raise ColmapError(f"{path}:{lineno}: unknown camera model {tok[1]!r}")
        model = CAMERA_MODEL_NAMES[tok[1]]
        params = np.array([_parse(path, lineno, "parameter", float, t) for t in tok[4:]])
        if len(params) != model.num_params:
            raise ColmapError(
                f"{path}:{lineno}: {model.model_name} needs {model.num_params} parameters, "
                f"got {len(params)}"
            )
        width = _parse(path, lineno, "width", int, tok[2])
        height = _parse(path, lineno, "height", int, tok[3])
        cameras[cam_id] = Camera(cam_id, model.model_name, width, height, params)
    return cameras


def read_images_text(path) -> dict[int, Image]:
    """Read ``images.txt`` (two lines per image) -> {image_id: Image}."""
    path = _existing(path)
    # Comments are skipped, but the 2D-point line of an image may be empty, so
    # we cannot drop blank lines: walk the raw lines after the header comments.
    raw = _read_text(path).splitlines()
    lines = [(i + 1, ln) for i, ln in enumerate(raw) if not ln.lstrip().startswith("#")]
    # Drop trailing blank lines only.
    while lines and not lines[-1][1].strip():
        lines.pop()
    images = {}
    i = 0
    while i < len(lines):
        lineno, line = lines[i]
        if not line.strip():  # tolerate blank separator lines between records
            i += 1
            continue
        tok = line.split()
        if len(tok) < 10:
            raise ColmapError(
                f"{path}:{lineno}: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME'"
            )
        image_id = _parse(path, lineno, "image id", int, tok[0])
        nums = np.array([_parse(path, lineno, "pose value", float, t) for t in tok[1:8]])
        cam_id = _parse(path, lineno, "camera id", int, tok[8])
        name = " ".join(tok[9:])
        pts_line = lines[i + 1][1] if i + 1 < len(lines) else ""
        ptok = pts_line.split()
        if len(ptok) % 3:
            raise ColmapError(f"{path}:{lineno + 1}: 2D point list length is not a multiple of 3")
        vals = np.array([_parse(path, lineno + 1, "2D point", float, t) for t in ptok])
        vals = vals.reshape(-1, 3)
        images[image_id] = Image(
            image_id,
            nums[:4],
            nums[4:7],
            cam_id,
            name,
            vals[:, :2].copy(),
            vals[:, 2].astype(np.int64),
        )
        i += 2
    return images


def read_points3D_text(path) -> dict[int, Point3D]:
    """Read ``points3D.txt`` -> {point3D_id: Point3D}."""
    path = _existing(path)
    points = {}
    for lineno, line in _text_lines(path):
        tok = line.split()
        if len(tok) < 8 or (len(tok) - 8) % 2:
            raise ColmapError(f"{path}:{lineno}: expected 'ID X Y Z R G B ERROR TRACK...'")
        pid = _parse(path, lineno, "point id", int, tok[0])
        xyz = np.array([_parse(path, lineno, "coordinate", float, t) for t in tok[1:4]])
        rgb = np.array([_parse(path, lineno, "colour", int, t) for t in tok[4:7]], dtype=np.uint8)
        error = _parse(path, lineno, "error", float, tok[7])
        track = np.array([_parse(path, lineno, "track", int, t) for t in tok[8:]], dtype=np.int64)
        track = track.reshape(-1, 2)
        points[pid] = Point3D(pid, xyz, rgb, error, track[:, 0].copy(), track[:, 1].copy())
    return points


# ---------------------------------------------------------------------------
# Writing (atomic, through io.write_bytes)


def write_cameras_binary(cameras: dict[int, Camera], path) -> None:
    parts = [struct.pack("<Q", len(cameras))]
    for cam in cameras.values():
        if cam.model not in CAMERA_MODEL_NAMES:
            raise ColmapError(f"{path}: camera {cam.id} has unknown model {cam.model!r}")
        model = CAMERA_MODEL_NAMES[cam.model]
        params = np.asarray(cam.params, dtype="<f8")
        if params.shape != (model.num_params,):
            raise ColmapError(
                f"{path}: camera {cam.id} ({cam.model}) needs {model.num_params} parameters, "
                f"got shape {params.shape}"
            )
        parts.append(struct.pack("<iiQQ", cam.id, model.model_id, cam.width, cam.height))
        parts.append(params.tobytes())
    io.write_bytes(path, b"".join(parts))


def write_images_binary(images: dict[int, Image], path) -> None:
    parts = [struct.pack("<Q", len(images))]
    pt_dtype = np.dtype([("x", "<f8"), ("y", "<f8"), ("id", "<i8")])
    for im in images.values():
        parts.append(
            struct.pack(
                "<i4d3di",
                im.id,
                *np.asarray(im.qvec, float),
                *np.asarray(im.tvec, float),
                im.camera_id,
            )
        )
        parts.append(im.name.encode("utf-8") + b"\x00")
        xys = np.asarray(im.xys, dtype=np.float64).reshape(-1, 2)
        ids = np.asarray(im.point3D_ids, dtype=np.int64).reshape(-1)
        pts = np.empty(len(ids), dtype=pt_dtype)
        pts["x"], pts["y"], pts["id"] = xys[:, 0], xys[:, 1], ids
        parts.append(struct.pack("<Q", len(ids)))
        parts.append(pts.tobytes())
    io.write_bytes(path, b"".join(parts))


def write_points3D_binary(points3D: dict[int, Point3D], path) -> None:
    parts = [struct.pack("<Q", len(points3D))]
    for p in points3D.values():
        image_ids = np.asarray(p.image_ids, dtype=np.int64).reshape(-1)
        idxs = np.asarray(p.point2D_idxs, dtype=np.int64).reshape(-1)
        parts.append(
            struct.pack(
                "<Q3d3BdQ",
                p.id,
                *np.asarray(p.xyz, float),
                *np.asarray(p.rgb, int),
                p.error,
                len(image_ids),
            )
        )
        parts.append(np.stack([image_ids, idxs], -1).astype("<i4").tobytes())
    io.write_bytes(path, b"".join(parts))


def _fmt(x) -> str:
    return repr(float(x))


def write_cameras_text(cameras: dict[int, Camera], path) -> None:
    lines = [
        "# Camera list with one line of data per camera:",
        "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
        f"# Number of cameras: {len(cameras)}",
    ]
    for cam in cameras.values():
        params = " ".join(_fmt(v) for v in cam.params)
        lines.append(f"{cam.id} {cam.model} {cam.width} {cam.height} {params}")
    io.write_bytes(path, ("\n".join(lines) + "\n").encode())


def write_images_text(images: dict[int, Image], path) -> None:
    lines = [
        "# Image list with two lines of data per image:",
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
        "#   POINTS2D[] as (X, Y, POINT3D_ID)",
        f"# Number of images: {len(images)}",
    ]
    for im in images.values():
        pose = " ".join(_fmt(v) for v in [*im.qvec, *im.tvec])
        lines.append(f"{im.id} {pose} {im.camera_id} {im.name}")
        xys = np.asarray(im.xys, dtype=np.float64).reshape(-1, 2)
        ids = np.asarray(im.point3D_ids).reshape(-1)
        lines.append(
            " ".join(f"{_fmt(x)} {_fmt(y)} {int(i)}" for (x, y), i in zip(xys, ids, strict=True))
        )
    io.write_bytes(path, ("\n".join(lines) + "\n").encode())


def write_points3D_text(points3D: dict[int, Point3D], path) -> None:
    lines = [
        "# 3D point list with one line of data per point:",
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
        f"# Number of points: {len(points3D)}",
    ]
    for p in points3D.values():
        xyz = " ".join(_fmt(v) for v in p.xyz)
        rgb = " ".join(str(int(v)) for v in p.rgb)
        track = " ".join(
            f"{int(a)} {int(b)}" for a, b in zip(p.image_ids, p.point2D_idxs, strict=True)
        )
        lines.append(f"{p.id} {xyz} {rgb} {_fmt(p.error)} {track}".rstrip())
    io.write_bytes(path, ("\n".join(lines) + "\n").encode())


# ---------------------------------------------------------------------------
# Whole models


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: COLMAP model file not found")
    return path


def detect_model_format(path) -> str:
    """'.bin' or '.txt', whichever complete model exists in folder ``path``."""
    path = Path(path)
    for ext in (".bin", ".txt"):
        if all((path / f"{n}{ext}").is_file() for n in ("cameras", "images")):
            return ext
    raise FileNotFoundError(
        f"{path}: no COLMAP model found (need cameras.bin + images.bin or cameras.txt + images.txt)"
    )


def read_model(path, ext: str | None = None):
    """Read a COLMAP model folder -> (cameras, images, points3D), dicts keyed by id.

    ``ext`` is '.bin' or '.txt'; None auto-detects (binary preferred). A missing
    points3D file gives an empty dict (the loaders do not need the points).
    """
    path = Path(path)
    ext = detect_model_format(path) if ext is None else ext
    if ext not in (".bin", ".txt"):
        raise ValueError(f"ext must be '.bin' or '.txt', got {ext!r}")
    binary = ext == ".bin"
    cameras = (read_cameras_binary if binary else read_cameras_text)(path / f"cameras{ext}")
    images = (read_images_binary if binary else read_images_text)(path / f"images{ext}")
    pts_path = path / f"points3D{ext}"
    points3D = {}
    if pts_path.is_file():
        points3D = (read_points3D_binary if binary else read_points3D_text)(pts_path)
    return cameras, images, points3D


def write_model(cameras, images, points3D, path, ext: str = ".bin") -> None:
    """Write a COLMAP model (cameras, images, points3D dicts) into folder ``path``."""
    path = Path(path)
    points3D = {} if points3D is None else points3D
    if ext == ".bin":
        write_cameras_binary(cameras, path / "cameras.bin")
        write_images_binary(images, path / "images.bin")
        write_points3D_binary(points3D, path / "points3D.bin")
    elif ext == ".txt":
        write_cameras_text(cameras, path / "cameras.txt")
        write_images_text(images, path / "images.txt")
        write_points3D_text(points3D, path / "points3D.txt")
    else:
        raise ValueError(f"ext must be '.bin' or '.txt', got {ext!r}")
