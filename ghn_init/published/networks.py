"""The published GHN-2 and GHN-3 networks, predicting what their authors' code predicts.

GHN-3 (``SamsungSAILMontreal/ghn3``) is a graph transformer: node embeddings get in/out-degree
and distance-from-input embeddings, attention logits get a per-head bias from the distance
matrix, pre-LN layers. GHN-2 (``facebookresearch/ppuda``) is a gated GNN: one forward and one
backward sweep of in-place GRU updates with messages over real and (distance-scaled) virtual
edges. Both share the shape encoder, op embedding and decoders, and both end in a LayerNorm.

Each network predicts with the semantics of one code base (``code``): ``"ghn3"`` for GHN-3 and for
GHN-2 weights run by GHN-3's code (``is_ghn2=True``), ``"ppuda"`` for GHN-2 run by its own code.
The graph must be the matching builder's (:class:`~ghn_init.published.legacy_graph.LegacyGraph`).
Parameter names follow the published state dicts, so :meth:`PublishedNetwork.load_official_state_dict`
takes a checkpoint's tensors as stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .decoding import (
    Assignment,
    DecodeError,
    ShapeVocab,
    Target,
    assign_nodes,
    normalize,
    not_predicted_reason,
    tile,
)
from .formats import Code
from .legacy_graph import LEGACY_OPS, LegacyGraph

__all__ = ["GHN2Network", "GHN3Network", "PublishedNetwork", "build_network"]

# Where the GHN-3 code keeps these embeddings after loading (``fix_embed_layers``); the Hub files hold them
# at the top level, where this module keeps them too.
_RELOCATED = {f"gnn.0.{name}.weight": f"{name}.weight"
              for name in ("centrality_embed_in", "centrality_embed_out", "input_dist_embed")}


class _ShapeEncoder(nn.Module):
    def __init__(self, hid: int, vocab: ShapeVocab) -> None:
        super().__init__()
        self.embed_spatial = nn.Embedding(len(vocab.spatial) + 1, hid // 4)
        self.embed_channel = nn.Embedding(len(vocab.channels) + 1, hid // 4)

    def forward(self, shape_ind: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.embed_channel(shape_ind[:, 0]), self.embed_channel(shape_ind[:, 1]),
                          self.embed_spatial(shape_ind[:, 2]), self.embed_spatial(shape_ind[:, 3])), dim=1)


class _MLP(nn.Module):
    """Linear-ReLU-Linear(-ReLU), under ``fc`` as in ppuda's ``MLP``."""

    def __init__(self, sizes: tuple[int, int, int], last_relu: bool) -> None:
        super().__init__()
        layers = [nn.Linear(sizes[0], sizes[1]), nn.ReLU(), nn.Linear(sizes[1], sizes[2])]
        self.fc = nn.Sequential(*layers, *([nn.ReLU()] if last_relu else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class _ConvDecoder(nn.Module):
    """Node embedding -> (4hid, S, S) map -> per-pixel (out x in) channel block; 1x1 convs kept as Linear."""

    def __init__(self, hid: int, max_shape: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hid, 4 * hid * max_shape[2] * max_shape[3]), nn.ReLU())
        self.conv = nn.Sequential(nn.Linear(4 * hid, 8 * hid), nn.ReLU(),
                                  nn.Linear(8 * hid, max_shape[0] * max_shape[1]))
        self.class_layer_predictor = nn.Sequential(nn.ReLU(), nn.Linear(max_shape[0], num_classes))


class _GatedGNN(nn.Module):
    """ppuda ``GatedGNN`` (T=1): messages ``mlp`` over real edges plus ``mlp_ve``/distance over all edges.

    A message term depends only on its sender, so both terms are cached per node and refreshed when the
    node is updated; a node's message is then one weighted sum of cached rows.
    """

    def __init__(self, hid: int, ve: bool) -> None:
        super().__init__()
        self.mlp = _MLP((hid, hid // 2 if ve else hid, hid), last_relu=True)
        self.mlp_ve = _MLP((hid, hid // 2, hid), last_relu=True) if ve else None
        self.gru = nn.GRUCell(hid, hid)

    def _terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both message MLPs as one: first layers stacked, second layers block-diagonal."""
        first = [self.mlp.fc[0]] + ([self.mlp_ve.fc[0]] if self.mlp_ve is not None else [])
        second = [self.mlp.fc[2]] + ([self.mlp_ve.fc[2]] if self.mlp_ve is not None else [])
        w1 = torch.cat([layer.weight for layer in first])
        b1 = torch.cat([layer.bias for layer in first])
        w2 = torch.block_diag(*[layer.weight for layer in second])
        b2 = torch.cat([layer.bias for layer in second])
        return w1, b1, w2, b2

    def _incoming(self, receivers: torch.Tensor, senders: torch.Tensor, dist: torch.Tensor,
                  n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per node: rows of the (node, term) cache to sum and their weights (1 for ``mlp`` over real
        edges, 1/distance for ``mlp_ve`` over all edges)."""
        n_terms = 1 if self.mlp_ve is None else 2
        order = torch.argsort(receivers, stable=True)
        counts = torch.bincount(receivers, minlength=n).tolist()
        out = []
        for s, d in zip(senders[order].split(counts), dist[order].split(counts)):
            real = d == 1
            rows, weights = [s[real] * n_terms], [torch.ones_like(d[real])]
            if n_terms == 2:
                rows.append(s * 2 + 1)
                weights.append(1 / d)
            out.append((torch.cat(rows), torch.cat(weights)))
        return out

    def forward(self, x: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """Forward sweep (messages along edges), then backward sweep (against them), updating in place."""
        src, dst = torch.nonzero(dist, as_tuple=True)
        if dst.numel() == 0:
            return x
        d = dist[src, dst].to(x.dtype)
        n = int(dst.max()) + 1  # ppuda sweeps nodes up to the last one with an incoming edge
        w1, b1, w2, b2 = self._terms()
        gru_weights = (self.gru.weight_ih, self.gru.weight_hh, self.gru.bias_ih, self.gru.bias_hh)
        h = x.clone()
        cache = F.relu(F.linear(F.relu(F.linear(h, w1, b1)), w2, b2))   # (N, terms * hid)
        terms = cache.view(-1, h.shape[1])                                  # row node * n_terms + term
        zero = h.new_zeros(1, h.shape[1])
        for nodes, incoming in ((range(n), self._incoming(dst, src, d, n)),
                                (range(n - 1, -1, -1), self._incoming(src, dst, d, n))):
            for node in nodes:
                rows, weights = incoming[node]
                m = (weights.to(h) @ terms[rows]).unsqueeze(0) if rows.numel() else zero
                h[node] = state = torch.gru_cell(m, h[node].unsqueeze(0), *gru_weights)[0]
                cache[node] = F.relu(F.linear(F.relu(F.linear(state, w1, b1)), w2, b2))
        return h


class _EdgeEmbedding(nn.Module):
    def __init__(self, hid: int, rows: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(rows, hid)


class _Attention(nn.Module):
    def __init__(self, hid: int, heads: int, edges: bool) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (hid // heads) ** -0.5
        self.to_qkv = nn.Linear(hid, 3 * hid, bias=False)
        self.to_out = nn.Sequential(nn.Linear(hid, hid))
        if edges:
            self.edge_embed = _EdgeEmbedding(hid, 257)
            self.proj_e = nn.Sequential(nn.Linear(2 * hid, hid), nn.ReLU(), nn.Linear(hid, heads))

    def edge_bias(self, dist: torch.Tensor) -> _EdgeBias:
        """The (heads, N, N) logit bias from the embedded (forward, backward) distance pairs, held as a
        per-pair table: a pair takes few values (one direction is 0 in a DAG), so each distinct pair
        goes through the MLP once, and rows of the bias are looked up as attention needs them."""
        rows = self.edge_embed.embed.num_embeddings
        if int(dist.max()) + 2 >= rows:
            raise ValueError(f"graph distance {int(dist.max())} exceeds the GHN-3 edge embedding ({rows - 3} at most)")
        small = dist.to(torch.int32)
        pairs = (small + 2) * rows + (small.T + 2)
        present = torch.zeros(rows * rows, dtype=torch.bool, device=dist.device)
        present[pairs.flatten()] = True
        unique = present.nonzero().squeeze(1)  # ascending, as torch.unique would give them
        table = self.edge_embed.embed.weight
        lut = table.new_zeros(rows * rows, self.heads)
        lut[unique] = self.proj_e(torch.cat((table[unique // rows], table[unique % rows]), dim=1))
        return _EdgeBias(pairs, lut)

    def forward(self, x: torch.Tensor, bias: _EdgeBias) -> torch.Tensor:
        n, c = x.shape
        q, k, v = self.to_qkv(x).reshape(n, 3, self.heads, c // self.heads).permute(1, 2, 0, 3)
        # query rows in blocks of at most ~2^26 logits: the (heads, N, N) logits of a 15k-node graph
        # (timm's sequencer2d_l) would need 7 GB at once; one block for graphs up to about 2,900 nodes
        block = max(1, _LOGITS_PER_BLOCK // (self.heads * n))
        out = x.new_empty(self.heads, n, c // self.heads)
        for start in range(0, n, block):
            rows = slice(start, start + block)
            attn = ((q[:, rows] @ k.transpose(-2, -1)) * self.scale + bias.rows(rows)).softmax(dim=-1)
            out[:, rows] = attn @ v
        return self.to_out(out.transpose(0, 1).reshape(n, c))


_LOGITS_PER_BLOCK = 1 << 26


class _EdgeBias:
    """GHN-3's attention bias: ``lut[pairs[i, j]]`` is the (heads,) bias of node pair (i, j)."""

    def __init__(self, pairs: torch.Tensor, lut: torch.Tensor) -> None:
        self.pairs, self.lut = pairs, lut

    def rows(self, rows: slice) -> torch.Tensor:
        """(heads, rows, N) bias for a block of query rows."""
        return self.lut[self.pairs[rows].long()].permute(2, 0, 1)


class _FeedForward(nn.Module):
    def __init__(self, hid: int, ratio: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hid, ratio * hid), nn.GELU(), nn.Identity(), nn.Linear(ratio * hid, hid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _TransformerLayer(nn.Module):
    """Pre-LN layer; the first one owns the edge embedding whose bias every layer adds."""

    def __init__(self, hid: int, heads: int, edges: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hid)
        self.attn = _Attention(hid, heads, edges)
        self.ln2 = nn.LayerNorm(hid)
        self.ff = _FeedForward(hid, 4)

    def forward(self, x: torch.Tensor, bias: _EdgeBias) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), bias)
        return x + self.ff(self.ln2(x))


class PublishedNetwork(nn.Module):
    """Shared parts of GHN-2 and GHN-3: op and shape embeddings, decoders, prediction.

    Build one with :func:`build_network` and load a checkpoint with :meth:`load_official_state_dict`.
    """

    is_ghn2: bool

    def __init__(self, *, hid: int, max_shape: tuple[int, int, int, int], num_classes: int,
                 weight_norm: bool = True, layernorm: bool = True) -> None:
        super().__init__()
        if len(max_shape) != 4 or max_shape[2] != max_shape[3]:
            raise ValueError(f"max_shape must be (out, in, S, S), got {tuple(max_shape)}")
        self.hid, self.max_shape, self.num_classes = hid, tuple(int(s) for s in max_shape), num_classes
        self.weight_norm = weight_norm
        self.vocab = ShapeVocab(num_classes, self.max_shape[3])
        max_ch = max(self.max_shape[:2])
        self.embed = nn.Embedding(len(LEGACY_OPS), hid)
        self.shape_enc = _ShapeEncoder(hid, self.vocab)
        self.decoder = _ConvDecoder(hid, self.max_shape, num_classes)
        self.decoder_1d = _MLP((hid, 2 * hid, 2 * max_ch), last_relu=False)
        self.bias_class = nn.Sequential(nn.ReLU(), nn.Linear(max_ch, num_classes))
        self.ln = nn.LayerNorm(hid) if layernorm else None

    def load_official_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a checkpoint's tensors as stored: GHN-3 Hub layout (embeddings at the top level or
        under ``gnn.0``) or ppuda's (1x1-conv decoder weights). Strict: any missing, unexpected or
        misshapen tensor is named, with what to check."""
        own = self.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            name = _RELOCATED.get(key, key)
            if name in tensors:
                raise ValueError(f"state dict holds {name!r} twice (at the top level and under 'gnn.0.')")
            if name in own and value.dim() == 4 and own[name].dim() == 2 and value.shape[2:] == (1, 1):
                value = value.flatten(1)   # ppuda's 1x1 convs are our Linear layers
            tensors[name] = value
        missing, unexpected = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own.keys())
        shapes = [f"{k}: checkpoint {list(tensors[k].shape)}, network {list(own[k].shape)}"
                  for k in own.keys() & tensors.keys() if tensors[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            problems = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                        f"shape mismatch {sorted(shapes)}" if shapes else ""]
            raise ValueError(f"{self.describe()} cannot load this state dict: {'; '.join(p for p in problems if p)}. "
                             "Check that the config (hid, max_shape, num_classes, layers, heads, layernorm, ve) "
                             "is the one inferred from this checkpoint.")
        self.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)

    def describe(self) -> str:
        return f"{type(self).__name__}(hid={self.hid}, max_shape={self.max_shape}, num_classes={self.num_classes})"

    def _check_code(self, code: Code) -> None:
        if code not in ("ghn3", "ppuda"):
            raise ValueError(f"code must be 'ghn3' or 'ppuda', got {code!r}")

    def _propagate(self, x: torch.Tensor, dist: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Node states after message passing; each family defines its own."""
        raise NotImplementedError

    def graph_inputs(self, model: nn.Module, graph: LegacyGraph, *, code: Code) -> dict[str, torch.Tensor]:
        """The index tensors the GHN embeds (the fixtures' ``per_ghn_inputs`` names), to locate a divergence."""
        self._check_code(code)
        assignment = assign_nodes(model, graph, self.max_shape, code)
        return self._inputs(graph, assignment)

    def _inputs(self, graph: LegacyGraph, assignment: Assignment) -> dict[str, torch.Tensor]:
        shape_ind = self.vocab.indices(assignment.node_shapes)
        return {"node_type": torch.tensor([node.op_index for node in graph.nodes], dtype=torch.long),
                "shape_ind_out_ch": shape_ind[:, 0], "shape_ind_in_ch": shape_ind[:, 1],
                "shape_ind_h": shape_ind[:, 2], "shape_ind_w": shape_ind[:, 3]}

    def _embed(self, graph: LegacyGraph, assignment: Assignment) -> torch.Tensor:
        device = self.embed.weight.device
        inputs = self._inputs(graph, assignment)
        shape_ind = torch.stack([inputs[k] for k in ("shape_ind_out_ch", "shape_ind_in_ch", "shape_ind_h",
                                                      "shape_ind_w")], dim=1)
        x = self.embed(inputs["node_type"].to(device)) + self.shape_enc(shape_ind.to(device))
        x = self._propagate(x, graph.dist.to(device), {k: v.to(device) for k, v in inputs.items()})
        return self.ln(x) if self.ln is not None else x

    @torch.no_grad()
    def node_embeddings(self, model: nn.Module, graph: LegacyGraph, *, code: Code) -> torch.Tensor:
        """(N, hid) node embeddings after the GNN and the final LayerNorm, what the decoders read."""
        self._check_code(code)
        return self._embed(graph, assign_nodes(model, graph, self.max_shape, code))

    @torch.no_grad()
    def predict(self, model: nn.Module, graph: LegacyGraph, *, code: Code, seed: int = 0,
                values: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Predict the model's parameters as the authors' code would, reading only their shapes.

        Returns float32 CPU tensors by parameter name and, for every parameter not predicted, why.
        ``values=False`` tiles on the meta device instead: the same names and reasons with no memory
        for the tensors (what is predicted for a model larger than RAM).
        The model is not modified. ghn3 prepends a class-token row to a decoded ViT position
        embedding, drawn from the global RNG with ``torch.normal(0, 0.02)``; here it is drawn from a
        ``torch.Generator`` seeded with ``seed``, so a prediction is deterministic.
        """
        self._check_code(code)
        assignment = assign_nodes(model, graph, self.max_shape, code)
        x = self._embed(graph, assignment)
        generator = torch.Generator().manual_seed(seed)

        def class_token(width: int) -> torch.Tensor:
            return torch.normal(0.0, 0.02, size=(1, 1, width), generator=generator)

        predicted: dict[str, torch.Tensor] = {}
        failures: dict[str, str] = {}
        for key, nodes in assignment.groups.items():
            node_targets = [assignment.targets[node] for node in nodes]
            try:
                decoded = self._decode(x[torch.tensor(nodes, device=x.device)], key, code)
            except DecodeError as err:
                for target in (t for targets in node_targets for t in targets):
                    failures[target.name] = f"decoder key {key}: {err}"
                continue
            for block, targets in zip(decoded, node_targets):
                block = block if values else block.to("meta")
                for target in targets:
                    self._place(block, target, key, code, class_token, predicted, failures)
        return predicted, self._reasons(model, assignment, predicted, failures, code)

    def _place(self, block: torch.Tensor, target: Target, key: tuple[int, ...], code: Code,
               class_token: Callable[[int], torch.Tensor], predicted: dict[str, torch.Tensor],
               failures: dict[str, str]) -> None:
        """Tile one decoded block to its parameter, normalize it, store it (a later node overwrites)."""
        w = block if target.row is None else block[target.row]
        elementwise = (lambda b: normalize(b, target.is_w, target.shape)) if self.weight_norm else None
        try:
            out = tile(w, target.shape, code=code, top_left=self.is_ghn2, class_token=class_token,
                       elementwise=elementwise)
        except DecodeError as err:
            failures[target.name] = f"decoder key {key}: {err}"
            return
        if out.is_meta:
            predicted[target.name] = out
        else:
            out = out.to(device="cpu", dtype=torch.float32)
            shares = out.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()
            predicted[target.name] = out.clone() if shares or not out.is_contiguous() else out
        failures.pop(target.name, None)

    def _reasons(self, model: nn.Module, assignment: Assignment, predicted: dict[str, torch.Tensor],
                 failures: dict[str, str], code: Code) -> dict[str, str]:
        by_name = {entry.name: entry for entry in assignment.entries.values()}
        weight_keys = {entry.module_name: entry.key for entry in assignment.entries.values() if entry.is_w}
        modules = dict(model.named_modules())
        reasons = {}
        for name, _ in model.named_parameters():
            if name in predicted:
                continue
            if name in failures:
                reasons[name] = failures[name]
                continue
            entry = by_name.get(name)
            module_name = name.rsplit(".", 1)[0] if "." in name else ""
            weight_key = weight_keys.get(module_name)
            reasons[name] = not_predicted_reason(
                name, entry, modules.get(module_name), code,
                weight_matched=None if weight_key is None else weight_key in assignment.matched_keys)
        return reasons

    def _decode(self, x: torch.Tensor, key: tuple[int, ...], code: Code) -> torch.Tensor:
        """Decode one group of nodes (``x``: (n, hid)) sharing a decoder key, in one batch."""
        if len(key) == 2 and key[1] > 0:
            return self._decode_block(x, (key[0], key[1], 1, 1), class_pred=True, code=code)
        if len(key) in (2, 3):
            w = self.decoder_1d(x)
            if len(key) == 3:
                return w.view(len(x), -1, 1, 1)
            w = w.view(len(x), 2, -1)
            return self.bias_class(w) if key[1] < 0 else w
        return self._decode_block(x, key, class_pred=False, code=code)

    def _fc_map(self, x: torch.Tensor, rows: range, cols: range) -> torch.Tensor:
        """``decoder.fc`` computed only at the kept pixels: (n, 4hid, len(rows), len(cols))."""
        size_h, size_w = self.max_shape[2:]
        channels = torch.arange(self.decoder.fc[0].out_features // (size_h * size_w), device=x.device)
        ys = torch.tensor(list(rows), device=x.device, dtype=torch.long)
        xs = torch.tensor(list(cols), device=x.device, dtype=torch.long)
        idx = (channels.view(-1, 1, 1) * size_h * size_w + ys.view(1, -1, 1) * size_w + xs.view(1, 1, -1)).flatten()
        fc = self.decoder.fc[0]
        return F.relu(F.linear(x, fc.weight[idx], fc.bias[idx])).view(len(x), -1, len(rows), len(cols))

    def _channel_block(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``decoder.conv`` at every pixel, only for output rows ``rows`` of the (out x in) block: (n, R, h, w)."""
        hidden = self.decoder.conv[1](self.decoder.conv[0](h.permute(0, 2, 3, 1)))
        last = self.decoder.conv[2]
        return F.linear(hidden, last.weight[rows], last.bias[rows]).permute(0, 3, 1, 2)

    def _class_weights(self, block: torch.Tensor) -> torch.Tensor:
        """(n, out, in) -> (n, num_classes, in): the class-layer predictor over the out-channel axis."""
        return self.decoder.class_layer_predictor(block.transpose(1, 2)).transpose(1, 2)

    def _decode_block(self, x: torch.Tensor, key: tuple[int, ...], *, class_pred: bool, code: Code) -> torch.Tensor:
        if code == "ppuda":
            return self._decode_block_ppuda(x, key, class_pred)
        return self._decode_block_ghn3(x, key, class_pred)

    def _decode_block_ghn3(self, x: torch.Tensor, key: tuple[int, ...], class_pred: bool) -> torch.Tensor:
        """``ConvDecoder3.forward``: crop the map (corner for GHN-2, centre for GHN-3), decode the
        (out x in) block per pixel, resize kernels larger than the map bilinearly."""
        max_out, max_in, size, _ = self.max_shape
        kh, kw = key[2], key[3]
        if self.is_ghn2:
            rows, cols = range(size)[:kh], range(size)[:kw]
        else:
            rows = range(size)[max(0, size // 2 - kh // 2): size // 2 + math.ceil(kh / 2)]
            cols = range(size)[max(0, size // 2 - kw // 2): size // 2 + math.ceil(kw / 2)]
        h = self._fc_map(x, rows, cols)
        n_out = max_out if class_pred else min(max_out, key[0])
        n_in = min(max_in, key[1])
        sel = (torch.arange(n_out, device=x.device).view(-1, 1) * max_in
               + torch.arange(n_in, device=x.device)).flatten()
        block = self._channel_block(h, sel).reshape(len(x), n_out, n_in, len(rows), len(cols))
        if min(kh, kw) > min(len(rows), len(cols)):
            block = F.interpolate(block.flatten(0, 1), size=(kh, kw), mode="bilinear").view(len(x), n_out, n_in, kh, kw)
        if class_pred:
            centre = block.shape[-1] // 2
            return self._class_weights(block[:, :, :, centre, centre])
        return block

    def _decode_block_ppuda(self, x: torch.Tensor, key: tuple[int, ...], class_pred: bool) -> torch.Tensor:
        """ppuda ``ConvDecoder.forward``: corner crop; for narrow blocks it decodes only the channel
        rows it keeps, picked with a stride that assumes the input width divides ``max_in``."""
        max_out, max_in, size, _ = self.max_shape
        kh, kw = key[2], key[3]
        if (kh > size or kw > size) and kh + kw < 2 * size:
            raise DecodeError(f"ppuda's ConvDecoder mis-shapes a {kh}x{kw} kernel (larger than {size} in one "
                              "dimension only)")
        rows, cols = range(size)[:kh], range(size)[:kw]
        h = self._fc_map(x, rows, cols)
        if key[1] <= max_in // 2 or (key[0] < max_out and not class_pred):
            n_in = key[1] // 3 * 4 if key[1] < max_in and key[1] % 3 == 0 else min(key[1], max_in)
            n_out = max_out if class_pred else min(max_out, key[0])
            sel = torch.arange(n_out * max_in, device=x.device)
            if n_in < max_in:
                if len(sel) % n_in:
                    raise DecodeError(f"ppuda's ConvDecoder cannot split {len(sel)} channel rows into rows of {n_in}")
                sel = sel.view(-1, n_in)[:: max_in // n_in].flatten()
            if len(sel) != n_out * n_in:
                raise DecodeError(f"ppuda's ConvDecoder picks {len(sel)} channel rows for a {n_out}x{n_in} block")
            block = self._channel_block(h, sel).reshape(len(x), n_out, n_in, len(rows), len(cols))
            block = block[:, :, : min(max_in, key[1])]
            if min(kh, kw) > min(len(rows), len(cols)):
                block = block.repeat(1, 1, 1, 2, 2)
        else:
            sel = torch.arange(max_out * max_in, device=x.device)
            block = self._channel_block(h, sel).reshape(len(x), max_out, max_in, len(rows), len(cols))
        if class_pred:
            return self._class_weights(block[:, :, :, 0, 0])
        return block


class GHN3Network(PublishedNetwork):
    """GHN-3: graph transformer over the distance matrix (``ghn3.nn.GHN3``, ``is_ghn2=False``)."""

    is_ghn2 = False

    def __init__(self, *, hid: int, max_shape: tuple[int, int, int, int], num_classes: int, heads: int = 8,
                 layers: int = 3, weight_norm: bool = True, layernorm: bool = True) -> None:
        super().__init__(hid=hid, max_shape=max_shape, num_classes=num_classes, weight_norm=weight_norm,
                         layernorm=layernorm)
        if hid % heads:
            raise ValueError(f"GHN-3 hid={hid} is not divisible by heads={heads}")
        self.heads, self.layers = heads, layers
        self.gnn = nn.ModuleList(_TransformerLayer(hid, heads, edges=i == 0) for i in range(layers))
        self.centrality_embed_in = nn.Embedding(101, hid)
        self.centrality_embed_out = nn.Embedding(101, hid)
        self.input_dist_embed = nn.Embedding(1001, hid)

    def describe(self) -> str:
        return f"GHN3Network(hid={self.hid}, heads={self.heads}, layers={self.layers}, max_shape={self.max_shape})"

    def _check_code(self, code: Code) -> None:
        super()._check_code(code)
        if code != "ghn3":
            raise ValueError("GHN-3 weights run only in GHN-3's code: use code='ghn3'")

    def _inputs(self, graph: LegacyGraph, assignment: Assignment) -> dict[str, torch.Tensor]:
        """Adds the in/out real-edge degrees and the distance from the input node (0: itself or none)."""
        inputs = super()._inputs(graph, assignment)
        real = graph.dist == 1
        inputs["in_degree_ind"] = real.sum(0).clamp(0, self.centrality_embed_in.num_embeddings - 1)
        inputs["out_degree_ind"] = real.sum(1).clamp(0, self.centrality_embed_out.num_embeddings - 1)
        inputs["input_dist_ind"] = graph.dist[0].clamp(0, self.input_dist_embed.num_embeddings - 1)
        return inputs

    def _propagate(self, x: torch.Tensor, dist: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = x + self.centrality_embed_in(inputs["in_degree_ind"])
        x = x + self.centrality_embed_out(inputs["out_degree_ind"])
        x = x + self.input_dist_embed(inputs["input_dist_ind"])
        bias = self.gnn[0].attn.edge_bias(dist)
        for layer in self.gnn:
            x = layer(x, bias)
        return x


class GHN2Network(PublishedNetwork):
    """GHN-2: gated GNN with virtual edges (ppuda ``GHN``; also ``ghn3.nn.GHN3`` with ``is_ghn2=True``)."""

    is_ghn2 = True

    def __init__(self, *, hid: int, max_shape: tuple[int, int, int, int], num_classes: int, ve: bool = True,
                 weight_norm: bool = True, layernorm: bool = True) -> None:
        super().__init__(hid=hid, max_shape=max_shape, num_classes=num_classes, weight_norm=weight_norm,
                         layernorm=layernorm)
        self.gnn = _GatedGNN(hid, ve)

    def _propagate(self, x: torch.Tensor, dist: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.gnn(x, dist)


def build_network(config: Mapping[str, Any], *, code: Code | None = None) -> PublishedNetwork:
    """The network of a config as the authors' loaders see it, checked against the code that will run it.

    GHN-3 code (``ghn3.nn.from_pretrained``): ``hid, max_shape, num_classes, heads, layers, is_ghn2,
    weight_norm, ve, layernorm``. ppuda (``GHN.load``): ``max_shape, num_classes, hypernet, decoder,
    weight_norm, ve, layernorm, hid``. ``ve`` only changes GHN-2's message MLP; the virtual edges
    themselves come with the graph.
    """
    config = dict(config)
    common = {"hid": int(config.get("hid", 32)), "max_shape": tuple(config["max_shape"]),
              "num_classes": int(config["num_classes"]), "weight_norm": bool(config.get("weight_norm", False)),
              "layernorm": bool(config.get("layernorm", False))}
    if "hypernet" in config or config.get("is_ghn2"):
        hypernet, decoder = config.get("hypernet", "gatedgnn"), config.get("decoder", "conv")
        if (hypernet, decoder) != ("gatedgnn", "conv"):
            raise ValueError(f"GHN config hypernet={hypernet!r}, decoder={decoder!r}: only the published "
                             "GHN-2 architecture (hypernet='gatedgnn', decoder='conv') is supported")
        network: PublishedNetwork = GHN2Network(**common, ve=bool(config.get("ve", False)))
    else:
        network = GHN3Network(**common, heads=int(config.get("heads") or 8), layers=int(config.get("layers") or 3))
    if code is not None:
        network._check_code(code)
    return network
