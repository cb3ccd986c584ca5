"""mipnerf360.train_utils: lr schedule, losses and one full training step against multinerf
(math_learning_rate_decay.npz, train_utils_losses.npz, train_step_tiny.npz), clipping,
NaN handling and the compile switch."""

import contextlib
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mipnerf360 import configs, metrics, sampling
from mipnerf360 import model as M
from mipnerf360 import train_utils as T

GOLDEN = Path(__file__).parent / "golden"


def test_learning_rate_decay_matches_multinerf():
    d = np.load(GOLDEN / "math_learning_rate_decay.npz")
    steps = d["in_step"]
    got = np.array([T.learning_rate_decay(int(s), 2e-3, 2e-5, 250000, 512, 0.01) for s in steps])
    np.testing.assert_allclose(got, d["out_lr"], rtol=1e-5)
    got = np.array([T.learning_rate_decay(int(s), 5e-4, 5e-6, 250000, 500, 0.1) for s in steps])
    np.testing.assert_allclose(got, d["out_lr_debug"], rtol=1e-5)


def test_lr_off_by_one_and_train_frac():
    tcfg = configs.get_config("360").train
    assert T.lr_at_update(1, tcfg) == pytest.approx(2e-5)  # first update uses lr(0)
    assert T.lr_at_update(513, tcfg) == pytest.approx(
        T.learning_rate_decay(512, 2e-3, 2e-5, 250000, 512, 0.01)
    )
    assert T.train_frac_at(1, 100) == 0.0
    assert T.train_frac_at(100, 100) == 1.0
    assert T.train_frac_at(50, 100) == pytest.approx(49 / 99)
    assert T.train_frac_at(500, 100) == 1.0


@pytest.fixture(scope="module")
def losses_golden():
    return np.load(GOLDEN / "train_utils_losses.npz")


def _history(d):
    return [
        {
            "sdist": torch.tensor(d[f"in_sdist_level{i}"]),
            "weights": torch.tensor(d[f"in_weights_level{i}"]),
        }
        for i in range(3)
    ]


def test_interlevel_and_distortion_losses(losses_golden):
    d = losses_golden
    tcfg = configs.TrainConfig()
    got = T.interlevel_loss(_history(d), tcfg)
    np.testing.assert_allclose(float(got), d["out_interlevel"], rtol=1e-5)
    got = T.distortion_loss(_history(d), tcfg)
    np.testing.assert_allclose(float(got), d["out_distortion"], rtol=1e-5)
    tcfg.interlevel_loss_mult, tcfg.distortion_loss_mult = 2.0, 0.5
    np.testing.assert_allclose(
        float(T.interlevel_loss(_history(d), tcfg)), 2 * d["out_interlevel"], rtol=1e-5
    )
    np.testing.assert_allclose(
        float(T.distortion_loss(_history(d), tcfg)), 50 * d["out_distortion"], rtol=1e-5
    )


@pytest.mark.parametrize("kind", ["charb", "mse"])
def test_data_loss(losses_golden, kind):
    d = losses_golden
    renderings = [{"rgb": torch.tensor(d[f"in_rgb_level{i}"])} for i in range(3)]
    tcfg = configs.TrainConfig(data_loss_type=kind)
    loss, stats = T.compute_data_loss(torch.tensor(d["in_rgb_gt"]), renderings, tcfg)
    np.testing.assert_allclose(float(loss), d[f"out_data_{kind}"], rtol=1e-5)
    np.testing.assert_allclose(stats["mses"].numpy(), d[f"out_mses_{kind}"], rtol=1e-5)
    tcfg.data_coarse_loss_mult = 0.5  # coarse levels enter with their own weight
    loss2, _ = T.compute_data_loss(torch.tensor(d["in_rgb_gt"]), renderings, tcfg)
    assert float(loss2) > float(loss)
    with pytest.raises(ValueError, match="l1"):
        T.compute_data_loss(
            torch.tensor(d["in_rgb_gt"]), renderings, configs.TrainConfig(data_loss_type="l1")
        )


@pytest.fixture(scope="module")
def step_golden():
    return np.load(GOLDEN / "train_step_tiny.npz")


def _tiny_setup(d):
    cfg = configs.get_config("tiny")
    model = M.build_model(cfg)
    M.load_flax_params(
        model, {k[len("in_param/") :]: d[k] for k in d.files if k.startswith("in_param/")}
    )
    batch = {k: torch.tensor(d[f"in_ray_{k}"]) for k in M.RAY_KEYS}
    batch["rgb"] = torch.tensor(d["in_rgb_gt"])
    return cfg, model, batch


def test_train_step_matches_multinerf(step_golden):
    """One deterministic step (Config(randomized=False), train_frac 0.25), first update.

    Parameters are compared to ~1 ulp of their value (atol 1.2e-7 for |p| < 1): Adam's first
    update moves each parameter by ~lr = 2e-5, so the float32 rounding of p - lr*u is the
    only difference left (the update directions agree to 2e-3 of lr, i.e. within that ulp).
    """
    d = step_golden
    # train_step would use train_frac(step=1) = 0; the golden step used 0.25: pass it.
    cfg, model, batch = _tiny_setup(d)
    optimizer = T.create_optimizer(model, cfg)
    step = T.TrainStep(model, optimizer, cfg)
    stats = step.run_batch(batch, 1, rng=None, train_frac=float(d["in_train_frac"]))
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in stats.values())
    stats = {k: float(v) for k, v in stats.items()}
    np.testing.assert_allclose(stats["loss"], d["out_loss"], rtol=1e-5)
    np.testing.assert_allclose(stats["data"], d["out_losses_data"], rtol=1e-5)
    np.testing.assert_allclose(stats["interlevel"], d["out_losses_interlevel"], rtol=1e-5)
    np.testing.assert_allclose(stats["distortion"], d["out_losses_distortion"], rtol=1e-5)
    for i in range(3):
        np.testing.assert_allclose(stats[f"mse_{i}"], d["out_mses"][i], rtol=1e-5)
        np.testing.assert_allclose(stats[f"psnr_{i}"], d["out_psnrs"][i], rtol=1e-5)
    np.testing.assert_allclose(stats["psnr"], d["out_psnrs"][-1], rtol=1e-5)
    for name in ("NerfMLP_0", "PropMLP_0"):
        np.testing.assert_allclose(stats[f"grad_norm_{name}"], d[f"out_grad_norm_{name}"], 1e-5)
    np.testing.assert_allclose(stats["lr"], d["out_lr_used"], rtol=1e-6)
    new = M.export_flax_params(model)
    assert len(new) == len([k for k in d.files if k.startswith("out_new_param/")])
    for k, v in new.items():
        ref, old = d[f"out_new_param/{k}"], d[f"in_param/{k}"]
        np.testing.assert_allclose(v, ref, rtol=0, atol=1.2e-7, err_msg=k)
        assert np.abs(v - old).max() > 1e-5, k  # every parameter moved (by ~lr)


def test_train_step_default_train_frac_and_stats(step_golden):
    cfg, model, batch = _tiny_setup(step_golden)
    cfg.train.max_steps = 11
    optimizer = T.create_optimizer(model, cfg)
    keys = sampling.ray_keys(0, 6, torch.arange(batch["rgb"].shape[0]))
    stats = T.train_step(model, optimizer, batch, 6, cfg, rng=keys)
    assert float(stats["train_frac"]) == pytest.approx(0.5)
    assert float(stats["lr"]) == pytest.approx(T.lr_at_update(6, cfg.train))
    assert stats["finite"].dtype == torch.bool and bool(stats["finite"])
    assert all(math.isfinite(float(v)) for v in stats.values())


def test_nan_loss_is_flagged_on_device_and_leaves_parameters(step_golden):
    cfg, model, batch = _tiny_setup(step_golden)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = T.create_optimizer(model, cfg)
    step = T.make_train_step(model, optimizer, cfg)
    stats = step.run_batch(batch, 6)
    assert bool(stats["finite"])
    bad = T.first_bad_step(None, stats["finite"], 6)
    assert int(bad) == -1
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(moved[k], before[k]) for k in before)
    batch["rgb"] = batch["rgb"].clone()
    batch["rgb"][0, 0] = float("nan")
    stats = step.run_batch(batch, 7)
    assert not bool(stats["finite"]) and not math.isfinite(float(stats["loss"]))
    for k, v in model.state_dict().items():
        assert torch.equal(v, moved[k]), k  # a non-finite step does not move the parameters
    bad = T.first_bad_step(bad, stats["finite"], 7)
    assert int(bad) == 7
    batch["rgb"][0, 0] = 0.5
    stats = step.run_batch(batch, 8)
    assert bool(stats["finite"])
    assert int(T.first_bad_step(bad, stats["finite"], 8)) == 7  # the first bad step is kept


def test_clip_gradients_per_mlp_and_nan_to_num(step_golden):
    cfg, model, _ = _tiny_setup(step_golden)
    for p in model.prop_mlp.parameters():
        p.grad = torch.full_like(p, 2.0)
    for p in model.nerf_mlp.parameters():
        p.grad = torch.full_like(p, 1e-9)
    norms = T.clip_gradients(model, cfg.train)
    n_prop = sum(p.numel() for p in model.prop_mlp.parameters())
    assert float(norms["PropMLP_0"]) == pytest.approx(2 * math.sqrt(n_prop), rel=1e-5)
    clipped = torch.sqrt(sum((p.grad**2).sum() for p in model.prop_mlp.parameters()))
    assert float(clipped) == pytest.approx(1e-3, rel=1e-4)  # scaled to grad_max_norm
    assert all(torch.all(p.grad == 1e-9) for p in model.nerf_mlp.parameters())  # untouched
    # A NaN gradient makes that MLP's norm NaN; everything of it becomes finite (zero).
    next(model.nerf_mlp.parameters()).grad[0, 0] = float("nan")
    T.clip_gradients(model, cfg.train)
    assert all(torch.isfinite(p.grad).all() for p in model.nerf_mlp.parameters())


def test_optimizer_hyperparameters():
    cfg = configs.get_config("360")
    model = M.build_model("tiny")
    opt = T.create_optimizer(model, cfg)
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-6
    assert group["weight_decay"] == 0
    assert sum(p.numel() for p in group["params"]) == M.num_params(model)


def test_compile_setting():
    assert T.resolve_compile("off", "cpu") is False
    assert T.resolve_compile("on", "cpu") is True
    assert T.resolve_compile("auto", "cuda") is True
    assert T.resolve_compile("auto", "cpu") is False
    with pytest.raises(configs.ConfigError, match="maybe"):
        T.resolve_compile("maybe", "cpu")


@pytest.mark.slow
def test_compiled_step_matches_eager(step_golden):
    """torch.compile'd MLPs (cfg.train.compile='on') give the golden step too (CPU)."""
    d = step_golden
    cfg, model, batch = _tiny_setup(d)
    cfg.train.compile = "on"
    optimizer = T.create_optimizer(model, cfg)
    step = T.make_train_step(model, optimizer, cfg)
    assert step.compiled
    stats = step.run_batch(batch, 1, rng=None, train_frac=float(d["in_train_frac"]))
    stats = {k: float(v) for k, v in stats.items()}
    np.testing.assert_allclose(stats["loss"], d["out_loss"], rtol=1e-5)
    for name in ("NerfMLP_0", "PropMLP_0"):
        np.testing.assert_allclose(stats[f"grad_norm_{name}"], d[f"out_grad_norm_{name}"], 1e-4)
    new = M.export_flax_params(model)
    for k, v in new.items():
        np.testing.assert_allclose(v, d[f"out_new_param/{k}"], rtol=0, atol=1.2e-7, err_msg=k)


def test_adam_update_is_optax_adam():
    """Several updates of create_optimizer's Adam equal optax.adam's formula:
    m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2, p -= lr * m_hat / (sqrt(v_hat) + eps)."""
    cfg = configs.get_config("360")
    cfg.train.adam_eps = 1e-3  # large enough that its placement (outside the sqrt) matters
    model = M.build_model("tiny")
    opt = T.create_optimizer(model, cfg)
    p = next(model.parameters())
    p0 = p.detach().double().clone()
    g_seq = [torch.randn_like(p) * s for s in (1e-2, 1e-3, 3e-2)]
    lrs = [1e-3, 2e-3, 5e-4]
    m = torch.zeros_like(p0)
    v = torch.zeros_like(p0)
    ref = p0.clone()
    b1, b2, eps = 0.9, 0.999, 1e-3
    for k, (g, lr) in enumerate(zip(g_seq, lrs, strict=True), start=1):
        for q in model.parameters():
            q.grad = torch.zeros_like(q)
        p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        gd = g.double()
        m = b1 * m + (1 - b1) * gd
        v = b2 * v + (1 - b2) * gd * gd
        ref = ref - lr * (m / (1 - b1**k)) / (torch.sqrt(v / (1 - b2**k)) + eps)
    np.testing.assert_allclose(p.detach().double().numpy(), ref.numpy(), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- sampled steps


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory):
    from mipnerf360 import datasets, synthetic

    out = tmp_path_factory.mktemp("scene") / "s360"
    synthetic.generate(out, kind="360", n_views=8, width=32, height=24, seed=0, factors=())
    return datasets.load_scene(out, configs.get_config("cpu").data)


def _sampled_setup(scene, preset="cpu", batch=128, seed=0, **train):
    cfg = configs.get_config(preset)
    cfg.train.batch_size = batch
    for k, v in train.items():
        setattr(cfg.train, k, v)
    torch.manual_seed(seed)
    model = M.build_model(cfg)
    optimizer = T.create_optimizer(model, cfg)
    sampler = sampling.RaySampler(scene, batch, "cpu", cfg.train.seed, cfg.train.batching)
    return cfg, model, optimizer, sampler


def test_resume_from_state_dicts_is_bit_exact(small_scene, one_thread):
    """The step holds no random state: model + optimizer state dicts resume exactly."""
    cfg, model, opt, sampler = _sampled_setup(small_scene, batch=32)
    step = T.make_train_step(model, opt, cfg, sampler=sampler)
    for s in (1, 2):
        step(s)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for s in (3, 4):
        last = step(s)
    cfg2, model2, opt2, sampler2 = _sampled_setup(small_scene, batch=32, seed=1)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    step2 = T.make_train_step(model2, opt2, cfg2, sampler=sampler2)
    for s in (3, 4):
        again = step2(s)
    assert torch.equal(again["loss"], last["loss"])
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_grad_reduce_sees_the_gradients_before_clipping(small_scene, one_thread):
    seen = []

    def double(grads):
        seen.append(len(grads))
        torch._foreach_mul_(grads, 2.0)

    norms = []
    for reduce in (None, double):
        cfg, model, opt, sampler = _sampled_setup(small_scene, batch=32)
        step = T.make_train_step(model, opt, cfg, sampler=sampler, grad_reduce=reduce)
        norms.append(step(1))
    assert seen == [len(list(model.parameters()))]
    for name in M.MLP_NAMES:
        key = f"grad_norm_{name}"
        np.testing.assert_allclose(float(norms[1][key]), 2 * float(norms[0][key]), rtol=1e-5)


def test_bf16_trains_like_fp32(small_scene, one_thread):
    """50 steps of the cpu preset under bf16 autocast: finite, and the PSNR of a fixed set
    of rays (rendered in float32) is within 0.5 dB of the float32 run's."""
    probe = sampling.RaySampler(small_scene, 2048, "cpu", seed=99).sample(1)

    def psnr(model):
        with torch.no_grad():
            renderings, _ = model(probe, 1.0)
        return float(metrics.mse_to_psnr(torch.mean((renderings[-1]["rgb"] - probe["rgb"]) ** 2)))

    result = {}
    for precision in ("fp32", "bf16"):
        cfg, model, opt, sampler = _sampled_setup(small_scene, batch=256, max_steps=50)
        cfg.train.precision = precision
        step = T.make_train_step(model, opt, cfg, sampler=sampler)
        assert step.precision == precision
        start = psnr(model)
        first = step(1)
        for s in range(2, 51):
            stats = step(s)
        assert bool(stats["finite"]) and math.isfinite(float(stats["loss"]))
        result[precision] = (start, float(first["loss"]), psnr(model))
    (start, loss32, p32), (_, loss16, p16) = result["fp32"], result["bf16"]
    assert loss16 != loss32  # the bf16 run did run in bf16
    assert p32 > start + 2, result  # both trained
    assert abs(p16 - p32) < 0.5, result


def test_precision_context_and_choice():
    assert isinstance(T.precision_context("cpu", "fp32"), contextlib.nullcontext)
    with T.precision_context("cpu", "bf16"):
        y = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
    assert y.dtype == torch.bfloat16
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        T.set_tf32(False)
        with T.precision_context("cpu", "tf32"):
            assert torch.backends.cuda.matmul.allow_tf32  # recorded (no CUDA here)
    finally:
        T.set_tf32(old)
    with pytest.raises(configs.ConfigError, match="fp16"):
        T.precision_context("cpu", "fp16")
    cfg = configs.get_config("tiny")
    assert T.precision_of(cfg) == getattr(cfg.train, "precision", "fp32")
    cfg.train.precision = "fp8"
    with pytest.raises(configs.ConfigError, match="fp8"):
        T.precision_of(cfg)
