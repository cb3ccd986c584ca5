"""render: golden parity with multinerf plus properties (weights, gradients, shapes)."""

import pytest
import torch
from helpers import close, load, t

from mipnerf360 import render

# ---------------------------------------------------------------- golden parity


@pytest.mark.parametrize("shape", ["cone", "cylinder"])
def test_cast_rays_golden(shape):
    g = load(f"render_cast_rays_{shape}")
    args = [t(g[k]) for k in ("in_tdist", "in_origins", "in_directions", "in_radii")]
    means, covs = render.cast_rays(*args, ray_shape=shape, diag=False)
    assert means.shape == (16, 24, 3) and covs.shape == (16, 24, 3, 3)
    close(means, g["out_means"])
    close(covs, g["out_covs_full"])
    means_d, covs_d = render.cast_rays(*args, ray_shape=shape, diag=True)
    close(means_d, g["out_means_diag"])
    close(covs_d, g["out_covs_diag"])


def test_conical_frustum_to_gaussian_golden():
    g = load("render_conical_frustum_to_gaussian")
    mean, cov = render.conical_frustum_to_gaussian(
        t(g["in_d"]), t(g["in_t0"]), t(g["in_t1"]), t(g["in_base_radius"]), diag=False
    )
    close(mean, g["out_mean"])
    close(cov, g["out_cov"])


@pytest.mark.parametrize("suffix,opaque", [("", False), ("_opaque", True)])
def test_compute_alpha_weights_golden(suffix, opaque):
    g = load("render_compute_alpha_weights")
    w, a, tr = render.compute_alpha_weights(
        t(g["in_density"]), t(g["in_tdist"]), t(g["in_dirs"]), opaque_background=opaque
    )
    close(w, g["out_weights" + suffix])
    close(a, g["out_alpha" + suffix])
    close(tr, g["out_trans" + suffix])


@pytest.mark.parametrize("suffix", ["", "_opaque"])
def test_volumetric_rendering_golden(suffix):
    g = load("render_volumetric_rendering")
    out = render.volumetric_rendering(
        t(g["in_rgbs"]),
        t(g["in_weights" + suffix]),
        t(g["in_tdist"]),
        t(g["in_bg_rgbs"]),
        t(g["in_t_far"]),
        compute_extras=True,
    )
    for key in (
        "rgb",
        "acc",
        "distance_mean",
        "distance_percentile_5",
        "distance_median",
        "distance_percentile_95",
    ):
        close(out[key], g[f"out_{key}{suffix}"])


# ---------------------------------------------------------------- properties


def random_rays(gen, batch=(4, 5), n=17, dtype=torch.float64):
    origins = torch.randn(*batch, 3, generator=gen, dtype=dtype)
    directions = torch.randn(*batch, 3, generator=gen, dtype=dtype)
    radii = torch.rand(*batch, 1, generator=gen, dtype=dtype) * 0.01 + 1e-3
    tdist = torch.sort(torch.rand(*batch, n, generator=gen, dtype=dtype) * 10 + 0.5, -1).values
    return tdist, origins, directions, radii


@pytest.mark.parametrize("shape", ["cone", "cylinder"])
def test_cast_rays_batch_dims_and_diag_consistency(shape):
    gen = torch.Generator().manual_seed(0)
    tdist, o, d, r = random_rays(gen)
    means, covs = render.cast_rays(tdist, o, d, r, shape, diag=False)
    assert means.shape == (4, 5, 16, 3) and covs.shape == (4, 5, 16, 3, 3)
    means_d, covs_d = render.cast_rays(tdist, o, d, r, shape, diag=True)
    torch.testing.assert_close(means_d, means)
    torch.testing.assert_close(covs_d, torch.diagonal(covs, dim1=-2, dim2=-1))
    torch.testing.assert_close(covs, covs.transpose(-1, -2))
    assert torch.all(torch.linalg.eigvalsh(covs) > 0)
    # float32 gives the same result
    m32, c32 = render.cast_rays(tdist.float(), o.float(), d.float(), r.float(), shape, False)
    assert m32.dtype == torch.float32
    torch.testing.assert_close(c32.double(), covs, rtol=1e-4, atol=1e-9)


def test_stable_frustum_matches_closed_form():
    gen = torch.Generator().manual_seed(1)
    tdist, o, d, r = random_rays(gen)
    t0, t1 = tdist[..., :-1], tdist[..., 1:]
    m_s, c_s = render.conical_frustum_to_gaussian(d, t0, t1, r, diag=False, stable=True)
    m_u, c_u = render.conical_frustum_to_gaussian(d, t0, t1, r, diag=False, stable=False)
    torch.testing.assert_close(m_s, m_u, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(c_s, c_u, rtol=1e-5, atol=1e-9)


def test_cast_rays_bad_shape():
    gen = torch.Generator().manual_seed(2)
    with pytest.raises(ValueError, match="ray_shape"):
        render.cast_rays(*random_rays(gen), ray_shape="sphere")


def test_alpha_weights_properties_and_gradients():
    gen = torch.Generator().manual_seed(3)
    tdist, _, d, _ = random_rays(gen, n=33)
    density = torch.rand(4, 5, 32, generator=gen, dtype=torch.float64) * 3
    density[..., ::3] = 0.0  # exact zeros as produced by relu/softplus underflow
    density.requires_grad_(True)
    w, a, tr = render.compute_alpha_weights(density, tdist, d)
    assert torch.all(w >= 0) and torch.all(w.sum(-1) <= 1 + 1e-12)
    torch.testing.assert_close(w.sum(-1), 1 - tr[..., -1] * (1 - a[..., -1]))
    w_o, a_o, _ = render.compute_alpha_weights(density, tdist, d, opaque_background=True)
    torch.testing.assert_close(w_o.sum(-1), torch.ones(4, 5, dtype=torch.float64))
    assert torch.all(a_o[..., -1] == 1)
    (w.square().sum() + w_o.square().sum()).backward()
    assert torch.isfinite(density.grad).all() and density.grad.abs().sum() > 0


def test_volumetric_rendering_background_and_extras():
    gen = torch.Generator().manual_seed(4)
    tdist, _, d, _ = random_rays(gen, n=9)
    rgbs = torch.rand(4, 5, 8, 3, generator=gen, dtype=torch.float64)
    zeros = torch.zeros(4, 5, 8, dtype=torch.float64)
    # empty ray -> pure background colour, acc 0, far distance percentiles
    out = render.volumetric_rendering(rgbs, zeros, tdist, 0.25, 100.0, compute_extras=True)
    torch.testing.assert_close(out["rgb"], torch.full((4, 5, 3), 0.25, dtype=torch.float64))
    assert torch.all(out["acc"] == 0)
    # the background is the interval [t_last, t_far]: percentiles interpolate inside it
    last = tdist[..., -1]
    torch.testing.assert_close(out["distance_median"], last + 0.5 * (100.0 - last))
    torch.testing.assert_close(out["distance_percentile_95"], last + 0.95 * (100.0 - last))
    # multinerf: exp(0 / eps) = 1, clipped into [t_first, t_last]
    one = torch.ones_like(last)
    torch.testing.assert_close(out["distance_mean"], one.clamp(tdist[..., 0], tdist[..., -1]))
    # all mass in one interval -> that colour, distances inside that interval
    w = zeros.clone()
    w[..., 3] = 1.0
    extras = {"normals": torch.randn(4, 5, 8, 3, generator=gen, dtype=torch.float64)}
    far = torch.full((4, 5, 1), 100.0, dtype=torch.float64)
    out = render.volumetric_rendering(rgbs, w, tdist, 1.0, far, True, extras=extras)
    torch.testing.assert_close(out["rgb"], rgbs[..., 3, :])
    torch.testing.assert_close(out["normals"], extras["normals"][..., 3, :])
    for k in (
        "distance_mean",
        "distance_median",
        "distance_percentile_5",
        "distance_percentile_95",
    ):
        assert torch.all(out[k] >= tdist[..., 3] - 1e-12) and torch.all(
            out[k] <= tdist[..., 4] + 1e-12
        )
    assert torch.all(out["distance_percentile_5"] <= out["distance_median"])
    assert torch.all(out["distance_median"] <= out["distance_percentile_95"])
    plain = render.volumetric_rendering(rgbs, w, tdist, 1.0, far, False)
    assert set(plain) == {"rgb", "acc"}


def test_render_gradients_flow():
    gen = torch.Generator().manual_seed(5)
    tdist, o, d, r = random_rays(gen, n=9, dtype=torch.float32)
    rgbs = torch.rand(4, 5, 8, 3, generator=gen).requires_grad_(True)
    density = (torch.rand(4, 5, 8, generator=gen) * 2).requires_grad_(True)
    w, _, _ = render.compute_alpha_weights(density, tdist, d, opaque_background=True)
    out = render.volumetric_rendering(rgbs, w, tdist, 1.0, 1e6, compute_extras=True)
    (out["rgb"].sum() + out["distance_mean"].sum()).backward()
    assert torch.isfinite(rgbs.grad).all() and torch.isfinite(density.grad).all()
    assert density.grad.abs().sum() > 0


def test_golden_inputs_in_float64():
    """Same golden cases in float64 (dtype-generic code); tolerance covers float32 rounding."""
    f64 = torch.float64

    def c64(actual, expected):
        assert actual.dtype == f64
        close(actual, expected, rtol=1e-4, atol=1e-5)

    g = load("render_cast_rays_cone")
    args = [t(g[k]).to(f64) for k in ("in_tdist", "in_origins", "in_directions", "in_radii")]
    means, covs = render.cast_rays(*args, ray_shape="cone", diag=False)
    c64(means, g["out_means"])
    c64(covs, g["out_covs_full"])
    g = load("render_compute_alpha_weights")
    w, a, tr = render.compute_alpha_weights(
        *(t(g[k]).to(f64) for k in ("in_density", "in_tdist", "in_dirs")), True
    )
    c64(w, g["out_weights_opaque"])
    g = load("render_volumetric_rendering")
    out = render.volumetric_rendering(
        t(g["in_rgbs"]).to(f64),
        t(g["in_weights"]).to(f64),
        t(g["in_tdist"]).to(f64),
        1.0,
        t(g["in_t_far"]).to(f64),
        compute_extras=True,
    )
    for key in ("rgb", "acc", "distance_mean", "distance_median", "distance_percentile_95"):
        c64(out[key], g[f"out_{key}"])
