"""BatchNorm running statistics for predicted weights: from real images, or data-free from synthetic ones.

A GHN predicts parameters, not the running statistics that BatchNorm layers use in eval mode. Left
at identity (mean 0, variance 1), every layer passes on whatever scale its input has, and eval-mode
logits grow with depth (resnet18 at 32x32: about 3e4 on a random batch). :func:`calibrate_batchnorm`
re-estimates them from any images; :func:`calibrate_predicted` does it for a predicted state dict,
by default with :func:`synthetic_images`, so that predicted weights work in eval mode with no data.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .ghn import _one_thread

__all__ = [
    "DATA_FREE", "calibrate_batchnorm", "calibrate_predicted", "data_free_images", "has_running_stats",
    "synthetic_images",
]

logger = logging.getLogger(__name__)

#: Name and version of the data-free calibration, recorded with the statistics it makes (and part of
#: the prediction cache key): change it whenever :func:`synthetic_images` or its defaults change.
DATA_FREE = "data-free-v1"
#: Synthetic images per calibration: 64 at 32x32, fewer at larger sizes (the same pixel budget, at
#: least 8 images), so that calibrating a 224x224 ResNet-50 costs seconds, not minutes.
_PIXEL_BUDGET = 64 * 32 * 32
_MIN_IMAGES = 8
_BATCH_SIZE = 64
#: The share of each channel's variance that is between images (overall brightness and colour):
#: 0.26-0.34 on the first 2,000 CIFAR-10 train images. Without it, eval-mode logits of efficientnet_b0
#: reach 40 instead of 2.
_BETWEEN_IMAGE_SHARE = 0.3
#: Texture: amplitude spectrum 1/f^slope (natural images: about 1; small, smoothed images fall
#: faster), with this correlation between channels. Chosen on CIFAR-10 validation images (never the
#: test split) over five predicted CNNs, among slopes 1 and 1.5 and correlations 0, 0.5 and 0.85:
#: mean eval-mode validation accuracy 18.4-20.5% across them, 20.5% for this pair.
_SPECTRUM_SLOPE = 1.5
_CHANNEL_CORRELATION = 0.5


def _tracked_norms(model: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def has_running_stats(model: nn.Module) -> bool:
    """Whether ``model`` has norm layers (BatchNorm, or InstanceNorm tracking stats) that use running statistics."""
    return bool(_tracked_norms(model))


def _image_batches(images_or_loader: torch.Tensor | Iterable[Any], batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images_or_loader, torch.Tensor):
        # Near-equal chunks: a last batch of one image would break BatchNorm on 1x1 feature maps.
        yield from images_or_loader.tensor_split(max(1, math.ceil(len(images_or_loader) / batch_size)))
        return
    for batch in images_or_loader:
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"calibrate_batchnorm: a batch is {type(batch).__name__}; give tensors of images "
                            "or (images, labels) tuples, as a torch DataLoader over an image dataset yields")
        yield batch


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, images_or_loader: torch.Tensor | Iterable[Any], *,
                        batch_size: int = 64, max_images: int | None = None) -> nn.Module:
    """Recompute the running statistics of ``model``'s norm layers from unlabeled images, in place.

    ``images_or_loader`` is a tensor of normalized images (N, C, H, W) or an iterable of batches
    (tensors or ``(images, labels)`` tuples, e.g. a ``DataLoader``); at most ``max_images`` are used.
    Statistics are reset and averaged over all images with equal weight per image (not an
    exponential average dominated by the last batches). Only the norm layers run in train mode, so
    dropout and drop-path stay off; every module's mode is restored afterwards. Models without
    BatchNorm are returned untouched, without a forward pass. Returns ``model``.
    """
    norms = _tracked_norms(model)
    if not norms:
        return model
    if max_images is not None and max_images < 1:
        raise ValueError(f"calibrate_batchnorm: max_images must be at least 1, got {max_images}")
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in norms]
    device, seen = _device(model), 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.train()
        for images in _image_batches(images_or_loader, batch_size):
            if max_images is not None:
                images = images[: max_images - seen]
            if len(images) == 0:
                break
            for m in norms:  # the cumulative average over images so far
                m.momentum = len(images) / (seen + len(images))
            model(images.to(device))
            seen += len(images)
            if max_images is not None and seen >= max_images:
                break
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    if seen == 0:
        raise ValueError("calibrate_batchnorm: no images; give a non-empty tensor or loader")
    return model


def data_free_images(input_size: Sequence[int]) -> int:
    """How many synthetic images :func:`calibrate_predicted` uses at ``input_size`` = (C, H, W)."""
    return max(_MIN_IMAGES, min(64, _PIXEL_BUDGET // math.prod(input_size[1:])))


def _unit_fields(count: int, channels: int, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """(count, channels, *size) random fields, amplitude spectrum 1/f^slope, unit variance per image and channel."""
    freqs = [torch.fft.fftfreq(n) for n in size[:-1]] + [torch.fft.rfftfreq(size[-1])]
    radius = torch.stack(torch.meshgrid(*freqs, indexing="ij")).pow(2).sum(0).sqrt()
    amplitude = torch.where(radius > 0, radius.clamp_min(1e-12).pow(-_SPECTRUM_SLOPE), torch.zeros(()))
    shape = (count, channels, *amplitude.shape)
    spectrum = torch.complex(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
    fields = torch.fft.irfftn(spectrum * amplitude, s=tuple(size), dim=tuple(range(2, 2 + len(size))))
    dims = tuple(range(2, fields.dim()))
    return fields / fields.std(dim=dims, keepdim=True).clamp_min(1e-12)


def synthetic_images(count: int, input_size: Sequence[int], mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, *, seed: int = 0) -> torch.Tensor:
    """``count`` normalized images (C, H, W) = ``input_size`` that look like natural images to a network's statistics.

    No data: power-law noise textures (natural images have a 1/f-like amplitude spectrum) plus a
    brightness and colour offset per image, with correlated channels, at unit variance per channel. With
    the data's ``mean`` and ``std`` (pixel values in [0, 1]) they are clipped where real pixels are,
    as normalized images of that dataset are. Deterministic in ``seed``.
    """
    channels, *size = input_size
    generator = torch.Generator().manual_seed(seed)
    rho, share = _CHANNEL_CORRELATION, _BETWEEN_IMAGE_SHARE
    offsets = (math.sqrt(rho) * torch.randn(count, 1, generator=generator)
               + math.sqrt(1 - rho) * torch.randn(count, channels, generator=generator))
    if not size:  # feature vectors: no texture, only the per-sample part
        images = offsets
    else:
        texture = (math.sqrt(rho) * _unit_fields(count, 1, size, generator)
                   + math.sqrt(1 - rho) * _unit_fields(count, channels, size, generator))
        images = math.sqrt(1 - share) * texture + math.sqrt(share) * offsets.view(count, channels, *[1] * len(size))
    if mean is not None and std is not None:
        view = (1, channels, *[1] * len(size))
        m, s = _per_channel(mean, channels).view(view), _per_channel(std, channels).view(view)
        images = torch.maximum(torch.minimum(images, (1 - m) / s), -m / s)
    return images


def _per_channel(values: Sequence[float], channels: int) -> torch.Tensor:
    """RGB normalization values for ``channels`` inputs: as given for 3, their mean for grayscale, else cycled."""
    values = torch.tensor(list(values), dtype=torch.float32)
    if channels == len(values):
        return values
    if channels == 1:
        return values.mean().view(1)
    return values[torch.arange(channels) % len(values)]


def _twin(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are the tensors of ``state`` (not copies).

    The model's own tensors are shared with the copy, not duplicated, before ``state`` replaces them:
    this costs no memory for meta-device or real models alike.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, memo)
    twin.load_state_dict(state, assign=True)
    return twin


def calibrate_predicted(model: nn.Module, state: dict[str, torch.Tensor] | None, input_size: Sequence[int],
                        data_config: dict[str, Any] | None = None, *, images: torch.Tensor | None = None,
                        source: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Replace the norm statistics in ``state`` (predicted weights for ``model``) with calibrated ones, in place.

    ``model`` may live on the meta device and is not changed; with ``state=None`` the model itself
    holds the predicted weights (after ``apply_``) and its statistics are replaced. Without ``images``
    the statistics come from :func:`synthetic_images` at ``input_size`` matched to ``data_config``'s normalization
    (data-free, deterministic in ``seed``); with ``images`` (normalized, e.g. real training images,
    described by ``source``) from those, resized to ``input_size`` if needed. Only running means and
    variances change: ``num_batches_tracked`` stays 0. Returns what was done, as recorded in a
    predicted folder's config.json and safetensors metadata.
    """
    if not has_running_stats(model):
        return {"method": "none", "reason": "the model has no BatchNorm running statistics"}
    input_size = tuple(int(s) for s in input_size)
    twin = model if state is None else _twin(model, state)
    on_meta = [name for name, buffer in twin.named_buffers() if buffer.is_meta]
    if on_meta:
        reason = (f"buffers {on_meta[:3]} are on the meta device (not in the state dict), so the model cannot run; "
                  "build it with real buffers (ghn_init.export.create_meta_model does)")
        logger.warning("BatchNorm statistics of %s left at identity: %s", type(model).__name__, reason)
        return {"method": "identity", "reason": reason}
    tensors = list(twin.state_dict().values())
    if state is not None:
        twin.to(tensors[0].device)
    if images is None:
        data_config = data_config or {}
        count = data_free_images(input_size)
        images = synthetic_images(count, input_size, data_config.get("mean"), data_config.get("std"), seed=seed)
        record = {"method": DATA_FREE, "images": count, "seed": seed, "input_size": list(input_size),
                  "inputs": f"1/f^{_SPECTRUM_SLOPE} noise images matched to the GHN's data normalization"}
    else:
        record = {"method": "images", "images": len(images), "input_size": list(input_size),
                  "source": source or "user images"}
        if tuple(images.shape[2:]) != input_size[1:]:
            record["resized_from"] = list(images.shape[1:])
            images = nn.functional.interpolate(images.float(), size=input_size[1:], mode="bilinear",
                                               antialias=True, align_corners=False)
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    with _one_thread():  # the same statistics with any thread count
        calibrate_batchnorm(twin, images.to(dtype), batch_size=_BATCH_SIZE)
    for norm in _tracked_norms(twin):  # an estimate, not training history: batch counts stay at 0
        if norm.num_batches_tracked is not None:
            norm.num_batches_tracked.zero_()
    return record
