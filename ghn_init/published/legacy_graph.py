"""Graphs in the published GHNs' own encoding (GHN-2 ``ppuda`` and GHN-3 ``ghn3`` code bases).

The published GHNs were trained on graphs of 15 primitive ops whose node order, virtual edges and
parameter matching their networks depend on. This module holds that encoding (:class:`LegacyGraph`)
and builds it from a model with the same semantics as the authors' builders
(``ghn3/graph.py Graph`` and ``ppuda/deepnets1m/graph.py Graph``), so that a published GHN predicts
what it predicts in its authors' code.

:func:`build_legacy_graph` reproduces the official graphs node by node and edge by edge wherever the
official builder succeeds. Where the official code fails, it extends the same semantics; each
extension is listed in :data:`LEGACY_GRAPH_EXTENSIONS`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torchvision
from torch import nn
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

from ..graph import meta_twins
from ..meta_cache import MetaShapeCache

__all__ = [
    "LEGACY_GRAPH_EXTENSIONS", "LEGACY_OPS", "Builder", "LegacyGraph", "LegacyNode", "NodeInfo", "build_legacy_graph",
]

_logger = logging.getLogger(__name__)

#: The op vocabulary of both code bases (``PRIMITIVES_DEEPNETS1M``); a node's op index is its position here.
LEGACY_OPS: tuple[str, ...] = (
    "max_pool", "avg_pool", "sep_conv", "dil_conv", "conv", "msa", "cse", "sum", "concat", "input",
    "bias", "bn", "ln", "pos_enc", "glob_avg",
)

#: Which authors' graph builder a graph follows: GHN-3's (``ghn3``) or GHN-2's (``ppuda``).
Builder = Literal["ghn3", "ppuda"]

#: Where :func:`build_legacy_graph` departs from the official builders. Each departure only changes
#: graphs that the official code fails to build or to use (failure letters refer to the reference
#: fixtures' README); everything else is reproduced as the authors' code does it.
LEGACY_GRAPH_EXTENSIONS: tuple[str, ...] = (
    "Layer types by inheritance: a module whose class derives from a supported layer counts as that layer "
    "(timm LayerNorm, LayerNorm2d, LayerNormAct2d -> ln; BatchNormAct2d -> bn; StdConv2d, Conv2dSame -> conv). "
    "ghn3 looks node types up by exact class and raises KeyError (E); ppuda drops such parameters, which "
    "leaves extra graph sources (C) and makes its GHN set the layers' weights to None.",
    "Other normalizations (GroupNorm, BatchNorm1d, RmsNorm, ...), Conv1d, layer scales, position and class "
    "tokens stay unsupported, as in both official builders: they get no node and the published GHNs leave "
    "them at their initial values.",
    "Batch of 2 for the graph's forward pass in both builders (ppuda uses 1, which fails in training-mode "
    "BatchNorm on 1x1 maps, B); the autograd graph does not depend on the batch size.",
    "The forward pass runs on meta-device twins of the parameters and buffers, in training mode, so the "
    "model is never modified and its device does not matter; fused attention takes the kernel the CPU "
    "dispatcher would pick (the fixtures' default kernels), which the meta device would otherwise replace "
    "by the math path.",
    "Parameter names are used whole: the official 'stem'/'pos_enc' prefix trim (it turns timm's "
    "'conv_stem.weight' into 'stem.weight', which names no parameter, F) is not applied. It is a no-op for "
    "every torchvision model, whose names start there when they contain 'stem'.",
    "ppuda: when the graph has several sources, the input node gets an edge to each parameter source "
    "(official: assertion, C); op sources are left for the filter to drop. A graph that is not acyclic "
    "keeps its order (as ghn3 does) instead of failing, and the reachability assertions are not enforced.",
    "ppuda: torchvision VisionTransformer is built like any model (official: NotImplementedError, D).",
    "ppuda: a parameter shared by several modules gives one node (official: a duplicate node without edges, "
    "which fails assertion C); an op that survives filtering without an entry in the op table is a 'sum' "
    "node, as in ghn3 (official ppuda: KeyError).",
    "Autograd leaves that are not parameters of the model (tensors with requires_grad created in forward) "
    "are skipped (official: KeyError).",
    "A pooling kernel saved with one value is read as square (official: ValueError while parsing it).",
)

_SUPPORTED_OPS: dict[str, str] = {
    # autograd class name (without the "Backward<N>" suffix) -> op, shared by both builders except msa
    "input": "input", "Mean": "glob_avg", "AdaptiveAvgPool2D": "glob_avg", "MaxPool2DWithIndices": "max_pool",
    "AvgPool2D": "avg_pool", "Mul": "cse", "Add": "sum", "Cat": "concat",
}
_GHN3_OPS: dict[str, str] = {**_SUPPORTED_OPS, "Softmax": "msa", "skip_connect": "sum"}
_PPUDA_OPS: dict[str, str] = {**_SUPPORTED_OPS, "Clone": "msa"}

_CONV_LIKE, _BN, _LN, _POS_ENC = "conv-like", "bn", "ln", "pos_enc"
_GHN3_LAYERS: dict[type, str] = {
    nn.Conv2d: _CONV_LIKE, nn.Linear: _CONV_LIKE, nn.MultiheadAttention: _CONV_LIKE,
    nn.BatchNorm2d: _BN, nn.LayerNorm: _LN, torchvision.models.convnext.LayerNorm2d: _LN,
    nn.Embedding: _POS_ENC, torchvision.models.vision_transformer.Encoder: _POS_ENC,
}
_PPUDA_LAYERS: dict[type, str] = {
    nn.Conv2d: _CONV_LIKE, nn.Linear: _CONV_LIKE,
    nn.BatchNorm2d: _BN, nn.LayerNorm: _LN, torchvision.models.convnext.LayerNorm2d: _LN,
}
# ppuda's NormLayers: their biases are never nodes (ghn3 decides by the class name containing "norm").
_PPUDA_NORMS: tuple[type, ...] = (nn.BatchNorm2d, nn.LayerNorm)


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """What the GHN matches against the model's parameters for one node."""

    name_for_matching: str
    op: str
    size: tuple[int, ...] | None
    last_weight: bool
    last_bias: bool


@dataclasses.dataclass(frozen=True)
class LegacyNode:
    """One node: a parameter (``name`` is its parameter name) or an op (``name`` is the autograd class)."""

    op: str
    name: str
    module: str | None = None                 # qualified class name of the owning module
    shape: tuple[int, ...] | None = None      # the shape the builder recorded
    info: NodeInfo | None = None

    @property
    def op_index(self) -> int:
        return LEGACY_OPS.index(self.op)


@dataclasses.dataclass
class LegacyGraph:
    """Nodes in the builder's order and the distance-labelled adjacency: ``dist[i, j]`` is 1 for a
    real edge i -> j, 2..cutoff for a virtual edge (shortest directed path length), 0 for none."""

    builder: Builder
    input_size: tuple[int, ...]
    nodes: list[LegacyNode]
    dist: torch.Tensor  # (N, N) int

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def edges(self) -> list[tuple[int, int, int]]:
        """``(src, dst, dist)`` for every nonzero entry, row-major (the fixtures' ``edges_src_dst_dist``)."""
        src, dst = torch.nonzero(self.dist, as_tuple=True)
        return [(int(s), int(d), int(self.dist[s, d])) for s, d in zip(src, dst)]

    def parameter_names(self) -> set[str]:
        """Names of the model parameters that nodes stand for; a bn/ln node also stands for its layer's bias.

        A published GHN predicts these parameters and leaves every other one at its initial value.
        """
        names = set()
        for node in self.nodes:
            if node.module is None or node.info is None:
                continue
            name = node.info.name_for_matching.removeprefix(".")  # root-module parameters are named '.x'
            names.add(name)
            if node.op in ("bn", "ln") and name.endswith("weight"):
                names.add(name[: -len("weight")] + "bias")
        return names

    @classmethod
    def from_dict(cls, data: dict[str, Any], builder: Builder) -> LegacyGraph:
        """From the JSON layout of ``graphs.<builder>`` in the reference fixtures."""
        nodes = []
        for node in data["nodes"]:
            info = node.get("node_info")
            nodes.append(LegacyNode(
                op=node["op"], name=node["name"], module=node.get("module"),
                shape=None if node.get("shape") is None else tuple(node["shape"]),
                info=None if info is None else NodeInfo(
                    name_for_matching=info["name_for_matching"], op=info["op"],
                    size=None if info.get("size") is None else tuple(info["size"]),
                    last_weight=bool(info["last_weight"]), last_bias=bool(info["last_bias"]),
                ),
            ))
        dist = torch.zeros(len(nodes), len(nodes), dtype=torch.long)
        for src, dst, d in data["edges_src_dst_dist"]:
            dist[src, dst] = d
        return cls(builder=builder, input_size=tuple(data["input_size"]), nodes=nodes, dist=dist)

    def to_dict(self) -> dict[str, Any]:
        """The fixtures' JSON layout (without ``per_ghn_inputs``), for comparison and inspection."""
        nodes = []
        for i, node in enumerate(self.nodes):
            info = node.info
            nodes.append({
                "i": i, "op": node.op, "op_index": node.op_index, "name": node.name, "module": node.module,
                "shape": None if node.shape is None else list(node.shape),
                "node_info": None if info is None else {
                    "name_for_matching": info.name_for_matching, "op": info.op,
                    "size": None if info.size is None else list(info.size),
                    "last_weight": info.last_weight, "last_bias": info.last_bias,
                },
            })
        return {"builder": self.builder, "input_size": list(self.input_size), "n_nodes": self.num_nodes,
                "nodes": nodes, "edges_src_dst_dist": [list(e) for e in self.edges()]}


def build_legacy_graph(
    model: nn.Module, builder: Builder, input_size: Sequence[int] | None = None, *, ve_cutoff: int = 50
) -> LegacyGraph:
    """Build ``model``'s graph as the official ``builder`` does (``ghn3`` or ``ppuda`` ``Graph(model, ve_cutoff)``).

    ``input_size`` = (C, H, W) of the single forward pass the graph comes from; by default the model's
    ``expected_input_sz`` attribute as in the authors' code, else 3x299x299 for torchvision Inception-v3
    (ghn3), else 3x224x224. The model is not modified, and meta-device models work.
    """
    if builder not in ("ghn3", "ppuda"):
        raise ValueError(f"builder must be 'ghn3' or 'ppuda', got {builder!r}")
    if ve_cutoff < 1:
        raise ValueError(f"ve_cutoff must be >= 1 (1 means no virtual edges), got {ve_cutoff}")
    size = _input_size(model, builder, input_size)
    graph = _trace(model, builder, size)
    if builder == "ghn3":
        _ghn3_edit(graph, model)
    else:
        _ppuda_edit(graph)
    order = _topological_order(graph.succ)
    dist = _distances(graph.succ, order, ve_cutoff)
    nodes = _legacy_nodes(graph.nodes, builder)
    return LegacyGraph(builder=builder, input_size=size, nodes=nodes, dist=dist)


# ---------------------------------------------------------------------------------------------------------------------
# Tracing


@dataclasses.dataclass(eq=False)
class _Node:
    """A node while the graph is edited: a parameter (``module`` set) or an autograd op."""

    name: str
    module: nn.Module | None = None
    size: tuple[int, ...] | None = None       # parameter shape
    kernel_size: tuple[int, ...] | None = None  # pooling ops
    keepdim: bool | None = None                  # Mean ops


@dataclasses.dataclass
class _Graph:
    """Nodes in list order with successor/predecessor index sets (the official dense ``A``, sparse)."""

    nodes: list[_Node]
    succ: list[set[int]]
    pred: list[set[int]]

    def add_edge(self, src: int, dst: int) -> None:
        self.succ[src].add(dst)
        self.pred[dst].add(src)

    def remove_edge(self, src: int, dst: int) -> None:
        self.succ[src].discard(dst)
        self.pred[dst].discard(src)

    def append(self, node: _Node) -> int:
        self.nodes.append(node)
        self.succ.append(set())
        self.pred.append(set())
        return len(self.nodes) - 1

    def bypass(self, i: int) -> None:
        """Connect every predecessor of ``i`` to every successor (the official removal rewiring)."""
        for dst in list(self.succ[i]):
            for src in list(self.pred[i]):
                if src != dst:
                    self.add_edge(src, dst)

    def drop(self, indices: Iterable[int]) -> None:
        """Delete nodes and their edges, keeping the order of the others."""
        gone = set(indices)
        if not gone:
            return
        new_index, kept = {}, []
        for i in range(len(self.nodes)):
            if i not in gone:
                new_index[i] = len(kept)
                kept.append(i)
        self.nodes = [self.nodes[i] for i in kept]
        self.succ = [{new_index[j] for j in self.succ[i] if j in new_index} for i in kept]
        self.pred = [{new_index[j] for j in self.pred[i] if j in new_index} for i in kept]

    def eliminate(self, indices: Iterable[int]) -> None:
        """Remove nodes, connecting across each one; the result equals the official in-place rewiring."""
        indices = list(indices)
        for i in indices:
            self.bypass(i)
            for src in self.pred[i]:
                self.succ[src].discard(i)
            for dst in self.succ[i]:
                self.pred[dst].discard(i)
            self.succ[i], self.pred[i] = set(), set()
        self.drop(indices)

    def permute(self, order: Sequence[int]) -> None:
        position = {old: new for new, old in enumerate(order)}
        self.nodes = [self.nodes[i] for i in order]
        self.succ = [{position[j] for j in self.succ[i]} for i in order]
        self.pred = [{position[j] for j in self.pred[i]} for i in order]

    def insert_after(self, i: int, node: _Node) -> None:
        """The official pos-enc fix: the new node at ``i + 1`` takes over node ``i``'s edges, ``i -> i + 1``."""
        self.nodes.insert(i + 1, node)
        shift = lambda j: j + 1 if j > i else j  # noqa: E731 - tiny index map
        succ = [{shift(j) for j in s} for s in self.succ]
        pred = [{shift(j) for j in p} for p in self.pred]
        # node i's old edges now belong to the inserted node; node i keeps one edge into it
        succ.insert(i + 1, {j if j != i else i + 1 for j in succ[i]})
        pred.insert(i + 1, {j if j != i else i + 1 for j in pred[i]})
        for j in succ[i + 1]:
            pred[j] = {k if k != i else i + 1 for k in pred[j]}
        for j in pred[i + 1]:
            succ[j] = {k if k != i else i + 1 for k in succ[j]}
        succ[i], pred[i] = {i + 1}, set()
        pred[i + 1].add(i)
        self.succ, self.pred = succ, pred


def _input_size(model: nn.Module, builder: Builder, input_size: Sequence[int] | None) -> tuple[int, ...]:
    if input_size is None:
        default = 299 if builder == "ghn3" and isinstance(model, torchvision.models.Inception3) else 224
        input_size = getattr(model, "expected_input_sz", default)
    if isinstance(input_size, int):
        return (3, input_size, input_size)
    return tuple(int(s) for s in input_size)


def _layer_kind(module: nn.Module | None, builder: Builder) -> str | None:
    """The layer table entry of the nearest supported class in ``module``'s inheritance chain."""
    if module is None:
        return None
    table = _GHN3_LAYERS if builder == "ghn3" else _PPUDA_LAYERS
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None


def _parameter_owners(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """``id(param) -> (name, owning module)``, named as the official ``_named_modules`` does.

    A root-module parameter is named ``'.' + name`` and a parameter shared by several modules
    belongs to the last one, as in the authors' code.
    """
    owners = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            owners[id(param)] = (f"{module_name}.{name}", module)
    return owners


class _CpuAttentionKernels(TorchFunctionMode):
    """On the meta device, run fused attention with the kernel the CPU dispatcher would choose.

    The meta device always takes the math path of ``scaled_dot_product_attention``, whose autograd
    graph (softmax, bmm, mul nodes) differs from the fused CPU kernel's single node.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            fused = self._fused_on_meta(*args, **kwargs)
            if fused is not None:
                return fused
        return func(*args, **kwargs)

    @staticmethod
    def _fused_on_meta(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False) -> torch.Tensor | None:
        if query.device.type != "meta":
            return None

        def on_cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).requires_grad_(t.requires_grad)

        choice = torch._fused_sdp_choice(on_cpu(query), on_cpu(key), on_cpu(value), on_cpu(attn_mask),
                                         dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if choice != SDPBackend.FLASH_ATTENTION.value:
            return None
        # the CPU flash kernel takes grouped-query heads as they are, and boolean masks as -inf/0
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                attn_mask.logical_not(), float("-inf"))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, dict):
        out = list(out.values())
    if not isinstance(out, (tuple, list)):
        out = [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _forward(model: nn.Module, builder: Builder, size: tuple[int, ...]) -> tuple[list[torch.Tensor], dict]:
    """One training-mode forward pass on meta twins; returns the outputs to walk and the twins' owners."""
    owners = _parameter_owners(model)
    substitutes, twins = meta_twins(model)
    twin_owner = {id(twins[id(param)]): owners[id(param)] for param in model.parameters()}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    x = torch.empty((2, *size), device="meta", dtype=dtype)
    modes = {m: m.training for m in model.modules()}
    model.train()
    try:
        with _CpuAttentionKernels(), torch.enable_grad(), MetaShapeCache():  # repeated meta ops from a cache
            out = torch.func.functional_call(model, substitutes, (x,), strict=False, tie_weights=False)
    except Exception as err:  # noqa: BLE001 - any forward failure is reported with model and input size
        raise RuntimeError(
            f"the {builder} graph of {type(model).__name__} needs a forward pass at input size "
            f"{'x'.join(map(str, size))}, which failed: {type(err).__name__}: {err}. Pass the size the model "
            f"was built for as input_size=(C, H, W) (timm: model.pretrained_cfg['input_size'])."
        ) from err
    finally:
        for module, mode in modes.items():
            module.training = mode
    outputs = [t for t in _outputs(out) if t.grad_fn is not None]
    if builder == "ppuda":
        outputs = outputs[:1]  # ppuda walks the first output only
    if not outputs:
        raise RuntimeError(f"{type(model).__name__} returned no output that depends on its parameters")
    return outputs, twin_owner


def _trace(model: nn.Module, builder: Builder, size: tuple[int, ...]) -> _Graph:
    """Nodes in the official discovery order (depth first from the output) and the official edges.

    An autograd function with parameter children becomes those parameters' nodes; any other function
    becomes an op node named by its class. Edges point from input to consumer, except that an edge
    to a node reached by a name containing 'bias' points from the consumer to it (as in the authors' code).
    """
    outputs, owners = _forward(model, builder, size)
    index: dict[Any, int] = {}  # node key (AccumulateGrad of a parameter, or the function) -> node index
    seen: dict[Any, tuple[int | None, str]] = {}
    graph = _Graph([], [], [])

    def node_index(key: Any, node: _Node) -> int:
        if key not in index:
            index[key] = graph.append(node)
        return index[key]

    def enter(fn: Any) -> list[Any]:
        """Create ``fn``'s node(s); return the frame ``[children, position, first node, node, name]``."""
        fn_name = type(fn).__name__
        first = last = None
        if "AccumulateGrad" not in fn_name:
            leaves = []
            for child, _ in fn.next_functions:
                if child is None or not hasattr(child, "variable"):
                    continue
                owner = owners.get(id(child.variable))
                if owner is None:
                    continue
                name, module = owner
                if builder == "ppuda":
                    if _layer_kind(module, builder) is None:
                        continue
                    if isinstance(module, _PPUDA_NORMS) and ".bias" in name:
                        continue
                leaves.append((child, _Node(name, module, tuple(child.variable.shape)), name))
            if not leaves:
                kernel = getattr(fn, "_saved_kernel_size", None)
                keepdim = getattr(fn, "_saved_keepdim", None)
                leaves.append((fn, _Node(fn_name, kernel_size=None if kernel is None else tuple(kernel),
                                         keepdim=keepdim), fn_name))
            for key, node, name in leaves:
                last = node_index(key, node)
                if first is None:
                    first = last
                seen[key] = (last, name)
        seen[fn] = (last, fn_name)
        children = [child for child, _ in fn.next_functions if child is not None]
        return [children, 0, first, last, fn_name]

    def link(frame: list[Any], child_node: int | None, child_name: str) -> None:
        start = frame[2]
        if child_node is not None and child_node != start:
            if "bias" in child_name:
                graph.add_edge(start, child_node)
            else:
                graph.add_edge(child_node, start)

    for out in outputs:
        if out.grad_fn in seen:
            continue
        stack = [enter(out.grad_fn)]
        while stack:
            frame = stack[-1]
            children, position = frame[0], frame[1]
            if position < len(children):
                frame[1] += 1
                child = children[position]
                if child in seen:
                    link(frame, *seen[child])
                else:
                    stack.append(enter(child))
            else:
                stack.pop()
                if stack:
                    link(stack[-1], frame[3], frame[4])
    return graph


# ---------------------------------------------------------------------------------------------------------------------
# ghn3/graph.py Graph._build_graph


def _op_prefix(name: str) -> str:
    cut = name.find("Backward")
    return name if cut < 0 else name[:cut]


def _ghn3_edit(graph: _Graph, model: nn.Module) -> None:
    _ghn3_filter(graph, None)
    _ghn3_fix_weight_edges(graph)
    _ghn3_fix_softmax_edges(graph)
    if isinstance(model, torchvision.models.SwinTransformer):
        _ghn3_fix_torchvision_swin(graph)
    _ghn3_filter(graph, ["Add", "Cat"])

    inp = graph.append(_Node("input"))
    for i in range(len(graph.nodes)):
        if not graph.pred[i] and "weight" in graph.nodes[i].name:
            graph.add_edge(inp, i)
    _drop_self_loops(graph)
    order = _topological_order(graph.succ)
    if order is None:
        _logger.warning("ghn3 graph of %s has a cycle: kept in discovery order, as the official builder does",
                        type(model).__name__)
    else:
        graph.permute(order)

    if isinstance(model, torchvision.models.VisionTransformer):
        i = 0
        while i < len(graph.nodes):
            if isinstance(graph.nodes[i].module, torchvision.models.vision_transformer.Encoder):
                graph.insert_after(i, _Node("AddBackward0"))
            i += 1
    elif isinstance(model, torchvision.models.SqueezeNet):
        # the official fix moves the global pooling node before the classifier without touching the edges
        nodes = graph.nodes
        if not nodes[-1].name.startswith("MeanBackward") or not nodes[-3].name.startswith("classifier"):
            raise RuntimeError(f"unexpected SqueezeNet graph tail: {[n.name for n in nodes[-3:]]}")
        graph.nodes = nodes[:-3] + [nodes[-1]] + nodes[-3:-1]


def _ghn3_filter(graph: _Graph, stages: list[str] | None) -> None:
    """ghn3 ``_filter_graph``: drop unsupported nodes and redundant sum/concat, CSE-like mul and mean."""
    if stages is None:
        unsupported = set()
        for node in graph.nodes:
            op = _op_prefix(node.name)
            norm_bias = node.module is not None and "norm" in type(node.module).__name__.lower() \
                and op.endswith(".bias")
            # the official filter tests isinstance against its layer table (the KeyError comes later)
            supported = not norm_bias and _layer_kind(node.module, "ghn3") is not None
            if not supported and op not in _GHN3_OPS:
                unsupported.add(node.name)
        pattern_stages: list[str | set[str]] = ["Mul", unsupported, "Mean", "Add", "Cat"]
    else:
        pattern_stages = list(stages)

    names = [node.name.lower() for node in graph.nodes]
    has_cse = any("sigmoid" in name or "swish" in name for name in names)
    n_incoming = {id(node): len(pred) for node, pred in zip(graph.nodes, graph.pred)}

    for patterns in pattern_stages:
        nodes = graph.nodes
        matched = _matching(nodes, patterns)
        if matched:
            names = [node.name.lower() for node in nodes]
            graph.eliminate([i for i in matched if not _ghn3_keep(nodes, names, i, has_cse, n_incoming)])


def _ghn3_keep(nodes: list[_Node], names: list[str], i: int, has_cse: bool, n_incoming: dict[int, int]) -> bool:
    """Whether ghn3's filter keeps matched node ``i``, judged by its list neighbours (lower-case ``names``)."""
    name = nodes[i].name
    try:
        neighbors = {j: names[i + j] for j in (-1, -2, -3, 1)}  # negative indices wrap, as in the official code
        classifier_head = any(neighbors[j].startswith(("classifier", "fc", "head")) for j in (-1, -2))
    except IndexError:
        neighbors, classifier_head = {}, True
    if name.startswith("Mean"):
        return classifier_head if has_cse else True
    if name.startswith("Mul"):
        return has_cse and not classifier_head and (
            neighbors[-2].startswith(("hard", "sigmoid")) or neighbors[-3].startswith(("relu", "mean"))
            or neighbors[1].startswith(("hard", "sigmoid", "relu")))
    if name.startswith(("Cat", "Add")):
        return n_incoming[id(nodes[i])] > 1
    return False


def _matching(nodes: list[_Node], patterns: str | set[str]) -> list[int]:
    """Indices of nodes whose name contains the pattern (or any of the patterns), as ``str.find`` does."""
    if isinstance(patterns, str):
        return [i for i, node in enumerate(nodes) if patterns in node.name]
    by_length = sorted(patterns, key=len)
    matched = []
    for i, node in enumerate(nodes):
        name = node.name
        if name in patterns or any(p in name for p in by_length if len(p) < len(name)):
            matched.append(i)
    return matched


def _ghn3_fix_weight_edges(graph: _Graph) -> None:
    """ghn3 ``fix_weight_edges``: make ``previous -> weight -> bias`` out of ``weight -> bias <- previous``."""
    nodes, succ, pred = graph.nodes, graph.succ, graph.pred
    for i in range(len(nodes)):
        node = nodes[i]
        if pred[i] or "weight" not in node.name:
            continue
        for out in sorted(succ[i]):
            same_layer = node.module is nodes[out].module
            qkv = not pred[i] and "softmax" in nodes[out].name.lower()
            if not (same_layer or qkv):
                continue
            n_out = len(succ[i])
            if not pred[out] - {i}:
                continue
            nodes[i], nodes[out] = nodes[out], nodes[i]
            graph.remove_edge(i, out)
            graph.add_edge(out, i)
            if n_out == 1:
                moved = succ[out] - {i}
                for j in sorted(moved):
                    graph.remove_edge(out, j)
                    graph.add_edge(i, j)


def _ghn3_fix_softmax_edges(graph: _Graph) -> None:
    """ghn3 ``fix_softmax_edges``: route the inputs of the node after an msa node through the msa node.

    Path counts use the graph as it was before this step, as the official code does.
    """
    nodes, succ, pred = graph.nodes, graph.succ, graph.pred
    before = [set(s) for s in succ]
    counts: dict[int, dict[int, int]] = {}
    for i in range(len(nodes)):
        if "softmax" not in nodes[i].name.lower():
            continue
        for out in sorted(succ[i]):
            for j in sorted(pred[out] - {i}):
                n_paths = _count_paths(before, j, out, counts.setdefault(out, {}))
                edge_from_msa = j in succ[i]
                if n_paths > 1 or not edge_from_msa:
                    graph.remove_edge(j, out)
                if n_paths == 1 and not edge_from_msa:
                    graph.add_edge(j, i)


def _count_paths(succ: list[set[int]], source: int, target: int, memo: dict[int, int]) -> int:
    """Number of directed paths source -> target, capped at 2 (enough to tell one path from several)."""
    if source in memo:
        return memo[source]
    stack = [(source, iter(sorted(succ[source])))]
    active = {source}
    totals = {source: 0}
    while stack:
        v, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            active.discard(v)
            memo[v] = min(totals.pop(v), 2)
            if stack:
                parent = stack[-1][0]
                totals[parent] += memo[v]
            continue
        if child == target:
            totals[v] += 1
        elif child in memo:
            totals[v] += memo[child]
        elif child not in active:  # a cycle contributes no simple path through the active chain
            active.add(child)
            totals[child] = 0
            stack.append((child, iter(sorted(succ[child]))))
    return memo[source]


def _ghn3_fix_torchvision_swin(graph: _Graph) -> None:
    """ghn3's manual edge fixes for torchvision ``SwinTransformer`` patch merging."""
    nodes, succ = graph.nodes, graph.succ
    for i, node in enumerate(nodes):
        name = node.name
        if name.lower().endswith("norm.weight"):
            for out in sorted(succ[i]):
                if nodes[out].name.endswith("norm1.weight") or "Add" in nodes[out].name:
                    graph.remove_edge(i, out)
                    target = name.replace("norm", "reduction")
                    for j, other in enumerate(nodes):
                        if target in other.name:
                            graph.add_edge(i, j)
                            break
        elif name.lower().endswith("attn.proj.bias"):
            for out in sorted(succ[i]):
                if nodes[out].name.endswith("reduction.weight"):
                    graph.remove_edge(i, out)
                    for out2 in sorted(succ[out]):
                        if nodes[out2].name.startswith("AddBackward"):
                            graph.add_edge(i, out2)


# ---------------------------------------------------------------------------------------------------------------------
# ppuda/deepnets1m/graph.py Graph._build_graph and _filter_graph


def _ppuda_edit(graph: _Graph) -> None:
    nodes = graph.nodes
    for i, node in enumerate(nodes):  # linear layers: previous -> weight -> bias
        if isinstance(node.module, nn.Linear) and ".weight" in node.name:
            for out in sorted(graph.succ[i]):
                for j in list(graph.pred[out]):
                    graph.add_edge(j, i)
                    graph.remove_edge(j, out)
                graph.add_edge(i, out)
                graph.remove_edge(i, i)

    sources = [i for i in range(len(nodes)) if not graph.pred[i]]
    if len(sources) > 1:
        params = [i for i in sources if nodes[i].module is not None]
        sources = params or sources
    inp = graph.append(_Node("input"))
    for i in sources:
        graph.add_edge(inp, i)
    _drop_self_loops(graph)
    order = _topological_order(graph.succ)
    if order is None:
        _logger.warning("ppuda graph has a cycle: kept in discovery order")
    else:
        graph.permute(order)
    _ppuda_filter(graph)


def _ppuda_filter(graph: _Graph) -> None:
    """ppuda ``_filter_graph``, on the topologically sorted graph with its input node."""
    unsupported = {node.name for node in graph.nodes if node.module is None and _op_prefix(node.name) not in _PPUDA_OPS}
    # sum/concat decisions count incoming edges live, so those nodes are filtered one pattern at a time
    # with the official in-place rewiring; every other decision only depends on the list at the stage start
    for patterns in ["Mul", "Clone", unsupported, "Mean", "Add", "Cat"]:
        nodes = graph.nodes
        matched = _matching(nodes, patterns)
        live = {i for i in matched if nodes[i].name.startswith(("Cat", "Add"))}
        static = [i for i in matched if i not in live]

        live_patterns = sorted({nodes[i].name for i in live}) if isinstance(patterns, set) else [patterns]
        graph.eliminate([i for i in static if not _ppuda_keep(nodes, i)])
        for pattern in live_patterns if live else []:
            removed = []
            for i in _matching(graph.nodes, pattern):
                if graph.nodes[i].name.startswith(("Cat", "Add")) and len(graph.pred[i]) <= 1:
                    graph.bypass(i)
                    removed.append(i)
            graph.drop(removed)


def _ppuda_keep(nodes: list[_Node], i: int) -> bool:
    """Whether ppuda's filter keeps matched node ``i`` (not sum/concat, whose test is live)."""
    name = nodes[i].name
    if name.startswith("Mean"):
        if nodes[i].keepdim is not None:
            return bool(nodes[i].keepdim)
        return i < len(nodes) - 1 and not nodes[i + 1].name.startswith("cells.")
    if name.startswith("Mul"):
        return _wrapped(nodes, i - 2).startswith("Hard")
    if name.startswith("Clone"):
        return _wrapped(nodes, i - 11).startswith("Softmax")
    return False


def _wrapped(nodes: list[_Node], i: int) -> str:
    """The name at list index ``i`` with Python's negative indexing ('' where the official code would fail)."""
    return nodes[i].name if -len(nodes) <= i < len(nodes) else ""


# ---------------------------------------------------------------------------------------------------------------------
# Order, virtual edges and node features


def _drop_self_loops(graph: _Graph) -> None:
    for i in range(len(graph.nodes)):
        graph.remove_edge(i, i)


def _topological_order(succ: Sequence[Iterable[int]]) -> list[int] | None:
    """networkx 3.x ``topological_sort`` of a graph whose nodes were added as 0..n-1 and whose edges
    were added row by row (``nx.DiGraph(A)``): Kahn generations, each in the order its nodes became
    ready, the first one in index order and children visited in increasing index. None on a cycle."""
    n = len(succ)
    children = [sorted(s) for s in succ]
    indegree = [0] * n
    for row in children:
        for j in row:
            indegree[j] += 1
    generation = [i for i in range(n) if indegree[i] == 0]
    order: list[int] = []
    while generation:
        order.extend(generation)
        ready = []
        for i in generation:
            for j in children[i]:
                indegree[j] -= 1
                if indegree[j] == 0:
                    ready.append(j)
        generation = ready
    return order if len(order) == n else None


def _distances(succ: Sequence[Iterable[int]], order: Sequence[int] | None, cutoff: int) -> torch.Tensor:
    """``dist[i, j]`` = shortest directed path length i -> j when it is 1..cutoff, else 0.

    Equal to setting every ``networkx.all_pairs_shortest_path_length(cutoff)`` entry over the real
    edges, as ``_add_virtual_edges`` does. ``order`` is a topological order (None for a cyclic graph).
    """
    n = len(succ)
    children = [sorted(s) for s in succ]
    if order is None:
        return _distances_bfs(children, cutoff)
    far = cutoff + 1
    length = torch.full((n, n), far, dtype=torch.int32)
    for i in reversed(order):
        row = children[i]
        if row:
            best = length[row].amin(0) + 1  # length[j, j] = 0 makes best[j] = 1 for every child j
            best.clamp_(max=far)
            length[i] = best
        length[i, i] = 0
    return torch.where(length <= cutoff, length, 0).long()


def _distances_bfs(children: list[list[int]], cutoff: int) -> torch.Tensor:
    n = len(children)
    dist = torch.zeros(n, n, dtype=torch.long)
    for source in range(n):
        frontier, reached, d = [source], {source}, 0
        while frontier and d < cutoff:
            d += 1
            ahead = []
            for i in frontier:
                for j in children[i]:
                    if j not in reached:
                        reached.add(j)
                        ahead.append(j)
            if ahead:
                dist[source, ahead] = d
            frontier = ahead
    return dist


def _layer_op(module: nn.Module, name: str, builder: Builder) -> str:
    kind = _layer_kind(module, builder)
    if kind == _CONV_LIKE:
        if "bias" in name:
            return "bias"
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            return "dil_conv" if min(module.dilation) > 1 else "sep_conv"
        return "conv"
    if kind is None:
        raise RuntimeError(f"parameter node {name} of {type(module).__name__} has no op in the {builder} table")
    return kind


def _legacy_nodes(nodes: list[_Node], builder: Builder) -> list[LegacyNode]:
    """``_construct_features``: node ops, recorded shapes and what the GHN matches (``node_info``)."""
    ops = _GHN3_OPS if builder == "ghn3" else _PPUDA_OPS
    n = len(nodes)
    out = []
    for i, node in enumerate(nodes):
        name = node.name
        if node.module is not None:
            op = _layer_op(node.module, name, builder)
        else:
            op = ops.get(_op_prefix(name), "sum")  # an unknown op that survived filtering (ghn3: 'sum')
        size: tuple[int, ...] | None = None
        if node.module is not None:
            size = node.size
        elif "pool" in op:
            kernel = node.kernel_size or (3, 3)
            size = (1, 1, *(kernel if len(kernel) > 1 else kernel * 2))
        if builder == "ghn3" and size is not None:
            if len(size) == 3 and size[0] == 1 and min(size[1:]) > 1:  # [1, T, C] -> [1, C, sqrt T, sqrt T]
                side = int(size[1] ** 0.5)
                size = (1, size[2], side, side)
            elif len(size) == 4 and i == n - 2 and max(size[2:]) == 1:  # 1x1-conv classifier
                size = size[:2]
        info = None
        if node.module is not None or "pool" in op:
            if builder == "ghn3":
                last_weight, last_bias = i == n - 2 and ".weight" in name, i == n - 1 and ".bias" in name
            else:
                last_weight, last_bias = i == n - 2, i == n - 1
            info = NodeInfo(name_for_matching=name if node.module is not None else op, op=op, size=size,
                            last_weight=last_weight, last_bias=last_bias)
        module = None if node.module is None else f"{type(node.module).__module__}.{type(node.module).__qualname__}"
        out.append(LegacyNode(op=op, name=name, module=module, shape=size, info=info))
    return out
