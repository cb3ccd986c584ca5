"""``mipnerf360 bench``: training-step throughput (forward + backward + Adam update).

    mipnerf360 bench --preset 360 --batch-size 256 [--steps 5] [--warmup 2]
                     [--device cpu|cuda] [--compile auto|on|off] [--threads N]

Builds the preset's model, draws synthetic rays (a camera ring looking at the origin, the
preset's near/far), runs ``warmup`` untimed steps and then ``steps`` timed steps, and prints
one line ending in ``... N rays/s``.
"""

from __future__ import annotations

import argparse
import os
import time

# OpenMP threads that spin while waiting burn the cores that other processes (and our own
# other thread) need: on a shared 2-core machine the cpu preset runs 4x faster with passive
# waiting. It must be set before torch loads the OpenMP runtime (an explicit setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mipnerf360 import configs, train_utils  # noqa: E402
from mipnerf360 import model as model_lib  # noqa: E402


def synthetic_batch(
    cfg: configs.Config, batch_size: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random rays from a ring of cameras around the origin, with random target colours."""
    g = torch.Generator().manual_seed(seed)
    near, far = cfg.data.near, cfg.data.far
    radius = 1.0 if far > 100 else max(0.5 * (near + far), 0.5)
    origins = torch.randn(batch_size, 3, generator=g)
    origins = radius * origins / origins.norm(dim=-1, keepdim=True)
    directions = -origins / radius + 0.3 * torch.randn(batch_size, 3, generator=g)
    viewdirs = directions / directions.norm(dim=-1, keepdim=True)
    batch = {
        "origins": origins,
        "directions": directions,
        "viewdirs": viewdirs,
        "radii": torch.full((batch_size, 1), 1.0 / (500 * 3**0.5)),
        "near": torch.full((batch_size, 1), float(near)),
        "far": torch.full((batch_size, 1), float(far)),
        "rgb": torch.rand(batch_size, 3, generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(
    preset: str,
    batch_size: int,
    steps: int = 5,
    warmup: int = 2,
    device: str = "cpu",
    compile: str = "off",
    seed: int = 0,
) -> dict:
    """Time ``steps`` training steps after ``warmup`` ones. Returns the measurements."""
    if batch_size <= 0 or steps <= 0 or warmup < 0:
        raise ValueError("batch size and steps must be positive, warmup non-negative")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    cfg = configs.get_config(preset)
    cfg.train.compile = compile
    torch.manual_seed(seed)
    model = model_lib.build_model(cfg).to(dev)
    optimizer = train_utils.create_optimizer(model, cfg)
    step_fn = train_utils.make_train_step(model, optimizer, cfg)
    batch = synthetic_batch(cfg, batch_size, dev, seed)
    gen = torch.Generator(device=dev).manual_seed(seed)
    t_start = time.perf_counter()
    for s in range(1, warmup + 1):
        step_fn(batch, s, gen)
    _sync(dev)
    t_warm = time.perf_counter()
    cpu_warm = time.process_time()
    for s in range(warmup + 1, warmup + steps + 1):
        stats = step_fn(batch, s, gen)
    _sync(dev)
    t_end = time.perf_counter()
    cpu_s_per_step = (time.process_time() - cpu_warm) / steps
    sec_per_step = (t_end - t_warm) / steps
    return {
        "preset": preset,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "compile": step_fn.compiled,
        "params": model_lib.num_params(model),
        "warmup_s": t_warm - t_start,
        "sec_per_step": sec_per_step,
        "cpu_s_per_step": cpu_s_per_step,
        "rays_per_s": batch_size / sec_per_step,
        "loss": stats["loss"],
    }


def format_result(r: dict) -> str:
    dev = r["device"] + (f" ({r['threads']} threads)" if r["device"] == "cpu" else "")
    if r["device"].startswith("cuda"):
        dev += f" ({torch.cuda.get_device_name(torch.device(r['device']))})"
    return (
        f"bench preset={r['preset']} params={r['params']:,} device={dev} "
        f"batch={r['batch_size']} steps={r['steps']} warmup={r['warmup']} "
        f"compile={'on' if r['compile'] else 'off'} torch={torch.__version__} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}: "
        f"{r['cpu_s_per_step']:.2f} process-CPU s/step, "
        f"{r['sec_per_step'] * 1000:.1f} ms/step, {r['rays_per_s']:.1f} rays/s"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mipnerf360 bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu", choices=sorted(configs.PRESETS))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    r = run_bench(
        args.preset,
        args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        compile=args.compile,
        seed=args.seed,
    )
    print(format_result(r), flush=True)
    return 0
