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
import functools
import json
from typing import Any

__all__ = ["GHN_PAPER", "INSTALL", "accuracy_labels", "architecture_has_batchnorm", "compute_summary", "ghn_card",
           "predicted_card"]

#: GHN-2, "Parameter Prediction for Unseen Deep Architectures" (NeurIPS 2021): the method of ghn-init's GHNs.
GHN_PAPER = "2110.13100"
_LICENSE = "apache-2.0"
_DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet-1k": "ImageNet-1k"}
#: How a card's reader gets ghn-init (its README has the Python versions and a CPU-only torch).
INSTALL = ("Install ghn-init from its source checkout with `pip install .` (a virtual environment is best; "
           "its README lists the supported Python versions and how to get a CPU-only torch).")


def architecture_has_batchnorm(name: str, kwargs: dict[str, Any]) -> bool | None:
    """Whether timm's ``name`` built with ``kwargs`` has BatchNorm; None when it cannot be built here."""
    return _has_batchnorm(name, json.dumps(kwargs, sort_keys=True))


@functools.lru_cache(maxsize=256)
def _has_batchnorm(name: str, kwargs_json: str) -> bool | None:
    from .export import create_meta_model, has_batchnorm

    try:
        model, _ = create_meta_model(name, **json.loads(kwargs_json))
    except ValueError:
        return None
    return has_batchnorm(model)


def accuracy_labels(name: str, kwargs: dict[str, Any]) -> dict[str, str]:
    """What the quality benchmark's two accuracies mean for one architecture.

    ``acc_bn_calibrated`` is eval mode after recalibrating BatchNorm and ``acc_batch_stats`` is train
    mode; a model without BatchNorm has nothing to recalibrate, so its labels say only the mode.
    """
    if architecture_has_batchnorm(name, kwargs) is False:
        return {"acc_bn_calibrated": "eval mode (no BatchNorm)", "acc_batch_stats": "train mode (no BatchNorm)"}
    return {"acc_bn_calibrated": "BN recalibrated", "acc_batch_stats": "batch statistics"}


def compute_summary(stages: list[dict[str, Any]]) -> str:
    """Wall time per kind of device (``cuda``, ``cpu``) summed over the training stages, in minutes."""
    minutes: dict[str, float] = {}
    for stage in stages:
        kind = str(stage.get("device", "unknown")).split(":")[0]
        minutes[kind] = minutes.get(kind, 0.0) + stage.get("wall_time_s", 0.0) / 60
    return ", ".join(f"{value:.1f} minutes on {kind}" for kind, value in minutes.items())


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
            for key, how in accuracy_labels(name, row.get("kwargs", {})).items():
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
        f'model = timm.create_model("resnet18", num_classes={data.get("num_classes", 10)})',
        "report = ghn.apply_(model)  # every parameter predicted; BN statistics calibrated data-free",
        "```",
        "",
        INSTALL,
        "",
        "## Training",
        "",
    ]
    if data:
        lines.append(f"- Data: {dataset} at {'x'.join(map(str, data.get('input_size', [])[1:]))} pixels, "
                     f"normalized with mean {data.get('mean')} and std {data.get('std')}.")
    if stages:
        lines.append(f"- Total: {training.get('steps')} meta-training steps ({training.get('skipped_steps', 0)} "
                     f"skipped as non-finite), {training.get('wall_time_s')} s of compute: "
                     f"{compute_summary(stages)}.")
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


def _measured_lines(evaluation: list[dict[str, Any]], architecture: str, model_args: dict[str, Any],
                    batchnorm: bool) -> list[str]:
    """What the GHN's own evaluation (its config.json) measured for this architecture, or for all of them."""
    if not evaluation:
        return ["The GHN's evaluation (its config.json) has no result for weights with these classes and this input "
                "size, so their accuracy is unknown."]
    lines = []
    for result in evaluation:
        row = result.get("architectures", {}).get(architecture)
        split = result.get("setup", {}).get("split", "test")
        if row is None or row.get("kwargs", {}) != model_args:
            continue
        ghn, default = row.get("ghn", {}), row.get("default_init", {})
        if batchnorm:
            measured = (f"{ghn['acc_bn_calibrated']:.1%} with BatchNorm recalibrated on "
                        f"{result['setup'].get('calibrate_bn_images')} unlabeled train images, "
                        f"{ghn['acc_batch_stats']:.1%} with batch statistics")
        else:
            measured = f"{ghn['acc_bn_calibrated']:.1%} in eval mode"
        baseline = (f"; timm's default init: {default['acc_bn_calibrated']:.1%}" if "acc_bn_calibrated" in default
                    else "")
        lines.append(f"- {split}: {measured}{baseline}.")
    if lines:
        return ["Accuracy of exactly these weights, measured by the GHN's evaluation (its config.json):", "", *lines]
    means = [f"{r['mean_ghn_acc_bn_calibrated']:.1%} on {r.get('setup', {}).get('split', 'test')}"
             for r in evaluation if "mean_ghn_acc_bn_calibrated" in r]
    return [f"Not measured for `{architecture}` with these arguments; over the {len(evaluation[0]['architectures'])} "
            f"architectures of the GHN's evaluation, predicted weights averaged {' and '.join(means)} (see the "
            "GHN's card)."]


def _bn_sentence(record: dict[str, Any] | None, batchnorm: bool) -> str:
    """What the card says about BatchNorm statistics, from the weights file's ``bn_calibration`` record."""
    method = (record or {}).get("method", "identity" if batchnorm else "none")
    if method == "none":
        return "The model has no BatchNorm, so there are no statistics to recalibrate."
    if method == "images":
        return (f"BatchNorm statistics were calibrated on {record['images']} {record['source']} at "
                f"{'x'.join(map(str, record['input_size'][1:]))} pixels.")
    if method == "identity":
        why = f" because {record['reason']}" if record and record.get("reason") else ""
        return (f"BatchNorm statistics are at identity (mean 0, variance 1){why}: recalibrate them on a few hundred "
                "training images (`ghn_init.calibrate_batchnorm(model, images)`), or fine-tune, before evaluating "
                "in eval mode.")
    return (f"BatchNorm statistics were calibrated without data ({method}): on {record['images']} synthetic images at "
            f"{'x'.join(map(str, record['input_size'][1:]))} pixels ({record['inputs']}, seed {record['seed']}), so "
            "eval mode gives outputs of a sane scale. Statistics from real training images are better: "
            "`ghn_init.calibrate_batchnorm(model, images)` on a few hundred of them, or `ghn-init predict "
            "--calibrate-bn 500`.")


def predicted_card(architecture: str, model_args: dict[str, Any], ghn_name: str, ghn_hash: str,
                   num_classes: int, data: dict[str, Any], *, evaluation: list[dict[str, Any]] | None = None,
                   batchnorm: bool = True, license: str = _LICENSE, bn_calibration: dict[str, Any] | None = None
                   ) -> str:
    """Card of weights predicted by a GHN: what they are, and that they are not trained weights.

    ``data`` is the GHN's data config with the input size and normalization of these weights;
    ``evaluation`` the GHN's measured accuracies (its config.json) where they apply (same classes and
    input size), quoted for exactly this architecture and these arguments; ``batchnorm`` whether the
    model has BatchNorm; ``bn_calibration`` how its statistics were made (the weights file's record;
    None: left at identity).
    """
    dataset = data.get("dataset")
    dataset_name = _DATASET_NAMES.get(dataset, dataset) if dataset else "the GHN's training data"
    header = _front_matter(
        library_name="timm",
        license=license,
        tags=["image-classification", "timm", "ghn-init", "predicted-weights", f"timm:{architecture}"],
        datasets=[dataset] if dataset else None,
        pipeline_tag="image-classification",
        ghn_init={"architecture": architecture, "model_args": model_args, "num_classes": num_classes,
                  "ghn": ghn_name, "ghn_sha256": ghn_hash,
                  "bn_calibration": (bn_calibration or {}).get("method", "identity" if batchnorm else "none")},
    )
    built = (f"`{architecture}` ({', '.join(f'{k}={v!r}' for k, v in model_args.items())})" if model_args
             else f"`{architecture}` (timm's default arguments)")
    trained_classes = data.get("num_classes")
    if trained_classes is None or trained_classes == num_classes:
        classes = f"They classify {dataset_name} ({num_classes} classes) above chance"
    else:
        classes = (f"The GHN learned on {dataset_name} ({trained_classes} classes); this {num_classes}-way classifier "
                   "is predicted the same way but has no trained meaning")
    norm = _bn_sentence(bn_calibration, batchnorm)
    return "\n".join([
        header,
        f"# {architecture} initialized by a graph hypernetwork",
        "",
        f"These weights were **predicted**, not trained: the graph hypernetwork `{ghn_name}` "
        f"(sha256 `{ghn_hash[:16]}`) read the graph of {built} and produced every "
        f"parameter in one forward pass. {classes}; they are meant as an initialization for fine-tuning.",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("hf-hub:REPO_ID", pretrained=True)  # this repo on the Hub',
        'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)  # a local copy',
        "```",
        "",
        "Plain timm loads these weights; ghn-init, which predicted them, does the same for other architectures. "
        + INSTALL,
        "",
        f"Inputs: {data.get('input_size')} normalized with mean {data.get('mean')} and std {data.get('std')}. {norm}",
        "",
        *_measured_lines(evaluation or [], architecture, model_args, batchnorm),
        "",
    ])
