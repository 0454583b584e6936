"""Graphs of small hand-written modules, checked node by node."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ghn_init import GraphBuildError, build_graph


def ops(graph):
    return [n.op for n in graph.nodes]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


def test_residual_sum_nodes_edges_and_params():
    g = build_graph(Residual(), (3, 8, 8))
    assert ops(g) == ["input", "conv", "batch_norm", "relu", "sum"]
    assert g.edges == [(0, 1), (0, 4), (1, 2), (2, 3), (3, 4)]
    conv, bn = g.nodes[1], g.nodes[2]
    assert conv.params == [("conv.weight", (3, 3, 3, 3), "weight")]
    assert conv.attrs == {"stride": [1, 1], "dilation": [1, 1], "groups": 1, "transposed": False}
    assert bn.params == [("bn.weight", (3,), "norm_weight"), ("bn.bias", (3,), "norm_bias")]
    assert g.virtual_edges(cutoff=3).tolist() == [[0, 2, 2], [0, 3, 3], [1, 3, 2], [1, 4, 3], [2, 4, 2]]
    assert g.virtual_edges(cutoff=2).tolist() == [[0, 2, 2], [1, 3, 2], [2, 4, 2]]


class PreNormBlocks(nn.Module):
    """Two transformer-style MLP blocks (x + fc2(gelu(fc1(norm(x))))), a BN-ended conv residual
    and two parallel convs summed (a sum, but no residual)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.left, self.right = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.norms = nn.ModuleList(nn.LayerNorm(8) for _ in range(2))
        self.fc1 = nn.ModuleList(nn.Linear(8, 16) for _ in range(2))
        self.fc2 = nn.ModuleList(nn.Linear(16, 8) for _ in range(2))

    def forward(self, x):
        x = self.conv(x)
        x = x + self.bn(self.left(x))
        x = self.left(x) + self.right(x)
        x = x.flatten(2).transpose(1, 2)
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            x = x + fc2(F.gelu(fc1(norm(x))))
        return x


def test_residual_branch_ends_are_unscaled_last_layers_of_residual_branches():
    g = build_graph(PreNormBlocks(), (3, 4, 4))
    ends = [g.nodes[i].params[0][0].rsplit(".", 1)[0] for i in g.residual_branch_ends()]
    assert ends == ["fc2.0", "fc2.1"], "BN-ended branches and sums of parallel convs are not ends"
    assert all(g.nodes[i].op == "linear" for i in g.residual_branch_ends())


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 3, padding=1, stride=1, dilation=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.fc(self.pool(y).flatten(1))


def test_concat_pool_linear():
    g = build_graph(Concat(), (3, 8, 8))
    assert sorted(ops(g)) == sorted(["input", "conv", "conv", "concat", "glob_avg", "linear"])
    cat = ops(g).index("concat")
    convs = [i for i, op in enumerate(ops(g)) if op == "conv"]
    assert {(c, cat) for c in convs} <= set(g.edges)
    fc = g.nodes[ops(g).index("linear")]
    assert fc.params == [("fc.bias", (2,), "bias"), ("fc.weight", (2, 8), "weight")]
    assert all(src < dst for src, dst in g.edges), "nodes are in topological order"


class DepthwiseSeparable(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 5, padding=4, dilation=2, groups=4)
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2, stride=2)

    def forward(self, x):
        return self.grouped(self.dw(x))


def test_depthwise_and_grouped_conv():
    g = build_graph(DepthwiseSeparable(), (4, 8, 8))
    assert ops(g) == ["input", "dw_conv", "group_conv"]
    assert g.nodes[1].attrs["dilation"] == [2, 2] and g.nodes[1].attrs["groups"] == 4
    assert g.nodes[2].attrs["stride"] == [2, 2] and g.nodes[2].attrs["groups"] == 2


class Attention(nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 5, dim))
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x: (B, 4, dim) tokens given as (B, C=4, H=dim, W=1)
        x = x.flatten(2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return x + self.gamma * self.proj(out)


def test_attention_tokens_and_layer_scale():
    g = build_graph(Attention(), (4, 8, 1))
    counts = g.summary()
    assert counts["token"] == 1 and counts["pos_embed"] == 1 and counts["scale"] == 1
    assert counts["matmul"] == 2 and counts["softmax"] == 1 and counts["linear"] == 2
    params = {name: role for node in g.nodes for name, _, role in node.params}
    assert params == {"cls": "embedding", "pos": "embedding", "norm.weight": "norm_weight", "norm.bias": "norm_bias",
                      "qkv.weight": "weight", "qkv.bias": "bias", "proj.weight": "weight", "proj.bias": "bias",
                      "gamma": "scale"}
    softmax = ops(g).index("softmax")
    assert any(dst == softmax and g.nodes[src].op == "matmul" for src, dst in g.edges)


def test_same_graph_on_cpu_and_meta_and_model_untouched():
    model = Residual()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu = build_graph(model, (3, 8, 8))
    meta = build_graph(Residual().to("meta"), (3, 8, 8))
    assert cpu.to_dict() == meta.to_dict() and cpu.signature() == meta.signature()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "BN stats must not move"
    model.eval()
    build_graph(model, (3, 8, 8))
    assert not model.training


def test_unused_parameters_are_reported_as_nodes():
    model = Residual()
    model.spare = nn.Linear(2, 2)
    g = build_graph(model, (3, 8, 8))
    unused = [n for n in g.nodes if n.op == "unused"]
    assert sorted(p[0] for n in unused for p in n.params) == ["spare.bias", "spare.weight"]


def test_forward_failure_names_model_and_size():
    with pytest.raises(GraphBuildError, match=r"Residual failed for input size 5x8x8"):
        build_graph(Residual(), (5, 8, 8))


@pytest.mark.parametrize("name, kwargs, size", [
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, (3, 32, 32)),  # patch_embed
    ("mixer_s16_224", {"img_size": 32}, (3, 32, 32)),                          # stem
    ("visformer_tiny", {}, (3, 224, 224)),                                     # inner patch embeds do not count
])
def test_default_input_size_is_what_the_input_embedding_was_built_for(name, kwargs, size):
    import timm

    g = build_graph(timm.create_model(name, num_classes=10, device="meta", **kwargs))
    assert g.input_size == size


@pytest.mark.parametrize("name, kwargs, reads_token", [
    ("vit_tiny_patch16_224", {}, True),                              # class token read by the head
    ("deit_tiny_distilled_patch16_224", {}, True),                   # class and distillation tokens
    ("vit_tiny_patch16_224", {"global_pool": "avg"}, False),         # a class token, but pooled over patches
    ("mixer_s16_224", {}, False),
    ("resnet18", {}, False),
])
def test_reads_learned_token(name, kwargs, reads_token):
    import timm

    size = {} if name == "resnet18" else {"img_size": 32}
    model = timm.create_model(name, num_classes=10, device="meta", **size, **kwargs)
    assert build_graph(model, (3, 32, 32)).reads_learned_token() is reads_token
