"""DeepNets-1M-style architecture generator (after GHN-2, Knyazev et al., NeurIPS 2021).

A network is a stack of DARTS-like cells.  Each cell reads the outputs of the two previous cells,
computes a few intermediate nodes (each node sums one or more ops applied to earlier states) and
concatenates some of them.  Reduction cells sit at 1/3 and 2/3 of the depth, double the channel
count and halve the resolution.

Sampling is a pure function of ``(seed, split)``: every split owns a private ``random.Random``
seeded with an integer derived from the split name (``zlib.crc32``, not the per-process salted
``hash``) and the seed, so specs and the resulting parameter names/shapes are reproducible across
processes and machines.  Only ``torch`` and the standard library are used.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "OPS",
    "SPLITS",
    "CellSpec",
    "DeepNet",
    "NetSpec",
    "build_net",
    "count_params",
    "make_op",
    "sample_net",
    "sample_spec",
]

OPS: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
    "conv_1x1",
    "conv_7x1_1x7",
    "conv_3x3",
    "conv_5x5",
    "conv_7x7",
    "msa",
    "cse",
)
SPLITS: tuple[str, ...] = ("train", "id", "wide", "deep", "dense", "bnfree")
NORMS: tuple[str, ...] = ("bn", "none")
NUM_STEM_TYPES = 2
REAL_OPS: tuple[str, ...] = tuple(op for op in OPS if op != "none")

# Reference input used for the parameter cap (CIFAR-10).
_REF_NUM_CLASSES = 10
_REF_IN_CHANS = 3
_CHANNEL_GRANULE = 8  # channels stay multiples of 8 so attention heads always divide them


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellSpec:
    """A DARTS-like genotype.

    ``nodes[i]`` lists the ``(op, input_index)`` edges summed by intermediate node ``i``.  Input
    indices address the cell's states: 0 and 1 are the two cell inputs (outputs of cells k-2 and
    k-1), ``2 + j`` is intermediate node ``j`` (so node ``i`` may only read indices ``< 2 + i``).
    ``concat`` lists the state indices (all ``>= 2``) concatenated to form the cell output.
    """

    nodes: tuple[tuple[tuple[str, int], ...], ...]
    concat: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a cell needs at least one intermediate node")
        for i, edges in enumerate(self.nodes):
            if not any(op != "none" for op, _ in edges):
                raise ValueError(f"node {i} has no real op (all 'none' or empty)")
            for op, j in edges:
                if op not in OPS:
                    raise ValueError(f"unknown op {op!r}")
                if not 0 <= j < 2 + i:
                    raise ValueError(f"node {i} reads state {j}, which is not computed yet")
        if not self.concat:
            raise ValueError("concat must not be empty")
        for j in self.concat:
            if not 2 <= j < 2 + len(self.nodes):
                raise ValueError(f"concat index {j} is not an intermediate node")

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [[[op, j] for op, j in edges] for edges in self.nodes],
            "concat": list(self.concat),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellSpec:
        nodes = tuple(tuple((str(op), int(j)) for op, j in edges) for edges in d["nodes"])
        return cls(nodes=nodes, concat=tuple(int(j) for j in d["concat"]))


@dataclass(frozen=True)
class NetSpec:
    """Everything needed to rebuild a network: two cell genotypes plus macro settings."""

    normal: CellSpec
    reduce: CellSpec
    num_cells: int
    channels: int
    stem_type: int = 0
    norm: str = "bn"
    head_relu: bool = True
    split: str = "train"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_cells < 1:
            raise ValueError("num_cells must be >= 1")
        if self.channels < 1:
            raise ValueError("channels must be >= 1")
        if self.stem_type not in range(NUM_STEM_TYPES):
            raise ValueError(f"stem_type must be in 0..{NUM_STEM_TYPES - 1}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}")

    @property
    def reduction_cells(self) -> tuple[int, ...]:
        """Cell indices that halve the resolution (1/3 and 2/3 of the depth)."""
        n = self.num_cells
        return tuple(sorted({n // 3, 2 * n // 3})) if n >= 3 else ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "normal": self.normal.to_dict(),
            "reduce": self.reduce.to_dict(),
            "num_cells": self.num_cells,
            "channels": self.channels,
            "stem_type": self.stem_type,
            "norm": self.norm,
            "head_relu": self.head_relu,
            "split": self.split,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetSpec:
        return cls(
            normal=CellSpec.from_dict(d["normal"]),
            reduce=CellSpec.from_dict(d["reduce"]),
            num_cells=int(d["num_cells"]),
            channels=int(d["channels"]),
            stem_type=int(d.get("stem_type", 0)),
            norm=str(d.get("norm", "bn")),
            head_relu=bool(d.get("head_relu", True)),
            split=str(d.get("split", "train")),
            seed=int(d.get("seed", 0)),
        )


# --------------------------------------------------------------------------------------------------
# Operations (all C -> C channels; stride 2 halves the resolution as ceil(n / 2))
# --------------------------------------------------------------------------------------------------


def _norm(c: int, norm: str) -> list[nn.Module]:
    """BatchNorm or nothing at all (no Identity, so BN-free graphs carry no dummy nodes)."""
    return [nn.BatchNorm2d(c)] if norm == "bn" else []


def _bias(norm: str) -> bool:
    """Convs followed by BN need no bias; without BN the bias is the only shift left."""
    return norm != "bn"


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset strided 1x1 convs (DARTS), padded so odd sizes work."""

    def __init__(self, c_in: int, c_out: int, norm: str) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=_bias(norm))
        self.conv_2 = nn.Conv2d(c_in, c_out - c_out // 2, 1, stride=2, bias=_bias(norm))
        self.norm = nn.Sequential(*_norm(c_out, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.norm(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


def _relu_conv_norm(c_in: int, c_out: int, k: int, stride: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=_bias(norm)),
        *_norm(c_out, norm),
    )


def _dil_conv(c: int, k: int, stride: int, dilation: int, norm: str) -> list[nn.Module]:
    pad = dilation * (k - 1) // 2
    return [
        nn.ReLU(),
        nn.Conv2d(c, c, k, stride=stride, padding=pad, dilation=dilation, groups=c, bias=False),
        nn.Conv2d(c, c, 1, bias=_bias(norm)),
        *_norm(c, norm),
    ]


def _sep_conv(c: int, k: int, stride: int, norm: str) -> nn.Sequential:
    """DARTS separable conv: the depthwise-pointwise block applied twice."""
    return nn.Sequential(*_dil_conv(c, k, stride, 1, norm), *_dil_conv(c, k, 1, 1, norm))


def _conv_7x1_1x7(c: int, stride: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(c, c, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
        nn.Conv2d(c, c, (7, 1), stride=(stride, 1), padding=(3, 0), bias=_bias(norm)),
        *_norm(c, norm),
    )


def _num_heads(c: int) -> int:
    """Most heads (up to 8) that divide ``c`` while keeping head_dim >= 8."""
    for h in (8, 4, 2):
        if c % h == 0 and c // h >= 8:
            return h
    return 1


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over the HxW positions (pre-LayerNorm, no residual: it is an edge)."""

    def __init__(self, c: int, stride: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(c, c, 1, stride=2) if stride == 2 else None
        self.num_heads = _num_heads(c)
        self.norm = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down is not None:
            x = self.down(x)
        b, c, h, w = x.shape
        n, heads = h * w, self.num_heads
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        qkv = self.qkv(self.norm(tokens)).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out).transpose(1, 2).reshape(b, c, h, w)


class ChannelSE(nn.Module):
    """Channel squeeze-excitation: rescale channels by a gate computed from their global means."""

    def __init__(self, c: int, stride: int) -> None:
        super().__init__()
        hidden = max(_CHANNEL_GRANULE, c // 4)
        self.down = nn.Conv2d(c, c, 1, stride=2) if stride == 2 else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, c, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down is not None:
            x = self.down(x)
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


def make_op(op: str, c: int, stride: int, norm: str) -> nn.Module:
    """Instantiate one (non-"none") edge op mapping C channels to C channels."""
    if op == "max_pool_3x3":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    if op == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    if op == "skip_connect":
        return nn.Identity() if stride == 1 else FactorizedReduce(c, c, norm)
    if op.startswith("sep_conv_"):
        return _sep_conv(c, int(op[-1]), stride, norm)
    if op.startswith("dil_conv_"):
        return nn.Sequential(*_dil_conv(c, int(op[-1]), stride, 2, norm))
    if op == "conv_7x1_1x7":
        return _conv_7x1_1x7(c, stride, norm)
    if op in ("conv_1x1", "conv_3x3", "conv_5x5", "conv_7x7"):
        return _relu_conv_norm(c, c, int(op[-1]), stride, norm)
    if op == "msa":
        return SpatialSelfAttention(c, stride)
    if op == "cse":
        return ChannelSE(c, stride)
    raise ValueError(f"cannot build op {op!r}")


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------


class Cell(nn.Module):
    """One DARTS-like cell; "none" edges are dropped so they own no module and add nothing."""

    def __init__(
        self, spec: CellSpec, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool, norm: str
    ) -> None:
        super().__init__()
        self.preprocess0 = (
            FactorizedReduce(c_pp, c, norm) if reduction_prev else _relu_conv_norm(c_pp, c, 1, 1, norm)
        )
        self.preprocess1 = _relu_conv_norm(c_p, c, 1, 1, norm)
        self.ops = nn.ModuleList()
        self._inputs: list[list[int]] = []
        for edges in spec.nodes:
            node_inputs = []
            for op, j in edges:
                if op == "none":
                    continue
                stride = 2 if reduction and j < 2 else 1
                self.ops.append(make_op(op, c, stride, norm))
                node_inputs.append(j)
            self._inputs.append(node_inputs)
        self._concat = list(spec.concat)
        self.out_channels = c * len(self._concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        k = 0
        for node_inputs in self._inputs:
            total: torch.Tensor | None = None
            for j in node_inputs:
                out = self.ops[k](states[j])
                k += 1
                total = out if total is None else total + out
            assert total is not None  # guaranteed by CellSpec validation
            states.append(total)
        return torch.cat([states[j] for j in self._concat], dim=1)


class DeepNet(nn.Module):
    """Stem -> cells -> (ReLU) -> global average pool -> Linear."""

    def __init__(self, spec: NetSpec, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.spec = spec
        c, norm = spec.channels, spec.norm
        if spec.stem_type == 0:  # DARTS CIFAR stem: one wide 3x3 conv
            c_stem = 3 * c
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, c_stem, 3, padding=1, bias=_bias(norm)), *_norm(c_stem, norm)
            )
        else:  # two narrower 3x3 convs
            c_stem = c
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, c, 3, padding=1, bias=_bias(norm)),
                *_norm(c, norm),
                nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=1, bias=_bias(norm)),
                *_norm(c, norm),
            )
        reductions = set(spec.reduction_cells)
        c_pp = c_p = c_stem
        c_cur, reduction_prev = c, False
        self.cells = nn.ModuleList()
        for i in range(spec.num_cells):
            reduction = i in reductions
            if reduction:
                c_cur *= 2
            cell = Cell(
                spec.reduce if reduction else spec.normal, c_pp, c_p, c_cur, reduction, reduction_prev, norm
            )
            self.cells.append(cell)
            c_pp, c_p, reduction_prev = c_p, cell.out_channels, reduction
        self.head_act = nn.ReLU() if spec.head_relu else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(self.pool(self.head_act(s1)).flatten(1))


def build_net(spec: NetSpec, num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """Instantiate the network described by ``spec`` (torch default init)."""
    return DeepNet(spec, num_classes=num_classes, in_chans=in_chans)


def _op_params(op: str, c: int, stride: int, norm: str) -> int:
    """Parameters of ``make_op(op, c, stride, norm)``, computed without building it."""
    bias = c if _bias(norm) else 0
    bn = 2 * c if norm == "bn" else 0
    down = c * c + c if stride == 2 else 0
    if op in ("none", "max_pool_3x3", "avg_pool_3x3"):
        return 0
    if op == "skip_connect":
        return 0 if stride == 1 else _fr_params(c, c, norm)
    if op.startswith(("sep_conv_", "dil_conv_")):
        k = int(op[-1])
        block = c * k * k + c * c + bias + bn
        return 2 * block if op.startswith("sep") else block
    if op == "conv_7x1_1x7":
        return 14 * c * c + bias + bn
    if op.startswith("conv_"):
        return int(op[-1]) ** 2 * c * c + bias + bn
    if op == "msa":
        return down + 2 * c + (3 * c * c + 3 * c) + (c * c + c)
    if op == "cse":
        hidden = max(_CHANNEL_GRANULE, c // 4)
        return down + (c * hidden + hidden) + (hidden * c + c)
    raise ValueError(f"unknown op {op!r}")


def _fr_params(c_in: int, c_out: int, norm: str) -> int:
    """A (c_in -> c_out) conv + norm: covers 1x1 preprocessing, FactorizedReduce and (c_in*k*k) stems."""
    return c_in * c_out + (c_out if _bias(norm) else 0) + (2 * c_out if norm == "bn" else 0)


def count_params(spec: NetSpec, num_classes: int = _REF_NUM_CLASSES, in_chans: int = _REF_IN_CHANS) -> int:
    """Exact parameter count of ``build_net(spec, ...)``, computed analytically (microseconds).

    Mirrors the module constructors above; the tests check it against real builds.
    """
    c, norm = spec.channels, spec.norm
    if spec.stem_type == 0:
        c_stem = 3 * c
        total = _fr_params(in_chans * 9, c_stem, norm)
    else:
        c_stem = c
        total = _fr_params(in_chans * 9, c, norm) + _fr_params(c * 9, c, norm)
    reductions = set(spec.reduction_cells)
    c_pp = c_p = c_stem
    c_cur = c
    for i in range(spec.num_cells):
        reduction = i in reductions
        if reduction:
            c_cur *= 2
        cell = spec.reduce if reduction else spec.normal
        total += _fr_params(c_pp, c_cur, norm)  # FactorizedReduce and 1x1 ReLUConvBN count alike
        total += _fr_params(c_p, c_cur, norm)
        for edges in cell.nodes:
            for op, j in edges:
                total += _op_params(op, c_cur, 2 if reduction and j < 2 else 1, norm)
        c_pp, c_p = c_p, c_cur * len(cell.concat)
    return total + c_p * num_classes + num_classes


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SplitConfig:
    """Sampling ranges of one split (all ranges inclusive)."""

    cells: tuple[int, int]
    channels: tuple[int, ...]  # ascending grid of base widths C
    nodes: tuple[int, int]  # intermediate nodes per cell
    edges: tuple[int, int]  # summed inputs per intermediate node
    norm: str = "bn"
    max_params: int = 3_000_000
    # Last-resort shrinking order when no resampled genotype fits the budget even at the narrowest
    # grid width: "cells" drops cells (down to min_cells), "channels" narrows below the grid.
    fallback: tuple[str, ...] = ("cells", "channels")
    min_cells: int = 4


_TRAIN_CHANNELS = tuple(range(32, 129, 16))
_TRAIN = _SplitConfig(cells=(4, 18), channels=_TRAIN_CHANNELS, nodes=(2, 5), edges=(1, 4))
_SPLIT_CONFIGS: dict[str, _SplitConfig] = {
    "train": _TRAIN,
    "id": _TRAIN,
    "wide": replace(_TRAIN, channels=tuple(4 * c for c in _TRAIN_CHANNELS), max_params=10_000_000),
    "deep": replace(_TRAIN, cells=(10, 36), fallback=("channels", "cells"), min_cells=10),
    "dense": replace(_TRAIN, nodes=(2, 10)),
    "bnfree": replace(_TRAIN, norm="none"),
}
_MAX_RESAMPLES = 16


def _rng(seed: int, split: str) -> random.Random:
    """Process-independent RNG: crc32(split) in the high bits, the seed in the low 64 bits."""
    return random.Random((zlib.crc32(split.encode("utf-8")) << 64) | (seed % (1 << 64)))


def _sample_cell(rng: random.Random, cfg: _SplitConfig) -> CellSpec:
    num_nodes = rng.randint(*cfg.nodes)
    nodes: list[list[tuple[str, int]]] = []
    for i in range(num_nodes):
        num_edges = min(rng.randint(*cfg.edges), 2 + i)
        inputs = sorted(rng.sample(range(2 + i), num_edges))
        edges = [(rng.choice(OPS), j) for j in inputs]
        if all(op == "none" for op, _ in edges):
            k = rng.randrange(len(edges))
            edges[k] = (rng.choice(REAL_OPS), edges[k][1])
        nodes.append(edges)

    # Both cell inputs must feed a real op, otherwise preprocessing (and possibly whole earlier
    # cells) would be dead weight that never receives a gradient.
    for j in (0, 1):
        if any(op != "none" and src == j for edges in nodes for op, src in edges):
            continue
        edges = nodes[rng.randrange(num_nodes)]
        same = [k for k, (_, src) in enumerate(edges) if src == j]
        if same:  # an existing "none" edge from j becomes real
            edges[same[0]] = (rng.choice(REAL_OPS), j)
        elif len(edges) < cfg.edges[1]:
            edges.append((rng.choice(REAL_OPS), j))
        else:  # a full node has distinct inputs, so at least two of them are intermediate nodes
            k = rng.choice([k for k, (_, src) in enumerate(edges) if src >= 2])
            edges[k] = (rng.choice(REAL_OPS), j)
        edges.sort(key=lambda e: e[1])

    # Concatenate all intermediate nodes (DARTS) or only the loose ends (ENAS / GHN-2 style).
    used = {src for edges in nodes for op, src in edges if op != "none"}
    if rng.random() < 0.5:
        concat = tuple(range(2, 2 + num_nodes))
    else:
        concat = tuple(s for s in range(2, 2 + num_nodes) if s not in used)
    return CellSpec(nodes=tuple(tuple(e) for e in nodes), concat=concat)


def _draw(rng: random.Random, cfg: _SplitConfig, split: str, seed: int) -> NetSpec:
    num_cells = rng.randint(*cfg.cells)
    channels = rng.choice(cfg.channels)
    stem_type = rng.randrange(NUM_STEM_TYPES)
    head_relu = rng.random() < 0.5
    normal = _sample_cell(rng, cfg)
    reduce = _sample_cell(rng, cfg)
    return NetSpec(
        normal=normal,
        reduce=reduce,
        num_cells=num_cells,
        channels=channels,
        stem_type=stem_type,
        norm=cfg.norm,
        head_relu=head_relu,
        split=split,
        seed=seed,
    )


def _shrink(spec: NetSpec, cfg: _SplitConfig) -> NetSpec:
    """Last resort for a genotype too big even at the narrowest grid width (monotone, no RNG)."""
    for stage in cfg.fallback:
        while count_params(spec) > cfg.max_params:
            if stage == "cells" and spec.num_cells > cfg.min_cells:
                spec = replace(spec, num_cells=spec.num_cells - 1)
            elif stage == "channels" and spec.channels > _CHANNEL_GRANULE:
                spec = replace(spec, channels=spec.channels - _CHANNEL_GRANULE)
            else:
                break
    return spec


def sample_spec(seed: int, split: str = "train") -> NetSpec:
    """Sample one architecture of ``split``; the same ``(seed, split)`` always gives the same spec.

    Budget (``max_params`` at 32x32, 10 classes): the drawn width is lowered along the split's grid
    until the net fits; a genotype that does not fit even at the narrowest width is redrawn (so
    heavy genotypes get rarer instead of every net collapsing to the same size), and after
    ``_MAX_RESAMPLES`` draws the smallest one is shrunk deterministically.
    """
    if split not in _SPLIT_CONFIGS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    cfg = _SPLIT_CONFIGS[split]
    rng = _rng(seed, split)
    smallest: NetSpec | None = None
    for _ in range(_MAX_RESAMPLES):
        spec = _draw(rng, cfg, split, seed)
        for c in sorted((c for c in cfg.channels if c <= spec.channels), reverse=True):
            spec = replace(spec, channels=c)
            if count_params(spec) <= cfg.max_params:
                return spec
        if smallest is None or count_params(spec) < count_params(smallest):
            smallest = spec
    assert smallest is not None
    return _shrink(smallest, cfg)


def sample_net(seed: int, split: str = "train", num_classes: int = 10) -> nn.Module:
    """``build_net(sample_spec(seed, split))`` for CIFAR-sized RGB inputs."""
    return build_net(sample_spec(seed, split), num_classes=num_classes)
