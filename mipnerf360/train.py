"""``mipnerf360 train SCENE_DIR OUT_DIR``: the training loop, checkpoints and logs.

Counterpart of multinerf's ``train.py``: random rays from all training images, one
optimizer step per iteration with all losses (``train_utils.train_step``), annealing from
``step / max_steps``, the learning-rate schedule and per-MLP gradient clipping.

What a run is, and when it may be continued, is decided here with ``runs``: a run's
identity is the fingerprint of its scene data and training-relevant config, stored in
every checkpoint and in ``model.pt``.

- Without ``--resume`` a fresh run starts at step 0. A run already in OUT_DIR is moved to
  ``OUT_DIR/previous/`` (nothing is deleted), and moved back if the new run fails before
  its first checkpoint.
- ``--resume`` continues the newest readable checkpoint of the same identity; a run that
  already reached ``max_steps`` re-emits every output and exits 0 (finishing is
  idempotent). A checkpoint of another identity is an error naming the keys that differ,
  unless ``--restart-on-change`` is given: then the old run is moved aside and a fresh run
  starts (what the workflow's train rule does).
- One process writes OUT_DIR at a time (``runs.run_lock``).

Outputs in OUT_DIR (each written atomically through ``io``)::

    config.yaml               resolved config
    checkpoints/ckpt_<step>.pt  model + optimizer + step + RNG states + identity (last 2)
    metrics.csv               one row every train.log_every steps
    curves.png                PSNR and loss against step
    summary.json              wall time, steps/s, rays/s, peak memory, identity, ...
    model.pt                  final weights + config + identity; written last
    tb/                       TensorBoard events (when tensorboard is installed)

Exit codes (``cli.main``): 0 finished, 1 bad input, 2 bad config, 3 NaN/inf loss,
130 SIGINT, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io as _bytes_io
import json
import os
import resource
import shutil
import signal
import sys
import time
from typing import Any

import torch

from mipnerf360 import configs, distributed, io, runs
from mipnerf360.errors import ConfigError, UserError

KEEP_CHECKPOINTS = 2
EXIT_NAN = 3
SIGNAL_EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130}


class TrainingStopped(UserError):
    """Training stopped early (signal, NaN); ``exit_code`` tells the scheduler why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- helpers


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024.0


def check_manifest(scene: Any, manifest_path: str, cfg: configs.Config) -> dict:
    """Check the loaded scene's split and data settings against a prepare-step manifest;
    returns the manifest."""
    manifest = io.read_json(manifest_path)
    split = manifest.get("split") if isinstance(manifest, dict) else None
    if not isinstance(split, dict) or "train" not in split or "test" not in split:
        raise UserError(f"{manifest_path}: expected a 'split' with 'train' and 'test' lists")
    data = manifest.get("data") or {}
    for key in ("dataset_type", "factor"):
        if key in data and data[key] != getattr(cfg.data, key):
            raise UserError(
                f"{manifest_path}: prepared with data.{key}={data[key]}, but training uses "
                f"data.{key}={getattr(cfg.data, key)}; prepare and train need the same settings"
            )
    names = list(scene.names)
    for part, idx in (("train", scene.i_train), ("test", scene.i_test)):
        got = [names[int(i)] for i in idx]
        want = [str(n) for n in split[part]]
        if got != want:
            missing = sorted(set(want) - set(got))[:5]
            extra = sorted(set(got) - set(want))[:5]
            raise UserError(
                f"{manifest_path}: the {part} split of the loaded scene ({len(got)} images) "
                f"does not match the manifest ({len(want)} images); in the manifest only: "
                f"{missing}, loaded only: {extra}"
            )
    return manifest


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
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    io.write_bytes(path, buf.getvalue())


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


# ----------------------------------------------------------------------------- run state


@dataclasses.dataclass
class Run:
    """Everything the loop mutates; what a checkpoint saves and restores."""

    out_dir: str
    cfg: configs.Config
    identity: dict
    device: torch.device
    model: torch.nn.Module
    optimizer: Any
    sampler: Any  # sampling.RaySampler: rays are a pure function of (seed, step)
    step: int = 0
    prior_wall: float = 0.0  # training wall time of earlier segments of this run
    rows: list = dataclasses.field(default_factory=list)
    preset: str | None = None
    t0: float | None = None  # when this process started training (None: not started)
    compiled: bool | None = None  # whether this process's step ran under torch.compile

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.out_dir, "checkpoints")

    def wall(self) -> float:
        """Training wall time of the run so far, over all its segments."""
        now = time.perf_counter()
        return self.prior_wall + (now - self.t0 if self.t0 is not None else 0.0)

    def state(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": configs.to_dict(self.cfg),
            "identity": self.identity,
            "wall_time_s": self.wall(),
            "rows": self.rows,
        }

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.prior_wall = ckpt["step"], ckpt.get("wall_time_s", 0.0)
        self.rows = ckpt.get("rows", [])

    def save_checkpoint(self) -> None:
        """ckpt_<step>.pt (and config.yaml beside it); keeps the newest KEEP_CHECKPOINTS."""
        io.torch_save(self.state(), os.path.join(self.ckpt_dir, f"ckpt_{self.step}.pt"))
        configs.save_config(self.cfg, os.path.join(self.out_dir, "config.yaml"))
        for _, old in runs.list_checkpoints(self.ckpt_dir)[:-KEEP_CHECKPOINTS]:
            os.unlink(old)


def _build_run(out_dir, cfg, scene, identity, dev, preset) -> Run:
    from mipnerf360 import model as model_lib
    from mipnerf360 import sampling, train_utils

    t = cfg.train
    torch.manual_seed(t.seed)
    model = model_lib.build_model(cfg).to(dev)
    optimizer = train_utils.create_optimizer(model, cfg)
    sampler = sampling.RaySampler(scene, t.batch_size, dev, t.seed, t.batching)
    return Run(out_dir, cfg, identity, dev, model, optimizer, sampler, preset=preset)


def _saved_run(out_dir: str) -> tuple[dict, str] | None:
    """(the state to continue from, its path): the newest readable checkpoint, else a
    finished model.pt (whose checkpoints were deleted), else None."""
    found = runs.load_newest_checkpoint(os.path.join(out_dir, "checkpoints"))
    if found is not None:
        return found
    final = os.path.join(out_dir, "model.pt")
    if os.path.exists(final):
        saved = runs._torch_load(final)
        if isinstance(saved, dict) and "model" in saved:
            return saved, final
    return None


def _start(run: Run, *, resume: bool, restart_on_change: bool) -> str | None:
    """Restore ``run`` from OUT_DIR or move the old run aside; the moved-aside path."""
    out_dir = run.out_dir
    saved = _saved_run(out_dir) if resume else None
    if saved is not None:
        state, path = saved
        diff = runs.identity_diff(state.get("identity"), run.identity)
        if not diff:
            if "optimizer" not in state:  # model.pt whose checkpoints were deleted
                raise UserError(
                    f"{path}: the checkpoints of this run are gone, so it cannot be continued "
                    "or its outputs re-written; use it as it is, or train again without --resume"
                )
            run.restore(state)
            print(f"resumed from {path} at step {run.step}", file=sys.stderr)
            return None
        if not restart_on_change:
            raise ConfigError(
                f"{path} belongs to another run ({'; '.join(diff)}); run without --resume to "
                f"start over (the old run is moved to {out_dir}/{runs.PREVIOUS_DIR}/), or "
                "restore the old settings"
            )
        print(f"{out_dir}: settings or data changed ({'; '.join(diff)})", file=sys.stderr)
    if not runs.has_run(out_dir):
        return None
    old_id = (saved[0].get("identity") or {}).get("id", "old") if saved else "old"
    moved = runs.move_aside(out_dir, old_id)
    if moved:
        print(f"fresh run: the previous run in {out_dir} was moved to {moved}", file=sys.stderr)
    return moved


def _restore_previous(out_dir: str, moved: str) -> None:
    """Undo ``move_aside`` after a fresh run failed before its first checkpoint."""
    if runs.list_checkpoints(os.path.join(out_dir, "checkpoints")):
        return  # the new run has state of its own: keep both
    for name in (*runs.RUN_FILES, *runs.RUN_DIRS):
        new = os.path.join(out_dir, name)
        if os.path.isdir(new) and not os.path.islink(new):
            shutil.rmtree(new, ignore_errors=True)
        elif os.path.exists(new):
            os.unlink(new)
        if os.path.exists(os.path.join(moved, name)):
            os.replace(os.path.join(moved, name), new)
    os.rmdir(moved)
    print(f"the previous run was moved back from {moved}", file=sys.stderr)


# ----------------------------------------------------------------------------- the loop


def _log_row(run: Run, stats: dict, steps_per_s: float, tb) -> None:
    t = run.cfg.train
    row = {"step": run.step, **stats, "steps_per_s": steps_per_s}
    row["rays_per_s"] = steps_per_s * t.batch_size  # the whole job's (global batch)
    row["wall_time_s"] = run.wall()
    run.rows.append(row)
    io.write_csv(os.path.join(run.out_dir, "metrics.csv"), run.rows)
    if tb is not None:
        for k, v in row.items():
            if k != "step":
                tb.add_scalar(f"train/{k}", v, run.step)


def _loop(run: Run, progress: bool, ctx: distributed.Context) -> str:
    """Train until max_steps, the time limit or a signal; returns the stop reason.

    The step runs on the device without reading anything back; the host reads the logged
    values and the first non-finite step (``train_utils.first_bad_step``) only on logging
    and checkpoint steps. With several ranks, they agree every step (a host-side all-reduce)
    on whether to stop, so all stop at the same step.
    """
    from mipnerf360 import train_utils

    t = run.cfg.train
    reduce = (lambda grads: distributed.reduce_grads(ctx, grads)) if ctx.active else None
    step_fn = train_utils.make_train_step(
        run.model, run.optimizer, run.cfg, sampler=run.sampler, grad_reduce=reduce
    )
    run.compiled = getattr(step_fn, "compiled", None)
    tb = _tensorboard_writer(os.path.join(run.out_dir, "tb")) if ctx.is_main else None
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=t.max_steps, initial=run.step, desc="train", dynamic_ncols=True)
    interval_t, interval_steps = time.perf_counter(), 0
    bad = None
    reason = "max_steps"
    try:
        with _SignalFlag() as flag:
            while run.step < t.max_steps:
                stats = step_fn(run.step + 1, ctx.rank, ctx.world_size)
                run.step += 1
                interval_steps += 1
                bad = train_utils.first_bad_step(bad, stats["finite"], run.step)
                out_of_time = int(t.time_limit_s > 0 and run.wall() >= t.time_limit_s)
                signum = flag.signum or 0
                if ctx.active:
                    signum, out_of_time = distributed.agree_max(ctx, [signum, out_of_time])
                last = run.step == t.max_steps
                log_now = run.step % t.log_every == 0 or out_of_time or signum or last
                ckpt_now = run.step % t.checkpoint_every == 0 and not last
                if log_now or ckpt_now:
                    first_bad = int(bad)  # the host reads the device here, and only here
                    if ctx.active:
                        first_bad = distributed.agree_max(ctx, [first_bad])[0]
                    if first_bad >= 0:
                        raise TrainingStopped(
                            f"non-finite loss at step {first_bad}; last good checkpoint kept "
                            f"in {run.ckpt_dir}",
                            EXIT_NAN,
                        )
                if log_now:
                    logged = distributed.mean_stats(ctx, stats)
                    logged = {k: float(v) for k, v in logged.items() if k != "finite"}
                    now = time.perf_counter()
                    if ctx.is_main:
                        _log_row(run, logged, interval_steps / max(now - interval_t, 1e-9), tb)
                    interval_t, interval_steps = now, 0
                    if bar is not None:
                        bar.set_postfix(loss=f"{logged['loss']:.4f}", psnr=f"{logged['psnr']:.2f}")
                if bar is not None:
                    bar.update(1)
                if ckpt_now and ctx.is_main:
                    run.save_checkpoint()
                if signum:
                    if ctx.is_main:
                        run.save_checkpoint()
                    name = signal.Signals(signum).name
                    raise TrainingStopped(
                        f"{name} received: checkpoint written at step {run.step}",
                        SIGNAL_EXIT[signal.Signals(signum)],
                    )
                if out_of_time:
                    reason = "time_limit"
                    break
    finally:
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()
    return reason


def _finish(run: Run, reason: str, num_params: int, world_size: int = 1) -> dict:
    """Final checkpoint, then every output; the same outputs when called again."""
    t = run.cfg.train
    run.prior_wall, run.t0 = run.wall(), None  # stop the clock: the summary and the final
    wall = run.wall()  # checkpoint record the same time, and a re-emit reports it again
    ckpts = runs.list_checkpoints(run.ckpt_dir)
    if not ckpts or ckpts[-1][0] != run.step:
        run.save_checkpoint()
    last = run.rows[-1] if run.rows else {}
    summary = {
        "wall_time_s": wall,
        "steps": run.step,
        # whole-run averages (all segments of a resumed run, the whole job's rays), so a
        # re-emitted summary of a finished run reports the same numbers
        "steps_per_s": run.step / max(wall, 1e-9),
        "rays_per_s": run.step * t.batch_size / max(wall, 1e-9),
        "peak_memory_mb": peak_memory_mb(run.device),
        "device": str(run.device),
        "world_size": world_size,
        "preset": run.preset,
        "batch_size": t.batch_size,
        "precision": t.precision,
        "compile": t.compile,
        "compiled": run.compiled,  # what 'compile' resolved to here (None: nothing trained)
        "num_params": num_params,
        "final_train_psnr": last.get("psnr"),
        "final_loss": last.get("loss"),
        "stop_reason": reason,
        "identity": run.identity["id"],
        "data_fingerprint": run.identity["data"],
        "torch_version": torch.__version__,
    }
    configs.save_config(run.cfg, os.path.join(run.out_dir, "config.yaml"))
    io.write_csv(os.path.join(run.out_dir, "metrics.csv"), run.rows)
    plot_curves(run.rows, os.path.join(run.out_dir, "curves.png"))
    io.write_json(os.path.join(run.out_dir, "summary.json"), summary)
    # Only what the weights depend on (no timings): an interrupted and resumed run writes
    # the same bytes as an uninterrupted one.
    final = {
        "model": run.model.state_dict(),
        "config": configs.to_dict(run.cfg),
        "identity": run.identity,
        "step": run.step,
        "train_frac": run.step / t.max_steps,
        "preset": run.preset,
    }
    io.torch_save(final, os.path.join(run.out_dir, "model.pt"))
    return summary


def train(
    scene_dir: str,
    out_dir: str,
    cfg: configs.Config,
    *,
    resume: bool = False,
    restart_on_change: bool = False,
    device: str | torch.device = "auto",
    manifest: str | None = None,
    preset: str | None = None,
    progress: bool = True,
) -> dict:
    """Train on ``scene_dir`` into ``out_dir``; returns the summary dict ({} on ranks > 0).

    Data-parallel when launched by torchrun or srun (``distributed``). Raises
    TrainingStopped (with exit code) on a signal or a NaN/inf loss, UserError on bad input
    or a folder in use.
    """
    ctx, dev = distributed.init(runs.resolve_device(device))
    try:
        return _train(
            ctx, dev, scene_dir, out_dir, cfg, resume, restart_on_change, manifest, preset, progress
        )
    except UserError as e:
        if ctx.is_main or isinstance(e, distributed.QuietExit) or "rank" in str(e):
            raise
        raise distributed.QuietExit(e.exit_code) from None  # rank 0 says it once
    finally:
        distributed.shutdown(ctx)


def _train(
    ctx, dev, scene_dir, out_dir, cfg, resume, restart_on_change, manifest, preset, progress
) -> dict:
    from mipnerf360 import datasets

    t = cfg.train
    distributed.check_batch(t.batch_size, ctx)
    scene = datasets.load_scene(scene_dir, cfg.data)
    # The scene's content fingerprint: the manifest's (prepare hashed what it loaded, the same
    # function) or computed here.
    fingerprint = None
    if manifest:
        fingerprint = check_manifest(scene, manifest, cfg).get("fingerprint")
    identity = runs.make_identity(cfg, fingerprint or datasets.scene_fingerprint(scene))
    with contextlib.ExitStack() as stack:
        run = _build_run(out_dir, cfg, scene, identity, dev, preset)
        moved, error = None, None
        if ctx.is_main:  # one process decides and writes: lock, clean-up, resume or move aside
            try:
                stack.enter_context(runs.run_lock(out_dir, "train"))
                for p in runs.clear_leftovers(out_dir):
                    print(f"removed {p} (left by a killed write)", file=sys.stderr)
                moved = _start(run, resume=resume, restart_on_change=restart_on_change)
            except UserError as e:
                error = e
        distributed.broadcast_error(ctx, error)
        shared = {"step": run.step, "prior_wall": run.prior_wall}
        shared = distributed.broadcast_state(ctx, run.model, run.optimizer, shared)
        run.step, run.prior_wall = shared["step"], shared["prior_wall"]
        num_params = sum(p.numel() for p in run.model.parameters())
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            if run.step >= t.max_steps:
                reason = "max_steps"  # finished earlier: re-emit the outputs
            elif t.time_limit_s > 0 and run.prior_wall >= t.time_limit_s:
                reason = "time_limit"
            else:
                run.t0 = time.perf_counter()
                reason = _loop(run, progress, ctx)
        except BaseException:
            if moved:
                _restore_previous(out_dir, moved)
            raise
        if not ctx.is_main:
            return {}
        return _finish(run, reason, num_params, ctx.world_size)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mipnerf360 train", description="Train mip-NeRF 360 on a scene."
    )
    p.add_argument("scene_dir", help="scene folder (images + poses)")
    p.add_argument("out_dir", help="output folder (checkpoints, logs, model.pt)")
    p.add_argument("--preset", default=None, help=f"config preset: {sorted(configs.PRESETS)}")
    p.add_argument("--config", default=None, help="YAML config file (applied after the preset)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT_DIR (same data and settings only); a finished run "
        "re-emits its outputs",
    )
    p.add_argument(
        "--restart-on-change",
        action="store_true",
        help="with --resume: if OUT_DIR holds a run of other data or settings, move it to "
        "OUT_DIR/previous/ and start from step 0 instead of failing",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="data-parallel processes on this node (one per GPU); the same as starting the "
        "command under `torchrun --standalone --nproc-per-node N`",
    )
    p.add_argument("--manifest", default=None, help="prepare-step JSON; its split must match")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's)"
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    cfg = configs.get_config(args.preset, args.config, args.overrides)
    if args.nproc_per_node > 1 and distributed.launch_env() is None:
        distributed.check_batch(cfg.train.batch_size, distributed.Context(0, args.nproc_per_node))
        rest, skip = [], False
        for a in argv if argv is not None else sys.argv[1:]:
            if not skip and not a.startswith("--nproc-per-node"):
                rest.append(a)
            skip = a == "--nproc-per-node"  # (its value comes next)
        return distributed.launch(args.nproc_per_node, rest)
    old_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = train(
            args.scene_dir,
            args.out_dir,
            cfg,
            resume=args.resume,
            restart_on_change=args.restart_on_change,
            device=args.device,
            manifest=args.manifest,
            preset=args.preset,
            progress=not args.no_progress,
        )
    finally:
        torch.set_num_threads(old_threads)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    from mipnerf360 import cli

    sys.exit(cli.main(["train", *sys.argv[1:]]))
