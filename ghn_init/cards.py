"""Model cards (README.md with Hub YAML metadata) for GHNs and for the weights they predict.

The front matter is built with ``huggingface_hub.ModelCardData`` so it has the layout the Hub
indexes: ``library_name`` (``ghn-init`` for GHNs, ``timm`` for predicted weights, which timm loads
with ``hf-hub:``), ``license``, ``tags``, ``datasets`` and, for GHNs with measured accuracies, a
``model-index``. The architecture of predicted weights is a ``timm:<name>`` tag and, with the GHN
that made them, a ``ghn_init`` block like the one in their config.json (``base_model`` would have
to name a Hub repo, which an architecture is not).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

__all__ = ["GHN_PAPER", "ghn_card", "predicted_card"]

#: GHN-2, "Parameter Prediction for Unseen Deep Architectures" (NeurIPS 2021): the method of ghn-init's GHNs.
GHN_PAPER = "2110.13100"
_LICENSE = "apache-2.0"
_DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet-1k": "ImageNet-1k"}


def _front_matter(**fields: Any) -> str:
    from huggingface_hub import ModelCardData

    return "---\n" + ModelCardData(**fields).to_yaml() + "\n---\n"


def _eval_results(results: list[dict[str, Any]], dataset: str) -> list[Any]:
    """``EvalResult`` rows for the quality benchmark's JSON (benchmarks/default_ghn_quality.py)."""
    from huggingface_hub import EvalResult

    rows = []
    for result in results:
        split = result["setup"]["split"]
        for name, row in result["architectures"].items():
            label = f"{name} {json.dumps(row.get('kwargs', {}))}" if row.get("kwargs") else name
            for key, how in (("acc_bn_calibrated", "BN recalibrated"), ("acc_batch_stats", "batch statistics")):
                if row.get("ghn", {}).get(key) is None:
                    continue
                rows.append(EvalResult(
                    task_type="image-classification", dataset_type=dataset,
                    dataset_name=_DATASET_NAMES.get(dataset, dataset), dataset_split=split,
                    metric_type="accuracy", metric_value=row["ghn"][key],
                    metric_name=f"{label}: predicted weights, {how}"))
    return rows


def ghn_card(ghn: Any, evaluation_markdown: str | None = None, *, evaluation: list[dict[str, Any]] | None = None,
             repo_id: str | None = None) -> str:
    """Card of a GHN: what it was trained on, with which compute, and what it measured.

    ``evaluation`` (default: ``ghn.meta["evaluation"]``) holds quality-benchmark results; they
    become the card's ``model-index``, the numbers the Hub shows. ``repo_id`` goes into the usage
    example.
    """
    meta = ghn.meta
    name = meta.get("name", "ghn")
    training = meta.get("training", {})
    data = meta.get("data", {})
    dataset = data.get("dataset")
    evaluation = evaluation if evaluation is not None else meta.get("evaluation", [])
    results = _eval_results(evaluation, dataset or "cifar10")
    header = _front_matter(
        library_name="ghn-init",
        license=meta.get("license", _LICENSE),
        tags=["graph-hypernetwork", "ghn", "parameter-prediction", "timm", "image-classification",
              f"arxiv:{GHN_PAPER}"],
        datasets=[dataset] if dataset else None,
        model_name=name if results else None,
        eval_results=results or None,
    )
    stages = training.get("stages", [training]) if training else []
    lines = [
        header,
        f"# {name}",
        "",
        "A graph hypernetwork (GHN-2 style, arXiv:2110.13100) for ghn-init: it reads the computational "
        "graph of a timm (or any PyTorch) image classifier and predicts all of its parameters in one "
        "forward pass, as a starting point for training.",
        "",
        "```python",
        "import ghn_init, timm",
        f'ghn = ghn_init.load("{repo_id or "PATH_OR_REPO_ID"}")  # ghn_init.load() gives the embedded default',
        'model = timm.create_model("resnet18", num_classes=10)',
        "report = ghn.apply_(model)  # every parameter predicted; BN statistics calibrated data-free",
        "```",
        "",
        "## Training",
        "",
    ]
    if data:
        lines.append(f"- Data: {dataset} at {'x'.join(map(str, data.get('input_size', [])[1:]))} pixels, "
                     f"normalized with mean {data.get('mean')} and std {data.get('std')}.")
    if stages:
        lines.append(f"- Total: {training.get('steps')} meta-training steps ({training.get('skipped_steps', 0)} "
                     f"skipped as non-finite), {training.get('wall_time_s')} s of compute.")
        lines += [_stage_line(i, stage) for i, stage in enumerate(stages, 1)]
    else:
        lines.append("- No meta-training is recorded in this GHN's config.json: its weights may be untrained.")
    lines += [f"- GHN hyper-parameters: `{json.dumps(dataclasses.asdict(ghn.config))}`.", ""]
    if evaluation_markdown:
        lines += ["## Evaluation", "", evaluation_markdown.strip(), ""]
    return "\n".join(lines)


def _stage_line(index: int, stage: dict[str, Any]) -> str:
    config = stage.get("config", {})
    return (f"- Stage {index}: {stage.get('steps')} steps on {stage.get('device')} in {stage.get('wall_time_s')} s "
            f"(torch {stage.get('torch')}); architectures {json.dumps(config.get('mix', {}))}, pool of "
            f"{config.get('pool_size')} per family, meta-batch {config.get('meta_batch')}, image batch "
            f"{config.get('batch_size')}, AdamW lr {config.get('lr')} with warmup and cosine decay.")


def _bn_sentence(record: dict[str, Any] | None) -> str:
    """What the card says about BatchNorm running statistics, from the file's ``bn_calibration`` record."""
    method = (record or {}).get("method", "identity")
    if method == "none":
        return "The model has no BatchNorm running statistics: eval mode needs no calibration."
    if method == "images":
        return (f"BatchNorm running statistics were calibrated on {record['images']} {record['source']} "
                f"at {'x'.join(map(str, record['input_size'][1:]))} pixels.")
    if method == "identity":
        why = f" because {record['reason']}" if record and record.get("reason") else ""
        return (f"BatchNorm statistics are at identity (mean 0, variance 1){why}: recalibrate them on a few hundred "
                "training images (`ghn_init.calibrate_batchnorm(model, images)`), or fine-tune, before evaluating "
                "in eval mode.")
    return (f"BatchNorm running statistics were calibrated without data ({method}): on {record['images']} synthetic "
            f"images at {'x'.join(map(str, record['input_size'][1:]))} pixels ({record['inputs']}, seed "
            f"{record['seed']}), so eval mode gives outputs of a sane scale. Statistics from real training images "
            "are better: `ghn_init.calibrate_batchnorm(model, images)` on a few hundred of them, or "
            "`ghn-init predict --calibrate-bn 500`.")


def predicted_card(architecture: str, model_args: dict[str, Any], ghn_name: str, ghn_hash: str,
                   num_classes: int, data: dict[str, Any], *, license: str = _LICENSE,
                   bn_calibration: dict[str, Any] | None = None) -> str:
    """Card of weights predicted by a GHN: what they are, that they are not trained weights, and how
    their BatchNorm statistics were made (``bn_calibration``: the safetensors file's record; None: identity)."""
    dataset = data.get("dataset")
    header = _front_matter(
        library_name="timm",
        license=license,
        tags=["image-classification", "timm", "ghn-init", "predicted-weights", f"timm:{architecture}"],
        datasets=[dataset] if dataset else None,
        pipeline_tag="image-classification",
        ghn_init={"architecture": architecture, "model_args": model_args, "num_classes": num_classes,
                  "ghn": ghn_name, "ghn_sha256": ghn_hash,
                  "bn_calibration": (bn_calibration or {}).get("method", "identity")},
    )
    args = ", ".join(f"{k}={v!r}" for k, v in model_args.items())
    return "\n".join([
        header,
        f"# {architecture} initialized by a graph hypernetwork",
        "",
        f"These weights were **predicted**, not trained: the graph hypernetwork `{ghn_name}` "
        f"(sha256 `{ghn_hash[:16]}`) read the graph of `{architecture}` ({args}) and produced every "
        f"parameter in one forward pass. They classify {dataset or 'the GHN training data'} "
        f"({num_classes} classes) above chance and are meant as an initialization for fine-tuning.",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("hf-hub:REPO_ID", pretrained=True)  # this repo on the Hub',
        'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)  # a local copy',
        "```",
        "",
        f"Inputs: {data.get('input_size')} normalized with mean {data.get('mean')} and std {data.get('std')}. "
        + _bn_sentence(bn_calibration),
        "",
    ])
