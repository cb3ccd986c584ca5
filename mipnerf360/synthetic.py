"""Deterministic procedural scenes, ray-cast analytically and written as real data sets are.

``generate(out_dir, kind)`` renders a small analytic scene — textured spheres and boxes at
the centre standing on a textured floor, and for ``'360'`` a distant textured environment
sphere so the scene is unbounded — with a vectorised numpy ray caster (closed-form
ray/sphere, ray/box and ray/plane intersections, no loops over pixels), and writes it in
one of three layouts:

* ``'360'`` (mip-NeRF 360 / COLMAP): ``sparse/0/{cameras,images,points3D}.bin`` (world-to-
  camera poses, OpenCV camera axes, one PINHOLE camera per image with slightly varying
  focal lengths as in real captures), ``images/`` and the area-downsampled
  ``images_{f}/`` for each factor, and ``poses_bounds.npy``; cameras on an inward-facing
  ring around the objects. Optionally (``distortion=True``) through a lens with OpenCV
  radial-tangential distortion, written as OPENCV cameras.
* ``'llff'`` (forward facing): cameras on a small planar grid all looking at the scene
  (objects in front of a textured back wall), ``poses_bounds.npy`` + ``images/`` +
  ``images_{f}/`` + a COLMAP model ``sparse/0`` with one shared PINHOLE camera.
* ``'blender'`` (NeRF synthetic): ``transforms_{train,val,test}.json``
  (``camera_angle_x``; frames with ``file_path`` ``./train/r_0`` and ``transform_matrix``
  camera-to-world in OpenGL axes) and RGBA PNGs (objects only, transparent background).

Layout facts: COLMAP's file formats (colmap.github.io/format.html); ``poses_bounds.npy`` as
LLFF's ``imgs2poses`` writes it: per image (sorted by name) a 3x5 matrix
``[R | t | hwf]`` of camera-to-world with rotation columns in (down, right, backwards)
order and ``hwf = (height, width, focal)`` of the full-resolution image, flattened, then the
near and far depths (0.1 and 99.9 percentiles of the camera-space depths of the COLMAP
points the image sees); Blender's json as in the NeRF synthetic data set.

Everything that was rendered is also saved in ``synthetic_gt.npz`` (see
:func:`load_ground_truth`): per view the OpenCV camera-to-world pose, the intrinsics, the
distance along each pixel-centre ray to the surface hit, and the view's split.

Pixels are anti-aliased by averaging ``supersample**2`` rays per pixel (box filter), and
the shading is view independent (Lambertian under a fixed light).
"""

from __future__ import annotations

import argparse
import io as bytes_io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mipnerf360 import io
from mipnerf360.errors import ConfigError, UserError

KINDS = ("360", "llff", "blender")  # the layouts; the workflow's config schema checks against it
GT_FILE = "synthetic_gt.npz"
DEFAULTS = {  # kind -> (n_views, width, height)
    "360": (64, 128, 96),
    "llff": (24, 128, 96),
    "blender": (64, 96, 96),
}
_EPS = 1e-6
# OpenCV (k1, k2, p1, p2) of the optional lens distortion: mild barrel, as real wide lenses
DISTORTION = np.array([-0.08, 0.02, 0.001, -0.0015])
_LIGHT = np.array([0.4, -0.5, 0.77]) / np.linalg.norm([0.4, -0.5, 0.77])


# --------------------------------------------------------------------------- scene


@dataclass
class Texture:
    """Smooth solid texture: clip(base + amp * sin(p @ freq + phase), 0, 1) per channel."""

    base: np.ndarray  # [3]
    amp: np.ndarray  # [3]
    freq: np.ndarray  # [3 (xyz), 3 (rgb)]
    phase: np.ndarray  # [3]

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """p [..., 3] world points -> colours [..., 3]."""
        return np.clip(self.base + self.amp * np.sin(p @ self.freq + self.phase), 0.0, 1.0)


@dataclass
class Sphere:
    center: np.ndarray  # [3]
    radius: float
    texture: Texture

    def intersect(self, o: np.ndarray, d: np.ndarray):
        """First hit distance t [N] (inf on a miss) and normals [N, 3] of rays o + t d (|d|=1)."""
        oc = o - self.center
        b = np.sum(oc * d, -1)
        c = np.sum(oc * oc, -1) - self.radius**2
        disc = b * b - c
        sq = np.sqrt(np.maximum(disc, 0.0))
        t0, t1 = -b - sq, -b + sq
        t = np.where(t0 > _EPS, t0, np.where(t1 > _EPS, t1, np.inf))
        t = np.where(disc >= 0, t, np.inf)
        n = (o + np.where(np.isfinite(t), t, 0.0)[:, None] * d - self.center) / self.radius
        return t, n


@dataclass
class Box:
    center: np.ndarray  # [3]
    half: np.ndarray  # [3] half extents along the box axes
    rot: np.ndarray  # [3, 3], columns = box axes in world coordinates
    texture: Texture

    def intersect(self, o: np.ndarray, d: np.ndarray):
        """Slab test in the box frame: t [N] (inf on a miss), normals [N, 3]."""
        ol = (o - self.center) @ self.rot
        dl = d @ self.rot
        with np.errstate(divide="ignore", invalid="ignore"):
            ta = (-self.half - ol) / dl
            tb = (self.half - ol) / dl
        tmin = np.nanmax(np.minimum(ta, tb), -1)
        tmax = np.nanmin(np.maximum(ta, tb), -1)
        hit = (tmax >= tmin) & (tmax > _EPS)
        t = np.where(hit, np.where(tmin > _EPS, tmin, tmax), np.inf)
        pl = ol + np.where(hit, t, 0.0)[:, None] * dl
        axis = np.argmax(np.abs(pl) / self.half, -1)
        nl = np.zeros_like(pl)
        nl[np.arange(len(pl)), axis] = np.sign(pl[np.arange(len(pl)), axis])
        return t, nl @ self.rot.T


@dataclass
class Plane:
    """The plane {p : p . normal = offset}, seen from both sides; texture fades with distance."""

    normal: np.ndarray  # [3] unit
    offset: float
    texture: Texture
    fade: float = 5.0  # texture contrast decays as exp(-dist_from_origin / fade)

    def intersect(self, o: np.ndarray, d: np.ndarray):
        den = d @ self.normal
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (self.offset - o @ self.normal) / den
        t = np.where(np.isfinite(t) & (t > _EPS), t, np.inf)
        n = np.broadcast_to(self.normal, o.shape) * np.where(den < 0, 1.0, -1.0)[:, None]
        return t, n

    def color(self, p: np.ndarray) -> np.ndarray:
        tex = self.texture
        r = np.linalg.norm(p - self.offset * self.normal, axis=-1, keepdims=True)
        v = tex.base + tex.amp * np.exp(-r / self.fade) * np.sin(p @ tex.freq + tex.phase)
        return np.clip(v, 0.0, 1.0)


@dataclass
class Environment:
    """A large sphere around the origin, seen from inside: sky gradient, bands, hills."""

    radius: float
    horizon: np.ndarray  # [3]
    zenith: np.ndarray  # [3]
    hill: np.ndarray  # [3]
    band_amp: float
    band_phase: np.ndarray  # [3]
    hill_phase: np.ndarray  # [2]

    def intersect(self, o: np.ndarray, d: np.ndarray):
        b = np.sum(o * d, -1)
        c = np.sum(o * o, -1) - self.radius**2
        t = -b + np.sqrt(np.maximum(b * b - c, 0.0))
        t = np.where(t > _EPS, t, np.inf)
        n = -(o + np.where(np.isfinite(t), t, 0.0)[:, None] * d) / self.radius
        return t, n

    def color(self, p: np.ndarray) -> np.ndarray:
        u = p / np.linalg.norm(p, axis=-1, keepdims=True)
        elev = np.arcsin(np.clip(u[:, 2], -1.0, 1.0))[:, None]
        az = np.arctan2(u[:, 1], u[:, 0])[:, None]
        s = np.clip(elev / (np.pi / 2), 0.0, 1.0)
        sky = (1 - s) * self.horizon + s * self.zenith
        sky = sky + self.band_amp * np.sin(3 * az + 4 * elev + self.band_phase)
        hill_h = (
            0.18
            + 0.08 * np.sin(4 * az + self.hill_phase[0])
            + 0.04 * np.sin(7 * az + self.hill_phase[1])
        )
        hill = self.hill * (0.75 + 0.25 * np.sin(5 * az + 9 * elev))
        return np.clip(np.where(elev < hill_h, hill, sky), 0.0, 1.0)


@dataclass
class Scene:
    """A list of primitives; :meth:`cast` returns the nearest hit of each ray."""

    kind: str
    objects: list = field(default_factory=list)  # Spheres and Boxes (lit, solid textures)
    floor: Plane | None = None  # lit, fading texture
    environment: Environment | None = None  # unlit

    def primitives(self) -> list:
        prims = list(self.objects)
        if self.floor is not None:
            prims.append(self.floor)
        if self.environment is not None:
            prims.append(self.environment)
        return prims

    def cast(self, origins: np.ndarray, directions: np.ndarray) -> dict:
        """Ray-cast the scene.

        Args:
          origins, directions: [..., 3] (broadcastable; directions of any length, normalised here).
        Returns:
          dict of 'rgb' [..., 3] (0 where nothing is hit), 'hit' [...] bool, 'distance' [...]
          (Euclidean distance from the origin to the hit, inf on a miss), 'points' [..., 3],
          'normals' [..., 3] and 'object' [...] (index into :meth:`primitives`, -1 on a miss).
        """
        o, d = np.broadcast_arrays(
            np.asarray(origins, np.float64), np.asarray(directions, np.float64)
        )
        shape = o.shape[:-1]
        o, d = o.reshape(-1, 3), d.reshape(-1, 3)
        d = d / np.linalg.norm(d, axis=-1, keepdims=True)
        prims = self.primitives()
        ts, ns = zip(*(p.intersect(o, d) for p in prims), strict=True)
        ts = np.stack(ts, 0)  # [P, N]
        ns = np.stack(ns, 0)  # [P, N, 3]
        idx = np.argmin(ts, 0)
        cols = np.arange(len(o))
        t = ts[idx, cols]
        hit = np.isfinite(t)
        idx = np.where(hit, idx, -1)
        n = ns[np.maximum(idx, 0), cols]
        p = o + np.where(hit, t, 0.0)[:, None] * d
        rgb = np.zeros_like(p)
        shade = 0.45 + 0.55 * np.clip(n @ _LIGHT, 0.0, None)[:, None]
        for k, prim in enumerate(prims):  # loop over the few primitives, not over rays
            m = idx == k
            if not m.any():
                continue
            if isinstance(prim, Environment):
                rgb[m] = prim.color(p[m])
            elif isinstance(prim, Plane):
                rgb[m] = prim.color(p[m]) * shade[m]
            else:
                rgb[m] = prim.texture(p[m]) * shade[m]
        return {
            "rgb": rgb.reshape(shape + (3,)),
            "hit": hit.reshape(shape),
            "distance": t.reshape(shape),
            "points": p.reshape(shape + (3,)),
            "normals": n.reshape(shape + (3,)),
            "object": idx.reshape(shape),
        }


def _rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _texture(rng: np.random.Generator, base_lo=0.25, base_hi=0.75, f_lo=2.5, f_hi=6.0):
    dirs = rng.normal(size=(3, 3))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    return Texture(
        base=rng.uniform(base_lo, base_hi, 3),
        amp=rng.uniform(0.15, 0.3, 3),
        freq=dirs * rng.uniform(f_lo, f_hi, 3),
        phase=rng.uniform(0, 2 * np.pi, 3),
    )


def make_scene(kind: str, seed: int = 0) -> Scene:
    """The analytic scene of ``kind`` (world z up, floor at z = 0 for '360' and 'llff').

    The layout is fixed; ``seed`` draws the colours and texture phases. 'blender' has the
    objects only, shifted down so they are centred on the origin.
    """
    _check_kind(kind)
    rng = np.random.default_rng([seed, 7])
    tex = [_texture(rng) for _ in range(5)]
    objects = [
        Sphere(np.array([0.0, 0.0, 0.55]), 0.55, tex[0]),
        Box(np.array([0.85, -0.45, 0.3]), np.array([0.3, 0.25, 0.3]), _rot_z(0.5), tex[1]),
        Sphere(np.array([-0.75, 0.5, 0.3]), 0.3, tex[2]),
        Sphere(np.array([0.2, 0.85, 0.22]), 0.22, tex[3]),
        Box(np.array([-0.5, -0.7, 0.4]), np.array([0.15, 0.15, 0.4]), _rot_z(0.2), tex[4]),
    ]
    if kind == "blender":
        for obj in objects:
            obj.center = obj.center - np.array([0.0, 0.0, 0.5])
        return Scene(kind, objects)
    floor_tex = _texture(rng, 0.35, 0.6, 1.0, 2.0)
    floor_tex.freq[2] = 0.0  # a function of (x, y) only
    # the texture fades out with distance, so the far floor is not aliased stripes
    floor = Plane(np.array([0.0, 0.0, 1.0]), 0.0, floor_tex, fade=3.0)
    if kind == "360":
        env = Environment(
            radius=12.0,
            horizon=rng.uniform(0.6, 0.85, 3),
            zenith=rng.uniform(0.2, 0.5, 3),
            hill=rng.uniform(0.2, 0.5, 3),
            band_amp=0.08,
            band_phase=rng.uniform(0, 2 * np.pi, 3),
            hill_phase=rng.uniform(0, 2 * np.pi, 2),
        )
        return Scene(kind, objects, floor, env)
    # llff: a textured back wall behind the objects (the cameras look along +y)
    wall_tex = _texture(rng, 0.3, 0.7, 1.0, 2.5)
    wall_tex.freq[1] = 0.0  # a function of (x, z) only
    wall = Plane(np.array([0.0, 1.0, 0.0]), 3.0, wall_tex, fade=1e9)
    return Scene(kind, objects + [wall], floor)


# --------------------------------------------------------------------------- cameras


def look_at_opencv(position, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera-to-world [3, 4] with OpenCV axes (x right, y down, z forward)."""
    position = np.asarray(position, np.float64)
    fwd = np.asarray(target, np.float64) - position
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, up)
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    return np.concatenate([np.stack([right, down, fwd], 1), position[:, None]], 1)


def opencv_to_opengl(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world [..., 3, 4]: flip the y and z camera axes (OpenCV <-> OpenGL)."""
    return c2w * np.array([1.0, -1.0, -1.0, 1.0])


def _cameras(kind: str, n: int, width: int, height: int, rng: np.random.Generator):
    """Camera-to-world poses [n, 3, 4] (OpenCV) and intrinsics [n, 4] (fx, fy, cx, cy)."""
    if kind == "360":
        az = 2 * np.pi * np.arange(n) / n + rng.uniform(-0.05, 0.05, n)
        elev = np.deg2rad(22.0 + 10.0 * np.sin(3 * az) + rng.uniform(-2, 2, n))
        radius = 3.2 + rng.uniform(-0.15, 0.15, n)
        pos = radius[:, None] * np.stack(
            [np.cos(elev) * np.cos(az), np.cos(elev) * np.sin(az), np.sin(elev)], -1
        )
        pos[:, 2] += 0.3
        target = np.array([0.0, 0.0, 0.35]) + rng.uniform(-0.08, 0.08, (n, 3))
        focal = 0.5 * width / np.tan(np.deg2rad(30.0)) * (1 + rng.uniform(-0.03, 0.03, n))
    elif kind == "llff":
        cols = int(np.ceil(np.sqrt(n * 1.5)))
        rows = int(np.ceil(n / cols))
        gx, gz = np.meshgrid(np.linspace(-0.6, 0.6, cols), np.linspace(0.5, 1.0, rows))
        pos = np.stack([gx.ravel(), np.full(gx.size, -3.0), gz.ravel()], -1)[:n]
        pos = pos + rng.uniform(-0.03, 0.03, pos.shape)
        target = np.array([0.0, 0.0, 0.45]) + pos * np.array([0.3, 0.0, 0.2])
        target = target + rng.uniform(-0.05, 0.05, target.shape)
        focal = np.full(n, 0.5 * width / np.tan(np.deg2rad(28.0)))
    else:  # blender: random upper-hemisphere views at radius 4, looking at the origin
        u = rng.uniform(np.sin(np.deg2rad(8.0)), np.sin(np.deg2rad(70.0)), n)
        az = rng.uniform(0, 2 * np.pi, n)
        pos = 4.0 * np.stack(
            [np.sqrt(1 - u**2) * np.cos(az), np.sqrt(1 - u**2) * np.sin(az), u], -1
        )
        target = np.zeros((n, 3))
        focal = np.full(n, 0.5 * width / np.tan(0.5 * 0.6911112070083618))
    c2w = np.stack([look_at_opencv(p, t) for p, t in zip(pos, target, strict=True)])
    intr = np.stack([focal, focal, np.full(n, width / 2), np.full(n, height / 2)], -1)
    return c2w, intr


def distort(x, y, k1, k2, p1, p2):
    """OpenCV radial-tangential lens distortion of normalised image coordinates (COLMAP's
    OPENCV model): r2 = x^2 + y^2, radial = 1 + k1 r2 + k2 r2^2,
    xd = x radial + 2 p1 x y + p2 (r2 + 2 x^2), yd = y radial + p1 (r2 + 2 y^2) + 2 p2 x y."""
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return xd, yd


def undistort(xd, yd, k1, k2, p1, p2, iters: int = 20):
    """Invert :func:`distort` by Newton's method (closed-form 2x2 Jacobian), elementwise."""
    x, y = np.array(xd, dtype=np.float64), np.array(yd, dtype=np.float64)
    for _ in range(iters):  # fixed iteration count over whole arrays
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 * r2
        dradial = 2 * k1 + 4 * k2 * r2  # d radial / d r2, times d r2 / dx = 2x
        fx_, fy_ = distort(x, y, k1, k2, p1, p2)
        ex, ey = fx_ - xd, fy_ - yd
        j_xx = radial + x * dradial * x + 2 * p1 * y + 6 * p2 * x
        j_xy = x * dradial * y + 2 * p1 * x + 2 * p2 * y
        j_yx = y * dradial * x + 2 * p1 * x + 2 * p2 * y
        j_yy = radial + y * dradial * y + 6 * p1 * y + 2 * p2 * x
        det = j_xx * j_yy - j_xy * j_yx
        x = x - (j_yy * ex - j_xy * ey) / det
        y = y - (-j_yx * ex + j_xx * ey) / det
    return x, y


def pixel_rays(c2w: np.ndarray, intr, width: int, height: int, supersample: int = 1):
    """World rays through a camera's pixels (OpenCV camera, pixel centres at +0.5).

    Args:
      c2w: [3, 4] OpenCV camera-to-world; intr: (fx, fy, cx, cy) for a pinhole camera, or
        (fx, fy, cx, cy, k1, k2, p1, p2) with OpenCV lens distortion (:func:`distort`).
      supersample: s -> s x s rays per pixel on a regular sub-pixel grid.
    Returns:
      origins [H, W, s*s, 3], directions [H, W, s*s, 3] (camera z component 1).
    """
    fx, fy, cx, cy = intr[:4]
    sub = (np.arange(supersample) + 0.5) / supersample
    sx, sy = np.meshgrid(sub, sub, indexing="xy")
    x = np.arange(width)[None, :, None] + sx.ravel()[None, None, :]
    y = np.arange(height)[:, None, None] + sy.ravel()[None, None, :]
    x, y = np.broadcast_arrays(x, y)
    xn, yn = (x - cx) / fx, (y - cy) / fy
    if len(intr) > 4:
        xn, yn = undistort(xn, yn, *intr[4:8])
    d_cam = np.stack([xn, yn, np.ones_like(x)], -1)
    d = d_cam @ c2w[:, :3].T
    return np.broadcast_to(c2w[:, 3], d.shape), d


def render_view(scene: Scene, c2w, intr, width: int, height: int, supersample: int = 2):
    """Render one view: rgb [H, W, 3] and alpha (hit coverage) [H, W] in [0, 1] (colour
    straight, not premultiplied, where alpha > 0), and the pixel-centre ray 'distance'
    [H, W] (inf where nothing is hit)."""
    o, d = pixel_rays(c2w, intr, width, height, supersample)
    r = scene.cast(o, d)
    cov = r["hit"].astype(np.float64)  # [H, W, S]
    alpha = cov.mean(-1)
    rgb_sum = (r["rgb"] * cov[..., None]).sum(-2)
    rgb = rgb_sum / np.maximum(cov.sum(-1), 1.0)[..., None]
    oc, dc = pixel_rays(c2w, intr, width, height, 1)
    distance = scene.cast(oc[:, :, 0], dc[:, :, 0])["distance"]
    return rgb, alpha, distance


# --------------------------------------------------------------------------- writing


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown synthetic scene kind {kind!r}; choose one of {KINDS}")


def _downsample_u8(img: np.ndarray, factor: int) -> np.ndarray:
    """``images_{f}`` of a uint8 image: the loaders' own area filter, so a shipped copy is
    byte for byte what ``datasets.ensure_downsampled`` would make."""
    from mipnerf360 import datasets

    return datasets.downsample_image(img, factor)


def _colmap_points(scene, c2w, intr, width, height, distances, rng, per_view=48):
    """Surface points seen by the cameras: xyz [M, 3], rgb [M, 3] uint8, visibility [N, M]
    and projections [N, M, 2] (COLMAP pixel coordinates)."""
    n = len(c2w)
    vi = np.repeat(np.arange(n), per_view)
    px = rng.uniform(0, width, n * per_view)
    py = rng.uniform(0, height, n * per_view)
    fx, fy, cx, cy = intr[vi, :4].T
    xn, yn = (px - cx) / fx, (py - cy) / fy
    if intr.shape[1] > 4:
        xn, yn = undistort(xn, yn, *intr[vi, 4:8].T)
    d_cam = np.stack([xn, yn, np.ones_like(px)], -1)
    d = np.einsum("nij,nj->ni", c2w[vi, :, :3], d_cam)
    r = scene.cast(c2w[vi, :, 3], d)
    keep = r["hit"]
    xyz = r["points"][keep]
    rgb = io.to_uint8(r["rgb"][keep])
    # project every point into every camera (OpenCV): x_cam = R^T (x - c)
    rel = xyz[None] - c2w[:, None, :, 3]  # [N, M, 3]
    cam = np.einsum("nji,nmj->nmi", c2w[:, :, :3], rel)
    z = cam[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        xn, yn = cam[..., 0] / z, cam[..., 1] / z
        if intr.shape[1] > 4:
            xn, yn = distort(xn, yn, *(intr[:, None, k] for k in range(4, 8)))
        u = intr[:, None, 0] * xn + intr[:, None, 2]
        v = intr[:, None, 1] * yn + intr[:, None, 3]
    inside = (z > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    ui = np.clip(np.floor(np.nan_to_num(u)), 0, width - 1).astype(int)
    vj = np.clip(np.floor(np.nan_to_num(v)), 0, height - 1).astype(int)
    dist_map = distances[np.arange(n)[:, None], vj, ui]  # [N, M]
    dist = np.linalg.norm(rel, axis=-1)
    visible = inside & (np.abs(dist - dist_map) < 0.02 * dist + 0.02)
    seen = visible.any(0)  # drop points no camera sees at a pixel centre's depth
    uv = np.stack([u, v], -1)
    return xyz[seen], rgb[seen], visible[:, seen], uv[:, seen], z[:, seen]


def _write_colmap(out: Path, names, c2w, intr, width, height, xyz, rgb, visible, uv, shared):
    from mipnerf360 import colmap

    cameras, images, points = {}, {}, {}
    model = "OPENCV" if intr.shape[1] == 8 else "PINHOLE"
    if shared:
        cameras[1] = colmap.Camera(1, model, width, height, intr[0].copy())
    # COLMAP numbers images in its own order; use a fixed permutation of the names
    order = np.argsort([hash_name(nm) for nm in names], kind="stable")
    image_ids = np.empty(len(names), np.int64)
    image_ids[order] = np.arange(1, len(names) + 1)
    # observations: (view i, point p) pairs, keypoint index k = rank of p within view i
    obs_i, obs_p = np.nonzero(visible)  # row-major: grouped by view, points ascending
    counts = visible.sum(1)
    obs_k = np.arange(len(obs_i)) - np.repeat(np.cumsum(counts) - counts, counts)
    starts = np.concatenate([[0], np.cumsum(counts)])
    for i in order:  # one record per image
        image_id = int(image_ids[i])
        cam_id = 1 if shared else image_id
        if not shared:
            cameras[cam_id] = colmap.Camera(cam_id, model, width, height, intr[i].copy())
        w2c_r = c2w[i, :, :3].T
        w2c_t = -w2c_r @ c2w[i, :, 3]
        pts = obs_p[starts[i] : starts[i + 1]]
        images[image_id] = colmap.Image(
            image_id,
            colmap.rotmat2qvec(w2c_r),
            w2c_t,
            cam_id,
            names[i],
            uv[i, pts],
            pts.astype(np.int64) + 1,
        )
    by_point = np.argsort(obs_p, kind="stable")
    track_ends = np.cumsum(np.bincount(obs_p, minlength=len(xyz)))
    track_img = np.split(image_ids[obs_i[by_point]], track_ends[:-1])
    track_k = np.split(obs_k[by_point], track_ends[:-1])
    for p in range(len(xyz)):  # one record per point
        points[p + 1] = colmap.Point3D(p + 1, xyz[p], rgb[p], 0.5, track_img[p], track_k[p])
    colmap.write_model(cameras, images, points, out / "sparse" / "0", ext=".bin")


def hash_name(name: str) -> int:
    """A deterministic pseudo-random key of an image name (for COLMAP's image order)."""
    h = 2166136261
    for ch in name.encode():
        h = ((h ^ ch) * 16777619) % 2**32
    return h


def poses_bounds(c2w: np.ndarray, intr: np.ndarray, height: int, width: int, visible, z):
    """LLFF ``poses_bounds.npy`` rows [N, 17]: the 3x5 [R | t | hwf] camera-to-world with
    rotation columns (down, right, backwards), flattened row-major, then near and far (the 0.1
    and 99.9 percentiles of the depths of the points each camera sees; LLFF imgs2poses)."""
    rot = np.stack([c2w[:, :, 1], c2w[:, :, 0], -c2w[:, :, 2]], -1)  # OpenCV r,d,f -> d,r,b
    hwf = np.stack([np.full(len(c2w), height), np.full(len(c2w), width), intr[:, 0]], -1)
    mats = np.concatenate([rot, c2w[:, :, 3:], hwf[:, :, None]], -1)  # [N, 3, 5]
    zs = np.where(visible, z, np.nan)
    if np.any(np.all(np.isnan(zs), axis=1)):
        raise UserError(
            "generate: a camera sees none of the sampled surface points (no near/far bounds "
            "for poses_bounds.npy); use larger images"
        )
    bounds = np.stack([np.nanpercentile(zs, 0.1, axis=1), np.nanpercentile(zs, 99.9, axis=1)], -1)
    return np.concatenate([mats.reshape(-1, 15), bounds], -1)


def generate(
    out_dir,
    kind: str = "360",
    n_views: int | None = None,
    width: int | None = None,
    height: int | None = None,
    seed: int = 0,
    factors=(2, 4),
    supersample: int = 2,
    per_image_intrinsics: bool = True,
    overwrite: bool = False,
    distortion: bool = False,
) -> str:
    """Render a procedural scene and write it in the ``kind`` layout into ``out_dir``.

    Args:
      out_dir: target folder; must not exist or be empty (or ``overwrite``). The scene is
        built in a temporary sibling folder and renamed into place when complete.
      kind: '360', 'llff' or 'blender'.
      n_views: number of images ('blender': training views; val and test get
        max(1, n_views // 8) views each). Default per kind, see ``DEFAULTS``.
      width, height: full-resolution image size.
      seed: colours, textures and camera jitter; same arguments -> same bytes.
      factors: downsampled copies ``images_{f}`` ('360' and 'llff').
      supersample: s -> s x s rays per pixel.
      per_image_intrinsics: '360' only: one camera per image with focal lengths varying by
        up to +-3 % (like real captures); False -> one shared camera.
      distortion: '360' and 'llff': render through a lens with OpenCV radial-tangential
        distortion (``DISTORTION``) and write OPENCV cameras instead of PINHOLE ones (the
        LLFF ``poses_bounds.npy`` cannot describe it; its loader takes sparse/0's cameras).
    Returns:
      ``out_dir`` as a string.
    """
    _check_kind(kind)
    dn, dw, dh = DEFAULTS[kind]
    n_views = dn if n_views is None else int(n_views)
    width = dw if width is None else int(width)
    height = dh if height is None else int(height)
    min_views = 1 if kind == "blender" else 2  # 360/llff: every 8th view is a test view
    if n_views < min_views:
        raise ConfigError(
            f"views: need at least {min_views} for a {kind!r} scene (one to train on, one to "
            f"test), got {n_views}"
        )
    if width < 8 or height < 8:
        raise ConfigError(f"width, height: images must be at least 8x8, got {width}x{height}")
    if int(supersample) < 1:
        raise ConfigError(f"supersample: must be >= 1 (rays per pixel side), got {supersample}")
    if int(seed) < 0:
        raise ConfigError(f"seed: must be >= 0, got {seed}")
    factors = tuple(int(f) for f in factors)
    if any(f < 2 or f > min(width, height) for f in factors):
        raise ConfigError(
            f"factors: downsampling factors must be between 2 and the image size "
            f"{min(width, height)}, got {factors}"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    with io.atomic_dir(out) as tmp:
        if kind == "blender":
            _generate_blender(tmp, n_views, width, height, seed, supersample)
        else:
            _generate_colmap(
                tmp,
                kind,
                n_views,
                width,
                height,
                seed,
                factors,
                supersample,
                shared=(kind == "llff" or not per_image_intrinsics),
                distortion=distortion,
            )
    return str(out)


def _generate_colmap(
    out, kind, n, width, height, seed, factors, supersample, shared, distortion=False
):
    scene = make_scene(kind, seed)
    rng = np.random.default_rng([seed, 11])
    c2w, intr = _cameras(kind, n, width, height, rng)
    if shared:
        intr[:] = intr[0]
    if distortion:
        intr = np.concatenate([intr, np.broadcast_to(DISTORTION, (n, 4))], -1)
    names = [f"img_{i:03d}.png" for i in range(n)]
    distances = np.empty((n, height, width))
    for i in range(n):  # one view at a time keeps memory small
        rgb, _, distances[i] = render_view(scene, c2w[i], intr[i], width, height, supersample)
        img = io.to_uint8(rgb)
        io.write_png(out / "images" / names[i], img)
        for f in factors:
            io.write_png(out / f"images_{f}" / names[i], _downsample_u8(img, f))
    xyz, prgb, visible, uv, z = _colmap_points(scene, c2w, intr, width, height, distances, rng)
    _write_colmap(out, names, c2w, intr, width, height, xyz, prgb, visible, uv, shared)
    io.write_npy(out / "poses_bounds.npy", poses_bounds(c2w, intr, height, width, visible, z))
    split = np.where(np.arange(n) % 8 == 0, "test", "train")  # sorted names, llffhold 8
    _save_gt(out, kind, seed, names, c2w, intr, distances, split, width, height)


def _generate_blender(out, n_train, width, height, seed, supersample):
    scene = make_scene("blender", seed)
    rng = np.random.default_rng([seed, 13])
    n_other = max(1, n_train // 8)
    counts = {"train": n_train, "val": n_other, "test": n_other}
    c2w, intr = _cameras("blender", sum(counts.values()), width, height, rng)
    fx = intr[0, 0]
    camera_angle_x = 2 * np.arctan(0.5 * width / fx)
    names, split, distances = [], [], []
    i = 0
    for s, count in counts.items():
        frames = []
        for k in range(count):
            rgb, alpha, dist = render_view(scene, c2w[i], intr[i], width, height, supersample)
            rgba = np.concatenate([rgb, alpha[..., None]], -1)
            io.write_png(out / s / f"r_{k}.png", io.to_uint8(rgba))
            gl = np.concatenate([opencv_to_opengl(c2w[i]), [[0.0, 0.0, 0.0, 1.0]]], 0)
            frames.append(
                {"file_path": f"./{s}/r_{k}", "rotation": 0.0, "transform_matrix": gl.tolist()}
            )
            names.append(f"{s}/r_{k}.png")
            split.append(s)
            distances.append(dist)
            i += 1
        doc = {"camera_angle_x": float(camera_angle_x), "frames": frames}
        io.write_json(out / f"transforms_{s}.json", doc)
    _save_gt(
        out,
        "blender",
        seed,
        names,
        c2w,
        intr,
        np.stack(distances),
        np.array(split),
        width,
        height,
    )


def _save_gt(out, kind, seed, names, c2w, intr, distances, split, width, height):
    buf = bytes_io.BytesIO()
    np.savez_compressed(
        buf,
        kind=np.array(kind),
        seed=np.array(seed),
        names=np.array(names),
        c2w_opencv=c2w,
        intrinsics=intr,
        distance=distances.astype(np.float32),
        split=np.array(split),
        width=np.array(width),
        height=np.array(height),
    )
    io.write_bytes(out / GT_FILE, buf.getvalue())


def load_ground_truth(scene_dir) -> dict:
    """What :func:`generate` rendered: 'kind', 'seed', 'names' [N] (relative image paths),
    'c2w_opencv' [N, 3, 4], 'intrinsics' [N, 4] (fx, fy, cx, cy at full resolution) or
    [N, 8] (+ k1, k2, p1, p2 with ``distortion``),
    'distance' [N, H, W] (pixel-centre ray to the first hit, inf where none), 'split' [N],
    'width', 'height'."""
    path = Path(scene_dir) / GT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ground truth (not a generated scene?)")
    with np.load(path) as z:
        gt = {k: z[k] for k in z.files}
    for k in ("kind", "seed", "width", "height"):
        gt[k] = gt[k].item()
    return gt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="mipnerf360 generate",
        description="Write a procedural scene in a real data set's layout.",
    )
    p.add_argument("kind", choices=KINDS, help="data set layout")
    p.add_argument("out_dir", help="output folder (must not exist or be empty)")
    p.add_argument("--views", type=int, default=None, help="number of (training) views")
    p.add_argument("--width", type=int, default=None, help="full-resolution width")
    p.add_argument("--height", type=int, default=None, help="full-resolution height")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--factors", default="2,4", help="downsampled copies images_N (360, llff)")
    p.add_argument("--supersample", type=int, default=2, help="rays per pixel side")
    p.add_argument(
        "--shared-camera",
        action="store_true",
        help="360: one shared camera instead of per-image intrinsics",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    p.add_argument("--distortion", action="store_true", help="360/llff: OPENCV lens distortion")
    a = p.parse_args(argv)
    try:
        factors = tuple(int(f) for f in a.factors.split(",") if f.strip())
    except ValueError:
        raise ConfigError(f"--factors: expected integers like 2,4, got {a.factors!r}") from None
    out = generate(
        a.out_dir,
        a.kind,
        a.views,
        a.width,
        a.height,
        a.seed,
        factors,
        a.supersample,
        per_image_intrinsics=not a.shared_camera,
        overwrite=a.overwrite,
        distortion=a.distortion,
    )
    print(out)
    return 0
