"""Fixtures shared by the tests."""

import os

import pytest
import torch

from mipnerf360 import cli

# The tests run the package as its commands do (subnormals flushed, freed memory kept); this
# must come before torch's first parallel operation, i.e. before the test modules load.
cli.tune_cpu_process()


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two threads are several times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True, scope="session")
def image_cache(tmp_path_factory):
    """Downsampled-image caches of the loaders go to a temporary folder, not ~/.cache."""
    old = os.environ.get("MIPNERF360_CACHE")
    os.environ["MIPNERF360_CACHE"] = str(tmp_path_factory.mktemp("mipnerf360-cache"))
    yield
    if old is None:
        os.environ.pop("MIPNERF360_CACHE", None)
    else:
        os.environ["MIPNERF360_CACHE"] = old
