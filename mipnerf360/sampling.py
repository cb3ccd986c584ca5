"""Training rays and jitter as pure functions of (seed, step, global ray index).

A counter-based random number generator (Salmon et al., "Parallel random numbers: as easy
as 1, 2, 3", SC 2011: random numbers as a hash of a counter): every random number of
training is ``hash(seed, step, ray index in the global batch, stream, j)``, computed with
torch integer ops on the device. There is no generator state to checkpoint (resume is
bit-exact), ``torch.compile`` traces it without graph breaks, and a ray's random numbers do
not depend on how the global batch is split across data-parallel ranks.

    sampler = RaySampler(scene, batch_size=16384, device="cuda", seed=cfg.train.seed)
    batch = sampler.sample(step, rank, world_size)   # RAY_KEYS + rgb + key, [B/W, k]
    renderings, _ = model(batch, train_frac, rng=batch["key"])   # jitter from the keys

Counterpart of the random batches of multinerf ``internal/datasets.py`` (``_next_train``)
and of its ``jax.random`` keys.
"""

from __future__ import annotations

import numpy as np
import torch

from mipnerf360 import camera
from mipnerf360.configs import CHOICES
from mipnerf360.errors import ConfigError

BATCHING_MODES = CHOICES["train.batching"]  # configs.CHOICES is the one list

_MASK32 = 0xFFFFFFFF
# Streams: which random numbers of a ray a draw is (kept apart so they are independent).
STREAM_CAMERA, STREAM_PIX_X, STREAM_PIX_Y = 1, 2, 3
STREAM_JITTER = 16  # + level: stratified-sampling jitter of each resampling level


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x int64 in [0, 2^32) and a 32-bit constant c, without int64
    overflow: c = c_hi 2^16 + c_lo, and both partial products stay below 2^48."""
    c_hi, c_lo = c >> 16, c & 0xFFFF
    return (x * c_lo + ((x * c_hi) & 0xFFFF) * 65536) & _MASK32


def _mix32(x):
    """A 32-bit integer finaliser with full avalanche (C. Wellons' "lowbias32", from his
    hash-prospector results): xor-shift, multiply, xor-shift, multiply, xor-shift."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_words(*words):
    """Hash of a sequence of 32-bit words (int64 tensors in [0, 2^32), broadcast, or ints)
    -> int64 tensor in [0, 2^32) (a Python int if every word is one). Each word is xor-ed
    into the state, which is then mixed after adding an odd constant (so that a zero state
    is not a fixed point). Leading int words are hashed in Python: no tensor is made for
    them (and none on another device)."""
    h = 0
    for w in words:
        if isinstance(w, int):
            w = w & _MASK32
        h = _mix32(((h ^ w) + 0x9E3779B9) & _MASK32)
    return h


def _seed_words(seed: int) -> tuple[int, int]:
    seed = int(seed)
    return seed & _MASK32, (seed >> 32) & _MASK32


def _as_step(step, device: torch.device) -> torch.Tensor:
    """A step as a 0-d int64 tensor on ``device`` (a fill kernel, never a host sync)."""
    if isinstance(step, torch.Tensor):
        return step.to(device=device, dtype=torch.int64)
    return torch.full((), int(step), dtype=torch.int64, device=device)


def ray_keys(seed: int, step, index: torch.Tensor) -> torch.Tensor:
    """Per-ray keys: hash(seed, step, global ray index) -> int64 [B] in [0, 2^32).

    ``step`` is an int or a 0-d int64 tensor; ``index`` int64 [B] (position of each ray in
    the global batch of the step).
    """
    lo, hi = _seed_words(seed)
    s = _as_step(step, index.device)
    return hash_words(lo, hi, s & _MASK32, (s >> 32) & _MASK32, index & _MASK32)


def random_bits(keys: torch.Tensor, stream: int, n: int | None = None) -> torch.Tensor:
    """32 random bits per key and stream: keys [...] -> int64 [...] (n None) or [..., n]."""
    if n is None:
        return hash_words(keys, stream)
    j = torch.arange(n, dtype=torch.int64, device=keys.device)
    return hash_words(keys[..., None], stream, j)


def uniform(keys: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """Uniform float32 in [0, 1) on a 2^-24 grid: keys [...] -> [..., n]."""
    return (random_bits(keys, stream, n) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def randint(bits: torch.Tensor, high: int) -> torch.Tensor:
    """32 random bits -> integers in [0, high) (Lemire's multiply-shift; high < 2^31)."""
    if not 0 < high < 2**31:
        raise ValueError(f"randint: high must be in [1, 2^31), got {high}")
    return (bits * high) >> 32


class RaySampler:
    """Random training rays from a ``datasets.Scene``, drawn on ``device``.

    batching='all_images': every ray picks a training image and a pixel uniformly;
    'single_image': one training image per global batch (pixels uniform within it).
    Images, poses and intrinsics (per image) are copied to the device once; each step's rays
    are computed there in one batched call. ``sample(step, rank, world_size)`` is a pure
    function of (seed, step): rank r gets rays [r B/W, (r+1) B/W) of the global batch that
    a single process draws. Returns origins, directions, viewdirs [b,3], radii, near, far
    [b,1] (model.RAY_KEYS), rgb [b,3] and key int64 [b] (the rays' random keys, for the
    model's jitter).
    """

    def __init__(self, scene, batch_size: int, device, seed: int = 0, batching: str = "all_images"):
        from mipnerf360.datasets import DatasetError

        if batching not in BATCHING_MODES:
            raise ConfigError(f"train.batching must be one of {BATCHING_MODES}, got {batching!r}")
        if int(batch_size) < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {batch_size}")
        if len(scene.i_train) == 0:
            raise DatasetError(f"{scene.path}: the scene has no training images")
        if max(scene.width, scene.height) >= 2**31:
            raise DatasetError(f"{scene.path}: images of {scene.width}x{scene.height} too large")
        self.batch_size = int(batch_size)
        self.device = dev = torch.device(device)
        self.seed = int(seed)
        self.batching = batching
        self.width, self.height = int(scene.width), int(scene.height)
        self.near, self.far = float(scene.near), float(scene.far)
        self.camtype = scene.camtype
        idx = np.asarray(scene.i_train)
        self.num_images = len(idx)
        self.images = torch.from_numpy(np.ascontiguousarray(scene.images[idx])).to(dev)
        self.camtoworlds = torch.as_tensor(scene.camtoworlds[idx], dtype=torch.float32).to(dev)
        self.pixtocams = torch.as_tensor(scene.pixtocams[idx], dtype=torch.float32).to(dev)
        self.distortion = None
        if scene.distortion is not None:
            self.distortion = torch.as_tensor(scene.distortion[idx], dtype=torch.float32).to(dev)
        self.pixtocam_ndc = None
        if scene.pixtocam_ndc is not None:
            self.pixtocam_ndc = torch.as_tensor(scene.pixtocam_ndc, dtype=torch.float32).to(dev)

    def local_size(self, world_size: int = 1) -> int:
        """Rays per rank; ConfigError unless world_size divides the batch size."""
        if world_size < 1 or self.batch_size % world_size:
            raise ConfigError(
                f"train.batch_size {self.batch_size} must be divisible by the number of "
                f"processes ({world_size})"
            )
        return self.batch_size // world_size

    def keys(self, step, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Random keys int64 [B/W] of rank's rays of the global batch of ``step``."""
        b = self.local_size(world_size)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside [0, {world_size})")
        index = torch.arange(rank * b, (rank + 1) * b, dtype=torch.int64, device=self.device)
        return ray_keys(self.seed, step, index)

    def rays_for(self, cam, pix_x, pix_y) -> dict[str, torch.Tensor]:
        """Rays [b,k] and rgb [b,3] for training-image indices ``cam`` (into i_train)."""
        dist = None if self.distortion is None else self.distortion[cam]
        o, d, v, r, _ = camera.pixels_to_rays(
            pix_x,
            pix_y,
            self.pixtocams[cam],
            self.camtoworlds[cam],
            dist,
            self.pixtocam_ndc,
            self.camtype,
            xnp=torch,
        )
        ones = torch.ones_like(r)
        return {
            "origins": o.contiguous(),
            "directions": d,
            "viewdirs": v,
            "radii": r,
            "near": ones * self.near,
            "far": ones * self.far,
            "rgb": self.images[cam, pix_y, pix_x],
        }

    def pixels(self, step, rank: int = 0, world_size: int = 1):
        """(cam, pix_x, pix_y, keys), each int64 [B/W]: rank's rays of the global batch of
        ``step`` as training-image indices (into i_train), pixel columns and rows."""
        keys = self.keys(step, rank, world_size)
        if self.batching == "all_images":
            cam = randint(random_bits(keys, STREAM_CAMERA), self.num_images)
        else:  # one image for the whole global batch: a hash of (seed, step) only
            lo, hi = _seed_words(self.seed)
            s = _as_step(step, self.device)
            bits = hash_words(lo, hi, s & _MASK32, (s >> 32) & _MASK32, STREAM_CAMERA)
            cam = randint(bits, self.num_images).expand(keys.shape)
        pix_x = randint(random_bits(keys, STREAM_PIX_X), self.width)
        pix_y = randint(random_bits(keys, STREAM_PIX_Y), self.height)
        return cam, pix_x, pix_y, keys

    def sample(self, step, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """Rank's slice of the global batch of ``step`` (int or 0-d int64 tensor)."""
        cam, pix_x, pix_y, keys = self.pixels(step, rank, world_size)
        batch = self.rays_for(cam, pix_x, pix_y)
        batch["key"] = keys
        return batch
