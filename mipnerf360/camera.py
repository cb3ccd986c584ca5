"""Cameras, poses, rays and render paths (multinerf ``internal/camera_utils.py`` counterparts).

Formulas follow multinerf ``internal/camera_utils.py`` (pose normalisation, ray generation,
render paths; each function names its counterpart); the code is our own. Golden checks
against multinerf's outputs are in tests/test_camera.py.

Conventions: poses are camera-to-world ``[..., 3, 4]`` matrices with OpenGL camera axes
(x right, y up, z backward). ``pixtocam`` is the inverse intrinsic matrix (pixels ->
OpenCV camera coordinates at z = 1). Ray directions are NOT normalised: their camera-space
z component is -1, so the ray parameter ``t`` is camera depth.

The ray functions (``pixels_to_rays``, ``convert_to_ndc``) take ``xnp=np`` (float64
parity with the reference) or ``xnp=torch`` (batched on any device, per-ray cameras);
everything else is numpy float64.
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = [
    "DISTORTION_KEYS",
    "ProjectionType",
    "average_pose",
    "convert_to_ndc",
    "focus_point_fn",
    "generate_ellipse_path",
    "generate_orbit_path",
    "generate_spiral_path",
    "get_pixtocam",
    "intrinsic_matrix",
    "normalize",
    "pad_poses",
    "pixel_coordinates",
    "pixels_to_rays",
    "recenter_poses",
    "transform_poses_pca",
    "unpad_poses",
    "viewmatrix",
]

# Order of the distortion coefficients when they are stored as an array [..., 6].
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


class ProjectionType(str, enum.Enum):
    PERSPECTIVE = "perspective"
    FISHEYE = "fisheye"


# ---------------------------------------------------------------------------
# Intrinsics


def intrinsic_matrix(fx, fy, cx, cy) -> np.ndarray:
    """Intrinsic matrix K [3,3] (pixel = K @ camera point, OpenCV axes)."""
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])


def get_pixtocam(focal, width, height) -> np.ndarray:
    """Inverse intrinsics [3,3] of an ideal pinhole with the principal point at the centre."""
    return np.linalg.inv(intrinsic_matrix(focal, focal, width * 0.5, height * 0.5))


def pixel_coordinates(width: int, height: int, xnp=np):
    """Integer pixel grids (x = column, y = row), each [height, width]."""
    if xnp is np:
        return np.meshgrid(np.arange(width), np.arange(height), indexing="xy")
    x = xnp.arange(width).view(1, width).expand(height, width)
    y = xnp.arange(height).view(height, 1).expand(height, width)
    return x, y


# ---------------------------------------------------------------------------
# Rays


def _matvec(A, b, xnp):
    """A [..., 3, 3] times b [..., 3], written out elementwise.

    Element-wise products avoid reductions over tiny axes (slow on CPU in torch) and
    TF32 matmuls on GPUs (which would cost ray precision).
    """
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    rows = [A[..., i, 0] * b0 + A[..., i, 1] * b1 + A[..., i, 2] * b2 for i in range(3)]
    return xnp.stack(rows, -1)


def _norm(x, xnp):
    x0, x1, x2 = x[..., 0], x[..., 1], x[..., 2]
    return xnp.sqrt(x0 * x0 + x1 * x1 + x2 * x2)


def _distortion_dict(distortion_params, xnp):
    if distortion_params is None:
        return None
    if isinstance(distortion_params, dict):
        unknown = set(distortion_params) - set(DISTORTION_KEYS)
        if unknown:
            raise ValueError(f"unknown distortion coefficients {sorted(unknown)}")
        return dict(distortion_params)
    # array [..., 6] in DISTORTION_KEYS order
    if distortion_params.shape[-1] != len(DISTORTION_KEYS):
        raise ValueError(f"distortion array must end in {len(DISTORTION_KEYS)} coefficients")
    return {k: distortion_params[..., i] for i, k in enumerate(DISTORTION_KEYS)}


def _compute_residual_and_jacobian(x, y, xd, yd, k1=0.0, k2=0.0, k3=0.0, k4=0.0, p1=0.0, p2=0.0):
    """Residual of the radial-tangential model and its Jacobian (multinerf
    ``camera_utils._compute_residual_and_jacobian``).

    x_d = x (1 + k1 r + k2 r^2 + k3 r^3 + k4 r^4) + 2 p1 x y + p2 (r + 2 x^2), r = x^2 + y^2,
    and symmetrically for y with p1/p2 swapped.
    """
    r = x * x + y * y
    d = 1.0 + r * (k1 + r * (k2 + r * (k3 + r * k4)))
    fx = d * x + 2 * p1 * x * y + p2 * (r + 2 * x * x) - xd
    fy = d * y + 2 * p2 * x * y + p1 * (r + 2 * y * y) - yd
    d_r = k1 + r * (2.0 * k2 + r * (3.0 * k3 + r * 4.0 * k4))
    d_x = 2.0 * x * d_r
    d_y = 2.0 * y * d_r
    fx_x = d + d_x * x + 2.0 * p1 * y + 6.0 * p2 * x
    fx_y = d_y * x + 2.0 * p1 * x + 2.0 * p2 * y
    fy_x = d_x * y + 2.0 * p2 * y + 2.0 * p1 * x
    fy_y = d + d_y * y + 2.0 * p2 * x + 6.0 * p1 * y
    return fx, fy, fx_x, fx_y, fy_x, fy_y


def _radial_and_tangential_undistort(xd, yd, eps=1e-9, max_iterations=10, xnp=np, **coeffs):
    """Invert the distortion model by 10 Newton steps from the distorted point (vectorised)."""
    x, y = xd, yd
    for _ in range(max_iterations):  # fixed iteration count, all rays at once
        fx, fy, fx_x, fx_y, fy_x, fy_y = _compute_residual_and_jacobian(x, y, xd, yd, **coeffs)
        denominator = fy_x * fx_y - fx_x * fy_y
        x_numerator = fx * fy_y - fy * fx_y
        y_numerator = fy * fx_x - fx * fy_x
        ok = xnp.abs(denominator) > eps
        safe = xnp.where(ok, denominator, xnp.ones_like(denominator))
        x = x + xnp.where(ok, x_numerator / safe, xnp.zeros_like(denominator))
        y = y + xnp.where(ok, y_numerator / safe, xnp.zeros_like(denominator))
    return x, y


def convert_to_ndc(origins, directions, pixtocam, near: float = 1.0, xnp=np):
    """Rays [..., 3] -> NDC rays (forward-facing scenes; multinerf ``camera_utils.convert_to_ndc``).

    Origins are first moved to the plane z = -near; pixtocam [3,3] or [..., 3, 3].
    Returns (origins_ndc, directions_ndc), each [..., 3].
    """
    t = -(near + origins[..., 2]) / directions[..., 2]
    origins = origins + t[..., None] * directions
    dx, dy, dz = directions[..., 0], directions[..., 1], directions[..., 2]
    ox, oy, oz = origins[..., 0], origins[..., 1], origins[..., 2]
    xmult = 1.0 / pixtocam[..., 0, 2]  # = -2 focal / W for a centred principal point
    ymult = 1.0 / pixtocam[..., 1, 2]
    origins_ndc = xnp.stack([xmult * ox / oz, ymult * oy / oz, -xnp.ones_like(oz)], -1)
    infinity_ndc = xnp.stack([xmult * dx / dz, ymult * dy / dz, xnp.ones_like(oz)], -1)
    return origins_ndc, infinity_ndc - origins_ndc


def pixels_to_rays(
    pix_x_int,
    pix_y_int,
    pixtocams,
    camtoworlds,
    distortion_params=None,
    pixtocam_ndc=None,
    camtype="perspective",
    xnp=np,
):
    """Rays through pixel centres (multinerf ``camera_utils.pixels_to_rays``).

    Args:
      pix_x_int, pix_y_int: integer pixel columns / rows, shape [...].
      pixtocams: inverse intrinsics [..., 3, 3] (broadcast against the pixels).
      camtoworlds: camera-to-world [..., 3, 4] (OpenGL axes).
      distortion_params: None, a dict with keys among k1..k4, p1, p2 (scalars or [...]
        arrays), or an array [..., 6] in DISTORTION_KEYS order.
      pixtocam_ndc: None or the [3,3] (or [..., 3, 3]) inverse intrinsics defining NDC.
      camtype: 'perspective' or 'fisheye'.
      xnp: numpy or torch.

    Returns (origins [...,3], directions [...,3] (unnormalised), viewdirs [...,3],
    radii [...,1], imageplane [...,2]).
    """
    if xnp is np:
        px = np.asarray(pix_x_int) + 0.5
        py = np.asarray(pix_y_int) + 0.5
    else:
        px = pix_x_int.to(pixtocams.dtype) + 0.5
        py = pix_y_int.to(pixtocams.dtype) + 0.5
    one = xnp.ones_like(px)
    # Centre ray and its +x / +y neighbours, stacked on a new leading axis.
    pixel_dirs = xnp.stack(
        [
            xnp.stack([px, py, one], -1),
            xnp.stack([px + 1, py, one], -1),
            xnp.stack([px, py + 1, one], -1),
        ],
        0,
    )
    cam_dirs = _matvec(pixtocams, pixel_dirs, xnp)

    coeffs = _distortion_dict(distortion_params, xnp)
    if coeffs is not None:
        x, y = _radial_and_tangential_undistort(
            cam_dirs[..., 0], cam_dirs[..., 1], xnp=xnp, **coeffs
        )
        cam_dirs = xnp.stack([x, y, xnp.ones_like(x)], -1)

    if ProjectionType(camtype) == ProjectionType.FISHEYE:
        theta = xnp.sqrt(cam_dirs[..., 0] ** 2 + cam_dirs[..., 1] ** 2)
        theta = xnp.clamp(theta, max=np.pi) if xnp is not np else np.minimum(np.pi, theta)
        safe = xnp.where(theta > 0, theta, xnp.ones_like(theta))
        s = xnp.where(theta > 0, xnp.sin(theta) / safe, xnp.ones_like(theta))
        cam_dirs = xnp.stack([cam_dirs[..., 0] * s, cam_dirs[..., 1] * s, xnp.cos(theta)], -1)

    # OpenCV -> OpenGL camera axes.
    cam_dirs = xnp.stack([cam_dirs[..., 0], -cam_dirs[..., 1], -cam_dirs[..., 2]], -1)
    imageplane = cam_dirs[0, ..., :2]

    directions, dx, dy = _matvec(camtoworlds[..., :3, :3], cam_dirs, xnp)
    origins = camtoworlds[..., :3, -1]
    if xnp is np:
        origins = np.broadcast_to(origins, directions.shape)
    else:
        origins = origins.expand(directions.shape)
    viewdirs = directions / _norm(directions, xnp)[..., None]

    if pixtocam_ndc is None:
        dx_norm = _norm(dx - directions, xnp)
        dy_norm = _norm(dy - directions, xnp)
    else:
        origins_dx, _ = convert_to_ndc(origins, dx, pixtocam_ndc, xnp=xnp)
        origins_dy, _ = convert_to_ndc(origins, dy, pixtocam_ndc, xnp=xnp)
        origins, directions = convert_to_ndc(origins, directions, pixtocam_ndc, xnp=xnp)
        dx_norm = _norm(origins_dx - origins, xnp)
        dy_norm = _norm(origins_dy - origins, xnp)

    # Half the mean neighbour distance, scaled to the std of a 1-pixel box (mip-NeRF).
    radii = (0.5 * (dx_norm + dy_norm))[..., None] * 2 / np.sqrt(12)
    return origins, directions, viewdirs, radii, imageplane


# ---------------------------------------------------------------------------
# Poses


def pad_poses(p: np.ndarray) -> np.ndarray:
    """[..., 3, 4] -> [..., 4, 4] with the homogeneous row [0, 0, 0, 1]."""
    bottom = np.broadcast_to([0, 0, 0, 1.0], p[..., :1, :4].shape)
    return np.concatenate([p[..., :3, :4], bottom], axis=-2)


def unpad_poses(p: np.ndarray) -> np.ndarray:
    return p[..., :3, :4]


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x)


def viewmatrix(lookdir, up, position) -> np.ndarray:
    """Camera-to-world [3,4] whose z axis is ``lookdir`` (camera looks along -lookdir)."""
    vec2 = normalize(lookdir)
    vec0 = normalize(np.cross(up, vec2))
    vec1 = normalize(np.cross(vec2, vec0))
    return np.stack([vec0, vec1, vec2, position], axis=1)


def average_pose(poses: np.ndarray) -> np.ndarray:
    """viewmatrix(mean z axis, mean y axis, mean position) of poses [N,3,4] -> [3,4]."""
    position = poses[:, :3, 3].mean(0)
    z_axis = poses[:, :3, 2].mean(0)
    up = poses[:, :3, 1].mean(0)
    return viewmatrix(z_axis, up, position)


def recenter_poses(poses: np.ndarray):
    """Express poses [N,3,4] in the frame of their average pose.

    Returns (poses [N,3,4], transform [4,4]) with new = transform @ old.
    """
    cam2world = average_pose(poses)
    transform = np.linalg.inv(pad_poses(cam2world))
    return unpad_poses(transform @ pad_poses(poses)), transform


def focus_point_fn(poses: np.ndarray) -> np.ndarray:
    """Least-squares point [3] nearest to all optical axes of poses [N,3,4]."""
    directions, origins = poses[:, :3, 2:3], poses[:, :3, 3:4]
    m = np.eye(3) - directions * np.transpose(directions, [0, 2, 1])
    mt_m = np.transpose(m, [0, 2, 1]) @ m
    return np.linalg.inv(mt_m.mean(0)) @ (mt_m @ origins).mean(0)[:, 0]


def transform_poses_pca(poses: np.ndarray):
    """Align poses [N,3,4] with the principal axes of the camera centres (multinerf
    ``camera_utils.transform_poses_pca``).

    Returns (poses [N,3,4], transform [4,4]); camera centres end up in [-1, 1]^3, the
    largest principal direction along x and the mean camera up along +z.
    """
    t = poses[:, :3, 3]
    t_mean = t.mean(axis=0)
    t = t - t_mean
    eigval, eigvec = np.linalg.eig(t.T @ t)
    inds = np.argsort(eigval)[::-1]
    rot = eigvec[:, inds].T
    if np.linalg.det(rot) < 0:
        rot = np.diag(np.array([1, 1, -1])) @ rot
    transform = np.concatenate([rot, rot @ -t_mean[:, None]], -1)
    poses_recentered = unpad_poses(transform @ pad_poses(poses))
    transform = np.concatenate([transform, np.eye(4)[3:]], axis=0)
    if poses_recentered.mean(axis=0)[2, 1] < 0:
        poses_recentered = np.diag(np.array([1, -1, -1])) @ poses_recentered
        transform = np.diag(np.array([1, -1, -1, 1])) @ transform
    scale_factor = 1.0 / np.max(np.abs(poses_recentered[:, :3, 3]))
    poses_recentered[:, :3, 3] *= scale_factor
    transform = np.diag(np.array([scale_factor] * 3 + [1])) @ transform
    return poses_recentered, transform


# ---------------------------------------------------------------------------
# Render paths

NEAR_STRETCH = 0.9  # spiral path: fraction of the nearest bound
FAR_STRETCH = 5.0  # spiral path: multiple of the farthest bound
FOCUS_DISTANCE = 0.75  # spiral path: relative weight of the far bound in the focal depth


def generate_spiral_path(poses, bounds, n_frames=120, n_rots=2, zrate=0.5) -> np.ndarray:
    """Forward-facing spiral render path [n_frames,3,4] (``camera_utils.generate_spiral_path``)."""
    near_bound = bounds.min() * NEAR_STRETCH
    far_bound = bounds.max() * FAR_STRETCH
    focal = 1 / ((1 - FOCUS_DISTANCE) / near_bound + FOCUS_DISTANCE / far_bound)
    radii = np.percentile(np.abs(poses[:, :3, 3]), 90, 0)
    radii = np.concatenate([radii, [1.0]])
    cam2world = average_pose(poses)
    up = poses[:, :3, 1].mean(0)
    theta = np.linspace(0.0, 2.0 * np.pi * n_rots, n_frames, endpoint=False)
    t = radii * np.stack(
        [np.cos(theta), -np.sin(theta), -np.sin(theta * zrate), np.ones_like(theta)], -1
    )
    positions = t @ cam2world.T  # [n, 3]
    lookat = cam2world @ np.array([0, 0, -focal, 1.0])
    return np.stack([viewmatrix(p - lookat, up, p) for p in positions])


def _sample_uniform_f32(t: np.ndarray, w_logits: np.ndarray, num_samples: int) -> np.ndarray:
    """stepfun.sample(None, t, w_logits, n) as the reference computes it (float32, JAX).

    u = linspace(0, 1 - eps, n); piecewise-linear inverse of the CDF of softmax(w_logits).
    """
    f32 = np.float32
    eps = np.finfo(f32).eps
    t = t.astype(f32)
    w_logits = w_logits.astype(f32)
    w = np.exp(w_logits - w_logits.max())
    w = (w / w.sum()).astype(f32)
    cw = np.concatenate([[f32(0)], np.minimum(f32(1), np.cumsum(w[:-1], dtype=f32)), [f32(1)]])
    cw = cw.astype(f32)
    u = np.linspace(0, 1 - eps, num_samples, dtype=f32)
    idx = np.searchsorted(cw, u, side="right")
    i1 = np.minimum(idx, len(cw) - 1)
    i0 = np.maximum(idx - 1, 0)
    denom = np.maximum(f32(eps) ** 2, cw[i1] - cw[i0])
    offset = np.clip((u - cw[i0]) / denom, 0, 1).astype(f32)
    return (t[i0] + offset * (t[i1] - t[i0])).astype(f32)


def generate_ellipse_path(
    poses, n_frames=120, const_speed=True, z_variation=0.0, z_phase=0.0
) -> np.ndarray:
    """Elliptical inward-facing render path [n_frames,3,4] for 360 scenes
    (multinerf ``camera_utils.generate_ellipse_path``)."""
    center = focus_point_fn(poses)
    offset = np.array([center[0], center[1], 0])
    sc = np.percentile(np.abs(poses[:, :3, 3] - offset), 90, axis=0)
    low = -sc + offset
    high = sc + offset
    z_low = np.percentile(poses[:, :3, 3], 10, axis=0)
    z_high = np.percentile(poses[:, :3, 3], 90, axis=0)

    def get_positions(theta):
        return np.stack(
            [
                low[0] + (high - low)[0] * (np.cos(theta) * 0.5 + 0.5),
                low[1] + (high - low)[1] * (np.sin(theta) * 0.5 + 0.5),
                z_variation
                * (
                    z_low[2]
                    + (z_high - z_low)[2] * (np.cos(theta + 2 * np.pi * z_phase) * 0.5 + 0.5)
                ),
            ],
            -1,
        )

    theta = np.linspace(0, 2.0 * np.pi, n_frames + 1, endpoint=True)
    positions = get_positions(theta)
    if const_speed:
        # Resample theta so that the frames are equally spaced along the ellipse.
        lengths = np.linalg.norm(positions[1:] - positions[:-1], axis=-1)
        theta = _sample_uniform_f32(theta, np.log(lengths), n_frames + 1)
        # The reference evaluates this on JAX's float32 theta (numpy keeps float32 in the
        # cos/sin terms); doing the same reproduces its frames to float64 round-off.
        positions = get_positions(theta)
    positions = positions[:-1]

    avg_up = poses[:, :3, 1].mean(0)
    avg_up = avg_up / np.linalg.norm(avg_up)
    ind_up = np.argmax(np.abs(avg_up))
    up = np.eye(3)[ind_up] * np.sign(avg_up[ind_up])
    return np.stack([viewmatrix(p - center, up, p) for p in positions])


def generate_orbit_path(poses, n_frames=120, center=None) -> np.ndarray:
    """Circular render path [n_frames,3,4] for object-centred (Blender) scenes.

    Cameras orbit the world z axis through ``center`` (default: the origin, where the
    Blender objects sit) at the mean radius and height of ``poses``, looking at the centre.
    Not in the reference (which renders Blender scenes from their test poses).
    """
    center = np.zeros(3) if center is None else np.asarray(center, np.float64)
    rel = poses[:, :3, 3] - center
    radius = np.linalg.norm(rel[:, :2], axis=-1).mean()
    height = rel[:, 2].mean()
    theta = np.linspace(0.0, 2.0 * np.pi, n_frames, endpoint=False)
    positions = center + np.stack(
        [radius * np.cos(theta), radius * np.sin(theta), np.full_like(theta, height)], -1
    )
    up = np.array([0.0, 0.0, 1.0])
    return np.stack([viewmatrix(p - center, up, p) for p in positions])
