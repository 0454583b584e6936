"""Architecture graphs: what a GHN reads.

A graph is extracted from the autograd graph of one forward pass, run on the ``meta`` device
(no memory, no compute) under the MATH scaled-dot-product backend, so the same model always
yields the same graph whatever device its weights live on. Autograd nodes are typed with the
op vocabulary below by their autograd function (never by parameter names); shape-only ops
(views, transposes, expands, dropout, scalar arithmetic) are collapsed so that an edge means
"data flows from this op to that op", and each parameter is attached to the op that consumes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["OP_TYPES", "ROLES", "ArchGraph", "GraphBuildError", "GraphNode", "build_graph"]

#: The op vocabulary. Index order is part of a trained GHN's contract: append, never reorder.
OP_TYPES: tuple[str, ...] = (
    "input",        # the image tensor
    "conv",         # dense convolution (any kernel size, stride, dilation)
    "dw_conv",      # depthwise convolution (groups == input channels)
    "group_conv",   # grouped convolution
    "linear",       # matrix multiply with a weight parameter
    "matmul",       # matrix multiply of two activations (attention)
    "batch_norm",
    "layer_norm",
    "group_norm",
    "sum",          # elementwise add/subtract of activations (residuals)
    "mul",          # elementwise product of activations (gates, SE, attention scaling)
    "concat",
    "max_pool",
    "avg_pool",
    "glob_avg",     # global pooling / mean over spatial or token dims
    "relu",
    "gelu",
    "silu",
    "sigmoid",
    "tanh",
    "hardswish",
    "hardsigmoid",
    "softmax",
    "pos_embed",    # a parameter added to activations (positional embeddings, bias tables)
    "token",        # a parameter concatenated to activations (class / register tokens)
    "scale",        # a parameter multiplied with activations (layer scale)
    "other",        # any other autograd op: still a node, typed generically
    "unused",       # a parameter the forward pass never reached
)

#: What a parameter is to the op that consumes it; selects the output normalization.
ROLES: tuple[str, ...] = ("weight", "bias", "norm_weight", "norm_bias", "embedding", "scale", "other")

_OP_OF_AUTOGRAD: dict[str, str] = {
    "Convolution": "conv", "CudnnConvolution": "conv", "MkldnnConvolution": "conv",
    "Addmm": "linear", "Mm": "matmul", "Bmm": "matmul", "Baddbmm": "matmul", "Matmul": "matmul",
    "NativeBatchNorm": "batch_norm", "CudnnBatchNorm": "batch_norm", "MiopenBatchNorm": "batch_norm",
    "NativeLayerNorm": "layer_norm", "NativeGroupNorm": "group_norm",
    "Add0": "sum", "Sub0": "sum", "Mul0": "mul", "Div0": "mul",
    "Cat": "concat", "Stack": "concat",
    "MaxPool2DWithIndices": "max_pool", "MaxPool3DWithIndices": "max_pool", "MaxPool2D": "max_pool",
    "AvgPool2D": "avg_pool", "AvgPool3D": "avg_pool",
    "Mean0": "glob_avg", "Mean1": "glob_avg", "AdaptiveAvgPool2D": "glob_avg", "Sum1": "glob_avg",
    "Relu": "relu", "Threshold": "relu", "Hardtanh": "relu", "LeakyRelu": "relu",
    "Gelu": "gelu", "Silu": "silu", "Sigmoid": "sigmoid", "Tanh": "tanh",
    "Hardswish": "hardswish", "Hardsigmoid": "hardsigmoid",
    "Softmax": "softmax", "SafeSoftmax": "softmax", "LogSoftmax": "softmax",
}

#: Autograd ops that only reshape, reorder, copy or rescale by a constant: collapsed away.
_PASS_THROUGH: frozenset[str] = frozenset({
    "View", "UnsafeView", "Reshape", "ReshapeAlias", "T", "Transpose", "Permute", "Expand", "Clone",
    "Select", "Slice", "Unbind", "Squeeze0", "Squeeze1", "Squeeze2", "Unsqueeze", "Split",
    "SplitWithSizes", "UnsafeSplit", "Alias", "AsStrided", "NativeDropout", "Flatten", "ToCopy",
    "Add1", "Sub1", "Mul1", "Div1", "Neg", "Contiguous", "Roll", "PixelShuffle", "PixelUnshuffle",
})

_SCALAR_CANDIDATES = frozenset({"Add0", "Sub0", "Mul0", "Div0"})
_NORM_OPS = frozenset({"batch_norm", "layer_norm", "group_norm"})
_PARAM_OP_OF_CONSUMER = {"sum": "pos_embed", "concat": "token", "mul": "scale"}
_BACKWARD_SUFFIX = re.compile(r"Backward(\d*)$")


class GraphBuildError(RuntimeError):
    """The model could not be traced into an architecture graph."""


@dataclasses.dataclass
class GraphNode:
    """One op of the architecture, with the parameters it consumes as ``(name, shape, role)``."""

    op: str
    autograd_op: str
    params: list[tuple[str, tuple[int, ...], str]] = dataclasses.field(default_factory=list)
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def op_index(self) -> int:
        return OP_TYPES.index(self.op)


@dataclasses.dataclass
class ArchGraph:
    """Typed nodes in topological order and data-flow edges ``(src, dst)`` with ``src < dst``.

    ``aliases`` maps state-dict names of tied parameters to the name the graph uses; ``cache``
    holds derived data (virtual edges, encodings) so a graph reused in training is processed once.
    """

    nodes: list[GraphNode]
    edges: list[tuple[int, int]]
    input_size: tuple[int, ...]
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    cache: dict[Any, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def param_names(self) -> list[str]:
        return [name for node in self.nodes for name, _, _ in node.params]

    def virtual_edges(self, cutoff: int = 50) -> list[tuple[int, int, int]]:
        """``(src, dst, distance)`` for every pair joined by a shortest forward path of 2..cutoff ops.

        GHN-2's virtual edges: they let one round of message passing reach distant layers.
        """
        key = ("virtual_edges", cutoff)
        if key not in self.cache:
            self.cache[key] = _shortest_paths(len(self.nodes), self.edges, cutoff)
        return self.cache[key]

    def signature(self) -> str:
        """A content hash of the graph: equal signatures mean the GHN predicts equal tensors."""
        payload = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "nodes": [
                {"op": n.op, "autograd_op": n.autograd_op, "attrs": n.attrs,
                 "params": [{"name": p, "shape": list(s), "role": r} for p, s, r in n.params]}
                for n in self.nodes
            ],
            "edges": [list(e) for e in self.edges],
            "aliases": self.aliases,
        }

    def summary(self) -> dict[str, int]:
        """Node count per op type, for logs and tests."""
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts


def _shortest_paths(n: int, edges: list[tuple[int, int]], cutoff: int) -> list[tuple[int, int, int]]:
    """Breadth-first search from every node at once, one matrix step per hop (row = source)."""
    if not edges:
        return []
    src, dst = torch.tensor(edges, dtype=torch.long).T
    distance = torch.zeros(n, n, dtype=torch.int32)
    reached = torch.eye(n, dtype=torch.bool)
    frontier = torch.eye(n)
    for hop in range(1, cutoff + 1):
        step = torch.zeros(n, n).index_add_(1, dst, frontier[:, src])
        new = (step > 0) & ~reached
        if not new.any():
            break
        distance[new] = hop
        reached |= new
        frontier = new.float()
    pairs = torch.nonzero(distance >= 2)
    hops = distance[pairs[:, 0], pairs[:, 1]]
    return list(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist(), hops.tolist()))


def _autograd_key(fn: Any) -> str:
    """``ConvolutionBackward0`` -> ``Convolution``; keeps the overload digit where it matters."""
    name = type(fn).__name__
    match = _BACKWARD_SUFFIX.search(name)
    if not match:
        return name
    base, digit = name[: match.start()], match.group(1) or "0"
    keyed = base + digit
    if keyed in _OP_OF_AUTOGRAD or keyed in _PASS_THROUGH:
        return keyed
    return base


def _is_scalar_arithmetic(key: str, fn: Any) -> bool:
    """``x * 0.5`` recorded as a tensor op with one differentiable input: a rescale, not a node."""
    return key in _SCALAR_CANDIDATES and sum(nxt is not None for nxt, _ in fn.next_functions) == 1


def _role(op: str, arg_index: int, ndim: int) -> str:
    if op in _NORM_OPS:
        return "norm_weight" if arg_index == 1 else "norm_bias"
    if op in ("conv", "linear", "matmul"):
        return "weight" if ndim >= 2 else "bias"
    if op == "pos_embed" or op == "token":
        return "embedding"
    if op == "scale":
        return "scale"
    return "other"


def _default_input_size(model: nn.Module) -> tuple[int, ...]:
    """timm's ``pretrained_cfg['input_size']``, with the size a patch embedding was built for."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or (3, 224, 224)) if isinstance(cfg, dict) else (3, 224, 224)
    built_for = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(built_for, (tuple, list)) and len(built_for) == 2 and all(built_for):
        size = (size[0], *built_for)
    return size


def _output_tensors(out: Any) -> Iterable[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for value in out.values():
            yield from _output_tensors(value)
    elif isinstance(out, (list, tuple)):
        for value in out:
            yield from _output_tensors(value)


def _trace(
    model: nn.Module, input_size: Sequence[int]
) -> tuple[list[torch.Tensor], dict[int, str], dict[str, str], torch.Tensor]:
    """Run the forward pass on meta twins of all tensors; the model itself is left untouched."""
    names: dict[int, str] = {}
    aliases: dict[str, str] = {}
    twins: dict[int, torch.Tensor] = {}
    substitutes: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in twins:
            aliases[name] = names[id(twins[id(param)])]
        else:
            twin = torch.empty_like(param, device="meta").requires_grad_()
            twins[id(param)] = twin
            names[id(twin)] = name
        substitutes[name] = twins[id(param)]
    for name, buf in model.named_buffers(remove_duplicate=False):
        substitutes[name] = torch.empty_like(buf, device="meta")
    x = torch.empty((2, *input_size), device="meta", requires_grad=True)
    modes = {m: m.training for m in model.modules()}
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # same op and graph as train mode, without the running-stat update that meta tensors
            # can only run through slow Python decompositions
            module.training = False
    try:
        with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
            out = torch.func.functional_call(model, substitutes, (x,), strict=False)
    finally:
        for module, mode in modes.items():
            module.training = mode
    outputs = [t for t in _output_tensors(out) if t.grad_fn is not None]
    return outputs, names, aliases, x


def build_graph(model: nn.Module, input_size: Sequence[int] | None = None, *, name: str | None = None) -> ArchGraph:
    """Extract the :class:`ArchGraph` of ``model`` for inputs of ``input_size`` = (C, H, W).

    ``input_size`` defaults to the model's ``pretrained_cfg['input_size']`` (timm), else 3x224x224.
    """
    input_size = tuple(input_size) if input_size is not None else _default_input_size(model)
    cfg = getattr(model, "pretrained_cfg", None)
    label = name or (cfg.get("architecture") if isinstance(cfg, dict) else None) or type(model).__name__
    try:
        outputs, names, aliases, x = _trace(model, input_size)
    except Exception as err:  # noqa: BLE001 - any forward failure is reported with model and size
        raise GraphBuildError(
            f"forward pass of {label} failed for input size {'x'.join(map(str, input_size))}: "
            f"{type(err).__name__}: {str(err).rstrip('.')}. Pass the size the model was built for "
            f"(e.g. --img-size or input_size=(C, H, W))."
        ) from err
    if not outputs:
        raise GraphBuildError(f"{label} returned no tensor that depends on its parameters or input")

    # Resolve each autograd function to (op producers, parameters) through pass-through chains.
    resolved: dict[Any, tuple[list[Any], list[Any]]] = {}

    def resolve(fn: Any) -> tuple[list[Any], list[Any]]:
        """Real op nodes and AccumulateGrad leaves reached from ``fn`` through pass-through ops."""
        if fn is None:
            return [], []
        key = _autograd_key(fn)
        if key == "AccumulateGrad":
            return [], [fn]
        if key not in _PASS_THROUGH and not _is_scalar_arithmetic(key, fn):
            return [fn], []
        if fn in resolved:
            return resolved[fn]
        ops, leaves = [], []
        for nxt, _ in fn.next_functions:
            o, leaf = resolve(nxt)
            ops += o
            leaves += leaf
        resolved[fn] = (ops, leaves)
        return ops, leaves

    input_leaf_id = id(x)
    op_of: dict[Any, int] = {}
    nodes: list[GraphNode] = [GraphNode("input", "Input")]
    edges: set[tuple[int, int]] = set()
    seen_params: set[str] = set()

    def add_node(fn: Any, producers: list[Any], leaves: list[tuple[Any, int]]) -> int:
        key = _autograd_key(fn)
        op = _OP_OF_AUTOGRAD.get(key, "other")
        params = [(leaf, arg) for leaf, arg in leaves if id(leaf.variable) != input_leaf_id]
        if params and op in _PARAM_OP_OF_CONSUMER:
            op = _PARAM_OP_OF_CONSUMER[op]
        if op == "matmul" and params:
            op = "linear"
        attrs: dict[str, Any] = {}
        if op == "conv":
            attrs = {"stride": list(fn._saved_stride), "dilation": list(fn._saved_dilation),
                     "groups": int(fn._saved_groups), "transposed": bool(fn._saved_transposed)}
            weight = next((leaf.variable for leaf, _ in params if leaf.variable.dim() >= 3), None)
            if attrs["groups"] > 1 and weight is not None:
                op = "dw_conv" if weight.shape[1] == 1 else "group_conv"
        node = GraphNode(op, type(fn).__name__, attrs=attrs)
        for leaf, arg in params:
            pname = names.get(id(leaf.variable))
            if pname is None or pname in seen_params:
                continue
            seen_params.add(pname)
            node.params.append((pname, tuple(leaf.variable.shape), _role(op, arg, leaf.variable.dim())))
        nodes.append(node)
        index = len(nodes) - 1
        for producer in producers:
            edges.add((op_of[producer], index))
        if any(id(leaf.variable) == input_leaf_id for leaf, _ in leaves):
            edges.add((0, index))
        return index

    # Iterative post-order DFS from the outputs: producers are numbered before their consumers.
    for output in outputs:
        roots, _ = resolve(output.grad_fn)
        for root in roots:
            stack: list[tuple[Any, bool]] = [(root, False)]
            while stack:
                fn, expanded = stack.pop()
                if fn in op_of:
                    continue
                producers, leaves = [], []
                for arg, (nxt, _) in enumerate(fn.next_functions):
                    o, leaf = resolve(nxt)
                    producers += o
                    leaves += [(lf, arg) for lf in leaf]
                if expanded:
                    op_of[fn] = add_node(fn, producers, leaves)
                    continue
                stack.append((fn, True))
                stack.extend((p, False) for p in reversed(producers) if p not in op_of)

    for pname, param in model.named_parameters():
        if pname not in seen_params:
            nodes.append(GraphNode("unused", "None", params=[(pname, tuple(param.shape), "other")]))
    return ArchGraph(nodes=nodes, edges=sorted(edges), input_size=input_size, aliases=aliases)
