"""COLMAP reader/writer: round trips (binary and text), the bird model, bad input."""

from pathlib import Path

import numpy as np
import pytest

from mipnerf360 import colmap
from mipnerf360.errors import UserError

BIRD = Path(__file__).parent / "data" / "bird"


def _random_model(seed=0):
    rng = np.random.default_rng(seed)
    cameras = {}
    for i, m in enumerate(colmap.CAMERA_MODELS[:6]):
        cameras[i + 1] = colmap.Camera(
            i + 1, m.model_name, 64 + i, 48 + i, rng.normal(size=m.num_params)
        )
    images = {}
    for j in range(5):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        n2d = j * 3  # image 0 has no keypoints (empty line in the text format)
        images[10 + j] = colmap.Image(
            10 + j,
            q,
            rng.normal(size=3),
            1 + j % 6,
            f"img_{j:03d}.png",
            rng.uniform(0, 60, size=(n2d, 2)),
            rng.integers(-1, 100, size=n2d),
        )
    points = {}
    for k in range(7):
        tl = k % 4
        points[100 + k] = colmap.Point3D(
            100 + k,
            rng.normal(size=3),
            rng.integers(0, 256, size=3).astype(np.uint8),
            float(rng.uniform()),
            rng.integers(10, 15, size=tl),
            rng.integers(0, 12, size=tl),
        )
    return cameras, images, points


def _assert_models_equal(a, b):
    for da, db in zip(a, b, strict=True):
        assert list(da) == list(db)
        for k in da:
            va, vb = vars(da[k]), vars(db[k])
            assert va.keys() == vb.keys()
            for f in va:
                x, y = va[f], vb[f]
                if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                    x, y = np.asarray(x), np.asarray(y)
                    assert x.shape == y.shape, (k, f)
                    np.testing.assert_array_equal(x, y, err_msg=f"{k}.{f}")
                else:
                    assert x == y, (k, f)


@pytest.mark.parametrize("ext", [".bin", ".txt"])
def test_round_trip(tmp_path, ext):
    model = _random_model()
    colmap.write_model(*model, tmp_path, ext=ext)
    back = colmap.read_model(tmp_path, ext=ext)
    _assert_models_equal(model, back)
    # auto-detection finds the single format present
    _assert_models_equal(model, colmap.read_model(tmp_path))


def test_binary_text_binary_bird(tmp_path):
    model = colmap.read_model(BIRD / "sparse" / "0")
    colmap.write_model(*model, tmp_path / "txt", ext=".txt")
    colmap.write_model(*colmap.read_model(tmp_path / "txt"), tmp_path / "bin", ext=".bin")
    _assert_models_equal(model, colmap.read_model(tmp_path / "bin"))
    # our binary writer reproduces COLMAP's own files byte for byte
    for name in ("cameras.bin", "images.bin", "points3D.bin"):
        assert (tmp_path / "bin" / name).read_bytes() == (BIRD / "sparse" / "0" / name).read_bytes()


def test_bird_model_contents():
    cameras, images, points = colmap.read_model(BIRD / "sparse" / "0")
    assert len(cameras) == 184 and len(images) == 184 and len(points) == 6271
    assert {c.model for c in cameras.values()} == {"SIMPLE_PINHOLE"}
    assert {(c.width, c.height) for c in cameras.values()} == {(544, 960)}
    f = np.array([c.params[0] for c in cameras.values()])
    assert 790 < f.min() < 800 and 1030 < f.max() < 1040
    names = sorted(im.name for im in images.values())
    assert names[0] == "001.jpg" and len(set(names)) == 184
    for im in images.values():
        np.testing.assert_allclose(np.linalg.norm(im.qvec), 1, atol=1e-9)


def test_quaternion_round_trip():
    rng = np.random.default_rng(3)
    for _ in range(50):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        q *= np.sign(q[0])
        R = colmap.qvec2rotmat(q)
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) == pytest.approx(1)
        np.testing.assert_allclose(colmap.rotmat2qvec(R), q, atol=1e-12)
    # 180 degree rotation (w = 0), where naive trace formulas break
    np.testing.assert_allclose(
        np.abs(colmap.rotmat2qvec(np.diag([1.0, -1.0, -1.0]))), [0, 1, 0, 0], atol=1e-12
    )


def test_truncated_bin(tmp_path):
    colmap.write_model(*_random_model(), tmp_path)
    data = (tmp_path / "images.bin").read_bytes()
    (tmp_path / "images.bin").write_bytes(data[: len(data) - 5])
    with pytest.raises(colmap.ColmapError, match=r"images\.bin.*truncated"):
        colmap.read_model(tmp_path)


def test_trailing_bytes(tmp_path):
    colmap.write_model(*_random_model(), tmp_path)
    with open(tmp_path / "cameras.bin", "ab") as f:
        f.write(b"\x01\x02")
    with pytest.raises(colmap.ColmapError, match=r"cameras\.bin.*trailing"):
        colmap.read_model(tmp_path)


def test_unknown_camera_model_id(tmp_path):
    cams, ims, pts = _random_model()
    colmap.write_model(cams, ims, pts, tmp_path)
    data = bytearray((tmp_path / "cameras.bin").read_bytes())
    data[12:16] = (42).to_bytes(4, "little")  # model id of the first camera
    (tmp_path / "cameras.bin").write_bytes(bytes(data))
    with pytest.raises(colmap.ColmapError, match=r"cameras\.bin.*unknown camera model id 42"):
        colmap.read_model(tmp_path)


def test_unknown_camera_model_text(tmp_path):
    (tmp_path / "cameras.txt").write_text("1 WEIRD 10 10 1 2 3\n")
    with pytest.raises(colmap.ColmapError, match=r"cameras\.txt:1.*WEIRD"):
        colmap.read_cameras_text(tmp_path / "cameras.txt")


def test_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        colmap.read_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="cameras.bin"):
        colmap.read_cameras_binary(tmp_path / "cameras.bin")


def test_text_model_that_is_not_text(tmp_path):
    colmap.write_model(*_random_model(), tmp_path, ext=".txt")
    (tmp_path / "cameras.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(colmap.ColmapError, match=r"cameras\.txt: not a COLMAP text file"):
        colmap.read_model(tmp_path)


def test_write_errors_name_the_path(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match=r"file/model/cameras\.bin"):
        colmap.write_model(*_random_model(), tmp_path / "file" / "model")
