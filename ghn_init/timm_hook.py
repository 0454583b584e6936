"""``timm.create_model(name, pretrained_cfg=ghn_init)``: GHN weights for exactly the model timm builds.

timm resolves ``pretrained_cfg`` without the model kwargs and loads weights only when
``pretrained=True``, so no cfg value can carry a prediction on its own. The one call that receives
the architecture, ``pretrained``, ``pretrained_cfg`` and every kwarg together is the architecture's
entrypoint, which ``timm.create_model`` looks up at call time through the global
``timm.models._factory.model_entrypoint``. :func:`register` (run on ``import ghn_init``) wraps that
lookup: an entrypoint called with the ``ghn_init`` module (the default GHN) or a :class:`~ghn_init.GHN`
as ``pretrained_cfg`` builds with ``pretrained=True`` and :func:`ghn_init.pretrained_cfg` for its own
kwargs; any other call reaches timm's entrypoint unchanged. A timm without that lookup gets a guard
on ``timm.create_model`` instead, which refuses GHN values with the calls that work, so they never
fall through to a randomly initialized model.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

from .ghn import GHN

__all__ = ["TimmHookError", "missing_module_attribute", "register"]

_logger = logging.getLogger(__name__)

#: What ``timm.create_model`` passes to an entrypoint besides the model kwargs. Placement is not part
#: of what the GHN predicts for (timm keeps device and dtype out of a model's saved args too).
_NOT_MODEL_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "device",
                               "dtype", "pretrained_model_args"})
_INSTEAD = ("use ghn_init.create_model(name, **kwargs), or timm.create_model(name, pretrained=True, "
            "pretrained_cfg=ghn_init.pretrained_cfg(name, **kwargs), **kwargs) with the same kwargs")

_unavailable: str | None = None  # why this timm could not take the hook, once register() has failed


class TimmHookError(RuntimeError):
    """A GHN was passed as timm's ``pretrained_cfg`` but this timm cannot be hooked to honour it."""


def _is_ghn(value: Any) -> bool:
    """A loaded GHN: ghn-init's own, or a published GHN-2/GHN-3 (whose module exists once one was loaded)."""
    published = sys.modules.get(f"{__package__}.published.ghn")
    return isinstance(value, GHN) or (published is not None and isinstance(value, published.PublishedGHN))


def _is_ghn_value(value: Any) -> bool:
    return _is_ghn(value) or value is sys.modules.get(__package__)


def _predicting(create_fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(create_fn)
    def entrypoint(*args: Any, **kwargs: Any) -> Any:
        value = kwargs.get("pretrained_cfg")
        if not _is_ghn_value(value):
            return create_fn(*args, **kwargs)
        from .pretrained import pretrained_cfg

        model_kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_MODEL_KWARGS}
        cfg = pretrained_cfg(name, value if _is_ghn(value) else None, **model_kwargs)
        return create_fn(*args, **{**kwargs, "pretrained": True, "pretrained_cfg": cfg})

    return entrypoint


def _hooked(lookup: Callable[..., Callable[..., Any]]) -> Callable[..., Callable[..., Any]]:
    @functools.wraps(lookup)
    def model_entrypoint(model_name: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        return _predicting(lookup(model_name, *args, **kwargs), model_name)

    model_entrypoint.ghn_init_hook = True  # type: ignore[attr-defined]
    return model_entrypoint


def _guarded(create_model: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(create_model)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if _is_ghn_value(kwargs.get("pretrained_cfg")):
            raise TimmHookError(f"timm.create_model(..., pretrained_cfg=<GHN>) is unavailable: {_unavailable}; "
                                f"{_INSTEAD}")
        return create_model(*args, **kwargs)

    guarded.ghn_init_hook = True  # type: ignore[attr-defined]
    return guarded


def register() -> bool:
    """Hook ``timm.create_model`` so a GHN (or ``ghn_init``) works as its ``pretrained_cfg``; idempotent.

    Returns False when this timm lacks the lookup the hook wraps; ``timm.create_model`` is then
    guarded to raise :class:`TimmHookError` for GHN values instead of building a random init.
    """
    global _unavailable
    import timm

    try:
        from timm.models import _factory

        if getattr(_factory.model_entrypoint, "ghn_init_hook", False):
            return True
        if "model_entrypoint" not in inspect.getclosurevars(_factory.create_model).globals:
            raise AttributeError("timm.models._factory.create_model no longer looks up model_entrypoint")
        if not {"pretrained", "pretrained_cfg"} <= set(inspect.signature(_factory.create_model).parameters):
            raise AttributeError("timm.models._factory.create_model takes no pretrained/pretrained_cfg")
        _factory.model_entrypoint = _hooked(_factory.model_entrypoint)
    except (ImportError, AttributeError) as err:
        _unavailable = f"timm {timm.__version__} changed the internals ghn_init hooks ({err})"
        _logger.info("timm.create_model(..., pretrained_cfg=ghn_init) is unavailable: %s; %s", _unavailable, _INSTEAD)
        for namespace in (timm, timm.models):
            if not getattr(namespace.create_model, "ghn_init_hook", False):
                namespace.create_model = _guarded(namespace.create_model)
        return False
    _unavailable = None
    return True


def missing_module_attribute(name: str) -> Any:
    """``ghn_init.<name>`` for a name the module lacks (its ``__getattr__``).

    timm reads PretrainedCfg fields off whatever it got as ``pretrained_cfg``; when ``ghn_init`` reaches
    timm unhooked (an entrypoint called directly, or a timm that could not be hooked) the error says
    what to call instead of only naming the missing field.
    """
    from timm.models import PretrainedCfg

    message = f"module 'ghn_init' has no attribute {name!r}"
    if name in {field.name for field in dataclasses.fields(PretrainedCfg)} | {"to_dict"}:
        why = _unavailable or "ghn_init stands in for a pretrained_cfg only in timm.create_model"
        raise AttributeError(f"{message}: timm read ghn_init as a PretrainedCfg, but {why}; {_INSTEAD}")
    raise AttributeError(message)
