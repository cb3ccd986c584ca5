"""Helpers shared by the golden-parity tests (imported as `helpers` from tests/)."""

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
