"""Predicted weights as a folder that plain timm loads: ``timm.create_model("local-dir:DIR", pretrained=True)``.

The folder holds ``config.json`` in timm's layout (architecture, num_classes, model_args and a
pretrained_cfg with the normalization the GHN was trained with, plus a ``ghn_init`` block naming
the GHN by content hash and how BatchNorm statistics were calibrated), ``model.safetensors`` and a
``README.md`` model card. Nothing from timm's registry that would be false for predicted weights
(license, paper) is copied; the registry's tag is, because some timm builders derive the
architecture from it (Inception-v3's aux head, DeepSeek and Qwen3 ViT encoders' widths), and a
``description`` says where the weights come from.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .batchnorm import calibrate_predicted, has_running_stats
from .cards import predicted_card
from .ghn import GHN, norm_statistics
from .graph import GraphBuildError, _default_input_size, build_graph
from .hub import DEFAULT_NAME, content_hash, staged_folder
from .streaming import write_safetensors, write_safetensors_shards

__all__ = ["MAX_CALIBRATION_BYTES", "bn_calibration", "create_meta_model", "create_target_model", "has_batchnorm",
           "input_size_for", "save_predicted", "similar_models", "write_predicted", "write_predicted_shards"]

logger = logging.getLogger(__name__)

#: Predicted weights up to this size get BatchNorm statistics calibrated in memory; larger models are
#: streamed to their file one tensor at a time, statistics at identity (BatchNorm models are far smaller).
MAX_CALIBRATION_BYTES = 4 * 2**30

logger = logging.getLogger(__name__)

#: Structural facts of the registry cfg that stay true for predicted weights.
_STRUCTURAL_CFG_KEYS = ("tag", "first_conv", "classifier", "fixed_input_size")


def _accepts_img_size(name: str) -> bool:
    import timm

    try:
        timm.create_model(name, img_size=32, num_classes=1, device="meta")
    except TypeError as err:
        if "img_size" in str(err):
            return False
        raise
    except Exception:  # noqa: BLE001 - a model that takes img_size may still reject 32; that is not our question
        return True
    return True


def similar_models(name: str, limit: int = 5) -> list[str]:
    """timm architectures whose names are close to ``name`` (typos first, then names containing it)."""
    import timm

    names = timm.list_models()
    typos = difflib.get_close_matches(name, names, n=limit, cutoff=0.8)
    return list(dict.fromkeys([*typos, *(n for n in names if name and name in n)]))[:limit]


def create_meta_model(name: str, num_classes: int | None = None, img_size: int | Sequence[int] | None = None,
                      **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model`` on the meta device; returns the model and the kwargs that rebuild it.

    ``img_size`` is passed to models that take it; for the others it only sets the input size.
    """
    import timm

    if not timm.is_model(name):
        close = similar_models(name)
        raise ValueError(f"unknown timm architecture {name!r}" + (f"; did you mean {' or '.join(close)}?" if close
                                                                     else "; see timm.list_models()"))
    model_args = dict(kwargs)
    if num_classes is not None:
        model_args["num_classes"] = num_classes
    if img_size is not None and "img_size" not in model_args and _accepts_img_size(name):
        model_args["img_size"] = img_size
    try:
        model = timm.create_model(name, device="meta", **model_args)
    except Exception as err:
        raise ValueError(f"timm.create_model({name!r}, **{model_args}) failed: {type(err).__name__}: {err}") from err
    saved_buffers = set(model.state_dict()) - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    unsaved_buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)} - saved_buffers
    # Saved constants (index tables) need real values, and so do unsaved ones where BatchNorm
    # calibration runs the model.
    if saved_buffers - set(norm_statistics(model)) or (unsaved_buffers and has_running_stats(model)):
        with parameters_on_meta():
            model = timm.create_model(name, **model_args)
    return model, model_args


def create_target_model(name: str, ghn: Any, num_classes: int | None = None,
                        img_size: int | Sequence[int] | None = None, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The model ``ghn`` predicts for: on the meta device when the GHN predicts every tensor, else built
    on the CPU, since published GHNs keep some tensors (layer scales, class tokens) at the model's init."""
    import timm

    model, model_args = create_meta_model(name, num_classes=num_classes, img_size=img_size, **kwargs)
    if getattr(ghn, "predicts_on_meta", True):
        return model, model_args
    return timm.create_model(name, **model_args), model_args


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with buffers computed on the CPU but parameters on the meta device.

    Each parameter moves to meta as it is registered, before any init touches it, so a model whose
    constant buffers need real values costs no memory or time for weights the GHN replaces.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def input_size_for(model: nn.Module, ghn: GHN, img_size: int | Sequence[int] | None,
                   in_chans: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) to trace ``model`` at: ``img_size`` (S or (H, W)) if given, the size a fixed-size model was
    built for, else the size the GHN was trained at, or the model's own size where it cannot run at that one.
    ``in_chans`` is the channel count the model was built with (timm before 1.0.31 keeps no ``model.in_chans``).

    It is also the ``input_size`` of a predicted folder's config, from which timm sets ``img_size``
    for fixed-size models: it must be the size the model was built for.
    """
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    channels = int(in_chans or getattr(model, "in_chans", None) or cfg.get("input_size", (3,))[0])
    if img_size is not None:
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size
        return channels, height, width
    own = _default_input_size(model)
    if cfg.get("fixed_input_size"):
        return channels, own[1], own[2]
    trained = ghn.data_config.get("input_size", cfg.get("input_size", (3, 224, 224)))
    size = (channels, trained[1], trained[2])
    if size[1:] != tuple(own[1:]):
        try:
            build_graph(model, size)
        except GraphBuildError as err:  # too small for its downsampling, or sizes fixed in its layers
            logger.warning("%s does not run at the GHN's %dx%d inputs, so it is predicted at its own size %dx%d: %s",
                           cfg.get("architecture") or type(model).__name__, size[1], size[2], own[1], own[2], err)
            return channels, own[1], own[2]
    return size


def _calibrated_tensors(ghn: GHN, model: nn.Module, input_size: tuple[int, ...], calibrate_bn: bool,
                        images: torch.Tensor | None, source: str | None,
                        max_bytes: int) -> tuple[Iterable[tuple[str, torch.Tensor]], dict[str, Any]]:
    """The predicted tensors to write, BatchNorm statistics calibrated when that fits in memory, and what was done."""
    size = sum(ref.numel() * ref.element_size() for ref in model.state_dict().values())
    if not has_running_stats(model):
        return ghn.predict_tensors(model, input_size), {"method": "none",
                                                        "reason": "the model has no BatchNorm running statistics"}
    if not calibrate_bn:
        return ghn.predict_tensors(model, input_size), {"method": "identity", "reason": "calibration was turned off"}
    if size > max_bytes:
        reason = (f"{size / 2**30:.1f} GiB of weights exceed the {max_bytes / 2**30:.1f} GiB limit for calibrating "
                  "in memory, so they were streamed to the file; calibrate after loading with "
                  "ghn_init.calibrate_batchnorm")
        logger.warning("%s: BatchNorm statistics left at identity: %s", type(model).__name__, reason)
        return ghn.predict_tensors(model, input_size), {"method": "identity", "reason": reason}
    state = dict(ghn.predict_tensors(model, input_size))  # the interface every GHN family has
    record = calibrate_predicted(model, state, input_size, ghn.data_config, images=images, source=source)
    return state.items(), record


def write_predicted(ghn: GHN, model: nn.Module, input_size: tuple[int, ...], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None, *, calibrate_bn: bool = True,
                    calibration_images: torch.Tensor | None = None, calibration_source: str | None = None,
                    max_calibration_bytes: int = MAX_CALIBRATION_BYTES) -> Path:
    """Write ``ghn``'s prediction for ``model`` into a safetensors file, BatchNorm statistics calibrated.

    Statistics come from ``calibration_images`` (normalized, described by ``calibration_source``)
    or else data-free (:func:`ghn_init.batchnorm.calibrate_predicted`); calibrating holds every
    weight in memory, so models over ``max_calibration_bytes`` are streamed one tensor at a time
    with statistics at identity, and a warning. What was done is recorded as JSON under the
    metadata key ``bn_calibration``.
    """
    specs = {name: (ref.dtype, tuple(ref.shape)) for name, ref in model.state_dict().items()}
    tensors, record = _calibrated_tensors(ghn, model, input_size, calibrate_bn, calibration_images,
                                          calibration_source, max_calibration_bytes)
    return write_safetensors(path, specs, tensors, {**(metadata or {}), "bn_calibration": json.dumps(record)})


def bn_calibration(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``bn_calibration`` record of a predicted safetensors file (None for files without one)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        record = (file.metadata() or {}).get("bn_calibration")
    return json.loads(record) if record else None


def write_predicted_shards(ghn: GHN, model: nn.Module, input_size: tuple[int, ...], folder: str | os.PathLike,
                           max_shard_size: int | str = "1GB", metadata: dict[str, str] | None = None, *,
                           max_calibration_bytes: int = MAX_CALIBRATION_BYTES) -> Path:
    """Stream ``ghn``'s prediction for ``model`` into safetensors shards plus an index; returns the index path.

    For models larger than memory: ``accelerate.load_checkpoint_and_dispatch`` reads a sharded
    checkpoint one shard at a time, but a single file whole. BatchNorm statistics as in
    :func:`write_predicted` (data-free), recorded in each shard's metadata.
    """
    specs = {name: (ref.dtype, tuple(ref.shape)) for name, ref in model.state_dict().items()}
    tensors, record = _calibrated_tensors(ghn, model, input_size, True, None, None, max_calibration_bytes)
    return write_safetensors_shards(folder, specs, tensors, max_shard_size,
                                    {"format": "pt", **(metadata or {}), "bn_calibration": json.dumps(record)})


def _merged(key: str, explicit: Any, model_kwargs: dict[str, Any]) -> Any:
    """``key`` given as an argument or in ``model_kwargs`` (``--num-classes 10`` or ``--kwarg num_classes=10``)."""
    given = model_kwargs.pop(key, None)
    if explicit is not None and given is not None and explicit != given:
        raise ValueError(f"{key} is given twice with different values, {explicit!r} and {given!r} (e.g. "
                         f"--{key.replace('_', '-')} and --kwarg {key}=...): give it once")
    return explicit if explicit is not None else given


def _check_size(key: str, value: Any, pair: bool = False) -> None:
    values = value if pair and isinstance(value, (list, tuple)) and len(value) == 2 else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{key} must be a positive integer{' or a pair of them' if pair else ''}, got {value!r}")


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Fail before any work when ``out`` cannot become the output folder."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder: choose another output folder")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{parent} is a file, so the output folder {out} cannot be created inside it: "
                                 "choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: choose another output folder, or replace it "
                              "(--overwrite on the command line, overwrite=True in Python)")


def _per_channel(values: Sequence[float], channels: int) -> list[float]:
    """The GHN's RGB normalization for a model with ``channels`` inputs: the channel mean for grayscale."""
    values = list(values)
    if channels == len(values):
        return values
    if channels == 1:
        return [round(sum(values) / len(values), 4)]
    return [values[i % len(values)] for i in range(channels)]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers, whose statistics predicted weights leave at identity."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def save_predicted(name: str, out: str | os.PathLike, ghn: GHN, *, num_classes: int | None = None,
                   img_size: int | Sequence[int] | None = None, model_kwargs: dict[str, Any] | None = None,
                   overwrite: bool = False, calibrate_bn: bool = True, calibration_images: torch.Tensor | None = None,
                   calibration_source: str | None = None) -> Path:
    """Predict weights for timm's ``name`` and write a timm-loadable folder at ``out``.

    ``num_classes`` defaults to the classes of the GHN's training data (10 for a CIFAR-10 GHN): that
    classifier is the one the GHN learned to predict. ``num_classes`` and ``img_size`` may also come in
    ``model_kwargs``. BatchNorm statistics are calibrated as :func:`write_predicted` does, and the card
    and config.json say how. All files are written to a temporary folder first: a failure leaves
    nothing behind.
    """
    out = Path(out)
    check_output_folder(out, overwrite)
    model_kwargs = dict(model_kwargs or {})
    num_classes = _merged("num_classes", num_classes, model_kwargs)
    img_size = _merged("img_size", img_size, model_kwargs)
    data = ghn.data_config
    if num_classes is None:
        num_classes = data.get("num_classes")
    if num_classes is not None:
        _check_size("num_classes", num_classes)
    if img_size is not None:
        _check_size("img_size", img_size, pair=True)
    model, model_args = create_target_model(name, ghn, num_classes=num_classes, img_size=img_size, **model_kwargs)
    input_size = input_size_for(model, ghn, img_size, model_args.get("in_chans"))
    ghn_name = ghn.meta.get("name", DEFAULT_NAME)
    ghn_hash = content_hash(ghn)
    registry_cfg = getattr(model, "pretrained_cfg", {}) or {}
    n_classes = int(getattr(model, "num_classes", num_classes or 0))
    mean = _per_channel(data.get("mean", registry_cfg.get("mean", (0.485, 0.456, 0.406))), input_size[0])
    std = _per_channel(data.get("std", registry_cfg.get("std", (0.229, 0.224, 0.225))), input_size[0])
    config = {
        "architecture": name,
        "num_classes": n_classes,
        "num_features": int(getattr(model, "num_features", 0)) or None,
        "model_args": {k: v for k, v in model_args.items() if k != "num_classes"},
        "pretrained_cfg": {
            **{k: registry_cfg[k] for k in _STRUCTURAL_CFG_KEYS if registry_cfg.get(k) is not None},
            "input_size": list(input_size),
            "interpolation": data.get("interpolation", "bilinear"),
            "crop_pct": data.get("crop_pct", 1.0),
            "crop_mode": "center",
            "mean": mean,
            "std": std,
            "num_classes": n_classes,
            "description": f"weights predicted by the GHN {ghn_name} (sha256 {ghn_hash[:16]}), not trained",
        },
        "ghn_init": {"ghn": ghn_name, "sha256": ghn_hash, "note": "weights predicted by a GHN, not trained"},
    }
    card_data = {**data, "input_size": list(input_size), "mean": mean, "std": std}
    # The GHN's evaluation measured its own classes at its own input size: it says nothing about other setups.
    evaluated = n_classes == data.get("num_classes") and list(input_size) == list(data.get("input_size", []))
    with staged_folder(out) as staging:
        weights = write_predicted(ghn, model, input_size, staging / "model.safetensors",
                                  metadata={"format": "pt", "ghn_sha256": ghn_hash}, calibrate_bn=calibrate_bn,
                                  calibration_images=calibration_images, calibration_source=calibration_source)
        config["ghn_init"]["bn_calibration"] = calibration = bn_calibration(weights)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "README.md").write_text(predicted_card(
            name, config["model_args"], ghn_name, ghn_hash, n_classes, card_data,
            evaluation=ghn.meta.get("evaluation", []) if evaluated else [], batchnorm=has_batchnorm(model),
            bn_calibration=calibration))
    return out
