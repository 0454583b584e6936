"""Shared test setup: offline, one thread, markers for tests that need CIFAR-10 or the reference fixtures."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from train_ghn.data import data_root  # noqa: E402

torch.set_num_threads(1)


def reference_fixtures_dir() -> Path:
    """The authors' GHN-2/GHN-3 reference outputs: ``$GHN_INIT_FIXTURES``, else ``../shared/fixtures/ghn-reference``."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "ghn-reference"
    return Path(os.environ.get("GHN_INIT_FIXTURES", default))


def _hub_unreachable() -> str | None:
    """Why tests that download from the Hugging Face Hub cannot run here, or None when they can."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set: tests that download published GHNs from the Hub are skipped"
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as err:
        return f"the Hugging Face Hub is not reachable ({err})"
    return None


def pytest_collection_modifyitems(config, items):
    npz = data_root() / "cifar10" / "cifar10-jpeg75.npz"
    fixtures = reference_fixtures_dir() / "manifest.json"
    missing = {
        "network": _hub_unreachable() if any("network" in item.keywords for item in items) else None,
        "data": None if npz.is_file() else f"CIFAR-10 copy not found at {npz}; set GHN_INIT_DATA",
        "fixtures": None if fixtures.is_file() else f"GHN reference fixtures not found at {fixtures.parent}; "
                                                      "set GHN_INIT_FIXTURES",
    }
    for item in items:
        for marker, reason in missing.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def reference_fixtures() -> Path:
    return reference_fixtures_dir()


@pytest.fixture(scope="session")
def default_ghn():
    import ghn_init

    return ghn_init.load()
