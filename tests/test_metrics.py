"""Tests for mipnerf360.metrics against multinerf golden vectors and the LPIPS known answers."""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from mipnerf360 import metrics

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
ASTRONAUT = HERE / "data" / "astronaut" / "astronaut.png"


def golden(name):
    return np.load(GOLDEN / f"{name}.npz")


@pytest.mark.parametrize("pair", ["a", "b"])
def test_image_metrics_golden(pair):
    g = golden("image_metrics")
    pred, gt = g[f"in_pred_{pair}"], g[f"in_gt_{pair}"]
    np.testing.assert_array_equal(metrics.quantize(pred), g[f"out_pred_quantized_{pair}"])
    pq = metrics.quantize(pred)
    np.testing.assert_allclose(np.mean((pq - gt) ** 2), g[f"out_mse_{pair}"], rtol=1e-5)
    np.testing.assert_allclose(metrics.ssim(pq, gt), g[f"out_ssim_{pair}"], rtol=1e-5, atol=1e-6)
    m = metrics.compute_metrics(pred, gt, quantize=True, lpips_nets=())
    assert set(m) == {"psnr", "ssim"}
    np.testing.assert_allclose(m["psnr"], g[f"out_psnr_{pair}"], rtol=1e-5)
    np.testing.assert_allclose(m["ssim"], g[f"out_ssim_{pair}"], rtol=1e-5, atol=1e-6)
    # quantize=False really skips the rounding
    m_raw = metrics.compute_metrics(pred, gt, quantize=False, lpips_nets=())
    assert m_raw["psnr"] != pytest.approx(m["psnr"], abs=1e-9)


def test_psnr_mse_srgb_golden():
    g = golden("image_metrics")
    np.testing.assert_allclose(metrics.psnr_to_mse(g["in_psnrs"]), g["out_psnr_to_mse"], rtol=1e-6)
    np.testing.assert_allclose(
        metrics.mse_to_psnr(metrics.psnr_to_mse(g["in_psnrs"])),
        g["out_mse_to_psnr_roundtrip"],
        rtol=1e-6,
    )
    ramp = g["in_ramp"]
    np.testing.assert_allclose(metrics.linear_to_srgb(ramp), g["out_linear_to_srgb"], atol=1e-6)
    np.testing.assert_allclose(metrics.srgb_to_linear(ramp), g["out_srgb_to_linear"], atol=1e-6)
    x = np.linspace(0, 1, 57)
    np.testing.assert_allclose(metrics.srgb_to_linear(metrics.linear_to_srgb(x)), x, atol=1e-6)


def test_color_correct_golden():
    g = golden("image_color_correct")
    out = metrics.color_correct(g["in_img"], g["in_ref"])
    assert out.shape == g["out_corrected"].shape
    np.testing.assert_allclose(out, g["out_corrected"], atol=2e-6)


def test_color_correct_undoes_affine_colour_change():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.1, 0.9, size=(20, 30, 3))
    img = 0.8 * ref[..., ::-1] + 0.05  # channels swapped and scaled: a linear map of ref
    np.testing.assert_allclose(metrics.color_correct(img, ref), ref, atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        metrics.color_correct(img, ref[..., :2])


def test_ssim_properties():
    rng = np.random.default_rng(1)
    a = rng.uniform(size=(2, 24, 30, 3))
    assert np.allclose(metrics.ssim(a, a), 1.0)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    s = metrics.ssim(a, b)
    assert s.shape == (2,) and np.all(s < 0.97) and np.all(s > 0.5)
    assert metrics.ssim(a, b, return_map=True).shape == (2, 14, 20, 3)
    with pytest.raises(ValueError, match="smaller"):
        metrics.ssim(a[:, :8], b[:, :8])
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.ssim(a, b[..., :2])


def test_crop_borders():
    rng = np.random.default_rng(2)
    gt = rng.uniform(size=(30, 40, 3))
    pred = gt + 1e-3
    pred[:3] = 0.0  # damage only the border rows
    m = metrics.compute_metrics(pred, gt, lpips_nets=(), crop_borders=3, quantize=False)
    assert m["psnr"] == pytest.approx(60.0, abs=1e-6)
    assert m["ssim"] == pytest.approx(1.0, abs=1e-4)
    m0 = metrics.compute_metrics(pred, gt, lpips_nets=(), crop_borders=0, quantize=False)
    assert m0["psnr"] < 30
    with pytest.raises(ValueError):
        metrics.compute_metrics(pred, gt[:-1], lpips_nets=())


def _gaussian_blur_nearest(img, sigma):
    """skimage.filters.gaussian(img, sigma, channel_axis=-1) for float input: scipy's
    gaussian_filter with mode='nearest', truncate=4.0 on the two spatial axes."""
    r = int(4.0 * sigma + 0.5)
    x = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    out = img
    for axis in (0, 1):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return out


@pytest.fixture(scope="module")
def astronaut_pairs():
    img = iio.imread(ASTRONAUT).astype(np.float64) / 255.0
    assert img.shape == (512, 512, 3)
    return img, _gaussian_blur_nearest(img, 2.0), np.roll(img, 3, axis=1)


# Known answers on skimage.data.astronaut() / 255 (tests/data/astronaut) against (a) its
# Gaussian blur (skimage.filters.gaussian, sigma 2, channel_axis -1) and (b) a 3-pixel roll:
# LPIPS from the lpips package 0.1.4 (float32, CPU, inputs in [0, 1] with normalize=True,
# torchvision's ImageNet AlexNet / VGG16 feature weights); PSNR with data range 1; SSIM from
# skimage.metrics.structural_similarity with the reference's settings (see
# test_ssim_equals_scikit_image). Computed once and written down here.
KNOWN = {
    "blur": {"lpips_alex": 0.32342, "lpips_vgg": 0.29321, "psnr": 24.9866, "ssim": 0.80986},
    "shift": {"lpips_alex": 0.07312, "lpips_vgg": 0.15186, "psnr": 17.8122, "ssim": 0.57901},
}


@pytest.mark.parametrize("case", ["blur", "shift"])
def test_psnr_ssim_known_answers(astronaut_pairs, case):
    img, blur, shift = astronaut_pairs
    other = blur if case == "blur" else shift
    m = metrics.compute_metrics(other, img, quantize=False, lpips_nets=())
    assert m["psnr"] == pytest.approx(KNOWN[case]["psnr"], abs=1e-4)
    # skimage's SSIM (reflect-padded, border-cropped) equals the 'valid' dm_pix SSIM
    assert m["ssim"] == pytest.approx(KNOWN[case]["ssim"], abs=1e-5)


def lpips_or_skip(net):
    """The LPIPS model of ``net``, its backbone weights taken from $TORCH_HOME.

    Weights present: they must load (a corrupt file fails the test). Absent: torchvision
    downloads them; only when that fails too (no network) is the test skipped, saying so.
    CI provides the weights (TORCH_HOME), so there it never skips.
    """
    path = metrics.lpips_weights_path(net)
    if os.path.isfile(path):
        return metrics.get_lpips(net, allow_download=False)
    try:
        return metrics.get_lpips(net, allow_download=True)
    except metrics.LPIPSWeightsError as e:
        pytest.skip(
            f"LPIPS ({net}) weights are not at {path} ($TORCH_HOME) and downloading them "
            f"failed: {str(e).splitlines()[0]}"
        )


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_known_answers(astronaut_pairs, net):
    lpips_or_skip(net)
    img, blur, shift = astronaut_pairs
    for case, other in (("blur", blur), ("shift", shift)):
        d = metrics.lpips_distance(other, img, net=net)
        assert d == pytest.approx(KNOWN[case][f"lpips_{net}"], abs=2e-5), case
    assert metrics.lpips_distance(img, img, net=net) == pytest.approx(0.0, abs=1e-6)
    # built once and cached
    assert metrics.get_lpips(net) is metrics.get_lpips(net)


def test_compute_metrics_lpips_keys(astronaut_pairs):
    lpips_or_skip("alex")
    img, blur, _ = astronaut_pairs
    m = metrics.compute_metrics(blur[:64, :96], img[:64, :96], lpips_nets=("alex",))
    assert set(m) == {"psnr", "ssim", "lpips_alex"}
    assert 0.0 < m["lpips_alex"] < 1.0


def test_missing_lpips_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    for net, fname in metrics.LPIPS_BACKBONE_FILES.items():
        with pytest.raises(metrics.LPIPSWeightsError) as ei:
            metrics.get_lpips(net, allow_download=False)
        msg = str(ei.value)
        assert str(tmp_path / "empty_torch_home" / "hub" / "checkpoints" / fname) in msg
        assert "eval.lpips=false" in msg and "TORCH_HOME" in msg


def test_lpips_download_failure_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(metrics.LPIPSWeightsError, match="alexnet-owt-7be5be79.pth") as ei:
        metrics.get_lpips("alex", allow_download=True)
    assert "eval.lpips=false" in str(ei.value)


def test_corrupt_lpips_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "alexnet-owt-7be5be79.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(metrics.LPIPSWeightsError, match="unreadable") as ei:
        metrics.get_lpips("alex")
    assert str(ckpt / "alexnet-owt-7be5be79.pth") in str(ei.value)


# --------------------------------------------------------------------------- the registry


def test_registry_is_consistent():
    from mipnerf360.configs import LPIPS_NETS

    for key, m in metrics.METRICS.items():
        assert key == m.name
        assert m.fmt in (".2f", ".3f") and m.label
        assert format(1.0, m.fmt)  # a valid format spec
    lp = [m for m in metrics.METRICS.values() if m.option == "lpips"]
    assert [m.name for m in lp] == [f"lpips_{n}" for n in LPIPS_NETS]
    assert all(not m.higher_is_better for m in lp)
    assert set(metrics.LPIPS_BACKBONE_FILES) == set(LPIPS_NETS)
    assert metrics.METRICS["psnr"].higher_is_better and metrics.METRICS["ssim"].higher_is_better


def test_published_keys_match_published_yaml():
    """Every key of published.yaml is read by exactly one metric, and no metric points at a
    key that does not exist (a rename would otherwise show a dash in the tables)."""
    import yaml

    pub = yaml.safe_load((Path(metrics.__file__).parent / "published.yaml").read_text())
    keys = {k for entry in pub.values() for s in entry["scenes"].values() for k in s}
    keys |= {k for entry in pub.values() for k in entry.get("mean", {})}
    mapped = [m.published_key for m in metrics.METRICS.values() if m.published_key]
    assert sorted(mapped) == sorted(keys)
    assert metrics.METRICS["lpips_vgg"].published_key == "lpips"  # see published.yaml's header


def test_select_and_compute_metrics_follow_the_registry():
    rng = np.random.default_rng(3)
    gt = rng.uniform(0.1, 0.9, size=(40, 48, 3))
    pred = np.clip(0.7 * gt + 0.2 + rng.normal(0, 0.01, gt.shape), 0, 1)  # a colour shift
    assert [m.name for m in metrics.select()] == ["psnr", "ssim"]
    assert [m.name for m in metrics.select(["vgg"], color_correct=True)] == [
        "psnr",
        "ssim",
        "lpips_vgg",
        "cc_psnr",
        "cc_ssim",
    ]
    with pytest.raises(ValueError, match="squeeze"):
        metrics.select(["squeeze"])
    m = metrics.compute_metrics(pred, gt, lpips_nets=(), color_correct=True)
    assert list(m) == ["psnr", "ssim", "cc_psnr", "cc_ssim"]
    # Colour correction undoes the affine colour shift: only the noise (and 8 bit) remain.
    cc = np.round(metrics.color_correct(pred, gt).astype(np.float64) * 255) / 255
    assert m["cc_psnr"] == pytest.approx(float(metrics.mse_to_psnr(np.mean((cc - gt) ** 2))))
    assert m["cc_ssim"] == pytest.approx(float(metrics.ssim(cc, gt)))
    assert m["cc_psnr"] > m["psnr"] + 8 and m["cc_ssim"] > m["ssim"]
    assert metrics.METRICS["psnr"].format(31.234) == "31.23"
    assert metrics.METRICS["ssim"].format(None) == "–"


def test_cc_metrics_crop_and_quantise_like_multinerf():
    """multinerf eval.py: colour-correct the float render on the full image, then quantise,
    then crop render, corrected render and ground truth alike."""
    rng = np.random.default_rng(4)
    gt = rng.uniform(0.1, 0.9, size=(30, 36, 3))
    pred = np.clip(0.8 * gt + 0.1 + rng.normal(0, 0.02, gt.shape), 0, 1)
    pair = metrics.prepare_pair(pred, gt, quantize=True, crop_borders=2, color_correct=True)
    cc = metrics.color_correct(pred, gt).astype(np.float64)
    np.testing.assert_array_equal(pair.pred_cc, (np.round(cc * 255) / 255)[2:-2, 2:-2])
    np.testing.assert_array_equal(pair.pred, (np.round(pred * 255) / 255)[2:-2, 2:-2])
    np.testing.assert_array_equal(pair.gt, gt[2:-2, 2:-2])
    assert metrics.prepare_pair(pred, gt).pred_cc is None


def test_mse_to_psnr_numpy_and_torch():
    mse = np.array([1e-2, 1e-3])
    np.testing.assert_allclose(metrics.mse_to_psnr(mse), [20.0, 30.0])
    t = torch.tensor([1e-2, 1e-3], requires_grad=True)
    out = metrics.mse_to_psnr(t)
    assert isinstance(out, torch.Tensor) and out.requires_grad
    np.testing.assert_allclose(out.detach().numpy(), [20.0, 30.0], rtol=1e-6)


# --------------------------------------------------------------------------- SSIM vs skimage

BIRD = HERE / "data" / "bird" / "images"
# The reference's SSIM (dm_pix.ssim defaults) in scikit-image's terms.
SKIMAGE_SSIM = dict(
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1
)


def _bird(name):
    return iio.imread(BIRD / name).astype(np.float64) / 255.0


@pytest.mark.parametrize(
    "case", ["bird_neighbours", "bird_far_apart", "astronaut_blur", "astronaut_shift"]
)
def test_ssim_equals_scikit_image(case, astronaut_pairs):
    """SSIM equals scikit-image's structural_similarity with the reference's settings
    (Gaussian window 11 = 2 * int(3.5 * 1.5 + 0.5) + 1 taps, sigma 1.5, K1 0.01, K2 0.03,
    data range 1, population covariance) on real images.

    Border handling differs: skimage filters the whole image with reflect padding and then
    averages the SSIM map without its (11 - 1) / 2 = 5-pixel border, dm_pix filters 'valid'
    (no padding). The cropped region of skimage's map is exactly where no padded pixel was
    used, so the two maps agree there and so do the means. The only other difference is
    dm_pix's clamping of variances to >= float32 eps^2 (~1.4e-14), which moves SSIM by
    ~1e-11 (measured 3e-12 here). Inputs must be float64: skimage keeps float32 inputs in
    float32 and then differs by ~1e-7.
    """
    from skimage.metrics import structural_similarity

    img, blur, shift = astronaut_pairs
    a, b = {
        "bird_neighbours": (_bird("001.jpg"), _bird("002.jpg")),
        "bird_far_apart": (_bird("001.jpg"), _bird("100.jpg")),
        "astronaut_blur": (blur, img),
        "astronaut_shift": (shift, img),
    }[case]
    ours = metrics.ssim(a, b)
    theirs, smap = structural_similarity(a, b, full=True, **SKIMAGE_SSIM)
    assert ours == pytest.approx(theirs, abs=1e-5)
    np.testing.assert_allclose(metrics.ssim(a, b, return_map=True), smap[5:-5, 5:-5], atol=1e-9)
