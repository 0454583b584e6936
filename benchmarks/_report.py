"""Shared by the benchmarks: the machine they ran on, and their tables in RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import timm
import torch

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"


def machine() -> dict[str, str | int]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count() or 0, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "timm": timm.__version__}


def ghn_setup(ghn) -> dict[str, object]:
    """Which GHN predicted, the config fields that shape its tensors beyond its weights, and the
    ghn_init release that turned its output into tensors."""
    import ghn_init

    return {"ghn": ghn.meta.get("name"), "ghn_sha256": ghn_init.content_hash(ghn)[:16],
            "untie_noise": ghn.config.untie_noise, "residual_branch_gain": ghn.config.residual_branch_gain,
            "ghn_init": ghn_init.__version__}


def describe_ghn(setup: dict) -> str:
    return (f"GHN `{setup['ghn']}` (sha256 {setup['ghn_sha256']}; untie noise {setup['untie_noise']}, "
            f"residual branch gain {setup['residual_branch_gain']}; ghn_init {setup['ghn_init']})")


def update_results(section: str, markdown: str) -> None:
    """Replace (or append) the block between ``<!-- section -->`` markers in RESULTS.md."""
    start, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS_MD.write_text(text)
