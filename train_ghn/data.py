"""CIFAR-10 for meta-training and evaluation, held as uint8 tensors on the training device.

Images are small, so the whole split lives on the device and batches are sliced and augmented
there: no loader workers, no host-device copies per step. The offline copy
(``$GHN_INIT_DATA/cifar10/cifar10-jpeg75.npz``) is used when present; otherwise torchvision's
official download serves users who are online.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "NUM_VALIDATION", "ImageBatches", "balanced_test_indices",
    "data_root", "load_cifar10", "normalize",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: The last 5,000 train images are validation; the test split is for reporting only.
NUM_VALIDATION = 5000
_NPZ = Path("cifar10") / "cifar10-jpeg75.npz"


def data_root() -> Path:
    """``$GHN_INIT_DATA``, else ``../shared/data`` relative to the working directory."""
    return Path(os.environ.get("GHN_INIT_DATA", "../shared/data"))


def _decode(jpeg: np.ndarray, offsets: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    from PIL import Image

    out = np.empty((len(indices), 32, 32, 3), dtype=np.uint8)
    for row, i in enumerate(indices):
        out[row] = np.asarray(Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_cifar10(split: str, root: str | Path | None = None, indices: np.ndarray | None = None,
                 download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of ``split``: "train", "val", "test".

    "train" is the first 45,000 train images and "val" the last 5,000. ``indices`` selects rows
    of the split. Without the offline copy, ``download=True`` fetches the official files.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown CIFAR-10 split {split!r}; use 'train', 'val' or 'test'")
    root = Path(root) if root is not None else data_root()
    npz = root / _NPZ
    source = "test" if split == "test" else "train"
    if npz.is_file():
        with np.load(npz) as files:
            labels = files[f"y_{source}"].astype(np.int64)
            rows = _split_rows(split, len(labels))
            rows = rows if indices is None else rows[np.asarray(indices)]
            images = _decode(files[f"{source}_jpeg"], files[f"{source}_offsets"], rows)
        return images, torch.from_numpy(labels[rows])
    if not download:
        raise FileNotFoundError(
            f"CIFAR-10 not found at {npz}. Set GHN_INIT_DATA to the folder holding cifar10/, "
            "or pass download=True to fetch the official files with torchvision."
        )
    from torchvision.datasets import CIFAR10

    dataset = CIFAR10(str(root / "torchvision"), train=source == "train", download=True)
    rows = _split_rows(split, len(dataset.targets))
    rows = rows if indices is None else rows[np.asarray(indices)]
    images = torch.from_numpy(dataset.data[rows]).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets, dtype=torch.long)[rows]


def _split_rows(split: str, n: int) -> np.ndarray:
    if split == "train":
        return np.arange(n - NUM_VALIDATION)
    if split == "val":
        return np.arange(n - NUM_VALIDATION, n)
    return np.arange(n)


def balanced_test_indices(labels: torch.Tensor, per_class: int = 200) -> torch.Tensor:
    """The first ``per_class`` test images of each class in file order (the quick-check split)."""
    picked = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(int(labels.max()) + 1)]
    return torch.sort(torch.cat(picked)).values


def normalize(images: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float, normalized per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


class ImageBatches:
    """Shuffled epochs of augmented batches (random crop with 4-pixel padding, horizontal flip).

    All randomness comes from one CPU ``torch.Generator`` whose state is checkpointed, so a
    resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 augment: bool = True) -> None:
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(len(labels), generator=self.generator)
        self._cursor = 0

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state().tolist(), "order": self._order.tolist(),
                "cursor": self._cursor}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self._order = torch.tensor(state["order"], dtype=torch.long)
        self._cursor = state["cursor"]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cursor + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self.labels), generator=self.generator)
            self._cursor = 0
        rows = self._order[self._cursor:self._cursor + self.batch_size]
        self._cursor += self.batch_size
        device = self.images.device
        x, y = self.images[rows.to(device)], self.labels[rows.to(device)]
        if self.augment:
            x = self._augment(x)
        return normalize(x), y

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        shift = torch.randint(0, 9, (n, 2), generator=self.generator).to(x.device)
        flip = (torch.rand(n, generator=self.generator) < 0.5).to(x.device)
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        rows = shift[:, 0, None] + torch.arange(h, device=x.device)
        cols = shift[:, 1, None] + torch.arange(w, device=x.device)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        batch = torch.arange(n, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
