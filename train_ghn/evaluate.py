"""Accuracy of predicted weights, following DESIGN.md's protocol.

(a) BatchNorm recalibrated on at most 500 unlabeled train images, then eval mode; (b) GHN-2's
way: batch statistics at test time. Reported on the class-balanced 2,000 test images (the first
200 of each class) for quick checks, or the full 10,000 for tables.

``python -m train_ghn.evaluate MODEL [MODEL ...] [--ghn REF] [--full]``: MODEL is a timm name
(predicted with the GHN, kwargs from ``OOD_ARCHITECTURES``) or ``local-dir:DIR`` (loaded by timm).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .data import balanced_test_indices, load_cifar10, normalize

__all__ = ["OOD_ARCHITECTURES", "accuracy", "calibrate_batchnorm", "evaluate_model"]

logger = logging.getLogger(__name__)

#: Real timm architectures built for 32x32 inputs and 10 classes: the out-of-distribution list.
OOD_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "resnet18": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
}


def _batches(x: torch.Tensor, size: int) -> Iterable[torch.Tensor]:
    return x.split(size)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 100) -> nn.Module:
    """Re-estimate BatchNorm running statistics from ``images`` (normalized floats), no labels.

    Uses a cumulative average (momentum=None) so the result does not depend on batch order weights.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for xb in _batches(images, batch_size):
        model(xb)
    for m, momentum in saved:
        m.momentum = momentum
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             batch_stats: bool = False) -> float:
    """Top-1 accuracy; ``batch_stats=True`` evaluates in train mode (GHN-2's protocol).

    With batch statistics each batch is a fixed random sample: the test split's file order is grouped
    by class, and single-class batches would make the statistics meaningless.
    """
    if batch_stats:
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).to(labels.device)
        images, labels = images[order], labels[order]
    model.train(batch_stats)
    hits = 0
    for xb, yb in zip(_batches(images, batch_size), _batches(labels, batch_size)):
        hits += int((model(xb).argmax(1) == yb).sum())
    model.eval()
    return hits / len(labels)


def evaluate_model(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor], calibration: torch.Tensor) -> dict:
    """Both protocol numbers for one model: BN recalibrated (eval mode) and batch statistics."""
    batch_stats = accuracy(model, *test, batch_stats=True)
    calibrate_batchnorm(model, calibration)
    return {"acc_bn_calibrated": accuracy(model, *test), "acc_batch_stats": batch_stats}


def load_eval_data(full: bool, calibrate_bn: int, device: torch.device) -> tuple[tuple, torch.Tensor]:
    images, labels = load_cifar10("test")
    if not full:
        keep = balanced_test_indices(labels)
        images, labels = images[keep], labels[keep]
    calibration, _ = load_cifar10("train", indices=torch.arange(calibrate_bn).numpy())
    return (normalize(images).to(device), labels.to(device)), normalize(calibration).to(device)


def _load(ref: str, ghn_ref: str | None) -> tuple[nn.Module, str]:
    import timm

    if ref.startswith("local-dir:"):
        return timm.create_model(ref, pretrained=True), ref
    from ghn_init import load

    kwargs = OOD_ARCHITECTURES.get(ref, {})
    model = timm.create_model(ref, num_classes=10, **kwargs)
    load(ghn_ref).apply_(model)
    return model, ref


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m train_ghn.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="timm names or local-dir:DIR folders from `ghn-init predict`")
    parser.add_argument("--ghn", help="GHN reference for timm names (default: the embedded GHN)")
    parser.add_argument("--full", action="store_true", help="all 10,000 test images (default: balanced 2,000)")
    parser.add_argument("--calibrate-bn", type=int, default=500, help="unlabeled train images for BN statistics")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cpu")
    test, calibration = load_eval_data(args.full, args.calibrate_bn, device)
    results = {"split": "test-full" if args.full else "test-balanced-2000", "calibrate_bn": args.calibrate_bn,
               "machine": platform.platform(), "models": {}}
    for ref in args.models:
        model, label = _load(ref, args.ghn)
        results["models"][label] = scores = evaluate_model(model, test, calibration)
        logger.info("%s: %s", label, json.dumps(scores))
    accs = [s["acc_bn_calibrated"] for s in results["models"].values()]
    results["mean_acc_bn_calibrated"] = sum(accs) / len(accs)
    logger.info("mean (BN calibrated): %.4f", results["mean_acc_bn_calibrated"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
