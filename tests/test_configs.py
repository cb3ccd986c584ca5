"""mipnerf360.configs: presets follow the reference gin files (spec section 1), YAML files,
key=value overrides, errors that name the bad key, save/load round trip."""

import dataclasses
import inspect
import re

import pytest

from mipnerf360 import configs
from mipnerf360.configs import ConfigError, get_config


def test_all_presets_build():
    for name in configs.PRESETS:
        cfg = configs.preset(name)
        assert isinstance(cfg, configs.Config)
        assert cfg.model.num_levels >= 2
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        configs.preset("nope")


def test_preset_360_matches_gin():
    c = get_config("360")
    assert (c.data.dataset_type, c.data.factor, c.data.near, c.data.far) == ("colmap", 4, 0.2, 1e6)
    m = c.model
    assert (m.num_levels, m.num_prop_samples, m.num_nerf_samples) == (3, 64, 32)
    assert m.raydist_fn == "reciprocal" and m.opaque_background and m.ray_shape == "cone"
    assert (m.dilation_bias, m.dilation_multiplier, m.anneal_slope) == (0.0025, 0.5, 10.0)
    assert m.single_jitter and m.stop_level_grad and m.bg_intensity == 1.0
    assert (m.prop_mlp.net_depth, m.prop_mlp.net_width, m.prop_mlp.disable_rgb) == (4, 256, True)
    assert (m.nerf_mlp.net_depth, m.nerf_mlp.net_width) == (8, 1024)
    for mlp in (m.prop_mlp, m.nerf_mlp):
        assert mlp.warp_fn == "contract" and mlp.max_deg_point == 12
        assert (mlp.basis_shape, mlp.basis_subdivisions) == ("icosahedron", 2)
        assert (mlp.density_bias, mlp.rgb_padding, mlp.deg_view) == (-1.0, 0.001, 4)
    t = c.train
    assert (t.batch_size, t.max_steps, t.data_loss_type, t.charb_padding) == (
        16384,
        250000,
        "charb",
        0.001,
    )
    assert (t.interlevel_loss_mult, t.distortion_loss_mult) == (1.0, 0.01)
    assert (t.lr_init, t.lr_final, t.lr_delay_steps, t.lr_delay_mult) == (2e-3, 2e-5, 512, 0.01)
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps, t.grad_max_norm) == (0.9, 0.999, 1e-6, 1e-3)


@pytest.mark.parametrize("width,basis", [(256, ("octahedron", 1)), (512, ("icosahedron", 2))])
def test_preset_blender_and_llff_match_gin(width, basis):
    b = get_config(f"blender_{width}")
    assert (b.data.dataset_type, b.data.near, b.data.far) == ("blender", 2.0, 6.0)
    assert (b.model.num_levels, b.model.num_prop_samples, b.model.num_nerf_samples) == (2, 128, 32)
    assert b.model.raydist_fn is None and not b.model.opaque_background
    assert b.model.ray_shape == "cone"
    assert (b.train.batching, b.train.data_loss_type) == ("single_image", "mse")
    assert (b.train.distortion_loss_mult, b.train.adam_eps) == (0.0, 1e-8)
    assert b.model.nerf_mlp.net_width == width and b.model.nerf_mlp.warp_fn is None
    for mlp in (b.model.prop_mlp, b.model.nerf_mlp):
        assert (mlp.basis_shape, mlp.basis_subdivisions) == basis and mlp.max_deg_point == 16
    ll = get_config(f"llff_{width}")
    assert (ll.data.dataset_type, ll.data.near, ll.data.far, ll.data.forward_facing) == (
        "llff",
        0.0,
        1.0,
        True,
    )
    assert ll.model.ray_shape == "cylinder" and ll.model.opaque_background
    assert (ll.train.batching, ll.train.data_loss_type) == ("all_images", "charb")
    assert (ll.train.distortion_loss_mult, ll.train.adam_eps) == (0.01, 1e-8)
    assert ll.model.nerf_mlp.net_width == width


def test_cpu_preset_is_small_and_360_style():
    c = get_config("cpu")
    assert c.model.raydist_fn == "reciprocal" and c.model.opaque_background
    assert c.model.nerf_mlp.warp_fn == "contract" and c.model.prop_mlp.disable_rgb
    assert c.model.nerf_mlp.net_width < 1024 and c.model.num_nerf_samples <= 32


def test_overrides_and_types():
    c = get_config("360", overrides=["train.max_steps=10", "model.nerf_mlp.net_width=64"])
    assert c.train.max_steps == 10 and c.model.nerf_mlp.net_width == 64
    c = get_config("360", overrides=["train.lr_init=1", "model.raydist_fn=null"])
    assert c.train.lr_init == 1.0 and isinstance(c.train.lr_init, float)
    assert c.model.raydist_fn is None
    with pytest.raises(ConfigError, match="train.max_stpes"):
        get_config("360", overrides=["train.max_stpes=10"])
    with pytest.raises(ConfigError, match="train.max_steps"):
        get_config("360", overrides=["train.max_steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        get_config("360", overrides=["train.max_steps"])
    with pytest.raises(ConfigError, match="model.opaque_background"):
        get_config("360", overrides=["model.opaque_background=3"])


def test_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "preset: blender_256\ntrain:\n  max_steps: 7\nmodel:\n  nerf_mlp:\n    net_depth: 3\n"
    )
    c = get_config(yaml_path=p)
    assert c.train.max_steps == 7 and c.model.nerf_mlp.net_depth == 3
    assert c.data.dataset_type == "blender"  # the file's preset
    c = get_config("cpu", yaml_path=p, overrides=["train.max_steps=9"])
    assert c.train.max_steps == 9 and c.model.raydist_fn == "reciprocal"  # explicit preset wins
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.batch_sise"):
        get_config(yaml_path=bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        get_config(yaml_path=broken)
    with pytest.raises(ConfigError, match="missing.yaml"):
        get_config(yaml_path=tmp_path / "missing.yaml")


def test_save_load_roundtrip(tmp_path):
    c = get_config("llff_512", overrides=["train.max_steps=123", "eval.lpips_nets=[vgg]"])
    path = tmp_path / "sub" / "config.yaml"
    configs.save_config(c, path)
    assert path.exists() and not list(path.parent.glob(".tmp-*"))
    back = configs.load_config(path)
    assert back == c
    assert dataclasses.asdict(back) == dataclasses.asdict(c)


def test_every_field_has_a_comment():
    for cls in (
        configs.MLPConfig,
        configs.ModelConfig,
        configs.DataConfig,
        configs.TrainConfig,
        configs.EvalConfig,
        configs.Config,
    ):
        src = inspect.getsource(cls)
        # field name -> its source text up to the next field
        chunks = dict(re.findall(r"^    (\w+): (.*?)(?=^    \w+: |\Z)", src, re.M | re.S))
        for f in dataclasses.fields(cls):
            assert f.name in chunks, f"{cls.__name__}.{f.name} not found"
            assert "#" in chunks[f.name], f"{cls.__name__}.{f.name} has no comment"


def test_override_reads_exponent_without_dot_as_float():
    """YAML 1.1 reads '1e6' as a string; overrides must still take it as a number."""
    cfg = configs.get_config("cpu", overrides=["data.far=1e6", "train.lr_init=5e-3"])
    assert cfg.data.far == 1e6 and cfg.train.lr_init == 5e-3
    with pytest.raises(configs.ConfigError, match="model.raydist_fn"):
        configs.get_config("cpu", overrides=["model.raydist_fn=1e3"])


# ----------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("train.data_loss_type=l1", "train.data_loss_type: 'l1' is not one of 'charb', 'mse'"),
        ("train.batching=rays", "train.batching: 'rays' is not one of"),
        ("model.ray_shape=sphere", "model.ray_shape: 'sphere' is not one of"),
        ("model.raydist_fn=cubic", "model.raydist_fn: 'cubic' is not one of"),
        ("model.nerf_mlp.warp_fn=squash", "model.nerf_mlp.warp_fn: 'squash' is not one of"),
        ("model.prop_mlp.basis_shape=cube", "model.prop_mlp.basis_shape: 'cube' is not one of"),
        ("train.compile=maybe", "train.compile: 'maybe' is not one of"),
        ("train.precision=fp16", "train.precision: 'fp16' is not one of"),
        ("data.dataset_type=nerfstudio", "data.dataset_type: 'nerfstudio' is not one of"),
        ("train.lr_init=0", "train.lr_init must be > 0"),
        ("train.adam_beta1=1", "train.adam_beta1 must be in [0, 1)"),
        ("train.adam_beta2=-0.1", "train.adam_beta2 must be in [0, 1)"),
        ("model.num_levels=0", "model.num_levels must be >= 1"),
        ("model.num_nerf_samples=0", "model.num_nerf_samples must be >= 1"),
        ("data.near=-1", "data.near must be >= 0"),
        ("data.far=0.1", "data.far must be > data.near"),
        ("data.llffhold=0", "data.llffhold must be >= 1"),
        ("data.factor=-2", "data.factor must be >= 0"),
        ("eval.lpips_nets=[squeeze]", "eval.lpips_nets: 'squeeze' is not one of alex, vgg"),
        ("train.max_steps.foo=1", "train.max_steps.foo: train.max_steps is a value, not a section"),
        ("train=3", "train: expected a mapping"),
    ],
)
def test_validate_names_the_key_and_the_allowed_values(override, message):
    with pytest.raises(ConfigError) as e:
        get_config("360", overrides=[override])
    assert message in str(e.value)


def test_every_preset_is_valid_and_from_dict_validates():
    for name in configs.PRESETS:
        configs.validate(configs.preset(name))
    d = configs.to_dict(configs.preset("cpu"))
    d["train"]["batching"] = "rays"
    with pytest.raises(ConfigError, match="train.batching"):
        configs.from_dict(d)


def test_compile_on_and_off_from_yaml_and_the_command_line(tmp_path):
    # YAML 1.1 reads on/off as booleans; the field is a choice of strings.
    for raw, want in (("on", "on"), ("off", "off"), ("'on'", "on"), ("auto", "auto")):
        assert get_config("cpu", overrides=[f"train.compile={raw}"]).train.compile == want
        p = tmp_path / "c.yaml"
        p.write_text(f"train:\n  compile: {raw}\n")
        assert get_config("cpu", yaml_path=p).train.compile == want


def test_choice_lists_agree_with_the_code_that_implements_them():
    from mipnerf360 import coord, datasets, geopoly, model, sampling, train_utils

    c = configs.CHOICES
    assert set(c["data.dataset_type"]) == set(datasets.DATASET_TYPES) == set(datasets.LOADERS)
    assert set(c["model.raydist_fn"]) == set(coord._RAY_WARPS) - {"linear"}
    assert set(c["model.*.warp_fn"]) - {None} == set(model._WARP_FNS)
    for shape in c["model.*.basis_shape"]:
        assert geopoly.generate_basis(shape, 1).shape[1] == 3
    assert set(c["train.batching"]) == set(sampling.BATCHING_MODES)
    assert set(c["train.precision"]) == set(train_utils.PRECISIONS)
