"""Step-function utilities: histograms along rays (multinerf ``internal/stepfun.py``).

A step function is (t [..., N+1] sorted edges, w or v [..., N] per-interval values). Pure torch,
arbitrary leading batch dims, float32/float64, any device. Formulas: the mip-NeRF 360 paper
(online distillation: resampling and the proposal loss; the distortion loss) and multinerf's
functions of the same names; golden checks in tests/test_stepfun.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mipnerf360.coord import EPS32


def _batch_broadcast(a: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast the leading dims of a [..., N] and v [..., M] to a common shape."""
    batch = torch.broadcast_shapes(a.shape[:-1], v.shape[:-1])
    return (
        a.expand(batch + a.shape[-1:]).contiguous(),
        v.expand(batch + v.shape[-1:]).contiguous(),
    )


def searchsorted(a: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bracketing indices of v in sorted a (multinerf ``stepfun.searchsorted``).

    a [..., N] sorted, v [..., M] -> (idx_lo, idx_hi) int64 [..., M]:
    idx_lo = last i with a[i] <= v (0 if none), idx_hi = first i with a[i] > v (N-1 if none).
    """
    a, v = _batch_broadcast(a, v)
    count = torch.searchsorted(a, v, right=True)  # number of a[i] <= v
    n = a.shape[-1]
    return torch.clamp(count - 1, min=0), torch.clamp(count, max=n - 1)


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Batched ``jnp.interp``: x [..., M], xp [..., N] non-decreasing, fp [..., N] -> [..., M].

    Constant extrapolation; for repeated knots the right-most segment is used (jnp semantics).
    """
    xp, x = _batch_broadcast(xp, x)
    fp = fp.expand(xp.shape[:-1] + fp.shape[-1:])
    n = xp.shape[-1]
    i = torch.clamp(torch.searchsorted(xp, x, right=True), 1, n - 1)
    xp0, xp1 = torch.gather(xp, -1, i - 1), torch.gather(xp, -1, i)
    fp0, fp1 = torch.gather(fp, -1, i - 1), torch.gather(fp, -1, i)
    dx = xp1 - xp0
    tiny = float(np.spacing(np.finfo(np.float32).eps))
    dx0 = torch.abs(dx) <= tiny
    f = torch.where(
        dx0, fp0, fp0 + (x - xp0) / torch.where(dx0, torch.ones_like(dx), dx) * (fp1 - fp0)
    )
    f = torch.where(x < xp[..., :1], fp[..., :1], f)
    f = torch.where(x > xp[..., -1:], fp[..., -1:], f)
    return f


def sorted_interp(
    x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor, eps: float = EPS32**2
) -> torch.Tensor:
    """Piecewise-linear interpolation for sorted xp (multinerf ``math.sorted_interp``).

    x [..., M], xp [..., N], fp [..., N] -> [..., M]; clamps outside [xp_0, xp_N-1].
    """
    xp, x = _batch_broadcast(xp, x)
    fp = fp.expand(xp.shape[:-1] + fp.shape[-1:])
    n = xp.shape[-1]
    idx = torch.searchsorted(xp, x, right=True)
    idx0 = torch.clamp(idx - 1, min=0)
    idx1 = torch.clamp(idx, max=n - 1)
    xp0, xp1 = torch.gather(xp, -1, idx0), torch.gather(xp, -1, idx1)
    fp0, fp1 = torch.gather(fp, -1, idx0), torch.gather(fp, -1, idx1)
    offset = torch.clamp((x - xp0) / torch.clamp(xp1 - xp0, min=eps), 0, 1)
    return fp0 + offset * (fp1 - fp0)


def integrate_weights(w: torch.Tensor) -> torch.Tensor:
    """CDF of a histogram: w [..., N] -> cw [..., N+1] = [0, min(1, cumsum(w[:-1])), 1]."""
    cw = torch.clamp(torch.cumsum(w[..., :-1], dim=-1), max=1)
    shape = cw.shape[:-1] + (1,)
    return torch.cat([cw.new_zeros(shape), cw, cw.new_ones(shape)], dim=-1)


def weight_to_pdf(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w [..., N] -> density w / max(eps^2, dt) [..., N] (eps = float32 eps)."""
    return w / torch.clamp(t[..., 1:] - t[..., :-1], min=EPS32**2)


def pdf_to_weight(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """p [..., N] -> p * dt [..., N]."""
    return p * (t[..., 1:] - t[..., :-1])


def invert_cdf(u: torch.Tensor, t: torch.Tensor, w_logits: torch.Tensor) -> torch.Tensor:
    """Inverse CDF of the histogram softmax(w_logits) on edges t, evaluated at sorted u.

    u [..., M] in [0, 1), t [..., N+1], w_logits [..., N] -> t_new [..., M].

    Unlike multinerf (softmax of all -inf = NaN), a row whose logits are all -inf (every
    weight of a ray underflowed to 0, e.g. empty space around a Blender object) is treated
    as uniform, so one empty ray cannot turn the whole batch's loss into NaN.
    """
    empty = torch.isneginf(w_logits).all(dim=-1, keepdim=True)
    w = torch.softmax(torch.where(empty, torch.zeros_like(w_logits), w_logits), dim=-1)
    cw = integrate_weights(w)
    return sorted_interp(u, cw, t)


def sample(
    rand: torch.Tensor | None,
    t: torch.Tensor,
    w_logits: torch.Tensor,
    num_samples: int,
    single_jitter: bool = False,
    deterministic_center: bool = False,
) -> torch.Tensor:
    """Draw num_samples sorted samples from the step function (multinerf ``stepfun.sample``).

    rand None -> deterministic evenly spaced u (centred if deterministic_center); otherwise
    stratified u jittered by ``rand`` (uniform numbers in [0, 1), broadcastable to [..., 1]
    if single_jitter else [..., num_samples]; the model draws them with
    ``sampling.uniform``). t [..., N+1], w_logits [..., N] -> [..., num_samples].
    """
    n = int(num_samples)
    batch = torch.broadcast_shapes(t.shape[:-1], w_logits.shape[:-1])
    kw = dict(dtype=t.dtype, device=t.device)
    if rand is None:
        if deterministic_center:
            pad = 1 / (2 * n)
            u = torch.linspace(pad, 1.0 - pad - EPS32, n, **kw)
        else:
            u = torch.linspace(0, 1.0 - EPS32, n, **kw)
        u = u.expand(batch + (n,))
    else:
        d = 1 if single_jitter else n
        if rand.shape[-1] != d:
            raise ValueError(f"rand must end in {d} numbers (single_jitter={single_jitter})")
        u_max = EPS32 + (1 - EPS32) / n
        max_jitter = (1 - u_max) / (n - 1) - EPS32 if n > 1 else 1 - u_max
        u = torch.linspace(0, 1 - u_max, n, **kw) + rand.to(t.dtype) * max_jitter
    return invert_cdf(u, t, w_logits)


def sample_intervals(
    rand: torch.Tensor | None,
    t: torch.Tensor,
    w_logits: torch.Tensor,
    num_samples: int,
    single_jitter: bool = False,
    domain: tuple[float, float] = (-math.inf, math.inf),
) -> torch.Tensor:
    """Sample num_samples intervals: edges [..., num_samples + 1] around sampled centres.

    Centres come from :func:`sample` (deterministic_center=True); edges are the midpoints of
    adjacent centres plus the first/last centre reflected about their neighbouring midpoint,
    clamped to domain.
    """
    if num_samples <= 1:
        raise ValueError(f"num_samples must be > 1, is {num_samples}")
    centers = sample(rand, t, w_logits, num_samples, single_jitter, deterministic_center=True)
    mid = (centers[..., 1:] + centers[..., :-1]) / 2
    minval, maxval = domain
    first = torch.clamp(2 * centers[..., :1] - mid[..., :1], min=minval)
    last = torch.clamp(2 * centers[..., -1:] - mid[..., -1:], max=maxval)
    return torch.cat([first, mid, last], dim=-1)


def _range_max(p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """max(p[..., lo:hi+1]) per query via a sparse table (O(N log N) build, O(1) query).

    p [..., N]; lo, hi int64 [..., M]. Empty ranges (lo > hi) give 0; results are >= 0.
    Table level k holds the max over windows of length 2^k; a query of length L reads the two
    (overlapping) windows of level floor(log2 L) starting at lo and at hi - 2^k + 1.
    """
    n = p.shape[-1]
    levels = [p]
    width = 1
    while 2 * width <= n:  # log2(N) levels, not a loop over bins
        prev = levels[-1]
        nxt = torch.maximum(prev[..., : n - 2 * width + 1], prev[..., width : n - width + 1])
        levels.append(torch.nn.functional.pad(nxt, (0, n - nxt.shape[-1])))
        width *= 2
    table = torch.cat(levels, dim=-1)  # [..., num_levels * N]
    length = torch.clamp(hi - lo + 1, min=1)
    k = torch.floor(torch.log2(length.to(torch.float32))).long()
    k = k - ((1 << k) > length).long()  # guard against log2 rounding
    k = k + ((1 << (k + 1)) <= length).long()
    k = torch.clamp(k, 0, len(levels) - 1)
    start_a = torch.clamp(lo, 0, n - 1)
    start_b = torch.clamp(hi - (1 << k) + 1, 0, n - 1)
    a = torch.gather(table, -1, k * n + start_a)
    b = torch.gather(table, -1, k * n + start_b)
    out = torch.clamp(torch.maximum(a, b), min=0)
    return torch.where(hi >= lo, out, torch.zeros_like(out))


def max_dilate(
    t: torch.Tensor,
    w: torch.Tensor,
    dilation: float,
    domain: tuple[float, float] = (-math.inf, math.inf),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-dilate a step function by `dilation` (multinerf ``stepfun.max_dilate``).

    t [..., N+1], w [..., N] -> t_dilate [..., 3N+1] (sorted, clipped to domain),
    w_dilate [..., 3N]: w_dilate[k] = max{w_j : t_j - d <= t_dilate[k] < t_{j+1} + d} (0 if
    none). The dilated source intervals have sorted left and right ends, so the matching j
    form a contiguous range found by two searchsorted calls; its max uses a sparse table.
    """
    t0 = t[..., :-1] - dilation
    t1 = t[..., 1:] + dilation
    t_dilate = torch.sort(torch.cat([t, t0, t1], dim=-1), dim=-1).values
    t_dilate = torch.clamp(t_dilate, min=domain[0], max=domain[1])
    q = t_dilate[..., :-1]
    t0b, qb = _batch_broadcast(t0, q)
    t1b, _ = _batch_broadcast(t1, q)
    hi = torch.searchsorted(t0b, qb, right=True) - 1  # last j with t0_j <= q
    lo = torch.searchsorted(t1b, qb, right=True)  # first j with t1_j > q
    wb = w.expand(qb.shape[:-1] + w.shape[-1:])
    return t_dilate, _range_max(wb, lo, hi)


def max_dilate_weights(
    t: torch.Tensor,
    w: torch.Tensor,
    dilation: float,
    domain: tuple[float, float] = (-math.inf, math.inf),
    renormalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilate a histogram's density (not its weights): t [..., N+1], w [..., N] ->
    (t_dilate [..., 3N+1], w_dilate [..., 3N]), optionally renormalised to sum to 1."""
    p = weight_to_pdf(t, w)
    t_dilate, p_dilate = max_dilate(t, p, dilation, domain=domain)
    w_dilate = pdf_to_weight(t_dilate, p_dilate)
    if renormalize:
        w_dilate = w_dilate / torch.clamp(w_dilate.sum(dim=-1, keepdim=True), min=EPS32**2)
    return t_dilate, w_dilate


def resample(
    t: torch.Tensor, tp: torch.Tensor, vp: torch.Tensor, use_avg: bool = False
) -> torch.Tensor:
    """Resample step function (tp [..., N+1], vp [..., N]) onto intervals t [..., M+1].

    use_avg=False: vp is per-interval mass, output is the mass inside each new interval
    (difference of the interpolated cumulative sum). use_avg=True: width-weighted average.
    -> [..., M].
    """
    if use_avg:
        wp = tp[..., 1:] - tp[..., :-1]
        v_numer = resample(t, tp, vp * wp, use_avg=False)
        v_denom = resample(t, tp, wp, use_avg=False)
        return v_numer / torch.clamp(v_denom, min=EPS32)
    acc0 = torch.cumsum(vp, dim=-1)
    acc0_t = torch.cat([torch.zeros_like(acc0[..., :1]), acc0], dim=-1)
    acc_t = interp(t, tp, acc0_t)
    return acc_t[..., 1:] - acc_t[..., :-1]


def inner_outer(
    t0: torch.Tensor, t1: torch.Tensor, y1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner and outer measures of step function (t1, y1) on the intervals of t0.

    t0 [..., N+1], t1 [..., M+1], y1 [..., M] -> (y0_inner, y0_outer) [..., N].
    """
    cy1 = torch.cat([torch.zeros_like(y1[..., :1]), torch.cumsum(y1, dim=-1)], dim=-1)
    idx_lo, idx_hi = searchsorted(t1, t0)
    cy1 = cy1.expand(idx_lo.shape[:-1] + cy1.shape[-1:])
    cy1_lo = torch.gather(cy1, -1, idx_lo)
    cy1_hi = torch.gather(cy1, -1, idx_hi)
    y0_outer = cy1_hi[..., 1:] - cy1_lo[..., :-1]
    y0_inner = torch.where(
        idx_hi[..., :-1] <= idx_lo[..., 1:],
        cy1_lo[..., 1:] - cy1_hi[..., :-1],
        torch.zeros_like(y0_outer),
    )
    return y0_inner, y0_outer


def lossfun_outer(
    t: torch.Tensor, w: torch.Tensor, t_env: torch.Tensor, w_env: torch.Tensor
) -> torch.Tensor:
    """Proposal loss: penalise w where it exceeds the envelope's outer measure.

    t [..., N+1], w [..., N] (NeRF), t_env [..., M+1], w_env [..., M] (proposal) -> [..., N]:
    max(0, w - w_outer)^2 / (w + eps).
    """
    _, w_outer = inner_outer(t, t_env, w_env)
    return torch.clamp(w - w_outer, min=0) ** 2 / (w + EPS32)


def lossfun_distortion(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Distortion loss (mip-NeRF 360 Eq. 15) in O(N).

    sum_ij w_i w_j |m_i - m_j| + (1/3) sum_i w_i^2 (t_{i+1} - t_i), m = midpoints (sorted).
    For sorted m the double sum is 2 sum_i w_i (m_i W_<i - S_<i) with exclusive prefix sums
    W_<i = sum_{j<i} w_j and S_<i = sum_{j<i} w_j m_j. t [..., N+1], w [..., N] -> [...].
    """
    m = (t[..., 1:] + t[..., :-1]) / 2
    wm = w * m
    w_excl = torch.cumsum(w, dim=-1) - w
    wm_excl = torch.cumsum(wm, dim=-1) - wm
    loss_inter = 2 * torch.sum(w * (m * w_excl - wm_excl), dim=-1)
    loss_intra = torch.sum(w**2 * (t[..., 1:] - t[..., :-1]), dim=-1) / 3
    return loss_inter + loss_intra


def weighted_percentile(t: torch.Tensor, w: torch.Tensor, ps) -> torch.Tensor:
    """Weighted percentiles of a step function: t [..., N+1], w [..., N], ps (in [0, 100]) of
    length P -> [..., P], by interpolating into the integrated weights."""
    cw = integrate_weights(w)
    ps_t = torch.as_tensor(ps, dtype=t.dtype, device=t.device) / 100
    x = ps_t.expand(cw.shape[:-1] + ps_t.shape[-1:])
    return interp(x, cw, t)
