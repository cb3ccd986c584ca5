"""``mipnerf360 train SCENE_DIR OUT_DIR``: the training loop, checkpoints and logs.

Counterpart of multinerf's ``train.py``: random rays from all training images, one
optimizer step per iteration with all losses (``train_utils.train_step``), annealing from
``step / max_steps``, the learning-rate schedule and per-MLP gradient clipping (reference
spec, section 10).

Outputs in OUT_DIR (each written atomically: temporary name, then ``os.replace``)::

    config.yaml               resolved config
    checkpoints/ckpt_<step>.pt  model + optimizer + step + RNG states (last 2 kept)
    metrics.csv               one row every train.log_every steps
    curves.png                PSNR and loss against step
    summary.json              wall time, steps/s, rays/s, peak memory, ...
    model.pt                  final weights + config; written last ("training finished")
    tb/                       TensorBoard events (when tensorboard is installed)

Exit codes of ``main``: 0 finished, 2 bad config, 3 NaN/inf loss, 130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import resource
import signal
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch

from mipnerf360 import configs
from mipnerf360.io import torch_save as atomic_torch_save
from mipnerf360.io import write_bytes as atomic_write_bytes
from mipnerf360.io import write_csv, write_json
from mipnerf360.runs import list_checkpoints, load_trained, resolve_device  # noqa: F401

CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
KEEP_CHECKPOINTS = 2
EXIT_NAN = 3
SIGNAL_EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130}


# ----------------------------------------------------------------------------- helpers


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024.0


def check_manifest(scene: Any, manifest_path: str) -> None:
    """Check the loaded scene's train/test split against a prepare-step manifest JSON."""
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest not found: {manifest_path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_path}: not valid JSON: {e}") from None
    split = manifest.get("split") if isinstance(manifest, dict) else None
    if not isinstance(split, dict) or "train" not in split or "test" not in split:
        raise ValueError(f"{manifest_path}: expected a 'split' with 'train' and 'test' lists")
    names = list(scene.names)
    for part, idx in (("train", scene.i_train), ("test", scene.i_test)):
        got = [names[int(i)] for i in idx]
        want = [str(n) for n in split[part]]
        if got != want:
            missing = sorted(set(want) - set(got))[:5]
            extra = sorted(set(got) - set(want))[:5]
            raise ValueError(
                f"{manifest_path}: the {part} split of the loaded scene ({len(got)} images) "
                f"does not match the manifest ({len(want)} images); in the manifest only: "
                f"{missing}, loaded only: {extra}"
            )


def plot_curves(rows: list[dict], path: str | os.PathLike) -> None:
    """PSNR and loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(steps, [r["psnr"] for r in rows])
    axes[0].set(xlabel="step", ylabel="train PSNR (dB)", title="PSNR")
    axes[1].plot(steps, [r["loss"] for r in rows])
    axes[1].set(xlabel="step", ylabel="loss", title="loss", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _tensorboard_writer(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(log_dir=log_dir)


class _SignalFlag:
    """Records SIGTERM/SIGINT so the loop can finish the step and checkpoint."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handler(self, signum, frame):
        self.signum = signum

    def __enter__(self):
        for s in SIGNAL_EXIT:
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- training


class TrainingStopped(Exception):
    """Training stopped early; ``exit_code`` tells the scheduler why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _build(cfg: configs.Config, device: torch.device):
    from mipnerf360 import model as model_lib
    from mipnerf360 import train_utils

    torch.manual_seed(cfg.train.seed)
    model = model_lib.build_model(cfg).to(device)
    optimizer = train_utils.create_optimizer(model, cfg)
    return model, optimizer


def _step_fn(model, optimizer, cfg: configs.Config):
    """The per-step function; train_utils compiles the MLPs per train.compile ('auto': CUDA)."""
    from mipnerf360 import train_utils

    return train_utils.make_train_step(model, optimizer, cfg)


def train(
    scene_dir: str,
    out_dir: str,
    cfg: configs.Config,
    *,
    resume: bool = False,
    device: str | torch.device = "auto",
    manifest: str | None = None,
    preset: str | None = None,
    progress: bool = True,
) -> dict:
    """Train on ``scene_dir`` into ``out_dir``; returns the summary dict.

    Raises TrainingStopped (with exit code) on a signal or a NaN/inf loss.
    """
    from mipnerf360 import datasets

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if dev.type == "cuda" and cfg.train.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(out_dir, exist_ok=True)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    final_path = os.path.join(out_dir, "model.pt")
    t = cfg.train

    scene = datasets.load_scene(scene_dir, cfg.data)
    if manifest:
        check_manifest(scene, manifest)
    configs.save_config(cfg, os.path.join(out_dir, "config.yaml"))

    model, optimizer = _build(cfg, dev)
    sampler = datasets.RaySampler(scene, t.batch_size, dev, t.seed, t.batching)
    generator = torch.Generator(device=dev)
    generator.manual_seed(t.seed + 1)
    num_params = sum(p.numel() for p in model.parameters())

    step, prior_wall, rows = 0, 0.0, []
    ckpts = list_checkpoints(ckpt_dir)
    if not resume:  # a fresh run: stale checkpoints / model.pt would be mistaken for its own
        stale = [p for _, p in ckpts] + [final_path] * os.path.exists(final_path)
        if stale:
            print(f"fresh run: removing {len(stale)} old file(s) in {out_dir}", file=sys.stderr)
        for p in stale:
            os.unlink(p)
        ckpts = []
    if ckpts:
        try:
            ckpt = torch.load(ckpts[-1][1], map_location="cpu", weights_only=False)
        except Exception as e:
            raise ValueError(f"{ckpts[-1][1]}: cannot read the checkpoint: {e}") from None
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        sampler.set_state(ckpt["sampler"])
        generator.set_state(ckpt["generator"].cpu())
        step, prior_wall, rows = ckpt["step"], ckpt.get("wall_time_s", 0.0), ckpt.get("rows", [])
        if ckpt.get("config") != configs.to_dict(cfg):
            print(f"warning: resuming {ckpts[-1][1]} with a different config", file=sys.stderr)
        print(f"resumed from {ckpts[-1][1]} at step {step}", file=sys.stderr)

    def save_checkpoint():
        state = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sampler": sampler.get_state(),
            "generator": generator.get_state(),
            "config": configs.to_dict(cfg),
            "wall_time_s": prior_wall + (time.perf_counter() - t0),
            "rows": rows,
        }
        atomic_torch_save(state, os.path.join(ckpt_dir, f"ckpt_{step}.pt"))
        for _, old in list_checkpoints(ckpt_dir)[:-KEEP_CHECKPOINTS]:
            os.unlink(old)

    step_fn = _step_fn(model, optimizer, cfg)
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda" and t.precision == "bf16"
        else nullcontext()
    )
    tb = _tensorboard_writer(os.path.join(out_dir, "tb"))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=t.max_steps, initial=step, desc="train", dynamic_ncols=True)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    start_step = step
    last_stats: dict = {}
    interval_t, interval_steps = time.perf_counter(), 0
    stop_reason = "max_steps"
    with _SignalFlag() as flag:
        while step < t.max_steps:
            batch = sampler.sample()
            try:
                with amp:
                    stats = step_fn(batch, step + 1, generator)
            except FloatingPointError as e:
                raise TrainingStopped(
                    f"non-finite loss at step {step + 1}: {e}; last good checkpoint kept in "
                    f"{ckpt_dir}",
                    EXIT_NAN,
                ) from None
            step += 1
            interval_steps += 1
            stats = {k: float(v) for k, v in stats.items()}
            if not all(math.isfinite(stats.get(k, 0.0)) for k in ("loss", "data")):
                raise TrainingStopped(f"non-finite loss at step {step}", EXIT_NAN)
            last_stats = stats
            out_of_time = (
                t.time_limit_s > 0 and prior_wall + time.perf_counter() - t0 >= t.time_limit_s
            )
            stopping = out_of_time or flag.signum is not None or step == t.max_steps
            if step % t.log_every == 0 or stopping:
                now = time.perf_counter()
                sps = interval_steps / max(now - interval_t, 1e-9)
                interval_t, interval_steps = now, 0
                row = {"step": step, **stats, "steps_per_s": sps, "rays_per_s": sps * t.batch_size}
                row["wall_time_s"] = prior_wall + now - t0
                rows.append(row)
                write_csv(os.path.join(out_dir, "metrics.csv"), rows)
                if tb is not None:
                    for k, v in row.items():
                        if k != "step":
                            tb.add_scalar(f"train/{k}", v, step)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{stats['loss']:.4f}",
                        psnr=f"{stats.get('psnr', float('nan')):.2f}",
                        rays_s=f"{sps * t.batch_size:.0f}",
                    )
            if bar is not None:
                bar.update(1)
            if step % t.checkpoint_every == 0 and step < t.max_steps:
                save_checkpoint()
            if flag.signum is not None:
                save_checkpoint()
                if bar is not None:
                    bar.close()
                name = signal.Signals(flag.signum).name
                raise TrainingStopped(
                    f"{name} received: checkpoint written at step {step}",
                    SIGNAL_EXIT[flag.signum],
                )
            if out_of_time:
                stop_reason = "time_limit"
                break
    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()

    save_checkpoint()
    wall = prior_wall + time.perf_counter() - t0
    run_wall = time.perf_counter() - t0
    steps_run = step - start_step
    summary = {
        "wall_time_s": wall,
        "steps": step,
        "steps_per_s": steps_run / max(run_wall, 1e-9),
        "rays_per_s": steps_run * t.batch_size / max(run_wall, 1e-9),
        "peak_memory_mb": peak_memory_mb(dev),
        "device": str(dev),
        "preset": preset,
        "batch_size": t.batch_size,
        "num_params": num_params,
        "final_train_psnr": last_stats.get("psnr"),
        "final_loss": last_stats.get("loss"),
        "stop_reason": stop_reason,
        "torch_version": torch.__version__,
    }
    if not rows:  # max_steps reached before this run (e.g. resumed at the last step)
        write_csv(os.path.join(out_dir, "metrics.csv"), rows)
    plot_curves(rows, os.path.join(out_dir, "curves.png"))
    write_json(os.path.join(out_dir, "summary.json"), summary)
    final = {
        "model": model.state_dict(),
        "config": configs.to_dict(cfg),
        "step": step,
        "train_frac": step / t.max_steps,
    }
    atomic_torch_save(final, final_path)
    return summary


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mipnerf360 train", description="Train mip-NeRF 360 on a scene."
    )
    p.add_argument("scene_dir", help="scene folder (images + poses)")
    p.add_argument("out_dir", help="output folder (checkpoints, logs, model.pt)")
    p.add_argument("--preset", default=None, help=f"config preset: {sorted(configs.PRESETS)}")
    p.add_argument("--config", default=None, help="YAML config file (applied after the preset)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--manifest", default=None, help="prepare-step JSON; its split must match")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's)"
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.resume and os.path.exists(os.path.join(args.out_dir, "model.pt")):
        print(f"{args.out_dir}/model.pt exists: training already finished", file=sys.stderr)
        return 0
    old_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(old_threads)


def check_train_config(cfg: configs.Config) -> None:
    """Values the loop divides by or counts with; raises configs.ConfigError."""
    t = cfg.train
    for key in ("max_steps", "batch_size", "checkpoint_every", "log_every"):
        if getattr(t, key) < 1:
            raise configs.ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.time_limit_s < 0:
        raise configs.ConfigError(f"train.time_limit_s must be >= 0, got {t.time_limit_s}")


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = configs.get_config(args.preset, args.config, args.overrides)
        check_train_config(cfg)
    except configs.ConfigError as e:
        print(f"mipnerf360 train: config error: {e}", file=sys.stderr)
        return 2
    try:
        summary = train(
            args.scene_dir,
            args.out_dir,
            cfg,
            resume=args.resume,
            device=args.device,
            manifest=args.manifest,
            preset=args.preset,
            progress=not args.no_progress,
        )
    except TrainingStopped as e:
        print(f"mipnerf360 train: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
