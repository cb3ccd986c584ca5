"""Fixtures shared by the tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two threads are several times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
