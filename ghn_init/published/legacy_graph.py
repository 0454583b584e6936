"""Graphs in the published GHNs' own encoding (GHN-2 ``ppuda`` and GHN-3 ``ghn3`` code bases).

The published GHNs were trained on graphs of 15 primitive ops whose node order, virtual edges and
parameter matching their networks depend on. This module holds that encoding (:class:`LegacyGraph`)
and builds it from a model with the same semantics as the authors' builders, so that a published
GHN predicts what it predicts in its authors' code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

__all__ = ["LEGACY_OPS", "Builder", "LegacyGraph", "LegacyNode", "NodeInfo"]

#: The op vocabulary of both code bases (``PRIMITIVES_DEEPNETS1M``); a node's op index is its position here.
LEGACY_OPS: tuple[str, ...] = (
    "max_pool", "avg_pool", "sep_conv", "dil_conv", "conv", "msa", "cse", "sum", "concat", "input",
    "bias", "bn", "ln", "pos_enc", "glob_avg",
)

#: Which authors' graph builder a graph follows: GHN-3's (``ghn3``) or GHN-2's (``ppuda``).
Builder = Literal["ghn3", "ppuda"]


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
