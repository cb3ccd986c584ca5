"""The mip-NeRF 360 model: proposal MLP, NeRF MLP and the multi-level sampling schedule.

Counterpart of multinerf ``internal/models.py`` (``Model``, ``MLP``, ``NerfMLP``, ``PropMLP``,
``render_image``) and of the mip-NeRF 360 paper. Shapes: ``B`` rays, ``S`` intervals per
ray, ``K`` basis directions, ``L`` levels.

    model = build_model("360")            # 9,007,493 parameters
    renderings, ray_history = model(rays, train_frac=0.5, rng=None)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from mipnerf360 import coord, geopoly, render, sampling, stepfun
from mipnerf360.configs import Config, MLPConfig, ModelConfig, preset

# The rays a model renders (the package's one list: datasets and samplers produce these).
RAY_KEYS = ("origins", "directions", "viewdirs", "radii", "near", "far")
# The two MLPs: flax module name (multinerf's parameter tree) -> attribute of Model.
MLP_NAMES = {"PropMLP_0": "prop_mlp", "NerfMLP_0": "nerf_mlp"}

_WARP_FNS: dict[str, Callable] = {"contract": coord.contract}


def _he_uniform_(linear: nn.Linear) -> nn.Linear:
    """flax ``he_uniform`` kernels (variance scaling 2, fan_in, uniform) and zero biases."""
    fan_in = linear.weight.shape[1]
    bound = math.sqrt(6.0 / fan_in)
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound)
        linear.bias.zero_()
    return linear


def _linear_parts(
    parts: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``linear(cat(parts, -1), weight, bias)`` without materialising the concatenation.

    parts[j] [..., k_j] (broadcastable leading dims, e.g. [B,S,k] and [B,1,k']),
    weight [out, sum k_j], bias [out] -> [..., out].
    """
    if len(parts) == 1:
        return nn.functional.linear(parts[0], weight, bias)
    out, start = None, 0
    for part in parts:
        k = part.shape[-1]
        w = weight[:, start : start + k]
        y = nn.functional.linear(part, w, bias) if out is None else nn.functional.linear(part, w)
        out = y if out is None else out + y
        start += k
    if start != weight.shape[1]:
        raise ValueError(f"parts have {start} features in all, the layer takes {weight.shape[1]}")
    return out


class _ReLU(torch.autograd.Function):
    """ReLU whose backward reads the output: grad * sign(y) (the same gradient as
    ``torch.relu``'s: 1 where y > 0, else 0).

    Under torch.compile on the CPU, ``torch.relu``'s backward makes inductor save a bool mask
    per layer, and its CPU code stores and loads bool tensors about 30x slower than floats
    (torch 2.14: 15 ms for a [16384, 128] mask); y is saved anyway (the next layer's weight
    gradient reads it), so this adds nothing to memory.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * torch.sign(y)


def relu(x: torch.Tensor) -> torch.Tensor:
    """The MLPs' activation: ``torch.relu`` eagerly, :class:`_ReLU` when compiled."""
    if torch.compiler.is_compiling():
        return _ReLU.apply(x)
    return torch.relu(x)


class MLP(nn.Module):
    """A mip-NeRF 360 MLP (multinerf ``models.MLP``).

    forward(means [B,S,3], covs [B,S,3,3], viewdirs [B,3] | None) ->
    dict(density [B,S], rgb [B,S,3]) (rgb is zeros when ``disable_rgb``), float32 also
    under bf16 autocast (only the layers run in bf16; compositing stays float32).
    """

    def __init__(self, cfg: MLPConfig, use_viewdirs: bool = True):
        super().__init__()
        self.cfg = cfg
        self.use_viewdirs = use_viewdirs
        basis = geopoly.generate_basis(cfg.basis_shape, cfg.basis_subdivisions)  # [K,3]
        basis_t = torch.as_tensor(np.asarray(basis).T.copy(), dtype=torch.float32)
        self.register_buffer("pos_basis_t", basis_t, persistent=False)  # [3,K]
        num_dirs = basis_t.shape[1]
        self.feature_dim = 2 * num_dirs * (cfg.max_deg_point - cfg.min_deg_point)
        if cfg.warp_fn is not None and cfg.warp_fn not in _WARP_FNS:
            raise ValueError(f"unknown warp_fn {cfg.warp_fn!r}; choose one of {list(_WARP_FNS)}")

        # Trunk: layer i reads the previous output, plus the features after a skip layer.
        self.trunk = nn.ModuleList()
        width_in = self.feature_dim
        for i in range(cfg.net_depth):
            self.trunk.append(nn.Linear(width_in, cfg.net_width))
            width_in = cfg.net_width
            if i % cfg.skip_layer == 0 and i > 0:
                width_in += self.feature_dim
        self.density_layer = nn.Linear(width_in, 1)

        self.bottleneck_layer = None
        self.view_layers = nn.ModuleList()
        self.rgb_layer = None
        if not cfg.disable_rgb:
            if use_viewdirs:
                if cfg.bottleneck_width > 0:
                    self.bottleneck_layer = nn.Linear(width_in, cfg.bottleneck_width)
                    width_in = cfg.bottleneck_width
                else:
                    width_in = 0
                dir_dim = 3 + 2 * 3 * cfg.deg_view
                width_in += dir_dim
                view_in = width_in
                for i in range(cfg.net_depth_viewdirs):
                    self.view_layers.append(nn.Linear(width_in, cfg.net_width_viewdirs))
                    width_in = cfg.net_width_viewdirs
                    if i % cfg.skip_layer_dir == 0 and i > 0:
                        width_in += view_in
            self.rgb_layer = nn.Linear(width_in, 3)
        for layer in self.flax_layers():
            _he_uniform_(layer)

    def flax_layers(self) -> list[nn.Linear]:
        """The Dense layers in flax creation order (``Dense_0``, ``Dense_1``, ...)."""
        layers = list(self.trunk) + [self.density_layer]
        if self.bottleneck_layer is not None:
            layers.append(self.bottleneck_layer)
        layers += list(self.view_layers)
        if self.rgb_layer is not None:
            layers.append(self.rgb_layer)
        return layers

    def featurize(self, means: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
        """Gaussians [B,S,3],[B,S,3,3] -> IPE features [B,S,feature_dim]."""
        if self.cfg.warp_fn is not None:
            means, covs = coord.track_linearize(_WARP_FNS[self.cfg.warp_fn], means, covs)
        return coord.lifted_integrated_pos_enc(
            means, covs, self.pos_basis_t, self.cfg.min_deg_point, self.cfg.max_deg_point
        )

    def forward(
        self, means: torch.Tensor, covs: torch.Tensor, viewdirs: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        features = self.featurize(means, covs)
        # x is kept as a list of parts whose concatenation is the layer input (the skip
        # connections), so no concat is materialised and no gradient is computed for the
        # feature part; per-ray parts ([B,1,k]) are multiplied once per ray.
        x = [features]
        for i, layer in enumerate(self.trunk):
            x = [relu(_linear_parts(x, layer.weight, layer.bias))]
            if i % cfg.skip_layer == 0 and i > 0:
                x.append(features)
        bottleneck = None
        if self.bottleneck_layer is not None:
            # Density head and bottleneck read the same x: one GEMM for both (instead of a
            # 1-column one, and no gradient accumulation into x).
            weight = torch.cat([self.density_layer.weight, self.bottleneck_layer.weight], 0)
            bias = torch.cat([self.density_layer.bias, self.bottleneck_layer.bias], 0)
            y = _linear_parts(x, weight, bias)
            raw_density, bottleneck = y[..., 0], y[..., 1:]
        elif len(x) == 1:
            # A 1-column output: a broadcast multiply-sum beats a GEMM with N=1 (and its
            # K=1 backward GEMM) on CPUs.
            raw_density = torch.sum(x[0] * self.density_layer.weight[0], dim=-1)
            raw_density = raw_density + self.density_layer.bias[0]
        else:
            raw_density = _linear_parts(x, self.density_layer.weight, self.density_layer.bias)
            raw_density = raw_density[..., 0]
        density = nn.functional.softplus(raw_density.float() + cfg.density_bias)
        if cfg.disable_rgb:
            rgb = torch.zeros_like(means)
        else:
            if self.use_viewdirs:
                x = [] if bottleneck is None else [bottleneck]
                dir_enc = coord.pos_enc(viewdirs, 0, cfg.deg_view, append_identity=True)
                x.append(dir_enc[..., None, :])  # [B,1,27]: the same for all samples of a ray
                view_in = list(x)
                for i, layer in enumerate(self.view_layers):
                    x = [relu(_linear_parts(x, layer.weight, layer.bias))]
                    if i % cfg.skip_layer_dir == 0 and i > 0:
                        x += view_in
            rgb = _linear_parts(x, self.rgb_layer.weight, self.rgb_layer.bias).float()
            rgb = torch.sigmoid(rgb)
            rgb = rgb * (1 + 2 * cfg.rgb_padding) - cfg.rgb_padding
            rgb = rgb.expand(*means.shape[:-1], rgb.shape[-1])
        return {"density": density, "rgb": rgb}


class PropMLP(MLP):
    """The proposal MLP (density only), shared by all proposal levels."""


class NerfMLP(MLP):
    """The final NeRF MLP (density and view-dependent colour)."""


def anneal_exponent(train_frac: float | torch.Tensor, slope: float) -> float | torch.Tensor:
    """Schlick bias ``slope*x / ((slope-1)*x + 1)`` of the training fraction (multinerf
    ``models.Model``: the proposal weights are raised to this power when resampling)."""
    if slope <= 0:
        return 1.0
    return (slope * train_frac) / ((slope - 1) * train_frac + 1)


class Model(nn.Module):
    """mip-NeRF 360 (multinerf ``models.Model``): proposal levels + one NeRF level.

    forward(rays, train_frac, rng=None, compute_extras=False) ->
    (renderings, ray_history), lists over levels. ``rays``: dict of origins [B,3],
    directions [B,3], viewdirs [B,3], radii [B,1], near [B,1], far [B,1]; ``train_frac`` a
    float or 0-d tensor. ``rng=None``: deterministic (evaluation) sampling; int64 ray keys
    [B] (``sampling.ray_keys``, the sampler's ``batch['key']``): training jitter of level i
    is ``sampling.uniform(rng, STREAM_JITTER + i, 1 or S)``, so a ray's jitter is a function
    of (seed, step, its index in the global batch) only. renderings[i]: rgb [B,3], acc [B]
    (+ distance_mean, distance_median, distance_percentile_5/95 [B] with compute_extras).
    ray_history[i]:
    sdist [B,S+1], weights [B,S], density [B,S], rgb [B,S,3] (zeros for proposal levels).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {cfg.num_levels}")
        self.prop_mlp = PropMLP(cfg.prop_mlp, use_viewdirs=cfg.use_viewdirs)
        self.nerf_mlp = NerfMLP(cfg.nerf_mlp, use_viewdirs=cfg.use_viewdirs)

    def forward(
        self,
        rays: Mapping[str, torch.Tensor],
        train_frac: float | torch.Tensor,
        rng: torch.Tensor | None = None,
        compute_extras: bool = False,
    ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
        cfg = self.cfg
        missing = [k for k in RAY_KEYS if k not in rays]
        if missing:
            raise KeyError(f"rays dict lacks {missing}; it needs {list(RAY_KEYS)}")
        near, far = rays["near"], rays["far"]
        _, s_to_t = coord.construct_ray_warps(cfg.raydist_fn, near, far)
        init_s_near, init_s_far = 0.0, 1.0
        sdist = torch.cat(
            [torch.full_like(near, init_s_near), torch.full_like(far, init_s_far)], -1
        )
        weights = torch.ones_like(near)
        prod_num_samples = 1
        anneal = anneal_exponent(train_frac, cfg.anneal_slope)
        use_dilation = cfg.dilation_bias > 0 or cfg.dilation_multiplier > 0
        renderings, ray_history = [], []
        for i_level in range(cfg.num_levels):
            is_prop = i_level < cfg.num_levels - 1
            num_samples = cfg.num_prop_samples if is_prop else cfg.num_nerf_samples
            dilation = (
                cfg.dilation_bias
                + cfg.dilation_multiplier * (init_s_far - init_s_near) / prod_num_samples
            )
            prod_num_samples *= num_samples
            # The new intervals are stop-gradient'ed below, so the resampling needs no graph.
            with torch.set_grad_enabled(torch.is_grad_enabled() and not cfg.stop_level_grad):
                if cfg.stop_level_grad:
                    weights = weights.detach()
                if i_level > 0 and use_dilation:
                    sdist, weights = stepfun.max_dilate_weights(
                        sdist, weights, dilation, domain=(init_s_near, init_s_far), renormalize=True
                    )
                    sdist, weights = sdist[..., 1:-1], weights[..., 1:-1]
                # w**anneal in log space. Where a weight is exactly 0 and anneal is 0 (the
                # first step), multinerf computes 0 * -inf = NaN; we use 0**0 = 1 instead.
                log_w = torch.log(weights + cfg.resample_padding)
                scaled = torch.where(torch.isneginf(log_w) & (anneal == 0), 0.0, anneal * log_w)
                logits = torch.where(sdist[..., 1:] > sdist[..., :-1], scaled, -torch.inf)
                rand = None
                if rng is not None:
                    d = 1 if cfg.single_jitter else num_samples
                    rand = sampling.uniform(rng, sampling.STREAM_JITTER + i_level, d)
                sdist = stepfun.sample_intervals(
                    rand,
                    sdist,
                    logits,
                    num_samples,
                    single_jitter=cfg.single_jitter,
                    domain=(init_s_near, init_s_far),
                )
            if cfg.stop_level_grad:
                sdist = sdist.detach()
            tdist = s_to_t(sdist)
            means, covs = render.cast_rays(
                tdist, rays["origins"], rays["directions"], rays["radii"], cfg.ray_shape, diag=False
            )
            mlp = self.prop_mlp if is_prop else self.nerf_mlp
            ray_results = mlp(means, covs, rays["viewdirs"] if cfg.use_viewdirs else None)
            weights = render.compute_alpha_weights(
                ray_results["density"], tdist, rays["directions"], cfg.opaque_background
            )[0]
            rendering = render.volumetric_rendering(
                ray_results["rgb"], weights, tdist, cfg.bg_intensity, far, compute_extras
            )
            renderings.append(rendering)
            ray_results["sdist"] = sdist
            ray_results["weights"] = weights
            ray_history.append(ray_results)
        return renderings, ray_history


def build_model(cfg_or_preset: Config | ModelConfig | str) -> Model:
    """A freshly initialised Model from a Config, a ModelConfig or a preset name."""
    if isinstance(cfg_or_preset, str):
        cfg_or_preset = preset(cfg_or_preset)
    if isinstance(cfg_or_preset, Config):
        cfg_or_preset = cfg_or_preset.model
    if not isinstance(cfg_or_preset, ModelConfig):
        raise TypeError(f"expected a Config, ModelConfig or preset name, got {cfg_or_preset!r}")
    return Model(cfg_or_preset)


# ----------------------------------------------------------------------------- flax params


def _flax_named_layers(model: Model) -> dict[str, nn.Linear]:
    out = {}
    for flax_name, attr in MLP_NAMES.items():
        for k, layer in enumerate(getattr(model, attr).flax_layers()):
            out[f"{flax_name}/Dense_{k}"] = layer
    return out


def load_flax_params(model: Model, params: Mapping[str, np.ndarray]) -> None:
    """Copy multinerf (flax) parameters into ``model``, in place.

    ``params`` maps names like 'PropMLP_0/Dense_0/kernel' ([in,out]) and '.../bias' to
    arrays; every layer of the model must be present, and no unknown name is accepted.
    """
    layers = _flax_named_layers(model)
    expected = {f"{n}/{p}" for n in layers for p in ("kernel", "bias")}
    unknown = sorted(set(params) - expected)
    missing = sorted(expected - set(params))
    if unknown or missing:
        raise KeyError(f"flax params do not match the model: unknown {unknown}, missing {missing}")
    with torch.no_grad():
        for name, layer in layers.items():
            kernel = torch.as_tensor(np.asarray(params[f"{name}/kernel"]), dtype=torch.float32)
            bias = torch.as_tensor(np.asarray(params[f"{name}/bias"]), dtype=torch.float32)
            if kernel.T.shape != layer.weight.shape or bias.shape != layer.bias.shape:
                raise ValueError(
                    f"{name}: flax kernel {tuple(kernel.shape)} / bias {tuple(bias.shape)} do "
                    f"not fit weight {tuple(layer.weight.shape)} / bias {tuple(layer.bias.shape)}"
                )
            layer.weight.copy_(kernel.T)
            layer.bias.copy_(bias)


def export_flax_params(model: Model) -> dict[str, np.ndarray]:
    """Inverse of load_flax_params: {'NerfMLP_0/Dense_0/kernel': [in,out], ...}."""
    out = {}
    for name, layer in _flax_named_layers(model).items():
        out[f"{name}/kernel"] = layer.weight.detach().cpu().numpy().T.copy()
        out[f"{name}/bias"] = layer.bias.detach().cpu().numpy().copy()
    return out


# ----------------------------------------------------------------------------- rendering


@torch.no_grad()
def render_image(
    model: Model,
    rays: Mapping[str, torch.Tensor],
    chunk_size: int,
    train_frac: float = 1.0,
    keys: tuple[str, ...] = ("rgb", "acc", "distance_mean", "distance_median"),
) -> dict[str, np.ndarray]:
    """Render a full image deterministically, ``chunk_size`` rays at a time.

    ``rays``: dict of [H,W,k] tensors (RAY_KEYS; others are ignored). Returns float32 numpy
    arrays of the final level: rgb [H,W,3], acc [H,W], distance_mean [H,W],
    distance_median [H,W].
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    missing = [k for k in RAY_KEYS if k not in rays]
    if missing:
        raise KeyError(f"rays dict lacks {missing}; it needs {list(RAY_KEYS)}")
    height, width = rays["origins"].shape[:2]
    device = next(model.parameters()).device
    flat = {k: rays[k].reshape(height * width, -1) for k in RAY_KEYS}
    was_training = model.training
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    try:
        for start in range(0, height * width, chunk_size):
            chunk = {
                k: v[start : start + chunk_size].to(device, torch.float32) for k, v in flat.items()
            }
            renderings, _ = model(chunk, train_frac, rng=None, compute_extras=True)
            for k in keys:
                chunks[k].append(renderings[-1][k].float().cpu())
    finally:
        model.train(was_training)
    out = {}
    for k in keys:
        v = torch.cat(chunks[k], 0)
        out[k] = v.reshape(height, width, *v.shape[1:]).numpy()
    return out


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
