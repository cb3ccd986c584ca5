"""Helpers shared by the tests (imported as `helpers` from tests/): golden files of
multinerf's outputs, and a very small model trained on a procedural scene."""

from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).parent / "golden"


def load(name):
    """A golden file of multinerf's outputs (tests/golden/<name>.npz)."""
    return np.load(GOLDEN / f"{name}.npz")


def t(a, dtype=None):
    """numpy -> torch, optionally cast."""
    x = torch.from_numpy(np.asarray(a))
    return x if dtype is None else x.to(dtype)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(actual.detach().cpu().numpy(), expected, rtol=rtol, atol=atol)


# A very small model so a training step takes tens of milliseconds on a CPU.
SMALL = [
    "train.batch_size=64",
    "model.num_prop_samples=8",
    "model.num_nerf_samples=8",
    "model.prop_mlp.net_width=16",
    "model.prop_mlp.max_deg_point=4",
    "model.prop_mlp.basis_shape=octahedron",
    "model.prop_mlp.basis_subdivisions=1",
    "model.nerf_mlp.net_depth=2",
    "model.nerf_mlp.net_width=32",
    "model.nerf_mlp.bottleneck_width=16",
    "model.nerf_mlp.net_width_viewdirs=16",
    "model.nerf_mlp.max_deg_point=6",
    "model.nerf_mlp.basis_shape=octahedron",
    "model.nerf_mlp.basis_subdivisions=1",
    "eval.chunk_size=2048",
]


def train_small(root: Path, *overrides, n_views=9, width=40, height=32) -> tuple[str, str]:
    """(scene_dir, run_dir): a procedural 360 scene under ``root`` and a SMALL model trained
    on it with the ``cpu`` preset (2 steps unless ``overrides`` say), on one thread."""
    from mipnerf360 import cli, synthetic

    scene = synthetic.generate(
        root / "scene", kind="360", n_views=n_views, width=width, height=height, factors=()
    )
    run = root / "run"
    args = [scene, str(run), "--preset", "cpu", "--no-progress", "train.max_steps=2"]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", *args, *SMALL, *overrides]) == 0
    finally:
        torch.set_num_threads(old)
    return str(scene), str(run)


def wait_until_training(proc, out: Path, timeout: float = 120.0) -> None:
    """Wait until the training subprocess ``proc`` has logged its first row in ``out``
    (metrics.csv exists); fail with its output if it exits or does not start in time."""
    import time

    deadline = time.time() + timeout
    while not (Path(out) / "metrics.csv").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)


def alive(pid: int) -> bool:
    """Exists and is not a zombie (PID 1 in a container may never reap what it starts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# Resources of a workflow run in the tests: one thread per job, no GPU, small limits.
CPU_RESOURCES = {
    "default": {"threads": 1, "mem_mb": 1000, "runtime": 10},
    "train": {"threads": 1, "gpu": 0},
}
