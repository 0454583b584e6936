"""Architecture graphs: what a GHN reads.

A graph is extracted from the autograd graph of one forward pass, run on the ``meta`` device
(no memory, no compute) under the MATH scaled-dot-product backend, so the same model always
yields the same graph whatever device its weights live on. Autograd nodes are typed with the
op vocabulary below by their autograd function (never by parameter names); shape-only ops
(views, transposes, expands, dropout, scalar arithmetic) are collapsed so that an edge means
"data flows from this op to that op", and each parameter is attached to the op that consumes it.
Repeated ops of the pass are answered from a cache of their output layouts (:mod:`.meta_cache`).
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

from .meta_cache import MetaShapeCache

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
    "rms_norm",     # RMSNorm / SimpleNorm modules (no mean subtraction), fused into one node
    "response_norm",  # global / filter response normalization modules (GRN, FRN), fused
    "evo_norm",     # EvoNorm modules, fused
    "std_conv",     # weight-standardized convolution modules (NFNet, BiT), fused
    "rel_pos",      # a parameter table gathered by index: relative-position biases
    "upsample",     # interpolation (nearest, bilinear, bicubic)
    "affine",       # a * x + b with parameters a, b in one op (ResMLP's Affine)
    "clamp",        # clamping activations (attention logit caps, numerical guards)
    "pointwise",    # other elementwise math: pow, sqrt, rsqrt, exp, sin, cos, 1 - x
    "reduce",       # reductions other than means: variance, norms, max
    "rnn",          # recurrent layers (LSTM, GRU, RNN) fused: not unrolled over time steps
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
    "AdaptiveMaxPool2D": "max_pool", "CopySlices": "concat", "Col2Im": "sum",
    "UpsampleNearest2D": "upsample", "UpsampleBilinear2D": "upsample", "UpsampleBicubic2D": "upsample",
    "UpsampleBicubic2DAa": "upsample", "UpsampleBilinear2DAa": "upsample", "UpsampleLinear1D": "upsample",
    "UpsampleNearest1D": "upsample", "UpsampleNearestExact2D": "upsample",
    "Index": "rel_pos", "Addcmul": "affine",
    "Clamp0": "clamp", "Clamp1": "clamp", "ClampMin": "clamp", "ClampMax": "clamp",
    **dict.fromkeys(("Pow0", "Pow1", "Pow2", "Sqrt", "Rsqrt", "Exp", "Log", "Sin", "Cos", "Abs", "Reciprocal",
                     "Rsub0", "Rsub1", "Erf", "Softplus", "Mish"), "pointwise"),
    "Elu": "relu", "Celu": "relu", "Selu": "relu", "Prelu": "relu", "PreluKernel": "relu",
    **dict.fromkeys(("Var", "Std", "VarMean", "LinalgVectorNorm", "Norm", "Amax", "Max0", "Max1", "Sum0",
                     "Logsumexp"), "reduce"),
}

#: Autograd ops that only reshape, reorder, copy or rescale by a constant: collapsed away.
_PASS_THROUGH: frozenset[str] = frozenset({
    "View", "UnsafeView", "Reshape", "ReshapeAlias", "T", "Transpose", "Permute", "Expand", "Clone",
    "Select", "Slice", "Unbind", "Squeeze0", "Squeeze1", "Squeeze2", "Unsqueeze", "Split",
    "SplitWithSizes", "UnsafeSplit", "Alias", "AsStrided", "NativeDropout", "Flatten", "ToCopy",
    "Add1", "Sub1", "Mul1", "Div1", "Neg", "Contiguous", "Roll", "PixelShuffle", "PixelUnshuffle",
    "ConstantPadNd", "ReflectionPad1D", "ReflectionPad2D", "ReplicationPad2D", "Repeat", "Im2Col", "Unfold",
    "CopyBackwards", "IndexSelect", "Gather", "Flip", "Narrow", "NewZeros", "Cumsum",
})

_SCALAR_CANDIDATES = frozenset({"Add0", "Sub0", "Mul0", "Div0"})
_NORM_OPS = frozenset({"batch_norm", "layer_norm", "group_norm"})
_PARAM_OP_OF_CONSUMER = {"sum": "pos_embed", "concat": "token", "mul": "scale", "upsample": "pos_embed"}
_WEIGHT_OPS = frozenset({"conv", "dw_conv", "group_conv", "std_conv", "linear", "matmul"})
_BACKWARD_SUFFIX = re.compile(r"Backward(\d*)$")


def _fused_module_types() -> dict[type, tuple[str, dict[str, str]]]:
    """Modules traced as ONE node: ``type -> (op, {parameter name: role})``.

    Their autograd graphs are chains of generic arithmetic (an RMSNorm is pow, mean, rsqrt, mul);
    typed by module class they become the op they are. Roles not listed default by shape.
    """
    table: dict[type, tuple[str, dict[str, str]]] = {}
    norm_roles = {"weight": "norm_weight", "bias": "norm_bias"}
    table[nn.RMSNorm] = ("rms_norm", norm_roles)
    for cls in (nn.LSTM, nn.GRU, nn.RNN):
        table[cls] = ("rnn", {})
    try:
        from timm.layers import evo_norm, filter_response_norm, grn, norm, std_conv
    except ImportError:  # timm is optional for plain PyTorch models
        return table
    for name in ("RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32",
                 "SimpleNorm", "SimpleNorm2d", "SimpleNormFp32", "SimpleNorm2dFp32"):
        if hasattr(norm, name):
            table[getattr(norm, name)] = ("rms_norm", norm_roles)
    table[grn.GlobalResponseNorm] = ("response_norm", {"weight": "scale", "bias": "norm_bias"})
    for cls in (filter_response_norm.FilterResponseNormTlu2d, filter_response_norm.FilterResponseNormAct2d):
        table[cls] = ("response_norm", {**norm_roles, "tau": "norm_bias"})
    for name in dir(evo_norm):
        cls = getattr(evo_norm, name)
        if name.startswith("EvoNorm") and isinstance(cls, type) and issubclass(cls, nn.Module):
            table[cls] = ("evo_norm", {**norm_roles, "v": "scale"})
    for name in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"):
        table[getattr(std_conv, name)] = ("std_conv", {"weight": "weight", "bias": "bias", "gain": "scale"})
    return table


@dataclasses.dataclass
class _FusedCall:
    """One call of a fused module: where its output came from and which parameters it used."""

    op: str
    autograd_op: str
    inputs: list[Any]                     # grad_fns of the tensor arguments
    params: list[tuple[str, str]]         # (parameter name, role)
    attrs: dict[str, Any]


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

    def virtual_edges(self, cutoff: int = 50) -> torch.Tensor:
        """``(V, 3)`` rows of (src, dst, distance) for every pair joined by a shortest forward path
        of 2..cutoff ops, ordered by (src, dst).

        GHN-2's virtual edges: they let one round of message passing reach distant layers.
        """
        key = ("virtual_edges", cutoff)
        if key not in self.cache:
            self.cache[key] = _shortest_paths(len(self.nodes), self.edges, cutoff)
        return self.cache[key]

    def residual_branch_ends(self) -> list[int]:
        """Weight ops (linear, conv) whose output goes straight into a residual sum, beside a
        producer of their own input: the last layer of a residual branch with no normalization or
        layer scale after it, so nothing but its weights sets how much the branch adds.
        """
        key = "residual_branch_ends"
        if key not in self.cache:
            producers: list[list[int]] = [[] for _ in self.nodes]
            for src, dst in self.edges:
                producers[dst].append(src)
            ancestors = [0] * len(self.nodes)  # bitsets, built along the topological order
            for node, srcs in enumerate(producers):
                for src in srcs:
                    ancestors[node] |= ancestors[src] | (1 << src)
            ends = set()
            for node, srcs in enumerate(producers):
                if self.nodes[node].op != "sum":
                    continue
                for end in srcs:
                    if self.nodes[end].op in _WEIGHT_OPS and self.nodes[end].params and any(
                            other != end and ancestors[end] >> other & 1 for other in srcs):
                        ends.add(end)
            self.cache[key] = sorted(ends)
        return self.cache[key]

    def reads_learned_token(self) -> bool:
        """Whether the output is read from a learned token (a ViT class token) rather than pooled
        over positions: the graph has a ``token`` node and no global pooling after it.

        Such a token holds no image information at the start; only the residual branches that
        attend to the patches write it in, so their scale sets how much the output depends on
        the input at all.
        """
        tokens = [i for i, node in enumerate(self.nodes) if node.op == "token"]
        if not tokens:
            return False
        consumers: list[list[int]] = [[] for _ in self.nodes]
        for src, dst in self.edges:
            consumers[src].append(dst)
        seen, stack = set(tokens), list(tokens)
        while stack:
            for dst in consumers[stack.pop()]:
                if dst not in seen:
                    seen.add(dst)
                    stack.append(dst)
        return not any(self.nodes[i].op == "glob_avg" for i in seen)

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


def _shortest_paths(n: int, edges: list[tuple[int, int]], cutoff: int) -> torch.Tensor:
    """All-pairs forward distances by one sweep over the topological order: a node's distances
    are one more than the nearest of its producers'. O(edges x nodes), no per-hop matrices."""
    producers: list[list[int]] = [[] for _ in range(n)]
    for src, dst in edges:
        if not 0 <= src < dst < n:
            raise ValueError(f"edge ({src}, {dst}) breaks the topological order of {n} nodes (src < dst)")
        producers[dst].append(src)
    unreachable = cutoff + 1
    to_node = torch.full((n, n), unreachable, dtype=torch.int32)  # row dst, column src
    to_node.fill_diagonal_(0)
    for dst, srcs in enumerate(producers):
        if srcs:
            torch.minimum(to_node[dst], to_node[srcs].amin(0) + 1, out=to_node[dst])
    distance = to_node.T
    pairs = torch.nonzero((distance >= 2) & (distance < unreachable))
    return torch.cat([pairs, distance[pairs[:, 0], pairs[:, 1]].long().unsqueeze(1)], dim=1)


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
    """What a parameter is to the op consuming it, from the op and the argument it fills."""
    if op in _NORM_OPS:
        return "norm_weight" if arg_index == 1 else "norm_bias"
    if op in _WEIGHT_OPS:
        return "weight" if ndim >= 2 else "bias"
    if op in ("pos_embed", "token", "rel_pos"):
        return "embedding"
    if op == "affine":
        return "norm_bias" if arg_index == 0 else "norm_weight"
    if op == "scale":
        return "scale"
    return "other"


def _default_input_size(model: nn.Module) -> tuple[int, ...]:
    """timm's ``pretrained_cfg['input_size']``, with the size a patch embedding was built for."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or (3, 224, 224)) if isinstance(cfg, dict) else (3, 224, 224)
    embed = getattr(model, "patch_embed", None) or getattr(model, "stem", None)  # ViTs / MLP-Mixers
    built_for = getattr(embed, "img_size", None)
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


def _conv_attrs(stride: Sequence[int], dilation: Sequence[int], groups: int, transposed: bool) -> dict[str, Any]:
    return {"stride": list(stride), "dilation": list(dilation), "groups": int(groups), "transposed": bool(transposed)}


def _record_fused_calls(model: nn.Module, calls: dict[Any, _FusedCall]) -> list[Any]:
    """Forward hooks that note, per fused-module call, its output's grad_fn; returns the handles."""
    table = _fused_module_types()
    handles = []
    for prefix, module in model.named_modules():
        spec = table.get(type(module))
        if spec is None:
            continue
        op, roles = spec

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any, prefix: str = prefix, op: str = op,
                 roles: dict[str, str] = roles) -> None:
            inputs = [a.grad_fn or a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            first = next(iter(_output_tensors(output)), None)  # recurrent layers return (output, state)
            out_fn = first.grad_fn if first is not None else None
            if out_fn is None or out_fn in inputs:
                return
            dot = f"{prefix}." if prefix else ""
            vector_role = "bias" if op == "rnn" else "norm_bias"
            params = [(dot + name, roles.get(name, "weight" if p.dim() >= 2 else vector_role))
                      for name, p in module.named_parameters()]
            attrs = {}
            if op == "std_conv":
                attrs = _conv_attrs(module.stride, module.dilation, module.groups, False)
            calls[out_fn] = _FusedCall(op, type(module).__name__, inputs, params, attrs)

        handles.append(module.register_forward_hook(hook))
    return handles


def meta_twins(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """Meta-device stand-ins for a forward pass with ``torch.func.functional_call(..., tie_weights=False)``
    that leaves ``model`` untouched: the substitutes by name, and each parameter's twin by the parameter's id.

    A shared parameter has one twin. Each (module, attribute) slot is substituted once: a module
    registered under two names (CoaT's shared conv position encodings) swapped once per name would
    have a twin swapped back in on restore, leaving the model with meta tensors as parameters.
    """
    twins: dict[int, torch.Tensor] = {}
    substitutes: dict[str, torch.Tensor] = {}
    slots: set[tuple[int, str]] = set()

    def substitute(name: str, twin: torch.Tensor) -> None:
        prefix, _, attr = name.rpartition(".")
        slot = (id(model.get_submodule(prefix)), attr)
        if slot not in slots:
            slots.add(slot)
            substitutes[name] = twin

    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in twins:
            twins[id(param)] = torch.empty_like(param, device="meta").requires_grad_()
        substitute(name, twins[id(param)])
    for name, buf in model.named_buffers(remove_duplicate=False):
        substitute(name, torch.empty_like(buf, device="meta"))
    return substitutes, twins


def _trace(
    model: nn.Module, input_size: Sequence[int]
) -> tuple[list[torch.Tensor], dict[int, str], dict[str, str], torch.Tensor, dict[Any, _FusedCall]]:
    """Run the forward pass on meta twins of all tensors (:func:`meta_twins`); the model is left untouched."""
    substitutes, twins = meta_twins(model)
    names: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        twin = twins[id(param)]
        if id(twin) in names:
            aliases[name] = names[id(twin)]
        else:
            names[id(twin)] = name
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    x = torch.empty((2, *input_size), device="meta", dtype=dtype, requires_grad=True)
    modes = {m: m.training for m in model.modules()}
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # same op and graph as train mode, without the running-stat update that meta tensors
            # can only run through slow Python decompositions
            module.training = False
    fused: dict[Any, _FusedCall] = {}
    handles = _record_fused_calls(model, fused)
    try:
        with sdpa_kernel(SDPBackend.MATH), torch.enable_grad(), MetaShapeCache():
            out = torch.func.functional_call(model, substitutes, (x,), strict=False, tie_weights=False)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    outputs = [t for t in _output_tensors(out) if t.grad_fn is not None]
    return outputs, names, aliases, x, fused


_SIZE_WORDS = ("size", "shape", "dimension", "match", "height", "width", "channel")


def _forward_hint(err: Exception) -> str:
    """What to check after a failed forward: a wrongly typed value a model was built with fails as a
    TypeError or ValueError that says nothing about sizes; anything else is most likely the input size."""
    if isinstance(err, (TypeError, ValueError)) and not any(word in str(err).lower() for word in _SIZE_WORDS):
        return ("The model rejected a value it was built with: check its kwargs (e.g. each --kwarg KEY=VALUE) "
                "against timm's signature for it.")
    return "Pass the size the model was built for (e.g. --img-size or input_size=(C, H, W))."


def build_graph(model: nn.Module, input_size: Sequence[int] | None = None, *, name: str | None = None) -> ArchGraph:
    """Extract the :class:`ArchGraph` of ``model`` for inputs of ``input_size`` = (C, H, W).

    ``input_size`` defaults to the model's ``pretrained_cfg['input_size']`` (timm), else 3x224x224.
    """
    input_size = tuple(input_size) if input_size is not None else _default_input_size(model)
    cfg = getattr(model, "pretrained_cfg", None)
    label = name or (cfg.get("architecture") if isinstance(cfg, dict) else None) or type(model).__name__
    try:
        outputs, names, aliases, x, fused = _trace(model, input_size)
    except Exception as err:  # noqa: BLE001 - any forward failure is reported with model and size
        raise GraphBuildError(
            f"forward pass of {label} failed for input size {'x'.join(map(str, input_size))}: "
            f"{type(err).__name__}: {str(err).rstrip('.')}. {_forward_hint(err)}"
        ) from err
    if not outputs:
        raise GraphBuildError(f"{label} returned no tensor that depends on its parameters or input")

    # Resolve each autograd function to (op producers, parameters) through pass-through chains.
    resolved: dict[Any, tuple[list[Any], list[Any]]] = {}

    def resolve(fn: Any) -> tuple[list[Any], list[Any]]:
        """Real op nodes and AccumulateGrad leaves reached from ``fn`` through pass-through ops."""
        if fn is None:
            return [], []
        if fn in fused:
            return [fn], []
        key = _autograd_key(fn)
        if key == "AccumulateGrad":
            return [], [fn]
        if fn in resolved:
            return resolved[fn]
        if key not in _PASS_THROUGH and not _is_scalar_arithmetic(key, fn):
            if key != "Index" or gathers_parameter(fn):
                return [fn], []
        ops, leaves = [], []
        for nxt, _ in fn.next_functions:
            o, leaf = resolve(nxt)
            ops += o
            leaves += leaf
        resolved[fn] = (ops, leaves)
        return ops, leaves

    def gathers_parameter(fn: Any) -> bool:
        """An index op reading a parameter table (relative-position bias); other gathers only move data."""
        return any(id(leaf.variable) != id(x) for nxt, _ in fn.next_functions for leaf in resolve(nxt)[1])

    input_leaf_id = id(x)
    param_shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    op_of: dict[Any, int] = {}
    nodes: list[GraphNode] = [GraphNode("input", "Input")]
    edges: set[tuple[int, int]] = set()
    seen_params: set[str] = set()

    def add_node(node: GraphNode, producers: list[Any], from_input: bool) -> int:
        kept = []
        for pname, shape, role in node.params:
            pname = aliases.get(pname, pname)
            if pname not in seen_params:
                seen_params.add(pname)
                kept.append((pname, shape, role))
        node.params = kept
        nodes.append(node)
        index = len(nodes) - 1
        edges.update((op_of[producer], index) for producer in producers)
        if from_input:
            edges.add((0, index))
        return index

    def autograd_node(fn: Any, leaves: list[tuple[Any, int]]) -> GraphNode:
        """Type an autograd function by its class and the parameters it consumes directly."""
        op = _OP_OF_AUTOGRAD.get(_autograd_key(fn), "other")
        params = [(leaf.variable, arg) for leaf, arg in leaves
                  if id(leaf.variable) != input_leaf_id and id(leaf.variable) in names]
        if params and op in _PARAM_OP_OF_CONSUMER:
            op = _PARAM_OP_OF_CONSUMER[op]
        if op == "matmul" and params:
            op = "linear"
        attrs: dict[str, Any] = {}
        if op == "conv":
            attrs = _conv_attrs(fn._saved_stride, fn._saved_dilation, fn._saved_groups, fn._saved_transposed)
            weight = next((p for p, _ in params if p.dim() >= 3), None)
            if attrs["groups"] > 1 and weight is not None:
                op = "dw_conv" if weight.shape[1] == 1 else "group_conv"
        return GraphNode(op, type(fn).__name__, attrs=attrs,
                         params=[(names[id(p)], tuple(p.shape), _role(op, arg, p.dim())) for p, arg in params])

    def inputs_of(fn: Any) -> tuple[list[Any], list[tuple[Any, int]], bool]:
        """(op producers, (parameter leaf, argument index) pairs, whether the image feeds ``fn``)."""
        producers, leaves, from_input = [], [], False
        if fn in fused:
            for arg in fused[fn].inputs:
                if isinstance(arg, torch.Tensor):
                    from_input |= id(arg) == input_leaf_id
                    continue
                ops, found = resolve(arg)
                producers += ops
                from_input |= any(id(leaf.variable) == input_leaf_id for leaf in found)
            return producers, leaves, from_input
        for arg, (nxt, _) in enumerate(fn.next_functions):
            ops, found = resolve(nxt)
            producers += ops
            leaves += [(leaf, arg) for leaf in found]
        from_input = any(id(leaf.variable) == input_leaf_id for leaf, _ in leaves)
        return producers, leaves, from_input

    def bias_target(node: GraphNode, producers: list[Any], from_input: bool) -> int | None:
        """The weight op whose bias ``node`` adds, if it is one: a linear on a non-contiguous input
        runs as a matrix product plus a separate add of the 1-D bias."""
        if node.op != "pos_embed" or from_input or len(producers) != 1 or len(node.params) != 1:
            return None
        target = nodes[op_of[producers[0]]]
        if target.op not in _WEIGHT_OPS or len(node.params[0][1]) != 1 or any(r == "bias" for *_, r in target.params):
            return None
        return op_of[producers[0]]

    def make_node(fn: Any, leaves: list[tuple[Any, int]]) -> GraphNode:
        if fn not in fused:
            return autograd_node(fn, leaves)
        call = fused[fn]
        return GraphNode(call.op, call.autograd_op, attrs=call.attrs,
                         params=[(name, param_shapes[name], role) for name, role in call.params])

    # Iterative post-order DFS from the outputs: producers are numbered before their consumers.
    for output in outputs:
        roots, _ = resolve(output.grad_fn)
        for root in roots:
            stack: list[tuple[Any, bool]] = [(root, False)]
            while stack:
                fn, expanded = stack.pop()
                if fn in op_of:
                    continue
                producers, leaves, from_input = inputs_of(fn)
                if expanded:
                    node = make_node(fn, leaves)
                    target = bias_target(node, producers, from_input)
                    if target is None:
                        op_of[fn] = add_node(node, producers, from_input)
                    else:
                        nodes[target].params += [(n, shape, "bias") for n, shape, _ in node.params]
                        seen_params.update(n for n, _, _ in node.params)
                        op_of[fn] = target
                    continue
                stack.append((fn, True))
                stack.extend((p, False) for p in reversed(producers) if p not in op_of)

    for pname, param in model.named_parameters():
        if pname not in seen_params:
            nodes.append(GraphNode("unused", "None", params=[(pname, tuple(param.shape), "other")]))
    return ArchGraph(nodes=nodes, edges=sorted(edges), input_size=input_size, aliases=aliases)
