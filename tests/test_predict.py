"""ghn.predict / apply_ on real timm models with the embedded default GHN."""

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import ghn_init
from ghn_init import GHN, GHNConfig, GraphBuildError
from ghn_init.ghn import _kernel_latent

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


def _digest(state):
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode() + tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_predict_does_not_depend_on_the_thread_count(default_ghn):
    """efficientnet_b0's decoder batches summed differently on 1 and 2 threads before the GHN ran on one."""
    model = timm.create_model("efficientnet_b0", num_classes=10, device="meta")
    threads = torch.get_num_threads()
    try:
        digests = set()
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            digests.add(_digest(default_ghn.predict(model)))
    finally:
        torch.set_num_threads(threads)
    assert len(digests) == 1


def test_predict_is_identical_in_a_fresh_process(default_ghn):
    code = (
        "import sys, timm, torch, ghn_init; sys.path.insert(0, 'tests'); from test_predict import _digest;"
        "torch.set_num_threads(2);"
        "m = timm.create_model('mobilenetv3_small_050', num_classes=10, device='meta');"
        "print(_digest(ghn_init.load().predict(m)))"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).parent.parent)
    model = timm.create_model("mobilenetv3_small_050", num_classes=10, device="meta")
    assert fresh.stdout.strip().splitlines()[-1] == _digest(default_ghn.predict(model))


def test_predict_tensors_streams_the_state_dict_in_order(default_ghn):
    model = timm.create_model("resnet18", num_classes=10, device="meta")
    stream = default_ghn.predict_tensors(model)
    first_name, first = next(stream)
    assert first_name == next(iter(model.state_dict())) and first.shape == model.conv1.weight.shape
    rest = dict(stream)
    expected = default_ghn.predict(model, calibrate_bn=False)  # streamed statistics stay at identity
    assert [first_name, *rest] == list(expected)
    assert all(torch.equal(expected[k], v) for k, v in rest.items())


def test_tied_parameters_are_predicted_once_under_every_name(default_ghn):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = model[0].weight
    state = default_ghn.predict(model, input_size=(8,))
    assert state["0.weight"] is state["2.weight"]


def test_batchnorm_statistics_at_identity_without_calibration(default_ghn):
    state = default_ghn.predict(timm.create_model("resnet18", num_classes=10, device="meta"), calibrate_bn=False)
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


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_apply_keeps_coat_shared_modules_shared(default_ghn, device):
    # CoaT registers its conv position encodings both as cpe1 and inside serial_blocks1.0
    model = timm.create_model("coat_lite_tiny", num_classes=10, device=device)
    before = dict(model.named_parameters(remove_duplicate=False))
    expected = default_ghn.predict(model)
    report = default_ghn.apply_(model)
    after = dict(model.named_parameters(remove_duplicate=False))
    assert report.skipped == {} and set(report.predicted) == set(expected)
    assert model.cpe1.proj is model.serial_blocks1[0].cpe.proj
    assert model.cpe1.proj.weight is model.serial_blocks1[0].cpe.proj.weight
    assert all(type(p) is nn.Parameter and p.device.type == "cpu" and p.requires_grad for p in after.values())
    assert len({id(p) for p in after.values()}) == len({id(p) for p in before.values()})
    if device == "cpu":
        assert all(after[n] is before[n] for n in after)
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
    model.eval()
    assert model(torch.randn(2, 3, 224, 224)).isfinite().all()


class _Shared(nn.Module):
    """A submodule registered under two names and a weight tied across two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))
        self.again = self.block
        self.head = nn.Linear(16, 8, bias=False)
        self.head.weight = nn.Parameter(torch.empty(8, 16))
        self.unembed = nn.Linear(16, 8, bias=False)
        self.unembed.weight = self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.again(self.block(self.embed(x)))
        return self.head(h) + self.unembed(h.flip(-1))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_apply_keeps_ties_grad_flags_and_dtype(default_ghn, device):
    with torch.device(device):  # (Module.to('meta') itself unties weights shared across modules)
        model = _Shared().double()
    model.embed.bias.requires_grad_(False)
    optimizer_params = list(model.parameters())
    report = default_ghn.apply_(model, input_size=(8,))
    assert report.skipped == {}
    assert model.again is model.block and model.unembed.weight is model.head.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    assert all(type(p) is nn.Parameter and p.dtype == torch.float64 and not p.is_meta for p in params.values())
    assert not model.embed.bias.requires_grad and model.head.weight.requires_grad
    assert len({id(p) for p in params.values()}) == len(optimizer_params)
    if device == "cpu":
        assert [p for p in model.parameters()] == optimizer_params
    assert model(torch.randn(2, 8, dtype=torch.float64)).isfinite().all()


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


def _has_tiled_copies(tensor: torch.Tensor) -> bool:
    """Two equal output rows or two equal input columns."""
    rows = tensor.reshape(tensor.shape[0], -1)
    cols = tensor.transpose(0, 1).reshape(tensor.shape[1], -1)
    return len(torch.unique(rows, dim=0)) < len(rows) or len(torch.unique(cols, dim=0)) < len(cols)


def _with_config(ghn: GHN, **changes) -> GHN:
    other = GHN(dataclasses.replace(ghn.config, **changes))
    other.load_state_dict(ghn.state_dict())
    return other


def test_untie_noise_leaves_no_tiled_copies(default_ghn):
    model = timm.create_model("resnet18", num_classes=10, device="meta")
    tied = _with_config(default_ghn, untie_noise=0.0).predict(model, calibrate_bn=False)
    untied = default_ghn.predict(model, calibrate_bn=False)
    assert _has_tiled_copies(tied["layer4.0.conv1.weight"]), "a 512-wide conv is tiled from a 64-wide block"
    weights = [k for k, v in untied.items() if v.dim() >= 2]
    assert not any(_has_tiled_copies(untied[k]) for k in weights)
    assert torch.equal(untied["conv1.weight"], tied["conv1.weight"]), "a 64-wide tensor has no copies to untie"
    assert all(torch.equal(untied[k], tied[k]) for k, v in untied.items() if v.dim() < 2)
    noise = untied["layer4.0.conv1.weight"] - tied["layer4.0.conv1.weight"]
    ratio = float(noise.pow(2).mean().sqrt() / tied["layer4.0.conv1.weight"].pow(2).mean().sqrt())
    assert 0.8 < ratio / default_ghn.config.untie_noise < 1.2


def test_residual_branch_gain_scales_only_branch_ends(default_ghn):
    gain = 0.25
    plain_ghn = _with_config(default_ghn, residual_branch_gain=1.0, untie_noise=0.0)
    scaled_ghn = _with_config(default_ghn, residual_branch_gain=gain, untie_noise=0.0)
    kwargs = dict(num_classes=10, img_size=32, patch_size=4, device="meta")
    pooled = timm.create_model("vit_tiny_patch16_224", global_pool="avg", **kwargs)
    plain, scaled = plain_ghn.predict(pooled), scaled_ghn.predict(pooled)
    ends = {k for k in plain if k.endswith(("attn.proj.weight", "attn.proj.bias", "fc2.weight", "fc2.bias"))}
    assert len(ends) == 4 * 12
    for name in plain:
        expected = plain[name] * gain if name in ends else plain[name]
        assert torch.allclose(scaled[name], expected, rtol=1e-6, atol=0), name
    class_token = timm.create_model("vit_tiny_patch16_224", **kwargs)
    plain, scaled = plain_ghn.predict(class_token), scaled_ghn.predict(class_token)
    assert all(torch.equal(plain[k], scaled[k]) for k in plain), "no gain where the output reads the class token"


def test_kernels_larger_than_the_latent_are_resampled_not_tiled(default_ghn):
    """A 16x16 patch embedding gets a smooth upsampled filter; 7x7 and smaller keep the centre crop."""
    big = timm.create_model("mixer_s16_224", num_classes=10, img_size=32, device="meta")
    stem = _with_config(default_ghn, untie_noise=0.0).predict(big)["stem.proj.weight"]
    period = default_ghn.config.max_kernel
    assert stem.shape[-2:] == (16, 16)
    assert not torch.allclose(stem[..., :period], stem[..., period:2 * period])
    neighbours = (stem[..., 1:] - stem[..., :-1]).pow(2).mean()
    assert neighbours < 0.5 * stem.pow(2).mean(), "resampling gives filters smoother than white noise"
    latent = torch.randn(2, 4, period, period)
    assert torch.equal(_kernel_latent(latent, period, period), latent)
    assert torch.equal(_kernel_latent(latent, 3, 3), latent[:, :, 2:5, 2:5])
    assert torch.equal(_kernel_latent(latent, 1, 5), latent[:, :, 3:4, 1:6])
    tall = _kernel_latent(latent, 9, 3)
    assert tall.shape == (2, 4, 9, 3) and torch.allclose(tall[:, :, 0], latent[:, :, 0, 2:5])
