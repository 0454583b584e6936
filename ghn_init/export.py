"""Predicted weights as a folder that plain timm loads: ``timm.create_model("local-dir:DIR", pretrained=True)``.

The folder holds ``config.json`` in timm's layout (architecture, num_classes, model_args and a
pretrained_cfg with the normalization the GHN was trained with, plus a ``ghn_init`` block naming
the GHN by content hash and how BatchNorm statistics were calibrated), ``model.safetensors`` and a
``README.md`` model card. Nothing from timm's registry that would be false for predicted weights
(tag, license, paper) is copied.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .batchnorm import calibrate_predicted, has_running_stats
from .cards import predicted_card
from .ghn import GHN, norm_statistics
from .hub import DEFAULT_NAME, content_hash, staged_folder
from .streaming import write_safetensors

__all__ = ["MAX_CALIBRATION_BYTES", "bn_calibration", "create_meta_model", "input_size_for", "save_predicted",
           "write_predicted"]

logger = logging.getLogger(__name__)

#: Predicted weights up to this size get BatchNorm statistics calibrated in memory; larger models are
#: streamed to their file one tensor at a time, statistics at identity (BatchNorm models are far smaller).
MAX_CALIBRATION_BYTES = 4 * 2**30

#: Structural facts of the registry cfg that stay true for predicted weights.
_STRUCTURAL_CFG_KEYS = ("first_conv", "classifier", "fixed_input_size")


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


def create_meta_model(name: str, num_classes: int | None = None, img_size: int | None = None,
                      **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model`` on the meta device; returns the model and the kwargs that rebuild it.

    ``img_size`` is passed to models that take it; for the others it only sets the input size.
    """
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        raise ValueError(f"unknown timm architecture {name!r}" + (f"; did you mean one of {close}?" if close else
                         "; see timm.list_models()"))
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


def input_size_for(model: nn.Module, ghn: GHN, img_size: int | None) -> tuple[int, int, int]:
    """(C, H, W) to trace ``model`` at: ``img_size`` if given, the size a fixed-size model was built for,
    else the size the GHN was trained at."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    channels = int(getattr(model, "in_chans", None) or cfg.get("input_size", (3,))[0])
    if img_size is not None:
        return channels, img_size, img_size
    built_for = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if cfg.get("fixed_input_size") and built_for:
        return channels, *built_for
    trained = ghn.data_config.get("input_size", cfg.get("input_size", (3, 224, 224)))
    return channels, trained[1], trained[2]


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
    tensors: Iterable[tuple[str, torch.Tensor]] | None = None
    size = sum(math.prod(shape) * dtype.itemsize for dtype, shape in specs.values())
    if not has_running_stats(model):
        record = {"method": "none", "reason": "the model has no BatchNorm running statistics"}
    elif not calibrate_bn:
        record = {"method": "identity", "reason": "calibration was turned off"}
    elif size > max_calibration_bytes:
        record = {"method": "identity", "reason": f"{size / 2**30:.1f} GiB of weights exceed the "
                  f"{max_calibration_bytes / 2**30:.1f} GiB limit for calibrating in memory, so they were "
                  "streamed to the file; calibrate after loading with ghn_init.calibrate_batchnorm"}
        logger.warning("%s: BatchNorm statistics left at identity: %s", type(model).__name__, record["reason"])
    else:
        state = ghn.predict(model, input_size, calibrate_bn=False)
        record = calibrate_predicted(model, state, input_size, ghn.data_config, images=calibration_images,
                                     source=calibration_source)
        tensors = state.items()
    metadata = {**(metadata or {}), "bn_calibration": json.dumps(record)}
    return write_safetensors(path, specs, tensors if tensors is not None else ghn.predict_tensors(model, input_size),
                             metadata)


def bn_calibration(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``bn_calibration`` record of a predicted safetensors file (None for files without one)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        record = (file.metadata() or {}).get("bn_calibration")
    return json.loads(record) if record else None


def save_predicted(name: str, out: str | os.PathLike, ghn: GHN, *, num_classes: int | None = None,
                   img_size: int | None = None, model_kwargs: dict[str, Any] | None = None,
                   overwrite: bool = False, calibrate_bn: bool = True, calibration_images: torch.Tensor | None = None,
                   calibration_source: str | None = None) -> Path:
    """Predict weights for timm's ``name`` and write a timm-loadable folder at ``out``.

    BatchNorm statistics are calibrated as :func:`write_predicted` does, and the card and
    config.json say how. All files are written to a temporary folder first: a failure leaves
    nothing behind.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass overwrite=True")
    model, model_args = create_meta_model(name, num_classes=num_classes, img_size=img_size, **(model_kwargs or {}))
    input_size = input_size_for(model, ghn, img_size)
    data = ghn.data_config
    ghn_name = ghn.meta.get("name", DEFAULT_NAME)
    ghn_hash = content_hash(ghn)
    registry_cfg = getattr(model, "pretrained_cfg", {}) or {}
    n_classes = int(getattr(model, "num_classes", num_classes or 0))
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
            "mean": list(data.get("mean", registry_cfg.get("mean", (0.485, 0.456, 0.406)))),
            "std": list(data.get("std", registry_cfg.get("std", (0.229, 0.224, 0.225)))),
            "num_classes": n_classes,
        },
        "ghn_init": {"ghn": ghn_name, "sha256": ghn_hash, "note": "weights predicted by a GHN, not trained"},
    }
    with staged_folder(out) as staging:
        weights = write_predicted(ghn, model, input_size, staging / "model.safetensors",
                                  metadata={"format": "pt", "ghn_sha256": ghn_hash}, calibrate_bn=calibrate_bn,
                                  calibration_images=calibration_images, calibration_source=calibration_source)
        config["ghn_init"]["bn_calibration"] = calibration = bn_calibration(weights)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "README.md").write_text(predicted_card(name, config["model_args"], ghn_name, ghn_hash,
                                                          n_classes, {**data, "input_size": list(input_size)},
                                                          bn_calibration=calibration))
    return out
