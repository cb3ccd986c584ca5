"""Losses, learning-rate schedule, optimiser, precision and the training step.

Counterpart of multinerf ``internal/train_utils.py`` (``compute_data_loss``,
``interlevel_loss``, ``distortion_loss``, ``clip_gradients``, ``create_train_step``) and
``math.learning_rate_decay``. A batch is the rays dict of ``model.Model.forward`` plus
``rgb`` [B,3] (ground truth) and, from ``sampling.RaySampler``, the rays' random ``key``.

    optimizer = create_optimizer(model, cfg)
    sampler = sampling.RaySampler(scene, cfg.train.batch_size, device, cfg.train.seed,
                                  cfg.train.batching)
    step_fn = make_train_step(model, optimizer, cfg, sampler=sampler)  # compiled per cfg
    stats = step_fn(step)            # step is 1-based; a dict of 0-d device tensors
    bad = first_bad_step(bad, stats["finite"], step)   # on the device, read when logging

No step reads a value back to the host: the loss check, the statistics and the NaN guard
stay on the device until the caller reads them (on logging and checkpoint steps).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch.optim.adam import adam as adam_update

from mipnerf360 import stepfun
from mipnerf360.configs import CHOICES, Config, TrainConfig
from mipnerf360.coord import EPS32
from mipnerf360.errors import ConfigError
from mipnerf360.metrics import mse_to_psnr
from mipnerf360.model import MLP_NAMES

PRECISIONS = CHOICES["train.precision"]  # configs.CHOICES is the one list


def learning_rate_decay(
    step: float,
    lr_init: float,
    lr_final: float,
    max_steps: int,
    lr_delay_steps: int = 0,
    lr_delay_mult: float = 1.0,
) -> float:
    """Log-linear decay from lr_init to lr_final with a sine warm-up (multinerf math.py).

    lr(step) = delay(step) * exp((1-u) ln lr_init + u ln lr_final), u = clip(step/max_steps),
    delay = lr_delay_mult + (1 - lr_delay_mult) sin(pi/2 clip(step/lr_delay_steps)).
    """
    if lr_delay_steps > 0:
        delay_rate = lr_delay_mult + (1 - lr_delay_mult) * math.sin(
            0.5 * math.pi * min(max(step / lr_delay_steps, 0.0), 1.0)
        )
    else:
        delay_rate = 1.0
    u = min(max(step / max_steps, 0.0), 1.0)
    log_lerp = math.exp(math.log(lr_init) * (1 - u) + math.log(lr_final) * u)
    return delay_rate * log_lerp


def lr_at_update(step: int, tcfg: TrainConfig) -> float:
    """Learning rate of the ``step``-th (1-based) update: lr(step - 1), as optax counts."""
    return learning_rate_decay(
        step - 1,
        tcfg.lr_init,
        tcfg.lr_final,
        tcfg.max_steps,
        tcfg.lr_delay_steps,
        tcfg.lr_delay_mult,
    )


def train_frac_at(step: int, max_steps: int) -> float:
    """clip((step - 1)/(max_steps - 1), 0, 1) for a 1-based step (multinerf train.py)."""
    return float(np.clip((step - 1) / max(max_steps - 1, 1), 0.0, 1.0))


def compute_data_loss(
    rgb_gt: torch.Tensor,
    renderings: Sequence[Mapping[str, torch.Tensor]],
    tcfg: TrainConfig,
    lossmult: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Data loss over levels (multinerf ``compute_data_loss``).

    rgb_gt [B,3]; renderings[i]['rgb'] [B,3]; lossmult broadcastable to [B,3] (default 1).
    Returns (data_coarse_loss_mult * sum(coarse) + data_loss_mult * final, {'mses': [L]}).
    """
    rgb_gt = rgb_gt[..., :3]
    mult = (
        torch.ones_like(rgb_gt) if lossmult is None else torch.broadcast_to(lossmult, rgb_gt.shape)
    )
    denom = mult.sum()
    data_losses, mses = [], []
    for rendering in renderings:
        resid_sq = (rendering["rgb"] - rgb_gt) ** 2
        mses.append((mult * resid_sq).sum() / denom)
        if tcfg.data_loss_type == "mse":
            data_loss = resid_sq
        elif tcfg.data_loss_type == "charb":
            data_loss = torch.sqrt(resid_sq + tcfg.charb_padding**2)
        else:
            raise ValueError(f"unknown data_loss_type {tcfg.data_loss_type!r} (mse, charb)")
        data_losses.append((mult * data_loss).sum() / denom)
    loss = tcfg.data_loss_mult * data_losses[-1]
    if tcfg.data_coarse_loss_mult != 0 and len(data_losses) > 1:
        loss = loss + tcfg.data_coarse_loss_mult * torch.stack(data_losses[:-1]).sum()
    return loss, {"mses": torch.stack(mses)}


def interlevel_loss(ray_history: Sequence[Mapping[str, torch.Tensor]], tcfg: TrainConfig):
    """Proposal loss: mean(lossfun_outer(stop_grad(NeRF hist), proposal hist)) summed over
    the proposal levels, times interlevel_loss_mult (s-space; multinerf ``interlevel_loss``)."""
    c = ray_history[-1]["sdist"].detach()
    w = ray_history[-1]["weights"].detach()
    loss = 0.0
    for ray_results in ray_history[:-1]:
        loss = loss + torch.mean(
            stepfun.lossfun_outer(c, w, ray_results["sdist"], ray_results["weights"])
        )
    return tcfg.interlevel_loss_mult * loss


def distortion_loss(ray_history: Sequence[Mapping[str, torch.Tensor]], tcfg: TrainConfig):
    """distortion_loss_mult * mean over rays of lossfun_distortion(NeRF sdist, weights)."""
    last = ray_history[-1]
    return tcfg.distortion_loss_mult * torch.mean(
        stepfun.lossfun_distortion(last["sdist"], last["weights"])
    )


def create_optimizer(model: torch.nn.Module, cfg: Config | TrainConfig) -> torch.optim.Optimizer:
    """Adam with the reference's betas/eps (optax.adam: eps outside the sqrt, bias-corrected).

    The learning rate is set by the train step at every update (``lr_at_update``).
    """
    tcfg = cfg.train if isinstance(cfg, Config) else cfg
    params = [p for p in model.parameters() if p.requires_grad]
    dev = params[0].device
    # The fused kernels (CPU and CUDA) do the same update as optax.adam in one pass.
    kwargs = {"fused": True} if dev.type in ("cpu", "cuda") else {"foreach": True}
    return torch.optim.Adam(
        params,
        lr=tcfg.lr_init,
        betas=(tcfg.adam_beta1, tcfg.adam_beta2),
        eps=tcfg.adam_eps,
        **kwargs,
    )


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


@torch.no_grad()
def clip_gradients(model: torch.nn.Module, tcfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Per top-level MLP: clip by value (grad_max_val), then scale to global norm
    grad_max_norm (min(1, max_norm/(eps + |g|))), then nan_to_num (multinerf
    ``clip_gradients`` + ``create_train_step``). Returns the pre-clipping norms (0-d
    tensors). No host sync: nan_to_num runs on every step (a no-op on finite gradients)."""
    norms = {}
    for flax_name, attr in MLP_NAMES.items():
        grads = [p.grad for p in getattr(model, attr).parameters() if p.grad is not None]
        if not grads:
            continue
        norms[flax_name] = _global_norm(grads)
        if tcfg.grad_max_val > 0:
            for g in grads:
                g.clamp_(-tcfg.grad_max_val, tcfg.grad_max_val)
        if tcfg.grad_max_norm > 0:
            clip_norm = norms[flax_name] if tcfg.grad_max_val <= 0 else _global_norm(grads)
            # torch.minimum propagates NaN like jnp.minimum; nan_to_num below then zeroes it.
            mult = torch.minimum(
                torch.ones_like(clip_norm), tcfg.grad_max_norm / (EPS32 + clip_norm)
            )
            torch._foreach_mul_(grads, mult)
        for g in grads:
            torch.nan_to_num_(g)
    return norms


def compute_losses(model, batch, train_frac, rng, tcfg: TrainConfig):
    """Forward pass + all losses: (total loss, {data, interlevel?, distortion?}, mses [L]).

    ``rng``: None (deterministic sampling) or the rays' int64 keys [B] (training jitter).
    """
    renderings, ray_history = model(batch, train_frac, rng=rng)
    data, stats = compute_data_loss(batch["rgb"], renderings, tcfg, batch.get("lossmult"))
    losses = {"data": data}
    if tcfg.interlevel_loss_mult > 0:
        losses["interlevel"] = interlevel_loss(ray_history, tcfg)
    if tcfg.distortion_loss_mult > 0:
        losses["distortion"] = distortion_loss(ray_history, tcfg)
    total = sum(losses.values())
    return total, losses, stats["mses"]


# ----------------------------------------------------------------------------- precision


def precision_of(cfg: Config | TrainConfig) -> str:
    """cfg.train.precision; ConfigError if unknown."""
    tcfg = cfg.train if isinstance(cfg, Config) else cfg
    precision = tcfg.precision
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 for float32 CUDA matmuls and convolutions (a process-wide
    setting of torch; without CUDA it is only recorded there and has no effect)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def precision_context(device: torch.device | str, precision: str):
    """The context a forward pass runs in for ``precision``.

    'fp32': nothing. 'tf32': sets the CUDA TF32 flags (``set_tf32``; on a CPU they are only
    recorded) and returns a null context. 'bf16': ``torch.autocast(device.type, bfloat16)``
    (CPU and CUDA): the MLP layers run in bf16; the MLPs return float32 and sampling,
    compositing and the losses stay float32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "tf32":
        set_tf32(True)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- compile


def resolve_compile(setting: str, device: torch.device | str) -> bool:
    """cfg.train.compile -> bool. 'auto': compile on CUDA only. On the CPU the whole
    compiled step is faster once compiled, but compiling takes minutes on a small machine
    (numbers in benchmarks/README.md), so only 'on' compiles there."""
    if setting not in ("auto", "on", "off"):
        raise ConfigError(f"train.compile must be 'auto', 'on' or 'off', got {setting!r}")
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return setting == "on"


def first_bad_step(acc: torch.Tensor | None, finite: torch.Tensor, step) -> torch.Tensor:
    """Keep the first non-finite step on the device: ``acc`` is a 0-d int64 tensor, -1 while
    every step so far was finite (None starts it). Read it only when logging."""
    if acc is None:
        acc = torch.full((), -1, dtype=torch.int64, device=finite.device)
    return torch.where((acc < 0) & ~finite, step, acc)


class TrainStep:
    """One optimisation step: sample rays, forward (proposal resampling, rendering), losses,
    backward, ``grad_reduce``, per-MLP clipping and Adam (multinerf ``create_train_step``).

    ``step_fn(step, rank=0, world_size=1)`` (needs ``sampler``): the step's rays are
    ``sampler.sample(step, rank, world_size)`` and their jitter comes from the rays' keys.
    ``step_fn.run_batch(batch, step, rng=None, train_frac=None)``: a given batch; rng None
    is deterministic sampling (multinerf Config(randomized=False)), or int64 ray keys [B].
    ``step`` is the 1-based Python int of the update (the learning rate is lr(step - 1);
    train_frac defaults to train_frac_at(step, max_steps)); it reaches the device as a fill
    kernel, never a copy that waits.

    Returns a dict of 0-d device tensors: loss, data, interlevel, distortion, psnr (final
    level), mse_<i> / psnr_<i> per level, grad_norm_<MLP> (before clipping), lr (the
    scheduled one), train_frac, finite (bool: the loss is finite). Nothing is read back to
    the host. A non-finite loss leaves the parameters as they were (the update runs with
    learning rate 0; Adam's moments see the zeroed gradients); the caller stops the run
    when it reads ``finite`` (see ``first_bad_step``).

    ``grad_reduce(grads)``: called with the list of parameter gradients after backward and
    before clipping (data-parallel all-reduce); None does nothing.

    ``compile``: the forward + losses (with their AOT-compiled backward) and the update
    (clipping + Adam) are two ``torch.compile(fullgraph=True)`` graphs; if either fails to
    compile, a one-line warning is printed and that part runs eagerly.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: Config,
        *,
        sampler=None,
        grad_reduce: Callable[[list[torch.Tensor]], None] | None = None,
        compile: bool = False,
    ):
        self.model = model
        self.optimizer = optimizer
        self.cfg = cfg
        self.sampler = sampler
        self.grad_reduce = grad_reduce
        self.device = next(model.parameters()).device
        self.precision = precision_of(cfg)
        if self.precision == "tf32":
            set_tf32(True)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        group = optimizer.param_groups[0]
        if (
            not isinstance(optimizer, torch.optim.Adam)
            or len(optimizer.param_groups) != 1
            or group["amsgrad"]
            or group["maximize"]
            or group["decoupled_weight_decay"]
        ):
            raise ValueError("TrainStep needs the one-group Adam of create_optimizer")
        # The learning rate lives on the device: fused Adam takes a tensor lr, which the
        # update sets to 0 on a non-finite step without asking the host. (Other devices take
        # Adam's float lr: there a non-finite step updates with the zeroed gradients, as
        # multinerf does.)
        self._tensor_lr = bool(optimizer.defaults.get("fused")) or bool(
            optimizer.defaults.get("capturable")
        )
        self._lr = torch.zeros((), dtype=torch.float32, device=self.device)
        self._lr_used = torch.zeros((), dtype=torch.float32, device=self.device)
        self._eager = {"forward": self._forward, "update": self._update}
        self._fns = dict(self._eager)
        self.compiled = bool(compile)
        if self.compiled:
            self._fns = {k: torch.compile(f, fullgraph=True) for k, f in self._eager.items()}

    # -- the two parts (each compiled as one graph) --

    def _forward(self, batch, step_t, frac_t, rank: int, world_size: int, rng):
        if batch is None:
            batch = self.sampler.sample(step_t, rank, world_size)
            rng = batch["key"]
        tcfg = self.cfg.train
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                total, losses, mses = compute_losses(self.model, batch, frac_t, rng, tcfg)
        else:
            total, losses, mses = compute_losses(self.model, batch, frac_t, rng, tcfg)
        return total, losses, mses

    def _adam_lists(self):
        """(params, grads, exp_avgs, exp_avg_sqs, steps) of the Adam update, creating the
        state on first use exactly as torch.optim.Adam does (so ``optimizer.state_dict()``
        checkpoints and resumes it). Eager: dict look-ups only, no device work after the
        first step."""
        lists = ([], [], [], [], [])
        for group in self.optimizer.param_groups:
            on_device = group["capturable"] or group["fused"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.optimizer.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros(
                        (), dtype=torch.float32, device=p.device if on_device else "cpu"
                    )
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                for out, v in zip(
                    lists,
                    (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]),
                    strict=True,
                ):
                    out.append(v)
        return lists

    def _update(self, total, params, grads, exp_avgs, exp_avg_sqs, steps):
        """Clipping + Adam (``torch.optim.adam.adam``, the functional form of
        ``optimizer.step()``, whose wrapper breaks dynamo graphs on purpose)."""
        with torch.no_grad():
            norms = clip_gradients(self.model, self.cfg.train)
            finite = torch.isfinite(total.detach())
            group = self.optimizer.param_groups[0]
            lr = group["lr"]
            if self._tensor_lr:
                self._lr_used.copy_(torch.where(finite, self._lr, torch.zeros_like(self._lr)))
                lr = self._lr_used
            # Compiled: the foreach form with device-side lr and step, which inductor fuses
            # into a few loops (the fused kernel is opaque to dynamo: a graph break).
            compiling = torch.compiler.is_compiling()
            adam_update(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                foreach=bool(group["foreach"]) or compiling,
                capturable=bool(group["capturable"]) or compiling,
                differentiable=False,
                fused=bool(group["fused"]) and not compiling,
                amsgrad=False,
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                lr=lr,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )
        return norms, finite

    def _call(self, name: str, *args):
        """Run part ``name`` ('forward' or 'update'); a compiled part that fails falls back
        to eager for good, with one warning line."""
        fn, eager = self._fns[name], self._eager[name]
        if fn is eager:
            return fn(*args)
        try:
            return fn(*args)
        except Exception as e:
            lines = str(e).strip().splitlines()
            print(
                f"warning: torch.compile of the {name} failed ({type(e).__name__}: "
                f"{lines[0][:160] if lines else ''}); running it eagerly",
                file=sys.stderr,
            )
            self._fns[name] = eager
            return eager(*args)

    # -- public --

    def __call__(self, step, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        if self.sampler is None:
            raise ValueError("this train step has no sampler: use run_batch(batch, step)")
        return self._run(None, step, rank, world_size, None, None)

    def run_batch(
        self,
        batch: Mapping[str, torch.Tensor],
        step: int,
        rng: torch.Tensor | None = None,
        train_frac: float | None = None,
    ) -> dict[str, torch.Tensor]:
        return self._run(dict(batch), step, 0, 1, rng, train_frac)

    def _run(self, batch, step, rank, world_size, rng, train_frac):
        tcfg = self.cfg.train
        step = int(step)  # a Python int (or a CPU tensor): no device read
        if train_frac is None:
            train_frac = train_frac_at(step, tcfg.max_steps)
        dev = self.device
        step_t = torch.full((), step, dtype=torch.int64, device=dev)
        frac_t = torch.full((), float(train_frac), dtype=torch.float32, device=dev)
        lr = lr_at_update(step, tcfg)
        if self._tensor_lr:
            self._lr.fill_(lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr  # the record in optimizer.state_dict(); the update reads _lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total, losses, mses = self._call("forward", batch, step_t, frac_t, rank, world_size, rng)
        total.backward()
        if self.grad_reduce is not None:
            self.grad_reduce([p.grad for p in self.params if p.grad is not None])
        norms, finite = self._call("update", total, *self._adam_lists())
        return self._stats(total, losses, mses, norms, finite, frac_t, lr)

    def _stats(self, total, losses, mses, norms, finite, frac_t, lr) -> dict[str, torch.Tensor]:
        zero = torch.zeros((), device=self.device)
        out = {"loss": total.detach()}
        out.update({k: v.detach() for k, v in losses.items()})
        for k in ("interlevel", "distortion"):
            out.setdefault(k, zero)
        mses = mses.detach()
        psnrs = mse_to_psnr(mses)
        for i in range(mses.shape[0]):
            out[f"mse_{i}"] = mses[i]
            out[f"psnr_{i}"] = psnrs[i]
        out["psnr"] = psnrs[-1]
        for name, norm in norms.items():
            out[f"grad_norm_{name}"] = norm.detach()
        out["lr"] = self._lr.clone() if self._tensor_lr else torch.full((), lr, device=self.device)
        out["train_frac"] = frac_t
        out["finite"] = finite
        return out


def make_train_step(
    model,
    optimizer,
    cfg: Config,
    *,
    sampler=None,
    grad_reduce: Callable[[list[torch.Tensor]], None] | None = None,
    compile: bool | None = None,
) -> TrainStep:
    """The train step for ``cfg`` (torch.compile per cfg.train.compile unless ``compile``
    says; see TrainStep)."""
    device = next(model.parameters()).device
    if compile is None:
        compile = resolve_compile(cfg.train.compile, device)
    return TrainStep(
        model, optimizer, cfg, sampler=sampler, grad_reduce=grad_reduce, compile=compile
    )


def train_step(
    model,
    optimizer,
    batch: Mapping[str, torch.Tensor],
    step: int,
    cfg: Config,
    rng: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One eager training step on ``batch`` (see TrainStep); ``step`` is 1-based."""
    return TrainStep(model, optimizer, cfg, compile=False).run_batch(batch, step, rng=rng)
