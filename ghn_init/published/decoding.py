"""How the published GHNs tie graph nodes to a model's parameters and shape what they decode.

The steps around the networks of :mod:`ghn_init.published.networks`, with the semantics of the
authors' code (GHN-2: ``ppuda``; GHN-3: ``ghn3``), each named after the function it follows:

* which parameters a model offers (ppuda ``named_layered_modules``) and which node sets which of
  them, grouped by decoder key (``GHN._map_net_params`` / ``GHN3._map_net_params``);
* the shape-encoder vocabulary lookup (ppuda ``ShapeEncoder``);
* slicing and tiling a decoded block to the target shape (``_tile_params``) and the fan-in weight
  normalization (``_normalize``).

Only parameter shapes are read, never values, so a model on the meta device works.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .formats import Code
from .legacy_graph import LegacyGraph

__all__ = [
    "Assignment", "DecodeError", "ParamEntry", "ShapeVocab", "Target", "assign_nodes", "group_key",
    "layered_parameters", "normalize", "tile",
]

_MATCH_SUFFIXES = (".weight", ".bias", "in_proj_weight", "in_proj_bias")
_TOKENS = ("class_token", "cls_token", "dist_token", "reg_token")


class DecodeError(ValueError):
    """The authors' code cannot decode or place this tensor (it stops with an error there)."""


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """One parameter as ``named_layered_modules`` offers it for matching."""

    key: str                  # the matching key, e.g. ``layer1.0.bn1.weight``, ``encoder.pos_embedding.weight``
    name: str                 # the model's parameter name, e.g. ``encoder.pos_embedding``
    module_name: str
    module: nn.Module
    is_w: bool
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Target:
    """A parameter a node sets; ``row`` picks the weight (0) or bias (1) row of a 1-D decoder output."""

    name: str
    shape: tuple[int, ...]
    is_w: bool
    row: int | None


@dataclasses.dataclass
class Assignment:
    """Nodes matched to parameters: what the shape encoder embeds and what each decoder key sets."""

    node_shapes: list[tuple[int, ...] | None]      # per node; None embeds the "no shape" row
    groups: dict[tuple[int, ...], list[int]]       # decoder key -> nodes, in the authors' order
    targets: dict[int, list[Target]]               # node -> the parameters it sets, in order
    entries: dict[str, ParamEntry]                 # every matchable parameter, by matching key
    matched_keys: set[str]                         # matching keys some node took


def layered_parameters(model: nn.Module) -> dict[str, ParamEntry]:
    """Parameters by matching key, as ppuda's ``named_layered_modules`` lists them (one cell).

    A module offers ``weight`` (or torchvision's ``layer_scale``, ``in_proj_weight``,
    ``pos_embedding`` in its place) and ``bias`` (or ``in_proj_bias``).
    """
    if hasattr(model, "_n_cells") and model._n_cells != 1:
        raise ValueError(f"{type(model).__name__} has {model._n_cells} cells (a DeepNets-1M Network); "
                         "only single-cell models are supported")
    entries: dict[str, ParamEntry] = {}
    for module_name, module in model.named_modules():
        key_prefix = module_name.split(".", 1)[1] if module_name.startswith("module.") else module_name
        weight_attr = next((a for a in ("layer_scale", "in_proj_weight", "pos_embedding")
                            if getattr(module, a, None) is not None), None)
        if weight_attr is None and getattr(module, "weight", None) is not None:
            weight_attr = "weight"
        bias_attr = "in_proj_bias" if getattr(module, "in_proj_bias", None) is not None else (
            "bias" if getattr(module, "bias", None) is not None else None)
        for attr, is_w in ((weight_attr, True), (bias_attr, False)):
            if attr is None:
                continue
            suffix = "pos_embedding.weight" if attr == "pos_embedding" else attr
            key = f"{key_prefix}.{suffix}"
            value = getattr(module, attr)
            shape = tuple(value) if isinstance(value, (list, tuple)) else tuple(value.shape)
            name = f"{module_name}.{attr}" if module_name else attr
            entries[key] = ParamEntry(key, name, module_name, module, is_w, shape)
    return entries


def _fit(n: int, cap: int) -> int:
    """A size rounded the way the authors group decoder calls (``min_sz``)."""
    n = min(n, cap)
    if n % 3 == 0:
        n = n // 3 * 4
    return cap if n >= cap / 2 else n


def group_key(shape: tuple[int, ...], *, last_weight: bool, last_bias: bool, max_shape: tuple[int, ...],
              code: Code) -> tuple[int, ...]:
    """The decoder key of a parameter; parameters with equal keys are decoded in one batch."""
    if len(shape) == 1:
        return (_fit(shape[0], max_shape[0]), -1 if last_bias else 0)
    if last_weight:
        return (_fit(shape[0], max_shape[0]), _fit(shape[1], max_shape[1]))
    if len(shape) == 2:
        return (_fit(shape[0], max_shape[0]), _fit(shape[1], max_shape[1]), 1, 1)
    if len(shape) == 3:
        if code == "ghn3" and shape[0] == 1 and min(shape[1:]) > 1:  # [1, T, C] position embedding
            side = math.isqrt(shape[1])
            return (1, shape[2], side, side)
        return tuple(_fit(shape[j], max_shape[j]) for j in range(3))
    return (_fit(shape[0], max_shape[0]), _fit(shape[1], max_shape[1]), shape[2], shape[3])


def assign_nodes(model: nn.Module, graph: LegacyGraph, max_shape: tuple[int, ...], code: Code) -> Assignment:
    """Match every node to the parameter it names and group the matched ones by decoder key.

    ghn3 also tries ``attn.to_qkv``/``attn.to_out`` spellings; ppuda lets each parameter match once.
    An unmatched node with a recorded size (pooling) still gives that size to the shape encoder.
    """
    entries = layered_parameters(model)
    available = dict(entries)
    params = dict(model.named_parameters())
    node_shapes: list[tuple[int, ...] | None] = [None] * graph.num_nodes
    groups: dict[tuple[int, ...], list[int]] = {}
    targets: dict[int, list[Target]] = {}
    matched_keys: set[str] = set()
    for i, node in enumerate(graph.nodes):
        info = node.info
        if info is None:
            continue
        key = info.name_for_matching
        key = key if key.endswith(_MATCH_SUFFIXES) else key + ".weight"
        candidates = [key]
        if code == "ghn3":
            candidates.append(key.replace("to_qkv", "attn.to_qkv").replace("to_out", "attn.to_out"))
        entry = next((available[k] for k in candidates if k in available), None)
        if entry is None:
            node_shapes[i] = info.size
            continue
        if code == "ppuda":
            del available[entry.key]
        matched_keys.add(entry.key)
        node_shapes[i] = entry.shape
        if not 1 <= len(entry.shape) <= 4:
            continue  # the decoders make 1-D to 4-D tensors only
        decoder_key = group_key(entry.shape, last_weight=info.last_weight, last_bias=info.last_bias,
                                max_shape=max_shape, code=code)
        groups.setdefault(decoder_key, []).append(i)
        node_targets = []
        if len(entry.shape) > 1:
            node_targets.append(Target(entry.name, entry.shape, entry.is_w, None))
        elif not entry.is_w:
            node_targets.append(Target(entry.name, entry.shape, False, 1))
        else:  # a norm layer's one node predicts its weight (row 0) and its bias (row 1)
            node_targets.append(Target(entry.name, entry.shape, True, 0))
            bias = getattr(entry.module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias_name = f"{entry.module_name}.bias" if entry.module_name else "bias"
                node_targets.append(Target(bias_name, tuple(bias.shape), False, 1))
        targets[i] = [t for t in node_targets if t.name in params]
    return Assignment(node_shapes, groups, targets, entries, matched_keys)


class ShapeVocab:
    """ppuda ``ShapeEncoder``'s lookup of channel and kernel sizes into embedding rows.

    Sizes seen in training map to their row, others to the nearest (ties to the smaller; 4-7
    channels to 8, a 2-pixel kernel to 3), sizes past the largest entry to the last row; nodes
    without a shape use one extra row.
    """

    def __init__(self, num_classes: int, max_spatial: int) -> None:
        self.channels = sorted({1, 3, num_classes, *range(8, 64, 8), *range(64, 4096, 16), *range(4096, 8193, 32)})
        self.spatial = sorted({*range(1, max(12, max_spatial), 2), 14, 16})
        self._channel_table = self._table(self.channels, {c: 8 for c in range(4, 8)})
        self._spatial_table = self._table(self.spatial, {2: 3})

    @staticmethod
    def _table(vocab: list[int], aliases: dict[int, int]) -> list[int]:
        table = [len(vocab) - 1] * (vocab[-1] + 1)   # 0 and sizes past the vocabulary: the last row
        for value in range(1, vocab[-1]):
            pos = bisect.bisect_left(vocab, value)
            lower, upper = vocab[max(pos - 1, 0)], vocab[min(pos, len(vocab) - 1)]
            table[value] = pos - 1 if pos > 0 and value - lower <= upper - value else min(pos, len(vocab) - 1)
        for index, value in enumerate(vocab):
            table[value] = index
        for value, alias in aliases.items():
            table[value] = vocab.index(alias)
        return table

    @staticmethod
    def as_4d(shape: tuple[int, ...]) -> tuple[int, ...]:
        """(n) -> (n,1,1,1); (o,i) -> (o,i,1,1); [1,T,C] -> (1,C,s,s) with s = floor(sqrt(T)); (a,b,c) -> (a,b,c,1)."""
        if len(shape) == 1:
            return (shape[0], 1, 1, 1)
        if len(shape) == 2:
            return (*shape, 1, 1)
        if len(shape) == 3:
            if shape[0] == 1 and min(shape[1:]) > 1:
                side = math.isqrt(shape[1])
                return (1, shape[2], side, side)
            return (*shape, 1)
        return tuple(shape)

    def indices(self, shapes: Iterable[tuple[int, ...] | None]) -> torch.Tensor:
        """(N, 4) rows into the channel (out, in) and spatial (h, w) tables."""
        rows = []
        for shape in shapes:
            if shape is None or not 1 <= len(shape) <= 4:
                rows.append((len(self.channels), len(self.channels), len(self.spatial), len(self.spatial)))
                continue
            out_ch, in_ch, h, w = self.as_4d(shape)
            rows.append((*(self._look(self._channel_table, c) for c in (out_ch, in_ch)),
                         *(self._look(self._spatial_table, s) for s in (h, w))))
        return torch.tensor(rows, dtype=torch.long).view(-1, 4)

    @staticmethod
    def _look(table: list[int], value: int) -> int:
        return table[value] if 0 <= value < len(table) else table[0]


def _centred(n: int, size: int) -> slice:
    """The authors' centred window of ``size`` in ``n`` (``offset - size//2 : offset + ceil(size/2)``)."""
    return slice(n // 2 - size // 2, n // 2 + -(-size // 2))


def tile(w: torch.Tensor, target: tuple[int, ...], *, code: Code, top_left: bool,
         class_token: Callable[[int], torch.Tensor],
         elementwise: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Slice a decoded block to at most ``target``, then repeat it along out and in channels (``_tile_params``).

    ``top_left`` takes kernels from the block's corner (GHN-2) instead of its centre (GHN-3).
    ``class_token(c)`` gives the (1, 1, c) row that ghn3 prepends to a decoded position embedding.
    ``elementwise`` (the normalization) is applied before repeating, where the block is smallest;
    it commutes with repeating. Raises :class:`DecodeError` where the authors' code fails.
    """
    t, s = tuple(target), tuple(w.shape)
    if code == "ghn3":
        w = _slice_ghn3(w, t, s, top_left, class_token)
    else:
        w = _slice_ppuda(w, t, s)
    s = tuple(w.shape)
    if len(s) != len(t):
        raise DecodeError(f"a decoded {list(s)} block cannot be placed in a {list(t)} tensor")
    if elementwise is not None:
        w = elementwise(w)
    reps = [1] * len(t)
    reps[0] = -(-t[0] // s[0])
    if len(t) > 1 and t[1] > s[1]:
        if len(t) == 3:
            raise DecodeError(f"{code}'s _tile_params cannot repeat a 3-D tensor {list(t)} along dim 1")
        reps[1] = -(-t[1] // s[1])
    elif code == "ghn3" and len(t) == 3 and t[2] > s[2]:
        reps[2] = -(-t[2] // s[2])
    if max(reps) > 1:
        w = w.repeat(reps)
    if len(t) == 4 and not top_left and code == "ghn3":
        w = w[:t[0], :t[1], _centred(w.shape[2], t[2]), _centred(w.shape[3], t[3])]
    else:
        w = w[tuple(slice(n) for n in t)]
    if tuple(w.shape) != t:
        raise DecodeError(f"the decoded block ends up {list(w.shape)}, not {list(t)} (kernel larger than the GHN's)")
    return w


def _slice_ghn3(w: torch.Tensor, t: tuple[int, ...], s: tuple[int, ...], top_left: bool,
                class_token: Callable[[int], torch.Tensor]) -> torch.Tensor:
    if len(t) == 1:
        return w[:t[0]] if len(s) == 1 else (w[:t[0], 0] if len(s) == 2 else w[:t[0], 0, s[-2] // 2, s[-1] // 2])
    if len(t) == 2:
        return w[:t[0], :t[1]] if len(s) == 2 else (w[:t[0], :t[1], s[-2] // 2, s[-1] // 2] if len(s) > 2 else w)
    if len(t) == 3:
        if len(s) == 3:
            return w[:t[0], :t[1], :t[2]]
        if len(s) > 3:  # a position embedding decoded as (1, C, s, s): tokens as rows, then a class-token row
            w = w.reshape(s[0], s[1], -1).permute(0, 2, 1)[:t[0], :t[1], :t[2]]
            return torch.cat((class_token(w.shape[2]).to(w), w), dim=1)
        return w
    if len(s) == 2:
        return w[:t[0], :t[1], None, None]
    if len(s) != 4:
        return w
    if top_left:
        return w[:t[0], :t[1], :t[2], :t[3]]
    return w[:t[0], :t[1], _centred(s[2], min(t[2], s[2])), _centred(s[3], min(t[3], s[3]))]


def _slice_ppuda(w: torch.Tensor, t: tuple[int, ...], s: tuple[int, ...]) -> torch.Tensor:
    if len(t) == 1:
        return w[:t[0], 0] if len(s) == 2 else (w[:t[0], 0, 0, 0] if len(s) > 2 else w)
    if len(t) == 2:
        return w[:t[0], :t[1], 0, 0] if len(s) > 2 else w
    if len(t) == 3:
        return w[:t[0], :t[1], :t[2], 0] if len(s) > 3 else w
    if len(s) != 4:
        raise DecodeError(f"ppuda's _tile_params cannot slice a decoded {list(s)} block to {list(t)}")
    return w[:t[0], :t[1], :t[2], :t[3]]


def normalize(p: torch.Tensor, is_w: bool, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Fan-in scaling of a tensor of ``shape`` (default ``p.shape``) (``_normalize``); norm weights to
    (0, 2), biases to (-1, 1). Elementwise, so ``p`` may be the block that is tiled to ``shape``.

    beta is 1 for layers not followed by ReLU (depthwise, or kernel height < width) and 2 otherwise;
    position embeddings ((1, C, >= 11, ...)) are left as decoded.
    """
    sz = tuple(p.shape) if shape is None else tuple(shape)
    if len(sz) > 1:
        if len(sz) > 2 and sz[2] >= 11 and sz[0] == 1:
            return p
        beta = 1.0 if len(sz) > 2 and (sz[1] == 1 or sz[2] < sz[3]) else 2.0
        return p * (beta / math.prod(sz[1:])) ** 0.5
    return 2 * torch.sigmoid(0.5 * p) if is_w else torch.tanh(0.2 * p)


def not_predicted_reason(name: str, entry: ParamEntry | None, module: nn.Module | None, code: Code,
                         weight_matched: bool | None) -> str:
    """Why a parameter keeps its own value: what the published GHNs' graphs do not represent.

    ``weight_matched`` says whether the module's weight entry took a node (None: it offers none).
    """
    attr = name.rsplit(".", 1)[-1]
    cls = type(module).__name__ if module is not None else "?"
    if attr == "layer_scale" or attr == "gamma" or attr.startswith("gamma_"):
        return f"layer scale: published GHNs do not predict it (no graph node for {cls}.{attr})"
    if attr == "relative_position_bias_table":
        return "relative position bias table: not a graph node, published GHNs do not predict it"
    if attr in _TOKENS:
        return "class token: not a graph node, published GHNs do not predict it"
    if entry is None:
        if attr == "pos_embed":
            return ("position embedding: the published builders represent only torchvision ViT's "
                    "pos_embedding, so no graph node holds it")
        return f"{cls}.{attr} is not a weight or bias the published GHNs' graphs represent"
    if weight_matched is False and code == "ppuda" and attr in ("weight", "bias"):
        return f"no graph node for its module ({cls}); ppuda sets such parameters to None"
    if weight_matched and not entry.is_w:
        return f"its module's ({cls}) weight has a graph node but this bias has none"
    return f"no graph node for its module ({cls}), so the GHN does not predict it"
