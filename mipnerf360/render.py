"""Ray casting into Gaussians and volume rendering (multinerf ``internal/render.py``).

Pure torch, arbitrary leading batch dims, float32/float64, any device, differentiable.
Formulas: multinerf's functions of the same names and mip-NeRF Eq. 7 (stable
conical-frustum moments).
"""

from __future__ import annotations

import math

import torch

from mipnerf360 import stepfun
from mipnerf360.coord import EPS32


def lift_gaussian(
    d: torch.Tensor,
    t_mean: torch.Tensor,
    t_var: torch.Tensor,
    r_var: torch.Tensor,
    diag: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lift 1D along-ray / radial moments into 3D Gaussians.

    d [..., 3] (not normalised); t_mean, t_var, r_var [..., S] ->
    mean = d t_mean [..., S, 3] (relative to the ray origin) and
    cov = t_var d d^T + r_var (I - d d^T / |d|^2): [..., S, 3, 3], or its diagonal
    [..., S, 3] when diag.
    """
    mean = d[..., None, :] * t_mean[..., None]
    d_mag_sq = torch.clamp(torch.sum(d * d, dim=-1, keepdim=True), min=1e-10)
    if diag:
        d_outer_diag = d * d
        null_outer_diag = 1 - d_outer_diag / d_mag_sq
        t_cov_diag = t_var[..., None] * d_outer_diag[..., None, :]
        xy_cov_diag = r_var[..., None] * null_outer_diag[..., None, :]
        return mean, t_cov_diag + xy_cov_diag
    d_outer = d[..., :, None] * d[..., None, :]
    eye = torch.eye(d.shape[-1], dtype=d.dtype, device=d.device)
    null_outer = eye - d[..., :, None] * (d / d_mag_sq)[..., None, :]
    t_cov = t_var[..., None, None] * d_outer[..., None, :, :]
    xy_cov = r_var[..., None, None] * null_outer[..., None, :, :]
    return mean, t_cov + xy_cov


def conical_frustum_to_gaussian(
    d: torch.Tensor,
    t0: torch.Tensor,
    t1: torch.Tensor,
    base_radius: torch.Tensor,
    diag: bool,
    stable: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian approximation of the conical frustum between t0 and t1 (mip-NeRF Eq. 7).

    d [..., 3]; t0, t1 [..., S]; base_radius: cone radius at t = 1, broadcastable to t0
    (e.g. [..., 1]). Returns lift_gaussian's (mean, cov).
    """
    if stable:
        mu = (t0 + t1) / 2
        hw = (t1 - t0) / 2
        hw2 = hw * hw
        mu2 = mu * mu
        denom = torch.clamp(3 * mu2 + hw2, min=EPS32)
        t_mean = mu + (2 * mu * hw2) / denom
        t_var = hw2 / 3 - (4 / 15) * (hw2 * hw2 * (12 * mu2 - hw2)) / (denom * denom)
        r_var = mu2 / 4 + (5 / 12) * hw2 - (4 / 15) * (hw2 * hw2) / denom
    else:
        t03, t13 = t0**3, t1**3
        t05, t15 = t0**5, t1**5
        t_mean = (3 * (t1**4 - t0**4)) / (4 * (t13 - t03))
        r_var = (3 / 20) * (t15 - t05) / (t13 - t03)
        t_mosq = (3 / 5) * (t15 - t05) / (t13 - t03)
        t_var = t_mosq - t_mean**2
    r_var = r_var * base_radius**2
    return lift_gaussian(d, t_mean, t_var, r_var, diag)


def cylinder_to_gaussian(
    d: torch.Tensor,
    t0: torch.Tensor,
    t1: torch.Tensor,
    radius: torch.Tensor,
    diag: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian approximation of the cylinder segment [t0, t1] of the given radius.

    t_mean = (t0+t1)/2, t_var = (t1-t0)^2/12, r_var = radius^2/4. Shapes as
    :func:`conical_frustum_to_gaussian`.
    """
    t_mean = (t0 + t1) / 2
    r_var = radius**2 / 4
    t_var = (t1 - t0) ** 2 / 12
    return lift_gaussian(d, t_mean, t_var, r_var, diag)


def cast_rays(
    tdist: torch.Tensor,
    origins: torch.Tensor,
    directions: torch.Tensor,
    radii: torch.Tensor,
    ray_shape: str = "cone",
    diag: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussians of the intervals [tdist_i, tdist_{i+1}] of each ray.

    tdist [..., S+1], origins/directions [..., 3], radii [..., 1]; ray_shape 'cone' or
    'cylinder' -> means [..., S, 3], covs [..., S, 3, 3] (or [..., S, 3] when diag).
    """
    t0 = tdist[..., :-1]
    t1 = tdist[..., 1:]
    if ray_shape == "cone":
        gaussian_fn = conical_frustum_to_gaussian
    elif ray_shape == "cylinder":
        gaussian_fn = cylinder_to_gaussian
    else:
        raise ValueError(f"ray_shape must be 'cone' or 'cylinder', got {ray_shape!r}")
    means, covs = gaussian_fn(directions, t0, t1, radii, diag)
    return means + origins[..., None, :], covs


def compute_alpha_weights(
    density: torch.Tensor,
    tdist: torch.Tensor,
    dirs: torch.Tensor,
    opaque_background: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alpha compositing weights.

    density [..., S], tdist [..., S+1], dirs [..., 3] (un-normalised; |dirs| scales t to
    metric length) -> (weights, alpha, trans), each [..., S]. opaque_background makes the
    last interval fully opaque.
    """
    t_delta = tdist[..., 1:] - tdist[..., :-1]
    delta = t_delta * torch.linalg.vector_norm(dirs, dim=-1, keepdim=True)
    density_delta = density * delta
    if opaque_background:
        density_delta = torch.cat(
            [density_delta[..., :-1], torch.full_like(density_delta[..., -1:], math.inf)],
            dim=-1,
        )
    alpha = 1 - torch.exp(-density_delta)
    trans = torch.exp(
        -torch.cat(
            [
                torch.zeros_like(density_delta[..., :1]),
                torch.cumsum(density_delta[..., :-1], dim=-1),
            ],
            dim=-1,
        )
    )
    weights = alpha * trans
    return weights, alpha, trans


def volumetric_rendering(
    rgbs: torch.Tensor,
    weights: torch.Tensor,
    tdist: torch.Tensor,
    bg_rgbs,
    t_far: torch.Tensor,
    compute_extras: bool,
    extras: dict | None = None,
) -> dict:
    """Composite per-sample colours along each ray.

    rgbs [..., S, 3], weights [..., S], tdist [..., S+1], bg_rgbs broadcastable to [..., 3]
    (e.g. a float), t_far [..., 1]. Returns {'rgb' [..., 3], 'acc' [...]} and, when
    compute_extras, 'distance_mean', 'distance_median', 'distance_percentile_5',
    'distance_percentile_95' [...] plus one weighted sum per entry of extras
    ({name: [..., S, C]} -> [..., C]).
    """
    rendering = {}
    acc = weights.sum(dim=-1)
    bg_w = torch.clamp(1 - acc[..., None], min=0)  # weight of the background
    rgb = (weights[..., None] * rgbs).sum(dim=-2) + bg_w * bg_rgbs
    rendering["rgb"] = rgb
    rendering["acc"] = acc

    if compute_extras:
        if extras is not None:
            for k, v in extras.items():
                if v is not None:
                    rendering[k] = (weights[..., None] * v).sum(dim=-2)

        t_mids = 0.5 * (tdist[..., 1:] + tdist[..., :-1])
        expected_log = (weights * torch.log(t_mids)).sum(dim=-1) / torch.clamp(acc, min=EPS32)
        dist_mean = torch.nan_to_num(torch.exp(expected_log), nan=math.inf)
        rendering["distance_mean"] = torch.clamp(dist_mean, min=tdist[..., 0], max=tdist[..., -1])

        t_far = torch.as_tensor(t_far, dtype=tdist.dtype, device=tdist.device)
        t_far = t_far.expand(tdist.shape[:-1] + (1,))
        t_aug = torch.cat([tdist, t_far], dim=-1)
        weights_aug = torch.cat([weights, bg_w], dim=-1)
        ps = [5, 50, 95]
        distance_percentiles = stepfun.weighted_percentile(t_aug, weights_aug, ps)
        for i, p in enumerate(ps):
            s = "median" if p == 50 else "percentile_" + str(p)
            rendering["distance_" + s] = distance_percentiles[..., i]
    return rendering
