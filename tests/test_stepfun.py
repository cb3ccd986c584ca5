"""stepfun: golden parity with multinerf plus properties (dilation, losses, sampling)."""

import numpy as np
import pytest
import torch
from helpers import close, load, t

from mipnerf360 import stepfun

# ---------------------------------------------------------------- golden parity


def test_integrate_weights_and_invert_cdf_golden():
    g = load("stepfun_integrate_invert_cdf")
    close(stepfun.integrate_weights(t(g["in_w"])), g["out_cw"])
    close(stepfun.invert_cdf(t(g["in_u"]), t(g["in_t"]), t(g["in_w_logits"])), g["out_t_new"])


def test_sample_golden():
    g = load("stepfun_sample")
    n = int(g["in_num_samples"])
    tt, logits = t(g["in_t"]), t(g["in_w_logits"])
    close(stepfun.sample(None, tt, logits, n), g["out_samples"])
    close(stepfun.sample(None, tt, logits, n, deterministic_center=True), g["out_samples_center"])
    close(stepfun.sample_intervals(None, tt, logits, n, domain=(0, 1)), g["out_intervals"])


def test_lossfun_distortion_golden():
    g = load("stepfun_lossfun_distortion")
    close(stepfun.lossfun_distortion(t(g["in_t"]), t(g["in_w"])), g["out_loss"])


def test_lossfun_outer_golden():
    g = load("stepfun_lossfun_outer")
    out = stepfun.lossfun_outer(t(g["in_t"]), t(g["in_w"]), t(g["in_t_env"]), t(g["in_w_env"]))
    close(out, g["out_loss"])


def test_resample_golden():
    g = load("stepfun_resample")
    args = t(g["in_t"]), t(g["in_tp"]), t(g["in_vp"])
    close(stepfun.resample(*args), g["out_sum"])
    # use_avg divides differences of interpolated cumulative sums by small widths: float32
    # cancellation gives ~5e-6 absolute noise (JAX's own result is 3e-6 off the float64 value).
    close(stepfun.resample(*args, use_avg=True), g["out_avg"], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("level", ["level1", "level2"])
def test_max_dilate_weights_golden(level):
    g = load("stepfun_max_dilate_weights")
    td, wd = stepfun.max_dilate_weights(
        t(g["in_t"]), t(g["in_w"]), float(g[f"in_dilation_{level}"]), (0, 1), renormalize=True
    )
    close(td, g[f"out_t_dilate_{level}"])
    close(wd, g[f"out_w_dilate_{level}"])
    close(td[..., 1:-1], g[f"out_t_model_{level}"])
    close(wd[..., 1:-1], g[f"out_w_model_{level}"])


# ---------------------------------------------------------------- helpers


def random_stepfun(gen, batch=(3, 4), n=16, dtype=torch.float64, zero_frac=0.3):
    tt = torch.sort(torch.rand(*batch, n + 1, generator=gen, dtype=dtype), -1).values
    w = torch.rand(*batch, n, generator=gen, dtype=dtype)
    w = torch.where(torch.rand(*batch, n, generator=gen) < zero_frac, torch.zeros_like(w), w)
    w[..., n // 2] += 0.1  # never all zero
    return tt, w / w.sum(-1, keepdim=True)


def eval_pdf(tt, p, x):
    """Value of the step function (tt, p) at points x (0 outside), brute force."""
    inside = (tt[..., None, :-1] <= x[..., :, None]) & (x[..., :, None] < tt[..., None, 1:])
    return torch.where(inside, p[..., None, :], torch.zeros_like(p[..., None, :])).sum(-1)


def max_dilate_bruteforce(tt, w, dilation, domain):
    t0 = tt[..., :-1] - dilation
    t1 = tt[..., 1:] + dilation
    td = torch.sort(torch.cat([tt, t0, t1], -1), -1).values.clamp(*domain)
    q = td[..., :-1, None]
    mask = (t0[..., None, :] <= q) & (t1[..., None, :] > q)
    wd = torch.where(mask, w[..., None, :], torch.zeros_like(w[..., None, :])).amax(-1)
    return td, wd


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("dilation", [0.0, 1e-3, 0.05, 0.3, 2.0])
@pytest.mark.parametrize("domain", [(-np.inf, np.inf), (0.0, 1.0), (0.2, 0.7)])
def test_max_dilate_matches_bruteforce(dilation, domain):
    gen = torch.Generator().manual_seed(7)
    tt, w = random_stepfun(gen, n=37)
    # include empty intervals (repeated edges) as produced by the model
    tt[..., 5] = tt[..., 4]
    p = stepfun.weight_to_pdf(tt, w)
    td, pd = stepfun.max_dilate(tt, p, dilation, domain)
    td_ref, pd_ref = max_dilate_bruteforce(tt, p, dilation, domain)
    torch.testing.assert_close(td, td_ref, rtol=0, atol=0)
    torch.testing.assert_close(pd, pd_ref, rtol=0, atol=0)


def test_max_dilate_weights_dominates_input_density():
    gen = torch.Generator().manual_seed(8)
    tt, w = random_stepfun(gen, n=64)
    x = torch.rand(3, 4, 500, generator=gen, dtype=torch.float64)
    for dilation in (0.0, 0.01, 0.1):
        td, wd = stepfun.max_dilate_weights(tt, w, dilation)
        p_in = eval_pdf(tt, stepfun.weight_to_pdf(tt, w), x)
        p_out = eval_pdf(td, stepfun.weight_to_pdf(td, wd), x)
        assert torch.all(p_out >= p_in * (1 - 1e-12))
        assert td.shape[-1] == 3 * 64 + 1 and wd.shape[-1] == 3 * 64
        _, wr = stepfun.max_dilate_weights(tt, w, dilation, (0, 1), renormalize=True)
        torch.testing.assert_close(wr.sum(-1), torch.ones(3, 4, dtype=torch.float64))


def test_lossfun_outer_zero_for_self_and_dilation():
    gen = torch.Generator().manual_seed(9)
    tt, w = random_stepfun(gen, n=32)
    zero = torch.zeros_like(w)
    torch.testing.assert_close(stepfun.lossfun_outer(tt, w, tt, w), zero, rtol=0, atol=1e-12)
    for dilation in (1e-3, 0.02, 0.2):
        td, wd = stepfun.max_dilate_weights(tt, w, dilation)
        loss = stepfun.lossfun_outer(tt, w, td, wd)
        torch.testing.assert_close(loss, zero, rtol=0, atol=1e-12)
    # a proposal that misses part of the mass is penalised
    w_env = w.clone()
    w_env[..., 15:18] = 0  # the outer measure of bin 16 also touches bins 15 and 17
    loss = stepfun.lossfun_outer(tt, w, tt, w_env)
    assert torch.all(loss[..., 16] > 0)


def test_lossfun_outer_zero_for_refined_envelope():
    # envelope on a finer grid holding the same mass: outer measure >= w everywhere
    gen = torch.Generator().manual_seed(10)
    tt, w = random_stepfun(gen, n=16)
    extra = torch.rand(3, 4, 40, generator=gen, dtype=torch.float64)
    extra = tt[..., :1] + extra * (tt[..., -1:] - tt[..., :1])
    t_env = torch.sort(torch.cat([tt, extra], -1), -1).values
    w_env = stepfun.resample(t_env, tt, w)
    loss = stepfun.lossfun_outer(tt, w, t_env, w_env)
    torch.testing.assert_close(loss, torch.zeros_like(w), rtol=0, atol=1e-12)


def test_lossfun_distortion_equals_quadratic_formula():
    gen = torch.Generator().manual_seed(11)
    tt, w = random_stepfun(gen, n=48)
    w = w * torch.rand(3, 4, 1, generator=gen, dtype=torch.float64)  # not normalised
    m = (tt[..., 1:] + tt[..., :-1]) / 2
    inter = (w[..., :, None] * w[..., None, :] * (m[..., :, None] - m[..., None, :]).abs()).sum(
        (-1, -2)
    )
    intra = (w**2 * (tt[..., 1:] - tt[..., :-1])).sum(-1) / 3
    torch.testing.assert_close(stepfun.lossfun_distortion(tt, w), inter + intra)


def test_losses_have_finite_gradients():
    gen = torch.Generator().manual_seed(12)
    tt, w = random_stepfun(gen, n=32, dtype=torch.float32)
    t_env, w_env = random_stepfun(gen, n=64, dtype=torch.float32)
    w = w.clone().requires_grad_(True)
    w_env = w_env.clone().requires_grad_(True)
    loss = (
        stepfun.lossfun_outer(tt, w, t_env, w_env).mean() + stepfun.lossfun_distortion(tt, w).mean()
    )
    loss.backward()
    for g in (w.grad, w_env.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_sample_with_generator():
    gen_data = torch.Generator().manual_seed(13)
    tt, w = random_stepfun(gen_data, n=16)
    logits = torch.log(w)  # -inf for empty bins
    for single_jitter in (False, True):
        d = 1 if single_jitter else 64
        r1 = torch.rand(3, 4, d, generator=torch.Generator().manual_seed(0))
        r3 = torch.rand(3, 4, d, generator=torch.Generator().manual_seed(1))
        s1 = stepfun.sample(r1, tt, logits, 64, single_jitter)
        s2 = stepfun.sample(r1.clone(), tt, logits, 64, single_jitter)
        torch.testing.assert_close(s1, s2, rtol=0, atol=0)
        s3 = stepfun.sample(r3, tt, logits, 64, single_jitter)
        assert not torch.equal(s1, s3)
        assert s1.shape == (3, 4, 64)
        assert torch.all(torch.diff(s1, dim=-1) >= 0)
        # every sample lies in a bin with positive weight
        idx = torch.clamp(torch.searchsorted(tt.contiguous(), s1, right=True) - 1, 0, 15)
        assert torch.all(torch.gather(w, -1, idx) > 0)


def test_sample_intervals_sorted_and_in_domain():
    gen_data = torch.Generator().manual_seed(14)
    tt, w = random_stepfun(gen_data, n=16)
    logits = torch.log(w)
    for rand in (None, torch.rand(3, 4, 1, generator=torch.Generator().manual_seed(3))):
        edges = stepfun.sample_intervals(rand, tt, logits, 32, single_jitter=True, domain=(0, 1))
        assert edges.shape == (3, 4, 33)
        assert torch.all(torch.diff(edges, dim=-1) >= 0)
        assert torch.all(edges >= 0) and torch.all(edges <= 1)
    with pytest.raises(ValueError, match="num_samples"):
        stepfun.sample_intervals(None, tt, logits, 1)


def test_resample_conserves_mass_and_average():
    gen = torch.Generator().manual_seed(15)
    tp, vp = random_stepfun(gen, n=12)
    lo, hi = tp[..., :1] - 0.1, tp[..., -1:] + 0.1
    tt = torch.sort(
        torch.cat([lo, hi, torch.rand(3, 4, 19, generator=gen, dtype=torch.float64)], -1), -1
    ).values
    out = stepfun.resample(tt, tp, vp)
    torch.testing.assert_close(out.sum(-1), vp.sum(-1))
    # resampling onto the same grid is the identity, for sums and averages
    torch.testing.assert_close(stepfun.resample(tp, tp, vp), vp)
    torch.testing.assert_close(stepfun.resample(tp, tp, vp, use_avg=True), vp)


def test_weighted_percentile_uniform():
    tt = torch.linspace(0, 10, 11, dtype=torch.float64).expand(2, 11)
    w = torch.full((2, 10), 0.1, dtype=torch.float64)
    out = stepfun.weighted_percentile(tt, w, [5, 50, 95])
    torch.testing.assert_close(out, torch.tensor([[0.5, 5.0, 9.5]] * 2, dtype=torch.float64))


def test_searchsorted_matches_bruteforce():
    gen = torch.Generator().manual_seed(16)
    a = torch.sort(torch.rand(5, 9, generator=gen), -1).values
    v = torch.rand(5, 30, generator=gen) * 1.4 - 0.2
    v[:, :3] = a[:, 2:5]  # exact ties
    lo, hi = stepfun.searchsorted(a, v)
    ge = v[..., None, :] >= a[..., :, None]
    i = torch.arange(9)[:, None]
    lo_ref = torch.where(ge, i, torch.zeros_like(i)).amax(-2)
    hi_ref = torch.where(~ge, i, torch.full_like(i, 8)).amin(-2)
    assert torch.equal(lo, lo_ref) and torch.equal(hi, hi_ref)


def test_golden_inputs_in_float64():
    """Same golden cases in float64 (dtype-generic code); tolerance covers float32 rounding."""
    f64 = torch.float64

    def c64(actual, expected, atol=1e-5):
        assert actual.dtype == f64
        close(actual, expected, rtol=1e-4, atol=atol)

    def t64(a):
        return t(a).to(f64)

    g = load("stepfun_sample")
    n = int(g["in_num_samples"])
    c64(
        stepfun.sample_intervals(None, t64(g["in_t"]), t64(g["in_w_logits"]), n, domain=(0, 1)),
        g["out_intervals"],
    )
    g = load("stepfun_lossfun_distortion")
    c64(stepfun.lossfun_distortion(t64(g["in_t"]), t64(g["in_w"])), g["out_loss"])
    g = load("stepfun_lossfun_outer")
    args = (t64(g[k]) for k in ("in_t", "in_w", "in_t_env", "in_w_env"))
    c64(stepfun.lossfun_outer(*args), g["out_loss"])
    g = load("stepfun_resample")
    c64(stepfun.resample(t64(g["in_t"]), t64(g["in_tp"]), t64(g["in_vp"])), g["out_sum"])
    g = load("stepfun_max_dilate_weights")
    for level in ("level1", "level2"):
        td, wd = stepfun.max_dilate_weights(
            t64(g["in_t"]), t64(g["in_w"]), float(g[f"in_dilation_{level}"]), (0, 1), True
        )
        c64(td, g[f"out_t_dilate_{level}"])
        c64(wd, g[f"out_w_dilate_{level}"])


def test_invert_cdf_with_all_weights_zero_is_uniform_not_nan():
    """A ray whose weights all underflowed to 0 (logits all -inf) samples uniformly."""
    tt = torch.linspace(0, 1, 9)[None].repeat(2, 1)
    logits = torch.zeros(2, 8)
    logits[1] = -torch.inf
    u = torch.linspace(0, 1 - 1e-6, 5)[None].repeat(2, 1)
    out = stepfun.invert_cdf(u, tt, logits)
    assert torch.isfinite(out).all()
    close(out[1], out[0].numpy())
