"""The graph hypernetwork: graph in, every parameter tensor out.

GHN-2 style (Knyazev et al., 2021): node embeddings from op type and parameter shape, gated
(GRU) message passing over real edges and distance-weighted virtual edges in both directions,
LayerNorm on node states, and a decoder that turns each parameter's node state into a fixed-size
block tiled to the requested shape, then scaled by an op-dependent normalization so that any
width or depth starts in a trainable regime.

Two GHN-3-era alternatives are a config switch away (``GHNConfig.encoder``, ``GHNConfig.decoder``):
a graph transformer encoder (GHN-3, :mod:`ghn_init.transformer`) and a low-rank decoder (LoGAH)
whose weights are products of two decoded factors instead of tiled blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .graph import OP_TYPES, ROLES, ArchGraph, _default_input_size, build_graph
from .transformer import GraphTransformer

__all__ = ["GHN", "BatchPrediction", "GHNConfig", "PredictionReport", "fill_", "norm_statistics"]

_SHAPE_FEATURES = 9


@dataclasses.dataclass
class GHNConfig:
    """Hyper-parameters of a GHN; saved as the ``ghn`` block of ``config.json``."""

    hidden: int = 128           # node state width
    #: "gated_gnn": GHN-2's GRU message passing; "transformer": GHN-3's graph transformer
    #: (:mod:`ghn_init.transformer`), ``rounds`` layers of ``heads`` heads.
    encoder: str = "gated_gnn"
    rounds: int = 3             # message-passing rounds (each: forward, backward, virtual edges) or layers
    heads: int = 4              # attention heads of the transformer encoder
    virtual_cutoff: int = 50    # virtual edges join ops up to this many hops apart
    latent: int = 64            # per-position channels of the decoded kernel latent
    max_kernel: int = 7         # kernel latent is max_kernel x max_kernel, centre-cropped
    block: int = 64             # (block x block) tile for spatial kernels
    block_1x1: int = 128        # (block_1x1 x block_1x1) tile for linear and 1x1 layers
    vector: int = 128           # tile length for 1-D tensors (biases, norms)
    #: "tiling": weights are fixed-size decoded blocks tiled to the tensor's shape; "low_rank"
    #: (LoGAH): each weight (per kernel position) is the product of two decoded factors of
    #: ``rank`` columns and up to ``low_rank_size`` rows, so it is tiled only beyond that size.
    decoder: str = "tiling"
    rank: int = 16
    low_rank_size: int = 256
    #: Gain on the last layer of each residual branch that nothing after it rescales (see
    #: ``ArchGraph.residual_branch_ends``). Repeated blocks get near-identical predictions, so at
    #: gain 1 every block adds the same direction and the residual stream grows linearly with
    #: depth; a small gain starts such branches small, as Fixup, SkipInit and timm's
    #: ``zero_init_last`` do. Not applied where the output is read from a learned class token
    #: (``ArchGraph.reads_learned_token``): there the branches are the only path from the image to
    #: the classifier, and shrinking them makes the output nearly input-independent.
    residual_branch_gain: float = 0.1
    #: Noise, relative to a tensor's RMS, added to predicted weights that hold tiled copies: two
    #: identical units get identical gradients forever, so without it SGD can never use a layer's
    #: width beyond the tile. Deterministic per tensor name; 0 turns it off. Applied when tensors
    #: are made for a model (``predict``, ``predict_tensors``, ``apply_``), not in the
    #: differentiable ``forward`` that meta-training uses.
    untie_noise: float = 1.0

    def __post_init__(self) -> None:
        for key, allowed in (("encoder", ("gated_gnn", "transformer")), ("decoder", ("tiling", "low_rank"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"GHN config {key}: {getattr(self, key)!r} is not one of {allowed}")

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
class BatchPrediction:
    """One differentiable pass of the GHN over a meta-batch of graphs."""

    params: list[dict[str, torch.Tensor]]  # per graph: every parameter by name, tied names included
    #: (graphs,): sum of Frobenius norms of each graph's distinct tensors (GHN-3's penalty); None if not asked for
    norms: torch.Tensor | None


@dataclasses.dataclass
class _Encoded:
    """An :class:`ArchGraph` as tensors (built once per graph, cached on it)."""

    op_ids: torch.Tensor          # (N,) long
    node_features: torch.Tensor   # (N, _SHAPE_FEATURES)
    message_index: torch.Tensor   # (3, K) long: receiving node, message kind (0-3), sending node
    message_weight: torch.Tensor  # (K,) per receiver and kind, weights that sum to 1
    params: list[tuple[int, str, tuple[int, ...], str]]  # (node, name, shape, role)


def _log_dim(n: int) -> float:
    return math.log2(n + 1) / 10.0


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the GHN itself on one thread: matrix products split over threads sum in another order,
    so predictions would depend on the thread count. The GHN costs milliseconds; tiling, the
    memory-bound part, runs outside with all threads."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    src, dst = torch.tensor(graph.edges, dtype=torch.long).reshape(-1, 2).T
    vsrc, vdst, hops = graph.virtual_edges(cutoff).T
    ones, closeness = torch.ones(src.numel()), 1.0 / hops.float()
    index, weight = _mean_weights(graph.num_nodes, [
        (dst, src, ones), (src, dst, ones), (vdst, vsrc, closeness), (vsrc, vdst, closeness),
    ])
    encoded = _Encoded(
        op_ids=torch.tensor([node.op_index for node in graph.nodes], dtype=torch.long),
        node_features=features,
        message_index=index,
        message_weight=weight,
        params=params,
    )
    graph.cache[key] = encoded
    return encoded


def _mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))


def _mean_weights(n: int, kinds: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """GHN-2's weighted mean aggregations as sparse weights: for each message kind, given as
    (receivers, senders, weights), the weights each receiver gives its senders, normalized to sum 1."""
    index, weights = [], []
    for kind, (receivers, senders, weight) in enumerate(kinds):
        total = torch.zeros(n).index_add_(0, receivers, weight)
        index.append(torch.stack([receivers, torch.full_like(receivers, kind), senders]))
        weights.append(weight / total[receivers])
    return torch.cat(index, dim=1), torch.cat(weights)


def _message_operator(encoded: Sequence[_Encoded], offsets: Sequence[int], total: int,
                      device: torch.device) -> torch.Tensor:
    """A sparse ``(total, 4 * total)`` matrix: times the four stacked message tensors, it gives
    each node the sum of its four mean messages in one product (far faster than scatter-adds)."""
    index = torch.cat([e.message_index + torch.tensor([[o], [0], [o]]) for e, o in zip(encoded, offsets)], dim=1)
    weight = torch.cat([e.message_weight for e in encoded])
    receivers, kinds, senders = index
    coo = torch.sparse_coo_tensor(torch.stack([receivers, kinds * total + senders]), weight, (total, 4 * total),
                                  check_invariants=False).coalesce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.to_sparse_csr().to(device)


def _kernel_latent(latent: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """The ``(kh, kw)`` positions of a square kernel latent: centre-cropped for kernels up to its size,
    resampled (bilinear) for larger ones, so a 16x16 patch embedding gets a smooth filter at the scale
    of the latent's pattern instead of a 7-periodic tiling of it (as FlexiViT resizes patch embeddings).
    """
    s = latent.shape[-1]
    if kh > s or kw > s:
        latent = nn.functional.interpolate(latent, size=(max(kh, s), max(kw, s)), mode="bilinear",
                                           align_corners=True)
        s_h, s_w = latent.shape[-2:]
    else:
        s_h = s_w = s
    top, left = (s_h - kh) // 2, (s_w - kw) // 2
    return latent[:, :, top:top + kh, left:left + kw]


@functools.lru_cache(maxsize=4096)
def _tile_index(size: int, period: int, device: torch.device) -> torch.Tensor:
    return torch.arange(size, device=device) % period


def _tile(block: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Repeat ``block`` along every dim until it covers ``shape``, then crop to it (differentiable).

    One gather per dim that needs it does both, with a light backward: in meta-training every
    operator counts (``repeat`` and a crop cost about ten times as many).
    """
    for dim, size in enumerate(shape):
        if block.shape[dim] != size:
            block = block.index_select(dim, _tile_index(size, block.shape[dim], block.device))
    return block


def _tile_into(block: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Same values as :func:`_tile`, written straight into one contiguous tensor.

    Only a strip of ``block.shape[0]`` rows is tiled the slow way; the output is then filled
    with one broadcast copy of that strip, so it is the only large allocation and each element
    is written once: what keeps billion-parameter predictions within memory and fast.
    """
    rows = min(block.shape[0], shape[0])
    strip = _tile(block, (rows, *shape[1:])).contiguous()
    out = block.new_empty(tuple(shape))
    full, rest = divmod(shape[0], rows)
    if full:
        out[: full * rows].view(full, *strip.shape).copy_(strip.expand(full, *strip.shape))
    if rest:
        out[full * rows:].copy_(strip[:rest])
    return out


def _tiled_square_sums(batch: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """Sum of squares of each block of ``batch`` as tiled to its shape in ``shapes``, without tiling.

    Each block element is weighted by how often the tile repeats it (per dim: the number of
    positions below the target size congruent to it), so the norm penalty of meta-training costs a
    few operators per block group instead of a reduction per tensor.
    """
    letters = "abcdefgh"[:batch.dim() - 1]
    operands, spec = [batch.square()], [f"n{letters}"]
    for dim, size in enumerate(batch.shape[1:]):
        if all(shape[dim] == size for shape in shapes):
            continue
        target = torch.tensor([shape[dim] for shape in shapes], device=batch.device).unsqueeze(1)
        operands.append(((target - torch.arange(size, device=batch.device) + size - 1) // size).to(batch.dtype))
        spec.append(f"n{letters[dim]}")
    return torch.einsum(",".join(spec) + "->n", *operands)


#: Periods of the untying noise: primes, so no tile copy of a 64- or 128-wide block lines up with
#: the noise pattern below 16,637 output units (or 17,161 input units).
_NOISE_PERIOD = (127, 131)


def _untie_(tensor: torch.Tensor, block: torch.Tensor, name: str, sigma: float) -> None:
    """Add ``sigma`` x RMS Gaussian noise in place to a tiled weight (in tile shape) holding copies.

    The noise is a small seeded block repeated with prime periods, added by broadcasting (one
    pass, no temporaries) and the same in every process; every copy of ``block`` gets its own.
    """
    shape = tensor.shape
    if tensor.dim() < 2 or (shape[0] <= block.shape[0] and shape[1] <= block.shape[1]):
        return
    p, q = min(shape[0], _NOISE_PERIOD[0]), min(shape[1], _NOISE_PERIOD[1])
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    rms = block[: shape[0], : shape[1]].float().pow(2).mean().sqrt()
    noise = (torch.randn((p, q, *shape[2:]), generator=generator) * (sigma * rms)).to(tensor.dtype)
    rows, cols = (shape[0] // p) * p, (shape[1] // q) * q
    tensor[:rows, :cols].unflatten(1, (-1, q)).unflatten(0, (-1, p)).add_(noise.unsqueeze(1).unsqueeze(0))
    tensor[:rows, cols:].unflatten(0, (-1, p)).add_(noise[:, : shape[1] - cols])
    tensor[rows:, :cols].unflatten(1, (-1, q)).add_(noise[: shape[0] - rows].unsqueeze(1))
    tensor[rows:, cols:].add_(noise[: shape[0] - rows, : shape[1] - cols])


def _normalize(raw: torch.Tensor, role: str, fan_in: torch.Tensor) -> torch.Tensor:
    """Op-dependent output scaling: fan-in scaled weights, bounded biases and norm affines.

    Elementwise, so it is applied to the small decoded blocks before tiling. ``fan_in`` holds one
    value per block, broadcast over the block's dims.
    """
    if role == "weight":
        return raw / fan_in.sqrt().view(-1, *[1] * (raw.dim() - 1))
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


@dataclasses.dataclass
class _Target:
    """One tensor to predict: where its node state is and how its block is decoded and tiled."""

    graph: int
    name: str
    shape: tuple[int, ...]
    role: str
    row: int                          # node row in the batched node states
    view: tuple[int, int, int, int]   # the shape as (out, in, kh, kw)
    kind: str                         # "vector", "dense" or "kernel"
    gain: float = 1.0                 # residual_branch_gain on residual branch ends

    @property
    def tile_shape(self) -> tuple[int, ...]:
        if self.kind == "vector":
            return (math.prod(self.shape) if self.shape else 1,)
        return self.view[:2] if self.kind == "dense" else self.view


def _targets(graphs: Sequence[ArchGraph], encoded: Sequence[_Encoded], offsets: Sequence[int],
             branch_gain: float) -> list[_Target]:
    targets = []
    for gi, (enc, off) in enumerate(zip(encoded, offsets)):
        nodes = graphs[gi].nodes
        scaled = branch_gain != 1.0 and not graphs[gi].reads_learned_token()
        ends = set(graphs[gi].residual_branch_ends()) if scaled else set()
        for node, name, shape, role in enc.params:
            view = _as_4d(shape, spatial=nodes[node].op.endswith("conv"))
            if len(shape) <= 1 or role in ("bias", "norm_weight", "norm_bias", "scale"):
                kind = "vector"
            elif view[2] == 1 and view[3] == 1:
                kind = "dense"
            else:
                kind = "kernel"
            gain = branch_gain if node in ends else 1.0
            targets.append(_Target(gi, name, shape, role, off + node, view, kind, gain))
    return targets


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
        if cfg.encoder == "transformer":
            self.transformer = GraphTransformer(h, cfg.rounds, cfg.heads)
        else:
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
        self.dense_latent = _mlp(h, 2 * h, cfg.latent)
        self.vector_head = _mlp(h, 2 * h, cfg.vector)
        # Latents start with std ~0.25: raw blocks start near std 0.5, weights near 0.5/sqrt(fan_in).
        if cfg.decoder == "low_rank":
            self.kernel_factors = nn.Linear(cfg.latent, 2 * cfg.low_rank_size * cfg.rank)
            self.dense_factors = nn.Linear(cfg.latent, 2 * cfg.low_rank_size * cfg.rank)
            decoders, std = (self.kernel_factors, self.dense_factors), 2.8 / math.sqrt(cfg.latent)  # factors ~0.7
        else:
            self.kernel_block = nn.Linear(cfg.latent, cfg.block * cfg.block)
            self.dense_block = nn.Linear(cfg.latent, cfg.block_1x1 * cfg.block_1x1)
            decoders, std = (self.kernel_block, self.dense_block), 2.0 / math.sqrt(cfg.latent)
        for decoder in decoders:
            nn.init.normal_(decoder.weight, std=std)
            nn.init.zeros_(decoder.bias)
        self.register_load_state_dict_pre_hook(_extend_op_vocabulary)

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
        h = self.op_embed(op_ids) + self.shape_embed(feats)
        if self.config.encoder == "transformer":
            return self.transformer(h, graphs, self.config.virtual_cutoff), encoded, offsets
        operator = _message_operator(encoded, offsets, total, device)
        for r in range(self.config.rounds):
            messages = torch.cat([self.msg_forward[r](h), self.msg_backward[r](h),
                                  self.msg_virtual_forward[r](h), self.msg_virtual_backward[r](h)])
            h = self.node_norm[r](self.update[r](operator @ messages, h))
        return h, encoded, offsets

    def decode(self, graphs: Sequence[ArchGraph]) -> tuple[list[_Target], list[torch.Tensor]]:
        """Every parameter of ``graphs`` as a small normalized block (see :meth:`decode_groups`).

        Tiling a block to its tensor's shape is left to the caller, so prediction can produce
        tensors one at a time.
        """
        targets, groups = self.decode_groups(graphs)
        blocks: list[torch.Tensor | None] = [None] * len(targets)
        for idx, batch in groups:
            for i, block in zip(idx, batch.unbind(0)):
                blocks[i] = block
        return targets, blocks

    def decode_groups(self, graphs: Sequence[ArchGraph]) -> tuple[list[_Target], list[tuple[list[int], torch.Tensor]]]:
        """The parameters of ``graphs`` and their normalized blocks, stacked in groups of equal block shape.

        Each group is (indices into the targets, a ``(len(indices), *block)`` tensor): one decoder
        call per group, whatever the number of tensors, so the cost of a meta-batch does not grow
        with its tensor count. Within a group, tensors of one tile shape are adjacent. The low-rank
        decoder crops factors per tensor: its groups hold one.
        """
        h, encoded, offsets = self.node_states(graphs)
        targets = _targets(graphs, encoded, offsets, self.config.residual_branch_gain)
        if not targets:
            return [], []
        device = h.device
        cfg = self.config
        rows = torch.tensor([t.row for t in targets], device=device)
        roles = torch.tensor([ROLES.index(t.role) for t in targets], device=device)
        dims = torch.tensor([[_log_dim(d) for d in t.view] for t in targets], device=device)
        fan_in = torch.tensor([float(t.view[1] * t.view[2] * t.view[3]) for t in targets], device=device)
        gains = torch.tensor([t.gain for t in targets], device=device)
        z = self.param_norm(h[rows] + self.role_embed(roles) + self.param_shape_embed(dims))

        by_decoder: dict[tuple[Any, ...], list[int]] = {}
        for i, t in enumerate(targets):
            kernel = t.view[2:] if t.kind == "kernel" else ()
            by_decoder.setdefault((t.kind, t.role, *kernel), []).append(i)
        groups: list[tuple[list[int], torch.Tensor]] = []
        for (kind, role, *kernel), idx in by_decoder.items():
            idx.sort(key=lambda i: targets[i].tile_shape)  # same-shape tensors adjacent: predict_batch splits
            sel = torch.tensor(idx, device=device)
            if kind != "vector" and cfg.decoder == "low_rank":
                for i, raw in zip(idx, self._low_rank_blocks([targets[i] for i in idx], z[sel], kind, kernel)):
                    groups.append(([i], _normalize(raw.unsqueeze(0), role, fan_in[i:i + 1]) * targets[i].gain))
                continue
            if kind == "vector":
                raw = self.vector_head(z[sel])
            elif kind == "dense":
                raw = self.dense_block(self.dense_latent(z[sel])).view(-1, cfg.block_1x1, cfg.block_1x1)
            else:
                kh, kw = kernel
                lat = _kernel_latent(self.kernel_latent(z[sel]).view(-1, cfg.latent, cfg.max_kernel, cfg.max_kernel),
                                     kh, kw).permute(0, 2, 3, 1)
                raw = self.kernel_block(lat).view(-1, kh, kw, cfg.block, cfg.block).permute(0, 3, 4, 1, 2)
            groups.append((idx, _normalize(raw, role, fan_in[sel]) * gains[sel].view(-1, *[1] * (raw.dim() - 1))))
        return targets, groups

    def _low_rank_blocks(self, targets: Sequence[_Target], z: torch.Tensor, kind: str,
                         kernel: Sequence[int]) -> list[torch.Tensor]:
        """LoGAH's decoder: per tensor (and kernel position), ``A @ B.T / sqrt(rank)`` with ``A``, ``B``
        decoded factors cropped to the tensor's (out, in) up to ``low_rank_size``; raw, before scaling."""
        cfg = self.config
        size, rank = cfg.low_rank_size, cfg.rank
        if kind == "dense":
            factors = self.dense_factors(self.dense_latent(z)).view(-1, 2, size, rank)
        else:
            kh, kw = kernel
            lat = _kernel_latent(self.kernel_latent(z).view(-1, cfg.latent, cfg.max_kernel, cfg.max_kernel), kh, kw)
            factors = self.kernel_factors(lat.permute(0, 2, 3, 1)).view(-1, kh, kw, 2, size, rank)
        raws = []
        for target, factor in zip(targets, factors):
            rows, cols = min(target.view[0], size), min(target.view[1], size)
            if kind == "dense":
                raws.append(factor[0, :rows] @ factor[1, :cols].T / math.sqrt(rank))
            else:
                a, b = factor[:, :, 0, :rows], factor[:, :, 1, :cols]
                raws.append(torch.einsum("hwor,hwcr->ochw", a, b) / math.sqrt(rank))
        return raws

    def forward(self, graphs: Sequence[ArchGraph]) -> list[dict[str, torch.Tensor]]:
        """Predicted parameters (float32, on the GHN's device) for each graph, keyed by name."""
        return self.predict_batch(graphs, norms=False).params

    def predict_batch(self, graphs: Sequence[ArchGraph], norms: bool = True) -> BatchPrediction:
        """:meth:`forward` plus (with ``norms``) each graph's predicted-tensor norm, what meta-training needs.

        Tensors of one block group that share a shape are tiled in one call, and the norms of a
        block group come from its blocks in one contraction, so a step's operator count grows with
        the number of distinct shapes, not of tensors (a ViT's blocks are all alike).
        """
        targets, groups = self.decode_groups(graphs)
        params: list[dict[str, torch.Tensor]] = [{} for _ in graphs]
        square_sums: list[torch.Tensor] = []
        owners: list[int] = []
        for idx, batch in groups:
            shapes = [targets[i].tile_shape for i in idx]
            if norms:
                square_sums.append(_tiled_square_sums(batch, shapes))
                owners.extend(targets[i].graph for i in idx)
            sizes = [len(list(run)) for _, run in itertools.groupby(shapes)]
            start = 0
            for members, size in zip(batch.split(sizes), sizes):
                tiled = _tile(members, (size, *shapes[start]))
                for i, tensor in zip(idx[start:start + size], tiled.unbind(0)):
                    target = targets[i]
                    if tensor.shape != target.shape:
                        tensor = tensor.view(target.shape)
                    params[target.graph][target.name] = tensor
                start += size
        for gi, graph in enumerate(graphs):
            for alias, name in graph.aliases.items():
                params[gi][alias] = params[gi][name]
        if not norms:
            return BatchPrediction(params, None)
        device = self.op_embed.weight.device
        total = torch.zeros(len(graphs), device=device)
        if square_sums:
            total = total.index_add(0, torch.tensor(owners, device=device), torch.cat(square_sums).sqrt())
        return BatchPrediction(params, total)

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
    def from_pretrained(cls, ref: str | None = None, revision: str | None = None, *,
                        token: str | bool | None = None) -> GHN:
        """Same as :func:`ghn_init.load`."""
        from .hub import load

        return load(ref, revision, token=token)

    def push_to_hub(self, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, commit_message: str = "Upload GHN with ghn-init",
                    model_card: str | None = None) -> str:
        """Upload to a Hub model repo (created if missing); returns the commit URL."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, revision=revision, private=private, token=token,
                           commit_message=commit_message, model_card=model_card)

    @torch.no_grad()
    def predict(self, model: nn.Module, input_size: Sequence[int] | None = None, *,
                calibrate_bn: bool = True) -> dict[str, torch.Tensor]:
        """A state dict for ``model``: same keys, shapes and dtypes. Tensors are returned on the CPU.

        Works on meta-device models. BatchNorm running statistics are calibrated data-free at
        ``input_size`` (:func:`ghn_init.batchnorm.calibrate_predicted`), so eval mode works out of
        the box; ``calibrate_bn=False`` leaves them at identity, as :meth:`predict_tensors` does.
        """
        state = dict(self.predict_tensors(model, input_size))
        if calibrate_bn:
            self._calibrate(model, state, input_size)
        return state

    def _calibrate(self, model: nn.Module, state: dict[str, torch.Tensor] | None,
                   input_size: Sequence[int] | None) -> None:
        from .batchnorm import calibrate_predicted

        calibrate_predicted(model, state, input_size or _default_input_size(model), self.data_config)

    def predict_tensors(self, model: nn.Module,
                        input_size: Sequence[int] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for every state-dict entry in order, each made only when asked for.

        Memory for one full-size tensor at a time: the way to write models larger than RAM
        straight to a file (see :func:`ghn_init.export.save_predicted`). BatchNorm statistics are at
        identity: calibrating them needs every weight at once (:meth:`predict` does).
        """
        for name, tensor, _ in self._stream(model, input_size):
            yield name, tensor

    @torch.no_grad()
    def _stream(self, model: nn.Module, input_size: Sequence[int] | None,
                graph: ArchGraph | None = None) -> Iterator[tuple[str, torch.Tensor, str | None]]:
        """State-dict entries with a note: ``None`` when predicted, else why the value was copied."""
        was_training = self.training
        self.eval()
        try:
            graph = graph or build_graph(model, input_size)
            graph.virtual_edges(self.config.virtual_cutoff)
            with _one_thread():
                targets, blocks = self.decode([graph])
        finally:
            self.train(was_training)
        decoded = {t.name: (t, b.detach().cpu()) for t, b in zip(targets, blocks)}
        aliased = dict(graph.aliases)
        tied = set(aliased.values())
        shared: dict[str, torch.Tensor] = {}  # tied parameters: made once, yielded under every name
        statistics = norm_statistics(model)
        label = type(model).__name__
        for name, ref in model.state_dict(keep_vars=True).items():
            source = aliased.get(name, name)
            if source in decoded:
                if source in shared:
                    tensor = shared[source]
                else:
                    target, block = decoded[source]
                    tensor = _tile_into(block.to(ref.dtype), target.tile_shape)
                    if self.config.untie_noise and target.kind != "vector":
                        _untie_(tensor, block, source, self.config.untie_noise)
                    tensor = tensor.view(target.shape)
                    if source in tied:
                        shared[source] = tensor
                yield name, tensor, None
            elif name in statistics:
                yield name, statistics[name](ref), None
            elif ref.device.type != "meta":
                yield name, ref.detach().to("cpu", copy=True), "buffer copied from the model (constants, not weights)"
            else:
                raise ValueError(
                    f"{label}: buffer {name!r} lives on the meta device and is not a normalization "
                    "statistic, so its values are unknown; build the model on the CPU to predict it."
                )

    @torch.no_grad()
    def apply_(self, model: nn.Module, input_size: Sequence[int] | None = None) -> PredictionReport:
        """Fill ``model``'s parameters and norm statistics in place with predicted values.

        Parameters keep their objects, ``requires_grad``, dtype and device (an optimizer built
        before still points at them); meta tensors are replaced by CPU ones. A parameter shared
        by several modules or names is filled once and stays one object. Tensors are written as
        they are made, so memory holds one predicted tensor at a time beyond the model.
        """
        report = fill_(model, self._stream(model, input_size))
        self._calibrate(model, None, input_size)  # BatchNorm statistics as predict() makes them
        return report


@torch.no_grad()
def fill_(model: nn.Module, entries: Iterable[tuple[str, torch.Tensor, str | None]]) -> PredictionReport:
    """Write ``(name, tensor, note)`` state-dict entries into ``model`` in place (what ``apply_`` does).

    Parameters keep their objects, ``requires_grad``, dtype and device; meta tensors are replaced by
    CPU ones; a parameter shared by several modules or names is filled once and stays one object.
    ``note`` is ``None`` for a predicted entry, else why the entry holds something else.
    """
    predicted: list[str] = []
    skipped: dict[str, str] = {}
    # id of each tensor filled or replaced -> (that tensor, held so its id stays unique; what its slots hold now)
    filled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, tensor, note in entries:
        if note is None:
            predicted.append(name)
        else:
            skipped[name] = note
        prefix, _, attr = name.rpartition(".")
        owner = model.get_submodule(prefix)
        table = owner._parameters if attr in owner._parameters else owner._buffers
        current = table.get(attr)
        if current is None:
            raise ValueError(f"{type(model).__name__}: state-dict entry {name!r} is neither a parameter nor a "
                             "buffer of its module, so apply_ cannot place it; use predict() and the model's "
                             "own load_state_dict")
        if id(current) in filled:
            table[attr] = filled[id(current)][1]
            continue
        if current.is_meta:
            new = tensor.to(current.dtype)
            if isinstance(current, nn.Parameter):
                new = nn.Parameter(new, requires_grad=current.requires_grad)
            table[attr] = new
            filled[id(new)] = (new, new)
        else:
            current.copy_(tensor)
            new = current
        filled[id(current)] = (current, new)
    return PredictionReport(predicted=predicted, skipped=skipped)


def _extend_op_vocabulary(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
    """Load a GHN saved before op types were appended: the new types start as ``other``, the type
    those ops had when it was trained, so its predictions are unchanged until it is retrained."""
    key = prefix + "op_embed.weight"
    weight = state_dict.get(key)
    if weight is not None and 0 < weight.shape[0] < len(OP_TYPES):
        other = weight[OP_TYPES.index("other")]
        state_dict[key] = torch.cat([weight, other.expand(len(OP_TYPES) - weight.shape[0], -1)])


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

