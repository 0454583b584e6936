"""A GHN-3-style graph encoder: self-attention over all ops of a graph, biased by how they are wired.

GHN-3 (Knyazev et al., 2023) replaced GHN-2's gated message passing with a Graphormer-like
transformer. Every op attends to every other op of its graph in one step, and a learned per-head
bias for each directed shortest-path distance tells attention which ops feed which: so a layer
sees the whole graph, where a round of message passing sees its neighbours and virtual edges.
The price is memory and time quadratic in the number of ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .graph import ArchGraph

#: Shortest-path distances above this share a bucket (per direction).
MAX_DISTANCE = 8


def distance_buckets(graph: ArchGraph, cutoff: int, max_distance: int = MAX_DISTANCE) -> torch.Tensor:
    """``(n, n)`` attention-bias bucket of each (query, key) pair of ops.

    0: the op itself; ``1..max_distance``: the key is an ancestor at that many ops (clipped);
    ``max_distance + 1 .. 2 * max_distance``: a descendant, likewise; ``2 * max_distance + 1``: no
    forward path of at most ``cutoff`` ops either way.
    """
    key = ("ghn_distance_buckets", cutoff, max_distance)
    if key in graph.cache:
        return graph.cache[key]
    n = graph.num_nodes
    src, dst = torch.tensor(graph.edges, dtype=torch.long).reshape(-1, 2).T
    vsrc, vdst, hops = graph.virtual_edges(cutoff).T
    src, dst = torch.cat([src, vsrc]), torch.cat([dst, vdst])
    hops = torch.cat([torch.ones(len(graph.edges), dtype=torch.long), hops]).clamp(max=max_distance)
    buckets = torch.full((n, n), 2 * max_distance + 1, dtype=torch.long)
    buckets[dst, src] = hops
    buckets[src, dst] = hops + max_distance
    buckets.fill_diagonal_(0)
    graph.cache[key] = buckets
    return buckets


class _Layer(nn.Module):
    """Pre-norm transformer layer whose attention logits get a learned bias per distance bucket."""

    def __init__(self, hidden: int, heads: int, buckets: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.distance_bias = nn.Embedding(buckets, heads)
        nn.init.zeros_(self.distance_bias.weight)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        n, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, 3, self.heads, hidden // self.heads).permute(1, 2, 0, 3)
        bias = self.distance_bias(buckets).permute(2, 0, 1)  # (heads, n, n)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        x = x + self.proj(attended.transpose(0, 1).reshape(n, hidden))
        return x + self.mlp(self.norm2(x))


class GraphTransformer(nn.Module):
    """``layers`` attention layers over each graph of a batch (ops attend within their own graph)."""

    def __init__(self, hidden: int, layers: int, heads: int, max_distance: int = MAX_DISTANCE) -> None:
        super().__init__()
        self.max_distance = max_distance
        self.layers = nn.ModuleList(_Layer(hidden, heads, 2 * max_distance + 2) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, h: torch.Tensor, graphs: Sequence[ArchGraph], cutoff: int) -> torch.Tensor:
        """Node states ``h`` of the graphs' disjoint union (in order) in, updated states out."""
        out, start = [], 0
        for graph in graphs:
            x = h[start:start + graph.num_nodes]
            buckets = distance_buckets(graph, cutoff, self.max_distance).to(h.device)
            for layer in self.layers:
                x = layer(x, buckets)
            out.append(x)
            start += graph.num_nodes
        return self.norm(torch.cat(out))
