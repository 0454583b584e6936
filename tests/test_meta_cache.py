"""MetaShapeCache: repeated meta ops answered from recorded layouts, graphs unchanged."""

import contextlib

import pytest
import timm
import torch
from torch.nn import functional as F

import ghn_init.graph as graph_module
from ghn_init import build_graph
from ghn_init.meta_cache import MetaShapeCache


def _layout(t: torch.Tensor):
    return t.device.type, tuple(t.shape), t.stride(), t.dtype


def _ops(x: torch.Tensor, w: torch.Tensor, stats: torch.Tensor) -> list[torch.Tensor]:
    """A few ops of the kinds a network repeats: multi-output, channels-last, in-place, list-valued."""
    y = F.batch_norm(F.conv2d(x, w, padding=1), stats, stats.clone(), training=False)
    pooled, indices = F.max_pool2d(y, 2, return_indices=True)
    z = F.gelu(pooled.to(memory_format=torch.channels_last)).relu_()
    return [y, pooled, indices, z, *torch.unbind(z.mean((2, 3)), 1)]


def test_repeated_ops_are_cache_hits_with_the_layouts_of_the_real_kernels():
    def args():
        return [torch.empty(shape, device="meta") for shape in ((2, 4, 8, 8), (4, 4, 3, 3), (4,))]

    expected = [_layout(t) for t in _ops(*args())]
    with MetaShapeCache() as cache:
        first = [_layout(t) for t in _ops(*args())]
        misses = cache.misses
        second = _ops(*args())
    assert first == expected and [_layout(t) for t in second] == expected
    assert misses > 0 and cache.misses == misses, "the second pass must be answered from the cache"
    assert cache.hits >= misses
    assert len({id(t) for t in second}) == len(second), "a hit returns fresh tensors"


def test_layout_changing_in_place_ops_and_cpu_tensors_are_not_answered_from_the_cache():
    with MetaShapeCache():
        shapes = [tuple(torch.empty(3, 5, device="meta").unsqueeze_(0).shape) for _ in range(2)]
        meta_then_cpu = [torch.empty(3, 5, device=d).exp() for d in ("meta", "cpu")]
    assert shapes == [(1, 3, 5)] * 2
    assert [t.device.type for t in meta_then_cpu] == ["meta", "cpu"]


@pytest.mark.parametrize("name, kwargs", [
    ("resnet18", {}), ("efficientnet_b0", {}), ("mobilenetv3_small_100", {}), ("convnext_atto", {}),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}),
    ("swin_tiny_patch4_window7_224", {"img_size": 32, "window_size": 4}),
])
def test_graph_is_the_same_without_the_cache(monkeypatch, name, kwargs):
    model = timm.create_model(name, num_classes=10, device="meta", **kwargs)
    caches = []

    class Counted(MetaShapeCache):
        def __init__(self):
            super().__init__()
            caches.append(self)

    monkeypatch.setattr(graph_module, "MetaShapeCache", Counted)
    cached = build_graph(model)
    monkeypatch.setattr(graph_module, "MetaShapeCache", contextlib.nullcontext)
    uncached = build_graph(model)
    assert cached.to_dict() == uncached.to_dict() and cached.signature() == uncached.signature()
    assert caches and caches[0].hits > 0, f"{name} repeats layers; some of its ops must be answered from the cache"
