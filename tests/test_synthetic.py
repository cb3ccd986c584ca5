"""Tests for mipnerf360.synthetic: analytic ray casting, the three layouts loading back through
mipnerf360.datasets.load_scene with cameras and images agreeing with what was rendered, and
determinism."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from mipnerf360 import cli, colmap, datasets, synthetic
from mipnerf360.configs import DataConfig
from mipnerf360.errors import UserError

H, W = 48, 64  # small full-resolution size for the tests
HALF_LSB = 0.5 / 255 + 1e-6  # 8-bit rounding


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return {
        "360": Path(synthetic.generate(root / "s360", "360", n_views=16, width=W, height=H)),
        "llff": Path(
            synthetic.generate(root / "llff", "llff", n_views=12, width=W, height=H, seed=1)
        ),
        "blender": Path(
            synthetic.generate(root / "blender", "blender", n_views=16, width=40, height=40)
        ),
    }


def _gt_index(gt, name):
    stems = [str(n).rsplit(".", 1)[0] for n in gt["names"]]
    return stems.index(str(name).rsplit(".", 1)[0])


def _pose_in_data_coords(scene, j):
    """Loaded camera j mapped back through the loader's normalisation: OpenGL c2w [3,4]."""
    T = scene.colmap_to_world_transform
    A, b = T[:3, :3], T[:3, 3]
    s = np.cbrt(np.linalg.det(A))
    Ainv = np.linalg.inv(A)
    c2w = scene.camtoworlds[j]
    return np.concatenate([Ainv @ c2w[:, :3] * s, (Ainv @ (c2w[:, 3] - b))[:, None]], 1)


def _check_loaded(scene, gt, factor, check_pixels=True):
    """Poses, intrinsics, rays and pixels of a loaded scene agree with the ground truth."""
    T = scene.colmap_to_world_transform
    Tinv = np.linalg.inv(T)
    world = synthetic.make_scene(gt["kind"], gt["seed"])
    f = max(factor, 1)
    assert (scene.height, scene.width) == (gt["height"] // f, gt["width"] // f)
    for j, name in enumerate(scene.names):
        i = _gt_index(gt, name)
        gl = synthetic.opencv_to_opengl(gt["c2w_opencv"][i])
        np.testing.assert_allclose(_pose_in_data_coords(scene, j), gl, atol=1e-9)
        K = np.linalg.inv(scene.pixtocams[j].astype(np.float64))
        intr = gt["intrinsics"][i].copy()
        intr[:4] /= f  # focal lengths and principal point scale; distortion does not
        np.testing.assert_allclose([K[0, 0], K[1, 1], K[0, 2], K[1, 2]], intr[:4], rtol=1e-6)
        # the loader's rays, mapped back to data coordinates, are the rendering camera's rays
        rays = datasets.image_rays_np(scene, j)
        o = rays["origins"] @ Tinv[:3, :3].T + Tinv[:3, 3]
        d = rays["directions"] @ Tinv[:3, :3].T
        o_gt, d_gt = synthetic.pixel_rays(gt["c2w_opencv"][i], intr, scene.width, scene.height, 1)
        np.testing.assert_allclose(o, o_gt[:, :, 0], atol=1e-9)
        d = d / np.linalg.norm(d, axis=-1, keepdims=True)
        d_gt = d_gt[:, :, 0] / np.linalg.norm(d_gt[:, :, 0], axis=-1, keepdims=True)
        np.testing.assert_allclose(d, d_gt, atol=1e-6)
        if check_pixels and j % 5 == 0:
            # re-cast the loaded rays: same surface distance as rendered (full resolution)
            if f == 1:
                hit = world.cast(o, d)
                np.testing.assert_allclose(hit["distance"], gt["distance"][i], rtol=1e-5)
            # and the loaded pixels are the rendering (8-bit rounded; area-filtered at f > 1)
            rgb, alpha, _ = synthetic.render_view(
                world, gt["c2w_opencv"][i], gt["intrinsics"][i], gt["width"], gt["height"]
            )
            if gt["kind"] == "blender":
                rgb = rgb * alpha[..., None] + (1 - alpha[..., None])  # white background
                tol = 2.5 / 255  # colour and alpha each rounded to 8 bit
            else:
                tol = HALF_LSB if f == 1 else 1.5 / 255  # twice rounded (full res, then area)
            expected = datasets.downsample_image(rgb, f) if f > 1 else rgb
            np.testing.assert_allclose(scene.images[j], expected, atol=tol)


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_360_colmap_loads_back(scenes, factor):
    path = scenes["360"]
    assert (path / "sparse" / "0" / "images.bin").is_file()
    assert (path / "images_2").is_dir() and (path / "images_4").is_dir()
    gt = synthetic.load_ground_truth(path)
    scene = datasets.load_scene(path, DataConfig(dataset_type="colmap", factor=factor))
    assert len(scene.names) == 16 and scene.names == sorted(scene.names)
    np.testing.assert_array_equal(scene.i_test, np.arange(0, 16, 8))
    assert scene.camtype == "perspective" and scene.distortion is None
    # per-image intrinsics are kept (they vary by a few percent)
    focals = 1.0 / scene.pixtocams[:, 0, 0]
    assert len(np.unique(np.round(focals, 4))) == 16 and np.ptp(focals) / focals.mean() < 0.07
    _check_loaded(scene, gt, factor)
    # PCA normalisation puts the cameras in [-1, 1]^3
    assert np.abs(scene.camtoworlds[:, :, 3]).max() <= 1 + 1e-9


def test_360_poses_bounds_agrees_with_colmap(scenes):
    path = scenes["360"]
    a = datasets.load_scene(path, DataConfig(dataset_type="colmap"))
    b = datasets.load_scene(path, DataConfig(dataset_type="llff"))
    assert a.names == b.names
    np.testing.assert_allclose(a.camtoworlds, b.camtoworlds, atol=1e-9)
    np.testing.assert_allclose(a.pixtocams, b.pixtocams, rtol=1e-6)
    np.testing.assert_array_equal(a.images, b.images)


def test_poses_bounds_layout(scenes):
    path = scenes["360"]
    gt = synthetic.load_ground_truth(path)
    pb = np.load(path / "poses_bounds.npy")
    assert pb.shape == (16, 17)
    mats = pb[:, :15].reshape(-1, 3, 5)
    c2w = gt["c2w_opencv"]  # rows of poses_bounds = images in sorted name order = gt order
    assert list(gt["names"]) == sorted(gt["names"])
    np.testing.assert_allclose(mats[:, :, 0], c2w[:, :, 1])  # down
    np.testing.assert_allclose(mats[:, :, 1], c2w[:, :, 0])  # right
    np.testing.assert_allclose(mats[:, :, 2], -c2w[:, :, 2])  # backwards
    np.testing.assert_allclose(mats[:, :, 3], c2w[:, :, 3])  # camera centre
    np.testing.assert_allclose(mats[:, :, 4], np.stack([[H, W, f] for f in gt["intrinsics"][:, 0]]))
    near, far = pb[:, 15], pb[:, 16]
    # camera-space depth of the rendered surfaces (distance * cos of the ray angle)
    fx, fy, cx, cy = gt["intrinsics"].T
    x = (np.arange(W) + 0.5)[None, None, :] - cx[:, None, None]
    y = (np.arange(H) + 0.5)[None, :, None] - cy[:, None, None]
    z = gt["distance"] / np.sqrt(1 + (x / fx[:, None, None]) ** 2 + (y / fy[:, None, None]) ** 2)
    zmed = np.median(z.reshape(16, -1), -1)
    assert np.all(near > 0) and np.all(near < zmed) and np.all(zmed < far)
    # points are sampled anywhere in a pixel, so near may undercut the pixel-centre minimum a bit
    assert np.all(near >= 0.95 * z.reshape(16, -1).min(-1))


def test_colmap_points_project_to_their_keypoints(scenes):
    cams, ims, pts = colmap.read_model(scenes["360"] / "sparse" / "0")
    assert len(pts) > 100
    assert all(len(p.image_ids) > 0 for p in pts.values())
    n_obs = sum(len(im.point3D_ids) for im in ims.values())
    assert n_obs == sum(len(p.image_ids) for p in pts.values())
    checked = 0
    for im in list(ims.values())[:4]:
        cam = cams[im.camera_id]
        fx, fy, cx, cy = cam.params
        R, t = im.qvec2rotmat(), im.tvec
        xyz = np.stack([pts[int(p)].xyz for p in im.point3D_ids])
        pc = xyz @ R.T + t
        uv = np.stack([fx * pc[:, 0] / pc[:, 2] + cx, fy * pc[:, 1] / pc[:, 2] + cy], -1)
        np.testing.assert_allclose(uv, im.xys, atol=1e-6)
        for k, p in enumerate(im.point3D_ids[:10]):  # tracks point back to the keypoint
            track = dict(zip(pts[int(p)].image_ids, pts[int(p)].point2D_idxs, strict=True))
            assert track[im.id] == k
            checked += 1
    assert checked > 0


def test_llff_loads_back(scenes):
    path = scenes["llff"]
    gt = synthetic.load_ground_truth(path)
    assert (path / "sparse" / "0" / "cameras.bin").is_file()
    cams, _, _ = colmap.read_model(path / "sparse" / "0")
    assert len(cams) == 1  # one shared camera, as LLFF captures
    for factor in (1, 2):
        scene = datasets.load_scene(path, DataConfig(dataset_type="llff", factor=factor))
        assert len(scene.names) == 12
        _check_loaded(scene, gt, factor)
    via_colmap = datasets.load_scene(path, DataConfig(dataset_type="colmap"))
    _check_loaded(via_colmap, gt, 1, check_pixels=False)


def test_llff_forward_facing_loads_back(scenes):
    path = scenes["llff"]
    gt = synthetic.load_ground_truth(path)
    cfg = DataConfig(dataset_type="llff", forward_facing=True, near=0.0, far=1.0)
    scene = datasets.load_scene(path, cfg)
    assert scene.forward_facing and scene.pixtocam_ndc is not None
    for j, name in enumerate(scene.names):
        i = _gt_index(gt, name)
        gl = synthetic.opencv_to_opengl(gt["c2w_opencv"][i])
        np.testing.assert_allclose(_pose_in_data_coords(scene, j), gl, atol=1e-9)
    # all cameras look roughly the same way: forward facing (viewing axes within ~15 deg)
    fwd = gt["c2w_opencv"][:, :, 2]  # OpenCV viewing axes (unit)
    assert np.min(fwd @ fwd.mean(0) / np.linalg.norm(fwd.mean(0))) > np.cos(np.deg2rad(15))
    # every pixel hits a surface (back wall), so the scene is bounded in front
    assert np.all(np.isfinite(gt["distance"]))


def test_blender_loads_back(scenes):
    path = scenes["blender"]
    gt = synthetic.load_ground_truth(path)
    for split, count in (("train", 16), ("val", 2), ("test", 2)):
        meta = json.loads((path / f"transforms_{split}.json").read_text())
        assert len(meta["frames"]) == count
        assert meta["frames"][0]["file_path"] == f"./{split}/r_0"
        fx = gt["intrinsics"][0, 0]
        assert meta["camera_angle_x"] == pytest.approx(2 * np.arctan(20 / fx))
        rgba = iio.imread(path / split / "r_0.png")
        assert rgba.shape == (40, 40, 4) and rgba.dtype == np.uint8
        assert rgba[0, 0, 3] == 0 and rgba[20, 20, 3] == 255  # empty corner, object at centre
    scene = datasets.load_scene(path, DataConfig(dataset_type="blender", white_background=True))
    assert len(scene.i_train) == 16 and len(scene.i_test) == 2
    np.testing.assert_array_equal(scene.colmap_to_world_transform, np.eye(4))
    _check_loaded(scene, gt, 1)
    black = datasets.load_scene(path, DataConfig(dataset_type="blender", white_background=False))
    differs = np.any(np.abs(black.images - scene.images) > 1e-6, -1)
    rgba = iio.imread(path / "train" / "r_0.png")
    np.testing.assert_array_equal(differs[0], rgba[..., 3] < 255)
    # objects only: pixels where nothing was hit are fully transparent
    np.testing.assert_array_equal(
        np.isfinite(gt["distance"][0]) | (rgba[..., 3] > 0), rgba[..., 3] > 0
    )


def test_cast_analytic_known_hits():
    world = synthetic.make_scene("blender", 0)
    sphere = world.objects[0]
    o = np.array([[0.0, -5.0, sphere.center[2]], [5.0, 5.0, 5.0]])
    d = np.array([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])  # through the centre; away from all
    r = world.cast(o, d)
    assert r["hit"].tolist() == [True, False]
    assert r["distance"][0] == pytest.approx(5.0 - sphere.radius)
    np.testing.assert_allclose(r["normals"][0], [0.0, -1.0, 0.0], atol=1e-12)
    assert r["object"].tolist() == [0, -1]
    # box: axis-aligned ray onto a face of the rotated box hits at the face distance
    box = world.objects[1]
    axis = box.rot[:, 0]
    o2 = box.center + 3.0 * axis
    r2 = world.cast(o2[None], -axis[None])
    assert r2["distance"][0] == pytest.approx(3.0 - box.half[0])
    np.testing.assert_allclose(r2["normals"][0], axis, atol=1e-12)
    # 360: every ray hits something (environment sphere), so the scene is unbounded
    w360 = synthetic.make_scene("360", 0)
    dirs = np.random.default_rng(0).normal(size=(500, 3))
    r3 = w360.cast(np.array([[2.5, -2.5, 1.5]]), dirs)
    assert r3["hit"].all() and r3["distance"].max() > 10


def test_deterministic_bytes(tmp_path):
    a = Path(synthetic.generate(tmp_path / "a", "360", n_views=6, width=32, height=24, seed=3))
    b = Path(synthetic.generate(tmp_path / "b", "360", n_views=6, width=32, height=24, seed=3))
    c = Path(synthetic.generate(tmp_path / "c", "360", n_views=6, width=32, height=24, seed=4))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files) > 20
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "images" / "img_000.png").read_bytes() != (
        c / "images" / "img_000.png"
    ).read_bytes()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporaries left


def test_images_are_textured_not_flat(scenes):
    img = iio.imread(scenes["360"] / "images" / "img_000.png").astype(float) / 255
    assert img.std() > 0.05
    # smooth: neighbouring pixels differ far less than random pixels do
    assert np.abs(np.diff(img, axis=1)).mean() < 0.25 * np.abs(img - img[::-1, ::-1]).mean()


def test_cli_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        synthetic.main(
            [
                "llff",
                str(out),
                "--views",
                "4",
                "--width",
                "32",
                "--height",
                "24",
                "--seed",
                "5",
                "--factors",
                "2",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        f"img_{i:03d}.png" for i in range(4)
    ]
    assert (out / "images_2").is_dir() and not (out / "images_4").exists()
    assert iio.imread(out / "images_2" / "img_000.png").shape == (12, 16, 3)
    with pytest.raises(UserError, match=f"{out}: exists and is not empty .*--overwrite"):
        synthetic.generate(out, "llff", n_views=4, width=32, height=24)
    synthetic.generate(out, "blender", n_views=4, width=32, height=32, overwrite=True)
    assert (out / "transforms_train.json").is_file() and not (out / "images").exists()
    with pytest.raises(ValueError, match="unknown synthetic scene kind"):
        synthetic.generate(tmp_path / "x", "nerf")
    with pytest.raises(SystemExit):
        synthetic.main(["nerf", str(tmp_path / "y")])
    with pytest.raises(FileNotFoundError, match="synthetic_gt.npz"):
        synthetic.load_ground_truth(tmp_path)


def test_distorted_360_loads_back(tmp_path):
    path = Path(
        synthetic.generate(tmp_path / "d", "360", n_views=9, width=48, height=36, distortion=True)
    )
    gt = synthetic.load_ground_truth(path)
    assert gt["intrinsics"].shape == (9, 8)
    cams, ims, pts = colmap.read_model(path / "sparse" / "0")
    assert {c.model for c in cams.values()} == {"OPENCV"}
    for factor in (1, 2):
        scene = datasets.load_scene(path, DataConfig(dataset_type="colmap", factor=factor))
        # loader's distortion (camera.DISTORTION_KEYS = k1 k2 k3 k4 p1 p2) is the lens's
        k1, k2, p1, p2 = synthetic.DISTORTION
        np.testing.assert_allclose(scene.distortion, np.tile([k1, k2, 0, 0, p1, p2], (9, 1)))
        _check_loaded(scene, gt, factor)
    # keypoints are the distorted projections of their 3D points
    im = ims[1]
    fx, fy, cx, cy, *dist = cams[im.camera_id].params
    pc = np.stack([pts[int(p)].xyz for p in im.point3D_ids]) @ im.qvec2rotmat().T + im.tvec
    xd, yd = synthetic.distort(pc[:, 0] / pc[:, 2], pc[:, 1] / pc[:, 2], *dist)
    np.testing.assert_allclose(np.stack([fx * xd + cx, fy * yd + cy], -1), im.xys, atol=1e-6)
    # the undistortion inverts the distortion
    x = np.linspace(-0.6, 0.6, 25)
    xu, yu = synthetic.undistort(*synthetic.distort(x, x[::-1], *dist), *dist)
    np.testing.assert_allclose(np.stack([xu, yu]), np.stack([x, x[::-1]]), atol=1e-12)


@pytest.mark.parametrize(
    "args,message",
    [
        (["360", "--views", "0"], "views: need at least 2"),
        (["llff", "--views", "1"], "views: need at least 2"),
        (["blender", "--views", "0"], "views: need at least 1"),
        (["360", "--width", "2"], "at least 8x8, got 2x96"),
        (["llff", "--height", "-5"], "at least 8x8"),
        (["360", "--supersample", "0"], "supersample: must be >= 1"),
        (["360", "--seed", "-1"], "seed: must be >= 0"),
        (["360", "--factors", "1"], "factors: downsampling factors must be between 2"),
        (["360", "--width", "8", "--height", "8", "--factors", "16"], "between 2 and the image"),
        (["360", "--factors", "two"], "--factors: expected integers"),
    ],
)
def test_degenerate_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    out = tmp_path / "scene"
    assert cli.main(["generate", args[0], str(out), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mipnerf360 generate: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_non_empty_folder_names_the_flag(tmp_path, capsys):
    out = tmp_path / "scene"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    args = ["generate", "blender", str(out), "--views", "1", "--width", "8", "--height", "8"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    message = f"{out}: exists and is not empty (pass --overwrite to replace it)"
    assert err == f"mipnerf360 generate: error: {message}\n"
    assert (out / "mine.txt").read_text() == "precious"
    assert cli.main([*args, "--overwrite"]) == 0
    assert not (out / "mine.txt").exists() and (out / "transforms_train.json").is_file()


def test_shipped_images_n_are_what_the_loader_would_make(scenes, tmp_path, monkeypatch):
    """images_2 of a generated scene = the loader's own downsampled copy of images/."""
    monkeypatch.setenv("MIPNERF360_CACHE", str(tmp_path))
    src = scenes["360"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for entry in ("images", "sparse"):
        (bare / entry).symlink_to(src / entry)
    made = datasets.ensure_downsampled(bare, 2)
    assert made.parent.parent == tmp_path
    for p in sorted((src / "images_2").iterdir()):
        np.testing.assert_array_equal(iio.imread(made / p.name), iio.imread(p), err_msg=p.name)
