"""Short SGD runs: the baseline every GHN initialization is measured against (DESIGN.md's recipe).

timm's SGD (Nesterov momentum 0.9, no weight decay on biases and norms) at learning rate 0.05 on
a one-cycle schedule spanning the run, batch 64, random horizontal flips. Batch order and flips
come from one seeded generator, so two initializations trained with the same seed see exactly
the same images in the same order.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import normalize

__all__ = ["SGDRecipe", "train_sgd"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SGDRecipe:
    """Everything but the step count; ``to_dict`` goes into result files next to the numbers."""

    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "optimizer": "timm sgd (nesterov, no decay on biases/norms)",
                "schedule": "torch OneCycleLR over the run", "augmentation": "random horizontal flip"}


def _flip_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, steps: int,
                  generator: torch.Generator):
    """Shuffled epochs of normalized, randomly flipped batches; the last partial batch of an epoch is dropped."""
    per_epoch = max(1, len(labels) // batch_size)
    order = torch.randperm(len(labels), generator=generator)
    for step in range(steps):
        if step and step % per_epoch == 0:
            order = torch.randperm(len(labels), generator=generator)
        rows = order[(step % per_epoch) * batch_size:(step % per_epoch + 1) * batch_size]
        flip = torch.rand(len(rows), generator=generator) < 0.5
        rows, flip = rows.to(images.device), flip.to(images.device)
        x = images[rows]
        yield normalize(torch.where(flip[:, None, None, None], x.flip(3), x)), labels[rows]


def train_sgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int,
              recipe: SGDRecipe | None = None, progress: bool = False) -> list[float]:
    """Train ``model`` in place for ``steps`` steps on uint8 ``images`` (N, 3, H, W); returns the losses.

    The model is left in train mode; evaluate it in eval mode with the running statistics it learned.
    """
    from timm.optim import create_optimizer_v2

    if steps < 1:
        return []
    recipe = recipe or SGDRecipe()
    optimizer = create_optimizer_v2(model, opt="sgd", lr=recipe.lr, weight_decay=recipe.weight_decay,
                                    momentum=recipe.momentum)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    losses = []
    model.train()
    batches = _flip_batches(images, labels, recipe.batch_size, steps, generator)
    for x, y in tqdm(batches, total=steps, desc="sgd", leave=False, disable=not progress):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.detach())
    values = torch.stack(losses).tolist()
    if not all(map(math.isfinite, values)):
        logger.warning("SGD diverged: non-finite loss within %d steps", steps)
    return values
