"""The GHN-3-era alternatives: graph transformer encoder and low-rank (LoGAH) decoder."""

import itertools

import pytest
import timm
import torch
from torch import nn

import ghn_init
from ghn_init import GHN, GHNConfig
from ghn_init.ghn import _tile
from ghn_init.graph import build_graph
from ghn_init.transformer import distance_buckets

SMALL = dict(hidden=32, rounds=2, heads=4, latent=16, block=16, block_1x1=16, vector=16, rank=4, low_rank_size=64)
VARIANTS = list(itertools.product(("gated_gnn", "transformer"), ("tiling", "low_rank")))


def _ghn(encoder: str, decoder: str, **changes) -> GHN:
    torch.manual_seed(0)
    return GHN(GHNConfig(**{**SMALL, "encoder": encoder, "decoder": decoder, **changes}))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


def test_distance_buckets_hold_directed_clipped_shortest_paths():
    graph = build_graph(Residual(), (3, 8, 8))  # input, conv, batch_norm, relu, sum; input -> sum
    buckets = distance_buckets(graph, cutoff=50, max_distance=2)
    far = 5
    # row: the attending op, column: the op attended to; 1..2 ancestors, 3..4 descendants (+2)
    assert buckets.tolist() == [
        [0, 3, 4, 4, 3],
        [1, 0, 3, 4, 4],
        [2, 1, 0, 3, 4],
        [2, 2, 1, 0, 3],
        [1, 2, 2, 1, 0],
    ]
    assert distance_buckets(graph, cutoff=2, max_distance=2)[3, 0] == far, "beyond the cutoff: no path known"


@pytest.mark.parametrize(("encoder", "decoder"), VARIANTS)
def test_every_variant_predicts_real_models_and_trains_end_to_end(encoder, decoder):
    ghn = _ghn(encoder, decoder)
    models = [timm.create_model("resnet18", num_classes=10),
              timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)]
    graphs = [build_graph(m, (3, 32, 32)) for m in models]
    predicted = ghn(graphs)
    for model, tensors in zip(models, predicted):
        params = dict(model.named_parameters())
        assert tensors.keys() == params.keys()
        assert all(tensors[k].shape == p.shape and torch.isfinite(tensors[k]).all() for k, p in params.items())
    sum(t.pow(2).sum() for tensors in predicted for t in tensors.values()).backward()
    unused = [n for n, p in ghn.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not unused, f"{encoder}/{decoder}: parameters without gradient {unused}"


@pytest.mark.parametrize("encoder", ["gated_gnn", "transformer"])
def test_graphs_of_a_batch_do_not_see_each_other(encoder):
    ghn = _ghn(encoder, "tiling").eval()
    models = [timm.create_model(name, num_classes=10) for name in ("resnet18", "convnext_atto")]
    graphs = [build_graph(model, (3, 32, 32)) for model in models]
    with torch.no_grad():
        together = ghn(graphs)
        alone = [ghn([g])[0] for g in graphs]
    for a, b in zip(together, alone):
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_low_rank_weights_have_the_decoded_rank_and_tile_only_beyond_its_size():
    ghn = _ghn("gated_gnn", "low_rank", untie_noise=0.0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 160), nn.ReLU(), nn.Linear(160, 10))
    state = ghn.predict(model, (48,))
    rank, size = ghn.config.rank, ghn.config.low_rank_size
    middle = state["2.weight"]  # (160, 64): 2.5 copies of the 64-row factor product
    assert torch.linalg.matrix_rank(state["0.weight"]) == rank
    assert torch.equal(middle[:size], middle[size:2 * size]), "tiled beyond low_rank_size"
    tiling = _ghn("gated_gnn", "tiling", untie_noise=0.0).predict(model, (48,))["0.weight"]
    assert torch.equal(tiling[:16], tiling[16:32]), "the tiling decoder repeats its 16-row block"
    assert len(torch.unique(state["0.weight"], dim=0)) == 64, "the low-rank decoder does not"


@pytest.mark.parametrize(("encoder", "decoder"), VARIANTS[1:])
def test_variants_save_and_load_exactly(tmp_path, encoder, decoder):
    ghn = _ghn(encoder, decoder)
    again = ghn_init.load(str(ghn.save_pretrained(tmp_path / "ghn")))
    assert again.config == ghn.config
    assert ghn_init.content_hash(again) == ghn_init.content_hash(ghn)
    model = timm.create_model("convnext_atto", num_classes=10, device="meta")
    a, b = ghn.predict(model), again.predict(model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_encoder_or_decoder_is_an_error():
    with pytest.raises(ValueError, match="encoder: 'gat' is not one of"):
        GHNConfig(encoder="gat")
    with pytest.raises(ValueError, match="decoder"):
        GHNConfig(decoder="lora")


@pytest.mark.parametrize(("encoder", "decoder"), [("gated_gnn", "tiling"), ("gated_gnn", "low_rank")])
def test_batched_tiling_gives_each_block_tiled_and_the_norm_penalty(encoder, decoder):
    """predict_batch tiles same-shape tensors together: each must still be its own block tiled to
    its shape, and each graph's norm the sum over its distinct tensors (a tied weight once)."""
    ghn = _ghn(encoder, decoder, untie_noise=0.0)
    models = [timm.create_model("resnet18", num_classes=10),
              timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=3)]
    models[1].blocks[1].attn.proj.weight = models[1].blocks[0].attn.proj.weight  # a tie
    graphs = [build_graph(model, (3, 32, 32)) for model in models]
    batch = ghn.predict_batch(graphs)
    targets, blocks = ghn.decode(graphs)
    for target, block in zip(targets, blocks):
        expected = _tile(block, target.tile_shape).reshape(target.shape)
        assert torch.equal(batch.params[target.graph][target.name], expected), target.name
    assert batch.params[1]["blocks.1.attn.proj.weight"] is batch.params[1]["blocks.0.attn.proj.weight"]
    assert graphs[1].aliases, "the tie is seen"
    for gi, graph in enumerate(graphs):
        distinct = [t for name, t in batch.params[gi].items() if name not in graph.aliases]
        assert len(distinct) == len(batch.params[gi]) - len(graph.aliases)
        assert torch.allclose(batch.norms[gi], torch.stack([t.norm() for t in distinct]).sum(), rtol=1e-5)
    batch.norms.sum().backward()
    assert ghn.kernel_latent[0].weight.grad.abs().sum() > 0, "the penalty reaches the decoder"
