"""datasets.py: golden parity with multinerf's LLFF loader, bird, Blender, sampler, bad input."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from mipnerf360 import camera, colmap, datasets, io, sampling
from mipnerf360.configs import DataConfig
from mipnerf360.errors import UserError
from mipnerf360.model import RAY_KEYS

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
BIRD = HERE / "data" / "bird"


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Our cache folder (downsampled images) in a temporary folder, not ~/.cache."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIPNERF360_CACHE", str(root))
        yield root


# ---------------------------------------------------------------------------
# Golden scene (multinerf datasets.LLFF on a synthetic COLMAP scene)


def _write_golden_scene(d, root: Path, with_small=True) -> Path:
    """Write the golden npz's scene: sparse/0 (our writer), images/ and images_4/."""
    scene = root / "scene"
    w, h, f = int(d["in_full_width"]), int(d["in_full_height"]), int(d["in_factor"])
    cams = {
        1: colmap.Camera(1, "OPENCV", w, h, d["in_opencv_params_fx_fy_cx_cy_k1_k2_p1_p2"].copy())
    }
    ims = {}
    for i, name in enumerate(d["in_colmap_names"]):
        ims[i + 1] = colmap.Image(
            i + 1,
            d["in_colmap_qvec_w2c"][i],
            d["in_colmap_tvec_w2c"][i],
            1,
            str(name),
            np.zeros((0, 2)),
            np.zeros(0, np.int64),
        )
    colmap.write_model(cams, ims, {}, scene / "sparse" / "0")
    # Sorted-order images, reassembled from the split outputs.
    sorted_imgs = np.zeros((len(ims), h // f, w // f, 3), np.float32)
    sorted_imgs[d["out_train_indices_in_sorted_order"]] = d["out_train_images"]
    sorted_imgs[d["out_test_indices_in_sorted_order"]] = d["out_test_images"]
    u8 = np.round(sorted_imgs * 255).astype(np.uint8)
    (scene / "images").mkdir()
    if with_small:
        (scene / "images_4").mkdir()
    for name, small in zip(d["in_sorted_names"], u8, strict=True):
        # Full-res image = each small pixel repeated f x f, so area downsampling gives it back.
        full = np.repeat(np.repeat(small, f, 0), f, 1)
        PILImage.fromarray(full).save(scene / "images" / str(name))
        if with_small:
            PILImage.fromarray(small).save(scene / "images_4" / str(name))
    if "in_poses_bounds_near_far" in d:
        rows = np.zeros((len(ims), 17))
        rows[:, 15:] = d["in_poses_bounds_near_far"]
        np.save(scene / "poses_bounds.npy", rows)
    return scene


def _golden_cfg(d, forward_facing):
    return DataConfig(
        dataset_type="colmap",
        factor=int(d["in_factor"]),
        near=float(d["in_near"]),
        far=float(d["in_far"]),
        forward_facing=forward_facing,
        llffhold=8,
        render_path_frames=12,
    )


@pytest.mark.parametrize("variant", ["360", "forward_facing"])
@pytest.mark.parametrize("with_small", [True, False])
def test_llff_loader_golden(tmp_path, variant, with_small):
    d = dict(np.load(GOLDEN / f"llff_loader_{variant}.npz"))
    ff = variant == "forward_facing"
    scene_dir = _write_golden_scene(d, tmp_path, with_small)
    s = datasets.load_scene(scene_dir, _golden_cfg(d, ff))
    if not with_small:  # the loader made images_4 in our cache (mean-pool of the blocks)
        assert not (scene_dir / "images_4").exists()
        made = datasets.ensure_downsampled(scene_dir, 4)
        assert made.parent == datasets.cache_root() / "images"
        assert sorted(p.stem for p in made.glob("*.png")) == [
            Path(n).stem for n in d["in_sorted_names"]
        ]
    assert s.names == [str(n) for n in d["in_sorted_names"]]
    np.testing.assert_array_equal(s.i_train, d["out_train_indices_in_sorted_order"])
    np.testing.assert_array_equal(s.i_test, d["out_test_indices_in_sorted_order"])
    tol = dict(rtol=0, atol=1e-10)
    np.testing.assert_allclose(s.camtoworlds, d["out_all_poses_sorted"], **tol)
    np.testing.assert_allclose(
        s.colmap_to_world_transform, d["out_colmap_to_world_transform"], **tol
    )
    assert s.pixtocams.dtype == np.float32
    for p in s.pixtocams:
        np.testing.assert_array_equal(p, d["out_pixtocams"])
    assert s.focal == d["out_focal"]
    assert (s.width, s.height) == (16, 12)
    if ff:
        np.testing.assert_array_equal(s.pixtocam_ndc, d["out_pixtocam_ndc"])
        np.testing.assert_allclose(s.render_poses, d["out_render_poses"], **tol)
    else:
        assert s.pixtocam_ndc is None
        # ellipse path: the reference resamples theta in float32 (see test_camera)
        np.testing.assert_allclose(s.render_poses, d["out_render_poses"], rtol=0, atol=2e-6)
    for split, idx in (("train", s.i_train), ("test", s.i_test)):
        np.testing.assert_allclose(s.camtoworlds[idx], d[f"out_{split}_camtoworlds"], **tol)
        np.testing.assert_array_equal(s.images[idx], d[f"out_{split}_images"])
        rays = datasets.image_rays_np(s, idx[0])
        for k in RAY_KEYS:
            np.testing.assert_allclose(rays[k], d[f"out_{split}_img0_rays_{k}"], **tol, err_msg=k)
        rays_t = datasets.image_rays(s, idx[0])
        np.testing.assert_array_equal(rays_t["rgb"].numpy(), d[f"out_{split}_img0_rgb"])
        for k in RAY_KEYS:
            assert rays_t[k].dtype == torch.float32 and rays_t[k].shape[:2] == (12, 16)
            np.testing.assert_allclose(
                rays_t[k].numpy(), d[f"out_{split}_img0_rays_{k}"], rtol=1e-6, atol=1e-6
            )


def test_sampler_matches_image_rays(tmp_path):
    """Torch-made training rays = the float64 reference rays of the same pixels."""
    d = dict(np.load(GOLDEN / "llff_loader_forward_facing.npz"))
    for ff in (False, True):
        s = datasets.load_scene(_write_golden_scene(d, tmp_path / str(ff)), _golden_cfg(d, ff))
        sampler = sampling.RaySampler(s, 64, "cpu", seed=3)
        cam = torch.tensor([0, 5, 13, 2])
        px, py = torch.tensor([0, 15, 7, 3]), torch.tensor([0, 11, 4, 9])
        got = sampler.rays_for(cam, px, py)
        for j in range(4):
            full = datasets.image_rays_np(s, s.i_train[cam[j]])
            for k in RAY_KEYS:
                np.testing.assert_allclose(
                    got[k][j].numpy(), full[k][py[j], px[j]], rtol=1e-5, atol=2e-6, err_msg=k
                )
            np.testing.assert_array_equal(
                got["rgb"][j].numpy(), s.images[s.i_train[cam[j]]][py[j], px[j]]
            )


# ---------------------------------------------------------------------------
# bird (real capture, 184 images, one SIMPLE_PINHOLE camera per image)


@pytest.fixture(scope="module")
def bird_copy(tmp_path_factory):
    dst = tmp_path_factory.mktemp("bird") / "bird"
    shutil.copytree(BIRD, dst)
    return dst


@pytest.fixture(scope="module")
def bird_colmap(bird_copy):
    return datasets.load_scene(
        bird_copy, DataConfig(dataset_type="colmap", factor=8, near=0.2, far=1e6)
    )


def test_bird_colmap(bird_copy, bird_colmap):
    s = bird_colmap
    assert not (BIRD / "images_8").exists()  # never written into tests/data
    assert not (bird_copy / "images_8").exists()  # nor into a scene folder: into our cache
    assert len(list(datasets.ensure_downsampled(bird_copy, 8).glob("*.png"))) == 184
    assert s.images.shape == (184, 120, 68, 3) and s.images.dtype == np.float32
    assert s.names == sorted(s.names) and s.names[0] == "001.jpg"
    np.testing.assert_array_equal(s.i_test, np.arange(0, 184, 8))
    assert len(s.i_train) == 184 - 23
    # camera centres normalised into [-1, 1]^3, touching it
    c = s.camtoworlds[:, :, 3]
    assert np.abs(c).max() == pytest.approx(1.0)
    # per-image focal lengths kept (scaled by 1/8)
    cams, ims, _ = colmap.read_model(BIRD / "sparse" / "0")
    by_name = {im.name: cams[im.camera_id].params[0] for im in ims.values()}
    expect = np.array([by_name[n] for n in s.names]) / 8
    np.testing.assert_allclose(s.focals, expect, rtol=1e-6)
    assert expect.max() / expect.min() > 1.25
    # images = area average of the originals
    full = np.asarray(PILImage.open(BIRD / "images" / s.names[5]), np.float64)
    pooled = full.reshape(120, 8, 68, 8, 3).mean(axis=(1, 3)) / 255
    np.testing.assert_allclose(s.images[5], pooled, atol=0.5 / 255 + 1e-7)
    # render path: ellipse around the scene
    assert s.render_poses.shape == (120, 3, 4)
    np.testing.assert_allclose(s.render_pixtocam, camera.get_pixtocam(s.focal, 68, 120))


def test_bird_llff_agrees_with_colmap(bird_copy, bird_colmap):
    s = datasets.load_scene(bird_copy, DataConfig(dataset_type="llff", factor=8, near=0.2, far=1e6))
    assert s.names == bird_colmap.names
    np.testing.assert_allclose(s.camtoworlds, bird_colmap.camtoworlds, atol=1e-6)
    np.testing.assert_array_equal(s.images, bird_colmap.images)
    # sparse/0 next to poses_bounds.npy: per-image intrinsics from COLMAP
    np.testing.assert_allclose(s.focals, bird_colmap.focals)


def test_bird_llff_hwf_intrinsics(bird_copy, tmp_path):
    """Without sparse/0 the LLFF loader takes the intrinsics from hwf, as LLFF does."""
    scene = tmp_path / "bird_llff"
    scene.mkdir()
    (scene / "images_8").symlink_to(datasets.ensure_downsampled(bird_copy, 8))
    shutil.copy(bird_copy / "poses_bounds.npy", scene)
    cfg = DataConfig(dataset_type="llff", factor=8, forward_facing=True, near=0.0, far=1.0)
    s = datasets.load_scene(scene, cfg)
    hwf = np.load(BIRD / "poses_bounds.npy")[:, :15].reshape(-1, 3, 5)[:, :, 4]
    np.testing.assert_allclose(s.focals, hwf[:, 2] / 8, rtol=1e-6)
    assert s.pixtocam_ndc is not None and s.bounds.shape == (184, 2)
    assert s.render_poses.shape == (120, 3, 4)


# ---------------------------------------------------------------------------
# Blender


def _write_blender(root: Path, sizes=None, frames=True):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        (root / split).mkdir()
        fr = []
        for i in range(n):
            size = (sizes or {}).get((split, i), (8, 8))
            rgba = rng.integers(0, 256, size=size + (4,), dtype=np.uint8)
            PILImage.fromarray(rgba, "RGBA").save(root / split / f"r_{i}.png")
            c2w = np.eye(4)
            c2w[:3, :3] = camera.viewmatrix(rng.normal(size=3), [0, 0, 1], [0, 0, 0])[:, :3]
            c2w[:3, 3] = rng.normal(size=3) * 4
            fr.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
            data[(split, i)] = (rgba, c2w)
        meta = {"camera_angle_x": 0.69}
        if frames:
            meta["frames"] = fr
        (root / f"transforms_{split}.json").write_text(json.dumps(meta))
    return data


@pytest.mark.parametrize("white", [True, False])
def test_blender(tmp_path, white):
    data = _write_blender(tmp_path / "lego")
    s = datasets.load_scene(
        tmp_path / "lego", DataConfig(dataset_type="blender", white_background=white)
    )
    assert s.images.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(s.i_train, [0, 1, 2])
    np.testing.assert_array_equal(s.i_test, [3, 4])
    rgba, c2w = data[("test", 1)]
    a = rgba[..., 3:] / 255.0
    expect = rgba[..., :3] / 255.0 * a + (1.0 - a if white else 0.0)
    np.testing.assert_array_equal(s.images[4], expect.astype(np.float32))
    np.testing.assert_array_equal(s.camtoworlds[4], c2w[:3])
    f = 0.5 * 8 / np.tan(0.5 * 0.69)
    np.testing.assert_allclose(s.pixtocams[0], camera.get_pixtocam(f, 8, 8), rtol=1e-6)
    assert s.render_poses.shape == (120, 3, 4) and (s.near, s.far) == (2.0, 6.0)


# ---------------------------------------------------------------------------
# Bad input: each a clear error naming the file


def test_missing_image(tmp_path):
    d = dict(np.load(GOLDEN / "llff_loader_360.npz"))
    scene = _write_golden_scene(d, tmp_path)
    victim = scene / "images" / str(d["in_sorted_names"][3])
    victim.unlink()
    with pytest.raises(datasets.DatasetError, match=f"{victim.name}.*images.bin.*missing"):
        datasets.load_scene(scene, _golden_cfg(d, False))


def test_unsupported_camera_model(tmp_path):
    d = dict(np.load(GOLDEN / "llff_loader_360.npz"))
    scene = _write_golden_scene(d, tmp_path)
    cams, ims, pts = colmap.read_model(scene / "sparse" / "0")
    cams[1] = colmap.Camera(1, "FOV", 64, 48, np.array([70.0, 71, 32, 24, 0.1]))
    colmap.write_model(cams, ims, pts, scene / "sparse" / "0")
    with pytest.raises(datasets.DatasetError, match=r"cameras\.bin.*FOV"):
        datasets.load_scene(scene, _golden_cfg(d, False))


def test_json_without_frames(tmp_path):
    _write_blender(tmp_path / "lego", frames=False)
    with pytest.raises(datasets.DatasetError, match=r"transforms_train\.json.*frames"):
        datasets.load_scene(tmp_path / "lego", DataConfig(dataset_type="blender"))


def test_images_of_different_sizes(tmp_path):
    _write_blender(tmp_path / "lego", sizes={("test", 1): (8, 6)})
    with pytest.raises(datasets.DatasetError, match=r"test/r_1\.png.*size"):
        datasets.load_scene(tmp_path / "lego", DataConfig(dataset_type="blender"))


def test_poses_bounds_row_count(tmp_path):
    scene = tmp_path / "s"
    (scene / "images").mkdir(parents=True)
    for i in range(4):
        PILImage.fromarray(np.zeros((6, 8, 3), np.uint8)).save(scene / "images" / f"{i}.png")
    np.save(scene / "poses_bounds.npy", np.ones((5, 17)))
    with pytest.raises(datasets.DatasetError, match=r"poses_bounds\.npy.*5 rows.*4 images"):
        datasets.load_scene(scene, DataConfig(dataset_type="llff"))


def test_missing_scene_and_bad_type(tmp_path):
    with pytest.raises(datasets.DatasetError, match="nope"):
        datasets.load_scene(tmp_path / "nope", DataConfig())
    with pytest.raises(datasets.DatasetError, match="sparse"):
        datasets.load_scene(tmp_path, DataConfig(dataset_type="colmap"))
    with pytest.raises(datasets.DatasetError, match="dataset_type"):
        datasets.load_scene(tmp_path, DataConfig(dataset_type="nerfstudio"))


# ---------------------------------------------------------------------------
# images_{f} cache


def test_downsample_cache_atomic(tmp_path, monkeypatch):
    d = dict(np.load(GOLDEN / "llff_loader_360.npz"))
    scene = _write_golden_scene(d, tmp_path, with_small=False)
    monkeypatch.setenv("MIPNERF360_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}
    real = datasets.downsample_image

    def flaky(u8, factor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # interrupted half way
        return real(u8, factor)

    monkeypatch.setattr(datasets, "downsample_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        datasets.ensure_downsampled(scene, 4)
    assert list((tmp_path / "cache" / "images").iterdir()) == []  # no half folder
    monkeypatch.setattr(datasets, "downsample_image", real)
    # two concurrent builders: both succeed, one complete folder results
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: datasets.ensure_downsampled(scene, 4), range(2)))
    assert outs[0] == outs[1] and outs[0].parent == tmp_path / "cache" / "images"
    assert [p.name for p in outs[0].parent.iterdir()] == [outs[0].name]
    assert len(list(outs[0].glob("*.png"))) == 17
    assert sorted(p.name for p in scene.iterdir()) == ["images", "sparse"]  # scene untouched
    # non-divisible sizes use PIL's box filter with rounded sizes
    odd = datasets.downsample_image(np.full((10, 7, 3), 200, np.uint8), 4)
    assert odd.shape == (3, 2, 3) and (odd == 200).all()


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_read_only_scene_uses_our_cache(tmp_path, monkeypatch):
    """A read-only scene without images_4 loads; the copy goes to our cache (umask modes)."""
    d = dict(np.load(GOLDEN / "llff_loader_360.npz"))
    scene = _write_golden_scene(d, tmp_path / "data", with_small=False)
    monkeypatch.setenv("MIPNERF360_CACHE", str(tmp_path / "cache"))
    ref = datasets.load_scene(_write_golden_scene(d, tmp_path / "ref"), _golden_cfg(d, False))
    before = _snapshot(scene)
    for p in [scene, *scene.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        s = datasets.load_scene(scene, _golden_cfg(d, False))
    finally:
        for p in [scene, *scene.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert _snapshot(scene) == before  # nothing written into the scene folder
    np.testing.assert_array_equal(s.images, ref.images)  # = the shipped images_4
    (made,) = (tmp_path / "cache" / "images").iterdir()
    mask = io.umask()
    assert made.stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's 0700
    assert {p.stat().st_mode & 0o777 for p in made.iterdir()} == {0o666 & ~mask}


def test_unwritable_cache_is_a_one_line_error(tmp_path, monkeypatch):
    d = dict(np.load(GOLDEN / "llff_loader_360.npz"))
    scene = _write_golden_scene(d, tmp_path, with_small=False)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("MIPNERF360_CACHE", str(tmp_path / "file"))
    with pytest.raises(datasets.DatasetError, match=r"file/images.*set MIPNERF360_CACHE"):
        datasets.load_scene(scene, _golden_cfg(d, False))
    assert sorted(p.name for p in scene.iterdir()) == ["images", "sparse"]


def test_cache_is_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    d = dict(np.load(GOLDEN / "llff_loader_360.npz"))
    scene = _write_golden_scene(d, tmp_path, with_small=False)
    monkeypatch.setenv("MIPNERF360_CACHE", str(tmp_path / "cache"))
    cfg = _golden_cfg(d, False)
    first = datasets.load_scene(scene, cfg)
    name = str(d["in_sorted_names"][0])
    img = np.asarray(PILImage.open(scene / "images" / name))
    PILImage.fromarray(255 - img).save(scene / "images" / name)
    second = datasets.load_scene(scene, cfg)
    np.testing.assert_allclose(second.images[0], 1 - first.images[0], atol=1e-6)
    np.testing.assert_array_equal(second.images[1:], first.images[1:])


def test_downsample_is_block_mean():
    rng = np.random.default_rng(5)
    for c in (3, 4):
        u8 = rng.integers(0, 256, size=(24, 32, c), dtype=np.uint8)
        mean = u8.reshape(6, 4, 8, 4, c).astype(np.float64).mean(axis=(1, 3))
        np.testing.assert_array_equal(datasets.downsample_image(u8, 4), np.floor(mean + 0.5))


def test_text_model_and_per_image_cameras(tmp_path):
    """A text COLMAP model with mixed camera models loads with each image's own camera."""
    d = dict(np.load(GOLDEN / "llff_loader_360.npz"))
    scene = _write_golden_scene(d, tmp_path)
    cams, ims, pts = colmap.read_model(scene / "sparse" / "0")
    ref = datasets.load_scene(scene, _golden_cfg(d, False))
    cams[2] = colmap.Camera(2, "PINHOLE", 64, 48, np.array([80.0, 81.0, 31.0, 23.0]))
    cams[3] = colmap.Camera(3, "SIMPLE_RADIAL", 64, 48, np.array([60.0, 33.0, 25.0, 0.03]))
    for k, im in ims.items():
        im.camera_id = 1 + k % 3
    for p in (scene / "sparse" / "0").iterdir():
        p.unlink()
    colmap.write_model(cams, ims, pts, scene / "sparse" / "0", ext=".txt")
    s = datasets.load_scene(scene, _golden_cfg(d, False))
    np.testing.assert_allclose(s.camtoworlds, ref.camtoworlds, rtol=0, atol=1e-12)
    by_name = {im.name: cams[im.camera_id] for im in ims.values()}
    for i, name in enumerate(s.names):
        cam = by_name[name]
        K, dist, _ = datasets._colmap_intrinsics(cam, Path("x"))
        np.testing.assert_array_equal(
            s.pixtocams[i], (np.linalg.inv(K) @ np.diag([4.0, 4.0, 1.0])).astype(np.float32)
        )
        expect = np.zeros(6) if dist is None else dist
        np.testing.assert_array_equal(s.distortion[i], expect)
        rays = datasets.image_rays_np(s, i)
        x, y = camera.pixel_coordinates(16, 12)
        coeffs = dict(zip(camera.DISTORTION_KEYS, expect, strict=True))
        o, dd, v, r, _ = camera.pixels_to_rays(
            x, y, s.pixtocams[i].astype(np.float64), s.camtoworlds[i], coeffs
        )
        np.testing.assert_allclose(rays["directions"], dd, rtol=0, atol=1e-12)
        np.testing.assert_allclose(rays["radii"], r, rtol=0, atol=1e-12)


def test_blender_factor(tmp_path):
    _write_blender(tmp_path / "lego")
    full = datasets.load_scene(tmp_path / "lego", DataConfig(dataset_type="blender"))
    half = datasets.load_scene(tmp_path / "lego", DataConfig(dataset_type="blender", factor=2))
    assert half.images.shape == (5, 4, 4, 3)
    pooled = full.images.astype(np.float64).reshape(5, 4, 2, 4, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(half.images, pooled, atol=1e-6)
    np.testing.assert_allclose(half.focals, full.focals / 2, rtol=1e-6)


def test_corrupt_image_and_count_mismatch(tmp_path):
    d = dict(np.load(GOLDEN / "llff_loader_360.npz"))
    scene = _write_golden_scene(d, tmp_path)
    victim = scene / "images_4" / str(d["in_sorted_names"][2])
    victim.write_bytes(b"not a png")
    with pytest.raises(datasets.DatasetError, match=f"{victim.name}.*cannot read image"):
        datasets.load_scene(scene, _golden_cfg(d, False))
    victim.unlink()
    with pytest.raises(datasets.DatasetError, match=r"images_4.*16 images.*17"):
        datasets.load_scene(scene, _golden_cfg(d, False))


# ---------------------------------------------------------------------------
# Image formats


def _png(arr: np.ndarray) -> bytes:
    """A PNG file (no filtering) of uint8/uint16 [H,W] or [H,W,C], C = 2 (gray+alpha),
    3 or 4: Pillow cannot write 16-bit colour PNGs."""
    import struct
    import zlib

    arr = arr if arr.ndim == 3 else arr[..., None]
    h, w, c = arr.shape
    bits = 16 if arr.dtype == np.uint16 else 8
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    big = arr.astype(">u2" if bits == 16 else "u1")
    raw = b"".join(b"\x00" + big[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, bits, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _write_llff(scene: Path, images: list, names=None) -> Path:
    """An LLFF scene (images/ + poses_bounds.npy) of the given files' bytes or arrays."""
    (scene / "images").mkdir(parents=True)
    names = names or [f"{i:02d}.png" for i in range(len(images))]
    for name, img in zip(names, images, strict=True):
        path = scene / "images" / name
        if isinstance(img, bytes):
            path.write_bytes(img)
        else:
            PILImage.fromarray(img).save(path)
    h, w = 8, 12
    rows = np.zeros((len(images), 3, 5))
    rows[:, :, :3] = np.eye(3)
    rows[:, :, 3] = np.random.default_rng(0).normal(size=(len(images), 3))
    rows[:, :, 4] = [h, w, 10.0]
    bounds = np.tile([1.0, 5.0], (len(images), 1))
    np.save(scene / "poses_bounds.npy", np.concatenate([rows.reshape(-1, 15), bounds], 1))
    return scene


def test_bit_depths_and_channels_load_scaled(tmp_path):
    """8/16-bit gray, gray+alpha, RGB and RGBA PNGs load as RGB in [0, 1]."""
    rng = np.random.default_rng(1)
    files, expect, tol = [], [], []
    for bits, dtype in ((8, np.uint8), (16, np.uint16)):
        top = 2**bits - 1
        for c in (1, 2, 3, 4):
            arr = rng.integers(0, top + 1, size=(8, 12, c)).astype(dtype)
            files.append(_png(arr if c > 1 else arr[..., 0]))
            rgb = np.repeat(arr[..., :1], 3, -1) if c <= 2 else arr[..., :3]
            expect.append(rgb / top)
            # 16-bit gray is exact; Pillow reads 16-bit colour PNGs at 8 bits (high byte).
            # The factor-2 copies are rounded to the bit depth they are stored at.
            lsb = 1 / 65535 if bits == 16 and c == 1 else 1 / 255
            tol.append((1e-7 if bits == 8 or c == 1 else 1 / 255, 0.5 * lsb))
    scene = _write_llff(tmp_path / "s", files)
    for factor in (1, 2):
        s = datasets.load_scene(scene, DataConfig(dataset_type="llff", factor=factor))
        assert s.images.dtype == np.float32 and s.images.shape[1:] == (8 // factor, 12 // factor, 3)
        for i in range(len(files)):
            want = expect[i] if factor == 1 else datasets.downsample_image(expect[i], factor)
            t = tol[i][0] + (0 if factor == 1 else tol[i][1])
            np.testing.assert_allclose(s.images[i], want, rtol=0, atol=t, err_msg=str(i))


def test_exif_rotation_warns_once_and_keeps_raw_pixels(tmp_path, capsys):
    rng = np.random.default_rng(2)
    exif = PILImage.Exif()
    exif[datasets.EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to view"
    files = []
    for i in range(3):
        buf = __import__("io").BytesIO()
        img = PILImage.fromarray(rng.integers(0, 256, size=(8, 12, 3), dtype=np.uint8))
        img.save(buf, format="JPEG", exif=exif.tobytes() if i else b"")
        files.append(buf.getvalue())
    names = ["a.jpg", "b.jpg", "c.jpg"]
    scene = _write_llff(tmp_path / "s", files, names)
    capsys.readouterr()
    s = datasets.load_scene(scene, DataConfig(dataset_type="llff"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(scene / "images" / "b.jpg") in err[0], err
    assert "EXIF orientation 6" in err[0] and "1 more" in err[0]
    raw = np.asarray(PILImage.open(scene / "images" / "b.jpg"))  # stored order
    assert s.images.shape == (3, 8, 12, 3)
    np.testing.assert_array_equal(s.images[1], (raw / 255.0).astype(np.float32))


def test_poses_bounds_not_npy(tmp_path):
    scene = _write_llff(tmp_path / "s", [np.zeros((8, 12, 3), np.uint8)] * 2)
    (scene / "poses_bounds.npy").write_text("0 1 2 3\n4 5 6 7\n")
    with pytest.raises(datasets.DatasetError, match=r"poses_bounds\.npy: not a NumPy") as e:
        datasets.load_scene(scene, DataConfig(dataset_type="llff"))
    assert "pickle" not in str(e.value)
    np.save(scene / "poses_bounds.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(datasets.DatasetError, match=r"poses_bounds\.npy: cannot read") as e:
        datasets.load_scene(scene, DataConfig(dataset_type="llff"))
    assert "pickle" not in str(e.value)
    (scene / "poses_bounds.npy").write_bytes(b"\x93NUMPY\x01\x00")  # truncated header
    with pytest.raises(datasets.DatasetError, match=r"poses_bounds\.npy: cannot read"):
        datasets.load_scene(scene, DataConfig(dataset_type="llff"))


def test_bad_blender_json_values(tmp_path):
    _write_blender(tmp_path / "lego")
    path = tmp_path / "lego" / "transforms_test.json"
    meta = json.loads(path.read_text())
    cases = [
        ({**meta, "camera_angle_x": "wide"}, "camera_angle_x"),
        ({**meta, "frames": [{"file_path": "./test/r_0", "transform_matrix": [1, 2]}]}, "4x4"),
    ]
    for bad, what in cases:
        path.write_text(json.dumps(bad))
        with pytest.raises(datasets.DatasetError, match=f"transforms_test.json.*{what}"):
            datasets.load_scene(tmp_path / "lego", DataConfig(dataset_type="blender"))
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(UserError, match="transforms_test.json: not valid JSON"):
        datasets.load_scene(tmp_path / "lego", DataConfig(dataset_type="blender"))


# ---------------------------------------------------------------------------
# Loader table and fingerprint


def test_loader_table_is_what_load_scene_uses(tmp_path, monkeypatch):
    assert datasets.DATASET_TYPES == tuple(datasets.LOADERS) == ("colmap", "llff", "blender")
    assert [datasets.LOADERS[t].needs_downsampled_images for t in datasets.DATASET_TYPES] == [
        True,
        True,
        False,
    ]
    calls = []
    toy = datasets.Loader(
        precheck=lambda d, cfg: calls.append(("precheck", d)),
        load=lambda d, cfg: calls.append(("load", d)) or "a scene",
        needs_downsampled_images=False,
    )
    monkeypatch.setitem(datasets.LOADERS, "toy", toy)
    assert datasets.load_scene(tmp_path, DataConfig(dataset_type="toy")) == "a scene"
    assert calls == [("precheck", tmp_path), ("load", tmp_path)]


def test_scene_fingerprint(tmp_path):
    d = dict(np.load(GOLDEN / "llff_loader_360.npz"))
    cfg = _golden_cfg(d, False)
    a = datasets.load_scene(_write_golden_scene(d, tmp_path / "a"), cfg)
    b = datasets.load_scene(_write_golden_scene(d, tmp_path / "b"), cfg)  # a copy elsewhere
    fp = datasets.scene_fingerprint(a)
    assert len(fp) == 32 and fp == datasets.scene_fingerprint(b)
    b.camtoworlds = b.camtoworlds + 1e-13  # last-bit noise of another machine's LAPACK
    assert datasets.scene_fingerprint(b) == fp
    changed = []
    for field, value in (
        ("images", a.images.copy()),
        ("camtoworlds", a.camtoworlds + np.eye(3, 4) * 1e-6),
        ("pixtocams", a.pixtocams * np.float32(1.001)),
        ("i_test", a.i_test[:-1]),
        ("far", a.far * 2),
    ):
        if field == "images":
            value[3, 2, 1, 0] += 1 / 255
        changed.append(datasets.scene_fingerprint(dataclasses.replace(a, **{field: value})))
    assert fp not in changed and len(set(changed)) == len(changed)
