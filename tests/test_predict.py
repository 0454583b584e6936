"""ghn.predict / apply_ on real timm models with the embedded default GHN."""

import pytest
import timm
import torch

import ghn_init
from ghn_init import GHN, GHNConfig, GraphBuildError

MODELS = {
    "resnet18": {},
    "resnet50": {},
    "convnext_atto": {},
    "efficientnet_b0": {},
    "mobilenetv3_small_100": {},
    "regnetx_002": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
    "deit_tiny_distilled_patch16_224": {"img_size": 32, "patch_size": 4},
    "resnext26ts": {},
    "densenet121": {},
}


@pytest.mark.parametrize("name", MODELS)
def test_predict_matches_state_dict_on_meta(default_ghn, name):
    model = timm.create_model(name, num_classes=10, device="meta", **MODELS[name])
    state = default_ghn.predict(model)
    reference = model.state_dict()
    assert list(state) == list(reference)
    for key, ref in reference.items():
        got = state[key]
        assert got.shape == ref.shape and got.dtype == ref.dtype and got.device.type == "cpu", key
        if got.is_floating_point():
            assert torch.isfinite(got).all(), key
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() >= 2]
    assert all(float(w.std()) > 0 for w in weights), "predicted weights are not constant"


def test_predict_is_deterministic_and_device_independent(default_ghn):
    meta = timm.create_model("resnet18", num_classes=10, device="meta")
    cpu = timm.create_model("resnet18", num_classes=10)
    a, b, c = default_ghn.predict(meta), default_ghn.predict(meta), default_ghn.predict(cpu)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_batchnorm_statistics_at_identity(default_ghn):
    state = default_ghn.predict(timm.create_model("resnet18", num_classes=10, device="meta"))
    assert torch.equal(state["bn1.running_mean"], torch.zeros(64))
    assert torch.equal(state["bn1.running_var"], torch.ones(64))
    assert state["bn1.num_batches_tracked"].dtype == torch.long


def test_apply_fills_model_and_reports(default_ghn):
    model = timm.create_model("convnext_atto", num_classes=7)
    report = default_ghn.apply_(model)
    assert report.skipped == {}
    assert set(report.predicted) == set(model.state_dict())
    expected = default_ghn.predict(model)
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())


def test_apply_materializes_meta_model(default_ghn):
    model = timm.create_model("resnet18", num_classes=10, device="meta")
    default_ghn.apply_(model)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_predict_half_precision_model_keeps_dtypes():
    model = timm.create_model("resnet18", num_classes=10, device="meta").to(torch.bfloat16)
    state = GHN(GHNConfig(hidden=16, rounds=1, latent=8, block=8, block_1x1=8, vector=8)).predict(model)
    assert state["conv1.weight"].dtype == torch.bfloat16
    assert state["bn1.num_batches_tracked"].dtype == torch.long


def test_forward_failure_names_model_and_size(default_ghn):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10, device="meta")
    with pytest.raises(GraphBuildError, match=r"vit_tiny_patch16_224.*input size 3x64x64"):
        default_ghn.predict(model, input_size=(3, 64, 64))


def test_unknown_ghn_reference_lists_what_was_tried(tmp_path):
    with pytest.raises(ghn_init.GHNNotFoundError) as err:
        ghn_init.load(str(tmp_path / "nope"))
    message = str(err.value)
    assert "local folder" in message and "Hub repo" in message


def test_save_and_load_roundtrip_is_strict(tmp_path, default_ghn):
    folder = default_ghn.save_pretrained(tmp_path / "ghn")
    again = ghn_init.load(str(folder))
    assert ghn_init.content_hash(again) == ghn_init.content_hash(default_ghn)
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors.pop(next(iter(tensors)))
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensors"):
        ghn_init.load(str(folder))
