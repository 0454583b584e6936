"""Initialize a timm model larger than memory with GHN-predicted weights, through Accelerate's big-model loading.

    python examples/big_model.py vit_giant_patch14_224 --out giant-ghn --max-memory 1GiB
    python examples/big_model.py resnet18 --num-classes 10 --img-size 32 --out r18-ghn --stage predict
    python examples/big_model.py resnet18 --num-classes 10 --img-size 32 --out r18-ghn --stage load

The recipe never holds the whole model in memory:

1. ``accelerate.init_empty_weights()``: timm builds the model with its parameters on the meta device (no memory,
   no random init) and its constant buffers real (with timm's ``device="meta"`` those would stay unknown).
2. ``ghn_init.export.write_predicted_shards``: the GHN predicts one tensor at a time into safetensors shards plus
   ``model.safetensors.index.json``. Shard it: ``load_checkpoint_and_dispatch`` reads a single file whole.
3. ``accelerate.load_checkpoint_and_dispatch(model, folder, device_map="auto", ...)`` loads one shard at a time.
   On a CPU-only machine ``"auto"`` keeps every weight in RAM; ``max_memory={"cpu": ...}`` plus an
   ``offload_folder`` keeps that much in RAM and the rest on disk, read layer by layer during the forward pass.

Prints a JSON report: parameters, bytes of weights, where they went, seconds and the process's peak RSS after
each step (``--stage predict`` and ``--stage load`` in separate processes measure the steps apart).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from accelerate.utils import compute_module_sizes, infer_auto_device_map
from torch import nn

import ghn_init
from ghn_init.export import create_meta_model, input_size_for, write_predicted_shards
from ghn_init.streaming import SHARD_INDEX


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def empty_model(name: str, num_classes: int | None = None, img_size: int | None = None,
                **kwargs: Any) -> nn.Module:
    """timm's ``name`` with parameters on the meta device and real constant buffers (index tables, masks)."""
    _, model_args = create_meta_model(name, num_classes=num_classes, img_size=img_size, **kwargs)
    with init_empty_weights():
        model = timm.create_model(name, **model_args)
    saved = set(model.state_dict())
    unknown = [key for key, buffer in model.named_buffers() if buffer.is_meta and key not in saved]
    if unknown:
        raise ValueError(f"{name}: constant buffers {unknown[:3]} are computed from the parameters' device at build "
                         "time, so they stay on the meta device and no checkpoint holds them (Swin's attn_mask); "
                         "this recipe cannot load the model: build it with timm.create_model and use ghn.apply_ "
                         "if it fits in memory")
    return model


def repeated_block_classes(model: nn.Module) -> list[str]:
    """Classes of the innermost repeated blocks (ViT ``Block``, ResNet ``BasicBlock``): never split them across
    devices, or a residual sum would meet tensors on two devices."""
    found: set[str] = set()
    for container in model.modules():
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            continue
        counts = Counter(type(child).__name__ for child in container.children())
        for child in container.children():
            nested = any(isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) > 1 for m in child.modules())
            if counts[type(child).__name__] > 1 and not nested:
                found.add(type(child).__name__)
    return sorted(found)


def weights_bytes(model: nn.Module) -> int:
    return sum(math.prod(t.shape) * t.element_size() for t in model.state_dict().values())


def predict(ghn: ghn_init.GHN, model: nn.Module, out: Path, img_size: int | None,
            max_shard_size: int | str) -> Path:
    """Step 2: the GHN's weights for ``model`` as a sharded safetensors checkpoint in ``out``."""
    return write_predicted_shards(ghn, model, input_size_for(model, ghn, img_size), out, max_shard_size)


def load(model: nn.Module, checkpoint: Path, max_memory: int | str | None = None,
         offload_folder: Path | None = None) -> nn.Module:
    """Step 3: the checkpoint into ``model`` one shard at a time, placed by ``device_map="auto"``."""
    no_split = repeated_block_classes(model)
    budget = None if max_memory is None else {"cpu": max_memory}
    placed = budget and infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
    if placed and set(placed.values()) == {"disk"}:
        largest = max(compute_module_sizes(model)[name] for name, module in model.named_modules()
                      if type(module).__name__ in no_split or not list(module.children()))
        raise ValueError(f"max_memory {max_memory} leaves no weights in RAM: Accelerate keeps room for the largest "
                         f"block ({largest / 2**20:.0f} MiB) that runs from disk, and cannot offload a whole model "
                         "this way; give --max-memory more than that")
    # offload_buffers: without it, buffers of offloaded modules (BatchNorm statistics) keep the empty model's values.
    return load_checkpoint_and_dispatch(model, str(checkpoint), device_map="auto", no_split_module_classes=no_split,
                                        max_memory=budget, offload_folder=offload_folder, offload_buffers=True)


def placement(model: nn.Module) -> dict[str, int]:
    """Bytes of weights per device of ``model.hf_device_map`` (``disk``: offloaded, read at forward time)."""
    sizes = compute_module_sizes(model)
    placed: Counter[str] = Counter()
    for module, device in getattr(model, "hf_device_map", {"": "cpu"}).items():
        placed[str(device)] += sizes[module]
    return dict(placed)


def forward_check(model: nn.Module, img_size: int | None) -> dict[str, Any]:
    """One forward pass on random images: the loaded model runs and gives finite outputs."""
    channels, height, width = timm.data.resolve_model_data_config(model)["input_size"]
    if img_size is not None:
        height = width = img_size
    x = torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        out = model(x)
    if not torch.isfinite(out).all():
        raise RuntimeError(f"forward pass at {tuple(x.shape)} gave non-finite outputs; the checkpoint may be corrupt")
    return {"input": list(x.shape), "output": list(out.shape), "output_std": round(float(out.std()), 4)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="timm architecture name, e.g. vit_giant_patch14_224")
    parser.add_argument("--out", type=Path, required=True, help="folder of the sharded checkpoint")
    parser.add_argument("--stage", choices=("all", "predict", "load"), default="all",
                        help="predict: write the checkpoint; load: load --out and run a forward pass; all: both")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--img-size", type=int, help="img_size kwarg for models that take one; the forward's size")
    parser.add_argument("--ghn", help="GHN reference: Hub repo or folder (default: the embedded GHN)")
    parser.add_argument("--max-shard-size", default="500MB", help="bytes per shard, e.g. 500MB or 2GiB")
    parser.add_argument("--max-memory", help="RAM for weights, e.g. 1GiB; the rest is offloaded to disk "
                                             "(default: all in RAM when it fits)")
    parser.add_argument("--offload-folder", type=Path, help="where offloaded weights go (default: OUT/offload)")
    parser.add_argument("--report", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)

    report: dict[str, Any] = {"model": args.model, "stage": args.stage, "peak_rss_after_imports": peak_rss()}
    started = time.perf_counter()
    model = empty_model(args.model, num_classes=args.num_classes, img_size=args.img_size)
    report.update(params=sum(p.numel() for p in model.parameters()), weights_bytes=weights_bytes(model))
    checkpoint = args.out / SHARD_INDEX
    if args.stage in ("all", "predict"):
        predict(ghn_init.load(args.ghn), model, args.out, args.img_size, args.max_shard_size)
        report.update(predict_s=round(time.perf_counter() - started, 1), peak_rss_after_predict=peak_rss(),
                      shards=len(set(json.loads(checkpoint.read_text())["weight_map"].values())))
    if args.stage in ("all", "load"):
        if not checkpoint.is_file():
            parser.error(f"{checkpoint} not found: run --stage predict (or all) with the same --out first")
        offload = (args.offload_folder or args.out / "offload") if args.max_memory else None
        loading = time.perf_counter()
        model = load(model, checkpoint, args.max_memory, offload)
        report.update(load_s=round(time.perf_counter() - loading, 1), peak_rss_after_load=peak_rss(),
                      placement=placement(model), max_memory=args.max_memory)
        running = time.perf_counter()
        report.update(forward_check(model, args.img_size), forward_s=round(time.perf_counter() - running, 1),
                      peak_rss_after_forward=peak_rss())
    report["peak_rss"] = peak_rss()
    print(json.dumps(report))
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
