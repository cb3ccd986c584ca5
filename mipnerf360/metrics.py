"""Image metrics with the reference evaluation protocol, and the one definition of each.

PSNR, SSIM, colour correction and the sRGB curves follow multinerf's ``internal/image.py``
(and ``dm_pix.ssim``, which multinerf's ``eval.py`` calls through ``image.MetricHarness``);
checked against multinerf's outputs in tests/golden (``image_metrics.npz``,
``image_color_correct.npz``, see tests/test_metrics.py). LPIPS is not part of multinerf; it
is computed with the ``lpips`` package (``lpips.LPIPS(net='alex'|'vgg')``, inputs in
[0, 1] with ``normalize=True``).

``METRICS`` is the registry every consumer reads (evaluate writes these keys to
metrics.json, tables and the report take their headers, formats, directions and published
keys from it): adding a metric is one ``Metric`` entry here.

All image arguments are numpy arrays ``[H, W, C]`` with values in [0, 1] unless stated.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mipnerf360.configs import LPIPS_NETS
from mipnerf360.errors import UserError

# torchvision's ImageNet weight files the lpips package loads (under $TORCH_HOME/hub/checkpoints).
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
}

_F32_EPS = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------- PSNR / sRGB


def mse_to_psnr(mse):
    """PSNR (max value 1) of a mean squared error: -10 / ln(10) * ln(mse) (image.mse_to_psnr).

    A torch tensor gives a tensor (on its device, differentiable); a number or numpy array
    gives numpy. The one home of this formula (training logs it, evaluation reports it).
    """
    torch = sys.modules.get("torch")  # a tensor implies torch is imported already
    log = mse.log() if torch is not None and isinstance(mse, torch.Tensor) else np.log(mse)
    return -10.0 / math.log(10.0) * log


def psnr_to_mse(psnr):
    """Inverse of :func:`mse_to_psnr`: exp(-0.1 * ln(10) * psnr) (image.psnr_to_mse)."""
    return np.exp(-0.1 * np.log(10.0) * psnr)


def linear_to_srgb(linear, eps: float | None = None):
    """Linear RGB -> sRGB gamma curve (image.linear_to_srgb). Any shape."""
    eps = _F32_EPS if eps is None else eps
    linear = np.asarray(linear)
    srgb0 = 323 / 25 * linear
    srgb1 = (211 * np.maximum(eps, linear) ** (5 / 12) - 11) / 200
    return np.where(linear <= 0.0031308, srgb0, srgb1)


def srgb_to_linear(srgb, eps: float | None = None):
    """sRGB -> linear RGB (image.srgb_to_linear). Any shape."""
    eps = _F32_EPS if eps is None else eps
    srgb = np.asarray(srgb)
    linear0 = 25 / 323 * srgb
    linear1 = np.maximum(eps, (200 * srgb + 11) / 211) ** (12 / 5)
    return np.where(srgb <= 0.04045, linear0, linear1)


def quantize(x):
    """Round to 8 bit as the evaluation does: round(x * 255) / 255 (eval_quantize_metrics)."""
    return np.round(np.asarray(x) * 255.0) / 255.0


_quantize8 = quantize  # compute_metrics has a parameter named ``quantize``


# --------------------------------------------------------------------------- SSIM


def _gaussian_filter_1d(filter_size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps, as dm_pix.ssim builds them. [filter_size]."""
    hw = filter_size // 2
    shift = (2 * hw - filter_size + 1) / 2
    f_i = ((np.arange(filter_size) - hw + shift) / sigma) ** 2
    filt = np.exp(-0.5 * f_i)
    return filt / filt.sum()


def _valid_filter(z: np.ndarray, filt: np.ndarray, axis: int) -> np.ndarray:
    """'valid' 1-D correlation of z with filt along axis (filt is symmetric, so = convolution).

    Loops over the filter taps only (11), every tap is a whole-array operation.
    """
    n = z.shape[axis] - len(filt) + 1
    out = np.zeros(z.shape[:axis] + (n,) + z.shape[axis + 1 :], dtype=np.float64)
    for k, w in enumerate(filt):
        out += w * np.take(z, np.arange(k, k + n), axis=axis)
    return out


def ssim(
    a,
    b,
    max_val: float = 1.0,
    filter_size: int = 11,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    return_map: bool = False,
):
    """Structural similarity exactly as ``dm_pix.ssim`` (multinerf's eval metric).

    Args:
      a, b: images [..., H, W, C] (same shape), values in [0, max_val].
      Separable Gaussian of ``filter_size`` taps and std ``filter_sigma``, 'valid' filtering
      (no padding), variances clamped >= float32 eps^2, covariance clamped to
      +-sqrt(var_a var_b).
    Returns:
      mean of the SSIM map over H, W and C: [...] (a float for single images), or the map
      [..., H - filter_size + 1, W - filter_size + 1, C] when ``return_map``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ssim: image shapes differ: {a.shape} vs {b.shape}")
    if a.ndim < 3:
        raise ValueError(f"ssim: expected images [..., H, W, C], got shape {a.shape}")
    h, w = a.shape[-3], a.shape[-2]
    if h < filter_size or w < filter_size:
        raise ValueError(
            f"ssim: image {h}x{w} is smaller than the {filter_size}x{filter_size} filter"
        )
    filt = _gaussian_filter_1d(filter_size, filter_sigma)

    def blur(z):
        return _valid_filter(_valid_filter(z, filt, axis=z.ndim - 2), filt, axis=z.ndim - 3)

    mu0, mu1 = blur(a), blur(b)
    mu00, mu11, mu01 = mu0 * mu0, mu1 * mu1, mu0 * mu1
    sigma00 = blur(a * a) - mu00
    sigma11 = blur(b * b) - mu11
    sigma01 = blur(a * b) - mu01
    eps = _F32_EPS**2
    sigma00 = np.maximum(eps, sigma00)
    sigma11 = np.maximum(eps, sigma11)
    sigma01 = np.sign(sigma01) * np.minimum(np.sqrt(sigma00 * sigma11), np.abs(sigma01))
    c1 = (k1 * max_val) ** 2
    c2 = (k2 * max_val) ** 2
    numer = (2 * mu01 + c1) * (2 * sigma01 + c2)
    denom = (mu00 + mu11 + c1) * (sigma00 + sigma11 + c2)
    ssim_map = numer / denom
    if return_map:
        return ssim_map
    return ssim_map.mean(axis=(-3, -2, -1))


# --------------------------------------------------------------------------- colour correction


def color_correct(img, ref, num_iters: int = 5, eps: float = 0.5 / 255):
    """Warp the colours of ``img`` to match ``ref`` (image.color_correct).

    Per output channel, a least-squares fit of ``ref`` from [quadratic terms img_i * img_j
    (i <= j), linear terms, 1] of ``img``, ignoring pixels clipped (outside [eps, 1 - eps])
    in the input, the current estimate or the reference; repeated ``num_iters`` times.

    Args:
      img, ref: [H, W, C] images.
    Returns:
      corrected image [H, W, C] (float32, like the reference), clipped to [0, 1].
    """
    img = np.asarray(img, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if img.shape[-1] != ref.shape[-1]:
        raise ValueError(
            f"color_correct: img's {img.shape[-1]} channels != ref's {ref.shape[-1]} channels"
        )
    nc = img.shape[-1]
    img_mat = img.reshape(-1, nc)
    ref_mat = ref.reshape(-1, nc)

    def is_unclipped(z):
        return (z >= eps) & (z <= 1 - eps)

    mask0 = is_unclipped(img_mat)
    # Quadratic terms in the reference's order: for c, img[:, c] * img[:, c:].
    iu, ju = np.triu_indices(nc)
    for _ in range(num_iters):
        a_mat = np.concatenate(
            [img_mat[:, iu] * img_mat[:, ju], img_mat, np.ones_like(img_mat[:, :1])], axis=-1
        )
        warp = []
        for c in range(nc):  # loop over colour channels (3), not pixels
            b = ref_mat[:, c]
            mask = mask0[:, c] & is_unclipped(img_mat[:, c]) & is_unclipped(b)
            ma_mat = np.where(mask[:, None], a_mat, 0.0)
            mb = np.where(mask, b, 0.0)
            w = np.linalg.lstsq(ma_mat, mb, rcond=-1)[0]
            if not np.all(np.isfinite(w)):
                raise FloatingPointError("color_correct: non-finite colour warp")
            warp.append(w)
        warp = np.stack(warp, axis=-1)
        img_mat = np.clip(a_mat @ warp, 0.0, 1.0)
    return img_mat.reshape(img.shape).astype(np.float32)


color_correct_fn = color_correct  # prepare_pair has a parameter named ``color_correct``


# --------------------------------------------------------------------------- LPIPS

_LPIPS_CACHE: dict = {}


class LPIPSWeightsError(UserError, RuntimeError):
    """The LPIPS backbone (torchvision ImageNet) weights could not be loaded."""


def _torch_hub_checkpoints() -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def lpips_weights_path(net: str) -> str:
    """Where torchvision (and so the lpips package) looks for the backbone weights of ``net``."""
    if net not in LPIPS_BACKBONE_FILES:
        raise ValueError(
            f"unknown LPIPS net {net!r}; expected one of {sorted(LPIPS_BACKBONE_FILES)}"
        )
    return os.path.join(_torch_hub_checkpoints(), LPIPS_BACKBONE_FILES[net])


def _weights_help(net: str, problem: str) -> str:
    path = lpips_weights_path(net)
    return (
        f"LPIPS ({net}): cannot load the backbone weights: {problem}.\n"
        f"Put torchvision's ImageNet weights file at {path}\n"
        f"(i.e. $TORCH_HOME/hub/checkpoints/{LPIPS_BACKBONE_FILES[net]}; TORCH_HOME defaults to "
        f"~/.cache/torch and is currently {os.environ.get('TORCH_HOME', '<unset>')!r}), "
        "or run once with internet access so torchvision downloads it, "
        "or switch LPIPS off with eval.lpips=false."
    )


def get_lpips(net: str = "alex", device="cpu", allow_download: bool = True):
    """The ``lpips.LPIPS(net=net)`` module in eval mode on ``device``, built once and cached.

    If the backbone weights are not cached under $TORCH_HOME/hub/checkpoints and
    ``allow_download`` is False, or loading/downloading fails, raises
    :class:`LPIPSWeightsError` saying where to put the file.
    """
    import torch

    path = lpips_weights_path(net)
    key = (net, str(torch.device(device)), path)
    if key in _LPIPS_CACHE:
        return _LPIPS_CACHE[key]
    if not os.path.isfile(path) and not allow_download:
        raise LPIPSWeightsError(_weights_help(net, f"{path} does not exist (downloads disabled)"))
    import lpips

    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # lpips prints set-up chatter and uses torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net=net, verbose=False)
    except Exception as e:  # network errors, corrupt or truncated checkpoints, ...
        what = "download or load failed" if not os.path.isfile(path) else "the file is unreadable"
        raise LPIPSWeightsError(_weights_help(net, f"{what} ({type(e).__name__}: {e})")) from e
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    _LPIPS_CACHE[key] = model
    return model


def lpips_distance(pred, gt, net: str = "alex", device="cpu", allow_download: bool = True):
    """LPIPS distance between two [H, W, 3] images in [0, 1] (float)."""
    import torch

    model = get_lpips(net, device, allow_download)

    def to_t(x):
        x = np.asarray(x, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None])).to(device)

    with torch.no_grad():
        d = model(to_t(pred), to_t(gt), normalize=True)
    return float(d.reshape(-1)[0].item())


# --------------------------------------------------------------------------- the registry


@dataclass
class ImagePair:
    """One rendered image and its ground truth, prepared as the protocol says.

    ``pred`` and ``gt`` are [H, W, 3] float64 in [0, 1], ``pred`` already quantised to 8 bit
    (when the protocol quantises) and both already border-cropped; ``pred_cc`` is the
    colour-corrected render treated the same way (None unless colour correction was asked
    for). ``device`` is where the LPIPS networks run.
    """

    pred: np.ndarray
    gt: np.ndarray
    pred_cc: np.ndarray | None = None
    device: str = "cpu"


def _psnr(pair: ImagePair) -> float:
    return float(mse_to_psnr(np.mean((pair.pred - pair.gt) ** 2)))


def _ssim(pair: ImagePair) -> float:
    return float(ssim(pair.pred, pair.gt))


def _corrected(pair: ImagePair) -> np.ndarray:
    if pair.pred_cc is None:
        raise ValueError("a colour-corrected metric needs ImagePair.pred_cc")
    return pair.pred_cc


def _cc_psnr(pair: ImagePair) -> float:
    return float(mse_to_psnr(np.mean((_corrected(pair) - pair.gt) ** 2)))


def _cc_ssim(pair: ImagePair) -> float:
    return float(ssim(_corrected(pair), pair.gt))


def _lpips_fn(net: str) -> Callable[[ImagePair], float]:
    def compute(pair: ImagePair) -> float:
        return lpips_distance(pair.pred, pair.gt, net=net, device=pair.device)

    compute.__name__ = f"_lpips_{net}"
    return compute


@dataclass(frozen=True)
class Metric:
    """The one definition of a metric: how it is computed, named, shown and compared.

    name:             key in metrics.json / metrics.csv ('psnr', 'lpips_vgg', ...)
    label:            column header in the tables ('PSNR', 'LPIPS (VGG)', ...)
    higher_is_better: direction (PSNR, SSIM up; LPIPS down)
    fmt:              format spec of a value in the tables ('.2f', '.3f')
    published_key:    the key in published.yaml it is compared with, or None
    compute:          ImagePair -> float
    option:           the evaluation switch that turns it on: None (always computed),
                      'lpips' (one per net in eval.lpips_nets) or 'color_correct'
    """

    name: str
    label: str
    higher_is_better: bool
    fmt: str
    published_key: str | None
    compute: Callable[[ImagePair], float]
    option: str | None = None

    def format(self, value: float | None) -> str:
        """The value as the tables show it ('–' for a missing value)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return format(value, self.fmt)


# The LPIPS network multinerf's published numbers are compared with (see published.yaml:
# multinerf does not specify it, issue #116; 3DGS's evaluation uses VGG).
PUBLISHED_LPIPS_NET = "vgg"
_LPIPS_LABELS = {"alex": "LPIPS (Alex)", "vgg": "LPIPS (VGG)"}

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("psnr", "PSNR", True, ".2f", "psnr", _psnr),
        Metric("ssim", "SSIM", True, ".3f", "ssim", _ssim),
        *(
            Metric(
                f"lpips_{net}",
                _LPIPS_LABELS.get(net, f"LPIPS ({net})"),
                False,
                ".3f",
                "lpips" if net == PUBLISHED_LPIPS_NET else None,
                _lpips_fn(net),
                option="lpips",
            )
            for net in LPIPS_NETS
        ),
        # multinerf eval.py: metrics of image.color_correct(render, gt), written as
        # metric_cc_<name>; the published numbers are the uncorrected ones.
        Metric("cc_psnr", "PSNR (cc)", True, ".2f", None, _cc_psnr, option="color_correct"),
        Metric("cc_ssim", "SSIM (cc)", True, ".3f", None, _cc_ssim, option="color_correct"),
    )
}


def select(lpips_nets: Sequence[str] = (), color_correct: bool = False) -> list[Metric]:
    """The metrics an evaluation computes, in registry order: the always-on ones, LPIPS for
    each net in ``lpips_nets``, and the colour-corrected ones when ``color_correct``."""
    bad = sorted(set(lpips_nets) - set(LPIPS_NETS))
    if bad:
        raise ValueError(f"unknown LPIPS net(s) {bad}; expected some of {list(LPIPS_NETS)}")
    out = []
    for m in METRICS.values():
        if (
            m.option is None
            or (m.option == "lpips" and m.name.removeprefix("lpips_") in lpips_nets)
            or (m.option == "color_correct" and color_correct)
        ):
            out.append(m)
    return out


# --------------------------------------------------------------------------- all metrics


def prepare_pair(
    pred,
    gt,
    quantize: bool = True,
    crop_borders: int = 0,
    color_correct: bool = False,
    device="cpu",
) -> ImagePair:
    """The images a metric sees, in multinerf eval.py's order: colour-correct the float
    render against the ground truth (``image.color_correct``), quantise render and
    corrected render to 8 bit (``eval_quantize_metrics``), then crop ``crop_borders``
    pixels from every side of all three (``eval_crop_borders``).

    Args:
      pred, gt: [H, W, 3] arrays in [0, 1] of the same shape.
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    if crop_borders < 0:
        raise ValueError(f"crop_borders must be >= 0, got {crop_borders}")
    pred_cc = color_correct_fn(pred, gt).astype(np.float64) if color_correct else None
    if quantize:
        pred = _quantize8(pred)
        pred_cc = None if pred_cc is None else _quantize8(pred_cc)
    if crop_borders:
        c = crop_borders
        pred, gt = pred[c:-c, c:-c], gt[c:-c, c:-c]
        pred_cc = None if pred_cc is None else pred_cc[c:-c, c:-c]
    return ImagePair(pred, gt, pred_cc, str(device))


def compute_metrics(
    pred,
    gt,
    quantize: bool = True,
    lpips_nets: Sequence[str] = LPIPS_NETS,
    crop_borders: int = 0,
    device="cpu",
    color_correct: bool = False,
) -> dict:
    """The selected metrics (see :func:`select`) of one rendered image against its truth.

    Args:
      pred, gt: [H, W, 3] arrays in [0, 1].
      quantize: round ``pred`` to 8 bit first (the reference protocol).
      lpips_nets: LPIPS backbones to evaluate (configs.LPIPS_NETS); empty to skip LPIPS.
      crop_borders: pixels removed from every side of both images first.
      color_correct: also 'cc_psnr' and 'cc_ssim' of the colour-corrected render.
    Returns:
      {metric name: Python float} in registry order.
    """
    pair = prepare_pair(pred, gt, quantize, crop_borders, color_correct, device)
    return {m.name: m.compute(pair) for m in select(lpips_nets, color_correct)}
