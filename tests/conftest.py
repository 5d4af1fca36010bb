"""Fixtures shared by the modules that train on the dev chain's digits task."""

import pytest
import torch

from consensus.params import DEV
from mining.trainer import DataCache, DeviceData


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while a module runs: the digits models are tiny, so a second
    thread buys nothing and, on a busy machine, costs a great deal of waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache() -> DataCache:
    return DataCache()


@pytest.fixture(scope="module")
def data(cache: DataCache) -> DeviceData:
    """The digits splits, resident on the CPU."""
    return cache.resident(DEV.genesis_task.dataset, "cpu")
