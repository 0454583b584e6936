"""Architectures to meta-train on: DeepNets-1M-style cells and randomized real timm families.

Every architecture is named by ``(family, split, seed)`` and rebuilt identically from it, so a
run's sampling is reproducible and checkpointable. timm families are built through timm's own
classes with randomized depth, width, block and patch settings, sized for 32x32 inputs, so the
GHN sees the op patterns of the models users ask about:

- ``resnet``: ResNet with basic or bottleneck blocks, ResNeXt grouped bottlenecks, deep stems;
- ``vit``, ``convnext``: plain ViTs and ConvNeXts with random depth, width, patch and kernel;
- ``efficientnet``: EfficientNet/MnasNet/MixNet-like MBConv, fused-MBConv and depthwise stacks;
- ``mobilenet``: MobileNetV3-like (hard-swish, hard-sigmoid SE) and MobileNetV4-like
  (universal inverted residual) stacks in timm's ``MobileNetV3`` class;
- ``regnet``: RegNet-X/Y/V/Z-like ``RegNetCfg`` draws;
- ``swin``: Swin transformers with per-stage windows that tile the 32x32 feature maps;
- ``mixer``: MLP-Mixer, gMixer (GLU), ResMLP and gMLP blocks in timm's ``MlpMixer``, with 4x4 to
  16x16 patches (64 to 4 tokens: ``mixer_s16_224`` at 32x32 has 4) and widths up to 512.

The families added after resnet/vit/convnext are capped at ``MAX_PARAMS`` parameters. All
buffers are BatchNorm statistics, except Swin's ``relative_position_index`` and ``attn_mask``,
which timm recomputes with each module's ``init_non_persistent_buffers()`` after ``to_empty``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import nn

from . import deepnets

__all__ = ["FAMILIES", "MAX_PARAMS", "ArchitectureSampler", "build_architecture"]

#: Parameter cap (classifier excluded) of the capped families; an over-budget draw is redrawn.
MAX_PARAMS = 3_000_000
_MAX_DRAWS = 50
#: EfficientNet-B0's stage widths, the template that width multipliers scale.
_B0_CHANNELS = (16, 24, 40, 80, 112, 192, 320)
#: MobileNetV3-Large's stage widths.
_MNV3_CHANNELS = (16, 24, 40, 80, 112, 160)


def _rng(family: str, split: str, seed: int) -> random.Random:
    # str seeds are hashed with SHA-512 by `random`, identically in every process
    return random.Random(f"{family}:{split}:{seed}")


def _resnet(rng: random.Random, num_classes: int) -> nn.Module:
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    bottleneck = rng.random() < 0.3
    base = rng.choice((16, 24, 32) if bottleneck else (16, 32, 48, 64))
    stem = rng.choice(("", "", "deep"))
    layers = tuple(rng.randint(1, 3) for _ in range(4))
    # drawn last so that the draws made before ResNeXt was added are unchanged; timm's
    # BasicBlock has no groups, so only bottleneck nets become ResNeXts
    cardinality, base_width = rng.choice(((1, 64), (2, 32), (4, 16), (8, 8)))
    return ResNet(
        block=Bottleneck if bottleneck else BasicBlock,
        layers=layers,
        channels=tuple(base * 2**i for i in range(4)),
        stem_width=max(base, 32) if stem == "deep" else 64,
        stem_type=stem,
        cardinality=cardinality if bottleneck else 1,
        base_width=base_width if bottleneck else 64,
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


def _strides(rng: random.Random, num_stages: int) -> list[int]:
    """2 to 4 stride-2 stages after the stride-2 stem: the last feature map is 4x4, 2x2 or 1x1."""
    down = rng.sample(range(1, num_stages), min(num_stages - 1, rng.randint(2, 4)))
    return [2 if i in down else 1 for i in range(num_stages)]


def _efficientnet(rng: random.Random, num_classes: int) -> nn.Module:
    from timm.layers import get_act_layer
    from timm.models._efficientnet_builder import decode_arch_def, round_channels
    from timm.models.efficientnet import EfficientNet

    num_stages = rng.randint(4, 7)
    se = "_se0.25" if rng.random() < 0.6 else ""
    kernels = ("3", "5", "3.5", "3.5.7") if rng.random() < 0.2 else ("3", "5")  # MixNet's mixed kernels
    fused = rng.randint(0, 2)  # leading fused-MBConv stages, as in EfficientNetV2
    arch = []
    for i, (chs, stride) in enumerate(zip(_B0_CHANNELS, _strides(rng, num_stages))):
        repeats, exp = rng.randint(1, 3), rng.choice((3, 4, 6, 6))
        if i == 0:
            block = f"ds_r1_k{rng.choice(kernels)}_s{stride}_c{chs}{se}"
        elif i <= fused:
            block = f"er_r{repeats}_k3_s{stride}_e{exp}_c{chs}"
        else:
            block = f"ir_r{repeats}_k{rng.choice(kernels)}_s{stride}_e{exp}_c{chs}{se}"
        arch.append([block])
    round_chs = partial(round_channels, multiplier=rng.choice((0.25, 0.35, 0.5, 0.75, 1.0)))
    return EfficientNet(
        block_args=decode_arch_def(arch, depth_multiplier=rng.choice((0.5, 0.75, 1.0, 1.25))),
        num_features=round_chs(rng.choice((640, 960, 1280))),
        stem_size=32,
        round_chs_fn=round_chs,
        act_layer=get_act_layer(rng.choice(("swish", "swish", "relu", "relu6", "hard_swish", "mish"))),
        num_classes=num_classes,
    )


def _mobilenet(rng: random.Random, num_classes: int) -> nn.Module:
    from timm.layers import get_act_layer
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models._efficientnet_builder import decode_arch_def, round_channels
    from timm.models.mobilenetv3 import MobileNetV3

    v4 = rng.random() < 0.4
    num_stages = rng.randint(4, 6)
    arch = []
    for i, (chs, stride) in enumerate(zip(_MNV3_CHANNELS, _strides(rng, num_stages))):
        repeats, exp = rng.randint(1, 3), rng.choice((2, 3, 4, 6))
        if v4 and i == 0:
            block = f"cn_r1_k3_s{stride}_c{chs}"
        elif v4 and i == 1:
            block = f"er_r1_k3_s{stride}_e{exp}_c{chs}"
        elif v4:
            # start/middle depthwise kernels: ExtraDW (both), IB (middle), ConvNeXt-like (start), FFN (none)
            start, mid = rng.choice((0, 3, 5)), rng.choice((0, 3, 5))
            start = start or (3 if stride == 2 and not mid else 0)
            block = f"uir_r{repeats}_a{start}_k{mid}_s{stride}_e{exp}_c{chs}"
        else:
            act = "_nre" if i < num_stages // 2 else ""  # ReLU early, hard-swish late, as in MobileNetV3
            se = "_se0.25" if rng.random() < 0.5 else ""
            kind = f"ds_r1_k3_s{stride}_e1" if i == 0 else f"ir_r{repeats}_k{rng.choice((3, 5))}_s{stride}_e{exp}"
            block = f"{kind}_c{chs}{se}{act}"
        arch.append([block])
    arch.append([f"cn_r1_k1_s1_c{6 * _MNV3_CHANNELS[num_stages - 1]}"])
    round_chs = partial(round_channels, multiplier=rng.choice((0.5, 0.75, 1.0)))
    depth = rng.choice((0.5, 1.0, 1.5))
    return MobileNetV3(
        block_args=decode_arch_def(arch, depth_multiplier=depth, fix_first_last=True),
        num_features=rng.choice((512, 1024, 1280)),
        head_bias=not v4,
        head_norm=v4,
        round_chs_fn=round_chs,
        act_layer=get_act_layer("relu" if v4 else "hard_swish"),
        se_layer=partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU,
                         rd_round_fn=round_channels),
        num_classes=num_classes,
    )


def _regnet(rng: random.Random, num_classes: int) -> nn.Module:
    from timm.models.regnet import RegNet, RegNetCfg, generate_regnet

    z = rng.random() < 0.2  # RegNet-Z: inverted bottlenecks, linear outputs, no shortcut projections
    group_size = rng.choice((4, 8) if z else (8, 16, 24))
    while True:  # timm's RegNet has exactly 4 stages: aim the last block's width at w0 * wm**3
        depth, w0, wm = rng.randint(6, 14), rng.choice((16, 24, 32)), round(rng.uniform(2.0, 2.6), 2)
        wa = round(w0 * (wm ** rng.uniform(2.5, 3.1) - 1) / (depth - 1), 2)
        if generate_regnet(wa, w0, wm, depth, group_size)[1] == 4:
            break
    cfg = RegNetCfg(
        depth=depth,
        w0=w0,
        wa=wa,
        wm=wm,
        group_size=group_size,
        bottle_ratio=4.0 if z else 1.0,
        se_ratio=rng.choice((0.0, 0.25)),
        stem_width=rng.choice((16, 32)),
        downsample=None if z else rng.choice(("conv1x1", "avg")),
        linear_out=z,
        preact=not z and rng.random() < 0.25,  # RegNet-V
        num_features=rng.choice((0, 512)) if z else 0,
        act_layer=rng.choice(("relu", "silu")),
    )
    return RegNet(cfg, num_classes=num_classes)


def _swin(rng: random.Random, num_classes: int) -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    patch = rng.choice((2, 4))
    num_stages = rng.randint(2, 4)
    head_dim = rng.choice((16, 32))
    embed = rng.choice([d for d in (32, 48, 64, 96) if d % head_dim == 0 and d << (num_stages - 1) <= 256])
    dims = tuple(embed << i for i in range(num_stages))
    grids = [32 // patch >> i for i in range(num_stages)]
    # windows that tile each stage's grid; a window as large as the grid is global attention, unshifted
    windows = tuple(rng.choice([w for w in (2, 4, 8) if w <= g] or [g]) for g in grids)
    return SwinTransformer(
        img_size=32,
        patch_size=patch,
        embed_dim=embed,
        depths=tuple(rng.randint(1, 3) for _ in range(num_stages)),
        num_heads=tuple(d // head_dim for d in dims),
        window_size=windows,
        mlp_ratio=rng.choice((2.0, 3.0, 4.0)),
        drop_path_rate=0.0,
        num_classes=num_classes,
    )


def _mixer(rng: random.Random, num_classes: int) -> nn.Module:
    from timm.layers import GatedMlp, GluMlp, Mlp
    from timm.models.mlp_mixer import Affine, MixerBlock, MlpMixer, ResBlock, SpatialGatingBlock

    kind = rng.choice(("mixer", "mixer", "gmixer", "resmlp", "gmlp"))
    blocks = {
        "mixer": dict(block_layer=MixerBlock, mlp_layer=Mlp,
                      mlp_ratio=(rng.choice((0.5, 1.0)), rng.choice((2.0, 4.0)))),
        "gmixer": dict(block_layer=MixerBlock, mlp_layer=GluMlp, mlp_ratio=(1.0, 4.0), act_layer=nn.SiLU),
        "resmlp": dict(block_layer=ResBlock, norm_layer=Affine, mlp_ratio=rng.choice((2.0, 4.0))),
        "gmlp": dict(block_layer=SpatialGatingBlock, mlp_layer=GatedMlp, mlp_ratio=rng.choice((4.0, 6.0))),
    }
    return MlpMixer(
        img_size=32,
        patch_size=rng.choice((4, 8, 16)),
        embed_dim=rng.choice((64, 96, 128, 192, 256, 384, 512)),
        num_blocks=rng.randint(2, 8),
        num_classes=num_classes,
        **blocks[kind],
    )


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet": _resnet, "vit": _vit, "convnext": _convnext, "efficientnet": _efficientnet,
    "mobilenet": _mobilenet, "regnet": _regnet, "swin": _swin, "mixer": _mixer,
}
#: resnet, vit and convnext predate the cap and keep their original (sometimes larger) draws.
_CAPPED = frozenset({"efficientnet", "mobilenet", "regnet", "swin", "mixer"})
FAMILIES: tuple[str, ...] = ("deepnets", *_BUILDERS)


def _body_params(model: nn.Module) -> int:
    """Parameters outside the classifier, so the cap picks the same architecture for any class count."""
    head = {id(p) for p in model.get_classifier().parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in head)


def build_architecture(family: str, seed: int, split: str = "train", num_classes: int = 10) -> nn.Module:
    """The architecture ``(family, split, seed)``, freshly initialized on the current device, in train mode.

    Capped families redraw from the same random stream until the body fits ``MAX_PARAMS``.
    """
    if family == "deepnets":
        return deepnets.sample_net(seed, split="train" if split == "train" else "id", num_classes=num_classes)
    if family not in _BUILDERS:
        raise ValueError(f"unknown architecture family {family!r}; choose from {FAMILIES}")
    rng = _rng(family, split, seed)
    for _ in range(_MAX_DRAWS):
        model = _BUILDERS[family](rng, num_classes)
        if family not in _CAPPED or _body_params(model) <= MAX_PARAMS:
            return model.train()
    raise RuntimeError(f"{family}/{split}/{seed}: no draw under {MAX_PARAMS:,} parameters in {_MAX_DRAWS} tries")


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
