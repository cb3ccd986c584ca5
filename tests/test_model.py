"""mipnerf360.model: parameter counts, flax parameter I/O, golden parity with multinerf's
Model (model_forward_tiny.npz), sampling modes, stop-gradients and render_image."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mipnerf360 import coord, sampling
from mipnerf360 import model as M
from mipnerf360.configs import MLPConfig

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def golden_fwd():
    return np.load(GOLDEN / "model_forward_tiny.npz")


def _flax_params(d):
    return {k[len("in_param/") :]: d[k] for k in d.files if k.startswith("in_param/")}


def _rays(d):
    return {k: torch.tensor(d[f"in_ray_{k}"]) for k in M.RAY_KEYS}


def _keys(seed, n, step=1):
    return sampling.ray_keys(seed, step, torch.arange(n))


def _tiny(d):
    model = M.build_model("tiny")
    M.load_flax_params(model, _flax_params(d))
    return model


@pytest.mark.parametrize(
    "name,count",
    [
        ("360", 9_007_493),
        ("blender_256", 835_205),
        ("blender_512", 3_065_733),
        ("llff_256", 835_205),
        ("llff_512", 3_065_733),
    ],
)
def test_parameter_counts_match_reference(name, count):
    model = M.build_model(name)
    assert M.num_params(model) == count
    assert isinstance(model.prop_mlp, M.PropMLP) and isinstance(model.nerf_mlp, M.NerfMLP)


def test_360_layer_shapes():
    """multinerf models.MLP: NerfMLP 504 -> 8x1024, skip concat after layer 4; PropMLP 4x256."""
    model = M.build_model("360")
    nerf = [tuple(layer.weight.shape) for layer in model.nerf_mlp.flax_layers()]
    assert nerf[0] == (1024, 504) and nerf[5] == (1024, 1024 + 504)
    assert nerf[8] == (1, 1024) and nerf[9] == (256, 1024)  # density, bottleneck
    assert nerf[10] == (128, 256 + 27) and nerf[11] == (3, 128)  # view layer, rgb
    assert len(nerf) == 12
    prop = [tuple(layer.weight.shape) for layer in model.prop_mlp.flax_layers()]
    assert prop == [(256, 504), (256, 256), (256, 256), (256, 256), (1, 256)]


def test_he_uniform_init():
    torch.manual_seed(0)
    model = M.build_model("360")
    for layer in model.nerf_mlp.flax_layers() + model.prop_mlp.flax_layers():
        fan_in = layer.weight.shape[1]
        bound = math.sqrt(6 / fan_in)
        assert layer.weight.abs().max() <= bound
        assert torch.all(layer.bias == 0)
        if layer.weight.numel() > 10000:  # variance of U(-b, b) is b^2/3 = 2/fan_in
            assert layer.weight.var().item() == pytest.approx(2 / fan_in, rel=0.05)


def test_flax_param_roundtrip_and_errors(golden_fwd):
    params = _flax_params(golden_fwd)
    model = _tiny(golden_fwd)
    out = M.export_flax_params(model)
    assert set(out) == set(params)
    for k in params:
        np.testing.assert_array_equal(out[k], params[k])
    bad = dict(params)
    bad["NerfMLP_0/Dense_9/kernel"] = np.zeros((3, 3), np.float32)
    with pytest.raises(KeyError, match="Dense_9"):
        M.load_flax_params(model, bad)
    bad = dict(params)
    del bad["PropMLP_0/Dense_1/bias"]
    with pytest.raises(KeyError, match="PropMLP_0/Dense_1/bias"):
        M.load_flax_params(model, bad)
    bad = dict(params)
    bad["NerfMLP_0/Dense_0/kernel"] = bad["NerfMLP_0/Dense_0/kernel"][:10]
    with pytest.raises(ValueError, match="NerfMLP_0/Dense_0"):
        M.load_flax_params(model, bad)


def _close(got, ref, rtol, atol, what):
    got = got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else got
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("tf", ["0.0", "0.5", "1.0"])
def test_forward_matches_multinerf(golden_fwd, tf):
    """All levels, all outputs, deterministic sampling (rng=None) as in the golden file.

    Tolerances: float32 rounding differences between XLA and torch, ~1e-5 relative, except
    (a) densities/weights of the last proposal interval, which reaches t ~ 1e5-1e6 where a
    1-ulp change of s moves t by ~10% (t = 1/(s/far + (1-s)/near), far = 1e6): rtol 1e-4;
    (b) proposal-level distances, which are dominated by that last interval: compared in
    s-space (t_to_s), where the same rounding is ~1e-4 (distance_mean averages log t).
    The NeRF level (2) is compared at rtol 2e-5 everywhere, distances in t.
    """
    d = golden_fwd
    model = _tiny(d)
    rays = _rays(d)
    with torch.no_grad():
        renderings, history = model(rays, float(tf), rng=None, compute_extras=True)
    assert len(renderings) == len(history) == 3
    t_to_s, _ = coord.construct_ray_warps("reciprocal", rays["near"][:, 0], rays["far"][:, 0])
    for lvl in range(3):
        pre = f"out_tf{tf}_level{lvl}_"
        r, h = renderings[lvl], history[lvl]
        _close(r["rgb"], d[pre + "rgb"], 2e-5, 1e-6, pre + "rgb")
        _close(r["acc"], d[pre + "acc"], 2e-5, 1e-6, pre + "acc")
        _close(h["sdist"], d[pre + "hist_sdist"], 1e-5, 1e-6, pre + "sdist")
        _close(h["rgb"], d[pre + "hist_rgb"], 2e-5, 1e-6, pre + "hist_rgb")
        for key in ("distance_mean", "distance_median"):
            if lvl == 2:
                _close(r[key], d[pre + key], 2e-5, 0, pre + key)
            else:
                s_got = t_to_s(r[key])
                s_ref = t_to_s(torch.tensor(d[pre + key]))
                _close(s_got, s_ref.numpy(), 0, 1e-3, pre + key + " (s-space)")
        rtol = 2e-5 if lvl == 2 else 1e-4
        _close(h["weights"], d[pre + "hist_weights"], rtol, 1e-6, pre + "weights")
        _close(h["density"], d[pre + "hist_density"], rtol, 1e-6, pre + "density")


def test_forward_shapes_and_extras(golden_fwd):
    model = _tiny(golden_fwd)
    rays = _rays(golden_fwd)
    renderings, history = model(rays, 1.0)
    assert set(renderings[-1]) >= {"rgb", "acc"}
    assert [h["sdist"].shape[-1] for h in history] == [17, 17, 9]
    assert history[-1]["rgb"].shape == (6, 8, 3)
    assert torch.all(history[0]["rgb"] == 0)  # the proposal MLP renders no colour
    renderings, _ = model(rays, 1.0, compute_extras=True)
    for key in ("distance_mean", "distance_median", "distance_percentile_5"):
        assert renderings[-1][key].shape == (6,)


def test_missing_ray_key_is_named(golden_fwd):
    model = _tiny(golden_fwd)
    rays = _rays(golden_fwd)
    del rays["radii"]
    with pytest.raises(KeyError, match="radii"):
        model(rays, 1.0)


def test_training_jitter_is_seeded_and_per_ray(golden_fwd):
    model = _tiny(golden_fwd)
    rays = _rays(golden_fwd)
    with torch.no_grad():
        _, h_eval = model(rays, 0.5)
        _, h_a = model(rays, 0.5, rng=_keys(1, 6))
        _, h_b = model(rays, 0.5, rng=_keys(1, 6))
        _, h_c = model(rays, 0.5, rng=_keys(2, 6))
    for lvl in range(3):
        assert torch.equal(h_a[lvl]["sdist"], h_b[lvl]["sdist"])
        assert not torch.equal(h_a[lvl]["sdist"], h_c[lvl]["sdist"])
        assert not torch.equal(h_a[lvl]["sdist"], h_eval[lvl]["sdist"])
        s = h_a[lvl]["sdist"]
        assert torch.all(s[..., 1:] >= s[..., :-1]) and s.min() >= 0 and s.max() <= 1
    # Level 0 samples a uniform histogram: with one jitter per ray every interior edge of a
    # ray is shifted by the same amount, so the interval widths stay equal.
    s0 = h_a[0]["sdist"][:, 1:-1]
    steps = s0[:, 1:] - s0[:, :-1]
    np.testing.assert_allclose(steps.numpy(), steps[:, :1].expand_as(steps).numpy(), atol=1e-6)


def test_mlp_outputs_are_float32_under_bf16_autocast(golden_fwd):
    """Only the layers run in bf16: densities and colours reach compositing as float32."""
    model = _tiny(golden_fwd)
    rays = _rays(golden_fwd)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        renderings, history = model(rays, 0.5, rng=_keys(0, 6))
    for level in history:
        assert level["density"].dtype == torch.float32 and level["rgb"].dtype == torch.float32
    assert renderings[-1]["rgb"].dtype == torch.float32
    with torch.no_grad():
        ref, _ = model(rays, 0.5, rng=_keys(0, 6))
    torch.testing.assert_close(renderings[-1]["rgb"], ref[-1]["rgb"], rtol=0.05, atol=0.02)


def test_jitter_depends_on_the_ray_key_not_the_batch_split(golden_fwd):
    """A ray's jitter is a function of its key (seed, step, global index): rendering rays
    3..5 alone gives their rows of the full batch, bit for bit (data-parallel ranks)."""
    model = _tiny(golden_fwd)
    rays = _rays(golden_fwd)
    keys = _keys(7, 6, step=42)
    with torch.no_grad():
        r_all, h_all = model(rays, 0.5, rng=keys)
        r_part, h_part = model({k: v[3:] for k, v in rays.items()}, 0.5, rng=keys[3:])
    for lvl in range(3):
        assert torch.equal(h_part[lvl]["sdist"], h_all[lvl]["sdist"][3:])
    torch.testing.assert_close(r_part[-1]["rgb"], r_all[-1]["rgb"][3:], rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # another step: other jitter
        _, h_next = model(rays, 0.5, rng=_keys(7, 6, step=43))
    assert not torch.equal(h_next[0]["sdist"], h_all[0]["sdist"])


def test_stop_gradient_between_levels(golden_fwd):
    """The data loss on the NeRF level must not reach the proposal MLP (stop_level_grad)."""
    model = _tiny(golden_fwd)
    renderings, _ = model(_rays(golden_fwd), 0.5, rng=_keys(0, 6))
    renderings[-1]["rgb"].sum().backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.prop_mlp.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.nerf_mlp.parameters())


@pytest.mark.parametrize("name", ["blender_256", "llff_256"])
def test_other_presets_run(name):
    torch.manual_seed(0)
    model = M.build_model(name)
    cfg = model.cfg
    assert cfg.num_levels == 2 and cfg.raydist_fn is None
    b = 4
    d = torch.nn.functional.normalize(torch.randn(b, 3), dim=-1)
    rays = {
        "origins": torch.randn(b, 3),
        "directions": d,
        "viewdirs": d,
        "radii": torch.full((b, 1), 1e-3),
        "near": torch.full((b, 1), 2.0),
        "far": torch.full((b, 1), 6.0),
    }
    renderings, history = model(rays, 1.0)
    assert renderings[-1]["rgb"].shape == (b, 3)
    assert history[0]["sdist"].shape == (b, 129) and history[1]["sdist"].shape == (b, 33)
    assert torch.isfinite(renderings[-1]["rgb"]).all()


def test_render_image_matches_forward_and_chunks(golden_fwd):
    model = _tiny(golden_fwd)
    rays = _rays(golden_fwd)
    image_rays = {k: v.reshape(2, 3, -1) for k, v in rays.items()}
    out = M.render_image(model, image_rays, chunk_size=4)  # 6 rays: chunks of 4 and 2
    assert out["rgb"].shape == (2, 3, 3) and out["acc"].shape == (2, 3)
    with torch.no_grad():
        renderings, _ = model(rays, 1.0, compute_extras=True)
    for key in ("rgb", "acc", "distance_mean", "distance_median"):
        ref = renderings[-1][key].numpy()
        np.testing.assert_allclose(out[key].reshape(ref.shape), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["rgb"].reshape(6, 3), golden_fwd["out_tf1.0_level2_rgb"], 2e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        M.render_image(model, image_rays, chunk_size=0)


def _naive_mlp_forward(mlp, means, covs, viewdirs):
    """multinerf MLP.__call__ written with explicit concatenations."""
    cfg = mlp.cfg
    layers = iter(mlp.flax_layers())
    features = mlp.featurize(means, covs)
    x = features
    for i in range(cfg.net_depth):
        x = torch.relu(next(layers)(x))
        if i % cfg.skip_layer == 0 and i > 0:
            x = torch.cat([x, features], -1)
    density = torch.nn.functional.softplus(next(layers)(x)[..., 0] + cfg.density_bias)
    if cfg.disable_rgb:
        return density, torch.zeros_like(means)
    x = next(layers)(x) if cfg.bottleneck_width > 0 else x
    dir_enc = coord.pos_enc(viewdirs, 0, cfg.deg_view, append_identity=True)
    dir_enc = dir_enc[:, None, :].expand(*x.shape[:-1], dir_enc.shape[-1])
    x = torch.cat([x, dir_enc], -1)
    view_in = x
    for i in range(cfg.net_depth_viewdirs):
        x = torch.relu(next(layers)(x))
        if i % cfg.skip_layer_dir == 0 and i > 0:
            x = torch.cat([x, view_in], -1)
    rgb = torch.sigmoid(next(layers)(x)) * (1 + 2 * cfg.rgb_padding) - cfg.rgb_padding
    return density, rgb


@pytest.mark.parametrize(
    "kw",
    [
        dict(net_depth=8, net_width=24, bottleneck_width=12, net_width_viewdirs=8),  # 360 shape
        dict(net_depth=9, net_width=16, net_depth_viewdirs=6, skip_layer=4, skip_layer_dir=2),
        dict(net_depth=3, net_width=16, disable_rgb=True),
    ],
)
def test_mlp_matches_explicit_concatenation(kw):
    """The concatenation-free forward (skip after a middle layer, view-branch skips, per-ray
    direction part) equals the plain formula, values and gradients."""
    torch.manual_seed(0)
    mlp = M.NerfMLP(MLPConfig(warp_fn="contract", max_deg_point=4, **kw))
    for layer in mlp.flax_layers():  # non-zero biases too
        torch.nn.init.uniform_(layer.bias, -0.5, 0.5)
    b, s = 5, 7
    means = torch.randn(b, s, 3) * 2
    a = torch.randn(b, s, 3, 3) * 0.1
    covs = a @ a.transpose(-1, -2)
    viewdirs = torch.nn.functional.normalize(torch.randn(b, 3), dim=-1)
    out = mlp(means, covs, viewdirs)
    loss = out["density"].sum() + (out["rgb"] ** 2).sum()
    grads = torch.autograd.grad(loss, list(mlp.parameters()))
    density, rgb = _naive_mlp_forward(mlp, means, covs, viewdirs)
    torch.testing.assert_close(out["density"], density, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["rgb"], rgb, rtol=1e-5, atol=1e-6)
    ref = torch.autograd.grad(density.sum() + (rgb**2).sum(), list(mlp.parameters()))
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_zero_weights_at_train_frac_zero_do_not_give_nan():
    """anneal = 0 at the first step: a zero proposal weight must not make 0 * log(0) = NaN."""
    torch.manual_seed(0)
    model = M.build_model("tiny")
    with torch.no_grad():
        # A hugely negative density bias in the proposal MLP makes its weights underflow to 0.
        model.prop_mlp.flax_layers()[-1].bias.fill_(-1e4)
    rays = {
        "origins": torch.zeros(4, 3),
        "directions": torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.6, 0.8, 0]]),
        "radii": torch.full((4, 1), 0.01),
        "near": torch.full((4, 1), 0.2),
        "far": torch.full((4, 1), 1e6),
    }
    rays["viewdirs"] = rays["directions"] / rays["directions"].norm(dim=-1, keepdim=True)
    renderings, history = model(rays, train_frac=0.0)
    assert all(torch.isfinite(h["sdist"]).all() for h in history)
    assert torch.isfinite(renderings[-1]["rgb"]).all()


def test_compiled_relu_has_the_gradient_of_torch_relu():
    # model.relu's compiled form (_ReLU: the backward reads the output) must give the same
    # values and gradients as torch.relu, zeros and negatives included.
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 0.5, 3.0], dtype=torch.float64)
    grad = torch.tensor([1.0, 2.0, -3.0, 4.0, -5.0, 6.0], dtype=torch.float64)
    outs, grads = [], []
    for fn in (torch.relu, M._ReLU.apply):
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        y.backward(grad)
        outs.append(y.detach())
        grads.append(xi.grad)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1]), grads
