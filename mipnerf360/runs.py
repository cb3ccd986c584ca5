"""A training run on disk: its identity, its lock, its checkpoints and its finished model.

A *run* is one training of one model: the scene data it saw and the training-relevant
config (``data``, ``model``, ``train``). Its **identity** is a fingerprint of both and is
stored in every checkpoint and in ``model.pt``. Settings that do not change the trained
weights are not part of it: ``eval.*``, the logging / checkpoint cadence, the time limit,
``train.compile``, the video path settings and the device (so a preempted CPU or GPU job may
resume on another node, or with another number of processes).

A run folder holds one run at a time, written by one process at a time (``run_lock``).
Older runs of a different identity are moved aside to ``previous/``, never deleted
(``move_aside``).

Layout of a run folder (``mipnerf360 train``)::

    .lock                        lock file (PID and host of the process holding it)
    config.yaml                  resolved config
    checkpoints/ckpt_<step>.pt   model + optimizer + step + identity (newest 2 kept)
    metrics.csv, curves.png, summary.json, tb/
    model.pt                     final weights + config + identity; written last
    previous/<time>-<id>/        earlier runs of other identities, moved aside
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from mipnerf360 import configs
from mipnerf360.errors import ConfigError, UserError

CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
LOCK_NAME = ".lock"
PREVIOUS_DIR = "previous"
# Files that make up a run's state in its folder (moved aside together).
RUN_FILES = ("config.yaml", "metrics.csv", "curves.png", "summary.json", "model.pt")
RUN_DIRS = ("checkpoints", "tb")

# Config keys that do not change the trained weights: not part of a run's identity.
NOT_IDENTITY = (
    "eval",
    "train.checkpoint_every",
    "train.log_every",
    "train.time_limit_s",
    "train.compile",
    "data.render_path_frames",
    "data.z_variation",
    "data.z_phase",
)


# ----------------------------------------------------------------------------- devices


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cpu' / 'cuda' / 'cuda:N' as given."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: only auto, cpu, cuda and cuda:N are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on {socket.gethostname()}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    return dev


# ----------------------------------------------------------------------------- identity


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def identity_config(cfg: configs.Config | dict) -> dict[str, Any]:
    """The training-relevant settings, flattened: {'train.batch_size': 16384, ...}."""
    d = configs.to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    flat = _flatten(d)
    return {
        k: v
        for k, v in flat.items()
        if not any(k == n or k.startswith(n + ".") for n in NOT_IDENTITY)
    }


def make_identity(cfg: configs.Config, data_fingerprint: str) -> dict:
    """{'id': short hash, 'data': scene fingerprint, 'config': training-relevant settings}."""
    conf = identity_config(cfg)
    blob = json.dumps({"config": conf, "data": data_fingerprint}, sort_keys=True)
    return {
        "id": hashlib.sha256(blob.encode()).hexdigest()[:16],
        "data": data_fingerprint,
        "config": conf,
    }


def identity_diff(old: dict | None, new: dict) -> list[str]:
    """Human-readable differences between two identities ([] when they are the same run)."""
    if not old or "config" not in old:
        return ["the checkpoint has no run identity (written by an older version)"]
    out = []
    if old.get("data") != new.get("data"):
        out.append("scene data changed")
    a, b = old["config"], new["config"]
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            out.append(f"{k}: {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}")
    return out


# ----------------------------------------------------------------------------- lock


def _lock_holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        return f"PID {info.get('pid')} on host {info.get('host')} (since {info.get('since')})"
    except (OSError, ValueError):
        return "another process"


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, what: str = "train") -> Iterator[str]:
    """Hold ``folder/.lock`` for the life of a process that writes ``folder``.

    A second process fails at once with a UserError naming the PID and host that hold it.
    The lock is a ``flock`` on the file: the kernel releases it when the holder dies (also
    on ``kill -9``), so a lock left by a dead process is taken over without any clean-up.
    On a shared file system (NFS) ``flock`` is forwarded to the server on Linux >= 2.6.12;
    where it is not, two hosts are not kept apart (see README).
    """
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"{folder}: cannot create the run folder: {e.strerror or e}") from None
    path = os.path.join(folder, LOCK_NAME)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"{folder}: in use by {_lock_holder(path)}; wait for it to finish or stop it"
        ) from None
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "what": what,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


# ----------------------------------------------------------------------------- checkpoints


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """[(step, path)] of ckpt_<step>.pt files in ``ckpt_dir``, sorted by step."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = CKPT_RE.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(ckpt_dir, name)))
    return sorted(out)


def _torch_load(path: str, map_location: Any = "cpu") -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, not a torch file, unpickling error
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable checkpoint ({msg})") from None


def load_newest_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[dict, str] | None:
    """The newest readable checkpoint and its path, or None when there is none.

    A corrupt newest checkpoint (a truncated copy, a disk error) falls back to the newest
    readable one, with a one-line warning naming both.
    """
    bad: list[str] = []
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            ckpt = _torch_load(path)
            if not isinstance(ckpt, dict) or "model" not in ckpt or "step" not in ckpt:
                raise UserError(f"{path}: not a mipnerf360 checkpoint")
        except UserError as e:
            bad.append(str(e))
            continue
        if bad:
            print(f"warning: {'; '.join(bad)}: using {path} instead", file=sys.stderr)
        return ckpt, path
    if bad:
        raise UserError(f"no readable checkpoint in {os.fspath(ckpt_dir)}: {'; '.join(bad)}")
    return None


# ----------------------------------------------------------------------------- run folder


def has_run(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds any state of a run (checkpoints or a finished model)."""
    return bool(list_checkpoints(os.path.join(folder, "checkpoints"))) or os.path.exists(
        os.path.join(folder, "model.pt")
    )


def move_aside(folder: str | os.PathLike, label: str) -> str | None:
    """Move the run state in ``folder`` to ``folder/previous/<time>-<label>/``; its path.

    Nothing is deleted: a finished model of another identity stays on disk.
    """
    folder = os.fspath(folder)
    present = [n for n in (*RUN_FILES, *RUN_DIRS) if os.path.exists(os.path.join(folder, n))]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(folder, PREVIOUS_DIR, f"{stamp}-{label}")
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(folder, PREVIOUS_DIR, f"{stamp}-{label}-{n}")
    try:
        os.makedirs(dest)
        for name in present:
            os.replace(os.path.join(folder, name), os.path.join(dest, name))
    except OSError as e:
        raise UserError(f"{dest}: cannot move the old run aside: {e.strerror or e}") from None
    return dest


def load_trained(train_dir: str, device: str | torch.device = "cpu"):
    """(model in eval mode, cfg, model.pt dict) from a finished training folder."""
    from mipnerf360 import model as model_lib

    path = os.path.join(train_dir, "model.pt")
    if not os.path.exists(path):
        raise UserError(
            f"{path} not found: training in {train_dir} has not finished (or the path is wrong)"
        )
    dev = resolve_device(device)
    saved = _torch_load(path, map_location=dev)
    if not isinstance(saved, dict) or "model" not in saved or "config" not in saved:
        raise UserError(
            f"{path}: not a mipnerf360 model file (expected 'model' and 'config'; a bare "
            "state_dict is not enough: use the model.pt that `mipnerf360 train` writes)"
        )
    try:
        cfg = configs.from_dict(saved["config"])
        model = model_lib.build_model(cfg).to(dev)
        model.load_state_dict(saved["model"])
    except (ConfigError, RuntimeError, KeyError, TypeError) as e:
        msg = str(e).splitlines()[0]
        raise UserError(f"{path}: the weights do not fit its config ({msg})") from None
    model.eval()
    return model, cfg, saved


def clear_leftovers(folder: str | os.PathLike) -> list[str]:
    """Remove temporary files of killed writes in a run folder and its checkpoints/."""
    from mipnerf360 import io

    removed = io.remove_temporaries(folder)
    removed += io.remove_temporaries(os.path.join(folder, "checkpoints"))
    return removed
