"""Tests for the evaluation protocol (train_ghn.evaluate) and its SGD baseline (train_ghn.sgd)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from train_ghn import evaluate
from train_ghn.sgd import SGDRecipe, train_sgd

TINY = {"test_efficientnet": {}, "test_vit": {"img_size": 32}}


def _toy_data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1 images are bright, class 0 dark: learnable in a few steps."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = (torch.rand(n, 3, 32, 32, generator=g) * 100 + labels[:, None, None, None] * 150).to(torch.uint8)
    return images, labels


def _toy_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 2))


def _twins() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a, b = _toy_model(), _toy_model()
    b.load_state_dict(a.state_dict())
    return a, b


def test_sgd_learns_and_is_reproducible():
    images, labels = _toy_data()
    a, b = _twins()
    losses = train_sgd(a, images, labels, 40, SGDRecipe(batch_size=32, seed=3))
    assert len(losses) == 40
    assert sum(losses[-5:]) < sum(losses[:5])
    assert train_sgd(b, images, labels, 40, SGDRecipe(batch_size=32, seed=3)) == losses
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert train_sgd(_toy_model(), images, labels, 0) == []


def test_sgd_batches_differ_by_seed():
    images, labels = _toy_data()
    a, b = _twins()
    assert train_sgd(a, images, labels, 5, SGDRecipe(seed=0)) != train_sgd(b, images, labels, 5, SGDRecipe(seed=1))


def test_protocol_lists():
    assert len(evaluate.OOD_ARCHITECTURES) >= 8
    assert [a.name for a in evaluate.id_architectures((7, 8))] == ["deepnets/id/7", "deepnets/id/8"]
    assert {a.group for a in evaluate.ood_architectures()} == {"ood"}
    assert evaluate.named_architecture("resnet18").group == "ood"
    assert evaluate.named_architecture("resnet10t").group == "named"
    assert evaluate.named_architecture("local-dir:/nowhere").load is not None


def test_ood_architectures_build_at_32x32_on_meta():
    import timm

    for name, kwargs in evaluate.OOD_ARCHITECTURES.items():
        model = timm.create_model(name, num_classes=10, device="meta", **kwargs)
        assert model(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 10), name


@pytest.mark.data
def test_cli_sgd_protocol_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "OOD_ARCHITECTURES", TINY)
    out, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    from ghn_init.cli import main as ghn_init_cli

    assert ghn_init_cli(["eval", "--split", "ood", "--sgd-steps", "3", "--train-images", "320", "--calibrate-bn",
                         "64", "--out", str(out), "--plot", str(plot)]) == 0
    result = json.loads(out.read_text())
    assert result["setup"]["sgd_steps"] == [3]
    assert result["setup"]["sgd_train_images"] == 320
    assert result["setup"]["ghn_sha256"]
    assert set(result["architectures"]) == set(TINY)
    changed = 0
    for name, row in result["architectures"].items():
        assert row["group"] == "ood" and row["kwargs"] == TINY[name]
        assert row["kept_tensors"] == 0 and row["predicted_tensors"] > 0
        for init in ("ghn", "default_init"):
            assert 0.0 <= row[init]["acc_bn_calibrated"] <= 1.0 and 0.0 <= row[init]["acc_batch_stats"] <= 1.0
            sgd = row["sgd"]["3"][init]
            assert 0.0 <= sgd["acc"] <= 1.0 and sgd["train_loss"] > 0
            changed += sgd["acc"] != row[init]["acc_bn_calibrated"]
    assert changed >= 2, "3 SGD steps left every accuracy unchanged"
    summary = result["summary"]["ood"]
    assert summary["architectures"] == 2 and set(summary["sgd"]["3"]) == {"default_init", "ghn", "ghn_at_least_default"}
    assert result["mean_ghn_acc_bn_calibrated"] == summary["ghn_acc_bn_calibrated"]
    assert plot.stat().st_size > 10_000


def test_cli_needs_architectures():
    with pytest.raises(SystemExit):
        evaluate.main([])


def test_batch_statistics_accuracy_leaves_running_statistics_alone():
    """The batch-statistics number runs test images in train mode; the eval-mode number after it
    must still use the statistics the model had (data-free, or calibrated on train images)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(2, 3, 8, 8))
    model[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.randn(40, 3, 8, 8) * 3 + 1, torch.randint(0, 10, (40,))
    evaluate.accuracy(model, images, labels, batch_size=20, batch_stats=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training
