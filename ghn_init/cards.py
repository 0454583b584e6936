"""Model cards (README.md with Hub YAML metadata) for GHNs and for the weights they predict."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import yaml

__all__ = ["ghn_card", "predicted_card"]


def _front_matter(meta: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def ghn_card(ghn: Any, evaluation_markdown: str | None = None) -> str:
    """Card of a GHN: what it was trained on, with which compute, and what it measured."""
    meta = ghn.meta
    training = meta.get("training", {})
    data = meta.get("data", {})
    header = _front_matter({
        "library_name": "ghn-init",
        "license": "apache-2.0",
        "tags": ["graph-hypernetwork", "ghn", "parameter-prediction", "timm", "image-classification"],
        "datasets": [data.get("dataset", "cifar10")],
        "pipeline_tag": "image-classification",
    })
    lines = [
        header,
        f"# {meta.get('name', 'GHN')}",
        "",
        "A graph hypernetwork (GHN-2 style) for ghn-init: it reads the computational "
        "graph of a timm (or any PyTorch) image classifier and predicts all of its parameters in one "
        "forward pass, as a starting point for training.",
        "",
        "```python",
        "import ghn_init, timm",
        'ghn = ghn_init.load("PATH_OR_REPO_ID")  # ghn_init.load() gives the embedded default',
        'model = timm.create_model("resnet18", num_classes=10)',
        "report = ghn.apply_(model)  # every parameter predicted; BN statistics at identity",
        "```",
        "",
        "## Training",
        "",
        f"- Data: {data.get('dataset', '?')} at {'x'.join(map(str, data.get('input_size', [])[1:]))} pixels, "
        f"normalized with mean {data.get('mean')} and std {data.get('std')}.",
        f"- Total: {training.get('steps')} meta-training steps "
        f"({training.get('skipped_steps', 0)} skipped as non-finite), {training.get('wall_time_s')} s of compute.",
        *[_stage_line(i, stage) for i, stage in enumerate(training.get("stages", [training]), 1)],
        f"- GHN hyper-parameters: `{json.dumps(dataclasses.asdict(ghn.config))}`.",
        "",
    ]
    if evaluation_markdown:
        lines += ["## Evaluation", "", evaluation_markdown.strip(), ""]
    return "\n".join(lines)


def _stage_line(index: int, stage: dict[str, Any]) -> str:
    config = stage.get("config", {})
    return (f"- Stage {index}: {stage.get('steps')} steps on {stage.get('device')} in {stage.get('wall_time_s')} s "
            f"(torch {stage.get('torch')}); architectures {json.dumps(config.get('mix', {}))}, pool of "
            f"{config.get('pool_size')} per family, meta-batch {config.get('meta_batch')}, image batch "
            f"{config.get('batch_size')}, AdamW lr {config.get('lr')} with warmup and cosine decay.")


def predicted_card(architecture: str, model_args: dict[str, Any], ghn_name: str, ghn_hash: str,
                   num_classes: int, data: dict[str, Any]) -> str:
    """Card of weights predicted by a GHN: what they are, and that they are not trained weights."""
    header = _front_matter({
        "library_name": "timm",
        "tags": ["image-classification", "timm", "ghn-init", "predicted-weights"],
        "base_model_relation": "adapter",
        "pipeline_tag": "image-classification",
        "ghn": {"name": ghn_name, "sha256": ghn_hash},
    })
    args = ", ".join(f"{k}={v!r}" for k, v in model_args.items())
    return "\n".join([
        header,
        f"# {architecture} initialized by a graph hypernetwork",
        "",
        f"These weights were **predicted**, not trained: the graph hypernetwork `{ghn_name}` "
        f"(sha256 `{ghn_hash[:16]}`) read the graph of `{architecture}` ({args}) and produced every "
        f"parameter in one forward pass. They classify {data.get('dataset', 'the GHN training data')} "
        f"({num_classes} classes) above chance and are meant as an initialization for fine-tuning.",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)',
        "```",
        "",
        f"Inputs: {data.get('input_size')} normalized with mean {data.get('mean')} and std {data.get('std')}. "
        "BatchNorm statistics are at identity (mean 0, variance 1): recalibrate them on a few hundred "
        "training images, or fine-tune, before evaluating in eval mode.",
        "",
    ])
