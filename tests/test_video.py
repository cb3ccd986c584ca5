"""`mipnerf360 video`: render-path frames to a decodable mp4."""

import os

import numpy as np
import pytest

from mipnerf360 import configs, datasets, synthetic, train, video

SMALL = [
    "train.max_steps=2",
    "train.batch_size=32",
    "model.num_prop_samples=8",
    "model.num_nerf_samples=8",
    "model.prop_mlp.net_width=16",
    "model.prop_mlp.basis_shape=octahedron",
    "model.prop_mlp.basis_subdivisions=1",
    "model.nerf_mlp.net_depth=2",
    "model.nerf_mlp.net_width=32",
    "model.nerf_mlp.bottleneck_width=16",
    "model.nerf_mlp.basis_shape=octahedron",
    "model.nerf_mlp.basis_subdivisions=1",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    scene = synthetic.generate(
        root / "scene", kind="360", n_views=8, width=40, height=30, factors=()
    )
    run = root / "run"
    assert train.main([scene, str(run), "--preset", "cpu", "--no-progress", *SMALL]) == 0
    return scene, str(run)


def test_video_is_written_and_decodable(trained, tmp_path):
    scene, run = trained
    out = tmp_path / "sub" / "path.mp4"
    assert video.main([run, scene, str(out), "--frames", "3", "--width", "24", "--fps", "5"]) == 0
    frames = _read_ffmpeg(out)
    # width 24 -> height round(30 * 24 / 40) = 18; colour | depth side by side.
    assert frames.shape == (3, 18, 48, 3)
    assert frames.std() > 0  # not a blank video
    assert not [p for p in os.listdir(out.parent) if p.startswith(".tmp-")]
    assert oct(os.stat(out).st_mode & 0o077) != "0o0"  # not a private mkstemp file


def _read_ffmpeg(path):
    import imageio.v2 as imageio

    with imageio.get_reader(path, format="FFMPEG") as r:
        return np.stack([f for f in r.iter_data()])


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
    with pytest.raises(FileNotFoundError, match="model.pt"):
        video.main([str(tmp_path), str(tmp_path), str(tmp_path / "v.mp4")])
