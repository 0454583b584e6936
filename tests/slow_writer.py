"""Start ghn-init in a child process whose writing of predicted weights is slowed down, so a test can signal it
mid-write."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

__all__ = ["start", "wait_for"]

#: Prepended to the child's code: every tensor written takes 0.3 s, so writing resnet18 takes tens of seconds.
_SLOW_PREDICTION = """
import time
import ghn_init.export

_write_safetensors = ghn_init.export.write_safetensors


def _slow_write_safetensors(path, specs, tensors, metadata=None):
    def slowly():
        for item in tensors:
            time.sleep(0.3)
            yield item

    return _write_safetensors(path, specs, slowly(), metadata)


ghn_init.export.write_safetensors = _slow_write_safetensors
"""


def start(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Run ``code`` (with the slowed prediction) in a new Python process, ``args`` as its ``sys.argv[1:]``."""
    return subprocess.Popen([sys.executable, "-c", _SLOW_PREDICTION + code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, timeout_s: float = 300) -> None:
    """Poll ``condition`` until it holds; fail with the child's output if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the child exited early ({process.returncode}): {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting; child output: {process.communicate()}")
        time.sleep(0.1)
