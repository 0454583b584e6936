"""Tests for the randomized timm architecture families (train_ghn.samplers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ghn_init
from train_ghn.samplers import FAMILIES, MAX_PARAMS, ArchitectureSampler, build_architecture
from train_ghn.trainer import _materialize

TIMM_FAMILIES = tuple(f for f in FAMILIES if f != "deepnets")
CAPPED = ("efficientnet", "mobilenet", "regnet", "swin", "mixer")
_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _meta(family: str, seed: int, split: str = "train") -> nn.Module:
    with torch.device("meta"):
        return build_architecture(family, seed, split=split)


def _signature(family: str, seed: int, split: str = "train") -> str:
    return ghn_init.build_graph(_meta(family, seed, split), (3, 32, 32)).signature()


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_builds_and_classifies_32x32(family):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for split, seed in (("train", 0), ("train", 1), ("val", 0), ("test", 7)):
        model = build_architecture(family, seed, split=split)
        assert model.training
        with torch.no_grad():
            logits = model(x)
        assert logits.shape == (2, 10), (family, split, seed)
        assert torch.isfinite(logits).all(), (family, split, seed)


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_deterministic_per_seed_and_graph_builds_on_meta(family):
    assert _signature(family, 3) == _signature(family, 3)
    signatures = {_signature(family, seed) for seed in range(5)}
    assert len(signatures) >= 4, family
    assert _signature(family, 3, "train") != _signature(family, 3, "val")


@pytest.mark.parametrize("family", CAPPED)
def test_parameter_budget(family):
    counts = []
    for seed in range(12):
        model = _meta(family, seed)
        body = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.get_classifier().parameters())
        assert 20_000 <= body <= MAX_PARAMS, (family, seed, body)
        counts.append(body)
    assert sorted(counts)[len(counts) // 2] < 1_000_000, family  # most nets are small


@pytest.mark.parametrize("family", TIMM_FAMILIES)
def test_meta_build_materializes_to_the_same_function(family):
    """Only norm statistics and timm's recomputable constants (Swin) are buffers; refilled, they match a real build."""
    torch.manual_seed(0)
    real = build_architecture(family, 2).eval()
    meta = _materialize(_meta(family, 2), torch.device("cpu")).eval()
    meta.load_state_dict(real.state_dict())
    for (name, a), b in zip(real.named_buffers(), meta.buffers()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(meta(x), real(x))


def test_only_swin_has_buffers_besides_norm_statistics():
    for family in TIMM_FAMILIES:
        for seed in range(3):
            extra = [n for n, _ in _meta(family, seed).named_buffers() if not n.endswith(_NORM_STATS)]
            assert not extra or family == "swin", (family, seed, extra)


def test_families_cover_their_variants():
    """The draws reach the block kinds each family promises (timm classes, not name heuristics)."""
    wanted = {
        "resnet": {"Bottleneck", "BasicBlock"},
        "efficientnet": {"DepthwiseSeparableConv", "InvertedResidual", "EdgeResidual", "MixedConv2d", "SqueezeExcite"},
        "mobilenet": {"UniversalInvertedResidual", "InvertedResidual", "EdgeResidual", "SqueezeExcite"},
        "regnet": {"Bottleneck", "PreBottleneck", "SEModule"},
        "swin": {"SwinTransformerBlock", "PatchMerging"},
        "mixer": {"MixerBlock", "ResBlock", "SpatialGatingBlock", "GluMlp"},
    }
    for family, kinds in wanted.items():
        seen = {type(m).__name__ for seed in range(12) for m in _meta(family, seed).modules()}
        assert kinds <= seen, (family, kinds - seen)
    grouped = [m for seed in range(12) for m in _meta("resnet", seed).modules()
               if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert grouped, "no ResNeXt among 12 resnet draws"


def test_mixer_draws_cover_the_token_counts_of_timm_mixers():
    """mixer_s16_224 at 32x32 mixes 4 tokens of width 512: the draws must reach both ends."""
    stems = [_meta("mixer", seed).stem.proj for seed in range(24)]
    assert {conv.kernel_size[0] for conv in stems} == {4, 8, 16}
    assert max(conv.out_channels for conv in stems) >= 384


def test_swin_windows_tile_every_stage():
    for seed in range(8):
        model = _meta("swin", seed)
        for block in (m for m in model.modules() if type(m).__name__ == "SwinTransformerBlock"):
            h, w = block.input_resolution
            assert h % block.window_size[0] == 0 and w % block.window_size[1] == 0, (seed, h, block.window_size)


def test_sampler_draws_new_families():
    sampler = ArchitectureSampler({"swin": 1.0, "mixer": 1.0, "regnet": 2.0}, pool_size=5, seed=0)
    drawn = sampler.draw(200)
    assert {f for f, _ in drawn} == {"swin", "mixer", "regnet"}
    assert all(0 <= s < 5 for _, s in drawn)
    with pytest.raises(ValueError, match="unknown families"):
        ArchitectureSampler({"densenet": 1.0}, pool_size=5, seed=0)
    with pytest.raises(ValueError, match="unknown architecture family"):
        build_architecture("densenet", 0)
