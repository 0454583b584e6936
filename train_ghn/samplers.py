"""Architectures to meta-train on: DeepNets-1M-style cells and randomized real timm families.

Every architecture is named by ``(family, split, seed)`` and rebuilt identically from it, so a
run's sampling is reproducible and checkpointable. timm families are built through timm's own
classes with randomized depth, width, block and patch settings, sized for 32x32 inputs, so the
GHN sees the op patterns of the models users ask about.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import torch
from torch import nn

from . import deepnets

__all__ = ["FAMILIES", "ArchitectureSampler", "build_architecture"]


def _rng(family: str, split: str, seed: int) -> random.Random:
    # str seeds are hashed with SHA-512 by `random`, identically in every process
    return random.Random(f"{family}:{split}:{seed}")


def _resnet(rng: random.Random, num_classes: int) -> nn.Module:
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    bottleneck = rng.random() < 0.3
    base = rng.choice((16, 24, 32) if bottleneck else (16, 32, 48, 64))
    stem = rng.choice(("", "", "deep"))
    return ResNet(
        block=Bottleneck if bottleneck else BasicBlock,
        layers=tuple(rng.randint(1, 3) for _ in range(4)),
        channels=tuple(base * 2**i for i in range(4)),
        stem_width=max(base, 32) if stem == "deep" else 64,
        stem_type=stem,
        num_classes=num_classes,
    )


def _vit(rng: random.Random, num_classes: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    head_dim = rng.choice((32, 64))
    heads = rng.randint(2, 6)
    class_token = rng.random() < 0.7
    return VisionTransformer(
        img_size=32,
        patch_size=rng.choice((2, 4, 4, 4, 8)),
        embed_dim=head_dim * heads,
        depth=rng.randint(2, 10),
        num_heads=heads,
        mlp_ratio=rng.choice((2.0, 3.0, 4.0)),
        class_token=class_token,
        global_pool="token" if class_token else "avg",
        num_classes=num_classes,
    )


def _convnext(rng: random.Random, num_classes: int) -> nn.Module:
    from timm.models.convnext import ConvNeXt

    base = rng.choice((24, 32, 48, 64))
    return ConvNeXt(
        depths=tuple(rng.randint(1, 3) for _ in range(4)),
        dims=tuple(base * 2**i for i in range(4)),
        patch_size=rng.choice((1, 2, 4)),
        kernel_sizes=rng.choice((3, 5, 7)),
        num_classes=num_classes,
    )


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"resnet": _resnet, "vit": _vit, "convnext": _convnext}
FAMILIES: tuple[str, ...] = ("deepnets", *_BUILDERS)


def build_architecture(family: str, seed: int, split: str = "train", num_classes: int = 10) -> nn.Module:
    """The architecture ``(family, split, seed)``, freshly initialized on the CPU, in train mode."""
    if family == "deepnets":
        return deepnets.sample_net(seed, split="train" if split == "train" else "id", num_classes=num_classes)
    if family not in _BUILDERS:
        raise ValueError(f"unknown architecture family {family!r}; choose from {FAMILIES}")
    return _BUILDERS[family](_rng(family, split, seed), num_classes)


class ArchitectureSampler:
    """Draws ``(family, seed)`` pairs: family by the mixing ratios, seed from a finite pool.

    A finite pool lets the trainer build each architecture (and its graph) once and reuse it;
    ``pool_size`` trades diversity for build time.
    """

    def __init__(self, mix: Mapping[str, float], pool_size: int, seed: int) -> None:
        unknown = set(mix) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown families in sampler mix: {sorted(unknown)}; known: {FAMILIES}")
        self.families = [f for f in FAMILIES if mix.get(f, 0) > 0]
        if not self.families:
            raise ValueError("sampler mix gives no family a positive weight")
        self.weights = torch.tensor([float(mix[f]) for f in self.families])
        self.pool_size = pool_size
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, n: int) -> list[tuple[str, int]]:
        fam = torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        seeds = torch.randint(0, self.pool_size, (n,), generator=self.generator)
        return [(self.families[f], int(s)) for f, s in zip(fam.tolist(), seeds.tolist())]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
