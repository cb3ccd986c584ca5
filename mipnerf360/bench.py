"""``mipnerf360 bench``: training-step throughput of any config (the whole step: ray
sampling, forward, losses, backward, clipping and the Adam update).

    mipnerf360 bench [--preset P] [--config FILE] [key=value ...] [--batch-size N]
                     [--steps 5] [--warmup 2] [--device cpu|cuda] [--compile auto|on|off]
                     [--precision fp32|tf32|bf16] [--threads N] [--flops] [--profile]

The config is built like ``mipnerf360 train``'s (preset, YAML file, overrides). Rays come
from a ring of cameras around the origin with random images (``synthetic_scene``) through
``sampling.RaySampler``, as in training. ``warmup`` untimed steps (compilation included),
then ``steps`` timed steps; one output line ending in ``... N rays/s`` with the step time
and the peak memory (CUDA: max allocated; CPU: the process's peak resident set).
``--flops`` adds the matmul FLOPs per ray of one step (torch.utils.flop_counter);
``--profile`` prints torch.profiler's top-10 kernels of the timed steps before that line.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import time
import types
from pathlib import Path

# OpenMP threads that spin while waiting burn the cores that other processes (and our own
# other thread) need: on a shared 2-core machine the cpu preset runs 4x faster with passive
# waiting. It must be set before torch loads the OpenMP runtime (an explicit setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mipnerf360 import configs, sampling, train_utils  # noqa: E402
from mipnerf360 import model as model_lib  # noqa: E402
from mipnerf360.errors import ConfigError  # noqa: E402


def synthetic_scene(cfg: configs.Config, width: int = 64, height: int = 48, n: int = 8, seed=0):
    """A scene for ``sampling.RaySampler``: ``n`` pinhole cameras on a ring looking at the
    origin (radius 1 for unbounded presets, between near and far otherwise), random images,
    the config's near/far. Only what the sampler reads is set."""
    rng = np.random.default_rng(seed)
    near, far = cfg.data.near, cfg.data.far
    radius = 1.0 if far > 100 else max(0.5 * (near + far), 0.5)
    poses = []
    for a in np.linspace(0, 2 * np.pi, n, endpoint=False):
        back = np.array([np.cos(a), np.sin(a), 0.3]) / np.sqrt(1.09)  # OpenGL: looks along -z
        pos = radius * back
        right = np.cross([0.0, 0.0, 1.0], back)
        right /= np.linalg.norm(right)
        up = np.cross(back, right)
        poses.append(np.stack([right, up, back, pos], 1))
    focal = 1.2 * width
    pixtocam = np.linalg.inv(
        np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], np.float64)
    ).astype(np.float32)
    return types.SimpleNamespace(
        path="<bench ring>",
        images=rng.random((n, height, width, 3), dtype=np.float32),
        camtoworlds=np.stack(poses),
        pixtocams=np.broadcast_to(pixtocam, (n, 3, 3)).copy(),
        distortion=None,
        pixtocam_ndc=None,
        camtype="perspective",
        width=width,
        height=height,
        near=float(near),
        far=float(far),
        i_train=np.arange(n),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max memory allocated by torch; CPU: the process's peak resident set (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def build_config(
    preset: str | None = None,
    config: str | None = None,
    overrides=(),
    batch_size: int | None = None,
    precision: str | None = None,
    compile: str | None = None,
) -> configs.Config:
    """The benchmarked config: preset + YAML + overrides, then the command's options."""
    cfg = configs.get_config(preset, config, list(overrides))
    if batch_size is not None:
        cfg.train.batch_size = int(batch_size)
    if precision is not None:
        cfg.train.precision = precision
    if compile is not None:
        cfg.train.compile = compile
    configs.validate(cfg)  # the options are choice and range fields of the config too
    return cfg


def count_flops_per_ray(cfg: configs.Config, sampler, device: torch.device) -> float:
    """Matmul FLOPs of one eager step (forward + backward) per ray, on a fresh model
    (FlopCounterMode counts matrix products; the element-wise work is not in it)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model_lib.build_model(cfg).to(device)
    optimizer = train_utils.create_optimizer(model, cfg)
    step_fn = train_utils.make_train_step(model, optimizer, cfg, sampler=sampler, compile=False)
    with FlopCounterMode(display=False) as counter:
        step_fn(1)
    return counter.get_total_flops() / cfg.train.batch_size


def run_bench(
    cfg: configs.Config,
    steps: int = 5,
    warmup: int = 2,
    device: str = "cpu",
    seed: int = 0,
    flops: bool = False,
    profile: bool = False,
) -> dict:
    """Time ``steps`` training steps of ``cfg`` after ``warmup`` ones. Returns the
    measurements (and 'profile', a table, with ``profile``)."""
    if steps < 1:
        raise ConfigError(f"bench --steps must be >= 1, got {steps}")
    if warmup < 0:
        raise ConfigError(f"bench --warmup must be >= 0, got {warmup}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available")
    torch.manual_seed(seed)
    model = model_lib.build_model(cfg).to(dev)
    optimizer = train_utils.create_optimizer(model, cfg)
    sampler = sampling.RaySampler(
        synthetic_scene(cfg, seed=seed), cfg.train.batch_size, dev, seed, cfg.train.batching
    )
    out = {"flops_per_ray": count_flops_per_ray(cfg, sampler, dev) if flops else None}
    step_fn = train_utils.make_train_step(model, optimizer, cfg, sampler=sampler)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_start = time.perf_counter()
    for s in range(1, warmup + 1):
        step_fn(s)
    _sync(dev)
    t_warm = time.perf_counter()
    cpu_warm = time.process_time()
    prof = None
    if profile:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=acts)
        prof.__enter__()
    for s in range(warmup + 1, warmup + steps + 1):
        stats = step_fn(s)
    _sync(dev)
    t_end = time.perf_counter()
    if prof is not None:
        prof.__exit__(None, None, None)
        sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        out["profile"] = prof.key_averages().table(sort_by=sort, row_limit=10)
    sec_per_step = (t_end - t_warm) / steps
    out.update(
        {
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "batch_size": cfg.train.batch_size,
            "steps": steps,
            "warmup": warmup,
            "compile": step_fn.compiled,
            "precision": step_fn.precision,
            "params": model_lib.num_params(model),
            "warmup_s": t_warm - t_start,
            "sec_per_step": sec_per_step,
            "cpu_s_per_step": (time.process_time() - cpu_warm) / steps,
            "rays_per_s": cfg.train.batch_size / sec_per_step,
            "peak_memory_mb": peak_memory_mb(dev),
            "loss": float(stats["loss"]),  # read once, after timing
            "finite": bool(stats["finite"]),
        }
    )
    return out


def format_result(r: dict, name: str = "") -> str:
    dev = r["device"] + (f" ({r['threads']} threads)" if r["device"] == "cpu" else "")
    if r["device"].startswith("cuda"):
        dev += f" ({torch.cuda.get_device_name(torch.device(r['device']))})"
    flops = ""
    if r.get("flops_per_ray") is not None:
        flops = f"{r['flops_per_ray'] / 1e6:.2f} MFLOP/ray (matmul), "
    return (
        f"bench {name} params={r['params']:,} device={dev} "
        f"batch={r['batch_size']} steps={r['steps']} warmup={r['warmup']} "
        f"compile={'on' if r['compile'] else 'off'} precision={r['precision']} "
        f"torch={torch.__version__} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}: "
        f"warmup {r['warmup_s']:.1f} s, {r['cpu_s_per_step']:.2f} process-CPU s/step, "
        f"peak memory {r['peak_memory_mb']:.0f} MB, {flops}"
        f"{r['sec_per_step'] * 1000:.1f} ms/step, {r['rays_per_s']:.1f} rays/s"
    )


# format_result's line, parsed back (benchmarks/gpu_table.py and cpu_table.py read it).
RESULT_LINE = re.compile(
    r"device=(?P<device>.+?) batch=(?P<batch>\d+) .*compile=(?P<compile>on|off) "
    r"precision=(?P<precision>\w+) .*warmup (?P<warmup_s>[0-9.]+) s, (?P<cpu_s>[0-9.]+) "
    r"process-CPU s/step, peak memory (?P<mem>[0-9.]+) MB, "
    r"(?:(?P<mflop>[0-9.]+) MFLOP/ray \(matmul\), )?(?P<ms>[0-9.]+) ms/step, "
    r"(?P<rays>[0-9.]+) rays/s$"
)


def read_result(path) -> dict | str:
    """The fields of the last line of a file of ``mipnerf360 bench`` output (strings, as
    RESULT_LINE's groups), or why there is none: 'not run', 'failed: <error line>', 'failed
    or timed out'."""
    path = Path(path)
    if not path.exists():
        return "not run"
    text = path.read_text().strip()
    last = text.splitlines()[-1] if text else ""
    m = RESULT_LINE.search(last)
    if m:
        return m.groupdict()
    for line in reversed(text.splitlines()):
        if "error" in line.lower():
            return "failed: " + line.strip()[:100]
    return "failed or timed out"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mipnerf360 bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--preset", default=None, help=f"config preset: {sorted(configs.PRESETS)} (default cpu)"
    )
    p.add_argument("--config", default=None, help="YAML config file (applied after the preset)")
    p.add_argument("--batch-size", type=int, default=None, help="rays per step (train.batch_size)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", default=None, choices=["auto", "on", "off"])
    p.add_argument("--precision", default=None, choices=list(train_utils.PRECISIONS))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flops", action="store_true", help="count matmul FLOPs per ray")
    p.add_argument("--profile", action="store_true", help="print the top-10 kernels")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.threads < 0:
        raise ConfigError(f"bench --threads must be >= 0, got {args.threads}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    preset = args.preset or (None if args.config else "cpu")
    cfg = build_config(
        preset, args.config, args.overrides, args.batch_size, args.precision, args.compile
    )
    r = run_bench(
        cfg,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        seed=args.seed,
        flops=args.flops,
        profile=args.profile,
    )
    if "profile" in r:
        print(r["profile"], file=sys.stderr)
    name = f"preset={preset or 'of-config'}"
    if args.config:
        name += f" config={args.config}"
    if args.overrides:
        name += " " + " ".join(args.overrides)
    print(format_result(r, name), flush=True)
    return 0
