"""Fine-tune a timm model on CIFAR-10 from GHN-predicted weights (or timm's default init) with Accelerate.

    python examples/finetune.py resnet18 --steps 500
    python examples/finetune.py vit_tiny_patch16_224 --img-size 32 --kwarg patch_size=4 --init default
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        examples/finetune.py resnet18 --cpu --steps 500

The last line is how to get two processes on a CPU: ``accelerate launch --cpu --num_processes 2`` starts ONE.
The main process prints how many processes ran, and says so when that is fewer than the launch asked for.

Recipe (DESIGN.md, ``train_ghn.sgd.SGDRecipe``): timm's SGD (Nesterov momentum 0.9, weight decay 5e-4
except on biases and norms), one-cycle lr peaking at 0.05, batch 64 per process, random horizontal
flips, optional label smoothing; BatchNorm models are evaluated in eval mode after training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import timm
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object, set_seed
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

import ghn_init
from train_ghn.data import balanced_test_indices, load_cifar10, normalize
from train_ghn.sgd import SGDRecipe

Split = tuple[torch.Tensor, torch.Tensor]


def build_model(name: str, init: str, ghn_ref: str | None = None, **timm_kwargs: Any) -> nn.Module:
    """A 10-class timm model with GHN-predicted weights (``init="ghn"``) or timm's own init (``"default"``)."""
    if init == "ghn":
        return ghn_init.create_model(name, ghn=ghn_init.load(ghn_ref), num_classes=10, **timm_kwargs)
    return timm.create_model(name, num_classes=10, **timm_kwargs)


def load_data(train_images: int | None = None, test_per_class: int = 1000) -> tuple[Split, Split]:
    """First ``train_images`` of the train split (default all 45,000) and the first ``test_per_class`` test
    images of each class (1,000 = the full test split, 200 = the balanced 2,000)."""
    train = load_cifar10("train", indices=None if train_images is None else np.arange(train_images))
    images, labels = load_cifar10("test")
    keep = balanced_test_indices(labels, test_per_class)
    return train, (images[keep], labels[keep])


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names and raw bytes: equal checksums mean bit-identical weights on two ranks."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _forever(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def finetune(model: nn.Module, train: Split, test: Split, accelerator: Accelerator, *, steps: int | None = None,
             epochs: float | None = None, recipe: SGDRecipe | None = None, label_smoothing: float = 0.0,
             progress: bool = True) -> dict[str, Any]:
    """Train ``model`` with the SGD recipe, then test it; every rank starts from rank 0's weights.

    Returns the test accuracy, the loss curve (means over 25-step windows, main process) and the
    per-rank checksums of the initial weights.
    """
    recipe = recipe or SGDRecipe()
    set_seed(recipe.seed)
    model.to(accelerator.device)
    predicted = state_checksum(model.state_dict())
    # DDP broadcasts at prepare(); FSDP, DeepSpeed or no wrapper do not, so make rank 0's state everyone's
    model.load_state_dict(broadcast(model.state_dict(), from_process=0))
    initial = state_checksum(model.state_dict())
    order = torch.Generator().manual_seed(recipe.seed)
    train_loader = DataLoader(TensorDataset(*train), batch_size=recipe.batch_size, shuffle=True, drop_last=True,
                              generator=order)
    test_loader = DataLoader(TensorDataset(*test), batch_size=250)
    total = steps or max(1, round((epochs or 1) * len(train_loader) / accelerator.num_processes))
    optimizer = create_optimizer_v2(model, opt="sgd", lr=recipe.lr, weight_decay=recipe.weight_decay,
                                    momentum=recipe.momentum)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=total)
    model, optimizer, train_loader, test_loader, schedule = accelerator.prepare(
        model, optimizer, train_loader, test_loader, schedule)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    flips = torch.Generator().manual_seed(recipe.seed + accelerator.process_index)
    losses, started = [], time.perf_counter()
    model.train()
    bar = tqdm(range(total), disable=not (progress and accelerator.is_local_main_process), desc="fine-tune")
    for _, (x, y) in zip(bar, _forever(train_loader)):
        flip = (torch.rand(len(x), generator=flips) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        loss = criterion(model(normalize(x)), y)
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    train_s = time.perf_counter() - started
    model.eval()
    hits = seen = 0
    with torch.no_grad():
        for x, y in test_loader:
            pred, y = accelerator.gather_for_metrics((model(normalize(x)).argmax(1), y))
            hits, seen = hits + int((pred == y).sum()), seen + len(y)
    curve = [round(float(np.mean(losses[i:i + 25])), 4) for i in range(0, len(losses), 25)]
    return {"accuracy": hits / seen, "test_images": seen, "steps": total, "train_s": round(train_s, 1),
            "loss_curve": curve, "predicted_sha256": gather_object([predicted]),
            "initial_sha256": gather_object([initial])}


CPU_LAUNCH = ("accelerate launch --multi_gpu --num_processes N --num_machines 1 --mixed_precision no "
              "--dynamo_backend no examples/finetune.py ... --cpu")


def process_count_message(num_processes: int, env: Mapping[str, str] = os.environ) -> str:
    """How many processes ran, and a plain warning when the launch asked for more.

    ``WORLD_SIZE`` is the count torchrun (and ``accelerate launch --multi_gpu``) started. Without
    ``--multi_gpu``, or with ``--cpu``, ``accelerate launch`` runs its simple launcher: one process whatever
    ``--num_processes`` says, with ``MASTER_ADDR`` set only when that asked for more than one.
    """
    message = f"{num_processes} process{'es' if num_processes > 1 else ''} ran"
    asked = env.get("WORLD_SIZE")
    if asked is not None and asked.isdigit() and int(asked) != num_processes:
        return f"{message}, but WORLD_SIZE asked for {asked}: check the launcher and the Accelerator's settings"
    if num_processes == 1 and asked is None and "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env:
        return (f"{message}, but accelerate launch asked for more: without --multi_gpu (or with --cpu) it starts "
                f"ONE process whatever --num_processes says. For N CPU processes run: {CPU_LAUNCH}")
    return message


def _kwarg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--kwarg expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="timm architecture name, e.g. resnet18")
    parser.add_argument("--init", choices=("ghn", "default"), default="ghn")
    parser.add_argument("--ghn", help="GHN reference: Hub repo or folder (default: the embedded GHN)")
    parser.add_argument("--img-size", type=int, help="img_size kwarg for models that take one (ViTs, Swins)")
    parser.add_argument("--kwarg", type=_kwarg, action="append", default=[], metavar="KEY=VALUE",
                        help="extra timm.create_model kwarg (repeatable; VALUE parsed as JSON where possible)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    budget.add_argument("--epochs", type=float)
    parser.add_argument("--batch-size", type=int, default=SGDRecipe.batch_size, help="per process")
    parser.add_argument("--lr", type=float, default=SGDRecipe.lr, help="peak of the one-cycle schedule")
    parser.add_argument("--weight-decay", type=float, default=SGDRecipe.weight_decay)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=SGDRecipe.seed)
    parser.add_argument("--train-images", type=int, help="use the first N train images (default: all 45,000)")
    parser.add_argument("--test-per-class", type=int, default=1000, help="1000: full test split; 200: balanced 2,000")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (gloo between processes)")
    parser.add_argument("--report", help=argparse.SUPPRESS)  # JSON with per-rank weight checksums, for tests
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=args.cpu)
    if accelerator.is_main_process:
        print(process_count_message(accelerator.num_processes), flush=True)
    kwargs = dict(args.kwarg, **({"img_size": args.img_size} if args.img_size else {}))
    set_seed(args.seed)
    with accelerator.main_process_first():  # rank 0 predicts and caches; the others read the cache
        model = build_model(args.model, args.init, args.ghn, **kwargs)
        train, test = load_data(args.train_images, args.test_per_class)
    recipe = SGDRecipe(batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed)
    result = finetune(model, train, test, accelerator, steps=args.steps, epochs=args.epochs, recipe=recipe,
                      label_smoothing=args.label_smoothing)
    result.update(model=args.model, init=args.init, kwargs=kwargs, num_processes=accelerator.num_processes)
    if accelerator.is_main_process:
        print(f"{args.model} ({args.init} init): test accuracy {result['accuracy']:.2%} on "
              f"{result['test_images']} images after {result['steps']} steps")
        if args.report:
            with open(args.report, "w") as f:
                json.dump(result, f, indent=2)
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
