"""camera.py: parity with multinerf's camera_utils golden vectors, torch path, properties."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mipnerf360 import camera

GOLDEN = Path(__file__).parent / "golden"
RAY_KEYS = ("origins", "directions", "viewdirs", "radii", "imageplane")


def _golden(name):
    return np.load(GOLDEN / f"{name}.npz")


def _ray_cases(d):
    k = dict(zip(["k1", "k2", "k3", "p1", "p2"], d["in_distortion_k1_k2_k3_p1_p2"], strict=True))
    pin = d["in_pixtocam_pinhole"]
    return {
        "pinhole": (pin, d["in_camtoworld"], None, None),
        "opencv": (d["in_pixtocam_opencv_factor4"], d["in_camtoworld"], k, None),
        "ndc": (pin, d["in_camtoworld_ndc"], None, pin),
    }


@pytest.mark.parametrize("case", ["pinhole", "opencv", "ndc"])
def test_pixels_to_rays_golden_numpy(case):
    d = _golden("camera_pixels_to_rays")
    pixtocam, c2w, dist, ndc = _ray_cases(d)[case]
    np.testing.assert_allclose(
        camera.get_pixtocam(7.5, 8, 6), d["in_pixtocam_pinhole"], rtol=0, atol=1e-15
    )
    out = camera.pixels_to_rays(d["in_pix_x"], d["in_pix_y"], pixtocam, c2w, dist, ndc)
    for key, val in zip(RAY_KEYS, out, strict=True):
        ref = d[f"out_{key}_{case}"]
        assert val.shape == ref.shape and val.dtype == np.float64, key
        np.testing.assert_allclose(val, ref, rtol=0, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("case", ["pinhole", "opencv", "ndc"])
def test_pixels_to_rays_golden_torch(case):
    d = _golden("camera_pixels_to_rays")
    pixtocam, c2w, dist, ndc = _ray_cases(d)[case]

    def t(a):
        return None if a is None else torch.as_tensor(a, dtype=torch.float32)

    dist_t = None if dist is None else {k: t(v) for k, v in dist.items()}
    out = camera.pixels_to_rays(
        torch.as_tensor(d["in_pix_x"]),
        torch.as_tensor(d["in_pix_y"]),
        t(pixtocam),
        t(c2w),
        dist_t,
        t(ndc),
        xnp=torch,
    )
    for key, val in zip(RAY_KEYS, out, strict=True):
        assert val.dtype == torch.float32, key
        np.testing.assert_allclose(val.numpy(), d[f"out_{key}_{case}"], rtol=1e-5, atol=1e-6)


def test_per_ray_cameras_torch_batch():
    """A torch batch mixing cameras (intrinsics, distortion, poses) = per-camera numpy."""
    rng = np.random.default_rng(0)
    n_cam, n = 4, 256
    pixtocams = np.stack(
        [np.linalg.inv(camera.intrinsic_matrix(f, f * 1.1, 20, 15)) for f in (30, 35, 40, 45)]
    )
    c2ws = np.stack([camera.viewmatrix(rng.normal(size=3), [0, 0, 1], rng.normal(size=3))
                     for _ in range(n_cam)])  # fmt: skip
    dist = rng.normal(scale=0.02, size=(n_cam, 6))
    dist[0] = 0  # a pinhole camera among distorted ones
    cam = rng.integers(0, n_cam, size=n)
    px, py = rng.integers(0, 40, size=n), rng.integers(0, 30, size=n)
    out_t = camera.pixels_to_rays(
        torch.as_tensor(px),
        torch.as_tensor(py),
        torch.as_tensor(pixtocams[cam]),
        torch.as_tensor(c2ws[cam]),
        torch.as_tensor(dist[cam]),
        xnp=torch,
    )
    for c in range(n_cam):
        m = cam == c
        coeffs = dict(zip(camera.DISTORTION_KEYS, dist[c], strict=True))
        ref = camera.pixels_to_rays(px[m], py[m], pixtocams[c], c2ws[c], coeffs)
        for a, b in zip(out_t, ref, strict=True):
            np.testing.assert_allclose(a.numpy()[m], b, rtol=0, atol=1e-12)


def test_undistortion_inverts_distortion():
    k = dict(k1=0.05, k2=-0.01, k3=0.003, k4=0.0, p1=0.002, p2=-0.001)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-0.6, 0.6, size=(2, 1000))
    fx, fy, *_ = camera._compute_residual_and_jacobian(x, y, 0.0, 0.0, **k)  # distorted point
    ux, uy = camera._radial_and_tangential_undistort(fx, fy, **k)
    np.testing.assert_allclose(ux, x, atol=1e-12)
    np.testing.assert_allclose(uy, y, atol=1e-12)


def test_pinhole_radii_and_depth():
    f = 50.0
    pixtocam = camera.get_pixtocam(f, 64, 48)
    x, y = camera.pixel_coordinates(64, 48)
    o, d, v, r, _ = camera.pixels_to_rays(x, y, pixtocam, np.eye(4)[:3])
    np.testing.assert_allclose(d[..., 2], -1)  # t = camera depth
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1)
    np.testing.assert_allclose(r[32, 24, 0], 1 / (f * np.sqrt(3)), rtol=1e-6)


def test_fisheye_centre_and_angle():
    pixtocam = np.linalg.inv(camera.intrinsic_matrix(10.0, 10.0, 4.5, 4.5))
    # pixel (14.5, 4.5) centre -> 1.0 rad off axis in the equidistant fisheye model
    _, d, v, _, _ = camera.pixels_to_rays(
        np.array([4, 14]), np.array([4, 4]), pixtocam, np.eye(4)[:3], camtype="fisheye"
    )
    np.testing.assert_allclose(v[0], [0, 0, -1], atol=1e-12)
    np.testing.assert_allclose(np.arccos(-v[1, 2]), 1.0, atol=1e-12)


def test_transform_poses_pca_golden():
    d = _golden("camera_transform_poses_pca")
    poses, transform = camera.transform_poses_pca(d["in_poses"].copy())
    np.testing.assert_allclose(poses, d["out_poses"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(transform, d["out_transform"], rtol=0, atol=1e-12)
    assert np.abs(poses[:, :3, 3]).max() == pytest.approx(1.0)


def test_recenter_poses_golden():
    d = _golden("camera_recenter_poses")
    poses = d["in_poses"].copy()
    scale = 1.0 / (d["in_bounds"].min() * 0.75)
    assert scale == pytest.approx(float(d["in_scale"]), rel=1e-15)
    poses[:, :3, 3] *= scale
    np.testing.assert_allclose(poses, d["in_poses_scaled"], rtol=0, atol=1e-13)
    out, transform = camera.recenter_poses(poses)
    np.testing.assert_allclose(out, d["out_poses"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(transform, d["out_transform"], rtol=0, atol=1e-12)


def test_spiral_path_golden():
    d = _golden("camera_generate_spiral_path")
    out = camera.generate_spiral_path(d["in_poses"], d["in_bounds"], n_frames=30)
    np.testing.assert_allclose(out, d["out_render_poses"], rtol=0, atol=1e-12)


def test_ellipse_path_golden():
    d = _golden("camera_generate_ellipse_path")
    poses = d["in_poses"]
    np.testing.assert_allclose(
        camera.focus_point_fn(poses), d["out_focus_point"], rtol=0, atol=1e-12
    )
    for zvar in (0.0, 0.5):
        out = camera.generate_ellipse_path(
            poses, int(d["in_n_frames"]), True, zvar, float(d["in_z_phase"])
        )
        # The reference resamples theta in float32 (JAX): agreement is at float32 level.
        np.testing.assert_allclose(out, d[f"out_render_poses_zvar{zvar}"], rtol=0, atol=2e-6)


def test_orbit_path_looks_at_centre():
    rng = np.random.default_rng(2)
    pos = rng.normal(size=(10, 3)) + [0, 0, 2]
    poses = np.stack([camera.viewmatrix(p, [0, 0, 1], p) for p in pos])
    path = camera.generate_orbit_path(poses, n_frames=16)
    assert path.shape == (16, 3, 4)
    centres = path[:, :, 3]
    np.testing.assert_allclose(centres[:, 2], pos[:, 2].mean())
    # camera z axis (backwards) points from the centre to the camera
    np.testing.assert_allclose(
        path[:, :, 2], centres / np.linalg.norm(centres, axis=-1, keepdims=True), atol=1e-12
    )
