"""Data-parallel training on the devices of one node (torch.distributed).

Counterpart of multinerf's ``jax.pmap`` over local devices in ``train.py``: every process
(rank) takes its shard of each global batch (``sampling.RaySampler.sample(step, rank,
world_size)``: the global batch is the one a single process draws), gradients are averaged
across ranks before per-MLP clipping and Adam (``reduce_grads``), so N ranks make the same
update as one process on the same global batch, up to floating-point summation order.

``mipnerf360 train`` becomes data-parallel when it is started by a launcher that sets the
usual environment, with no change to its command line:

- ``torchrun --standalone --nproc-per-node N mipnerf360-train ...`` (RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or
- ``srun --ntasks-per-node N ...`` on SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the
  rendezvous address is the first node of the job, the port derived from the job id).

Backends: NCCL on CUDA (rank r uses ``cuda:LOCAL_RANK``), gloo on the CPU. A second gloo
group carries the per-step host flags (a stop request) so that agreeing on them never
waits for the GPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from mipnerf360.errors import ConfigError, UserError

# How long a collective may wait for a peer before failing (a dead peer usually fails
# much sooner: its sockets close).
TIMEOUT = datetime.timedelta(minutes=10)


@dataclasses.dataclass
class Context:
    """Where this process stands in the job: rank r of world_size (1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    flags: object = None  # the gloo process group for host flags (None: single process)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launch_env(env: dict | None = None) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's or SLURM's environment, or None."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        if "SLURM_STEP_ID" not in env:  # sbatch's own shell, not an srun task
            return None
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
    return None


def _slurm_rendezvous(env) -> None:
    """MASTER_ADDR/PORT for srun tasks: the job's first node and a port from the job id."""
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        first = nodes.split(",")[0]
        if "[" in first:  # node[01-04] -> node01
            stem, rest = first.split("[", 1)
            first = stem + rest.split("-")[0].split(",")[0].rstrip("]")
        env["MASTER_ADDR"] = first
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def init(device: torch.device) -> tuple[Context, torch.device]:
    """Join the job's process group (if launched as one); the context and this rank's device.

    ``device`` is the resolved ``--device``: with CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    world = launch_env()
    if world is None or world[1] == 1:
        return Context(), device
    rank, world_size, local_rank = world
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise UserError(
                f"rank {rank}: local rank {local_rank} but only {n} CUDA device(s) on this node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if "SLURM_PROCID" in os.environ and "MASTER_ADDR" not in os.environ:
        _slurm_rendezvous(os.environ)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=TIMEOUT)
    flags = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else None
    return Context(rank, world_size, local_rank, flags or dist.group.WORLD), device


def shutdown(ctx: Context) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(batch_size: int, ctx: Context) -> None:
    if batch_size % ctx.world_size:
        raise ConfigError(
            f"train.batch_size {batch_size} must be divisible by the number of processes "
            f"({ctx.world_size})"
        )


def _collective(ctx: Context, what: str, fn, *args, **kwargs):
    """Run a collective; a failed peer becomes one line naming this rank."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"rank {ctx.rank}: {what} failed: another process of this job stopped ({first})"
        ) from None


def reduce_grads(ctx: Context, grads: list[torch.Tensor]) -> None:
    """Average gradients across ranks in place (one flat all-reduce)."""
    if not ctx.active or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    _collective(ctx, "gradient all-reduce", dist.all_reduce, flat)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def agree_max(ctx: Context, values: list[int]) -> list[int]:
    """Elementwise maximum of small host integers over all ranks (stop flags, signals)."""
    if not ctx.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    _collective(
        ctx, "agreeing on a stop", dist.all_reduce, t, op=dist.ReduceOp.MAX, group=ctx.flags
    )
    return [int(v) for v in t.tolist()]


def mean_stats(ctx: Context, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average the logged 0-d statistics over ranks (each rank saw its own shard), so they
    describe the global batch: losses and MSEs are means over equal shards; PSNRs are then
    recomputed from the averaged MSEs (the mean of PSNRs would not be the batch's PSNR)."""
    if not ctx.active:
        return stats
    from mipnerf360.metrics import mse_to_psnr

    keys = [k for k, v in stats.items() if v.is_floating_point()]
    t = torch.stack([stats[k].float() for k in keys])
    _collective(ctx, "averaging the log values", dist.all_reduce, t)
    t /= ctx.world_size
    out = {**stats, **dict(zip(keys, t, strict=True))}
    levels = sorted(int(k[4:]) for k in out if k.startswith("mse_"))
    for i in levels:
        out[f"psnr_{i}"] = mse_to_psnr(out[f"mse_{i}"])
    if levels:
        out["psnr"] = out[f"psnr_{levels[-1]}"]
    return out


def broadcast_state(ctx: Context, model: torch.nn.Module, optimizer, scalars: dict) -> dict:
    """Make every rank's parameters, optimizer state and run scalars (step, wall time)
    rank 0's; returns the scalars."""
    if not ctx.active:
        return scalars
    obj = [scalars, optimizer.state_dict() if ctx.is_main else None]
    _collective(ctx, "sharing the starting state", dist.broadcast_object_list, obj, src=0)
    scalars, opt_state = obj
    if not ctx.is_main:
        optimizer.load_state_dict(opt_state)
    for t in [*model.parameters(), *model.buffers()]:
        _collective(ctx, "sharing the parameters", dist.broadcast, t.data, src=0)
    return scalars


def broadcast_error(ctx: Context, error: BaseException | None) -> None:
    """Rank 0's set-up outcome to every rank: the others raise the same error quietly."""
    if not ctx.active:
        if error is not None:
            raise error
        return
    payload = [None if error is None else (type(error).__name__, str(error), _exit(error))]
    _collective(ctx, "sharing the set-up result", dist.broadcast_object_list, payload, src=0)
    if error is not None:
        raise error
    if payload[0] is not None:
        raise QuietExit(payload[0][2])


def _exit(error: BaseException) -> int:
    return int(getattr(error, "exit_code", 1))


class QuietExit(UserError):
    """A non-zero rank stops because rank 0 reported the error (printed once, by rank 0)."""

    def __init__(self, exit_code: int):
        super().__init__("")
        self.exit_code = exit_code


def launch(nproc: int, argv: list[str]) -> int:
    """``mipnerf360 train --nproc-per-node N ...``: torchrun's launcher (``torch.distributed.run``,
    standalone rendezvous on this node) started from inside the command, so that the job
    exits like a single process: 143/130 after SIGTERM/SIGINT (every rank checkpoints at
    the same step; torchrun itself would exit 1 with a traceback), and one line naming the
    rank when a rank fails (the others are stopped at once by the launcher).
    """
    import logging
    import signal

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # The launcher's INFO/WARNING lines (rendezvous, "Sending process ... SIGTERM") are noise
    # next to the ranks' own output; its errors are reported below in one line.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    args = torchrun.parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "-m", "mipnerf360", "train", *argv]
    )
    try:
        torchrun.run(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited {code}"
        if code in (2, 3, 130, 143):  # a config error, NaN or signal the rank already reported
            return code
        raise UserError(
            f"rank {rank} of {nproc} (pid {failure.pid}) {how}; the other ranks were stopped "
            "(checkpoints on disk are complete; --resume continues)"
        ) from None
    return 0
