"""Image metrics with the reference evaluation protocol.

PSNR, SSIM, colour correction and the sRGB curves follow multinerf's ``internal/image.py``
(and ``dm_pix.ssim``, which multinerf's ``eval.py`` calls); formulas from
/work/shared/reference/mipnerf360-spec.md section 11 and the golden README
(``image_metrics.npz``, ``image_color_correct.npz``).  LPIPS is not part of multinerf; it is
computed with the ``lpips`` package (``lpips.LPIPS(net='alex'|'vgg')``, inputs in [0, 1]
with ``normalize=True``).

All image arguments are numpy arrays ``[H, W, C]`` with values in [0, 1] unless stated.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Sequence

import numpy as np

from mipnerf360.errors import UserError

# torchvision's ImageNet weight files the lpips package loads (under $TORCH_HOME/hub/checkpoints).
LPIPS_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
}

_F32_EPS = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------- PSNR / sRGB


def mse_to_psnr(mse):
    """PSNR (max value 1) of a mean squared error: -10 / ln(10) * ln(mse) (image.mse_to_psnr)."""
    return -10.0 / np.log(10.0) * np.log(mse)


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


# --------------------------------------------------------------------------- all metrics


def compute_metrics(
    pred,
    gt,
    quantize: bool = True,
    lpips_nets: Sequence[str] = ("alex", "vgg"),
    crop_borders: int = 0,
    device="cpu",
) -> dict:
    """PSNR, SSIM and LPIPS of one rendered image against its ground truth.

    Args:
      pred, gt: [H, W, 3] arrays in [0, 1].
      quantize: round ``pred`` to 8 bit first (the reference protocol).
      lpips_nets: LPIPS backbones to evaluate ('alex', 'vgg'); empty to skip LPIPS.
      crop_borders: pixels removed from every side of both images first.
    Returns:
      {'psnr', 'ssim', 'lpips_<net>' for each net} as Python floats.
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"compute_metrics: prediction {pred.shape} and ground truth {gt.shape}")
    if crop_borders < 0:
        raise ValueError(f"compute_metrics: crop_borders must be >= 0, got {crop_borders}")
    if crop_borders:
        c = crop_borders
        pred, gt = pred[c:-c, c:-c], gt[c:-c, c:-c]
    if quantize:
        pred = _quantize8(pred)
    out = {
        "psnr": float(mse_to_psnr(np.mean((pred - gt) ** 2))),
        "ssim": float(ssim(pred, gt)),
    }
    for net in lpips_nets:
        out[f"lpips_{net}"] = lpips_distance(pred, gt, net=net, device=device)
    return out
