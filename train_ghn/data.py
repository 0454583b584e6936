"""CIFAR-10 for meta-training and evaluation, held as uint8 tensors on the training device.

Images are small, so the whole split lives on the device and batches are sliced and augmented
there: no loader workers, no host-device copies per step. The offline copy
(``$GHN_INIT_DATA/cifar10/cifar10-jpeg75.npz``) is used when present; otherwise torchvision's
official download serves users who are online.

ImageNet-style data (an ImageFolder tree, one subfolder per class) is decoded batch by batch
instead: :class:`ImageFolderBatches` and :func:`load_image_folder`.
"""

from __future__ import annotations

import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "NUM_VALIDATION", "ImageBatches",
    "ImageFolderBatches", "balanced_test_indices", "data_root", "load_cifar10", "load_image_folder", "normalize",
    "stage_training_data",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
            staged = str(files["staged_split"]) if "staged_split" in files else None
            if staged is not None and split != staged:
                raise FileNotFoundError(f"{npz} holds the {staged} split only (a copy made by stage_training_data); "
                                        f"point GHN_INIT_DATA at the full copy for {split!r}")
            labels = files[f"y_{source}"].astype(np.int64)
            rows = np.arange(len(labels)) if staged else _split_rows(split, len(labels))
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


def stage_training_data(dest: str | Path, root: str | Path | None = None) -> Path:
    """Copy the train split (the first 45,000 train images) of the offline CIFAR-10 file to ``dest/cifar10/``.

    About 42 MB against 56 MB for the whole file: what fits beside the repo when a run goes to a
    lent GPU machine (point ``GHN_INIT_DATA`` at ``dest`` there; validation and test splits are
    refused from it). Written atomically.
    """
    source = (Path(root) if root is not None else data_root()) / _NPZ
    if not source.is_file():
        raise FileNotFoundError(f"CIFAR-10 not found at {source}; set GHN_INIT_DATA to the folder holding cifar10/")
    target = Path(dest) / _NPZ
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with np.load(source) as files, partial.open("wb") as out:
        count = len(files["y_train"]) - NUM_VALIDATION
        offsets = files["train_offsets"][:count + 1]
        np.savez(out, y_train=files["y_train"][:count], train_jpeg=files["train_jpeg"][:offsets[-1]],
                 train_offsets=offsets, staged_split=np.array("train"))
    partial.replace(target)
    return target


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

    def _next_rows(self) -> torch.Tensor:
        if self._cursor + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self.labels), generator=self.generator)
            self._cursor = 0
        rows = self._order[self._cursor:self._cursor + self.batch_size]
        self._cursor += self.batch_size
        return rows

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._next_rows()
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


def _image_folder(root: str | Path) -> tuple[list[str], torch.Tensor, list[str]]:
    """Paths, labels and class names of an ImageFolder tree (torchvision's layout and file types)."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(root))
    return [path for path, _ in folder.samples], torch.tensor(folder.targets, dtype=torch.long), folder.classes


def _crop_resize(path: str, box: tuple[float, ...] | None, size: int, flip: bool) -> np.ndarray:
    """Decode ``path``, crop, resize to ``size`` x ``size``, flip.

    ``box`` is (area fraction, log aspect ratio, x, y) of a random-resized crop; ``None`` is the
    evaluation crop, the centred square of 87.5% of the shorter side.
    """
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    w, h = image.size
    if box is None:
        cw = ch = max(1, round(0.875 * min(w, h)))
        fx = fy = 0.5
    else:
        area, log_ratio, fx, fy = box
        ratio = math.exp(log_ratio)
        cw = min(w, max(1, round(math.sqrt(area * w * h * ratio))))
        ch = min(h, max(1, round(math.sqrt(area * w * h / ratio))))
    left, top = round(fx * (w - cw)), round(fy * (h - ch))
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image)


def _decode_many(paths: list[str], boxes: list[tuple[float, ...] | None], flips: list[bool], size: int,
                 workers: int) -> torch.Tensor:
    """(N, 3, size, size) uint8; PIL releases the GIL while decoding, so threads suffice."""
    sizes = [size] * len(paths)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        arrays = list(pool.map(_crop_resize, paths, boxes, sizes, flips))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_image_folder(root: str | Path, image_size: int, count: int | None = None,
                      workers: int = 8) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Centre crops (87.5% of the shorter side) of an ImageFolder tree: uint8 images, labels, class names.

    ``count`` images are taken evenly spaced over the sorted file list, so every class is
    represented (the first N files would all be of the first classes).
    """
    paths, labels, classes = _image_folder(root)
    rows = np.arange(len(paths)) if count is None else np.linspace(0, len(paths) - 1, count).round().astype(int)
    images = _decode_many([paths[i] for i in rows], [None] * len(rows), [False] * len(rows), image_size, workers)
    return images, labels[torch.from_numpy(rows)], classes


class ImageFolderBatches(ImageBatches):
    """Shuffled epochs of random-resized-crop, flipped batches decoded from an ImageFolder tree.

    Crop and flip draws come from the checkpointed CPU generator, so resumed runs see the same
    batches; decoding runs in a thread pool on the host. A minimal path for ImageNet users with
    GPUs: it has only been run on tiny folders, never at ImageNet scale.
    """

    def __init__(self, root: str | Path, image_size: int, batch_size: int, seed: int,
                 device: torch.device | str = "cpu", augment: bool = True, workers: int = 8,
                 min_area: float = 0.25) -> None:
        self.paths, labels, self.classes = _image_folder(root)
        super().__init__(torch.empty(0, dtype=torch.uint8), labels, batch_size, seed, augment)
        self.image_size, self.device, self.workers, self.min_area = image_size, torch.device(device), workers, min_area

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._next_rows()
        n = len(rows)
        if self.augment:
            draws = torch.rand(n, 5, generator=self.generator, dtype=torch.float64)
            area = self.min_area + (1 - self.min_area) * draws[:, 0]
            log_ratio = math.log(3 / 4) + math.log(16 / 9) * draws[:, 1]
            boxes = [tuple(b) for b in torch.stack([area, log_ratio, draws[:, 2], draws[:, 3]], 1).tolist()]
            flips = (draws[:, 4] < 0.5).tolist()
        else:
            boxes, flips = [None] * n, [False] * n
        x = _decode_many([self.paths[i] for i in rows.tolist()], boxes, flips, self.image_size, self.workers)
        x = x.to(self.device, non_blocking=True)
        return normalize(x, IMAGENET_MEAN, IMAGENET_STD), self.labels[rows].to(self.device)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m train_ghn.data", description=stage_training_data.__doc__)
    parser.add_argument("dest", help="folder to use as GHN_INIT_DATA on the other machine, e.g. .gpu/data")
    staged = stage_training_data(parser.parse_args().dest)
    print(f"{staged} ({staged.stat().st_size / 2**20:.1f} MiB)")
