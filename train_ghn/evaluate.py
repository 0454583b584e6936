"""Accuracy of predicted weights against timm's default init and short SGD runs (DESIGN.md's protocol).

For every architecture: (a) predicted weights with BatchNorm recalibrated on at most 500
unlabeled train images, then eval mode; (b) GHN-2's way, batch statistics at test time; timm's
default init the same two ways; and SGD for k steps (``train_ghn.sgd``: batch 64, Nesterov,
lr 0.05 one-cycle, flips) from the default init and from the predicted init, with the same seed
and batches, evaluated in eval mode. Reported on the class-balanced 2,000 test images (the first
200 of each class) for quick checks, or the full 10,000 for tables.

Architectures: ``--split ood`` is ``OOD_ARCHITECTURES`` (real timm models built for 32x32, 10
classes), ``--split id`` the DeepNets-1M ``id`` split at ``ID_SEEDS``; MODEL arguments add timm
names (kwargs from ``OOD_ARCHITECTURES`` when listed) or ``local-dir:DIR`` folders written by
``ghn-init predict`` (their weights stand in for the GHN's prediction).

``python -m train_ghn.evaluate [MODEL ...] [--split ood|id|both] [--sgd-steps 100,500,2500]
[--ghn REF] [--full] [--calibrate-bn N] [--out FILE.json] [--plot FILE.png]``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ghn_init.batchnorm import calibrate_batchnorm

from . import deepnets
from .data import balanced_test_indices, load_cifar10, normalize
from .sgd import SGDRecipe, train_sgd

__all__ = [
    "ID_SEEDS", "OOD_ARCHITECTURES", "SGD_STEPS", "Architecture", "EvalData", "accuracy", "calibrate_batchnorm",
    "evaluate_architecture", "evaluate_model", "id_architectures", "load_eval_data", "named_architecture",
    "ood_architectures", "plot_sgd", "run_protocol", "summarize",
]

logger = logging.getLogger(__name__)

#: Real timm architectures built for 32x32 inputs and 10 classes: the out-of-distribution list.
#: ViTs take a 4-pixel patch (an 8x8 token grid); Swin keeps its 4-pixel patch with 4x4 windows
#: (8x8, 4x4, 2x2, 1x1 stage grids); timm's Mixers fix their patch size, so mixer_s16_224 sees 2x2
#: tokens of 16x16 pixels. The CNNs need no kwargs: their strides end on a 1x1 map at 32x32.
OOD_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "resnet18": {},
    "resnet50": {},
    "convnext_atto": {},
    "regnetx_002": {},
    "efficientnet_b0": {},
    "mobilenetv3_small_100": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
    "swin_tiny_patch4_window7_224": {"img_size": 32, "window_size": 4},
    "mixer_s16_224": {"img_size": 32},
}
#: The in-distribution test nets: DeepNets-1M ``id`` split seeds the trainer never validates on
#: (its validation architectures are ``id`` seeds 0 and 1).
ID_SEEDS: tuple[int, ...] = tuple(range(1000, 1005))
#: SGD budgets of the protocol, in steps of batch 64.
SGD_STEPS: tuple[int, ...] = (100, 500, 2500)
_INPUT_SIZE = (3, 32, 32)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One evaluated network: its default-init builder and, for ``local-dir:`` folders, its given weights."""

    name: str
    group: str  # "ood", "id" or "named" (a MODEL argument outside the OOD list)
    kwargs: dict[str, Any]
    build: Callable[[], nn.Module]
    load: Callable[[], nn.Module] | None = None  # weights evaluated instead of a GHN prediction


@dataclasses.dataclass
class EvalData:
    """Normalized test images and labels, normalized BN-calibration images, uint8 SGD train images."""

    test: tuple[torch.Tensor, torch.Tensor]
    calibration: torch.Tensor
    train: tuple[torch.Tensor, torch.Tensor] | None = None


def ood_architectures() -> list[Architecture]:
    import timm

    return [Architecture(name, "ood", kwargs, partial(timm.create_model, name, num_classes=10, **kwargs))
            for name, kwargs in OOD_ARCHITECTURES.items()]


def id_architectures(seeds: Iterable[int] = ID_SEEDS) -> list[Architecture]:
    return [Architecture(f"deepnets/id/{seed}", "id", {"seed": seed, "split": "id"},
                         partial(deepnets.sample_net, seed, "id", 10)) for seed in seeds]


def named_architecture(ref: str) -> Architecture:
    """A MODEL argument: a timm name (kwargs from ``OOD_ARCHITECTURES``) or a ``local-dir:DIR`` folder."""
    import timm

    if ref.startswith("local-dir:"):
        return Architecture(ref, "named", {}, partial(timm.create_model, ref, pretrained=False),
                            load=partial(timm.create_model, ref, pretrained=True))
    kwargs = OOD_ARCHITECTURES.get(ref, {})
    return Architecture(ref, "ood" if ref in OOD_ARCHITECTURES else "named", kwargs,
                        partial(timm.create_model, ref, num_classes=10, **kwargs))


def _batches(x: torch.Tensor, size: int) -> Iterable[torch.Tensor]:
    return x.split(size)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             batch_stats: bool = False) -> float:
    """Top-1 accuracy; ``batch_stats=True`` evaluates in train mode (GHN-2's protocol).

    With batch statistics each batch is a fixed random sample: the test split's file order is grouped
    by class, and single-class batches would make the statistics meaningless. The model's running
    statistics are restored afterwards: test images must not leak into the eval-mode number.
    """
    saved = {}
    if batch_stats:
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).to(labels.device)
        images, labels = images[order], labels[order]
        saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.train(batch_stats)
    hits = 0
    for xb, yb in zip(_batches(images, batch_size), _batches(labels, batch_size)):
        hits += int((model(xb).argmax(1) == yb).sum())
    model.eval()
    for name, buffer in model.named_buffers():
        if name in saved:
            buffer.copy_(saved[name])
    return hits / len(labels)


def evaluate_model(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor], calibration: torch.Tensor) -> dict:
    """Both protocol numbers for one model: BN recalibrated (eval mode) and batch statistics.

    With no ``calibration`` images the model keeps the statistics it has (data-free ones for predicted weights).
    """
    batch_stats = accuracy(model, *test, batch_stats=True)
    if len(calibration):
        calibrate_batchnorm(model, calibration, batch_size=100)
    return {"acc_bn_calibrated": accuracy(model, *test), "acc_batch_stats": batch_stats}


def load_eval_data(full: bool, calibrate_bn: int, device: torch.device) -> tuple[tuple, torch.Tensor]:
    """(normalized test images, labels) and normalized BN-calibration images (the first train images)."""
    images, labels = load_cifar10("test")
    if not full:
        keep = balanced_test_indices(labels)
        images, labels = images[keep], labels[keep]
    calibration, _ = load_cifar10("train", indices=torch.arange(calibrate_bn).numpy())
    return (normalize(images).to(device), labels.to(device)), normalize(calibration).to(device)


def _load_train(count: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels of the train split (validation excluded), optionally only the first ``count``."""
    images, labels = load_cifar10("train", indices=None if count is None else torch.arange(count).numpy())
    return images.to(device), labels.to(device)


def evaluate_architecture(arch: Architecture, ghn: Any, data: EvalData, sgd_steps: Iterable[int] = (),
                          recipe: SGDRecipe | None = None) -> dict[str, Any]:
    """All protocol numbers of one architecture; the default init is drawn with ``recipe.seed``."""
    recipe = recipe or SGDRecipe()
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    default = arch.build()
    row: dict[str, Any] = {"group": arch.group, "kwargs": arch.kwargs,
                           "params": sum(p.numel() for p in default.parameters())}
    if arch.load is not None:
        predicted = arch.load()
    else:
        predicted = copy.deepcopy(default)
        report = ghn.apply_(predicted, _INPUT_SIZE)
        row["predicted_tensors"], row["kept_tensors"] = len(report.predicted), len(report.skipped)
    inits = {"default_init": default, "ghn": predicted}
    pristine = {label: copy.deepcopy(model) for label, model in inits.items()}
    row["ghn"] = evaluate_model(predicted, data.test, data.calibration)
    row["default_init"] = evaluate_model(default, data.test, data.calibration)
    row["sgd"] = {}
    for steps in sgd_steps:
        row["sgd"][str(steps)] = runs = {}
        for label, model in pristine.items():
            model = copy.deepcopy(model)
            torch.manual_seed(recipe.seed)  # same dropout / drop-path draws for both inits
            losses = train_sgd(model, *data.train, steps, recipe)
            tail = losses[-max(1, steps // 10):]
            runs[label] = {"acc": accuracy(model, *data.test), "train_loss": sum(tail) / len(tail)}
        logger.info("%s after %d SGD steps: default init %.4f, GHN init %.4f", arch.name, steps,
                    runs["default_init"]["acc"], runs["ghn"]["acc"])
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Means per group, and on how many architectures SGD from the GHN init is at least as good."""
    summary = {}
    for group in dict.fromkeys(r["group"] for r in rows.values()):
        members = [r for r in rows.values() if r["group"] == group]
        summary[group] = {
            "architectures": len(members),
            "ghn_acc_bn_calibrated": _mean([r["ghn"]["acc_bn_calibrated"] for r in members]),
            "ghn_acc_batch_stats": _mean([r["ghn"]["acc_batch_stats"] for r in members]),
            "default_init_acc_bn_calibrated": _mean([r["default_init"]["acc_bn_calibrated"] for r in members]),
            "sgd": {steps: {"default_init": _mean([r["sgd"][steps]["default_init"]["acc"] for r in members]),
                            "ghn": _mean([r["sgd"][steps]["ghn"]["acc"] for r in members]),
                            "ghn_at_least_default": sum(r["sgd"][steps]["ghn"]["acc"]
                                                        >= r["sgd"][steps]["default_init"]["acc"] for r in members)}
                    for steps in members[0]["sgd"]},
        }
    return summary


def _machine() -> dict[str, Any]:
    import timm

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count() or 0, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "timm": timm.__version__}


def run_protocol(archs: list[Architecture], ghn_ref: str | None = None, full: bool = False,
                 calibrate_bn: int = 500, sgd_steps: Iterable[int] = SGD_STEPS, recipe: SGDRecipe | None = None,
                 train_images: int | None = None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Evaluate ``archs``; the result's layout is what ``benchmarks/ghn_eval.py`` and ``hub/release.py`` read."""
    sgd_steps, recipe, device = tuple(sgd_steps), recipe or SGDRecipe(), torch.device(device)
    ghn = None
    setup: dict[str, Any] = {"ghn": ghn_ref, "split": "test (10,000)" if full else
                             "balanced test (first 200 per class, 2,000)", "calibrate_bn_images": calibrate_bn,
                             "groups": sorted({a.group for a in archs}), "sgd_steps": list(sgd_steps),
                             "sgd": recipe.to_dict(), "machine": _machine()}
    if any(a.load is None for a in archs):
        import ghn_init

        ghn = ghn_init.load(ghn_ref)
        setup.update(ghn=ghn.meta.get("name", ghn_ref), ghn_sha256=ghn_init.content_hash(ghn)[:16],
                     untie_noise=ghn.config.untie_noise, residual_branch_gain=ghn.config.residual_branch_gain,
                     ghn_training_steps=ghn.meta.get("training", {}).get("steps"), ghn_init=ghn_init.__version__)
    test, calibration = load_eval_data(full, calibrate_bn, device)
    data = EvalData(test, calibration, _load_train(train_images, device) if sgd_steps else None)
    if data.train is not None:
        setup["sgd_train_images"] = len(data.train[1])
    logger.info("setup: %s", json.dumps(setup))
    rows = {}
    for arch in archs:
        rows[arch.name] = evaluate_architecture(arch, ghn, data, sgd_steps, recipe)
        logger.info("%s: %s", arch.name, json.dumps({k: rows[arch.name][k] for k in ("ghn", "default_init")}))
    summary = summarize(rows)
    for group, numbers in summary.items():
        logger.info("%s mean: %s", group, json.dumps(numbers))
    return {"setup": setup, "architectures": rows, "summary": summary,
            "mean_ghn_acc_bn_calibrated": _mean([r["ghn"]["acc_bn_calibrated"] for r in rows.values()])}


def plot_sgd(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Accuracy against SGD steps (log x, init at the left): per architecture faint, group means bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(k) for k in result["setup"]["sgd_steps"]]
    init_x = min(steps) / 4 if steps else 1.0
    xs = [init_x, *steps]
    groups = list(result["summary"])
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False, sharey=True)
    colors = {"ghn": "tab:blue", "default_init": "tab:gray"}
    labels = {"ghn": "GHN init", "default_init": "default init"}
    for ax, group in zip(axes[0], groups):
        rows = [r for r in result["architectures"].values() if r["group"] == group]
        for init, color in colors.items():
            curves = [[r[init]["acc_bn_calibrated"], *(r["sgd"][str(k)][init]["acc"] for k in steps)] for r in rows]
            for curve in curves:
                ax.plot(xs, curve, color=color, alpha=0.25, lw=0.8)
            ax.plot(xs, [_mean(list(c)) for c in zip(*curves)], color=color, lw=2.5, marker="o", label=labels[init])
        ax.set_xscale("log")
        ax.set_xticks(xs, ["init", *map(str, steps)])
        ax.minorticks_off()
        ax.axhline(0.1, color="black", lw=0.6, ls=":")
        ax.set_xlabel("SGD steps (batch 64)")
        ax.set_title(f"{group}: {len(rows)} architectures", fontsize=9)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("CIFAR-10 test accuracy")
    fig.suptitle(f"GHN {result['setup']['ghn']} init vs default init, then SGD\n{result['setup']['split']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _steps(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip() and int(s) > 0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m train_ghn.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="timm names or local-dir:DIR folders from `ghn-init predict`")
    parser.add_argument("--split", choices=("ood", "id", "both"), help="add the protocol's OOD and/or ID architectures")
    parser.add_argument("--sgd-steps", type=_steps, help="comma-separated SGD budgets (default: "
                        f"{','.join(map(str, SGD_STEPS))} with --split, none for MODELs alone; 0 for none)")
    parser.add_argument("--ghn", help="GHN reference for timm names (default: the embedded GHN)")
    parser.add_argument("--full", action="store_true", help="all 10,000 test images (default: balanced 2,000)")
    parser.add_argument("--calibrate-bn", type=int, default=500, help="unlabeled train images for BN statistics "
                        "(0: keep the statistics the weights come with, data-free for predicted ones)")
    parser.add_argument("--train-images", type=int, help="SGD on only the first N train images (default: all 45,000)")
    parser.add_argument("--seed", type=int, default=0, help="default init, SGD batch order and flips")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--plot", help="write accuracy against SGD steps as a PNG here")
    args = parser.parse_args(argv)
    if not args.models and not args.split:
        parser.error("name MODELs, or --split ood|id|both")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    archs = [named_architecture(ref) for ref in args.models]
    if args.split in ("ood", "both"):
        archs += [a for a in ood_architectures() if a.name not in args.models]
    if args.split in ("id", "both"):
        archs += id_architectures()
    steps = args.sgd_steps if args.sgd_steps is not None else (SGD_STEPS if args.split else ())
    result = run_protocol(archs, args.ghn, args.full, args.calibrate_bn, steps, SGDRecipe(seed=args.seed),
                          args.train_images)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot_sgd(result, args.plot)
    return result


if __name__ == "__main__":
    main()
