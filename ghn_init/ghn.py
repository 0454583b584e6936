"""The graph hypernetwork: graph in, every parameter tensor out.

GHN-2 style (Knyazev et al., 2021): node embeddings from op type and parameter shape, gated
(GRU) message passing over real edges and distance-weighted virtual edges in both directions,
LayerNorm on node states, and a decoder that turns each parameter's node state into a fixed-size
block tiled to the requested shape, then scaled by an op-dependent normalization so that any
width or depth starts in a trainable regime.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .graph import OP_TYPES, ROLES, ArchGraph, build_graph

__all__ = ["GHN", "GHNConfig", "PredictionReport", "norm_statistics"]

_SHAPE_FEATURES = 9


@dataclasses.dataclass
class GHNConfig:
    """Hyper-parameters of a GHN; saved as the ``ghn`` block of ``config.json``."""

    hidden: int = 128           # node state width
    rounds: int = 3             # message-passing rounds (each: forward, backward, virtual edges)
    virtual_cutoff: int = 50    # virtual edges join ops up to this many hops apart
    latent: int = 64            # per-position channels of the decoded kernel latent
    max_kernel: int = 7         # kernel latent is max_kernel x max_kernel, centre-cropped
    block: int = 64             # (block x block) tile for spatial kernels
    block_1x1: int = 128        # (block_1x1 x block_1x1) tile for linear and 1x1 layers
    vector: int = 128           # tile length for 1-D tensors (biases, norms)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GHNConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown GHN config keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**data)


@dataclasses.dataclass
class PredictionReport:
    """What :meth:`GHN.apply_` did to each state-dict entry."""

    predicted: list[str]
    skipped: dict[str, str]


@dataclasses.dataclass
class _Encoded:
    """An :class:`ArchGraph` as tensors (built once per graph, cached on it)."""

    op_ids: torch.Tensor          # (N,) long
    node_features: torch.Tensor   # (N, _SHAPE_FEATURES)
    edges: torch.Tensor           # (2, E) long
    virtual: torch.Tensor         # (2, V) long
    virtual_weight: torch.Tensor  # (V,) 1 / distance
    params: list[tuple[int, str, tuple[int, ...], str]]  # (node, name, shape, role)


def _log_dim(n: int) -> float:
    return math.log2(n + 1) / 10.0


def _as_4d(shape: tuple[int, ...], spatial: bool) -> tuple[int, int, int, int]:
    """View any parameter shape as (out, in, kh, kw): conv kernels keep their spatial dims."""
    if len(shape) == 0:
        return 1, 1, 1, 1
    if len(shape) == 1:
        return shape[0], 1, 1, 1
    if spatial and len(shape) >= 3:
        kh = shape[2] if len(shape) >= 4 else 1
        return shape[0], shape[1], kh, math.prod(shape[3:]) if len(shape) >= 4 else shape[2]
    return math.prod(shape[:-1]), shape[-1], 1, 1


def _encode(graph: ArchGraph, cutoff: int) -> _Encoded:
    key = ("ghn_encoded", cutoff)
    if key in graph.cache:
        return graph.cache[key]
    features = torch.zeros(graph.num_nodes, _SHAPE_FEATURES)
    params = []
    for i, node in enumerate(graph.nodes):
        main = max(node.params, key=lambda p: len(p[1]), default=None)
        if main is not None:
            o, c, kh, kw = _as_4d(main[1], spatial=node.op.endswith("conv"))
            features[i, :4] = torch.tensor([_log_dim(o), _log_dim(c), kh / 7.0, kw / 7.0])
        stride = node.attrs.get("stride", [1, 1])
        dilation = node.attrs.get("dilation", [1, 1])
        features[i, 4:] = torch.tensor([
            stride[0] / 2.0, stride[-1] / 2.0, dilation[0] / 2.0, float(node.attrs.get("groups", 1) > 1),
            len(node.params) / 2.0,
        ])
        params.extend((i, name, shape, role) for name, shape, role in node.params)
    virtual = graph.virtual_edges(cutoff)
    encoded = _Encoded(
        op_ids=torch.tensor([node.op_index for node in graph.nodes], dtype=torch.long),
        node_features=features,
        edges=torch.tensor(graph.edges, dtype=torch.long).reshape(-1, 2).T.contiguous(),
        virtual=torch.tensor([v[:2] for v in virtual], dtype=torch.long).reshape(-1, 2).T.contiguous(),
        virtual_weight=torch.tensor([1.0 / v[2] for v in virtual]),
        params=params,
    )
    graph.cache[key] = encoded
    return encoded


def _mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))


def _mean_aggregate(messages: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor, n: int) -> torch.Tensor:
    """Weighted mean of incoming messages per destination node (zero where none arrive)."""
    total = messages.new_zeros(n, messages.shape[1]).index_add_(0, dst, messages * weight[:, None])
    norm = messages.new_zeros(n).index_add_(0, dst, weight)
    return total / norm.clamp_min(1e-6)[:, None]


def _tile(block: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Repeat ``block`` along every dim until it covers ``shape``, then crop to it."""
    reps = [math.ceil(s / b) for s, b in zip(shape, block.shape)]
    if any(r > 1 for r in reps):
        block = block.repeat(*reps)
    return block[tuple(slice(0, s) for s in shape)]


def _normalize(raw: torch.Tensor, role: str, fan_in: int) -> torch.Tensor:
    """Op-dependent output scaling: fan-in scaled weights, bounded biases and norm affines."""
    if role == "weight":
        return raw / math.sqrt(fan_in)
    if role == "bias":
        return 0.1 * torch.tanh(raw)
    if role == "norm_weight":
        return 1.0 + torch.tanh(raw)
    if role == "norm_bias":
        return 0.2 * torch.tanh(raw)
    if role == "scale":
        return torch.tanh(raw)
    if role == "embedding":
        return 0.05 * raw
    return 0.02 * raw


class GHN(nn.Module):
    """A graph hypernetwork. ``ghn(graphs)`` is differentiable; :meth:`predict` is for users."""

    def __init__(self, config: GHNConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or GHNConfig()
        #: JSON-serializable facts saved with the weights: name, data normalization, training.
        self.meta: dict[str, Any] = {}
        h = cfg.hidden
        self.op_embed = nn.Embedding(len(OP_TYPES), h)
        self.shape_embed = nn.Linear(_SHAPE_FEATURES, h)
        self.msg_forward = nn.ModuleList(_mlp(h, h, h) for _ in range(cfg.rounds))
        self.msg_backward = nn.ModuleList(_mlp(h, h, h) for _ in range(cfg.rounds))
        self.msg_virtual_forward = nn.ModuleList(_mlp(h, h, h) for _ in range(cfg.rounds))
        self.msg_virtual_backward = nn.ModuleList(_mlp(h, h, h) for _ in range(cfg.rounds))
        self.update = nn.ModuleList(nn.GRUCell(h, h) for _ in range(cfg.rounds))
        self.node_norm = nn.ModuleList(nn.LayerNorm(h) for _ in range(cfg.rounds))
        self.role_embed = nn.Embedding(len(ROLES), h)
        self.param_shape_embed = nn.Linear(4, h)
        self.param_norm = nn.LayerNorm(h)
        s = cfg.max_kernel
        self.kernel_latent = _mlp(h, 2 * h, cfg.latent * s * s)
        self.kernel_block = nn.Linear(cfg.latent, cfg.block * cfg.block)
        self.dense_latent = _mlp(h, 2 * h, cfg.latent)
        self.dense_block = nn.Linear(cfg.latent, cfg.block_1x1 * cfg.block_1x1)
        self.vector_head = _mlp(h, 2 * h, cfg.vector)
        for block in (self.kernel_block, self.dense_block):
            # latents start with std ~0.25: raw blocks start near std 0.5, weights near 0.5/sqrt(fan_in)
            nn.init.normal_(block.weight, std=2.0 / math.sqrt(cfg.latent))
            nn.init.zeros_(block.bias)

    # ------------------------------------------------------------------ differentiable core
    def node_states(self, graphs: Sequence[ArchGraph]) -> tuple[torch.Tensor, list[_Encoded], list[int]]:
        """Message passing over the disjoint union of ``graphs``; returns (N_total, hidden) states."""
        device = self.op_embed.weight.device
        encoded = [_encode(g, self.config.virtual_cutoff) for g in graphs]
        offsets, total = [], 0
        for enc in encoded:
            offsets.append(total)
            total += enc.op_ids.numel()
        op_ids = torch.cat([e.op_ids for e in encoded]).to(device)
        feats = torch.cat([e.node_features for e in encoded]).to(device)
        edges = torch.cat([e.edges + o for e, o in zip(encoded, offsets)], dim=1).to(device)
        virtual = torch.cat([e.virtual + o for e, o in zip(encoded, offsets)], dim=1).to(device)
        vweight = torch.cat([e.virtual_weight for e in encoded]).to(device)
        ones = torch.ones(edges.shape[1], device=device)
        h = self.op_embed(op_ids) + self.shape_embed(feats)
        src, dst = edges
        vsrc, vdst = virtual
        for r in range(self.config.rounds):
            m = _mean_aggregate(self.msg_forward[r](h)[src], dst, ones, total)
            m = m + _mean_aggregate(self.msg_backward[r](h)[dst], src, ones, total)
            m = m + _mean_aggregate(self.msg_virtual_forward[r](h)[vsrc], vdst, vweight, total)
            m = m + _mean_aggregate(self.msg_virtual_backward[r](h)[vdst], vsrc, vweight, total)
            h = self.node_norm[r](self.update[r](m, h))
        return h, encoded, offsets

    def forward(self, graphs: Sequence[ArchGraph]) -> list[dict[str, torch.Tensor]]:
        """Predicted parameters (float32, on the GHN's device) for each graph, keyed by name."""
        h, encoded, offsets = self.node_states(graphs)
        device = h.device
        cfg = self.config
        entries = []  # (graph index, name, shape, role, node row, 4d view, kind)
        for gi, (enc, off) in enumerate(zip(encoded, offsets)):
            nodes = graphs[gi].nodes
            for node, name, shape, role in enc.params:
                view = _as_4d(shape, spatial=nodes[node].op.endswith("conv"))
                if len(shape) <= 1 or role in ("bias", "norm_weight", "norm_bias", "scale"):
                    kind = "vector"
                elif view[2] == 1 and view[3] == 1:
                    kind = "dense"
                else:
                    kind = "kernel"
                entries.append((gi, name, shape, role, off + node, view, kind))
        results: list[dict[str, torch.Tensor]] = [{} for _ in graphs]
        if not entries:
            return results
        rows = torch.tensor([e[4] for e in entries], device=device)
        roles = torch.tensor([ROLES.index(e[3]) for e in entries], device=device)
        dims = torch.tensor([[_log_dim(d) for d in e[5]] for e in entries], device=device)
        z = self.param_norm(h[rows] + self.role_embed(roles) + self.param_shape_embed(dims))

        outputs: list[torch.Tensor | None] = [None] * len(entries)
        groups: dict[Any, list[int]] = {}
        for i, e in enumerate(entries):
            key = (e[6], min(e[5][2], cfg.max_kernel), min(e[5][3], cfg.max_kernel)) if e[6] == "kernel" else e[6]
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            sel = torch.tensor(idx, device=device)
            if key == "vector":
                blocks = self.vector_head(z[sel])
            elif key == "dense":
                blocks = self.dense_block(self.dense_latent(z[sel])).view(-1, cfg.block_1x1, cfg.block_1x1)
            else:
                _, kh, kw = key
                s = cfg.max_kernel
                lat = self.kernel_latent(z[sel]).view(-1, cfg.latent, s, s)
                top, left = (s - kh) // 2, (s - kw) // 2
                lat = lat[:, :, top:top + kh, left:left + kw].permute(0, 2, 3, 1)
                blocks = self.kernel_block(lat).view(-1, kh, kw, cfg.block, cfg.block).permute(0, 3, 4, 1, 2)
            for j, i in enumerate(idx):
                outputs[i] = blocks[j]
        for (gi, name, shape, role, _, view, kind), block in zip(entries, outputs):
            if kind == "vector":
                raw = _tile(block, (math.prod(shape) if shape else 1,))
            elif kind == "dense":
                raw = _tile(block, view[:2])
            else:
                raw = _tile(block, view)
            fan_in = view[1] * view[2] * view[3]
            results[gi][name] = _normalize(raw, role, fan_in).reshape(shape)
        for gi, graph in enumerate(graphs):
            for alias, target in graph.aliases.items():
                results[gi][alias] = results[gi][target]
        return results

    # ------------------------------------------------------------------ user-facing API
    @property
    def data_config(self) -> dict[str, Any]:
        """Input normalization and size the GHN was trained with (what predicted weights expect)."""
        return self.meta.get("data", {})

    def save_pretrained(self, folder: str, model_card: str | None = None) -> Any:
        """Write config.json, model.safetensors and (optionally) README.md to ``folder``."""
        from .hub import save_pretrained

        return save_pretrained(self, folder, model_card)

    @classmethod
    def from_pretrained(cls, ref: str | None = None, revision: str | None = None) -> GHN:
        """Same as :func:`ghn_init.load`."""
        from .hub import load

        return load(ref, revision)

    @torch.no_grad()
    def predict(self, model: nn.Module, input_size: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """A state dict for ``model``: same keys, shapes and dtypes; BN statistics at identity.

        Works on meta-device models. Tensors are returned on the CPU.
        """
        return self._predict(model, input_size)[0]

    def _predict(self, model: nn.Module,
                 input_size: Sequence[int] | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                graph = build_graph(model, input_size)
                params = self.forward([graph])[0]
        finally:
            self.train(was_training)
        statistics = norm_statistics(model)
        state: dict[str, torch.Tensor] = {}
        kept: dict[str, str] = {}
        label = type(model).__name__
        for name, ref in model.state_dict(keep_vars=True).items():
            if name in params:
                state[name] = params[name].detach().to("cpu", ref.dtype)
            elif name in statistics:
                state[name] = statistics[name](ref)
            elif ref.device.type != "meta":
                state[name] = ref.detach().to("cpu", copy=True)
                kept[name] = "buffer copied from the model (constants, not weights)"
            else:
                raise ValueError(
                    f"{label}: buffer {name!r} lives on the meta device and is not a normalization "
                    "statistic, so its values are unknown; build the model on the CPU to predict it."
                )
        return state, kept

    @torch.no_grad()
    def apply_(self, model: nn.Module, input_size: Sequence[int] | None = None) -> PredictionReport:
        """Fill ``model``'s parameters and norm statistics in place with predicted values."""
        state, kept = self._predict(model, input_size)
        on_meta = any(t.is_meta for t in model.state_dict().values())
        if on_meta:
            model.load_state_dict(state, assign=True)
        else:
            model.load_state_dict(state)
        return PredictionReport(predicted=[k for k in state if k not in kept], skipped=kept)


def norm_statistics(model: nn.Module) -> dict[str, Any]:
    """Buffers of norm layers, mapped to makers of their identity values (mean 0, var 1)."""
    makers: dict[str, Any] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            dot = f"{prefix}." if prefix else ""
            makers[dot + "running_mean"] = lambda ref: torch.zeros(ref.shape, dtype=ref.dtype)
            makers[dot + "running_var"] = lambda ref: torch.ones(ref.shape, dtype=ref.dtype)
            makers[dot + "num_batches_tracked"] = lambda ref: torch.zeros(ref.shape, dtype=ref.dtype)
    return makers

