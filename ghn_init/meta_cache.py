"""Repeated ops of a meta-device forward pass, answered from a cache of their output layouts.

A meta tensor has no data, so an op on it only computes output shapes, strides and dtypes; many
of those computations are Python decompositions (batch and layer norm, GELU, hardswish, addmm)
costing up to a millisecond each, which made them most of a graph build. A network repeats the
same op on the same layouts block after block, so the first call of each (op, argument layouts)
runs and every later one is answered with fresh empty tensors of the recorded layouts. The
dispatch mode sits below autograd, which records the same graph nodes either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["MetaShapeCache"]

_Layout = tuple[torch.Size, tuple[int, ...], torch.dtype]
_LITERALS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


class _Uncacheable(Exception):
    """An argument the cache key cannot describe (a generator, a symbolic size, ...)."""


def _key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", value.device.type, tuple(value.shape), value.stride(), value.dtype, value.storage_offset())
    if isinstance(value, (list, tuple)):
        return tuple(_key(v) for v in value)
    if isinstance(value, _LITERALS):
        return value
    raise _Uncacheable


def _writes_only_self(schema: torch.FunctionSchema) -> bool:
    """``op_(self, ...) -> self``: an in-place op that mutates and returns its first argument only."""
    def writes(alias: Any) -> bool:
        return alias is not None and alias.is_write

    return (len(schema.returns) == 1 and writes(schema.returns[0].alias_info) and bool(schema.arguments)
            and writes(schema.arguments[0].alias_info)
            and sum(writes(a.alias_info) for a in schema.arguments) == 1)


class MetaShapeCache(TorchDispatchMode):
    """Inside ``with MetaShapeCache():`` a repeated meta op costs an allocation, not its meta kernel.

    Cached: functional ops whose outputs are all meta tensors (fresh tensors of the recorded
    layouts are returned) and in-place ops that return ``self`` with its layout unchanged (``self``
    is returned). Views, other mutations and any op with an argument outside the key pass through.
    """

    def __init__(self) -> None:
        super().__init__()
        self._layouts: dict[Any, tuple[type | None, list[_Layout]] | None] = {}
        self.hits = self.misses = 0  # cacheable calls answered from / recorded into the cache

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        try:
            key = (func, _key(args), _key(tuple(sorted(kwargs.items()))))
        except _Uncacheable:
            return func(*args, **kwargs)
        schema = func._schema
        if key in self._layouts:
            self.hits += 1
            recorded = self._layouts[key]
            if recorded is None:  # in-place on self
                return args[0]
            container, layouts = recorded
            outs = [torch.empty_strided(shape, stride, dtype=dtype, device="meta") for shape, stride, dtype in layouts]
            return container(outs) if container else outs[0]
        if _writes_only_self(schema):
            before = _key(args[0])
            out = func(*args, **kwargs)
            if out is args[0] and args[0].device.type == "meta" and _key(args[0]) == before:
                self._layouts[key] = None
                self.misses += 1
            return out
        out = func(*args, **kwargs)
        if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
            return out
        container = type(out) if isinstance(out, (tuple, list)) else None
        outs = out if container else (out,)
        if all(isinstance(o, torch.Tensor) and o.device.type == "meta" for o in outs):
            self._layouts[key] = (container, [(o.shape, o.stride(), o.dtype) for o in outs])
            self.misses += 1
        return out
