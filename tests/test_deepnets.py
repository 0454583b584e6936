"""Tests for the DeepNets-1M-style architecture generator (train_ghn.deepnets)."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from train_ghn.deepnets import (
    OPS,
    SPLITS,
    CellSpec,
    NetSpec,
    build_net,
    count_params,
    sample_net,
    sample_spec,
)

REPO = Path(__file__).resolve().parents[1]


def _arch(spec: NetSpec) -> dict:
    """Spec dict without the bookkeeping fields, i.e. only what defines the architecture."""
    d = spec.to_dict()
    d.pop("seed")
    d.pop("split")
    return d


def _param_shapes(net: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in net.named_parameters()]


def _meta_net(spec: NetSpec, **kw) -> nn.Module:
    with torch.device("meta"):
        return build_net(spec, **kw)


@pytest.fixture(autouse=True)
def _few_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("split", SPLITS)
def test_same_seed_same_spec_and_params(split):
    for seed in (0, 7, 123456):
        a, b = sample_spec(seed, split), sample_spec(seed, split)
        assert a == b
        assert a.to_dict() == b.to_dict()
        assert _param_shapes(_meta_net(a)) == _param_shapes(_meta_net(b))


def test_sample_net_matches_build_net():
    torch.manual_seed(0)
    net = sample_net(3, "train", num_classes=7)
    assert net.classifier.out_features == 7
    assert _param_shapes(net) == _param_shapes(_meta_net(sample_spec(3, "train"), num_classes=7))


def test_spec_is_json_roundtrippable():
    for split in SPLITS:
        spec = sample_spec(11, split)
        d = json.loads(json.dumps(spec.to_dict()))
        assert NetSpec.from_dict(d) == spec


def test_different_seeds_give_different_architectures():
    archs = [json.dumps(_arch(sample_spec(s, "train")), sort_keys=True) for s in range(20)]
    assert len(set(archs)) >= 18
    shapes = {tuple(_param_shapes(_meta_net(sample_spec(s, "train")))) for s in range(20)}
    assert len(shapes) >= 18


def test_split_is_mixed_into_the_seed():
    same = sum(_arch(sample_spec(s, "train")) == _arch(sample_spec(s, "id")) for s in range(20))
    assert same == 0


def test_global_rng_untouched():
    random.seed(42)
    state = random.getstate()
    sample_spec(5, "dense")
    assert random.getstate() == state


def test_deterministic_across_processes():
    """Guards against salted str hashing (hash()) or other per-process state in seeding."""
    code = (
        "import json; from train_ghn.deepnets import sample_spec;"
        "print(json.dumps([sample_spec(s, sp).to_dict() for sp in ('train', 'deep') for s in (1, 2)]))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    expected = [sample_spec(s, sp).to_dict() for sp in ("train", "deep") for s in (1, 2)]
    assert json.loads(out) == expected


# ----------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("split", SPLITS)
def test_forward_backward_reaches_every_parameter(split):
    torch.manual_seed(0)
    for seed in (0, 1):
        net = sample_net(seed, split).train()
        logits = net(torch.randn(2, 3, 32, 32))
        assert logits.shape == (2, 10)
        assert torch.isfinite(logits).all()
        logits.square().mean().backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None]
        assert missing == []
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("split", SPLITS)
def test_forward_on_meta_device(split):
    for seed in (2, 3):
        net = sample_net(seed, split).to("meta")
        out = net(torch.empty(2, 3, 32, 32, device="meta"))
        assert out.device.type == "meta"
        assert out.shape == (2, 10)


def test_other_input_sizes_and_channels():
    """Odd spatial sizes after reductions (28 -> 14 -> 7) and 1-channel input must work."""
    torch.manual_seed(0)
    for seed in range(3):
        net = build_net(sample_spec(seed, "train"), num_classes=5, in_chans=1).eval()
        with torch.no_grad():
            assert net(torch.randn(1, 1, 28, 28)).shape == (1, 5)
            assert net(torch.randn(1, 1, 15, 15)).shape == (1, 5)


def test_every_op_builds_and_runs_in_normal_and_reduction_cells():
    torch.manual_seed(0)
    for op in OPS[1:]:
        cell = CellSpec(nodes=(((op, 0), ("conv_1x1", 1)), ((op, 2),)), concat=(2, 3))
        spec = NetSpec(normal=cell, reduce=cell, num_cells=3, channels=16)
        net = build_net(spec)
        out = net(torch.randn(2, 3, 17, 17))
        assert out.shape == (2, 10)
        out.sum().backward()
        assert all(p.grad is not None for p in net.parameters()), op


# ----------------------------------------------------------------------------- structure


def test_op_coverage_over_train_specs():
    seen: set[str] = set()
    for seed in range(200):
        spec = sample_spec(seed, "train")
        for cell in (spec.normal, spec.reduce):
            seen.update(op for edges in cell.nodes for op, _ in edges)
    assert seen == set(OPS)


def test_sampled_cells_are_well_formed():
    for split in SPLITS:
        for seed in range(30):
            spec = sample_spec(seed, split)
            for cell in (spec.normal, spec.reduce):
                real_srcs = {j for edges in cell.nodes for op, j in edges if op != "none"}
                assert {0, 1} <= real_srcs  # both cell inputs are used
                for i, edges in enumerate(cell.nodes):
                    assert any(op != "none" for op, _ in edges)
                    assert all(0 <= j < 2 + i for _, j in edges)
                    assert 1 <= len(edges) <= 4
                # every intermediate node is either consumed or concatenated (no dead nodes)
                for s in range(2, 2 + cell.num_nodes):
                    assert s in real_srcs or s in cell.concat


def test_none_edges_build_no_module():
    spec = next(
        s
        for s in (sample_spec(i, "train") for i in range(100))
        if any(op == "none" for edges in s.normal.nodes for op, _ in edges)
    )
    net = _meta_net(spec)
    normal_idx = next(i for i in range(spec.num_cells) if i not in spec.reduction_cells)
    real = sum(op != "none" for edges in spec.normal.nodes for op, _ in edges)
    assert len(net.cells[normal_idx].ops) == real


def test_reduction_cells_at_thirds_double_channels():
    spec = sample_spec(4, "train")
    n = spec.num_cells
    assert spec.reduction_cells == (n // 3, 2 * n // 3)
    net = sample_net(4, "train").eval()
    sizes = []
    hooks = [c.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[2:]))) for c in net.cells]
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    expected, hw = [], 32
    for i in range(n):
        hw = hw // 2 if i in spec.reduction_cells else hw
        expected.append((hw, hw))
    assert sizes == expected


def test_bnfree_has_no_batchnorm_but_train_does():
    for seed in range(5):
        bnfree = _meta_net(sample_spec(seed, "bnfree"))
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in bnfree.modules())
        assert sample_spec(seed, "bnfree").norm == "none"
        train = _meta_net(sample_spec(seed, "train"))
        assert any(isinstance(m, nn.BatchNorm2d) for m in train.modules())


def test_deep_wide_dense_differ_from_train():
    seeds = range(40)
    train = [sample_spec(s, "train") for s in seeds]
    deep = [sample_spec(s, "deep") for s in seeds]
    wide = [sample_spec(s, "wide") for s in seeds]
    dense = [sample_spec(s, "dense") for s in seeds]
    assert max(s.num_cells for s in train) <= 18
    assert max(s.num_cells for s in deep) > 18
    assert min(s.num_cells for s in deep) >= 10
    assert statistics.mean(s.channels for s in wide) > 2 * statistics.mean(s.channels for s in train)
    assert max(s.channels for s in wide) > max(s.channels for s in train)
    assert max(s.normal.num_nodes for s in train) <= 5
    assert max(max(s.normal.num_nodes, s.reduce.num_nodes) for s in dense) > 5


# ----------------------------------------------------------------------------- budget


def test_param_cap_holds_for_train_split():
    for seed in range(50):
        spec = sample_spec(seed, "train")
        n = sum(p.numel() for p in _meta_net(spec).parameters())
        assert n <= 3_000_000, (seed, n)
        assert count_params(spec) == n  # the analytic count used by the sampler is exact


@pytest.mark.parametrize("split", SPLITS)
def test_analytic_param_count_is_exact(split):
    for seed in range(8):
        spec = sample_spec(seed, split)
        for nc, ic in ((10, 3), (100, 1)):
            assert count_params(spec, nc, ic) == sum(
                p.numel() for p in _meta_net(spec, num_classes=nc, in_chans=ic).parameters()
            )


def test_wide_nets_stay_under_their_budget():
    assert all(count_params(sample_spec(s, "wide")) <= 10_000_000 for s in range(20))


# ----------------------------------------------------------------------------- validation


def test_invalid_specs_are_rejected():
    with pytest.raises(ValueError):
        CellSpec(nodes=((("none", 0),),), concat=(2,))  # no real op
    with pytest.raises(ValueError):
        CellSpec(nodes=((("conv_3x3", 2),),), concat=(2,))  # reads itself
    with pytest.raises(ValueError):
        CellSpec(nodes=((("bogus", 0),),), concat=(2,))
    with pytest.raises(ValueError):
        CellSpec(nodes=((("conv_3x3", 0),),), concat=(1,))  # concat of a cell input
    cell = CellSpec(nodes=((("conv_3x3", 0), ("skip_connect", 1)),), concat=(2,))
    with pytest.raises(ValueError):
        NetSpec(normal=cell, reduce=cell, num_cells=4, channels=16, norm="ln")
    with pytest.raises(ValueError):
        sample_spec(0, "nope")
