"""`mipnerf360 video`: render-path frames to a decodable mp4."""

import os

import numpy as np
import pytest
from helpers import train_small

from mipnerf360 import configs, datasets, video
from mipnerf360.errors import ConfigError, UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_small(tmp_path_factory.mktemp("video"), n_views=8, width=40, height=30)


def test_video_is_written_and_decodable(trained, tmp_path):
    scene, run = trained
    out = tmp_path / "sub" / "path.mp4"
    assert video.main([run, scene, str(out), "--frames", "3", "--width", "24", "--fps", "5"]) == 0
    frames = _read_ffmpeg(out)
    # width 24 -> height round(30 * 24 / 40) = 18; colour | depth side by side.
    assert frames.shape == (3, 18, 48, 3)
    assert not [p for p in os.listdir(out.parent) if p.startswith(".tmp-")]
    assert oct(os.stat(out).st_mode & 0o077) != "0o0"  # not a private mkstemp file


def _read_ffmpeg(path):
    import imageio.v2 as imageio

    with imageio.get_reader(path, format="FFMPEG") as r:
        return np.stack([f for f in r.iter_data()])


def test_frames_are_the_renders_colour_then_depth(trained, tmp_path, monkeypatch):
    """Each decoded frame is [render of its path pose | colour-mapped depth], in path order.

    The renderer is replaced by a known function of the rays (a 2-step model renders an
    almost uniform grey, which cannot tell a right frame from a wrong one).
    """
    from mipnerf360 import model as model_lib
    from mipnerf360.io import to_uint8

    def fake_render(model, rays, chunk_size, train_frac=1.0):
        d = rays["directions"].numpy().astype(np.float64)
        d = d / np.linalg.norm(d, axis=-1, keepdims=True)
        h, w = d.shape[:2]
        return {
            "rgb": (0.5 + 0.45 * d).astype(np.float32),
            "acc": np.ones((h, w), np.float32),
            "distance_median": (1.0 + 3.0 * (d[..., 0] + 1.0)).astype(np.float32),
        }

    monkeypatch.setattr(model_lib, "render_image", fake_render)
    scene_dir, run = trained
    out = tmp_path / "v.mp4"
    assert video.main([run, scene_dir, str(out), "--frames", "4", "--width", "24"]) == 0
    frames = _read_ffmpeg(out).astype(np.float64)
    scene = datasets.load_scene(scene_dir, configs.get_config("cpu").data)
    cfg_frames = configs.get_config("cpu")
    cfg_frames.data.render_path_frames = 4
    poses = datasets.load_scene(scene_dir, cfg_frames.data).render_poses
    k = video.scaled_pixtocam(scene.render_pixtocam, 24 / 40)
    expected = []
    for c2w in poses:
        r = fake_render(None, datasets.pose_rays(scene, c2w, k, 24, 18), 0)
        depth = video.colorize_depth(r["distance_median"], r["acc"])
        expected.append(to_uint8(np.concatenate([r["rgb"], depth], axis=1)).astype(np.float64))
    expected = np.stack(expected)
    assert frames.shape == expected.shape == (4, 18, 48, 3)
    diff = np.abs(frames - expected)  # 8-bit levels
    # H.264 (yuv420p, quality 8) on 24-pixel halves: measured ~2 levels on the smooth colour
    # half, ~8-10 on the turbo-mapped depth half (sharp hue changes).
    err_rgb, err_depth = diff[:, :, :24].mean(axis=(1, 2, 3)), diff[:, :, 24:].mean(axis=(1, 2, 3))
    assert np.all(err_rgb < 4) and np.all(err_depth < 16), (err_rgb, err_depth)
    # Consecutive path poses differ by far more (measured > 80 levels): order is checked too.
    apart = [np.abs(expected[i] - expected[i + 1])[:, :, :24].mean() for i in range(3)]
    assert min(apart) > 10 * err_rgb.max(), apart


def test_scaled_pixtocam_matches_downsampled_pixels(trained):
    """Pixel centres of a half-size image are the centres of 2x2 blocks of the full one."""
    scene_dir, _ = trained
    scene = datasets.load_scene(scene_dir, configs.get_config("cpu").data)
    c2w, k = scene.render_poses[0], scene.render_pixtocam
    full = datasets.pose_rays(scene, c2w, k, 40, 30)["directions"].numpy()
    half = datasets.pose_rays(scene, c2w, video.scaled_pixtocam(k, 0.5), 20, 15)[
        "directions"
    ].numpy()
    block = 0.5 * (full[0::2, 0::2] + full[1::2, 1::2])
    np.testing.assert_allclose(half, block, rtol=1e-5, atol=1e-6)


def test_video_without_model_names_the_file(tmp_path):
    with pytest.raises(UserError, match="model.pt"):
        video.main([str(tmp_path), str(tmp_path), str(tmp_path / "v.mp4")])
    assert not os.listdir(tmp_path)  # no temporary file left behind


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--threads", "-1"], "--threads -1"),
        (["--frames", "0"], "--frames 0"),
        (["--width", "1"], "--width 1"),
        (["--fps", "0"], "--fps 0"),
    ],
)
def test_bad_options_are_config_errors(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        video.main([str(tmp_path), str(tmp_path), str(tmp_path / "v.mp4"), *extra])


def test_unwritable_output_names_the_path(trained, tmp_path):
    """As root, chmod does not stop writes; a file where the folder should be does."""
    scene_dir, run = trained
    (tmp_path / "f").write_text("a file")
    with pytest.raises(UserError, match=str(tmp_path / "f")):
        video.main([run, scene_dir, str(tmp_path / "f" / "v.mp4"), "--frames", "1"])
