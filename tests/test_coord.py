"""coord: golden parity with multinerf plus property tests (contraction, Jacobian, grads)."""

import math

import numpy as np
import pytest
import torch
from helpers import close, load, t

from mipnerf360 import coord, geopoly

# ---------------------------------------------------------------- golden parity


def test_contract_golden():
    g = load("coord_contract")
    out = coord.contract(t(g["in_x"]))
    assert out.dtype == torch.float32
    close(out, g["out_contract_x"])


def test_inv_contract_golden():
    g = load("coord_contract")
    # |x| reaches 1e4 here: inv_contract divides by 2|z| - |z|^2 which cancels near |z| = 2,
    # so float32 results differ from JAX's by ~1e-5 relative (both are rounding noise).
    close(coord.inv_contract(t(g["in_z"])), g["out_inv_contract_z"], rtol=1e-4, atol=1e-6)


def test_roundtrip_golden():
    g = load("coord_contract")
    out = coord.inv_contract(coord.contract(t(g["in_x"])))
    # Ill-conditioned for |x| ~ 1e4: relative error ~ |x| * eps32 ~ 1e-3 in both codes.
    close(out, g["out_roundtrip"], rtol=5e-3, atol=1e-6)


def test_integrated_pos_enc_golden():
    g = load("coord_integrated_pos_enc")
    out = coord.integrated_pos_enc(
        t(g["in_mean"]), t(g["in_var"]), int(g["in_min_deg"]), int(g["in_max_deg"])
    )
    assert out.shape == g["out_encoded"].shape == (64, 504)
    close(out, g["out_encoded"], rtol=1e-5, atol=1e-6)


def test_lift_and_diagonalize_golden():
    g = load("coord_lift_and_diagonalize")
    mean, var = coord.lift_and_diagonalize(t(g["in_mean"]), t(g["in_cov"]), t(g["in_basis"]))
    close(mean, g["out_fn_mean"])
    close(var, g["out_fn_cov_diag"])
    # the basis may also come straight from geopoly (numpy float64 [K,3] transposed)
    basis = geopoly.generate_basis("icosahedron", 2).T
    mean2, var2 = coord.lift_and_diagonalize(t(g["in_mean"]), t(g["in_cov"]), basis)
    assert mean2.dtype == torch.float32
    close(mean2, g["out_fn_mean"])
    close(var2, g["out_fn_cov_diag"])


def test_pos_enc_golden():
    g = load("coord_pos_enc")
    x = t(g["in_x"])
    lo, hi = int(g["in_min_deg"]), int(g["in_max_deg"])
    close(coord.pos_enc(x, lo, hi, append_identity=True), g["out_with_identity"])
    close(coord.pos_enc(x, lo, hi, append_identity=False), g["out_no_identity"])


@pytest.mark.parametrize("fn", ["contract", coord.contract])
def test_track_linearize_golden(fn):
    g = load("coord_track_linearize_contract")
    mean, cov = coord.track_linearize(fn, t(g["in_mean"]), t(g["in_cov"]))
    close(mean, g["out_fn_mean"])
    # covariances span many magnitudes; tolerance relative to the largest entry.
    scale = np.abs(g["out_fn_cov"]).max()
    close(cov, g["out_fn_cov"], rtol=1e-4, atol=1e-6 * scale)


# ---------------------------------------------------------------- properties


def random_points(n, gen, dtype=torch.float64):
    d = torch.randn(n, 3, generator=gen, dtype=dtype)
    d = d / d.norm(dim=-1, keepdim=True)
    r = torch.exp(
        torch.empty(n, 1, dtype=dtype).uniform_(math.log(1e-3), math.log(1e5), generator=gen)
    )
    return d * r


def test_contract_identity_inside_and_bounded():
    gen = torch.Generator().manual_seed(0)
    x = random_points(4000, gen)
    z = coord.contract(x)
    inside = x.norm(dim=-1) <= 1
    assert inside.any() and (~inside).any()
    assert torch.equal(z[inside], x[inside])
    assert torch.all(z.norm(dim=-1) < 2)
    # direction preserved, norm monotone
    cos = (z * x).sum(-1) / (z.norm(dim=-1) * x.norm(dim=-1))
    assert torch.allclose(cos, torch.ones_like(cos))
    order = torch.argsort(x.norm(dim=-1))
    assert torch.all(torch.diff(z.norm(dim=-1)[order]) >= 0)


def test_inv_contract_inverts():
    gen = torch.Generator().manual_seed(1)
    x = random_points(2000, gen)
    back = coord.inv_contract(coord.contract(x))
    torch.testing.assert_close(back, x, rtol=1e-9, atol=1e-12)
    z = torch.randn(500, 3, generator=gen, dtype=torch.float64)
    z = (
        z
        / z.norm(dim=-1, keepdim=True)
        * torch.rand(500, 1, generator=gen, dtype=torch.float64)
        * 1.99
    )
    torch.testing.assert_close(coord.contract(coord.inv_contract(z)), z)


def test_track_linearize_jacobian_matches_autograd():
    gen = torch.Generator().manual_seed(2)
    x = random_points(40, gen)
    for xi in x:
        jac = torch.autograd.functional.jacobian(coord.contract, xi)
        a, b, u = coord.contract_jacobian_terms(xi)
        mine = a * torch.eye(3, dtype=xi.dtype) + b * u[:, None] * u[None, :]
        torch.testing.assert_close(mine, jac, rtol=1e-7, atol=1e-12)
    # and the covariance push-forward equals J cov J^T with the autograd Jacobian
    a_mat = torch.randn(40, 3, 3, generator=gen, dtype=torch.float64)
    cov = a_mat @ a_mat.transpose(-1, -2)
    _, fn_cov = coord.track_linearize("contract", x, cov)
    jac = torch.stack([torch.autograd.functional.jacobian(coord.contract, xi) for xi in x])
    torch.testing.assert_close(fn_cov, jac @ cov @ jac.transpose(-1, -2), rtol=1e-9, atol=1e-14)


def test_track_linearize_batch_dims_and_identity():
    gen = torch.Generator().manual_seed(3)
    x = random_points(24, gen, torch.float32).reshape(2, 3, 4, 3)
    cov = torch.eye(3).expand(2, 3, 4, 3, 3) * 0.01
    m, c = coord.track_linearize("contract", x, cov)
    assert m.shape == (2, 3, 4, 3) and c.shape == (2, 3, 4, 3, 3)
    m0, c0 = coord.track_linearize(None, x, cov)
    assert m0 is x and c0 is cov
    with pytest.raises(ValueError, match="unsupported"):
        coord.track_linearize("bogus", x, cov)


def test_gradients_finite_small_and_huge():
    x = torch.tensor(
        [[0.1, -0.2, 0.3], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [3.0, -1.0, 2.0], [1e6, -3e6, 2e5]],
        dtype=torch.float32,
        requires_grad=True,
    )
    cov = (torch.eye(3) * 0.1).expand(5, 3, 3).clone().requires_grad_(True)
    m, c = coord.track_linearize(coord.contract, x, cov)
    basis = torch.from_numpy(geopoly.generate_basis("icosahedron", 2).T.copy()).float()
    mk, vk = coord.lift_and_diagonalize(m, c, basis)
    feats = coord.integrated_pos_enc(mk, vk, 0, 12)
    loss = feats.sum() + coord.contract(x).sum() + coord.inv_contract(m).sum()
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(cov.grad).all()
    assert x.grad.abs().sum() > 0 and cov.grad.abs().sum() > 0


def test_float64_matches_float32():
    g = load("coord_track_linearize_contract")
    m32, c32 = coord.track_linearize("contract", t(g["in_mean"]), t(g["in_cov"]))
    m64, c64 = coord.track_linearize(
        "contract", t(g["in_mean"], torch.float64), t(g["in_cov"], torch.float64)
    )
    assert m64.dtype == torch.float64 and c64.dtype == torch.float64
    torch.testing.assert_close(m32.double(), m64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c32.double(), c64, rtol=1e-4, atol=1e-7)


def test_safe_sin_reduces_large_arguments():
    x = torch.tensor([1.0, 1000.0, -1000.0, 12345.678], dtype=torch.float64)
    torch.testing.assert_close(coord.safe_sin(x), torch.sin(x), rtol=0, atol=1e-9)
    assert torch.allclose(coord.safe_sin(x[:1]), torch.sin(x[:1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("basis_shape", [("icosahedron", 2), ("octahedron", 1)])
def test_lifted_integrated_pos_enc_is_lift_then_ipe_bit_for_bit(dtype, basis_shape):
    # The MLPs' fused path must give exactly the two-step result (golden-tested above), for
    # means large enough that safe_sin reduces them and variances from tiny to huge.
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(64, 5, 3, generator=gen, dtype=dtype) * 30
    a = torch.randn(64, 5, 3, 3, generator=gen, dtype=dtype)
    cov = a @ a.transpose(-1, -2) * torch.logspace(-8, 1, 5, dtype=dtype)[:, None, None]
    basis = torch.from_numpy(geopoly.generate_basis(*basis_shape).T.copy()).to(dtype)
    want = coord.integrated_pos_enc(*coord.lift_and_diagonalize(mean, cov, basis), 0, 12)
    got = coord.lifted_integrated_pos_enc(mean, cov, basis, 0, 12)
    assert got.shape == want.shape == (64, 5, 2 * 12 * basis.shape[1])
    assert torch.equal(got, want)


def test_ipe_limits():
    # zero variance -> plain sin/cos; huge variance -> zero features
    mean = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    out = coord.integrated_pos_enc(mean, torch.zeros_like(mean), 0, 3)
    scaled = torch.cat([mean * s for s in (1, 2, 4)], -1)
    torch.testing.assert_close(out, torch.cat([torch.sin(scaled), torch.cos(scaled)], -1))
    out_big = coord.integrated_pos_enc(mean, torch.full_like(mean, 1e4), 0, 3)
    assert out_big.abs().max() < 1e-30


@pytest.mark.parametrize("fn_name", [None, "reciprocal", "log", "piecewise", torch.reciprocal])
def test_construct_ray_warps_roundtrip(fn_name):
    near = torch.full((5, 1), 0.2, dtype=torch.float64)
    far = torch.full((5, 1), 1e3, dtype=torch.float64)
    t_to_s, s_to_t = coord.construct_ray_warps(fn_name, near, far)
    s = torch.linspace(0, 1, 7, dtype=torch.float64).expand(5, 7)
    tt = s_to_t(s)
    torch.testing.assert_close(tt[:, 0], near[:, 0])
    torch.testing.assert_close(tt[:, -1], far[:, 0])
    assert torch.all(torch.diff(tt, dim=-1) > 0)
    torch.testing.assert_close(t_to_s(tt), s)


def test_construct_ray_warps_reciprocal_formula():
    _, s_to_t = coord.construct_ray_warps("reciprocal", 0.2, 1e6)
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s_to_t(s), 1 / (s / 1e6 + (1 - s) / 0.2))
    with pytest.raises(ValueError, match="unknown raydist"):
        coord.construct_ray_warps("tan", 0.2, 1.0)


@pytest.mark.parametrize("fn", ["lift", "linearize"])
def test_gaussian_maths_stays_float32_under_bf16_autocast(fn):
    """The IPE multiplies the projected means by up to 2^max_deg: they must not be rounded
    to bf16 (or TF32) by autocast (multinerf uses Precision.HIGHEST matmuls there)."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(64, 8, 3, generator=gen) * 3
    a = torch.randn(64, 8, 3, 3, generator=gen) * 0.1
    cov = a @ a.transpose(-1, -2)
    basis = torch.randn(3, 21, generator=gen)
    if fn == "lift":
        ref = coord.lift_and_diagonalize(mean, cov, basis)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = coord.lift_and_diagonalize(mean, cov, basis)
    else:
        ref = coord.track_linearize("contract", mean, cov)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = coord.track_linearize("contract", mean, cov)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
