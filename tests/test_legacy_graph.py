"""The published GHNs' graphs: parity with the authors' builders (reference fixtures) and the extensions."""

import json
import random

import pytest
import timm
import torch
from published_cases import fixture_model
from torch import nn
from torch.nn import functional as F

from ghn_init.published.legacy_graph import (
    _CpuAttentionKernels,
    _distances,
    _distances_bfs,
    _Graph,
    _Node,
    _topological_order,
    build_legacy_graph,
)

# Every graph the official builders produced in the reference fixtures: (source-model, graphs key).
FIXTURE_GRAPHS = [
    ("timm-resnet50", "ghn3"), ("timm-resnet50", "ppuda-imagenet"),
    ("timm-swin_tiny_patch4_window7_224", "ghn3"),
    ("torchvision-convnext_tiny", "ghn3"), ("torchvision-convnext_tiny", "ppuda-imagenet"),
    ("torchvision-convnext_tiny", "ppuda-cifar10"),
    ("torchvision-efficientnet_b0", "ghn3"),
    ("torchvision-mobilenet_v3_small", "ghn3"), ("torchvision-mobilenet_v3_small", "ppuda-imagenet"),
    ("torchvision-mobilenet_v3_small", "ppuda-cifar10"),
    ("torchvision-resnet18", "ghn3"), ("torchvision-resnet18", "ppuda-imagenet"),
    ("torchvision-resnet18", "ppuda-cifar10"),
    ("torchvision-resnet50", "ghn3"), ("torchvision-resnet50", "ppuda-imagenet"),
    ("torchvision-resnet50", "ppuda-cifar10"),
    ("torchvision-vit_b_16", "ghn3"),
]


def _fixture_model(source_model: str, key: str, device: str) -> nn.Module:
    source, name = source_model.split("-", 1)
    return fixture_model(source, name, 10 if key == "ppuda-cifar10" else 1000, key == "ppuda-cifar10", device)


@pytest.mark.fixtures
def test_fixture_list_is_every_official_graph(reference_fixtures):
    built = []
    for path in sorted((reference_fixtures / "graphs").glob("*.json")):
        graphs = json.loads(path.read_text())["graphs"]
        built += [(path.stem, key) for key, graph in graphs.items() if "error" not in graph]
    assert sorted(built) == sorted(FIXTURE_GRAPHS)


@pytest.mark.fixtures
@pytest.mark.parametrize("source_model,key", FIXTURE_GRAPHS, ids=[f"{m}-{k}" for m, k in FIXTURE_GRAPHS])
def test_official_graph_parity(reference_fixtures, source_model, key):
    ref = json.loads((reference_fixtures / "graphs" / f"{source_model}.json").read_text())["graphs"][key]
    builder = "ghn3" if key == "ghn3" else "ppuda"
    for device in ("cpu", "meta"):
        graph = build_legacy_graph(_fixture_model(source_model, key, device), builder).to_dict()
        assert graph["input_size"] == ref["input_size"]
        assert len(graph["nodes"]) == ref["n_nodes"], device
        for got, want in zip(graph["nodes"], ref["nodes"]):
            assert got == want, device
        assert graph["edges_src_dst_dist"] == ref["edges_src_dst_dist"], device


def test_topological_order_is_networkx_kahn_generations():
    # generations [0, 1], then 3 before 2 because 0's child becomes ready first; a DFS order would differ
    assert _topological_order([{3}, {2}, set(), set()]) == [0, 1, 3, 2]
    assert _topological_order([{2}, {2}, set(), {0, 1}, set()]) == [3, 4, 0, 1, 2]
    assert _topological_order([{1}, {2}, {0}]) is None


def test_topological_order_matches_networkx_on_random_dags():
    nx = pytest.importorskip("networkx")
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 40)
        rank = list(range(n))
        rng.shuffle(rank)  # a random hidden order, so edges do not follow the index order
        succ = [{j for j in range(n) if rank[i] < rank[j] and rng.random() < 0.15} for i in range(n)]
        adjacency = np.zeros((n, n))
        for i, row in enumerate(succ):
            adjacency[i, list(row)] = 1
        assert _topological_order(succ) == list(nx.topological_sort(nx.DiGraph(adjacency)))


def test_virtual_edges_are_shortest_path_lengths_up_to_the_cutoff():
    succ = [{1, 4}, {2}, {3}, {5}, {3}, set()]  # 0-1-2-3-5 and the shortcut 0-4-3
    dist = _distances(succ, _topological_order(succ), cutoff=3)
    assert dist.tolist() == [
        [0, 1, 2, 2, 1, 3],
        [0, 0, 1, 2, 0, 3],
        [0, 0, 0, 1, 0, 2],
        [0, 0, 0, 0, 0, 1],
        [0, 0, 0, 1, 0, 2],
        [0, 0, 0, 0, 0, 0],
    ]
    assert _distances(succ, _topological_order(succ), cutoff=1).tolist() == [
        [int(j in row) for j in range(6)] for row in succ]


def test_virtual_edges_agree_with_breadth_first_search_and_handle_cycles():
    rng = random.Random(1)
    for _ in range(10):
        n = rng.randint(2, 60)
        succ = [{j for j in range(i + 1, n) if rng.random() < 0.08} for i in range(n)]
        for cutoff in (2, 5, 50):
            assert torch.equal(_distances(succ, _topological_order(succ), cutoff), _distances_bfs(
                [sorted(s) for s in succ], cutoff))
    cycle = [{1}, {2}, {0, 3}, set()]
    assert _distances(cycle, _topological_order(cycle), 50).tolist() == [
        [0, 1, 2, 3], [2, 0, 1, 2], [1, 2, 0, 1], [0, 0, 0, 0]]


def test_pos_enc_sum_takes_over_the_pos_enc_edges():
    # a -> p -> c and x -> p; inserting the sum after p: a -> sum -> c, x -> sum, p -> sum
    nodes = [_Node("a"), _Node("p"), _Node("c"), _Node("x")]
    graph = _Graph(nodes, succ=[{1}, {2}, set(), {1}], pred=[set(), {0, 3}, {1}, set()])
    graph.insert_after(1, _Node("AddBackward0"))
    assert [n.name for n in graph.nodes] == ["a", "p", "AddBackward0", "c", "x"]
    assert graph.succ == [{2}, {2}, {3}, set(), {2}]
    assert graph.pred == [set(), set(), {0, 1, 4}, {2}, set()]


def meta_timm(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, num_classes=10, device="meta", **kwargs)


@pytest.mark.parametrize("builder", ["ghn3", "ppuda"])
@pytest.mark.parametrize("name,left_out,layer_ops", [
    # official ghn3: KeyError on timm's norm subclasses (E); ppuda: extra sources (C) or trimmed names (F)
    ("convnext_atto", r"stages.\d.blocks.\d.gamma", {"stem.1.weight": "ln", "stages.0.blocks.0.norm.weight": "ln"}),
    ("efficientnet_b0", None, {"conv_stem.weight": "conv", "bn1.weight": "bn", "blocks.0.0.bn1.weight": "bn"}),
    ("vit_tiny_patch16_224", r"cls_token|pos_embed", {"blocks.0.norm1.weight": "ln", "norm.weight": "ln"}),
])
def test_timm_extensions_cover_every_supported_parameter(builder, name, left_out, layer_ops):
    import re

    model = meta_timm(name)
    graph = build_legacy_graph(model, builder)
    params = [n for n, _ in model.named_parameters()]
    covered = graph.parameter_names()
    assert [n for n in params if n not in covered] == [n for n in params if left_out and re.fullmatch(left_out, n)]
    by_name = {node.name: node for node in graph.nodes}
    for param, op in layer_ops.items():
        assert by_name[param].op == op
        assert by_name[param].info.name_for_matching == param  # not trimmed to 'stem.weight' (F)
    real = graph.dist == 1
    assert graph.nodes[0].op == "input"
    assert [i for i in range(graph.num_nodes) if not real[:, i].any()] == [0]  # one source (C)
    assert bool(torch.triu(real).eq(real).all())  # edges follow the node order
    assert graph.nodes[-1].info.last_bias and graph.nodes[-2].info.last_weight


def test_ppuda_builds_at_32x32_with_batch_norm_on_1x1_maps():
    graph = build_legacy_graph(meta_timm("resnet18"), "ppuda", (3, 32, 32))  # official batch of 1 fails (B)
    assert graph.input_size == (3, 32, 32)
    assert graph.nodes[-2].name == "fc.weight"


def test_forward_failure_names_the_model_and_the_input_size():
    with pytest.raises(RuntimeError, match=r"VisionTransformer .* 3x32x32.*input_size=\(C, H, W\)"):
        build_legacy_graph(meta_timm("vit_tiny_patch16_224"), "ghn3", (3, 32, 32))  # (G)


def test_model_is_left_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    model.eval()
    model[0].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    graph = build_legacy_graph(model, "ghn3", (3, 8, 8))
    assert [n.name for n in graph.nodes] == ["input", "0.weight", "0.bias", "1.weight", "4.weight", "4.bias"]
    assert not any(m.training for m in model.modules())
    assert not model[0].weight.requires_grad
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("kwargs,kv_heads", [
    ({}, 4), ({"attn_mask": torch.ones(9, 9, dtype=torch.bool).tril()}, 4), ({"is_causal": True}, 4), ({}, 2),
    ({"attn_mask": torch.zeros(1, 4, 9, 9, requires_grad=True)}, 4), ({"dropout_p": 0.1}, 4),
])
def test_meta_attention_takes_the_cpu_kernel(kwargs, kv_heads):
    def grad_fns(device):
        q = torch.randn(2, 4, 9, 8, device=device, requires_grad=True)
        kv = torch.randn(2, kv_heads, 9, 8, device=device, requires_grad=True)
        args = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
        with _CpuAttentionKernels():
            out = F.scaled_dot_product_attention(q, kv, kv, enable_gqa=kv_heads != 4, **args)
        names, fn = [], out.grad_fn
        while fn is not None:
            names.append(type(fn).__name__)
            fn = next((child for child, _ in fn.next_functions if child is not None), None)
        return names

    assert grad_fns("meta") == grad_fns("cpu")
