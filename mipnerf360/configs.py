"""Typed configuration: dataclasses, named presets, YAML files and key=value overrides.

Counterpart of multinerf's ``internal/configs.py`` plus its gin files. A config is
``Config(data, model, train, eval)``; presets reproduce ``configs/360.gin``,
``blender_{256,512}.gin`` and ``llff_{256,512}.gin`` (values from the reference spec,
section 1), plus a small ``cpu`` preset and the ``tiny`` model of the golden files.

    cfg = get_config("360", yaml_path="my.yaml", overrides=["train.max_steps=1000"])
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from mipnerf360.errors import ConfigError  # noqa: F401 (re-exported: configs.ConfigError)

# LPIPS backbones (the `lpips` package's AlexNet and VGG variants), in table order.
LPIPS_NETS = ("alex", "vgg")


@dataclass
class MLPConfig:
    net_depth: int = 8  # number of trunk Dense+ReLU layers
    net_width: int = 256  # width of the trunk layers
    bottleneck_width: int = 256  # width of the (linear) bottleneck feeding the view branch
    net_depth_viewdirs: int = 1  # layers in the view-direction branch
    net_width_viewdirs: int = 128  # width of the view-direction branch
    min_deg_point: int = 0  # lowest IPE frequency (2^min_deg)
    max_deg_point: int = 12  # IPE uses degrees min_deg_point .. max_deg_point-1
    deg_view: int = 4  # view-direction positional-encoding degrees
    skip_layer: int = 4  # concat the input features after every skip_layer-th layer
    skip_layer_dir: int = 4  # same for the view-direction branch (its own inputs)
    density_bias: float = -1.0  # density = softplus(raw + density_bias)
    rgb_padding: float = 0.001  # rgb = sigmoid(raw) * (1 + 2 pad) - pad
    basis_shape: str = "icosahedron"  # 'icosahedron' or 'octahedron' (geopoly basis)
    basis_subdivisions: int = 2  # tessellation level of the basis polyhedron
    warp_fn: str | None = None  # 'contract' (unbounded scenes) or None
    disable_rgb: bool = False  # True for proposal MLPs: density only


@dataclass
class ModelConfig:
    num_levels: int = 3  # proposal levels + 1 NeRF level
    num_prop_samples: int = 64  # intervals per proposal level
    num_nerf_samples: int = 32  # intervals of the NeRF level
    raydist_fn: str | None = None  # s<->t warp: 'reciprocal' (360) or None (linear)
    ray_shape: str = "cone"  # 'cone' or 'cylinder'
    opaque_background: bool = False  # last interval absorbs everything left
    single_jitter: bool = True  # one jitter per ray (not per sample) in training
    dilation_multiplier: float = 0.5  # proposal-histogram dilation, times 1/prod(samples)
    dilation_bias: float = 0.0025  # constant part of the dilation
    anneal_slope: float = 10.0  # Schlick annealing slope of the proposal weights
    resample_padding: float = 0.0  # added to weights before the log when resampling
    stop_level_grad: bool = True  # stop gradients through the interval endpoints
    bg_intensity: float = 1.0  # background colour (1 = white)
    use_viewdirs: bool = True  # condition colour on the view direction
    prop_mlp: MLPConfig = field(
        default_factory=lambda: MLPConfig(net_depth=4, net_width=256, disable_rgb=True)
    )  # proposal MLP, shared by all proposal levels
    nerf_mlp: MLPConfig = field(default_factory=MLPConfig)  # final NeRF MLP


@dataclass
class DataConfig:
    dataset_type: str = "colmap"  # 'colmap' (sparse/0), 'llff' (poses_bounds.npy) or 'blender'
    factor: int = 0  # image downsampling factor (0 or 1 = full resolution)
    near: float = 2.0  # ray near bound (t units)
    far: float = 6.0  # ray far bound (t units)
    forward_facing: bool = False  # LLFF: recenter poses, NDC rays
    llffhold: int = 8  # every llffhold-th sorted image is a test image
    white_background: bool = True  # blender: composite RGBA on white (else black)
    render_path_frames: int = 120  # frames of the video path
    z_variation: float = 0.0  # ellipse path height variation (360)
    z_phase: float = 0.0  # ellipse path height phase (360)


@dataclass
class TrainConfig:
    max_steps: int = 250000  # optimizer steps
    batch_size: int = 16384  # rays per step
    batching: str = "all_images"  # 'all_images' or 'single_image' (one image per batch)
    data_loss_type: str = "charb"  # 'charb' or 'mse'
    charb_padding: float = 0.001  # Charbonnier epsilon
    data_loss_mult: float = 1.0  # weight of the final level's data loss
    data_coarse_loss_mult: float = 0.0  # weight of the proposal levels' data loss
    interlevel_loss_mult: float = 1.0  # proposal (outer) loss weight
    distortion_loss_mult: float = 0.01  # distortion loss weight
    lr_init: float = 2e-3  # initial learning rate
    lr_final: float = 2e-5  # final learning rate
    lr_delay_steps: int = 512  # warm-up steps
    lr_delay_mult: float = 0.01  # learning-rate multiplier at step 0 of the warm-up
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.999  # Adam beta2
    adam_eps: float = 1e-6  # Adam epsilon (outside the sqrt)
    grad_max_norm: float = 1e-3  # per-MLP global gradient-norm clip (0 = off)
    grad_max_val: float = 0.0  # element-wise gradient clip (0 = off)
    seed: int = 20200823  # seed of parameters, ray sampling and jitter
    checkpoint_every: int = 5000  # steps between checkpoints
    log_every: int = 100  # steps between metric-log rows
    time_limit_s: float = 0.0  # stop training after this wall time (0 = no limit)
    compile: str = "auto"  # torch.compile: 'auto' (where faster), 'on' or 'off'
    precision: str = "fp32"  # 'fp32', 'tf32' (CUDA TF32 matmuls) or 'bf16' (autocast)


@dataclass
class EvalConfig:
    chunk_size: int = 16384  # rays per rendering chunk
    quantize_metrics: bool = True  # round renders to 8 bit before metrics
    crop_borders: int = 0  # pixels cropped from every side before metrics
    lpips: bool = True  # compute LPIPS (needs the backbone weights)
    lpips_nets: list[str] = field(default_factory=lambda: list(LPIPS_NETS))  # LPIPS backbones
    max_test_images: int = 0  # evaluate at most this many test images (0 = all)
    color_correct: bool = False  # also cc_psnr / cc_ssim (multinerf eval.py's metric_cc_*)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)  # scene loading
    model: ModelConfig = field(default_factory=ModelConfig)  # network and sampling
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation
    eval: EvalConfig = field(default_factory=EvalConfig)  # rendering and metrics


# ----------------------------------------------------------------------------- validation

# The allowed values of every choice field (None = the YAML null). tests/test_configs.py
# checks each list against the code that implements the choices.
CHOICES: dict[str, tuple] = {
    "data.dataset_type": ("colmap", "llff", "blender"),
    "model.raydist_fn": (None, "reciprocal", "log", "exp", "sqrt", "square", "piecewise"),
    "model.ray_shape": ("cone", "cylinder"),
    "model.*.warp_fn": (None, "contract"),
    "model.*.basis_shape": ("icosahedron", "octahedron"),
    "train.batching": ("all_images", "single_image"),
    "train.data_loss_type": ("charb", "mse"),
    "train.compile": ("auto", "on", "off"),
    "train.precision": ("fp32", "tf32", "bf16"),
}

# (key, test, what it must be); `*` matches either MLP (prop_mlp, nerf_mlp).
_RANGES: tuple = (
    ("data.factor", lambda v: v >= 0, ">= 0"),
    ("data.near", lambda v: v >= 0, ">= 0"),
    ("data.llffhold", lambda v: v >= 1, ">= 1"),
    ("data.render_path_frames", lambda v: v >= 1, ">= 1"),
    ("model.num_levels", lambda v: v >= 1, ">= 1"),
    ("model.num_prop_samples", lambda v: v >= 1, ">= 1"),
    ("model.num_nerf_samples", lambda v: v >= 1, ">= 1"),
    ("model.*.net_depth", lambda v: v >= 1, ">= 1"),
    ("model.*.net_width", lambda v: v >= 1, ">= 1"),
    ("model.*.bottleneck_width", lambda v: v >= 1, ">= 1"),
    ("model.*.net_depth_viewdirs", lambda v: v >= 1, ">= 1"),
    ("model.*.net_width_viewdirs", lambda v: v >= 1, ">= 1"),
    ("model.*.min_deg_point", lambda v: v >= 0, ">= 0"),
    ("model.*.deg_view", lambda v: v >= 0, ">= 0"),
    ("model.*.skip_layer", lambda v: v >= 1, ">= 1"),
    ("model.*.skip_layer_dir", lambda v: v >= 1, ">= 1"),
    ("model.*.basis_subdivisions", lambda v: v >= 1, ">= 1"),
    ("train.max_steps", lambda v: v >= 1, ">= 1"),
    ("train.batch_size", lambda v: v >= 1, ">= 1"),
    ("train.checkpoint_every", lambda v: v >= 1, ">= 1"),
    ("train.log_every", lambda v: v >= 1, ">= 1"),
    ("train.time_limit_s", lambda v: v >= 0, ">= 0"),
    ("train.lr_init", lambda v: v > 0, "> 0"),
    ("train.lr_final", lambda v: v > 0, "> 0"),
    ("train.lr_delay_steps", lambda v: v >= 0, ">= 0"),
    ("train.lr_delay_mult", lambda v: v > 0, "> 0"),
    ("train.adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.adam_eps", lambda v: v >= 0, ">= 0"),
    ("train.charb_padding", lambda v: v >= 0, ">= 0"),
    ("train.grad_max_norm", lambda v: v >= 0, ">= 0"),
    ("train.grad_max_val", lambda v: v >= 0, ">= 0"),
    ("eval.chunk_size", lambda v: v >= 1, ">= 1"),
    ("eval.crop_borders", lambda v: v >= 0, ">= 0"),
    ("eval.max_test_images", lambda v: v >= 0, ">= 0"),
)


def _values(cfg: Config, pattern: str) -> list[tuple[str, Any]]:
    """[(key, value)] of the fields that ``pattern`` names (``*`` = either MLP)."""
    sections, name = pattern.split(".")[:-1], pattern.split(".")[-1]
    nodes: list[tuple[str, Any]] = [("", cfg)]
    for part in sections:
        if part == "*":
            nodes = [
                (f"{k}{m}.", getattr(n, m)) for k, n in nodes for m in ("prop_mlp", "nerf_mlp")
            ]
        else:
            nodes = [(f"{k}{part}.", getattr(n, part)) for k, n in nodes]
    return [(f"{k}{name}", getattr(n, name)) for k, n in nodes]


def validate(cfg: Config) -> Config:
    """Check every choice field against its allowed values and every range; ConfigError
    naming the key otherwise. Called wherever a config is built (get_config, from_dict)."""
    for pattern, allowed in CHOICES.items():
        for key, v in _values(cfg, pattern):
            if v not in allowed:
                shown = ", ".join("null" if a is None else repr(a) for a in allowed)
                raise ConfigError(f"{key}: {v!r} is not one of {shown}")
    for pattern, ok, what in _RANGES:
        for key, v in _values(cfg, pattern):
            if not ok(v):
                raise ConfigError(f"{key} must be {what}, got {v}")
    if not cfg.data.far > cfg.data.near:
        raise ConfigError(
            f"data.far must be > data.near, got far={cfg.data.far} <= near={cfg.data.near}"
        )
    for net in cfg.eval.lpips_nets:
        if net not in LPIPS_NETS:
            raise ConfigError(f"eval.lpips_nets: {net!r} is not one of {', '.join(LPIPS_NETS)}")
    return cfg


# ----------------------------------------------------------------------------- presets


def _preset_360() -> Config:
    c = Config()
    c.data = DataConfig(dataset_type="colmap", factor=4, near=0.2, far=1e6)
    m = c.model
    m.raydist_fn = "reciprocal"
    m.opaque_background = True
    m.prop_mlp = MLPConfig(net_depth=4, net_width=256, warp_fn="contract", disable_rgb=True)
    m.nerf_mlp = MLPConfig(net_depth=8, net_width=1024, warp_fn="contract")
    return c


def _preset_blender(width: int) -> Config:
    c = Config()
    c.data = DataConfig(dataset_type="blender", factor=0, near=2.0, far=6.0)
    basis = ("octahedron", 1) if width == 256 else ("icosahedron", 2)
    m = c.model
    m.num_levels, m.num_prop_samples, m.num_nerf_samples = 2, 128, 32
    m.raydist_fn, m.ray_shape, m.opaque_background = None, "cone", False
    kw = dict(max_deg_point=16, basis_shape=basis[0], basis_subdivisions=basis[1])
    m.prop_mlp = MLPConfig(net_depth=4, net_width=256, disable_rgb=True, **kw)
    m.nerf_mlp = MLPConfig(net_depth=8, net_width=width, **kw)
    t = c.train
    t.batching, t.data_loss_type = "single_image", "mse"
    t.distortion_loss_mult, t.adam_eps = 0.0, 1e-8
    return c


def _preset_llff(width: int) -> Config:
    c = _preset_blender(width)
    c.data = DataConfig(dataset_type="llff", factor=4, near=0.0, far=1.0, forward_facing=True)
    c.model.ray_shape = "cylinder"
    c.model.opaque_background = True
    t = c.train
    t.batching, t.data_loss_type = "all_images", "charb"
    t.distortion_loss_mult, t.adam_eps = 0.01, 1e-8
    return c


def _preset_cpu() -> Config:
    """A small 360-style model for CPUs and the built-in benchmark.

    Same structure as '360' (3 levels, contraction, reciprocal s-space, opaque background)
    with 16+16+16 samples, narrow MLPs and the 3-direction octahedron basis of the
    reference's *_256 configs: on CPUs the integrated positional encoding (element-wise
    sin/exp over samples x directions x degrees) dominates small models, and 3 directions
    instead of 21 make a step ~3x cheaper. Sizes and schedule are the ones validated on the
    procedural 360 scene (results/benchmarks/quality_cpu: 37.1 dB test PSNR after 4267
    steps, 403 s on one shared core, ~6900 rays/s per core).
    """
    c = _preset_360()
    c.data.factor = 1
    m = c.model
    m.num_prop_samples, m.num_nerf_samples = 16, 16
    basis = dict(basis_shape="octahedron", basis_subdivisions=1)
    m.prop_mlp = MLPConfig(
        net_depth=2, net_width=32, warp_fn="contract", disable_rgb=True, max_deg_point=6, **basis
    )
    m.nerf_mlp = MLPConfig(
        net_depth=3,
        net_width=96,
        bottleneck_width=48,
        net_width_viewdirs=48,
        warp_fn="contract",
        max_deg_point=10,
        **basis,
    )
    t = c.train
    t.max_steps, t.batch_size, t.checkpoint_every, t.log_every = 4000, 512, 1000, 50
    t.lr_init, t.lr_final, t.lr_delay_steps, t.lr_delay_mult = 1e-2, 5e-4, 50, 0.1
    c.eval.chunk_size = 8192
    return c


def _preset_tiny() -> Config:
    """The tiny model of the golden files (golden/README.md, model_forward_tiny)."""
    c = _preset_360()
    m = c.model
    m.num_prop_samples, m.num_nerf_samples = 16, 8
    m.prop_mlp = MLPConfig(net_depth=2, net_width=32, warp_fn="contract", disable_rgb=True)
    m.nerf_mlp = MLPConfig(
        net_depth=5, net_width=32, bottleneck_width=16, net_width_viewdirs=16, warp_fn="contract"
    )
    return c


PRESETS = {
    "360": _preset_360,
    "blender_256": lambda: _preset_blender(256),
    "blender_512": lambda: _preset_blender(512),
    "llff_256": lambda: _preset_llff(256),
    "llff_512": lambda: _preset_llff(512),
    "cpu": _preset_cpu,
    "tiny": _preset_tiny,
}


def preset(name: str) -> Config:
    """A fresh Config for a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------- updates


def _coerce(value: Any, current: Any, ftype: Any, key: str) -> Any:
    """Check/convert a parsed value against the field's current value and type."""
    tname = ftype if isinstance(ftype, str) else getattr(ftype, "__name__", str(ftype))
    if value is None:
        if "None" in tname:
            return None
        raise ConfigError(f"{key}: null is not allowed (type {tname})")
    if isinstance(current, bool) or tname == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tname == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tname == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tname.startswith("str") and isinstance(value, bool) and key.endswith("compile"):
        return "on" if value else "off"  # YAML 1.1 reads on/off as booleans
    if tname.startswith("str") and isinstance(value, str):
        return value
    if tname.startswith("list") and isinstance(value, list):
        return list(value)
    if tname == "str | None" and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {tname}, got {value!r}")


def update(cfg: Any, values: dict, prefix: str = "") -> Any:
    """Set nested fields of a dataclass from a nested dict, in place; unknown keys raise."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in fields:
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {sorted(fields)}")
        cur = getattr(cfg, k)
        if isinstance(v, dict) and not dataclasses.is_dataclass(cur):
            sub = next(iter(v), "")
            raise ConfigError(f"{key}.{sub}: {key} is a value, not a section")
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping, got {v!r}")
            update(cur, v, prefix=f"{key}.")
        else:
            setattr(cfg, k, _coerce(v, cur, fields[k].type, key))
    return cfg


def parse_overrides(overrides: list[str]) -> dict:
    """['train.max_steps=10', 'model.nerf_mlp.net_width=64'] -> nested dict (YAML values)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str):  # YAML 1.1 reads '1e30' (no dot) as a string
            try:
                value = float(value) if value.strip().lower() not in ("nan", "inf") else value
            except ValueError:
                pass
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML config file; its optional top-level 'preset' key names the base preset."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def get_config(
    preset_name: str | None = None,
    yaml_path: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """preset + YAML file + key=value overrides, applied in that order.

    The preset comes from ``preset_name``, else the YAML file's ``preset`` key, else '360'.
    """
    data = load_yaml(yaml_path) if yaml_path else {}
    name = preset_name or data.pop("preset", None) or "360"
    data.pop("preset", None)
    cfg = preset(str(name))
    where = str(yaml_path) if yaml_path else ""
    try:
        update(cfg, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    update(cfg, parse_overrides(list(overrides)))
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Inverse of to_dict (fields not present keep their defaults)."""
    return validate(update(Config(), data))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    from mipnerf360 import io

    io.write_yaml(path, to_dict(cfg))


def load_config(path: str | os.PathLike) -> Config:
    """Read a config written by save_config."""
    return from_dict(load_yaml(path))
