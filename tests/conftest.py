"""Shared test setup: offline, one thread, and a marker for tests that need CIFAR-10."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from train_ghn.data import data_root  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    npz = data_root() / "cifar10" / "cifar10-jpeg75.npz"
    if npz.is_file():
        return
    skip = pytest.mark.skip(reason=f"CIFAR-10 copy not found at {npz}; set GHN_INIT_DATA")
    for item in items:
        if "data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_ghn():
    import ghn_init

    return ghn_init.load()
