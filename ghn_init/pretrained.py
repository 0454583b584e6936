"""GHN weights through timm's own door: a ``PretrainedCfg`` whose ``file`` is a predicted state dict.

timm never shows external code the model it builds, so the weights are predicted on a meta-device
twin built with the same kwargs, written once to a cache keyed by (ghn_init version, GHN content
hash, architecture, kwargs), and loaded by ``timm.create_model(name, pretrained=True,
pretrained_cfg=cfg, **kwargs)`` like any pretrained checkpoint. A different ``num_classes`` or
``in_chans`` at load time then behaves as timm does for pretrained weights (classifier dropped, stem
adapted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from . import __version__
from .batchnorm import DATA_FREE
from .export import create_target_model, input_size_for, write_predicted
from .ghn import GHN
from .hub import content_hash, load, remove_stale

__all__ = ["cache_dir", "create_model", "predicted_file", "pretrained_cfg"]


def cache_dir() -> Path:
    """``$GHN_INIT_CACHE``, else ``~/.cache/ghn_init``: predicted weights, one file per (GHN, arch, kwargs)."""
    return Path(os.environ.get("GHN_INIT_CACHE", Path.home() / ".cache" / "ghn_init"))


def _kwargs_key(kwargs: dict[str, Any]) -> str:
    try:
        return json.dumps(kwargs, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"timm kwargs must be JSON-serializable to key the prediction cache: {err}") from err


def predicted_file(name: str, ghn: GHN | None = None, **timm_kwargs: Any) -> Path:
    """Path of the predicted safetensors for ``timm.create_model(name, **timm_kwargs)``, made on first use.

    The file is written under a name with this process's ID and renamed when complete; ``.partial`` files
    of processes that were killed are removed here. BatchNorm statistics are calibrated without data
    (:func:`ghn_init.export.write_predicted`); the file's ``bn_calibration`` metadata says how.
    """
    ghn = ghn or load()
    ghn_hash = content_hash(ghn)
    # The library version and the BatchNorm calibration are in the key: a release that changes how
    # tensors or statistics are made from a GHN must not serve files an older release predicted.
    key = hashlib.sha256(f"{__version__}|{DATA_FREE}|{ghn_hash}|{name}|{_kwargs_key(timm_kwargs)}".encode()
                         ).hexdigest()[:20]
    path = cache_dir() / ghn_hash[:16] / f"{name}-{key}.safetensors"
    if path.is_file():
        return path
    kwargs = dict(timm_kwargs)
    model, _ = create_target_model(name, ghn, num_classes=kwargs.pop("num_classes", None), **kwargs)
    input_size = input_size_for(model, ghn, timm_kwargs.get("img_size"), timm_kwargs.get("in_chans"))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent.glob("*.partial"))  # of processes killed while writing
    partial = path.with_suffix(f".{os.getpid()}.partial")
    try:
        write_predicted(ghn, model, input_size, partial,
                        metadata={"format": "pt", "ghn_sha256": ghn_hash, "architecture": name})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def pretrained_cfg(name: str, ghn: GHN | None = None, **timm_kwargs: Any) -> Any:
    """A timm ``PretrainedCfg`` for GHN-predicted weights, built on the registry's cfg for ``name``.

    Pass the same kwargs to ``timm.create_model(name, pretrained=True, pretrained_cfg=cfg, **kwargs)``.
    The registry's tag is kept: some timm builders (DeepSeek and Qwen3 ViT encoders) derive the
    architecture from it, and the weights' origin is in ``description``.
    """
    import timm
    from timm.models import PretrainedCfg

    ghn = ghn or load()
    file = predicted_file(name, ghn, **timm_kwargs)
    base = timm.models.get_pretrained_cfg(name) or PretrainedCfg(architecture=name)
    data = ghn.data_config
    model_size = timm_kwargs.get("img_size")
    input_size = tuple(base.input_size)
    if model_size is not None:
        input_size = (input_size[0], model_size, model_size)
    elif data.get("input_size") and not base.fixed_input_size:
        input_size = (input_size[0], *data["input_size"][1:])
    first_conv = base.first_conv
    if timm_kwargs.get("in_chans") is not None:  # the stem was predicted for these channels: nothing to adapt
        input_size = (timm_kwargs["in_chans"], *input_size[1:])
        if timm_kwargs["in_chans"] != 3:  # timm before 1.0.31 adapts first_conv from 3 channels regardless
            first_conv = None
    return dataclasses.replace(
        base, file=str(file), url="", hf_hub_id=None, hf_hub_filename=None, source=None, state_dict=None,
        license=None, paper_ids=None, paper_name=None, origin_url=None, notes=None, custom_load=False,
        description=f"weights predicted by the GHN {ghn.meta.get('name', '')} (sha256 {content_hash(ghn)[:16]})",
        num_classes=timm_kwargs.get("num_classes", base.num_classes), label_offset=None, label_names=None,
        label_descriptions=None, input_size=input_size, test_input_size=None, first_conv=first_conv,
        mean=tuple(data.get("mean", base.mean)), std=tuple(data.get("std", base.std)),
        interpolation=data.get("interpolation", base.interpolation), crop_pct=data.get("crop_pct", base.crop_pct),
    )


def create_model(name: str, ghn: GHN | None = None, **timm_kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **timm_kwargs)`` initialized with GHN-predicted weights."""
    import timm

    cfg = pretrained_cfg(name, ghn, **timm_kwargs)
    return timm.create_model(name, pretrained=True, pretrained_cfg=cfg, **timm_kwargs)
