"""A picture of an :class:`ArchGraph`: ops in layers by depth, coloured by op type, labelled with
their parameter shapes. People would rather look than read a JSON dump."""

from __future__ import annotations

import os
from pathlib import Path

from .graph import OP_TYPES, ArchGraph

__all__ = ["draw_graph"]


def _depths(graph: ArchGraph) -> list[int]:
    """Longest-path depth of each node from the input (nodes are in topological order)."""
    depth = [0] * graph.num_nodes
    for src, dst in graph.edges:
        depth[dst] = max(depth[dst], depth[src] + 1)
    return depth


def _label(node) -> str:
    shapes = ",".join("x".join(map(str, shape)) for _, shape, _ in node.params[:2])
    return f"{node.op}\n{shapes}" if shapes else node.op


def draw_graph(graph: ArchGraph, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write ``graph`` as PNG or SVG (by the file suffix); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix not in (".png", ".svg"):
        raise ValueError(f"{path}: draw_graph writes .png or .svg")
    depth = _depths(graph)
    layers: dict[int, list[int]] = {}
    for i, d in enumerate(depth):
        layers.setdefault(d, []).append(i)
    position = {}
    for d, members in layers.items():
        for j, i in enumerate(members):
            position[i] = (j - (len(members) - 1) / 2, -d)
    width = max(len(m) for m in layers.values())
    fig, ax = plt.subplots(figsize=(min(4 + 2.2 * width, 60), min(2 + 0.55 * len(layers), 300)))
    cmap = plt.get_cmap("tab20")
    color = {op: cmap(i % 20) for i, op in enumerate(OP_TYPES)}
    for src, dst in graph.edges:
        (x0, y0), (x1, y1) = position[src], position[dst]
        ax.plot([x0, x1], [y0, y1], color="0.6", lw=0.6, zorder=1)
    for i, node in enumerate(graph.nodes):
        x, y = position[i]
        ax.text(x, y, _label(node), ha="center", va="center", fontsize=6, zorder=2,
                bbox={"boxstyle": "round,pad=0.25", "fc": color[node.op], "ec": "0.3", "lw": 0.4})
    used = sorted({n.op for n in graph.nodes}, key=OP_TYPES.index)
    handles = [plt.Line2D([], [], marker="s", ls="", color=color[op], label=op) for op in used]
    ax.legend(handles=handles, loc="upper right", fontsize=7, frameon=False)
    ax.set_xlim(-width / 2 - 1, width / 2 + 1)
    ax.set_ylim(-max(layers) - 1, 1)
    ax.axis("off")
    ax.set_title(title or f"{graph.num_nodes} ops, {len(graph.edges)} edges", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
