"""Post-processing of predicted state dicts so that SGD can use all of a model's width.

The GHN decodes fixed-size blocks (``GHNConfig.block`` for spatial kernels, ``block_1x1`` for
linear and 1x1 layers, ``vector`` for 1-D tensors) and tiles them to the target shape, so in a layer
wider than its block, output unit ``c`` and ``c + block`` receive exactly the same weights, and the
next layer reads them through exactly the same columns. Two such units get identical gradients at
every step: SGD never separates them, and a 768-wide Swin stage trains as if it were 128 wide.
:func:`break_tiling_symmetry` adds a little independent noise to every tensor holding such copies.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch

__all__ = ["break_tiling_symmetry", "has_tiled_copies"]


def has_tiled_copies(tensor: torch.Tensor) -> bool:
    """True when two output rows, or two input columns, of a weight (2+ dims) are exactly equal."""
    if tensor.dim() < 2 or not tensor.is_floating_point():
        return False
    rows = tensor.detach().reshape(tensor.shape[0], -1)
    cols = tensor.detach().transpose(0, 1).reshape(tensor.shape[1], -1)
    return torch.unique(rows, dim=0).shape[0] < rows.shape[0] or torch.unique(cols, dim=0).shape[0] < cols.shape[0]


def break_tiling_symmetry(state: Mapping[str, torch.Tensor], sigma: float = 1.0,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """A copy of ``state`` where each weight with tiled copies gets Gaussian noise of ``sigma`` x its RMS.

    Deterministic: each tensor's noise comes from a generator seeded by ``seed`` and its name, so
    every rank and every run perturbs identically. Tensors without copies are returned unchanged.
    """
    out = dict(state)
    for name, tensor in state.items():
        if not has_tiled_copies(tensor):
            continue
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ seed)
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        rms = tensor.detach().float().pow(2).mean().sqrt()
        out[name] = (tensor.float() + sigma * rms * noise.to(tensor.device)).to(tensor.dtype)
    return out
