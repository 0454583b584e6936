"""benchmarks/step_cost.py: how a profile's operators are counted."""

from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def step_cost(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import step_cost

    return step_cost


def test_operators_split_into_top_level_and_kernels(step_cost):
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.nn.functional.linear(x, w).relu().view(2, 6)
    counts = step_cost._count_operators(prof)
    assert counts["top_level"] == 3, "linear, relu, view"
    assert counts["kernels"] == 2, "a matrix product and relu; linear is composite, t and view are views"
    assert counts["all"] > counts["top_level"], "nested calls are counted in all"
