"""BatchNorm running statistics: calibrate_batchnorm on images and loaders; the data-free default for predictions."""

import copy
import json
import logging

import pytest
import timm
import torch
from safetensors import safe_open
from timm.layers import BatchNormAct2d
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ghn_init
from ghn_init.batchnorm import DATA_FREE, calibrate_predicted, synthetic_images
from ghn_init.cli import main
from ghn_init.export import bn_calibration, create_meta_model, write_predicted


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed)) * 2 + 1


class _ModeProbe(nn.Module):
    """Records the mode it ran in (as Dropout or drop-path would see it)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training)
        return x


def _bn_first() -> nn.Sequential:
    """BatchNorm straight on the images: its statistics must be those of the images."""
    return nn.Sequential(nn.BatchNorm2d(3), _ModeProbe(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_calibrate_on_a_tensor_averages_every_image_equally():
    model, images = _bn_first(), _images(10)
    ghn_init.calibrate_batchnorm(model, images, batch_size=4)  # batches of 4, 3, 3: unequal weights would show
    bn = model[0]
    assert torch.allclose(bn.running_mean, images.mean((0, 2, 3)), atol=1e-5)
    assert bn.num_batches_tracked == 3
    assert bn.momentum == 0.1, "momentum restored"


def test_calibrate_on_a_loader_of_image_label_tuples_matches_the_tensor():
    images, model = _images(12), _bn_first()
    direct = ghn_init.calibrate_batchnorm(copy.deepcopy(model), images, batch_size=4)
    loader = DataLoader(TensorDataset(images, torch.zeros(12, dtype=torch.long)), batch_size=4)
    loaded = ghn_init.calibrate_batchnorm(model, loader, max_images=8)
    assert torch.allclose(loaded[0].running_mean, images[:8].mean((0, 2, 3)), atol=1e-5)
    loaded = ghn_init.calibrate_batchnorm(loaded, loader)
    for a, b in zip(direct.state_dict().values(), loaded.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert loaded[3].num_batches_tracked == 3
    with pytest.raises(TypeError, match="tensors of images"):
        ghn_init.calibrate_batchnorm(_bn_first(), [{"image": images}])


@pytest.mark.parametrize("train", [True, False])
def test_mode_is_restored_and_only_norm_layers_run_in_train_mode(train):
    model = _bn_first().train(train)
    before = [m.training for m in model.modules()]
    ghn_init.calibrate_batchnorm(model, _images(8))
    assert [m.training for m in model.modules()] == before
    assert model[1].seen == [False], "dropout and drop-path must stay off while calibrating"
    assert model[0].num_batches_tracked == 1


def test_timm_batchnorm_act_layers_are_calibrated():
    model, images = nn.Sequential(BatchNormAct2d(3), nn.Conv2d(3, 2, 1)), _images(8)
    ghn_init.calibrate_batchnorm(model, images)
    assert torch.allclose(model[0].running_mean, images.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model[0].running_var, images.var((0, 2, 3)), rtol=1e-3)


def test_models_without_batchnorm_are_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), _ModeProbe()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert ghn_init.calibrate_batchnorm(model, _images(4)) is model
    assert model[2].seen == [] and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert calibrate_predicted(model, model.state_dict(), (3, 6, 6))["method"] == "none"


def test_synthetic_images_are_seeded_and_normalized():
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    a = synthetic_images(64, (3, 32, 32), mean, std, seed=0)
    assert torch.equal(a, synthetic_images(64, (3, 32, 32), mean, std, seed=0))
    assert not torch.equal(a, synthetic_images(64, (3, 32, 32), mean, std, seed=1))
    assert a.mean((0, 2, 3)).abs().max() < 0.3 and ((a.std((0, 2, 3)) - 1).abs() < 0.2).all()
    pixels = a * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    assert pixels.min() > -1e-6 and pixels.max() < 1 + 1e-6, "clipped where real pixels end"
    neighbours = torch.corrcoef(torch.stack([a[..., :-1].flatten(), a[..., 1:].flatten()]))[0, 1]
    assert neighbours > 0.5, "smooth like natural images, not white noise"


def _max_logit(state: dict, kwargs: dict) -> float:
    model = timm.create_model("resnet18", num_classes=10, **kwargs)
    model.load_state_dict(state)
    with torch.no_grad():
        return float(model.eval()(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))).abs().max())


def test_predictions_are_calibrated_without_data_deterministically(default_ghn):
    """The issue: identity statistics make eval-mode logits explode; the data-free default keeps them sane."""
    meta = timm.create_model("resnet18", num_classes=10, device="meta")
    state = default_ghn.predict(meta, (3, 32, 32))
    again = default_ghn.predict(meta, (3, 32, 32))
    assert all(torch.equal(state[k], again[k]) for k in state)
    identity = default_ghn.predict(meta, (3, 32, 32), calibrate_bn=False)
    assert all(torch.equal(state[k], identity[k]) for k in state if "running" not in k and "batches" not in k)
    assert not torch.equal(state["bn1.running_var"], identity["bn1.running_var"])
    assert _max_logit(identity, {}) > 100
    assert _max_logit(state, {}) < 100
    assert all(t.is_meta for t in meta.state_dict().values()), "the meta model is left as it was"


def test_apply_calibrates_the_filled_model_as_predict_does(default_ghn):
    model = timm.create_model("resnet18", num_classes=10)
    default_ghn.apply_(model, (3, 32, 32))
    expected = default_ghn.predict(timm.create_model("resnet18", num_classes=10, device="meta"), (3, 32, 32))
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(model.bn1.running_var, torch.ones(64)) and model.training


def test_models_with_unsaved_meta_buffers_keep_identity_with_a_warning(default_ghn, caplog):
    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.register_buffer("shift", torch.ones(1), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x + self.shift))

    with torch.device("meta"):
        model = Shifted()
    with caplog.at_level(logging.WARNING, logger="ghn_init.batchnorm"):
        state = default_ghn.predict(model, (3, 8, 8))
        record = calibrate_predicted(model, state, (3, 8, 8))
    assert torch.equal(state["bn.running_var"], torch.ones(4))
    assert record["method"] == "identity" and "shift" in record["reason"]
    assert "shift" in caplog.text and "left at identity" in caplog.text
    levit, _ = create_meta_model("levit_128s", num_classes=10)
    assert not any(b.is_meta for b in levit.buffers()), "rebuilt with real buffers, so it can be calibrated"


def test_models_too_large_to_calibrate_are_streamed_and_say_so(default_ghn, tmp_path, caplog):
    model = timm.create_model("resnet18", num_classes=10, device="meta")
    with caplog.at_level(logging.WARNING, logger="ghn_init.export"):
        path = write_predicted(default_ghn, model, (3, 32, 32), tmp_path / "w.safetensors", max_calibration_bytes=1000)
    record = bn_calibration(path)
    assert record["method"] == "identity" and "limit for calibrating in memory" in record["reason"]
    assert "identity" in caplog.text
    with safe_open(str(path), "pt") as file:
        assert torch.equal(file.get_tensor("bn1.running_var"), torch.ones(64))


def test_predict_folder_records_the_data_free_calibration(tmp_path):
    out = tmp_path / "r18"
    assert main(["predict", "resnet18", "--num-classes", "10", "--out", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())["ghn_init"]["bn_calibration"]
    assert record == bn_calibration(out / "model.safetensors")
    assert record["method"] == DATA_FREE and record["input_size"] == [3, 32, 32]
    card = (out / "README.md").read_text()
    assert "calibrated without data" in card and "at identity" not in card
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert float(model(torch.randn(8, 3, 32, 32)).abs().max()) < 100
    off = tmp_path / "identity"
    assert main(["predict", "resnet18", "--num-classes", "10", "--calibrate-bn", "0", "--out", str(off)]) == 0
    assert json.loads((off / "config.json").read_text())["ghn_init"]["bn_calibration"]["method"] == "identity"
    assert "at identity" in (off / "README.md").read_text()


def test_calibrate_bn_without_data_says_where_it_looked(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["predict", "resnet18", "--calibrate-bn", "10", "--data", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--data PATH" in err and str(tmp_path) in err and not out.exists()


@pytest.mark.data
def test_calibrate_bn_uses_real_train_images(tmp_path, default_ghn):
    from train_ghn.data import load_cifar10, normalize

    out = tmp_path / "r18"
    assert main(["predict", "resnet18", "--num-classes", "10", "--calibrate-bn", "50", "--out", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())["ghn_init"]["bn_calibration"]
    assert record["method"] == "images" and record["images"] == 50 and "CIFAR-10" in record["source"]
    assert "50 CIFAR-10 train images" in (out / "README.md").read_text()
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    images, _ = load_cifar10("train", indices=torch.arange(50).numpy())
    data = default_ghn.data_config
    expected = ghn_init.calibrate_batchnorm(timm.create_model(f"local-dir:{out}", pretrained=True),
                                            normalize(images, data["mean"], data["std"]))
    assert torch.allclose(loaded.bn1.running_var, expected.bn1.running_var, rtol=1e-4)
    assert torch.allclose(loaded.layer4[1].bn2.running_mean, expected.layer4[1].bn2.running_mean, atol=1e-4)
