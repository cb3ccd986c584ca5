"""Coordinate transforms and positional encodings (multinerf ``internal/coord.py``).

Pure torch functions: any leading batch dims, float32 or float64, any device, differentiable.
Formulas follow multinerf's functions of the same names and the mip-NeRF 360 paper (Eq. 10
for the contraction).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

# The package's one definition of the float32 machine epsilon (coord, stepfun, render and
# train_utils clamp with it): multinerf clamps with it even when fed float64.
EPS32 = float(np.finfo(np.float32).eps)


def contract(x: torch.Tensor) -> torch.Tensor:
    """Scene contraction of mip-NeRF 360 (Eq. 10, L2 norm).

    x [..., 3] -> z [..., 3]: identity for |x| <= 1, else (2 - 1/|x|) x/|x|, computed as
    ((2|x| - 1)/|x|^2) x with |x|^2 clamped below by float32 eps. Output lies in the ball of
    radius 2.
    """
    x_mag_sq = torch.clamp(torch.sum(x * x, dim=-1, keepdim=True), min=EPS32)
    scale = (2 * torch.sqrt(x_mag_sq) - 1) / x_mag_sq
    return torch.where(x_mag_sq <= 1, x, scale * x)


def inv_contract(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`contract` for |z| < 2. z [..., 3] -> x [..., 3]."""
    z_mag_sq = torch.clamp(torch.sum(z * z, dim=-1, keepdim=True), min=EPS32)
    return torch.where(z_mag_sq <= 1, z, z / (2 * torch.sqrt(z_mag_sq) - z_mag_sq))


def contract_jacobian_terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed form of d contract / dx at x, as J = a I + b u u^T.

    For r = |x| > 1, with s(r) = (2r - 1)/r^2 and s'(r) = 2(1 - r)/r^3:
    J = s I + s'(r)/r x x^T = s (I - u u^T) + (1/r^2) u u^T, u = x/r.
    (The radial eigenvalue s + r s' = 1/r^2 is written directly to avoid the cancellation
    2r - 1 - 2(r - 1) at large r.) Inside the unit ball J = I.

    x [..., 3] -> (a [..., 1], b [..., 1], u [..., 3]).
    """
    x_mag_sq = torch.clamp(torch.sum(x * x, dim=-1, keepdim=True), min=EPS32)
    inside = x_mag_sq <= 1
    # Evaluate the outside branch on |x|^2 >= 1 only, so no inf/nan leaks into gradients.
    r_sq = torch.where(inside, torch.ones_like(x_mag_sq), x_mag_sq)
    r = torch.sqrt(r_sq)
    s = (2 * r - 1) / r_sq
    a = torch.where(inside, torch.ones_like(s), s)
    b = torch.where(inside, torch.zeros_like(s), 1 / r_sq - s)
    u = x / r
    return a, b, u


def _is_contract(fn) -> bool:
    return fn is contract or fn == "contract"


def track_linearize(
    fn: str | Callable | None, mean: torch.Tensor, cov: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Push Gaussians through ``fn`` by linearisation (multinerf ``coord.track_linearize``).

    fn: 'contract' / :func:`contract` (closed-form Jacobian) or None (identity).
    mean [..., 3], cov [..., 3, 3] -> (fn_mean [..., 3], fn_cov = J cov J^T [..., 3, 3]).
    """
    if fn is None:
        return mean, cov
    if not _is_contract(fn):
        raise ValueError(f"track_linearize: unsupported fn {fn!r}; use 'contract' or None")
    fn_mean = contract(mean)
    a, b, u = contract_jacobian_terms(mean)
    # J cov J^T with J = a I + b u u^T, expanded to avoid 3x3 matmuls:
    # a^2 cov + a b (cov u u^T + u u^T cov) + b^2 (u^T cov u) u u^T  (cov symmetric or not).
    # Element-wise products, not einsum: full float32 also under bf16 autocast or TF32
    # (multinerf computes these with Precision.HIGHEST).
    cu = torch.sum(cov * u[..., None, :], dim=-1)  # cov u
    uc = torch.sum(u[..., :, None] * cov, dim=-2)  # u^T cov
    ucu = torch.sum(u * cu, dim=-1, keepdim=True)  # u^T cov u
    a2 = a[..., None]
    b2 = b[..., None]
    fn_cov = (
        a2 * a2 * cov
        + a2 * b2 * (cu[..., :, None] * u[..., None, :] + u[..., :, None] * uc[..., None, :])
        + (b * b * ucu)[..., None] * (u[..., :, None] * u[..., None, :])
    )
    return fn_mean, fn_cov


def _as_tensor_like(basis, ref: torch.Tensor) -> torch.Tensor:
    if isinstance(basis, torch.Tensor):
        return basis.to(device=ref.device, dtype=ref.dtype)
    return torch.as_tensor(np.asarray(basis), device=ref.device, dtype=ref.dtype)


def lift_and_diagonalize(
    mean: torch.Tensor, cov: torch.Tensor, basis
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project Gaussians onto K basis directions (multinerf ``coord.lift_and_diagonalize``).

    mean [..., 3], cov [..., 3, 3], basis [3, K] (tensor or array) ->
    (mean @ basis [..., K], diag(basis^T cov basis) [..., K]).
    """
    basis = _as_tensor_like(basis, mean)
    # x @ basis over the 3 coordinates written out: exact float32 under bf16 autocast and
    # TF32, whose rounding of the means would be amplified 2^max_deg times by the IPE
    # (multinerf ``math.matmul`` uses Precision.HIGHEST here for the same reason).
    return _times_basis(mean, basis), _diag_quadratic(cov, basis)


def _diag_quadratic(cov: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """cov [..., 3, 3], basis [3, K] -> diag(basis^T cov basis) [..., K]."""
    return torch.sum(basis * _times_basis(cov, basis), dim=-2)  # cov @ basis: [..., 3, K]


def _times_basis(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x [..., 3] @ basis [3, K] -> [..., K] as three broadcast multiply-adds."""
    return x[..., 0:1] * basis[0] + x[..., 1:2] * basis[1] + x[..., 2:3] * basis[2]


def safe_sin(x: torch.Tensor) -> torch.Tensor:
    """sin(x) with |x| >= 100 pi reduced modulo 100 pi first (multinerf ``math.safe_sin``)."""
    t = 100 * math.pi
    return torch.sin(torch.where(torch.abs(x) < t, x, torch.remainder(x, t)))


def _exp_neg_half(var: torch.Tensor) -> torch.Tensor:
    """exp(-var/2) with var clamped so the result stays a normal float.

    The clamp changes outputs by < 2e-38 (float32; 1e-304 in float64) and avoids the very slow
    underflow/denormal path of exp on CPU, which high IPE degrees (var * 4^l) hit constantly.
    """
    limit = 1400.0 if var.dtype == torch.float64 else 174.0
    return torch.exp(-0.5 * torch.clamp(var, max=limit))


def expected_sin(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """E[sin(X)], X ~ N(mean, var): exp(-var/2) sin(mean) (elementwise)."""
    return _exp_neg_half(var) * safe_sin(mean)


def _scales(min_deg: int, max_deg: int, ref: torch.Tensor) -> torch.Tensor:
    return 2.0 ** torch.arange(int(min_deg), int(max_deg), device=ref.device, dtype=ref.dtype)


def integrated_pos_enc(
    mean: torch.Tensor, var: torch.Tensor, min_deg: int, max_deg: int
) -> torch.Tensor:
    """Integrated positional encoding (mip-NeRF), no identity term.

    mean, var [..., D] -> [..., 2 * (max_deg - min_deg) * D]: all sines then all cosines,
    features ordered degree-major (index l*D + d).
    """
    scales = _scales(min_deg, max_deg, mean)
    shape = mean.shape[:-1] + (-1,)
    scaled_mean = (mean[..., None, :] * scales[:, None]).reshape(shape)
    scaled_var = (var[..., None, :] * (scales * scales)[:, None]).reshape(shape)
    return _expected_sin_cos(scaled_mean, scaled_var)


def lifted_integrated_pos_enc(
    mean: torch.Tensor, cov: torch.Tensor, basis, min_deg: int, max_deg: int
) -> torch.Tensor:
    """``integrated_pos_enc(*lift_and_diagonalize(mean, cov, basis), min_deg, max_deg)``, bit
    for bit, as the MLPs compute it (multinerf ``models.MLP.predict_density``).

    mean [..., 3], cov [..., 3, 3], basis [3, K] -> [..., 2 * (max_deg - min_deg) * K].
    The means are projected onto the basis scaled by 2^l (a [3, L*K] matrix) instead of
    being projected and then scaled: scaling by a power of two commutes with rounding, so
    the result is the same, and a compiled kernel reads the scaled basis contiguously
    instead of doing index arithmetic per feature (torch.compile's CPU code for the other
    order is scalar; see benchmarks/README.md).
    """
    basis = _as_tensor_like(basis, mean)
    scales = _scales(min_deg, max_deg, mean)
    scaled_basis = (basis[:, None, :] * scales[:, None]).flatten(1)  # [3, L*K], degree-major
    scaled_mean = _times_basis(mean, scaled_basis)
    var = _diag_quadratic(cov, basis)  # [..., K]
    scaled_var = (var[..., None, :] * (scales * scales)[:, None]).flatten(-2)
    return _expected_sin_cos(scaled_mean, scaled_var)


def _expected_sin_cos(scaled_mean: torch.Tensor, scaled_var: torch.Tensor) -> torch.Tensor:
    """[..., F], [..., F] -> [E sin, E cos] [..., 2F] of N(mean, var) (``expected_sin``)."""
    # = expected_sin([m, m + pi/2], [v, v]), with exp(-v/2) computed once for both halves.
    damp = _exp_neg_half(scaled_var)
    sines = safe_sin(torch.cat([scaled_mean, scaled_mean + 0.5 * math.pi], dim=-1))
    n = scaled_mean.shape[-1]
    out = sines.unflatten(-1, (2, n)) * damp[..., None, :]
    return out.flatten(-2)


def pos_enc(
    x: torch.Tensor, min_deg: int, max_deg: int, append_identity: bool = True
) -> torch.Tensor:
    """NeRF positional encoding with plain sin (used for view directions).

    x [..., D] -> [..., (D if append_identity) + 2 * (max_deg - min_deg) * D], ordered
    [x, sin (degree-major), cos (degree-major)].
    """
    scales = _scales(min_deg, max_deg, x)
    xb = (x[..., None, :] * scales[:, None]).reshape(x.shape[:-1] + (-1,))
    four_feat = torch.sin(torch.cat([xb, xb + 0.5 * math.pi], dim=-1))
    if append_identity:
        return torch.cat([x, four_feat], dim=-1)
    return four_feat


def _piecewise_fwd(x):
    # g(x) = x/2 for x < 1 else 1 - 1/(2x); the unused branch is evaluated on a safe value.
    safe = torch.where(x < 1, torch.ones_like(x), x)
    return torch.where(x < 1, 0.5 * x, 1 - 0.5 / safe)


def _piecewise_inv(y):
    safe = torch.where(y < 0.5, torch.zeros_like(y), y)
    return torch.where(y < 0.5, 2 * y, 0.5 / (1 - safe))


_RAY_WARPS = {
    None: (lambda x: x, lambda x: x),
    "linear": (lambda x: x, lambda x: x),
    "reciprocal": (torch.reciprocal, torch.reciprocal),
    "log": (torch.log, torch.exp),
    "exp": (torch.exp, torch.log),
    "sqrt": (torch.sqrt, torch.square),
    "square": (torch.square, torch.sqrt),
    "piecewise": (_piecewise_fwd, _piecewise_inv),
}


def construct_ray_warps(fn_name, t_near, t_far):
    """Maps between metric distance t and normalised distance s in [0, 1] (multinerf
    ``coord.construct_ray_warps``).

    fn_name: None/'linear', 'reciprocal', 'log', 'exp', 'sqrt', 'square', 'piecewise' (or the
    torch function of that name, e.g. torch.reciprocal). t_near, t_far: tensors broadcastable
    to the inputs (e.g. [..., 1]) or floats.
    Returns (t_to_s, s_to_t): t_to_s(t) = (g(t) - g(near)) / (g(far) - g(near)),
    s_to_t(s) = g^-1(s g(far) + (1 - s) g(near)).
    """
    key = getattr(fn_name, "__name__", fn_name) if callable(fn_name) else fn_name
    if key not in _RAY_WARPS:
        raise ValueError(
            f"construct_ray_warps: unknown raydist fn {fn_name!r}; "
            f"expected one of {sorted(k for k in _RAY_WARPS if k is not None)} or None"
        )
    fn_fwd, fn_inv = _RAY_WARPS[key]
    t_near = torch.as_tensor(t_near)
    t_far = torch.as_tensor(t_far)
    if not t_near.is_floating_point():
        t_near = t_near.double()
    if not t_far.is_floating_point():
        t_far = t_far.double()
    s_near, s_far = fn_fwd(t_near), fn_fwd(t_far)

    def t_to_s(t):
        return (fn_fwd(t) - s_near.to(t)) / (s_far.to(t) - s_near.to(t))

    def s_to_t(s):
        return fn_inv(s * s_far.to(s) + (1 - s) * s_near.to(s))

    return t_to_s, s_to_t
